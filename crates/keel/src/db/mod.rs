//! Database access: one connection pool per database, the shard router, and the [`Sql`] helpers that
//! every query of this crate's handlers goes through (prepared statements, cached per connection, and
//! counted per request). The queue's own statements (`keel-outbox`) and the migration runner use the
//! pools directly and are not counted.
//!
//! Every connection of a deployment's pools has a `statement_timeout` ([`PoolOptions`],
//! `KEEL_STATEMENT_TIMEOUT`): a handler dropped at its deadline (a 503) leaves its statement running on
//! the server, and PostgreSQL cancels it there at the latest then. Migrations run on pools of their
//! own ([`migrate_all`]) with no statement timeout: building an index may take as long as it takes.
//!
//! Connections follow libpq's `sslmode` and `sslrootcert` in the connection strings, with rustls
//! ([`keel_pgtls`]): pools, migrations, the queue's `LISTEN` connection and maintenance connections
//! alike. A database that stops answering is failed fast ([`health`]): requests for it get a 503 at
//! once instead of waiting on its connections, and those of other databases are unaffected.

pub mod budget;
pub mod floors;
pub mod health;
pub mod migrations;
pub mod moves;
pub mod replicas;
pub mod shard_map;

use std::cell::Cell;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use keel_shard::{ShardId, ShardMap};

pub use self::shard_map::ShardSet;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use self::health::Health;

use crate::config::Config;
use crate::ids::UserId;

pub use deadpool_postgres::Transaction;
pub use tokio_postgres::Error as PgError;

const POOL_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection pool to one database, with the name metrics and logs know it by.
#[derive(Clone)]
pub struct Db {
    name: String,
    url: String,
    setting: String,
    pool: Pool,
    /// The pool's connection settings and TLS policy, for the watchdog's own connection.
    config: tokio_postgres::Config,
    tls: keel_pgtls::Connector,
    health: Arc<Health>,
    /// Where reads of this database may go ([`replicas`]); set once, by [`Databases::route_reads`].
    routing: Arc<OnceLock<Arc<replicas::Routing>>>,
    /// Wakes the job runners listening on this database once jobs are committed ([`Db::commit_jobs`]).
    waker: keel_outbox::Waker,
}

/// A database operation that failed: no connection could be had, or the query failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Query(#[from] PgError),
    /// The database stopped answering ([`health`]): no connection is handed out until it answers.
    #[error("the {0} database is not answering")]
    Down(String),
}

/// In a job handler, a database failure fails the run: the job is retried on its kind's backoff.
/// Every handler (the saga, e-mail, webhook deliveries, reactions) uses `?` on database results.
impl From<DbError> for keel_outbox::JobError {
    fn from(e: DbError) -> keel_outbox::JobError {
        keel_outbox::JobError::from(e.to_string())
    }
}

/// A pooled connection.
pub type Client = deadpool_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{setting}: {url_hint} is not a valid PostgreSQL connection string: {source}")]
    BadUrl { setting: String, url_hint: String, source: keel_pgtls::Error },
    #[error("cannot build the pool for {name}: {detail}")]
    Pool { name: String, detail: String },
    #[error("cannot reach the {name} database ({setting}): {detail}")]
    Unreachable { name: String, setting: String, detail: String },
    #[error(
        "the catalogue database has no shard map yet: run `keel migrate` (KEEL_CATALOG_URL and \
         KEEL_SHARD_URLS as for this process) before `keel serve`"
    )]
    NoShardMap,
    #[error("KEEL_SHARD_URLS does not match the shard map in the catalogue database: {0}")]
    ShardMapMismatch(keel_shard::MapError),
    #[error("{0}")]
    Query(#[from] PgError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Replicas(String),
    /// The catalogue's list of shards does not fit this process's configuration ([`shard_map`]).
    #[error("{0}")]
    Registry(String),
}

impl Db {
    /// Builds a pool; connections are opened on first use. `setting` names the configuration the
    /// URL came from, for the error message. The server's own settings apply (no statement timeout
    /// unless the server has one): a deployment's pools come from [`Databases::open`].
    pub fn new(name: &str, setting: &str, url: &str, pool_size: usize) -> Result<Db, ConnectError> {
        Db::with_session_settings(name, setting, url, pool_size, &[])
    }

    /// Like [`Db::new`], with server settings (`-c name=value`) for every connection of the pool.
    pub fn with_session_settings(
        name: &str,
        setting: &str,
        url: &str,
        pool_size: usize,
        settings: &[(&str, &str)],
    ) -> Result<Db, ConnectError> {
        let (config, tls) = connection_config(url, settings).map_err(|source| ConnectError::BadUrl {
            setting: setting.to_owned(),
            url_hint: redact(url),
            source,
        })?;
        // Fast recycling: a connection that broke is noticed by the query that uses it, and the
        // pool drops it then; checking every connection on checkout would add a round trip.
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match budget::get() {
            // Under a connection budget (many shards), each connection holds one of the process's
            // permits while it is open.
            Some(_) => Manager::from_connect(config.clone(), budget::Connect::new(tls.clone()), manager_config),
            None => Manager::from_config(config.clone(), tls.clone(), manager_config),
        };
        let health = Health::new();
        let breaker = health.clone();
        let pool = Pool::builder(manager)
            // A connection made before the database last stopped answering is never handed out again.
            .pre_recycle(Hook::sync_fn(move |_, metrics| match breaker.condemns(metrics.created) {
                true => Err(HookError::message("made before the database stopped answering")),
                false => Ok(()),
            }))
            .max_size(pool_size)
            // A request waiting longer than this for a connection gets a 503 rather than hanging.
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(POOL_WAIT_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| ConnectError::Pool { name: name.to_owned(), detail: e.to_string() })?;
        budget::register(&pool);
        Ok(Db {
            name: name.to_owned(),
            url: url.to_owned(),
            waker: keel_outbox::Waker::new(pool.clone()),
            pool,
            config,
            tls,
            health,
            setting: setting.to_owned(),
            routing: Arc::default(),
        })
    }

    /// Starts this pool's watchdog ([`health`]): from then on, `client()` fails at once while the
    /// database does not answer. It stops when the pool is dropped. Must be called
    /// within a Tokio runtime; [`Databases::open`] calls it for every pool it builds.
    pub fn watch(&self) {
        tokio::spawn(health::watch(
            self.name.clone(),
            self.config.clone(),
            self.tls.clone(),
            Arc::downgrade(&self.health),
            self.pool.weak(),
        ));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection string, for connections outside the pool (a `LISTEN` connection).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Commits a transaction that enqueued jobs on this database, then wakes the runners listening
    /// on it. Every transaction that calls `keel_outbox::enqueue` ends here: committed with a plain
    /// `commit()`, its jobs wait for the runners' next poll (see `keel_outbox::Waker` for why the
    /// wake-up is not a `NOTIFY` inside the transaction).
    pub async fn commit_jobs(&self, tx: Transaction<'_>) -> Result<(), PgError> {
        tx.commit().await?;
        self.waker.poke();
        Ok(())
    }

    /// Wakes the runners listening on this database: for jobs committed other than by
    /// [`Db::commit_jobs`] (say, a transaction that is also the prepared half of a move).
    pub fn wake_runners(&self) {
        self.waker.poke();
    }

    /// A pooled connection; fails at once while the database is not answering ([`health`]).
    ///
    /// A server that refuses new connections outright — restarting, its socket gone for a moment,
    /// "the database system is starting up" — is waited for, up to [`RIDE_THROUGH`]: nothing has been
    /// sent to it yet, so waiting is safe for writes as well as reads, and a restart of half a second
    /// costs requests that much latency instead of a burst of 503s (measured under `keel up` with a
    /// client reading as fast as it could: 39–78 503s in 0.3 s before, 0–1 after).
    pub async fn client(&self) -> Result<Client, DbError> {
        if self.health.is_down() {
            return Err(DbError::Down(self.name.clone()));
        }
        let deadline = tokio::time::Instant::now() + RIDE_THROUGH;
        loop {
            match self.pool.get().await {
                Err(deadpool_postgres::PoolError::Backend(e))
                    if refused_at_connect(&e) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                result => return Ok(result?),
            }
        }
    }

    /// Connections in use, idle, and the most there may be.
    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }

    async fn reachable_client(&self) -> Result<Client, ConnectError> {
        // With TLS required, the mode is part of what to check (the server may not offer TLS).
        let setting = match self.tls.mode() {
            keel_pgtls::Mode::Disable | keel_pgtls::Mode::Prefer => self.setting.clone(),
            mode => format!("{}, sslmode={}", self.setting, mode.as_str()),
        };
        self.client().await.map_err(|e| ConnectError::Unreachable {
            name: self.name.clone(),
            setting,
            detail: causes(&e),
        })
    }
}

/// How long a TCP connection to a database may go unanswered before it is given up: a peer that
/// vanished without closing (a host that froze or lost its network, a partition) leaves a half-open
/// connection that, without this, a query would wait on for the kernel's default of about 15
/// minutes of retransmissions — and an idle pooled one for the 2 hours before keepalives start.
/// Keepalives probe an idle connection after 5 s of silence, every second, and give up after 5
/// unanswered probes; `tcp_user_timeout` gives up on sent data unacknowledged for 10 s. Either way
/// the connection errors, the pool drops it, and the request is a 503 worth retrying.
const DEAD_PEER: (Duration, Duration, u32, Duration) =
    (Duration::from_secs(5), Duration::from_secs(1), 5, Duration::from_secs(10));

/// The connection settings of `url`, with `settings` (`-c name=value`) for the server and the
/// dead-peer limits ([`DEAD_PEER`]) for TCP connections, and the TLS its `sslmode` asks for.
fn connection_config(
    url: &str,
    settings: &[(&str, &str)],
) -> Result<(tokio_postgres::Config, keel_pgtls::Connector), keel_pgtls::Error> {
    let (mut config, tls) = keel_pgtls::parse(url)?;
    let mut options = config.get_options().unwrap_or_default().to_owned();
    for (key, value) in settings {
        options.push_str(&format!(" -c {key}={value}"));
    }
    config.options(options.trim());
    let (idle, interval, retries, unacknowledged) = DEAD_PEER;
    config
        .keepalives(true)
        .keepalives_idle(idle)
        .keepalives_interval(interval)
        .keepalives_retries(retries)
        .tcp_user_timeout(unacknowledged);
    Ok((config, tls))
}

/// An error with its causes (tokio-postgres leaves a TLS failure's reason to `source()`), each once.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// How long [`Db::client`] waits for a server that refuses new connections (a restart).
const RIDE_THROUGH: Duration = Duration::from_secs(2);

/// Whether opening a connection failed because the server refused it for now: nothing listening on
/// its address or socket, or PostgreSQL saying it is starting up or shutting down (57P03).
fn refused_at_connect(e: &PgError) -> bool {
    if let Some(db) = e.as_db_error() {
        return db.code() == &tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW;
    }
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    io.is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound))
}

/// Hides a password in a connection URL before it is shown.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ if url.contains("password=") => "(a connection string with a password)".to_owned(),
        _ => url.to_owned(),
    }
}

/// How a deployment's pools are built ([`Databases::open`]): connections per database, and the
/// longest one statement may run on any of them before the server cancels it (zero: no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    pub size: usize,
    pub statement_timeout: Duration,
}

/// `KEEL_DB_POOL_SIZE` and `KEEL_STATEMENT_TIMEOUT`.
impl From<&Config> for PoolOptions {
    fn from(config: &Config) -> PoolOptions {
        PoolOptions { size: config.db_pool_size, statement_timeout: config.statement_timeout() }
    }
}

/// A pool size alone: with the default statement timeout (the default request timeout's). Pass the
/// configuration instead wherever there is one, so that its settings count.
impl From<usize> for PoolOptions {
    fn from(size: usize) -> PoolOptions {
        PoolOptions { size, statement_timeout: Config::default().statement_timeout() }
    }
}

impl PoolOptions {
    /// The server setting, in milliseconds (its unit when none is given). The configuration keeps the
    /// timeout to whole milliseconds that fit; anything else is clamped, never turned into "no limit".
    fn statement_timeout_setting(&self) -> String {
        let millis = self.statement_timeout.as_millis().min(i32::MAX as u128);
        if millis == 0 && !self.statement_timeout.is_zero() {
            return "1".to_owned();
        }
        millis.to_string()
    }
}

/// A shard's name in the API and in the replicas' metrics (`shard_0`).
pub fn database_label(shard: usize) -> String {
    format!("shard_{shard}")
}

impl PoolOptions {
    /// A pool of the catalogue database (or one of its replicas), with its session settings.
    fn catalog_pool(&self, name: &str, setting: &str, url: &str) -> Result<Db, ConnectError> {
        let timeout = self.statement_timeout_setting();
        let every = [("statement_timeout", timeout.as_str())];
        let settings: Vec<(&str, &str)> = CATALOG_SESSION.iter().chain(&every).copied().collect();
        Db::with_session_settings(name, setting, url, self.size, &settings)
    }

    /// A pool of a shard database (or one of its replicas).
    /// Under a connection budget ([`budget`]), its size is the shard's share of the configured one.
    fn shard_pool(&self, name: &str, setting: &str, url: &str) -> Result<Db, ConnectError> {
        let timeout = self.statement_timeout_setting();
        let size = budget::get().map_or(self.size, |b| b.shard_pool_size(self.size));
        Db::with_session_settings(name, setting, url, size, &[("statement_timeout", timeout.as_str())])
    }
}

/// Settings of every catalogue connection. Search's typo tolerance: the trigram index finds names
/// with a word this similar to the query (the default, 0.6, misses most one-letter typos in short
/// words; 0.3 catches them with few false matches, and ranking puts exact matches first).
const CATALOG_SESSION: &[(&str, &str)] = &[("pg_trgm.word_similarity_threshold", "0.3")];

/// Every database of a Keel deployment: the catalogue and the user shards behind their router.
///
/// The shards and their map can change while the process runs (a shard added, buckets moved,
/// [`shard_map`]): [`Databases::shards`] is the set as of one version of the map, and
/// [`Databases::shard_of`] routes by the newest this process has loaded.
pub struct Databases {
    pub catalog: Db,
    shards: std::sync::RwLock<Arc<ShardSet>>,
    /// How this process's pools are built, for shards that appear later.
    options: PoolOptions,
    /// `KEEL_SHARD_URLS`: the connection strings of the first shards, in order.
    configured: Vec<String>,
    /// The version of the map in use, for whoever must act on a change (the workers start runners
    /// for a new shard).
    changed: tokio::sync::watch::Sender<i64>,
    /// Serialises loads of the map, so that two never build pools for the same new shard.
    loading: tokio::sync::Mutex<()>,
}

impl Databases {
    /// Builds the pools and loads the shard map from the catalogue database. `options` is the
    /// configuration (`&config`: pool size and statement timeout) or, without one, a pool size.
    pub async fn open(
        catalog_url: &str,
        shard_urls: &[String],
        options: impl Into<PoolOptions>,
    ) -> Result<Databases, ConnectError> {
        let options = options.into();
        let catalog = options.catalog_pool("catalog", "KEEL_CATALOG_URL", catalog_url)?;
        let stored = shard_map::load(&catalog.reachable_client().await?).await?;
        let set = shard_map::build(&stored, shard_urls, options, &[])?;
        for (_, shard) in set.all() {
            let client = shard.reachable_client().await?;
            if budget::get().is_some() {
                // Checked, not kept: with many shards, one idle connection each is most of the budget.
                drop(deadpool_postgres::Object::take(client));
            }
        }
        catalog.watch();
        set.all().for_each(|(_, db)| db.watch());
        let (changed, _) = tokio::sync::watch::channel(set.version);
        Ok(Databases {
            catalog,
            shards: std::sync::RwLock::new(Arc::new(set)),
            options,
            configured: shard_urls.to_vec(),
            changed,
            loading: tokio::sync::Mutex::new(()),
        })
    }

    /// The shards and their map as of the newest version this process has loaded. Hold it for one
    /// piece of work (a scatter-gather question, a loop over the shards), not for ever.
    pub fn shards(&self) -> Arc<ShardSet> {
        self.shards.read().expect("the shard set's lock is never poisoned").clone()
    }

    /// Shard `n`'s database, if there is a shard `n`.
    pub fn shard(&self, n: ShardId) -> Option<Arc<Db>> {
        self.shards().all().find(|(shard, _)| *shard == n).map(|(_, db)| db.clone())
    }

    /// Loads the shard map again if its version in the catalogue differs from the one in use, and
    /// swaps it in; pools of shards that stay are kept, new shards get pools of their own. True if
    /// the map changed.
    pub async fn reload_shard_map(&self) -> Result<bool, ConnectError> {
        let _one_at_a_time = self.loading.lock().await;
        let client = self.catalog.client().await?;
        let version = shard_map::version(&client).await?;
        let current = self.shards();
        if version == current.version {
            return Ok(false);
        }
        let stored = shard_map::load(&client).await?;
        drop(client);
        let known: Vec<(ShardId, Arc<Db>)> = current.all().map(|(n, db)| (n, db.clone())).collect();
        let set = shard_map::build(&stored, &self.configured, self.options, &known)?;
        for (n, db) in set.all() {
            if !known.iter().any(|(k, _)| *k == n) {
                db.watch();
                tracing::info!(shard = n, "a new shard");
            }
        }
        let version = set.version;
        *self.shards.write().expect("the shard set's lock is never poisoned") = Arc::new(set);
        self.changed.send_replace(version);
        tracing::info!(version, "shard map loaded");
        Ok(true)
    }

    /// The version of the map in use, changing whenever another is swapped in.
    pub fn map_changes(&self) -> tokio::sync::watch::Receiver<i64> {
        self.changed.subscribe()
    }

    /// Sets up the read routing of every database ([`replicas`]): the replicas `config` names
    /// (`KEEL_CATALOG_REPLICA_URLS`, `KEEL_SHARD_REPLICA_URLS`), their lag monitors, and the read
    /// counters (also for databases without replicas). Once per process, after the metrics recorder
    /// is installed; a second call changes nothing. Shards added later read from their primary.
    pub fn route_reads(&self, config: &Config) -> Result<(), ConnectError> {
        let shard_lists = &config.shard_replica_urls;
        let set = self.shards();
        let shards = set.all().count();
        if shard_lists.len() > shards {
            return Err(ConnectError::Replicas(format!(
                "KEEL_SHARD_REPLICA_URLS lists replicas for {} shards, but there are {} (KEEL_SHARD_URLS)",
                shard_lists.len(),
                shards
            )));
        }
        let options = PoolOptions::from(config);
        // WAL positions, and read-your-writes floors, are kept as long as the longest budget.
        let horizon = config.longest_budget();
        // Each database with its label, the setting its replicas come from, and how its pools are made.
        type MakePool = fn(&PoolOptions, &str, &str, &str) -> Result<Db, ConnectError>;
        let catalog: (&Db, String, String, &[String], MakePool) = (
            &self.catalog,
            "catalog".to_owned(),
            "KEEL_CATALOG_REPLICA_URLS".to_owned(),
            &config.catalog_replica_urls,
            PoolOptions::catalog_pool,
        );
        let shards = set.all().map(|(i, db)| {
            let i = usize::from(i);
            let urls = shard_lists.get(i).map(Vec::as_slice).unwrap_or_default();
            let make: MakePool = PoolOptions::shard_pool;
            (&**db, database_label(i), format!("KEEL_SHARD_REPLICA_URLS[{i}]"), urls, make)
        });
        for (db, label, setting, urls, make_pool) in std::iter::once(catalog).chain(shards) {
            let replicas = urls
                .iter()
                .enumerate()
                .map(|(i, url)| {
                    let name = replicas::replica_name(i);
                    let pool = make_pool(&options, &format!("{label}_{name}"), &format!("{setting}[{i}]"), url)?;
                    Ok((name, pool))
                })
                .collect::<Result<Vec<_>, ConnectError>>()?;
            let routing = Arc::new(replicas::Routing::new(&label, replicas, horizon));
            if db.routing.set(routing.clone()).is_ok() {
                replicas::start_monitor(&routing, db);
            }
        }
        Ok(())
    }

    /// The shard database that owns a user. Only a user id routes: whatever else lives on a shard
    /// lives there with its user.
    pub fn shard_of(&self, user: UserId) -> Arc<Db> {
        self.shards().route(&shard_key(user)).handle.clone()
    }

    /// Every database, catalogue first.
    pub fn all(&self) -> Vec<Db> {
        let set = self.shards();
        std::iter::once(self.catalog.clone()).chain(set.all().map(|(_, db)| (**db).clone())).collect()
    }
}

/// Stores the initial shard map for `shards` shards, unless one is stored already, and registers
/// the configured shards the catalogue does not know yet (with no buckets).
pub async fn seed_shard_map(catalog: &Db, shards: usize) -> Result<(), ConnectError> {
    let map = ShardMap::uniform(shards as u16).map_err(ConnectError::ShardMapMismatch)?;
    let (buckets, owners): (Vec<i16>, Vec<i16>) = map.assignments().map(|(b, s)| (b as i16, s as i16)).unzip();
    let mut client = catalog.reachable_client().await?;
    let tx = client.transaction().await?;
    tx.exec(
        "INSERT INTO shard_map (bucket, shard) SELECT * FROM unnest($1::smallint[], $2::smallint[]) \
         ON CONFLICT (bucket) DO NOTHING",
        &[&buckets, &owners],
    )
    .await?;
    let registered = tx
        .exec(
            "INSERT INTO shards (shard) SELECT generate_series(0, $1::int - 1) ON CONFLICT (shard) DO NOTHING",
            &[&(shards as i32)],
        )
        .await?;
    if registered > 0 {
        shard_map::announce(&tx).await?;
    }
    tx.commit().await?;
    // Fails with a clear message when an existing map names shards that are not configured.
    let stored = shard_map::load(&client).await?;
    shard_map::check(&stored, shards).map(drop)
}

/// What a user id is hashed as: its canonical text form, so that the bucket can be computed by any
/// tool from the id as the API shows it.
pub fn shard_key(user: UserId) -> [u8; 36] {
    let mut key = [0u8; 36];
    user.as_uuid().hyphenated().encode_lower(&mut key);
    key
}

/// The virtual bucket of a user, as stored beside the user's row.
pub fn bucket_of(user: UserId) -> i16 {
    keel_shard::Bucket::of(&shard_key(user)).index() as i16
}

/// Settings of a migration's connection: no statement timeout, whatever the server's or the role's
/// default (a migration may rewrite a table, and waits its turn on the migration lock). Migrations run
/// on these pools of their own, never on a deployment's ([`Databases::open`]).
const MIGRATION_SESSION: &[(&str, &str)] = &[("statement_timeout", "0")];

/// Applies every pending migration: the catalogue first (with the shard map for `shard_urls.len()`
/// shards), then each shard. Safe to run from many processes at once.
pub async fn migrate_all(catalog_url: &str, shard_urls: &[String]) -> Result<(), ConnectError> {
    let catalog = Db::with_session_settings("catalog", "KEEL_CATALOG_URL", catalog_url, 1, MIGRATION_SESSION)?;
    drop(catalog.reachable_client().await?);
    migrations::apply(&catalog, migrations::Schema::Catalog).await?;
    seed_shard_map(&catalog, shard_urls.len()).await?;
    for (i, url) in shard_urls.iter().enumerate() {
        let (name, setting) = (format!("shard{i}"), format!("KEEL_SHARD_URLS[{i}]"));
        let shard = Db::with_session_settings(&name, &setting, url, 1, MIGRATION_SESSION)?;
        drop(shard.reachable_client().await?);
        migrations::apply(&shard, migrations::Schema::Shard).await?;
    }
    Ok(())
}

/// Creates database `name` (as a copy of `template`, if given) unless it exists, connecting with
/// `maintenance_url` (a connection string for the server's `postgres` database). True if created.
pub async fn create_database(maintenance_url: &str, name: &str, template: Option<&str>) -> Result<bool, PgError> {
    let (client, connection) = maintenance_connection(maintenance_url).await?;
    let connection = tokio::spawn(connection);
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
    if !exists {
        let template = template.map(|t| format!(" TEMPLATE {}", quote_ident(t))).unwrap_or_default();
        client.batch_execute(&format!("CREATE DATABASE {}{template}", quote_ident(name))).await?;
    }
    drop(client);
    let _ = connection.await;
    Ok(!exists)
}

/// Drops database `name` if it exists, disconnecting its clients.
pub async fn drop_database(maintenance_url: &str, name: &str) -> Result<(), PgError> {
    let (client, connection) = maintenance_connection(maintenance_url).await?;
    let connection = tokio::spawn(connection);
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name))).await?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// A connection for creating and dropping databases, with the TLS policy of `maintenance_url`.
async fn maintenance_connection(
    maintenance_url: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, keel_pgtls::TlsStream<tokio_postgres::Socket>>,
    ),
    PgError,
> {
    let (config, tls) = keel_pgtls::parse(maintenance_url).map_err(|e| match e {
        keel_pgtls::Error::Config(e) => e,
        // tokio-postgres has no public constructor for its errors; it rejects every parameter
        // keel-pgtls refuses (an `sslmode` it does not know, any `sslrootcert`): let it say so.
        keel_pgtls::Error::Parameter { .. } => tokio_postgres::Config::from_str(maintenance_url)
            .expect_err("tokio-postgres rejects the TLS parameters keel-pgtls refuses"),
    })?;
    config.connect(tls).await
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

tokio::task_local! {
    static QUERIES: Cell<u32>;
}

/// Runs `work`, counting the queries it sends through [`Sql`].
pub async fn count_queries<F: Future>(work: F) -> (F::Output, u32) {
    QUERIES
        .scope(Cell::new(0), async {
            let output = work.await;
            (output, QUERIES.with(Cell::get))
        })
        .await
}

fn count_one_query() {
    let _ = QUERIES.try_with(|n| n.set(n.get() + 1));
}

/// How this crate's handlers send a query: as a prepared statement, cached per connection, and
/// counted for the request that sent it. Implemented for pooled clients and transactions alike.
pub(crate) trait Sql: GenericClient {
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, PgError> {
        count_one_query();
        let statement = self.prepare_cached(sql).await?;
        self.query(&statement, params).await
    }

    async fn row(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, PgError> {
        count_one_query();
        let statement = self.prepare_cached(sql).await?;
        self.query_one(&statement, params).await
    }

    async fn maybe_row(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, PgError> {
        count_one_query();
        let statement = self.prepare_cached(sql).await?;
        self.query_opt(&statement, params).await
    }

    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, PgError> {
        count_one_query();
        let statement = self.prepare_cached(sql).await?;
        self.execute(&statement, params).await
    }
}

impl<C: GenericClient> Sql for C {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_connections_give_up_on_a_silent_peer_within_seconds() {
        let (config, _) =
            connection_config("postgres://keel@db.example.org:5432/x", &[("statement_timeout", "5000")]).unwrap();
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(1)));
        assert_eq!(config.get_keepalives_retries(), Some(5));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(10)));
        assert_eq!(config.get_options(), Some("-c statement_timeout=5000"));
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact("postgres://keel:secret@db:5432/x"), "postgres://keel:***@db:5432/x");
        assert_eq!(redact("postgres://keel@db/x"), "postgres://keel@db/x");
        assert_eq!(redact("host=/tmp password=p"), "(a connection string with a password)");
    }

    #[test]
    fn pools_take_the_configured_statement_timeout_in_milliseconds() {
        let mut config = Config {
            db_pool_size: 4,
            request_timeout: Duration::from_secs(5),
            job_timeout: Duration::from_secs(2),
            ..Config::default()
        };
        let options = PoolOptions::from(&config);
        assert_eq!(options, PoolOptions { size: 4, statement_timeout: Duration::from_secs(5) });
        assert_eq!(options.statement_timeout_setting(), "5000");
        config.statement_timeout = Some(Duration::from_millis(200));
        assert_eq!(PoolOptions::from(&config).statement_timeout_setting(), "200");
        config.statement_timeout = Some(Duration::ZERO);
        assert_eq!(PoolOptions::from(&config).statement_timeout_setting(), "0", "0: no limit");
        let odd = |d| PoolOptions { size: 1, statement_timeout: d }.statement_timeout_setting();
        assert_eq!(odd(Duration::from_micros(10)), "1", "never turned into no limit");
        assert_eq!(odd(Duration::from_secs(100 * 24 * 3600)), i32::MAX.to_string());
        assert_eq!(PoolOptions::from(16), PoolOptions::from(&Config::default()));
    }
}
