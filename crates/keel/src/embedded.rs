//! `keel up`: one process that owns a private PostgreSQL cluster under its data directory, creates
//! the catalogue and shard databases, migrates them, and serves the API. Stopping it stops the
//! cluster cleanly; starting it again finds everything as it was.
//!
//! With `--replicas N` (`KEEL_REPLICAS`), it also runs N hot standbys of that cluster
//! (`DATA_DIR/postgres-replica-<i>`, copied from it on first start, streaming through the slot
//! `keel_replica_<i>`) and serves reads that may be a little stale from them, as a deployment with
//! streaming replicas would. The workers use the primary only.
//!
//! With `--shards N` (`KEEL_SHARDS`), a new data directory gets N user shards instead of 2. An
//! existing one keeps the shards it has: the count is a property of the data, not of a start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_pg::{socket_dir_for, Cluster, ClusterSpec, Standby};

use crate::app::{serve_with_workers, Application};
use crate::config::{Config, DEFAULT_SHARDS};
use crate::db::{self, Databases};
use crate::http::auth::new_admin_token;
use crate::http::auth::tokens::TokenKey;
use crate::Fatal;

const CATALOG_DB: &str = "keel_catalog";
/// `DATA_DIR/shards`: how many user shards this data directory has, as far as `keel up` knows before
/// PostgreSQL runs (see [`planned_shards`]).
const SHARDS_FILE: &str = "shards";
/// Only names the socket file: the embedded cluster listens on no TCP port, so it cannot clash.
const PORT: u16 = 5432;

pub fn shard_db(i: usize) -> String {
    format!("keel_shard_{i}")
}

pub async fn up(mut config: Config) -> Result<(), Fatal> {
    // Locally, people try webhooks against a receiver on their own machine.
    config.webhook_allow_loopback.get_or_insert(true);
    let data_dir = absolute(&config.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create the data directory {} (KEEL_DATA_DIR): {e}", data_dir.display()))?;
    let planned = planned_shards(&config, &data_dir)?;
    let cluster = start_cluster(cluster_spec(&data_dir, &config, planned)).await?;
    let shards = match settle_shards(&config, &data_dir, &cluster, planned).await {
        Ok(shards) => shards,
        Err(e) => {
            stop_clusters(vec![cluster]).await;
            return Err(e);
        }
    };
    let cluster = if max_connections(&config, shards) == max_connections(&config, planned) {
        cluster
    } else {
        // The directory has more shards than recorded (added since its last start): their pools need
        // connections, and `max_connections` only changes when PostgreSQL starts.
        tracing::info!(shards, "restarting PostgreSQL with max_connections for every shard");
        stop_clusters(vec![cluster]).await;
        start_cluster(cluster_spec(&data_dir, &config, shards)).await?
    };
    let result = match start_replicas(&config, &data_dir, &cluster, shards).await {
        Ok(replicas) => {
            let result = serve(&config, &data_dir, &cluster, &replicas, shards).await;
            // Standbys first: stopping the primary first would leave them retrying to stream from it.
            stop_clusters(replicas).await;
            result
        }
        Err(e) => Err(e),
    };
    stop_clusters(vec![cluster]).await;
    result
}

async fn start_cluster(spec: ClusterSpec) -> Result<Cluster, Fatal> {
    Ok(tokio::task::spawn_blocking(move || Cluster::start(spec)).await?.map_err(|e| format!("PostgreSQL: {e}"))?)
}

/// How many user shards to start PostgreSQL for, before it runs: its `max_connections` depends on
/// the count and is fixed at start, before the databases can be listed ([`settle_shards`] checks).
///
/// A new data directory (no cluster in it yet) gets the count asked for, or 2, recorded in
/// `DATA_DIR/shards` before the cluster is created, so that a first start cut short resumes with
/// the same count. An existing one has the count recorded there; without a record (made before the
/// count could be chosen, always with 2), or with one that cannot be read, 2, which the listing of
/// its databases then corrects.
fn planned_shards(config: &Config, data_dir: &Path) -> Result<usize, String> {
    let path = data_dir.join(SHARDS_FILE);
    if !data_dir.join("postgres").join("PG_VERSION").exists() {
        let shards = config.shards.unwrap_or(DEFAULT_SHARDS);
        record_shards(data_dir, shards)?;
        return Ok(shards);
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse().ok().filter(|n| *n >= 1).unwrap_or_else(|| {
            tracing::warn!(file = %path.display(), "not a number of shards; listing the shard databases instead");
            DEFAULT_SHARDS
        })),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the number of shards; listing the shard databases instead");
            }
            Ok(DEFAULT_SHARDS)
        }
    }
}

fn record_shards(data_dir: &Path, shards: usize) -> Result<(), String> {
    let path = data_dir.join(SHARDS_FILE);
    std::fs::write(&path, format!("{shards}\n")).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The user shards this data directory has: `keel_shard_0` up to the highest `keel_shard_<i>`
/// database in the cluster, and at least the `planned` count (databases a first start cut short did
/// not create yet are created by [`serve`]). Warns when a count asked for differs: it is not applied,
/// since changing it means moving users between shards.
///
/// The databases are listed rather than read from the catalogue's `shard_map`: the map names only
/// shards that own a bucket, so a shard added but not yet given buckets (or emptied of them) would
/// be left out of the router, and it is seeded only after every shard is created and migrated. This
/// cluster is private to `keel up`, so a `keel_shard_<i>` database is one of its shards (one made
/// there to add with POST /v1/admin/shards is counted too, so that `max_connections` covers it).
async fn settle_shards(config: &Config, data_dir: &Path, cluster: &Cluster, planned: usize) -> Result<usize, Fatal> {
    let found = shard_databases(&cluster.connection_string("postgres"))
        .await
        .map_err(|e| format!("listing the shard databases: {e}"))?;
    let shards = found.iter().map(|i| i + 1).max().unwrap_or(0).max(planned);
    if let Some(asked) = config.shards.filter(|asked| *asked != shards) {
        let message = format!(
            "this data directory has {shards} shards; --shards {asked} (KEEL_SHARDS) applies only to a new data \
             directory, so keel starts with its {shards}; to grow, add shards with POST /v1/admin/shards and move \
             buckets to them (docs/SHARDING.md)"
        );
        tracing::warn!(shards, asked, data_dir = %data_dir.display(), "{message}");
        eprintln!("keel: warning: {message}");
    }
    // Kept current, so that the next start sizes PostgreSQL right (and a directory from before the
    // record, or with a damaged one, gets a good one).
    record_shards(data_dir, shards)?;
    Ok(shards)
}

/// The numbers `i` of the `keel_shard_<i>` databases in the cluster.
async fn shard_databases(maintenance_url: &str) -> Result<Vec<usize>, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(maintenance_url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let rows = client.query("SELECT datname::text FROM pg_database WHERE datname LIKE 'keel\\_shard\\_%'", &[]).await?;
    drop(client);
    let _ = connection.await;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let name: String = row.get(0);
            // Only the names keel gives (`keel_shard_01` is no shard of it).
            let i: usize = name.strip_prefix("keel_shard_")?.parse().ok()?;
            (shard_db(i) == name).then_some(i)
        })
        .collect())
}

/// Stops each cluster in turn, once Keel's connections to it have closed.
///
/// Keel's connections close as the pools and workers that held them are dropped, on this runtime,
/// just after serving ends: stopping PostgreSQL at once would cut some of them while still open (a
/// FATAL line each in its log). Wait for them to go, but not for ever: a `psql` someone left open is
/// cut by the fast shutdown, as it should be. A failure to stop is logged: the others must still
/// be stopped, and the kernel's parent-death signal stops a server this process leaves behind.
async fn stop_clusters(clusters: Vec<Cluster>) {
    for cluster in clusters {
        let maintenance = cluster.connection_string("postgres");
        if let Err(e) = wait_for_clients_to_leave(&maintenance, Duration::from_secs(5)).await {
            tracing::warn!(error = %e, "could not wait for Keel's connections to close; stopping PostgreSQL anyway");
        }
        let data_dir = cluster.spec().data_dir.display().to_string();
        tracing::info!(%data_dir, "stopping PostgreSQL");
        match tokio::task::spawn_blocking(move || cluster.stop(Duration::from_secs(60))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(%data_dir, error = %e, "stopping PostgreSQL"),
            Err(e) => tracing::error!(%data_dir, error = %e, "stopping PostgreSQL"),
        }
    }
}

/// The replication slot of replica `i` (from 1).
fn replica_slot(i: usize) -> String {
    format!("keel_replica_{i}")
}

/// Starts the `config.replicas` standbys of `primary`, creating those that do not exist yet; first
/// drops the slots of replicas no longer wanted. On failure, stops those it started.
async fn start_replicas(
    config: &Config,
    data_dir: &Path,
    primary: &Cluster,
    shards: usize,
) -> Result<Vec<Cluster>, Fatal> {
    let maintenance = primary.connection_string("postgres");
    let kept = retire_replicas(&maintenance, data_dir, config.replicas)
        .await
        .map_err(|e| format!("checking the replication slots: {e}"))?;
    let mut started = Vec::new();
    for i in 1..=config.replicas {
        let spec = replica_spec(data_dir, config, shards, primary.spec(), i);
        if spec.data_dir.join("PG_VERSION").exists() && !kept.contains(&replica_slot(i)) {
            // Its slot is gone (dropped when fewer replicas were wanted, or by hand): the primary
            // may no longer have the WAL it needs, so it is copied afresh.
            tracing::warn!(
                data_dir = %spec.data_dir.display(),
                "the replica's replication slot is gone; removing its data to copy it again from the primary"
            );
            if let Err(e) = std::fs::remove_dir_all(&spec.data_dir) {
                stop_clusters(started).await;
                return Err(format!("removing {}: {e}", spec.data_dir.display()).into());
            }
        }
        match tokio::task::spawn_blocking(move || Cluster::start(spec)).await? {
            Ok(replica) => started.push(replica),
            Err(e) => {
                stop_clusters(started).await;
                return Err(format!("PostgreSQL replica {i}: {e}").into());
            }
        }
    }
    Ok(started)
}

/// Drops the slots `keel_replica_<j>` for `j > wanted` (a replica of an earlier start with more of
/// them), and removes those replicas' data, which could not stream without its slot. Returns the
/// `keel_replica_*` slots kept.
async fn retire_replicas(
    maintenance_url: &str,
    data_dir: &Path,
    wanted: usize,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(maintenance_url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let slots: Vec<String> = client
        .query("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'keel\\_replica\\_%'", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut kept = Vec::new();
    for slot in slots {
        let number = slot.strip_prefix("keel_replica_").and_then(|n| n.parse::<usize>().ok());
        match number {
            Some(j) if j > wanted => {
                // A slot keeps every byte of WAL its standby has not received: unused, it would fill
                // the primary's disk.
                tracing::info!(
                    %slot,
                    replicas = wanted,
                    "dropping the replication slot of a replica no longer run: an unused slot keeps WAL on the primary for ever"
                );
                client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await?;
                let replica_dir = data_dir.join(format!("postgres-replica-{j}"));
                if replica_dir.exists() {
                    tracing::info!(data_dir = %replica_dir.display(), "removing the replica's data: it cannot stream without its slot");
                    if let Err(e) = std::fs::remove_dir_all(&replica_dir) {
                        tracing::warn!(data_dir = %replica_dir.display(), error = %e, "could not remove the replica's data");
                    }
                }
            }
            _ => kept.push(slot),
        }
    }
    drop(client);
    let _ = connection.await;
    Ok(kept)
}

/// PostgreSQL's `max_connections` is at least this.
const MAX_CONNECTIONS_FLOOR: usize = 200;
/// Connections to the cluster beyond the pools: those of the process outside its pools (the
/// workers' `LISTEN` connection and each pool's health probe, a few per database), `keel up`'s own
/// (creating databases, migrating, waiting for clients to leave) and a few for a person with `psql`.
/// PostgreSQL keeps 3 more for superusers on top of these.
const SPARE_CONNECTIONS: usize = 20;
/// Room for clients that are not Keel's at all, however large its pools: a load or maintenance tool
/// run against the same cluster (`keel-bench` runs its pgbench baselines here with 64 clients, and
/// with its pools grown to `KEEL_DB_POOL_SIZE=32` Keel alone holds 144 connections).
const OTHER_CLIENTS: usize = 64;

/// Beyond this many shards, `keel up` puts its pools under a connection budget ([`connection_budget`]).
/// Up to it, every database keeps both full pools, a `LISTEN` connection and its watchdogs' (some 35
/// connections each while busy), as a deployment with few shards always has: 9 databases take ~300.
const MANY_SHARDS: usize = 8;
/// The connections the pools and the health probes together may hold at any moment under the budget
/// (the pools' permits are this less [`db::budget::PROBES`]): PostgreSQL's default `max_connections`
/// (100) less room for the few outside it (the catalogue's `LISTEN` connections — the catalogue
/// queue's, and the shard map's, the API's and the workers' — and the movers' lock).
const POOL_BUDGET: usize = 90;

/// With more than [`MANY_SHARDS`] shards, one process's pools and probes hold at most [`POOL_BUDGET`]
/// connections at any moment, shard pools are sized down to share what [`MANY_SHARDS`]
/// shards would hold, and the shards' queues have no `LISTEN` connection ([`db::budget`]): 100 shards
/// then fit PostgreSQL's default `max_connections` at every moment, instead of ~1,500 connections.
fn connection_budget(shards: usize) -> Option<db::budget::Budget> {
    (shards > MANY_SHARDS).then_some(db::budget::Budget {
        connections: POOL_BUDGET,
        shards,
        full_size_shards: MANY_SHARDS,
    })
}

/// Enough for both pools of every database (the API's, `KEEL_DB_POOL_SIZE`, and the workers',
/// `KEEL_WORKER_POOL_SIZE`), the spares and other clients, and never below the floor: a pool that
/// hits the server's limit fails to connect, which is a 503 for the API. With the defaults,
/// 3 × (16 + 16) + 20 + 64 = 180 for 2 shards.
///
/// With many shards the shard pools are smaller ([`connection_budget`]), and this counts them at
/// that size: 32 + 100 × (2 + 2) + 20 + 64 = 516 for 100. The budget keeps the connections held
/// within PostgreSQL's default once a burst is over; this leaves room for the burst itself (every
/// shard asked at once), which a server at the default would refuse in part.
///
/// Replicas get the same: PostgreSQL refuses to run a hot standby with a lower `max_connections`
/// than its primary's, and it covers what a replica serves (the API's replica pools, one of
/// `KEEL_DB_POOL_SIZE` per database, and the spares) with room to spare.
fn max_connections(config: &Config, shards: usize) -> usize {
    let shard_pool = |size| connection_budget(shards).map_or(size, |b| b.shard_pool_size(size));
    let pools = config.db_pool_size
        + config.worker_pool_size
        + shards * (shard_pool(config.db_pool_size) + shard_pool(config.worker_pool_size));
    (pools + SPARE_CONNECTIONS + OTHER_CLIENTS).max(MAX_CONNECTIONS_FLOOR)
}

fn cluster_spec(data_dir: &Path, config: &Config, shards: usize) -> ClusterSpec {
    let mut spec = ClusterSpec::new(data_dir.join("postgres"), socket_dir_for(&data_dir.join("run"), PORT))
        // Unix socket only: nothing outside this machine's file permissions can connect.
        .setting("listen_addresses", "")
        .setting("max_connections", max_connections(config, shards))
        // Query insight: every statement's time and calls, for `GET /v1/admin/queries`.
        .setting("shared_preload_libraries", "pg_stat_statements");
    // Logical replication and two-phase commit: what moving buckets between shards needs.
    for (name, value) in db::moves::SERVER_SETTINGS {
        spec = spec.setting(name, value);
    }
    spec.port = PORT;
    spec.log_file = data_dir.join("postgres.log");
    spec
}

/// Replica `i` (from 1): beside the primary, its socket in the same directory (port `PORT + i` only
/// names the socket file), its settings the primary's.
fn replica_spec(data_dir: &Path, config: &Config, shards: usize, primary: &ClusterSpec, i: usize) -> ClusterSpec {
    let mut spec = cluster_spec(data_dir, config, shards);
    spec.data_dir = data_dir.join(format!("postgres-replica-{i}"));
    spec.log_file = data_dir.join(format!("postgres-replica-{i}.log"));
    spec.port = PORT + i as u16;
    spec.socket_dir = primary.socket_dir.clone();
    // The maintenance database's name is only for the conninfo's completeness: a replication
    // connection is to the cluster.
    let primary = format!("host={} port={} user={}", primary.socket_dir.display(), primary.port, primary.superuser);
    spec.standby_of = Some(Standby { primary, slot: replica_slot(i) });
    spec
}

/// Waits until each replica has replayed all the primary had written when the wait began (the
/// databases just created and migrated), for at most `timeout`: a replica the API reads from at once
/// should have them. One that takes longer is logged, not fatal: reads that may be stale go to a
/// replica only within their lag budget.
async fn wait_for_replicas(primary: &Cluster, replicas: &[Cluster], timeout: Duration) -> Result<(), Fatal> {
    if replicas.is_empty() {
        return Ok(());
    }
    let (client, connection) =
        tokio_postgres::connect(&primary.connection_string("postgres"), tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let target: String = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
    drop(client);
    let _ = connection.await;
    let deadline = tokio::time::Instant::now() + timeout;
    for replica in replicas {
        let (client, connection) =
            tokio_postgres::connect(&replica.connection_string("postgres"), tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        loop {
            let caught_up: bool = client
                .query_one("SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)", &[&target])
                .await?
                .get(0);
            if caught_up {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(data_dir = %replica.spec().data_dir.display(), "the replica has not caught up with the primary yet");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(client);
        let _ = connection.await;
    }
    Ok(())
}

async fn serve(
    config: &Config,
    data_dir: &Path,
    cluster: &Cluster,
    replicas: &[Cluster],
    shards: usize,
) -> Result<(), Fatal> {
    let maintenance = cluster.connection_string("postgres");
    let catalog_url = cluster.connection_string(CATALOG_DB);
    let shard_urls: Vec<String> = (0..shards).map(|i| cluster.connection_string(&shard_db(i))).collect();
    for name in std::iter::once(CATALOG_DB.to_owned()).chain((0..shards).map(shard_db)) {
        if db::create_database(&maintenance, &name, None).await.map_err(|e| format!("creating {name}: {e}"))? {
            tracing::info!(database = %name, "created database");
        }
    }
    db::migrate_all(&catalog_url, &shard_urls).await?;
    for url in std::iter::once(&catalog_url).chain(&shard_urls) {
        crate::admin::queries::enable(url).await;
    }
    let admin_token = admin_token(config, data_dir)?;
    let mut config = with_token_keys(config, data_dir)?;
    // Every replica holds every database.
    config.catalog_replica_urls = replicas.iter().map(|r| r.connection_string(CATALOG_DB)).collect();
    config.shard_replica_urls =
        (0..shards).map(|i| replicas.iter().map(|r| r.connection_string(&shard_db(i))).collect()).collect();
    wait_for_replicas(cluster, replicas, Duration::from_secs(30)).await?;
    let config = &config;
    // Before the pools are built: each registers with the budget as it is.
    if let Some(budget) = connection_budget(shards) {
        db::budget::set(budget);
        tracing::info!(
            shards,
            connections = budget.connections,
            "many shards: pooled connections kept within a budget"
        );
    }
    let databases = Databases::open(&catalog_url, &shard_urls, config).await?;
    // The workers' pools are their own: a backlog of jobs cannot take the API's connections.
    let workers = crate::jobs::open_databases(&catalog_url, &shard_urls, config).await?;
    let app = Application::build(config.clone(), databases, &admin_token).await?;
    tracing::info!(address = %app.local_addr(), data_dir = %data_dir.display(), shards, replicas = replicas.len(), "keel is up");
    let with_replicas = match replicas.len() {
        0 => String::new(),
        1 => ", 1 read replica".to_owned(),
        n => format!(", {n} read replicas"),
    };
    // What a person starting it needs first: where the API is, and the admin token.
    let token_from = match config.admin_token {
        Some(_) => "KEEL_ADMIN_TOKEN".to_owned(),
        None => data_dir.join("admin-token").display().to_string(),
    };
    eprintln!(
        "keel is up: http://{address}  (data in {}, {shards} shard{}{with_replicas})\n  \
         API: http://{address}/v1/…  (OpenAPI: /openapi.json, metrics: /metrics)\n  \
         admin token: {token_from}",
        data_dir.display(),
        if shards == 1 { "" } else { "s" },
        address = app.local_addr(),
    );
    Ok(serve_with_workers(app, workers).await?)
}

/// Waits until no client but this check is connected to the cluster, for at most `timeout`.
async fn wait_for_clients_to_leave(maintenance_url: &str, timeout: Duration) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(maintenance_url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let deadline = tokio::time::Instant::now() + timeout;
    let others = loop {
        let others: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[],
            )
            .await?
            .get(0);
        if others == 0 || tokio::time::Instant::now() >= deadline {
            break others;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(client);
    let _ = connection.await;
    if others > 0 {
        tracing::warn!(connections = others, "connections still open after {timeout:?}; stopping PostgreSQL cuts them");
    }
    Ok(())
}

/// `KEEL_ADMIN_TOKEN` if set; else the token kept in `DIR/admin-token`; else a new one, kept there
/// (readable by this user only) and printed once.
fn admin_token(config: &Config, data_dir: &Path) -> Result<String, String> {
    if let Some(token) = &config.admin_token {
        return Ok(token.clone());
    }
    let path = data_dir.join("admin-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(token.trim().to_owned());
    }
    let token = new_admin_token();
    write_private(&path, &token).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("admin token (kept in {}): {token}", path.display());
    Ok(token)
}

/// `KEEL_TOKEN_KEYS` if set; else the keys kept in `DIR/token-keys` (one `id:secret` per line, the
/// signing key first); else a new key, kept there (readable by this user only).
fn with_token_keys(config: &Config, data_dir: &Path) -> Result<Config, String> {
    let mut config = config.clone();
    if !config.token_keys.is_empty() {
        return Ok(config);
    }
    let path = data_dir.join("token-keys");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = TokenKey::generate("k1").to_setting();
            write_private(&path, &key).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            key
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    config.token_keys = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(TokenKey::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("invalid setting KEEL_DATA_DIR: {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_takes_both_pools_of_every_database() {
        assert_eq!(
            max_connections(&Config::default(), 2),
            MAX_CONNECTIONS_FLOOR,
            "3 × (16 + 16) + 20 + 64 fits in 200"
        );
        let big = Config { db_pool_size: 50, worker_pool_size: 30, ..Config::default() };
        assert_eq!(max_connections(&big, 2), 3 * 80 + SPARE_CONNECTIONS + OTHER_CLIENTS);
        assert_eq!(max_connections(&big, 1), 2 * 80 + SPARE_CONNECTIONS + OTHER_CLIENTS);
        assert_eq!(max_connections(&Config::default(), 1), MAX_CONNECTIONS_FLOOR, "2 × 32 + 20 + 64 fits in 200");
        assert_eq!(max_connections(&Config::default(), 4), 5 * 32 + SPARE_CONNECTIONS + OTHER_CLIENTS);
        assert_eq!(max_connections(&Config::default(), MANY_SHARDS), 9 * 32 + SPARE_CONNECTIONS + OTHER_CLIENTS);
        // Beyond, the shards' pools share what MANY_SHARDS would hold, at least 2 each.
        assert_eq!(max_connections(&Config::default(), 16), 32 + 16 * (8 + 8) + SPARE_CONNECTIONS + OTHER_CLIENTS);
        assert_eq!(
            max_connections(&Config::default(), crate::config::MAX_SHARDS),
            32 + 100 * (2 + 2) + SPARE_CONNECTIONS + OTHER_CLIENTS
        );
        assert!(connection_budget(MANY_SHARDS).is_none() && connection_budget(2).is_none());
        assert!(connection_budget(MANY_SHARDS + 1).is_some());
    }

    #[test]
    fn a_replica_has_its_primarys_connections_which_cover_the_replica_pools() {
        for config in [Config::default(), Config { db_pool_size: 300, worker_pool_size: 1, ..Config::default() }] {
            for shards in [1, 2, 7] {
                let data_dir = Path::new("/srv/keel");
                let primary = cluster_spec(data_dir, &config, shards);
                let replica = replica_spec(data_dir, &config, shards, &primary, 2);
                assert_eq!(replica.settings, primary.settings, "a standby refuses a lower max_connections");
                assert!(max_connections(&config, shards) >= (1 + shards) * config.db_pool_size + SPARE_CONNECTIONS);
                assert_eq!(replica.port, PORT + 2);
                assert_eq!(replica.socket_dir, primary.socket_dir);
                assert_eq!(replica.data_dir, data_dir.join("postgres-replica-2"));
                assert_eq!(replica.log_file, data_dir.join("postgres-replica-2.log"));
                assert_eq!(replica.standby_of.unwrap().slot, "keel_replica_2");
            }
        }
    }

    #[test]
    fn a_new_data_directory_records_the_shards_asked_for_and_an_existing_one_keeps_its_own() {
        let dir = std::env::temp_dir().join(format!("keel-embedded-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let asked = |n: Option<usize>| Config { shards: n, ..Config::default() };

        // New: the count asked for, or the default, recorded before the cluster is created.
        assert_eq!(planned_shards(&asked(None), &dir).unwrap(), DEFAULT_SHARDS);
        assert_eq!(planned_shards(&asked(Some(4)), &dir).unwrap(), 4);
        assert_eq!(std::fs::read_to_string(dir.join(SHARDS_FILE)).unwrap(), "4\n");

        // Existing (a cluster in it): the record, whatever is asked.
        std::fs::create_dir_all(dir.join("postgres")).unwrap();
        std::fs::write(dir.join("postgres/PG_VERSION"), "17\n").unwrap();
        assert_eq!(planned_shards(&asked(Some(3)), &dir).unwrap(), 4);
        assert_eq!(planned_shards(&asked(None), &dir).unwrap(), 4);
        // Without a usable record (a directory from before it was kept): 2, as such a directory was made.
        std::fs::write(dir.join(SHARDS_FILE), "many\n").unwrap();
        assert_eq!(planned_shards(&asked(Some(3)), &dir).unwrap(), DEFAULT_SHARDS);
        std::fs::remove_file(dir.join(SHARDS_FILE)).unwrap();
        assert_eq!(planned_shards(&asked(Some(3)), &dir).unwrap(), DEFAULT_SHARDS);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
