//! `keel up`: one process that owns a private PostgreSQL cluster under its data directory, creates
//! the catalogue and shard databases, migrates them, and serves the API. Stopping it stops the
//! cluster cleanly; starting it again finds everything as it was.
//!
//! With `--replicas N` (`KEEL_REPLICAS`), it also runs N hot standbys of that cluster
//! (`DATA_DIR/postgres-replica-<i>`, copied from it on first start, streaming through the slot
//! `keel_replica_<i>`) and serves reads that may be a little stale from them, as a deployment with
//! streaming replicas would. The workers use the primary only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_pg::{socket_dir_for, Cluster, ClusterSpec, Standby};

use crate::app::{serve_with_workers, Application};
use crate::config::Config;
use crate::db::{self, Databases};
use crate::http::auth::new_admin_token;
use crate::http::auth::tokens::TokenKey;
use crate::Fatal;

/// `keel up` creates this many user shards, so that sharding is exercised from the first run.
pub const SHARDS: usize = 2;
const CATALOG_DB: &str = "keel_catalog";
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
    let spec = cluster_spec(&data_dir, &config);
    let cluster =
        tokio::task::spawn_blocking(move || Cluster::start(spec)).await?.map_err(|e| format!("PostgreSQL: {e}"))?;
    let result = match start_replicas(&config, &data_dir, &cluster).await {
        Ok(replicas) => {
            let result = serve(&config, &data_dir, &cluster, &replicas).await;
            // Standbys first: stopping the primary first would leave them retrying to stream from it.
            stop_clusters(replicas).await;
            result
        }
        Err(e) => Err(e),
    };
    stop_clusters(vec![cluster]).await;
    result
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
async fn start_replicas(config: &Config, data_dir: &Path, primary: &Cluster) -> Result<Vec<Cluster>, Fatal> {
    let maintenance = primary.connection_string("postgres");
    let kept = retire_replicas(&maintenance, data_dir, config.replicas)
        .await
        .map_err(|e| format!("checking the replication slots: {e}"))?;
    let mut started = Vec::new();
    for i in 1..=config.replicas {
        let spec = replica_spec(data_dir, config, primary.spec(), i);
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

/// Enough for both pools of every database (the API's, `KEEL_DB_POOL_SIZE`, and the workers',
/// `KEEL_WORKER_POOL_SIZE`), the spares and other clients, and never below the floor: a pool that
/// hits the server's limit fails to connect, which is a 503 for the API. With the defaults,
/// 3 × (16 + 16) + 20 + 64 = 180.
///
/// Replicas get the same: PostgreSQL refuses to run a hot standby with a lower `max_connections`
/// than its primary's, and it covers what a replica serves (the API's replica pools, one of
/// `KEEL_DB_POOL_SIZE` per database, and the spares) with room to spare.
fn max_connections(config: &Config) -> usize {
    let pools = (1 + SHARDS) * (config.db_pool_size + config.worker_pool_size);
    (pools + SPARE_CONNECTIONS + OTHER_CLIENTS).max(MAX_CONNECTIONS_FLOOR)
}

fn cluster_spec(data_dir: &Path, config: &Config) -> ClusterSpec {
    let mut spec = ClusterSpec::new(data_dir.join("postgres"), socket_dir_for(&data_dir.join("run"), PORT))
        // Unix socket only: nothing outside this machine's file permissions can connect.
        .setting("listen_addresses", "")
        .setting("max_connections", max_connections(config));
    spec.port = PORT;
    spec.log_file = data_dir.join("postgres.log");
    spec
}

/// Replica `i` (from 1): beside the primary, its socket in the same directory (port `PORT + i` only
/// names the socket file), its settings the primary's.
fn replica_spec(data_dir: &Path, config: &Config, primary: &ClusterSpec, i: usize) -> ClusterSpec {
    let mut spec = cluster_spec(data_dir, config);
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

async fn serve(config: &Config, data_dir: &Path, cluster: &Cluster, replicas: &[Cluster]) -> Result<(), Fatal> {
    let maintenance = cluster.connection_string("postgres");
    let catalog_url = cluster.connection_string(CATALOG_DB);
    let shard_urls: Vec<String> = (0..SHARDS).map(|i| cluster.connection_string(&shard_db(i))).collect();
    for name in std::iter::once(CATALOG_DB.to_owned()).chain((0..SHARDS).map(shard_db)) {
        if db::create_database(&maintenance, &name, None).await.map_err(|e| format!("creating {name}: {e}"))? {
            tracing::info!(database = %name, "created database");
        }
    }
    db::migrate_all(&catalog_url, &shard_urls).await?;
    let admin_token = admin_token(config, data_dir)?;
    let mut config = with_token_keys(config, data_dir)?;
    // Every replica holds every database.
    config.catalog_replica_urls = replicas.iter().map(|r| r.connection_string(CATALOG_DB)).collect();
    config.shard_replica_urls =
        (0..SHARDS).map(|i| replicas.iter().map(|r| r.connection_string(&shard_db(i))).collect()).collect();
    wait_for_replicas(cluster, replicas, Duration::from_secs(30)).await?;
    let config = &config;
    let databases = Databases::open(&catalog_url, &shard_urls, config).await?;
    // The workers' pools are their own: a backlog of jobs cannot take the API's connections.
    let workers = crate::jobs::open_databases(&catalog_url, &shard_urls, config).await?;
    let app = Application::build(config.clone(), databases, &admin_token).await?;
    tracing::info!(address = %app.local_addr(), data_dir = %data_dir.display(), replicas = replicas.len(), "keel is up");
    let with_replicas = match replicas.len() {
        0 => String::new(),
        1 => ", 1 read replica".to_owned(),
        n => format!(", {n} read replicas"),
    };
    eprintln!("keel is up: http://{}  (data in {}{with_replicas})", app.local_addr(), data_dir.display());
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
        assert_eq!(max_connections(&Config::default()), MAX_CONNECTIONS_FLOOR, "3 × (16 + 16) + 20 + 64 fits in 200");
        let big = Config { db_pool_size: 50, worker_pool_size: 30, ..Config::default() };
        assert_eq!(max_connections(&big), 3 * 80 + SPARE_CONNECTIONS + OTHER_CLIENTS);
    }

    #[test]
    fn a_replica_has_its_primarys_connections_which_cover_the_replica_pools() {
        for config in [Config::default(), Config { db_pool_size: 300, worker_pool_size: 1, ..Config::default() }] {
            let data_dir = Path::new("/srv/keel");
            let primary = cluster_spec(data_dir, &config);
            let replica = replica_spec(data_dir, &config, &primary, 2);
            assert_eq!(replica.settings, primary.settings, "a standby refuses a lower max_connections");
            assert!(max_connections(&config) >= (1 + SHARDS) * config.db_pool_size + SPARE_CONNECTIONS);
            assert_eq!(replica.port, PORT + 2);
            assert_eq!(replica.socket_dir, primary.socket_dir);
            assert_eq!(replica.data_dir, data_dir.join("postgres-replica-2"));
            assert_eq!(replica.log_file, data_dir.join("postgres-replica-2.log"));
            assert_eq!(replica.standby_of.unwrap().slot, "keel_replica_2");
        }
    }
}
