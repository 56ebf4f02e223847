//! The shard map as stored in the catalogue, and how each process follows it while running.
//!
//! - `shards` lists every shard; one listed in the configuration (`KEEL_SHARD_URLS`, by position)
//!   has no URL stored, one added while running ([`register`]) has the URL it was added with.
//! - `shard_map` says which shard holds each of the 1024 buckets (see `keel-shard`).
//! - `shard_map_version` is raised by every change to either, in the change's transaction, which
//!   also sends `NOTIFY keel_shard_map` ([`announce`]).
//!
//! Each process routes by the [`ShardSet`] of the version it loaded last. [`follow`] loads the map
//! again on every announcement and, in case one was missed (the `LISTEN` connection dropped),
//! checks the version every [`CHECK_EVERY`] as well.

use std::ops::Deref;
use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use keel_shard::{Router, ShardId, ShardMap};
use tokio_postgres::AsyncMessage;

use super::{database_label, ConnectError, Databases, Db, PoolOptions, Sql};

/// The channel changes are announced on.
pub const CHANNEL: &str = "keel_shard_map";
/// The SQLSTATE a shard answers a write with when the row's bucket has moved away from it (its
/// `keel_guard_bucket` trigger): the writer routed by an older map.
pub const BUCKET_MOVED: &str = "KB001";
/// How often a process checks the map's version without an announcement.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The shards and the map of one version.
pub struct ShardSet {
    pub version: i64,
    router: Router<Arc<Db>>,
}

impl Deref for ShardSet {
    type Target = Router<Arc<Db>>;

    fn deref(&self) -> &Router<Arc<Db>> {
        &self.router
    }
}

/// What the catalogue holds: the map's version, the shards (numbered from 0, each with its stored
/// URL if it has one), and the bucket assignments.
pub struct Stored {
    pub version: i64,
    pub shards: Vec<(ShardId, Option<String>)>,
    pub assignments: Vec<(u16, ShardId)>,
}

pub async fn version(client: &impl GenericClient) -> Result<i64, ConnectError> {
    Ok(client.row("SELECT version FROM shard_map_version", &[]).await?.get(0))
}

pub async fn load(client: &impl GenericClient) -> Result<Stored, ConnectError> {
    let exists: bool = client.row("SELECT to_regclass('shard_map_version') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Err(ConnectError::NoShardMap);
    }
    // One snapshot for the three tables: a change commits all of them at once.
    let rows = client
        .rows(
            "SELECT (SELECT version FROM shard_map_version),
                    (SELECT coalesce(array_agg(shard ORDER BY shard), '{}') FROM shards),
                    (SELECT coalesce(array_agg(url ORDER BY shard), '{}') FROM shards),
                    (SELECT coalesce(array_agg(bucket ORDER BY bucket), '{}') FROM shard_map),
                    (SELECT coalesce(array_agg(shard ORDER BY bucket), '{}') FROM shard_map)",
            &[],
        )
        .await?;
    let row = &rows[0];
    let numbers: Vec<i16> = row.get(1);
    let urls: Vec<Option<String>> = row.get(2);
    let buckets: Vec<i16> = row.get(3);
    let owners: Vec<i16> = row.get(4);
    if buckets.is_empty() {
        return Err(ConnectError::NoShardMap);
    }
    Ok(Stored {
        version: row.get(0),
        shards: numbers.into_iter().map(|n| n as ShardId).zip(urls).collect(),
        assignments: buckets.into_iter().zip(owners).map(|(b, s)| (b as u16, s as ShardId)).collect(),
    })
}

/// Checks what is stored against a configuration listing `configured` shards: the shards are
/// numbered 0, 1, … with no gap, each has a URL (configured or stored), and every bucket is on one.
pub fn check(stored: &Stored, configured: usize) -> Result<ShardMap, ConnectError> {
    let registered = stored.shards.len();
    if let Some((n, _)) = stored.shards.iter().enumerate().find(|(i, (n, _))| usize::from(*n) != *i) {
        return Err(ConnectError::Registry(format!(
            "the shards are not numbered 0 to {}: shard {n} is missing",
            registered - 1
        )));
    }
    if configured > registered {
        return Err(ConnectError::Registry(format!(
            "KEEL_SHARD_URLS lists {configured} shards, but the catalogue has {registered}: run `keel migrate` \
             with this KEEL_SHARD_URLS to register the new ones"
        )));
    }
    if let Some((n, _)) = stored.shards.iter().skip(configured).find(|(_, url)| url.is_none()) {
        return Err(ConnectError::Registry(format!(
            "shard {n} has no stored URL and KEEL_SHARD_URLS lists only {configured} shards: list it there"
        )));
    }
    ShardMap::from_assignments(registered as u16, stored.assignments.iter().copied())
        .map_err(ConnectError::ShardMapMismatch)
}

/// The shard set of `stored`: `known` pools are reused for the shards they serve, the others are
/// built (connections open on first use). A configured URL wins over a stored one.
pub fn build(
    stored: &Stored,
    configured: &[String],
    options: PoolOptions,
    known: &[(ShardId, Arc<Db>)],
) -> Result<ShardSet, ConnectError> {
    let map = check(stored, configured.len())?;
    let mut pools = Vec::with_capacity(stored.shards.len());
    for (n, url) in &stored.shards {
        let i = usize::from(*n);
        let (url, setting) = match configured.get(i) {
            Some(url) => (url.as_str(), format!("KEEL_SHARD_URLS[{i}]")),
            None => (url.as_deref().unwrap_or_default(), format!("the URL stored for shard {i}")),
        };
        let pool = match known.iter().find(|(k, db)| k == n && db.url() == url) {
            Some((_, db)) => db.clone(),
            None => Arc::new(options.shard_pool(&format!("shard{i}"), &setting, url)?),
        };
        pools.push(pool);
    }
    let router = Router::new(map, pools).map_err(ConnectError::ShardMapMismatch)?;
    Ok(ShardSet { version: stored.version, router })
}

/// Raises the map's version and announces it, in the transaction of the change.
pub async fn announce(tx: &impl GenericClient) -> Result<i64, ConnectError> {
    let version: i64 =
        tx.row("UPDATE shard_map_version SET version = version + 1 RETURNING version", &[]).await?.get(0);
    tx.exec("SELECT pg_notify($1, $2)", &[&CHANNEL, &version.to_string()]).await?;
    Ok(version)
}

/// Why a shard could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("{0}")]
    BadUrl(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Adds the database at `url` as a new shard with no buckets: migrates it, refuses one that
/// already holds users or is already a shard, and registers it with the next number. Every process
/// learns of it through the announcement; this one loads the map before answering.
pub async fn register(db: &Databases, url: &str) -> Result<ShardId, AddError> {
    let setting = "the new shard's URL";
    let shard =
        Db::with_session_settings("new shard", setting, url, 1, super::MIGRATION_SESSION).map_err(|e| match e {
            ConnectError::BadUrl { source, .. } => {
                AddError::BadUrl(format!("not a PostgreSQL connection string: {source}"))
            }
            other => AddError::BadUrl(other.to_string()),
        })?;
    let set = db.shards();
    if set.all().any(|(_, known)| known.url() == url) {
        return Err(AddError::Conflict("that database is already a shard".to_owned()));
    }
    let client =
        shard.client().await.map_err(|e| AddError::Unreachable(format!("cannot reach it: {}", super::causes(&e))))?;
    drop(client);
    super::migrations::apply(&shard, super::migrations::Schema::Shard)
        .await
        .map_err(|e| AddError::Unreachable(format!("cannot migrate it: {}", super::causes(&e))))?;
    let users: i64 = shard
        .client()
        .await
        .map_err(ConnectError::from)?
        .row("SELECT count(*) FROM users", &[])
        .await
        .map_err(ConnectError::from)?
        .get(0);
    if users > 0 {
        return Err(AddError::Conflict(format!(
            "that database already holds {users} users: a new shard must be empty (is it a shard of this or another deployment?)"
        )));
    }
    let mut client = db.catalog.client().await.map_err(ConnectError::from)?;
    let tx = client.transaction().await.map_err(ConnectError::from)?;
    // Numbers are handed out one at a time: the version row is the lock.
    tx.row("SELECT version FROM shard_map_version FOR UPDATE", &[]).await.map_err(ConnectError::from)?;
    let taken = tx.maybe_row("SELECT shard FROM shards WHERE url = $1", &[&url]).await.map_err(ConnectError::from)?;
    if let Some(row) = taken {
        let n: i16 = row.get(0);
        return Err(AddError::Conflict(format!("that database is already shard {n}")));
    }
    let next: i16 = tx
        .row("SELECT coalesce(max(shard) + 1, 0)::smallint FROM shards", &[])
        .await
        .map_err(ConnectError::from)?
        .get(0);
    if next as usize >= usize::from(keel_shard::BUCKETS) {
        return Err(AddError::Conflict(format!("there are {next} shards already: one per bucket at most")));
    }
    tx.exec("INSERT INTO shards (shard, url) VALUES ($1, $2)", &[&next, &url]).await.map_err(ConnectError::from)?;
    announce(&tx).await?;
    tx.commit().await.map_err(ConnectError::from)?;
    db.reload_shard_map().await?;
    tracing::info!(shard = next, label = %database_label(next as usize), "shard added");
    Ok(next as ShardId)
}

/// Keeps `db`'s shard map current until `db` is dropped: loads it again on each announcement, and
/// checks its version every [`CHECK_EVERY`] in case an announcement was missed.
pub fn follow(db: &Arc<Databases>) {
    let weak = Arc::downgrade(db);
    let (config, tls) = (db.catalog.config.clone(), db.catalog.tls.clone());
    tokio::spawn(async move {
        let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut listener: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            if listener.as_ref().is_none_or(|l| l.is_finished()) {
                listener = Some(tokio::spawn(listen(config.clone(), tls.clone(), heard_tx.clone())));
            }
            tokio::select! {
                _ = heard.recv() => {}
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let Some(db) = Weak::upgrade(&weak) else { break };
            if let Err(e) = db.reload_shard_map().await {
                tracing::warn!(error = %e, "cannot load the shard map; routing by the one loaded before");
            }
        }
        if let Some(listener) = listener {
            listener.abort();
        }
    });
}

/// One `LISTEN keel_shard_map` connection; ends when it drops (the caller opens another).
async fn listen(
    config: tokio_postgres::Config,
    tls: keel_pgtls::Connector,
    heard: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let Ok((client, mut connection)) = config.connect(tls).await else {
        tokio::time::sleep(CHECK_EVERY).await;
        return;
    };
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) if heard.send(()).is_err() => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
        let _ = driver.await;
    } else {
        driver.abort();
    }
}
