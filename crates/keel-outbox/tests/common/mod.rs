//! What the test binaries share: a private PostgreSQL cluster per binary, and a database of its own
//! per test with the queue's schema.
#![allow(dead_code)] // each test binary uses a part

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use keel_pg::{Cluster, ClusterSpec};
use tokio_postgres::NoTls;

/// The PostgreSQL cluster of this test binary, started on first use; stopped and its directory
/// removed when the binary exits ([`remove_cluster_at_exit`]). Directories of runs that were killed
/// are removed by the next run.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        remove_stale_clusters();
        // SAFETY: registers a plain function with no arguments; it runs once, at exit.
        unsafe { libc::atexit(remove_cluster_at_exit) };
        let base = cluster_dir();
        let mut spec = ClusterSpec::new(base.join("data"), base.join("run"))
            .setting("listen_addresses", "")
            // Throwaway data: durability only slows the tests down.
            .setting("fsync", "off")
            .setting("synchronous_commit", "off");
        spec.fast_initdb = true;
        spec.log_file = base.join("postgres.log");
        let cluster = Cluster::start(spec).expect("starting the test PostgreSQL cluster");
        CLUSTER_PID.store(cluster.pid(), Ordering::SeqCst);
        cluster
    })
}

pub fn cluster_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{CLUSTER_DIR}{}", std::process::id()))
}

static CLUSTER_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Runs when the test binary exits, passing or failing (libtest returns from `main` or calls `exit`):
/// stops the cluster's server (fast shutdown) and removes its directory, leaving nothing in /tmp.
extern "C" fn remove_cluster_at_exit() {
    let pid = CLUSTER_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir_all(cluster_dir());
}

const CLUSTER_DIR: &str = "keel-outbox-pg-";

/// Clusters of earlier runs whose process is gone (their server stopped with it).
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(CLUSTER_DIR)).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A pool of up to 8 connections to `url`.
pub fn pool(url: &str) -> Pool {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager).max_size(8).build().unwrap()
}

/// A new database of its own with the queue's schema.
pub async fn database() -> Pool {
    database_and_url().await.0
}

/// [`database`], with its connection string for connections outside the pool.
pub async fn database_and_url() -> (Pool, String) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
    // Started on a thread of its own: starting waits, and must not hold up this test's runtime.
    let cluster = std::thread::spawn(cluster).join().unwrap();
    let (admin, connection) = tokio_postgres::connect(&cluster.connection_string("postgres"), NoTls).await.unwrap();
    tokio::spawn(connection);
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    let pool = pool(&cluster.connection_string(&name));
    let client = pool.get().await.unwrap();
    client.batch_execute(keel_outbox::SCHEMA).await.unwrap();
    client.batch_execute(keel_outbox::RELAY_SCHEMA).await.unwrap();
    drop(client);
    (pool, cluster.connection_string(&name))
}
