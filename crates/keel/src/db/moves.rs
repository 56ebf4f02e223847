//! Moving buckets between shards while they are written to: PostgreSQL's logical replication copies
//! and follows the moving buckets' rows, a fence on those buckets alone makes the switch, and the
//! rows left behind are deleted (docs/SHARDING.md).
//!
//! A move goes through its states one step at a time, each recorded in the catalogue's
//! `shard_moves` before the next begins, so that the worker that takes over after a crash (the
//! movers' advisory lock is held by one process at a time) carries on from the last one:
//!
//! - **copying**: on each shard the buckets come from, a publication of the moving rows (row
//!   filters on `bucket`) and a logical replication slot; on the target, a subscription that copies
//!   them and then follows every change. Done when every table is synchronised.
//! - **catching_up**: the subscription's slot is close to the source's WAL position.
//! - **cutover**: on each source, the moving buckets' `keel_buckets` rows are locked (writes to those
//!   buckets wait at their trigger; others go on), a marker row is committed and awaited on the
//!   target — it has every write before the fence then — the rows are marked moved, and the
//!   transaction is prepared (two-phase commit). The catalogue's map then switches and is announced
//!   in one transaction, and the prepared transactions commit: waiting writes find their bucket
//!   moved and are refused (`KB001`, a 503 worth retrying) by a node that still routes by the old
//!   map. A crash in between leaves a prepared transaction that the next worker commits if the map
//!   switched and rolls back if it did not.
//! - **cleanup**: the subscription, slot and publication are dropped; after every node has had
//!   time to load the new map, the moved buckets' jobs are handed over and the moved rows deleted
//!   from their old shard.
//!
//! Until the map switches, a move can be cancelled ([`cancel`]): the worker then rolls back its
//! prepared fences, drops its replication, deletes what it copied, and records it `failed`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_shard::ShardId;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{shard_map, ConnectError, Databases, Db, DbError, Sql};

/// Server settings a shard needs for moves: logical decoding, two-phase commit, and room for the
/// slots, senders and workers of a few moves at once (each table's initial copy has a worker).
pub const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("max_prepared_transactions", "64"),
    ("max_replication_slots", "64"),
    ("max_wal_senders", "64"),
    ("max_logical_replication_workers", "16"),
    ("max_worker_processes", "32"),
];

/// The tables that hold users' rows, each with a `bucket` column (shard migration `buckets`).
pub const TABLES: &[&str] = &[
    "users",
    "wallets",
    "wallet_deposits",
    "wallet_debits",
    "cart_items",
    "idempotency_keys",
    "orders",
    "order_items",
    "likes",
    "payments",
    "sessions",
    "one_time_codes",
    "email_deliveries",
    "follows",
    "followers",
    "activities",
    "feed_items",
];

/// The same tables, those that refer to others first: the order the old rows are deleted in.
const DELETE_ORDER: &[&str] = &[
    "feed_items",
    "activities",
    "followers",
    "follows",
    "order_items",
    "wallet_debits",
    "payments",
    "wallet_deposits",
    "orders",
    "cart_items",
    "likes",
    "sessions",
    "one_time_codes",
    "email_deliveries",
    "idempotency_keys",
    "wallets",
    "users",
];

/// How long nodes get to load the new map before the rows they might still read are deleted: the
/// announcement arrives at once, the version check every [`shard_map::CHECK_EVERY`] catches a
/// missed one.
const GRACE: Duration = Duration::from_secs(3);
/// How close (bytes of WAL) the slot must be to the source's position before the fence.
const CAUGHT_UP_BYTES: i64 = 1 << 20;
/// The longest the fence waits for the marker to arrive before giving up (and trying again).
const MARKER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the mover looks at its moves.
const TICK: Duration = Duration::from_millis(100);
/// How many moves are carried out at once; the others wait, untouched (`copying`, nothing made
/// yet), in the order they were asked for. Each move holds a replication slot and a sender on each
/// of its sources ([`SERVER_SETTINGS`] allows 64), and its subscription's workers on the target: a
/// rebalance onto many new shards asks for a move per shard at once. Cancelled moves come first,
/// so that undoing one never waits.
const MOVES_AT_ONCE: i64 = 8;
/// An arbitrary constant naming the movers' advisory lock in the catalogue.
const MOVER_LOCK: i64 = 0x006b_6565_6c6d_6f76; // "keelmov"

/// Where a test may hold a move, as if its worker died there: the next worker must finish or undo
/// what it left (`tests/api/shard_moves.rs`). Keyed by the target shard's URL, so that tests running
/// side by side hold only their own moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldPoint {
    /// Copying: the publication, slot and subscription made.
    Copying,
    /// Cutover: the fences prepared, the map not yet switched.
    Prepared,
    /// Cutover: the map switched, the fences' prepared transactions not yet committed.
    Switched,
    /// Cleanup: a round of jobs inserted on the target, not yet deleted from its old shard.
    HandingOver,
}

static HOLDS: std::sync::Mutex<Vec<(String, HoldPoint)>> = std::sync::Mutex::new(Vec::new());

/// Holds every move to the shard at `target_url` when it reaches `point`, until [`release`].
pub fn hold(target_url: &str, point: HoldPoint) {
    HOLDS.lock().unwrap().push((target_url.to_owned(), point));
}

pub fn release(target_url: &str) {
    HOLDS.lock().unwrap().retain(|(url, _)| url != target_url);
}

async fn maybe_hold(target: &Db, point: HoldPoint) {
    let held = || HOLDS.lock().unwrap().iter().any(|(url, p)| url == target.url() && *p == point);
    if held() {
        tracing::warn!(?point, "a bucket move held here (a test)");
    }
    while held() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

crate::text_enum::text_enum! {
    /// Where a move is.
    MoveState, "a move state" {
        Copying = "copying",
        CatchingUp = "catching_up",
        Cutover = "cutover",
        Cleanup = "cleanup",
        Done = "done",
        Failed = "failed",
    }
}

/// A move as `GET /v1/admin/shards/moves/{id}` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Move {
    #[schema(value_type = String)]
    pub id: Uuid,
    #[schema(value_type = String)]
    pub state: MoveState,
    pub buckets: Vec<u16>,
    pub to: u16,
    /// Rows of the moving buckets on the target, and on their shards of origin (while copying).
    pub rows_copied: i64,
    pub rows_total: i64,
    /// The last error met (the step is tried again), or why the move failed.
    pub error: Option<String>,
    /// How long writes to the moving buckets waited at the cutover, in milliseconds.
    pub pause_ms: Option<f64>,
    /// An admin asked to cancel it: it is being undone, or was.
    pub cancelled: bool,
    #[serde(skip)]
    sources: Vec<ShardId>,
}

const COLUMNS: &str =
    "id, state, buckets, to_shard, rows_copied, rows_total, error, pause_ms, sources, cancelled_at IS NOT NULL";

impl Move {
    fn from_row(row: &tokio_postgres::Row) -> Result<Move, ConnectError> {
        let state: String = row.get(1);
        let buckets: Vec<i16> = row.get(2);
        let sources: Vec<i16> = row.get(8);
        Ok(Move {
            id: row.get(0),
            state: state.parse().map_err(|e: crate::text_enum::UnknownValue| ConnectError::Registry(e.to_string()))?,
            buckets: buckets.into_iter().map(|b| b as u16).collect(),
            to: row.get::<_, i16>(3) as u16,
            rows_copied: row.get(4),
            rows_total: row.get(5),
            error: row.get(6),
            pause_ms: row.get(7),
            cancelled: row.get(9),
            sources: sources.into_iter().map(|s| s as ShardId).collect(),
        })
    }

    /// The moving buckets grouped by the shard they come from.
    fn by_source(&self) -> BTreeMap<ShardId, Vec<i16>> {
        let mut groups: BTreeMap<ShardId, Vec<i16>> = BTreeMap::new();
        for (bucket, source) in self.buckets.iter().zip(&self.sources) {
            groups.entry(*source).or_default().push(*bucket as i16);
        }
        groups
    }

    fn buckets_i16(&self) -> Vec<i16> {
        self.buckets.iter().map(|b| *b as i16).collect()
    }

    /// The name of its publication, slot, subscription and prepared transaction on `source`.
    fn name(&self, source: ShardId) -> String {
        format!("keel_move_{}_{source}", self.id.simple())
    }
}

/// Why a move could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl From<DbError> for StartError {
    fn from(e: DbError) -> StartError {
        StartError::Connect(e.into())
    }
}

impl From<tokio_postgres::Error> for StartError {
    fn from(e: tokio_postgres::Error) -> StartError {
        StartError::Connect(e.into())
    }
}

/// Records a move of `buckets` to shard `to`; a worker carries it out.
pub async fn start(db: &Databases, buckets: &[u16], to: u16) -> Result<Move, StartError> {
    if buckets.is_empty() {
        return Err(StartError::Invalid("buckets: name at least one bucket".into()));
    }
    if let Some(b) = buckets.iter().find(|b| **b >= keel_shard::BUCKETS) {
        return Err(StartError::Invalid(format!("buckets: {b} is not a bucket (0 to {})", keel_shard::BUCKETS - 1)));
    }
    let mut wanted: Vec<u16> = buckets.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let mut client = db.catalog.client().await?;
    let tx = client.transaction().await?;
    // The map and the moves change one at a time: the version row is the lock.
    tx.row("SELECT version FROM shard_map_version FOR UPDATE", &[]).await?;
    let shards: i64 = tx.row("SELECT count(*) FROM shards", &[]).await?.get(0);
    if i64::from(to) >= shards {
        return Err(StartError::Invalid(format!("to: there is no shard {to} (there are {shards})")));
    }
    let wanted_i16: Vec<i16> = wanted.iter().map(|b| *b as i16).collect();
    let busy = tx
        .rows(
            "SELECT DISTINCT b FROM shard_moves, unnest(buckets) AS b
             WHERE state NOT IN ('done', 'failed') AND b = ANY($1) ORDER BY b",
            &[&wanted_i16],
        )
        .await?;
    if !busy.is_empty() {
        let busy: Vec<String> = busy.iter().map(|r| r.get::<_, i16>(0).to_string()).collect();
        return Err(StartError::Conflict(format!("buckets {} are moving already", busy.join(", "))));
    }
    let owners = tx
        .rows(
            "SELECT bucket, shard FROM shard_map WHERE bucket = ANY($1) AND shard <> $2 ORDER BY bucket",
            &[&wanted_i16, &(to as i16)],
        )
        .await?;
    if owners.is_empty() {
        return Err(StartError::Conflict(format!("every one of those buckets is on shard {to} already")));
    }
    let (moving, sources): (Vec<i16>, Vec<i16>) =
        owners.iter().map(|r| (r.get::<_, i16>(0), r.get::<_, i16>(1))).unzip();
    let id = Uuid::now_v7();
    let row = tx
        .row(
            &format!(
                "INSERT INTO shard_moves (id, buckets, sources, to_shard, state) VALUES ($1, $2, $3, $4, 'copying')
                 RETURNING {COLUMNS}"
            ),
            &[&id, &moving, &sources, &(to as i16)],
        )
        .await?;
    tx.commit().await?;
    let started = Move::from_row(&row)?;
    tracing::info!(id = %id, buckets = moving.len(), to, "bucket move asked for");
    Ok(started)
}

/// Why a move could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("there is no move {0}")]
    NotFound(Uuid),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Asks for move `id` to be cancelled and undone; possible until the map switches. The worker
/// carrying it out undoes it at its next step; a cutover under way gives up before the switch.
pub async fn cancel(db: &Databases, id: Uuid) -> Result<Move, CancelError> {
    let client = db.catalog.client().await.map_err(ConnectError::from)?;
    let row = client
        .maybe_row(
            &format!(
                "UPDATE shard_moves SET cancelled_at = coalesce(cancelled_at, now())
                 WHERE id = $1 AND state IN ('copying', 'catching_up', 'cutover') RETURNING {COLUMNS}"
            ),
            &[&id],
        )
        .await
        .map_err(ConnectError::from)?;
    if let Some(row) = row {
        tracing::warn!(%id, "bucket move cancelled by an admin");
        return Ok(Move::from_row(&row)?);
    }
    match get(db, id).await? {
        None => Err(CancelError::NotFound(id)),
        Some(mv) => Err(CancelError::Conflict(match mv.state {
            MoveState::Cleanup | MoveState::Done => {
                format!("the move is {}: its buckets are on shard {} already; move them back instead", mv.state, mv.to)
            }
            _ => format!("the move has ended ({})", mv.state),
        })),
    }
}

pub async fn get(db: &Databases, id: Uuid) -> Result<Option<Move>, ConnectError> {
    let client = db.catalog.client().await?;
    let row = client.maybe_row(&format!("SELECT {COLUMNS} FROM shard_moves WHERE id = $1"), &[&id]).await?;
    row.as_ref().map(Move::from_row).transpose()
}

/// The newest moves, unfinished ones first.
pub async fn recent(db: &Databases, limit: i64) -> Result<Vec<Move>, ConnectError> {
    let client = db.catalog.client().await?;
    let rows = client
        .rows(
            &format!(
                "SELECT {COLUMNS} FROM shard_moves
                 ORDER BY state IN ('done', 'failed'), created_at DESC LIMIT $1"
            ),
            &[&limit],
        )
        .await?;
    rows.iter().map(Move::from_row).collect()
}

/// Carries out moves until `stop`: in one process at a time (the movers' advisory lock, held on a
/// connection of its own: a process that dies lets the next one take over).
pub async fn drive(db: Arc<Databases>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut holder: Option<tokio_postgres::Client> = None;
    while !*stop.borrow() {
        if holder.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            holder = take_lock(&db.catalog).await;
        }
        if holder.is_some() {
            if let Err(e) = step_all(&db).await {
                tracing::warn!(error = %e, "a bucket move step failed; trying again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(if holder.is_some() { TICK } else { Duration::from_secs(1) }) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn take_lock(catalog: &Db) -> Option<tokio_postgres::Client> {
    let (client, connection) = catalog.config.connect(catalog.tls.clone()).await.ok()?;
    tokio::spawn(connection);
    let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&MOVER_LOCK]).await.ok()?.get(0);
    got.then_some(client)
}

async fn step_all(db: &Databases) -> Result<(), String> {
    let client = db.catalog.client().await.map_err(|e| e.to_string())?;
    let rows = client
        .rows(
            &format!(
                "SELECT {COLUMNS} FROM shard_moves WHERE state NOT IN ('done', 'failed')
                 ORDER BY cancelled_at IS NULL, created_at LIMIT $1"
            ),
            &[&MOVES_AT_ONCE],
        )
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    for row in rows {
        let mv = Move::from_row(&row).map_err(|e| e.to_string())?;
        if let Err(e) = step(db, &mv).await {
            tracing::warn!(id = %mv.id, state = %mv.state, error = %e, "bucket move: trying the step again");
            let _ = record(db, mv.id, None, |sql| sql.error(&e)).await;
        }
    }
    Ok(())
}

/// One step of `mv` in its current state; records the next state when the step is done.
async fn step(db: &Databases, mv: &Move) -> Result<(), String> {
    if mv.cancelled && matches!(mv.state, MoveState::Copying | MoveState::CatchingUp | MoveState::Cutover) {
        return undo(db, mv).await;
    }
    match mv.state {
        MoveState::Copying => copy(db, mv).await,
        MoveState::CatchingUp => catch_up(db, mv).await,
        MoveState::Cutover => cutover(db, mv).await,
        MoveState::Cleanup => cleanup(db, mv).await,
        MoveState::Done | MoveState::Failed => Ok(()),
    }
}

fn shard(db: &Databases, n: ShardId) -> Result<Arc<Db>, String> {
    db.shard(n).ok_or_else(|| format!("there is no shard {n}"))
}

fn describe(e: impl Into<DbError>) -> String {
    let e: DbError = e.into();
    match &e {
        DbError::Query(q) => match q.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// Sets up what is missing of the publications, slots and subscriptions, and moves on once every
/// table is copied.
async fn copy(db: &Databases, mv: &Move) -> Result<(), String> {
    let target = shard(db, mv.to)?;
    let target_client = target.client().await.map_err(describe)?;
    // Buckets coming back to a shard they once left are written there again.
    target_client
        .exec("UPDATE keel_buckets SET moved_to = NULL WHERE bucket = ANY($1)", &[&mv.buckets_i16()])
        .await
        .map_err(describe)?;
    let mut synced = true;
    for (source, buckets) in mv.by_source() {
        let name = mv.name(source);
        let from = shard(db, source)?;
        let from_client = from.client().await.map_err(describe)?;
        let exists = from_client.maybe_row("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name]).await;
        if exists.map_err(describe)?.is_none() {
            let list = buckets.iter().map(i16::to_string).collect::<Vec<_>>().join(", ");
            let tables: Vec<String> = TABLES.iter().map(|t| format!("{t} WHERE (bucket IN ({list}))")).collect();
            let marker = format!("keel_move_markers WHERE (move_id = '{}')", mv.id);
            from_client
                .batch_execute(&format!("CREATE PUBLICATION {name} FOR TABLE {}, {marker}", tables.join(", ")))
                .await
                .map_err(describe)?;
        }
        let slot = from_client.maybe_row("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&name]).await;
        if slot.map_err(describe)?.is_none() {
            // Made here rather than by CREATE SUBSCRIPTION: that waits forever when both databases
            // are in one cluster (as in `keel up`).
            from_client
                .exec("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&name])
                .await
                .map_err(describe)?;
        }
        let subscribed = target_client.maybe_row("SELECT 1 FROM pg_subscription WHERE subname = $1", &[&name]).await;
        if subscribed.map_err(describe)?.is_none() {
            let connection = from.url().replace('\'', "''");
            target_client
                .batch_execute(&format!(
                    "CREATE SUBSCRIPTION {name} CONNECTION '{connection}' PUBLICATION {name}
                     WITH (create_slot = false, slot_name = '{name}', copy_data = true)"
                ))
                .await
                .map_err(describe)?;
        }
        maybe_hold(&target, HoldPoint::Copying).await;
        let pending: i64 = target_client
            .row(
                "SELECT count(*) FILTER (WHERE r.srsubstate <> 'r') + greatest($2 - count(r.srrelid), 0)
                 FROM pg_subscription s LEFT JOIN pg_subscription_rel r ON r.srsubid = s.oid WHERE s.subname = $1",
                &[&name, &((TABLES.len() + 1) as i64)],
            )
            .await
            .map_err(describe)?
            .get(0);
        synced &= pending == 0;
    }
    let (copied, total) = progress(db, mv).await?;
    let next = synced.then_some(MoveState::CatchingUp);
    record(db, mv.id, next, |sql| sql.progress(copied, total)).await
}

/// Rows of the moving buckets on the target, and on their sources.
async fn progress(db: &Databases, mv: &Move) -> Result<(i64, i64), String> {
    let count = TABLES.iter().map(|t| format!("(SELECT count(*) FROM {t} WHERE bucket = ANY($1))")).collect::<Vec<_>>();
    let sql = format!("SELECT {}", count.join(" + "));
    let target = shard(db, mv.to)?.client().await.map_err(describe)?;
    let copied: i64 = target.row(&sql, &[&mv.buckets_i16()]).await.map_err(describe)?.get(0);
    let mut total = 0;
    for (source, buckets) in mv.by_source() {
        let client = shard(db, source)?.client().await.map_err(describe)?;
        total += client.row(&sql, &[&buckets]).await.map_err(describe)?.get::<_, i64>(0);
    }
    Ok((copied, total))
}

/// Moves on once every slot is within [`CAUGHT_UP_BYTES`] of its source's WAL position.
async fn catch_up(db: &Databases, mv: &Move) -> Result<(), String> {
    let mut caught_up = true;
    for source in mv.by_source().into_keys() {
        let client = shard(db, source)?.client().await.map_err(describe)?;
        let behind: Option<i64> = client
            .row(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::bigint
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&mv.name(source)],
            )
            .await
            .map_err(describe)?
            .get(0);
        caught_up &= behind.is_some_and(|b| b <= CAUGHT_UP_BYTES);
    }
    let (copied, total) = progress(db, mv).await?;
    record(db, mv.id, caught_up.then_some(MoveState::Cutover), |sql| sql.progress(copied, total)).await
}

/// The fence, the switch, and the release (see the module's documentation).
async fn cutover(db: &Databases, mv: &Move) -> Result<(), String> {
    let target = shard(db, mv.to)?;
    // A cutover of an earlier process that died before the map switched: undone, and done again.
    for source in mv.by_source().into_keys() {
        finish_prepared(&*shard(db, source)?, &mv.name(source), false).await?;
    }
    let mut fences = Vec::new();
    let fenced_at = Instant::now();
    for (source, buckets) in mv.by_source() {
        let from = shard(db, source)?;
        let (client, connection) = from.config.connect(from.tls.clone()).await.map_err(describe)?;
        tokio::spawn(connection);
        client.batch_execute("BEGIN").await.map_err(describe)?;
        // Writes to these buckets take a KEY SHARE lock on their rows: they wait from here on,
        // and this waits for those already under way to commit.
        client
            .execute("SELECT 1 FROM keel_buckets WHERE bucket = ANY($1) ORDER BY bucket FOR UPDATE", &[&buckets])
            .await
            .map_err(describe)?;
        fences.push((source, client));
    }
    // Every write to the moving buckets committed before the fences comes before the markers in
    // each source's WAL: once the target has a marker, it has them all. A nonce of this attempt's
    // own: an earlier attempt's marker may be on the target already.
    let nonce = Uuid::new_v4();
    for (source, _) in &fences {
        let marker = shard(db, *source)?.client().await.map_err(describe)?;
        marker
            .exec(
                "INSERT INTO keel_move_markers (move_id, source, nonce) VALUES ($1, $2, $3)
                 ON CONFLICT (move_id, source) DO UPDATE SET nonce = EXCLUDED.nonce",
                &[&mv.id, &(*source as i16), &nonce],
            )
            .await
            .map_err(describe)?;
    }
    let target_client = target.client().await.map_err(describe)?;
    for (source, _) in &fences {
        let deadline = Instant::now() + MARKER_TIMEOUT;
        loop {
            let arrived = target_client
                .maybe_row(
                    "SELECT 1 FROM keel_move_markers WHERE move_id = $1 AND source = $2 AND nonce = $3",
                    &[&mv.id, &(*source as i16), &nonce],
                )
                .await
                .map_err(describe)?;
            if arrived.is_some() {
                break;
            }
            if Instant::now() > deadline {
                // Dropping the fences' connections rolls them back: writes go on, and the
                // cutover is tried again.
                return Err(format!(
                    "shard {source}'s changes did not reach shard {} within {MARKER_TIMEOUT:?}",
                    mv.to
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for (source, client) in &fences {
        let buckets = &mv.by_source()[source];
        client
            .execute("UPDATE keel_buckets SET moved_to = $2 WHERE bucket = ANY($1)", &[buckets, &(mv.to as i16)])
            .await
            .map_err(describe)?;
        client.batch_execute(&format!("PREPARE TRANSACTION '{}'", mv.name(*source))).await.map_err(describe)?;
    }
    maybe_hold(&target, HoldPoint::Prepared).await;
    // The switch: the map, its announcement and the move's next state in one transaction.
    let mut catalog = db.catalog.client().await.map_err(describe)?;
    let tx = catalog.transaction().await.map_err(describe)?;
    tx.row("SELECT version FROM shard_map_version FOR UPDATE", &[]).await.map_err(describe)?;
    tx.exec("UPDATE shard_map SET shard = $2 WHERE bucket = ANY($1)", &[&mv.buckets_i16(), &(mv.to as i16)])
        .await
        .map_err(describe)?;
    shard_map::announce(&tx).await.map_err(|e| e.to_string())?;
    let switching = tx
        .exec(
            "UPDATE shard_moves SET state = 'cleanup', updated_at = now(), error = NULL
             WHERE id = $1 AND cancelled_at IS NULL",
            &[&mv.id],
        )
        .await
        .map_err(describe)?;
    if switching == 0 {
        // Cancelled during the fence: no switch (the transaction rolls back as it is dropped); the
        // next step rolls the fences back and undoes the move.
        return Err("cancelled during the cutover; undoing it".into());
    }
    tx.commit().await.map_err(describe)?;
    maybe_hold(&target, HoldPoint::Switched).await;
    for (source, client) in &fences {
        client.batch_execute(&format!("COMMIT PREPARED '{}'", mv.name(*source))).await.map_err(describe)?;
    }
    let pause = fenced_at.elapsed();
    metrics::histogram!("keel_shard_move_pause_seconds").record(pause.as_secs_f64());
    let client = db.catalog.client().await.map_err(describe)?;
    client
        .exec("UPDATE shard_moves SET pause_ms = $2 WHERE id = $1", &[&mv.id, &(pause.as_secs_f64() * 1000.0)])
        .await
        .map_err(describe)?;
    tracing::info!(id = %mv.id, pause_ms = pause.as_secs_f64() * 1000.0, "buckets switched to shard {}", mv.to);
    let _ = db.reload_shard_map().await;
    Ok(())
}

/// Commits (`commit`) or rolls back the prepared transaction `name` on `shard`, if there is one.
async fn finish_prepared(shard: &Db, name: &str, commit: bool) -> Result<(), String> {
    let client = shard.client().await.map_err(describe)?;
    let prepared = client.maybe_row("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1", &[&name]).await;
    if prepared.map_err(describe)?.is_some() {
        let verb = if commit { "COMMIT PREPARED" } else { "ROLLBACK PREPARED" };
        client.batch_execute(&format!("{verb} '{name}'")).await.map_err(describe)?;
        tracing::warn!(name, verb, "finished a move's prepared transaction left by an earlier process");
    }
    Ok(())
}

/// Drops the replication set up for the move, then (after [`GRACE`]) the moved rows on their old
/// shards.
async fn cleanup(db: &Databases, mv: &Move) -> Result<(), String> {
    let target = shard(db, mv.to)?;
    let target_client = target.client().await.map_err(describe)?;
    for source in mv.by_source().into_keys() {
        // The switch committed: a cutover prepared and not committed by a process that died
        // commits now.
        finish_prepared(&*shard(db, source)?, &mv.name(source), true).await?;
        drop_replication(db, mv, source).await?;
    }
    let switched: f64 = db
        .catalog
        .client()
        .await
        .map_err(describe)?
        .row("SELECT extract(epoch FROM now() - updated_at)::float8 FROM shard_moves WHERE id = $1", &[&mv.id])
        .await
        .map_err(describe)?
        .get(0);
    if switched < GRACE.as_secs_f64() {
        return Ok(());
    }
    for (source, buckets) in mv.by_source() {
        if !hand_over_jobs(db, mv, source, &buckets).await? {
            return Ok(()); // some still running there; the next step looks again
        }
    }
    for (source, buckets) in mv.by_source() {
        delete_rows(&*shard(db, source)?, &buckets, mv.id).await?;
    }
    target_client.exec("DELETE FROM keel_move_markers WHERE move_id = $1", &[&mv.id]).await.map_err(describe)?;
    let (copied, _) = progress(db, mv).await?;
    record(db, mv.id, Some(MoveState::Done), |sql| sql.progress(copied, copied)).await?;
    tracing::info!(id = %mv.id, rows = copied, "bucket move done");
    Ok(())
}

/// Drops the subscription (on the target), the slot and the publication (on `source`) of `mv`,
/// whichever of them exist.
async fn drop_replication(db: &Databases, mv: &Move, source: ShardId) -> Result<(), String> {
    let name = mv.name(source);
    let target_client = shard(db, mv.to)?.client().await.map_err(describe)?;
    let subscribed = target_client.maybe_row("SELECT 1 FROM pg_subscription WHERE subname = $1", &[&name]).await;
    if subscribed.map_err(describe)?.is_some() {
        // Detached from its slot first, so that dropping it does not connect to the source.
        target_client
            .batch_execute(&format!(
                "ALTER SUBSCRIPTION {name} DISABLE; ALTER SUBSCRIPTION {name} SET (slot_name = NONE);
                 DROP SUBSCRIPTION {name}"
            ))
            .await
            .map_err(describe)?;
    }
    let from_client = shard(db, source)?.client().await.map_err(describe)?;
    // A disabled subscription's sender may take a moment to let go of the slot.
    let slot = from_client
        .maybe_row("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&name])
        .await
        .map_err(describe)?;
    match slot.map(|r| r.get::<_, bool>(0)) {
        Some(true) => return Err(format!("the slot {name} is still in use; dropping it later")),
        Some(false) => {
            from_client.exec("SELECT pg_drop_replication_slot($1)", &[&name]).await.map_err(describe)?;
        }
        None => {}
    }
    from_client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {name}")).await.map_err(describe)?;
    Ok(())
}

/// Deletes the rows of `buckets` from `shard`, and the markers of move `move_id`: the old rows
/// after a move, or the copied ones after a cancelled move.
async fn delete_rows(shard: &Db, buckets: &[i16], move_id: Uuid) -> Result<(), String> {
    let mut client = shard.client().await.map_err(describe)?;
    let tx = client.transaction().await.map_err(describe)?;
    // Past the fence's trigger: these rows are the move's to delete.
    tx.batch_execute("SET LOCAL keel.moving_buckets = 'on'").await.map_err(describe)?;
    for table in DELETE_ORDER {
        tx.exec(&format!("DELETE FROM {table} WHERE bucket = ANY($1)"), &[&buckets]).await.map_err(describe)?;
    }
    tx.exec("DELETE FROM keel_move_markers WHERE move_id = $1", &[&move_id]).await.map_err(describe)?;
    tx.commit().await.map_err(describe)
}

/// Undoes a cancelled move whose map has not switched: its fences rolled back (writes go on where
/// they were), its replication dropped, the rows it copied deleted from the target (they were never
/// routed to: the map still names the sources), and the move recorded `failed`.
async fn undo(db: &Databases, mv: &Move) -> Result<(), String> {
    let target = shard(db, mv.to)?;
    for (source, buckets) in mv.by_source() {
        finish_prepared(&*shard(db, source)?, &mv.name(source), false).await?;
        drop_replication(db, mv, source).await?;
        // A write the target gets for these buckets from a map older than the move goes astray:
        // refused, as on any shard a bucket left.
        target
            .client()
            .await
            .map_err(describe)?
            .exec("UPDATE keel_buckets SET moved_to = $2 WHERE bucket = ANY($1)", &[&buckets, &(source as i16)])
            .await
            .map_err(describe)?;
        shard(db, source)?
            .client()
            .await
            .map_err(describe)?
            .exec("DELETE FROM keel_move_markers WHERE move_id = $1", &[&mv.id])
            .await
            .map_err(describe)?;
    }
    delete_rows(&target, &mv.buckets_i16(), mv.id).await?;
    record(db, mv.id, Some(MoveState::Failed), |sql| sql.progress(0, mv.rows_total).error("cancelled by an admin"))
        .await?;
    tracing::warn!(id = %mv.id, "bucket move cancelled and undone");
    Ok(())
}

/// How many jobs one round of [`hand_over_jobs`] takes.
const JOBS_PER_ROUND: i64 = 500;

/// Hands the moved buckets' jobs on shard `source` over to the move's target; true once none is
/// left there. Jobs are not replicated with the other rows: the old shard's workers would run them
/// while the new shard's ran the copies. Here, after the switch, each round takes a batch out of the
/// old shard's queue (running, under a lease that never lapses, the state it had kept in
/// `keel_moving_jobs`), inserts it on the target with that state (a job already there is left as it
/// is), then deletes it from the old shard. A mover that dies midway leaves the batch in
/// `keel_moving_jobs`, and the next one finishes it. Jobs running on the old shard meanwhile (their
/// handlers route to the user's new shard) are waited for: finished, they are handed over as
/// history; failed, they are pending again and handed over to be retried there.
async fn hand_over_jobs(db: &Databases, mv: &Move, source: ShardId, buckets: &[i16]) -> Result<bool, String> {
    let from = shard(db, source)?;
    let target = shard(db, mv.to)?;
    loop {
        let client = from.client().await.map_err(describe)?;
        // A batch an earlier round (or process) took out and did not finish comes first.
        let mut batch = taken_jobs(&client, mv.id).await?;
        if batch.ids.is_empty() {
            let taken = client
                .exec(
                    "WITH old AS MATERIALIZED (
                         SELECT id, state FROM keel_jobs
                         WHERE bucket = ANY($1) AND state NOT IN ('running', 'relayed')
                         ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED
                     ), kept AS (
                         INSERT INTO keel_moving_jobs (id, move_id, state) SELECT id, $2, state FROM old
                     )
                     UPDATE keel_jobs j SET state = 'running', locked_until = 'infinity'
                     FROM old WHERE j.id = old.id",
                    &[&buckets, &mv.id, &JOBS_PER_ROUND],
                )
                .await
                .map_err(describe)?;
            if taken == 0 {
                let running: i64 = client
                    .row(
                        "SELECT count(*) FROM keel_jobs WHERE bucket = ANY($1) AND state IN ('running', 'relayed')",
                        &[&buckets],
                    )
                    .await
                    .map_err(describe)?
                    .get(0);
                return Ok(running == 0);
            }
            batch = taken_jobs(&client, mv.id).await?;
        }
        drop(client);
        let target_client = target.client().await.map_err(describe)?;
        target_client
            .exec(
                "INSERT INTO keel_jobs SELECT * FROM jsonb_populate_recordset(NULL::keel_jobs, $1)
                 ON CONFLICT (id) DO NOTHING",
                &[&batch.rows],
            )
            .await
            .map_err(describe)?;
        drop(target_client);
        target.wake_runners();
        maybe_hold(&target, HoldPoint::HandingOver).await;
        let mut client = from.client().await.map_err(describe)?;
        let tx = client.transaction().await.map_err(describe)?;
        tx.exec("DELETE FROM keel_jobs WHERE id = ANY($1)", &[&batch.ids]).await.map_err(describe)?;
        tx.exec("DELETE FROM keel_moving_jobs WHERE id = ANY($1)", &[&batch.ids]).await.map_err(describe)?;
        tx.commit().await.map_err(describe)?;
        metrics::counter!("keel_shard_move_jobs_total").increment(batch.ids.len() as u64);
    }
}

/// A batch of jobs taken out of a queue for a move: their rows as they are to be on the target.
struct TakenJobs {
    ids: Vec<Uuid>,
    rows: serde_json::Value,
}

async fn taken_jobs(client: &impl Sql, move_id: Uuid) -> Result<TakenJobs, String> {
    let row = client
        .row(
            "SELECT coalesce(array_agg(j.id), '{}'),
                    coalesce(jsonb_agg(to_jsonb(j) || jsonb_build_object('state', m.state, 'locked_until', NULL)), '[]')
             FROM keel_moving_jobs m JOIN keel_jobs j USING (id) WHERE m.move_id = $1",
            &[&move_id],
        )
        .await
        .map_err(describe)?;
    Ok(TakenJobs { ids: row.get(0), rows: row.get(1) })
}

/// What a step records besides the state.
struct Update {
    progress: Option<(i64, i64)>,
    error: Option<String>,
}

impl Update {
    fn progress(mut self, copied: i64, total: i64) -> Update {
        self.progress = Some((copied, total));
        self
    }

    fn error(mut self, error: &str) -> Update {
        self.error = Some(error.to_owned());
        self
    }
}

async fn record(
    db: &Databases,
    id: Uuid,
    next: Option<MoveState>,
    what: impl FnOnce(Update) -> Update,
) -> Result<(), String> {
    let update = what(Update { progress: None, error: None });
    let (copied, total) = update.progress.unzip();
    let state = next.map(|s| s.as_str().to_owned());
    let client = db.catalog.client().await.map_err(describe)?;
    client
        .exec(
            "UPDATE shard_moves SET
                 state = coalesce($2, state),
                 rows_copied = coalesce($3, rows_copied),
                 rows_total = coalesce($4, rows_total),
                 error = CASE WHEN $2 IS NOT NULL THEN $5 ELSE coalesce($5, error) END,
                 updated_at = CASE WHEN $2 IS NOT NULL THEN now() ELSE updated_at END,
                 finished_at = CASE WHEN $2 IN ('done', 'failed') THEN now() END
             WHERE id = $1",
            &[&id, &state, &copied, &total, &update.error],
        )
        .await
        .map_err(describe)?;
    Ok(())
}
