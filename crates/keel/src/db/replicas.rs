//! Read replicas on the read path: which source a read may come from, decided per read from its kind's
//! staleness budget, each replica's measured lag, and what the reader must already see.
//!
//! - **Lag, measured as "fresh as of".** Every [`PROBE_EVERY`] a monitor notes the primary's WAL
//!   insert position with the time just before it asked, then each replica's replayed position. A
//!   replica that has replayed past the position noted at time `t` holds every commit made before
//!   `t`: its lag is `now - t` for the newest such `t`, computed at the moment of each read (so a lag
//!   measured a while ago only looks older, never younger). Why not `now() -
//!   pg_last_xact_replay_timestamp()`: on an idle primary nothing is replayed, and that figure grows
//!   for ever although the replica misses nothing; and unlike bytes behind, a time compares with a
//!   budget. An idle primary's position stays put, so a replica that has replayed it stays fresh.
//! - **Routing.** A read whose budget is above zero goes to a replica that is up, whose lag is
//!   within the budget and that has replayed past the reader's floor (their own last write), spread
//!   across those in turn; else to the primary. Strong reads never call [`Db::read`]: they take a
//!   primary connection. A replica that fails a query is asked no more by that read: the same
//!   query runs on the primary, and a connection-level failure marks the replica down at once.
//! - **Down and back.** Three probes in a row that fail mark a replica down; the monitor keeps
//!   probing it every [`PROBE_EVERY`], and the first that answers brings it back.
//!
//! What is counted: reads per kind and target (for `GET /v1/admin/consistency`), reads per replica
//! (`GET /v1/admin/replicas`), `keel_db_reads_total{database,target}`,
//! `keel_replica_lag_seconds{database,replica}` and `keel_replica_up{database,replica}`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, PoolError, TimeoutType, Timeouts};
use tokio_postgres::types::PgLsn;

use super::{Client, Db, DbError, PgError};
use crate::consistency::{DataKind, KINDS};

/// How often each process measures every replica's lag.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Probes in a row that fail before a replica is marked down.
const DOWN_AFTER: u32 = 3;
/// The longest a probe, or a read's wait for a replica connection, may take: a replica slower than
/// this is not worth waiting for when the primary can answer.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(1);

/// A position in a database's write-ahead log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl From<PgLsn> for Lsn {
    fn from(lsn: PgLsn) -> Lsn {
        Lsn(u64::from(lsn))
    }
}

/// Where a read was served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Replica => "replica",
        }
    }
}

/// What a reader must already see, beyond its kind's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// Nothing more: any replica within the budget will do.
    Any,
    /// This position: the reader's own last write (read-your-writes).
    AtLeast(Lsn),
    /// Whatever was last written: the primary (the reader's floor cannot be known).
    Primary,
}

/// A value read, where from, and how far behind that source was.
#[derive(Debug)]
pub struct Read<T> {
    pub value: T,
    pub target: Target,
    /// Zero from the primary; the replica's lag when the read started.
    pub lag: Duration,
}

/// One replica as `GET /v1/admin/replicas` shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ReplicaStatus {
    pub name: String,
    pub up: bool,
    /// How far behind it is in time (see the module's comment); null while never measured.
    pub lag_ms: Option<u64>,
    /// Bytes of WAL it has yet to replay, at the last probe; null while never measured.
    pub lag_bytes: Option<u64>,
    /// Reads it served since this process started.
    pub reads: u64,
}

/// A database's read routing: its replicas (perhaps none), the primary's recent WAL positions, and
/// the read counters. Set up once per process by [`super::Databases::route_reads`].
pub struct Routing {
    database: String,
    replicas: Vec<Replica>,
    /// `(time just before asking, the primary's insert position then)`, oldest first, positions
    /// growing; kept for [`Routing::horizon`].
    samples: Mutex<VecDeque<(Instant, Lsn)>>,
    horizon: Duration,
    /// Page sizes of this database's WAL, to read an insert position as the end of a record.
    wal_layout: Mutex<WalLayout>,
    next: AtomicUsize,
    /// Reads per kind of the consistency table: `[primary, replica]`.
    per_kind: [[AtomicU64; 2]; KINDS.len()],
    metrics: [metrics::Counter; 2],
}

struct Replica {
    name: String,
    db: Db,
    up: AtomicBool,
    failures: AtomicU32,
    seen: Mutex<Seen>,
    reads: AtomicU64,
    lag_metric: metrics::Gauge,
    up_metric: metrics::Gauge,
}

/// What the last successful probe of a replica found.
#[derive(Default)]
struct Seen {
    /// Every commit made on the primary before this instant has been replayed.
    fresh_as_of: Option<Instant>,
    replayed: Option<Lsn>,
    lag_bytes: Option<u64>,
}

impl Routing {
    /// Routing for database `database` (its label in the API and metrics) with these replica pools;
    /// WAL positions are kept for `horizon` (the longest budget a read of it may have).
    pub(super) fn new(database: &str, replicas: Vec<(String, Db)>, horizon: Duration) -> Routing {
        let replicas = replicas
            .into_iter()
            .map(|(name, db)| {
                let labels = [("database", database.to_owned()), ("replica", name.clone())];
                let up_metric = metrics::gauge!("keel_replica_up", &labels);
                // Up until a probe says otherwise: the first probe comes within a quarter second.
                up_metric.set(1.0);
                Replica {
                    lag_metric: metrics::gauge!("keel_replica_lag_seconds", &labels),
                    up_metric,
                    name,
                    db,
                    up: AtomicBool::new(true),
                    failures: AtomicU32::new(0),
                    seen: Mutex::default(),
                    reads: AtomicU64::new(0),
                }
            })
            .collect();
        let counter = |target: Target| metrics::counter!("keel_db_reads_total", "database" => database.to_owned(), "target" => target.as_str());
        Routing {
            database: database.to_owned(),
            replicas,
            samples: Mutex::default(),
            horizon,
            wal_layout: Mutex::new(WalLayout::DEFAULT),
            next: AtomicUsize::new(0),
            per_kind: Default::default(),
            metrics: [counter(Target::Primary), counter(Target::Replica)],
        }
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn has_replicas(&self) -> bool {
        !self.replicas.is_empty()
    }

    /// Reads of `kind` served by the primary and by replicas, since start.
    pub fn reads_of(&self, kind: DataKind) -> [u64; 2] {
        self.per_kind[kind as usize].each_ref().map(|n| n.load(Ordering::Relaxed))
    }

    pub fn status(&self) -> Vec<ReplicaStatus> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|r| {
                let seen = r.seen.lock().unwrap();
                ReplicaStatus {
                    name: r.name.clone(),
                    up: r.up.load(Ordering::Relaxed),
                    lag_ms: seen.fresh_as_of.map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    lag_bytes: seen.lag_bytes,
                    reads: r.reads.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// An insert position read on the primary, as the end of the last record written (see
    /// [`WalLayout::end_of_record`]).
    pub fn end_of_record(&self, insert: Lsn) -> Lsn {
        self.wal_layout.lock().unwrap().end_of_record(insert)
    }

    fn count(&self, kind: DataKind, target: Target) {
        self.per_kind[kind as usize][target as usize].fetch_add(1, Ordering::Relaxed);
        self.metrics[target as usize].increment(1);
    }

    /// The replica to read from, if one is up, within `budget` and past `floor`; taken in turn.
    fn choose(&self, budget: Duration, floor: Floor) -> Option<(&Replica, Duration)> {
        if budget.is_zero() || floor == Floor::Primary || self.replicas.is_empty() {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.replicas.len()).find_map(|i| {
            let replica = &self.replicas[(start + i) % self.replicas.len()];
            if !replica.up.load(Ordering::Relaxed) {
                return None;
            }
            let seen = replica.seen.lock().unwrap();
            let lag = now.saturating_duration_since(seen.fresh_as_of?);
            let past_floor = match floor {
                Floor::AtLeast(lsn) => seen.replayed.is_some_and(|r| r >= lsn),
                _ => true,
            };
            (lag <= budget && past_floor).then_some((replica, lag))
        })
    }
}

impl Db {
    /// Reads `kind` with `query`, from a replica whose lag is within `budget` and that has replayed
    /// past `floor`, or else from the primary; a replica that fails the query is replaced by the
    /// primary, with no error to the caller. `query` gets a connection and may run twice (once on a
    /// replica, once on the primary), so it must only read.
    pub async fn read<T, F, Fut>(
        &self,
        kind: DataKind,
        budget: Duration,
        floor: Floor,
        query: F,
    ) -> Result<Read<T>, DbError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        let routing = self.routing.get();
        if let Some((replica, lag)) = routing.and_then(|r| r.choose(budget, floor)) {
            match replica.query(&query).await {
                Ok(value) => {
                    let routing = routing.expect("a replica was chosen by the routing");
                    routing.count(kind, Target::Replica);
                    replica.reads.fetch_add(1, Ordering::Relaxed);
                    return Ok(Read { value, target: Target::Replica, lag });
                }
                Err(e) => {
                    tracing::warn!(database = %self.name, replica = %replica.name, error = %e,
                        "a read failed on a replica; reading from the primary");
                }
            }
        }
        let value = query(self.client().await?).await?;
        if let Some(routing) = routing {
            routing.count(kind, Target::Primary);
        }
        Ok(Read { value, target: Target::Primary, lag: Duration::ZERO })
    }

    /// Like [`Db::read`], for a row that may not exist: a replica that does not have it is not
    /// believed (the row may be newer than the replica), and the primary is asked.
    pub async fn read_one<T, F, Fut>(
        &self,
        kind: DataKind,
        budget: Duration,
        floor: Floor,
        query: F,
    ) -> Result<Read<Option<T>>, DbError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<Option<T>, PgError>>,
    {
        let read = self.read(kind, budget, floor, &query).await?;
        if read.value.is_none() && read.target == Target::Replica {
            return self.read(kind, budget, Floor::Primary, query).await;
        }
        Ok(read)
    }

    /// A connection to the primary for a read of `kind` that never goes to a replica (a strong kind,
    /// the owner's cart), counted with the routed reads so that the table shows where every kind is
    /// read from.
    pub async fn primary_for(&self, kind: DataKind) -> Result<Client, DbError> {
        let client = self.client().await?;
        if let Some(routing) = self.routing.get() {
            routing.count(kind, Target::Primary);
        }
        Ok(client)
    }

    /// This database's read routing, once set up.
    pub fn routing(&self) -> Option<&Routing> {
        self.routing.get().map(|r| &**r)
    }
}

impl Replica {
    async fn query<T, F, Fut>(&self, query: &F) -> Result<T, DbError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        let client = match self.client().await {
            Ok(client) => client,
            // Every connection busy: the replica is loaded, not gone.
            Err(e @ DbError::Pool(PoolError::Timeout(TimeoutType::Wait))) => return Err(e),
            Err(e) => {
                self.mark_down("no connection could be made");
                return Err(e);
            }
        };
        query(client).await.map_err(|e| {
            // The server gone (not a query it refused): no more reads until a probe answers.
            if e.as_db_error().is_none() {
                self.mark_down("its connection broke");
            }
            DbError::Query(e)
        })
    }

    async fn client(&self) -> Result<Client, DbError> {
        let timeouts =
            Timeouts { wait: Some(REPLICA_TIMEOUT), create: Some(REPLICA_TIMEOUT), recycle: Some(REPLICA_TIMEOUT) };
        Ok(self.db.pool().timeout_get(&timeouts).await?)
    }

    fn mark_down(&self, why: &str) {
        self.failures.store(DOWN_AFTER, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_metric.set(0.0);
            tracing::warn!(replica = %self.name, why, "replica marked down; reads go to the primary or other replicas");
        }
    }

    fn mark_failed_probe(&self, database: &str, error: &str) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= DOWN_AFTER && self.up.swap(false, Ordering::Relaxed) {
            self.up_metric.set(0.0);
            tracing::warn!(database, replica = %self.name, error, "replica down: {DOWN_AFTER} probes in a row failed");
        }
    }

    fn mark_answered(&self, database: &str) {
        self.failures.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            self.up_metric.set(1.0);
            tracing::info!(database, replica = %self.name, "replica answers again; reads may use it");
        }
    }
}

/// Measures the lag of every replica of `routing`'s database every [`PROBE_EVERY`], until the
/// routing is dropped. `primary` is the primary's pool.
pub(super) async fn monitor(routing: Weak<Routing>, primary: Pool) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut layout_known = false;
    loop {
        tick.tick().await;
        let Some(routing) = routing.upgrade() else { return };
        if !layout_known {
            layout_known = read_wal_layout(&routing, &primary).await;
        }
        let asked_at = Instant::now();
        // Without the primary's position no lag can be told: the replicas keep their last one,
        // which only grows older.
        if let Ok(Some(insert)) = probe(&primary, "SELECT pg_current_wal_insert_lsn()").await {
            routing.note_primary(asked_at, routing.end_of_record(insert));
        }
        let probes = routing.replicas.iter().map(|replica| async move {
            // Null once it was promoted: it is no replica of this primary any more.
            let result = probe(replica.db.pool(), "SELECT pg_last_wal_replay_lsn()").await;
            (replica, result)
        });
        for (replica, result) in futures_util::future::join_all(probes).await {
            match result {
                Ok(Some(replayed)) => {
                    routing.note_replica(replica, replayed);
                    replica.mark_answered(&routing.database);
                }
                Ok(None) => replica.mark_failed_probe(&routing.database, "not in recovery: not a replica"),
                Err(e) => replica.mark_failed_probe(&routing.database, &e),
            }
        }
    }
}

/// One WAL position, asked on a connection of `pool` within [`REPLICA_TIMEOUT`].
async fn probe(pool: &Pool, sql: &str) -> Result<Option<Lsn>, String> {
    let asked = async {
        let timeouts =
            Timeouts { wait: Some(REPLICA_TIMEOUT), create: Some(REPLICA_TIMEOUT), recycle: Some(REPLICA_TIMEOUT) };
        let client = pool.timeout_get(&timeouts).await.map_err(|e| e.to_string())?;
        let row = client.query_one(sql, &[]).await.map_err(|e| e.to_string())?;
        Ok(row.get::<_, Option<PgLsn>>(0).map(Lsn::from))
    };
    tokio::time::timeout(REPLICA_TIMEOUT, asked)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REPLICA_TIMEOUT:?}")))
}

async fn read_wal_layout(routing: &Routing, primary: &Pool) -> bool {
    let read = async {
        let client = primary.get().await.ok()?;
        let sql = "SELECT current_setting('wal_block_size')::bigint, \
                   (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')";
        let row = client.query_one(sql, &[]).await.ok()?;
        Some(WalLayout { block: row.get::<_, i64>(0) as u64, segment: row.get::<_, i64>(1) as u64 })
    };
    match tokio::time::timeout(REPLICA_TIMEOUT, read).await.ok().flatten() {
        Some(layout) => {
            *routing.wal_layout.lock().unwrap() = layout;
            true
        }
        None => false,
    }
}

impl Routing {
    fn note_primary(&self, asked_at: Instant, position: Lsn) {
        let mut samples = self.samples.lock().unwrap();
        match samples.back_mut() {
            // Nothing written since: the newer time says more (a replica there is fresher).
            Some(last) if last.1 == position => last.0 = asked_at,
            _ => samples.push_back((asked_at, position)),
        }
        while samples.len() > 1 && samples.front().is_some_and(|(t, _)| asked_at.duration_since(*t) > self.horizon) {
            samples.pop_front();
        }
    }

    fn note_replica(&self, replica: &Replica, replayed: Lsn) {
        let samples = self.samples.lock().unwrap();
        let caught_up_to = samples.partition_point(|(_, position)| *position <= replayed);
        let fresh_as_of = caught_up_to.checked_sub(1).map(|i| samples[i].0);
        let newest = samples.back().map(|(_, position)| *position);
        drop(samples);
        let mut seen = replica.seen.lock().unwrap();
        // Replay only moves forward: a replica behind every position still kept is as fresh as it
        // was last found to be (or unknown), and grows older from there.
        if let Some(t) = fresh_as_of {
            seen.fresh_as_of = Some(seen.fresh_as_of.map_or(t, |old| old.max(t)));
        }
        seen.replayed = Some(replayed);
        seen.lag_bytes = newest.map(|n| n.0.saturating_sub(replayed.0));
        let lag = seen.fresh_as_of.map_or(self.horizon, |t| t.elapsed());
        replica.lag_metric.set(lag.as_secs_f64());
    }
}

/// The sizes that place WAL page headers: an insert position just after a page header is where the
/// last record ended, before that header. (PostgreSQL reports the insert position past the header of
/// the next page when a record ends exactly at a page's end, while a replica reports the end of what
/// it replayed: without this, an idle replica could look one header behind for ever.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WalLayout {
    block: u64,
    segment: u64,
}

/// The sizes of a 64-bit server's page headers (`SizeOfXLogShortPHD`, `SizeOfXLogLongPHD`).
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

impl WalLayout {
    /// PostgreSQL's defaults, until the primary's own are read.
    const DEFAULT: WalLayout = WalLayout { block: 8192, segment: 16 * 1024 * 1024 };

    fn end_of_record(&self, insert: Lsn) -> Lsn {
        let Lsn(at) = insert;
        if at % self.segment == LONG_PAGE_HEADER {
            Lsn(at - LONG_PAGE_HEADER)
        } else if at % self.block == SHORT_PAGE_HEADER {
            Lsn(at - SHORT_PAGE_HEADER)
        } else {
            insert
        }
    }
}

/// A replica's name in the API and metrics: its place in the configured list, from 1.
pub(super) fn replica_name(position: usize) -> String {
    format!("replica_{}", position + 1)
}

/// Starts the lag monitor of `routing`, if it has replicas.
pub(super) fn start_monitor(routing: &Arc<Routing>, primary: &Db) {
    if routing.has_replicas() {
        tokio::spawn(monitor(Arc::downgrade(routing), primary.pool().clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_position_after_a_page_header_is_the_end_of_the_record_before_it() {
        let layout = WalLayout::DEFAULT;
        assert_eq!(layout.end_of_record(Lsn(8192 * 3 + 24)), Lsn(8192 * 3));
        assert_eq!(layout.end_of_record(Lsn(16 * 1024 * 1024 * 2 + 40)), Lsn(16 * 1024 * 1024 * 2));
        assert_eq!(layout.end_of_record(Lsn(8192 * 3 + 32)), Lsn(8192 * 3 + 32));
    }

    fn routing_with_one_replica() -> Routing {
        let db = Db::new("replica", "test", "host=/nowhere user=keel dbname=x", 1).unwrap();
        Routing::new("catalog", vec![(replica_name(0), db)], Duration::from_secs(60))
    }

    #[test]
    fn a_replica_is_as_fresh_as_the_newest_primary_position_it_has_replayed() {
        let routing = routing_with_one_replica();
        let t0 = Instant::now();
        routing.note_primary(t0, Lsn(100));
        routing.note_primary(t0 + Duration::from_millis(250), Lsn(200));
        routing.note_primary(t0 + Duration::from_millis(500), Lsn(300));
        let replica = &routing.replicas[0];
        routing.note_replica(replica, Lsn(250));
        assert_eq!(replica.seen.lock().unwrap().fresh_as_of, Some(t0 + Duration::from_millis(250)));
        assert_eq!(replica.seen.lock().unwrap().lag_bytes, Some(50));
        // Idle primary: the same position later means the replica that has it is fresher still.
        routing.note_replica(replica, Lsn(300));
        routing.note_primary(t0 + Duration::from_millis(750), Lsn(300));
        routing.note_replica(replica, Lsn(300));
        assert_eq!(routing.samples.lock().unwrap().len(), 3, "an unchanged position is one sample");
        assert_eq!(replica.seen.lock().unwrap().fresh_as_of, Some(t0 + Duration::from_millis(750)));
    }

    #[test]
    fn reads_choose_only_a_replica_within_the_budget_and_past_the_floor() {
        let routing = routing_with_one_replica();
        let budget = Duration::from_secs(2);
        assert!(routing.choose(budget, Floor::Any).is_none(), "never measured: not used");
        routing.note_primary(Instant::now(), Lsn(100));
        routing.note_replica(&routing.replicas[0], Lsn(100));
        assert!(routing.choose(budget, Floor::Any).is_some());
        assert!(routing.choose(Duration::ZERO, Floor::Any).is_none(), "a strong read");
        assert!(routing.choose(budget, Floor::Primary).is_none());
        assert!(routing.choose(budget, Floor::AtLeast(Lsn(100))).is_some());
        assert!(routing.choose(budget, Floor::AtLeast(Lsn(101))).is_none(), "the reader's write not replayed");
        routing.replicas[0].mark_down("test");
        assert!(routing.choose(budget, Floor::Any).is_none(), "down");
        routing.replicas[0].mark_answered("catalog");
        // Behind: the primary moved on 3 s ago and the replica has not replayed it.
        let old = Instant::now() - Duration::from_secs(3);
        let behind = routing_with_one_replica();
        behind.note_primary(old, Lsn(100));
        behind.note_primary(old + Duration::from_millis(10), Lsn(200));
        behind.note_replica(&behind.replicas[0], Lsn(150));
        assert!(behind.choose(budget, Floor::Any).is_none(), "3 s behind a 2 s budget");
        assert!(behind.choose(Duration::from_secs(5), Floor::Any).is_some());
    }
}
