//! `keel up`: one process that owns a private PostgreSQL cluster under its data directory, creates
//! the catalogue and shard databases, migrates them, and serves the API. Stopping it stops the
//! cluster cleanly; starting it again finds everything as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_pg::{socket_dir_for, Cluster, ClusterSpec};

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
    let result = serve(&config, &data_dir, &cluster).await;
    // Keel's connections close as the pools and workers that held them are dropped, on this
    // runtime, just after serving ends: stopping PostgreSQL at once would cut some of them while
    // still open (a FATAL line each in its log). Wait for them to go, but not for ever: a `psql`
    // someone left open is cut by the fast shutdown, as it should be.
    let maintenance = cluster.connection_string("postgres");
    if let Err(e) = wait_for_clients_to_leave(&maintenance, Duration::from_secs(5)).await {
        tracing::warn!(error = %e, "could not wait for Keel's connections to close; stopping PostgreSQL anyway");
    }
    tracing::info!("stopping PostgreSQL");
    tokio::task::spawn_blocking(move || cluster.stop(Duration::from_secs(60)))
        .await?
        .map_err(|e| format!("stopping PostgreSQL: {e}"))?;
    result
}

/// PostgreSQL's `max_connections` is at least this.
const MAX_CONNECTIONS_FLOOR: usize = 200;
/// Connections to the cluster beyond the pools: those of the process outside its pools (the
/// workers' `LISTEN` connection and each pool's health probe, a few per database), `keel up`'s own
/// (creating databases, migrating, waiting for clients to leave) and a few for a person with `psql`.
/// PostgreSQL keeps 3 more for superusers on top of these.
const SPARE_CONNECTIONS: usize = 20;

/// Enough for both pools of every database (the API's, `KEEL_DB_POOL_SIZE`, and the workers',
/// `KEEL_WORKER_POOL_SIZE`) and the spares, and never below the floor: a pool that hits the server's
/// limit fails to connect, which is a 503 for the API. With the defaults, 3 × (16 + 16) + 20 = 116.
fn max_connections(config: &Config) -> usize {
    let pools = (1 + SHARDS) * (config.db_pool_size + config.worker_pool_size);
    (pools + SPARE_CONNECTIONS).max(MAX_CONNECTIONS_FLOOR)
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

async fn serve(config: &Config, data_dir: &Path, cluster: &Cluster) -> Result<(), Fatal> {
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
    let config = &with_token_keys(config, data_dir)?;
    let databases = Databases::open(&catalog_url, &shard_urls, config).await?;
    // The workers' pools are their own: a backlog of jobs cannot take the API's connections.
    let workers = crate::jobs::open_databases(&catalog_url, &shard_urls, config).await?;
    let app = Application::build(config.clone(), databases, &admin_token).await?;
    tracing::info!(address = %app.local_addr(), data_dir = %data_dir.display(), "keel is up");
    eprintln!("keel is up: http://{}  (data in {})", app.local_addr(), data_dir.display());
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
        assert_eq!(max_connections(&Config::default()), MAX_CONNECTIONS_FLOOR, "3 × (16 + 16) + 20 fits in 200");
        let big = Config { db_pool_size: 50, worker_pool_size: 30, ..Config::default() };
        assert_eq!(max_connections(&big), 3 * 80 + SPARE_CONNECTIONS);
    }
}
