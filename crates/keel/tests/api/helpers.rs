//! The test harness: one private PostgreSQL cluster per test binary, started on first use and
//! stopped when the binary exits; migrated template databases; and a [`TestApp`] per test with its
//! own catalogue and two shard databases cloned from the templates, dropped afterwards.
//!
//! Everything a run writes (the cluster, NATS's store, mail, `keel` processes' data and logs) lives
//! under one directory of this binary's, [`scratch_root`], removed when the binary exits, whether
//! its tests passed or failed. A binary killed outright leaves it behind; the next run removes it.
//!
//! Tests of read replicas use a second cluster, [`replicated_cluster`]: a primary with [`STANDBYS`]
//! hot standbys streaming from it, started on first use ([`TestApp::spawn_replicated`],
//! [`TestDatabases::create_replicated`]). Pausing replay or killing a standby affects every test
//! using it, so each such test first takes [`exclusive_replicas`], and controls the standbys with
//! the functions of [`standby`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use keel::app::Application;
use keel::config::Config;
use keel::db::{self, Databases};
use keel_pg::{Cluster, ClusterSpec};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use tokio_postgres::NoTls;

const CATALOG_TEMPLATE: &str = "keel_template_catalog";
const SHARD_TEMPLATE: &str = "keel_template_shard";
pub const SHARDS: usize = 2;
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The user an access token of these tests' key names (the token as issued; not for tokens a test
/// makes up).
pub fn user_of(token: &str) -> String {
    let keys =
        keel::http::auth::tokens::Keys::new(vec![keel::http::auth::tokens::TokenKey::parse(TOKEN_KEYS).unwrap()]);
    let claims = keys.unwrap().verify_access(token, keel::http::auth::tokens::unix_now());
    claims.unwrap_or_else(|why| panic!("not an access token of the tests' key ({why:?}): {token}")).sub.to_string()
}

/// The token signing key of every test app and process (`KEEL_TOKEN_KEYS`): nodes of one test must
/// share it, and nothing is gained by each test having its own.
pub const TOKEN_KEYS: &str = "test:dGVzdC10b2tlbi1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3";

pub struct TestCluster {
    cluster: Cluster,
}

/// Fast settings for a throwaway test cluster.
fn test_spec(data_dir: PathBuf, socket_dir: PathBuf, log_file: PathBuf) -> ClusterSpec {
    let mut spec = ClusterSpec::new(data_dir, socket_dir)
        .setting("listen_addresses", "")
        .setting("max_connections", 500)
        // Throwaway data: durability only slows the tests down.
        .setting("fsync", "off")
        .setting("synchronous_commit", "off")
        .setting("full_page_writes", "off")
        // As `keel up`'s: the statistics of `GET /v1/admin/queries`.
        .setting("shared_preload_libraries", "pg_stat_statements");
    // Logical replication and two-phase commit, for moving buckets between shards.
    for (name, value) in keel::db::moves::SERVER_SETTINGS {
        spec = spec.setting(name, value);
    }
    spec.fast_initdb = true;
    spec.log_file = log_file;
    spec
}

/// Creates and migrates the template databases the tests' databases are cloned from.
fn create_templates(cluster: &TestCluster) {
    let maintenance = cluster.maintenance_url();
    let catalog = cluster.url(CATALOG_TEMPLATE);
    let shard = cluster.url(SHARD_TEMPLATE);
    // Tests run inside a tokio runtime, which may not block on another: use a thread of our own.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            db::create_database(&maintenance, CATALOG_TEMPLATE, None).await.unwrap();
            db::create_database(&maintenance, SHARD_TEMPLATE, None).await.unwrap();
            db::migrate_all(&catalog, &vec![shard.clone(); SHARDS]).await.unwrap();
            for url in [&catalog, &shard] {
                keel::admin::queries::enable(url).await;
            }
        });
    })
    .join()
    .expect("migrating the template databases");
}

impl TestCluster {
    pub fn url(&self, database: &str) -> String {
        self.cluster.connection_string(database)
    }

    pub fn maintenance_url(&self) -> String {
        self.url("postgres")
    }
}

/// The cluster shared by every test in this binary.
pub fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        remove_stale_test_dirs();
        let base = scratch_root();
        let spec = test_spec(base.join("data"), base.join("run"), base.join("postgres.log"));
        let cluster = Cluster::start(spec).expect("starting the test PostgreSQL cluster");
        CLUSTER_PID.store(cluster.pid(), Ordering::SeqCst);
        let test_cluster = TestCluster { cluster };
        create_templates(&test_cluster);
        test_cluster
    })
}

/// How many hot standbys [`replicated_cluster`] has.
pub const STANDBYS: usize = 2;

/// A primary with [`STANDBYS`] hot standbys streaming from it (see the module's comment).
pub struct ReplicatedCluster {
    pub primary: TestCluster,
    standbys: Vec<TestStandby>,
}

/// A standby of the replicated cluster; `None` while killed.
struct TestStandby {
    spec: ClusterSpec,
    cluster: Mutex<Option<Cluster>>,
}

impl ReplicatedCluster {
    /// Standby `i`'s connection string for `database`.
    pub fn standby_url(&self, i: usize, database: &str) -> String {
        self.standbys[i].spec.connection_string(database)
    }

    /// Every standby's connection string for `database`, in standby order.
    pub fn standby_urls(&self, database: &str) -> Vec<String> {
        (0..STANDBYS).map(|i| self.standby_url(i, database)).collect()
    }

    fn is_running(&self, i: usize) -> bool {
        self.standbys[i].cluster.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// The replicated cluster shared by this binary's replica tests, started on first use and stopped
/// when the binary exits (as [`cluster`] is). Its primary has the migrated templates.
pub fn replicated_cluster() -> &'static ReplicatedCluster {
    static REPLICATED: OnceLock<ReplicatedCluster> = OnceLock::new();
    REPLICATED.get_or_init(|| {
        remove_stale_test_dirs();
        let base = scratch_root().join("replicated");
        let socket_dir = base.join("run");
        let mut spec = test_spec(base.join("primary"), socket_dir.clone(), base.join("primary.log"));
        spec.port = 5440;
        let primary = Cluster::start(spec).expect("starting the replicated cluster's primary");
        REPLICATED_PIDS[0].store(primary.pid(), Ordering::SeqCst);
        let primary = TestCluster { cluster: primary };
        create_templates(&primary);
        let standbys = (0..STANDBYS)
            .map(|i| {
                let mut spec = test_spec(
                    base.join(format!("standby{i}")),
                    socket_dir.clone(),
                    base.join(format!("standby{i}.log")),
                );
                spec.port = 5441 + i as u16;
                let source = primary.cluster.spec();
                spec.standby_of = Some(keel_pg::Standby {
                    primary: format!(
                        "host={} port={} user={}",
                        source.socket_dir.display(),
                        source.port,
                        source.superuser
                    ),
                    slot: format!("keel_test_standby_{i}"),
                });
                let cluster = Cluster::start(spec.clone()).expect("starting a standby of the replicated cluster");
                REPLICATED_PIDS[1 + i].store(cluster.pid(), Ordering::SeqCst);
                TestStandby { spec, cluster: Mutex::new(Some(cluster)) }
            })
            .collect();
        ReplicatedCluster { primary, standbys }
    })
}

/// Held by every test of the replicated cluster, for its whole length: see [`exclusive_replicas`].
static REPLICAS_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tests that load this 2-core machine heavily (a hundred shards, moves under load) and tests whose
/// assertions are about timing under faults (how far from a kill a duplicate may be, how many 503s
/// a restart may cost) do not run side by side: the first take it to write, the second to read.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// For a test that loads the machine heavily: none whose assertions are about timing runs beside it.
pub async fn heavy_load() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// For a test whose assertions are about timing under faults: no heavy test runs beside it.
pub async fn timing_sensitive() -> tokio::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}

/// Takes the replicated cluster for this test alone, first putting it back in order: a test that
/// failed while holding it may have left replay paused or a standby killed, so every standby is
/// restarted if down and has its replay resumed. (Here rather than when the guard drops: a guard
/// dropped while its test unwinds could not wait on the standbys, and this covers every way a test
/// can end.) Take it before anything else, and hold it until the test ends.
pub async fn exclusive_replicas() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = REPLICAS_LOCK.lock().await;
    let replicated = blocking(replicated_cluster).await;
    for i in 0..STANDBYS {
        if !replicated.is_running(i) {
            standby::restart(i).await;
        }
        let client = connect(&replicated.standby_url(i, "postgres")).await;
        client.execute("SELECT pg_wal_replay_resume()", &[]).await.unwrap();
    }
    guard
}

/// Runs blocking work (starting or killing servers) on a thread of its own, as a test's runtime
/// must not block.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

/// Control of the replicated cluster's standbys (numbered from 0), for tests holding
/// [`exclusive_replicas`].
pub mod standby {
    use super::*;

    /// Stops replay on standby `i` (it still receives WAL); returns once it has paused.
    pub async fn pause_replay(i: usize) {
        let client = connect(&replicated_cluster().standby_url(i, "postgres")).await;
        client.execute("SELECT pg_wal_replay_pause()", &[]).await.unwrap();
        // A pause is requested, and confirmed by the standby's startup process before it replays
        // anything more (even while it waits for WAL): once confirmed, nothing written on the
        // primary afterwards shows on it.
        let started = std::time::Instant::now();
        loop {
            let state: String = client.query_one("SELECT pg_get_wal_replay_pause_state()", &[]).await.unwrap().get(0);
            if state == "paused" {
                return;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "standby {i}: replay still {state}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Resumes replay on standby `i`.
    pub async fn resume_replay(i: usize) {
        let client = connect(&replicated_cluster().standby_url(i, "postgres")).await;
        client.execute("SELECT pg_wal_replay_resume()", &[]).await.unwrap();
    }

    /// Kills standby `i`'s postmaster (SIGKILL), as a crash would; returns once its processes are
    /// gone, so connections to it fail from then on. [`restart`] starts it again.
    pub async fn kill(i: usize) {
        let replicated = replicated_cluster();
        let cluster = replicated.standbys[i].cluster.lock().unwrap_or_else(|e| e.into_inner()).take();
        let cluster = cluster.unwrap_or_else(|| panic!("standby {i} is not running"));
        REPLICATED_PIDS[1 + i].store(0, Ordering::SeqCst);
        blocking(move || cluster.kill(std::time::Duration::from_secs(30))).await.expect("killing a standby");
    }

    /// Starts standby `i` again on its data (crash recovery, if it was killed); returns once it
    /// accepts connections. It then catches up with the primary through its slot.
    pub async fn restart(i: usize) {
        let replicated = replicated_cluster();
        let spec = replicated.standbys[i].spec.clone();
        let cluster = blocking(move || Cluster::start(spec)).await.expect("restarting a standby");
        REPLICATED_PIDS[1 + i].store(cluster.pid(), Ordering::SeqCst);
        let previous = replicated.standbys[i].cluster.lock().unwrap_or_else(|e| e.into_inner()).replace(cluster);
        assert!(previous.is_none(), "standby {i} was running already");
    }

    /// Waits (up to 30 s) until standby `i` has replayed everything the primary had written when the
    /// wait began.
    pub async fn wait_caught_up(i: usize) {
        let replicated = replicated_cluster();
        let primary = connect(&replicated.primary.maintenance_url()).await;
        let target: String = primary.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
        let standby = connect(&replicated.standby_url(i, "postgres")).await;
        let started = std::time::Instant::now();
        loop {
            let row = standby
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false), pg_last_wal_replay_lsn()::text",
                    &[&target],
                )
                .await
                .unwrap();
            if row.get::<_, bool>(0) {
                return;
            }
            let replayed: Option<String> = row.get(1);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "standby {i} has replayed up to {replayed:?}, not {target}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// A directory of this test binary's, removed when it exits (see the module's comment).
pub fn scratch_root() -> PathBuf {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function with no arguments; it runs once, at exit.
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(remove_scratch_root_at_exit);
    });
    test_dir(std::process::id())
}

static CLUSTER_PID: AtomicI32 = AtomicI32::new(0);
/// The replicated cluster's primary, then its standbys (0 while not running).
static REPLICATED_PIDS: [AtomicI32; 1 + STANDBYS] = [const { AtomicI32::new(0) }; 1 + STANDBYS];

/// Servers started by this binary that write under [`scratch_root`]: stopped before it is removed,
/// so that none of them writes into it again while it goes (their parent-death signal would only
/// come after this process is gone).
static SERVER_PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Registers a server child to stop at exit; its own thread waits for it (and so reaps it).
pub fn stop_at_exit(pid: i32) {
    SERVER_PIDS.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

/// Runs when the test binary exits, passing or failing: libtest returns from `main` or calls
/// `exit`, and both run `atexit` handlers.
extern "C" fn remove_scratch_root_at_exit() {
    let servers = SERVER_PIDS.lock().map(|p| p.clone()).unwrap_or_default();
    let clusters = std::iter::once(&CLUSTER_PID).chain(&REPLICATED_PIDS).map(|pid| pid.load(Ordering::SeqCst));
    // PostgreSQL's fast shutdown (SIGINT) writes a checkpoint; the others just stop.
    let stops = servers
        .iter()
        .map(|&pid| (pid, libc::SIGTERM))
        .chain(clusters.filter(|&pid| pid > 0).map(|pid| (pid, libc::SIGINT)));
    let stops: Vec<(i32, i32)> = stops.collect();
    for &(pid, signal) in &stops {
        // SAFETY: kill has no memory-safety preconditions; the pids are our own children.
        unsafe { libc::kill(pid, signal) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stops.iter().any(|(pid, _)| PathBuf::from(format!("/proc/{pid}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(scratch_root());
}

fn test_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("keel-test-{pid}"))
}

/// Clusters of earlier runs whose process is gone (their server stopped with it).
fn remove_stale_test_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("keel-test-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A unique name for this test's databases.
fn unique_name(kind: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("t{}_{}_{kind}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A set of databases (empty, unmigrated ones for `keel migrate` and `keel serve` tests), dropped
/// with it.
pub struct TestDatabases {
    pub catalog_url: String,
    pub shard_urls: Vec<String>,
    /// On the replicated cluster, each standby's URL for the catalogue; empty on the main cluster.
    pub catalog_replica_urls: Vec<String>,
    /// On the replicated cluster, per shard, each standby's URL for it; empty on the main cluster.
    pub shard_replica_urls: Vec<Vec<String>>,
    names: Vec<String>,
    /// The cluster they are on, to drop them there.
    maintenance_url: String,
}

impl TestDatabases {
    /// Fresh databases on the main cluster; `migrated` clones them from the migrated templates.
    pub async fn create(migrated: bool) -> TestDatabases {
        TestDatabases::create_on(cluster(), migrated).await
    }

    /// Fresh databases on the replicated cluster's primary, with their standbys' URLs; returns once
    /// every running standby has them. Hold [`exclusive_replicas`].
    pub async fn create_replicated(migrated: bool) -> TestDatabases {
        let replicated = blocking(replicated_cluster).await;
        let mut dbs = TestDatabases::create_on(&replicated.primary, migrated).await;
        let (catalog, shards) = (&dbs.names[0], &dbs.names[1..]);
        dbs.catalog_replica_urls = replicated.standby_urls(catalog);
        dbs.shard_replica_urls = shards.iter().map(|s| replicated.standby_urls(s)).collect();
        for i in (0..STANDBYS).filter(|&i| replicated.is_running(i)) {
            standby::wait_caught_up(i).await;
        }
        dbs
    }

    async fn create_on(cluster: &TestCluster, migrated: bool) -> TestDatabases {
        let maintenance = cluster.maintenance_url();
        let catalog = unique_name("catalog");
        let shards: Vec<String> = (0..SHARDS).map(|i| unique_name(&format!("shard{i}"))).collect();
        let template = |t: &'static str| migrated.then_some(t);
        db::create_database(&maintenance, &catalog, template(CATALOG_TEMPLATE)).await.unwrap();
        for shard in &shards {
            db::create_database(&maintenance, shard, template(SHARD_TEMPLATE)).await.unwrap();
        }
        TestDatabases {
            catalog_url: cluster.url(&catalog),
            shard_urls: shards.iter().map(|s| cluster.url(s)).collect(),
            catalog_replica_urls: Vec::new(),
            shard_replica_urls: Vec::new(),
            names: std::iter::once(catalog).chain(shards).collect(),
            maintenance_url: maintenance,
        }
    }

    /// A direct connection to shard `i`, for looking behind the API.
    pub async fn shard(&self, i: usize) -> tokio_postgres::Client {
        connect(&self.shard_urls[i]).await
    }

    pub async fn catalog(&self) -> tokio_postgres::Client {
        connect(&self.catalog_url).await
    }
}

/// Wallets on a shard whose balance is not their deposits less their debits.
pub async fn unbalanced_wallets(shard: &tokio_postgres::Client) -> i64 {
    shard
        .query_one(
            "SELECT count(*) FROM wallets w WHERE balance_cents <>
               (SELECT coalesce(sum(amount_cents), 0) FROM wallet_deposits d WHERE d.user_id = w.user_id)
             - (SELECT coalesce(sum(amount_cents), 0) FROM wallet_debits d WHERE d.user_id = w.user_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

impl Drop for TestDatabases {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.names);
        let maintenance = self.maintenance_url.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                for name in names {
                    db::drop_database(&maintenance, &name).await.unwrap();
                }
            });
        })
        .join()
        .expect("dropping the test databases");
    }
}

/// A running application on a port of its own, with its own databases.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub dbs: TestDatabases,
    pub databases: std::sync::Arc<Databases>,
    pub config: std::sync::Arc<Config>,
}

/// A second API node over a test app's databases.
pub struct Node {
    pub address: String,
    stop: keel::shutdown::Stop,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Node {
    /// A graceful stop: drains requests, and the writes whose clients left.
    pub async fn stop(self) {
        self.stop.trigger();
        self.task.await.unwrap().unwrap();
    }
}

/// Workers running in the test's process (as `keel up` runs them), until stopped.
pub struct Workers {
    stop: keel::shutdown::Stop,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Workers {
    pub async fn stop(self) {
        self.stop.trigger();
        self.task.await.unwrap().unwrap();
    }

    /// Ends them at once, wherever they are, as a killed process would: every connection they
    /// held is dropped (transactions in progress roll back; prepared ones stay).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(|_| {}).await
    }

    /// An app whose configuration `configure` adjusts first (the workers started later use it too).
    pub async fn spawn_with(configure: impl FnOnce(&mut Config)) -> TestApp {
        TestApp::spawn_on(TestDatabases::create(true).await, configure).await
    }

    /// An app over databases on the replicated cluster, reading from both standbys
    /// (`catalog_replica_urls`, `shard_replica_urls`, set before `configure` runs, which may change
    /// them). Take [`exclusive_replicas`] first.
    pub async fn spawn_replicated(configure: impl FnOnce(&mut Config)) -> TestApp {
        let dbs = TestDatabases::create_replicated(true).await;
        let (catalog_replicas, shard_replicas) = (dbs.catalog_replica_urls.clone(), dbs.shard_replica_urls.clone());
        TestApp::spawn_on(dbs, |config| {
            config.catalog_replica_urls = catalog_replicas;
            config.shard_replica_urls = shard_replicas;
            configure(config);
        })
        .await
    }

    async fn spawn_on(dbs: TestDatabases, configure: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = Config {
            data_dir: scratch_root().join(unique_name("data")),
            // Test peers (webhook receivers) listen on loopback.
            webhook_allow_loopback: Some(true),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: Some(ADMIN_TOKEN.to_owned()),
            catalog_url: Some(dbs.catalog_url.clone()),
            shard_urls: dbs.shard_urls.clone(),
            db_pool_size: 8,
            worker_pool_size: 8,
            debug_headers: true,
            // Tests seed freely from one address; the rate-limit tests turn the limits on.
            rate_limit: false,
            token_keys: vec![keel::http::auth::tokens::TokenKey::parse(TOKEN_KEYS).unwrap()],
            // Most tests check out without verifying an address first; the accounts tests turn it on.
            checkout_requires_verified_email: false,
            ..Config::default()
        };
        if crate::peers::nats_enabled() {
            config.nats_url = Some(crate::peers::nats_url().to_owned());
            // A stream of this test's own: tests share the server, not their events.
            config.nats_prefix = unique_name("n");
        }
        configure(&mut config);
        let databases = Databases::open(&dbs.catalog_url, &dbs.shard_urls, &config).await.unwrap();
        let app = Application::build(config.clone(), databases, ADMIN_TOKEN).await.unwrap();
        let address = format!("http://{}", app.local_addr());
        let databases = app.databases();
        tokio::spawn(app.run_until_stopped(std::future::pending()));
        TestApp { address, client: reqwest::Client::new(), dbs, databases, config: std::sync::Arc::new(config) }
    }

    /// Another node serving the same databases (as a second `keel serve` behind a load balancer
    /// would), in this process; stop it with [`Node::stop`].
    pub async fn second_node(&self) -> Node {
        let config = Config { listen: "127.0.0.1:0".parse().unwrap(), ..(*self.config).clone() };
        let databases = Databases::open(&self.dbs.catalog_url, &self.dbs.shard_urls, &config).await.unwrap();
        let app = Application::build(config, databases, ADMIN_TOKEN).await.unwrap();
        let address = format!("http://{}", app.local_addr());
        let stop = keel::shutdown::Stop::new();
        let task = tokio::spawn(app.run_until_stopped(stop.stopped()));
        Node { address, stop, task }
    }

    /// Starts a set of workers over this app's databases; call more than once for competing workers.
    /// As in `keel up`, they have pools of their own (`worker_pool_size`), never the app's.
    pub fn start_workers(&self) -> Workers {
        let stop = keel::shutdown::Stop::new();
        let (config, stopped) = (self.config.clone(), stop.stopped());
        let (catalog, shards) = (self.dbs.catalog_url.clone(), self.dbs.shard_urls.clone());
        let task = tokio::spawn(async move {
            let pools = keel::jobs::open_databases(&catalog, &shards, &config).await.map_err(|e| e.to_string())?;
            keel::jobs::run_workers(std::sync::Arc::new(pools), config, stopped).await
        });
        Workers { stop, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.client.get(self.url(path))
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.client.post(self.url(path))
    }

    pub fn put(&self, path: &str) -> RequestBuilder {
        self.client.put(self.url(path))
    }

    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.client.patch(self.url(path))
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.client.delete(self.url(path))
    }

    pub fn admin(&self, builder: RequestBuilder) -> RequestBuilder {
        builder.bearer_auth(ADMIN_TOKEN)
    }

    /// Signs a user up; returns `(id, token)`.
    pub async fn create_user(&self, name: &str) -> (String, String) {
        let email = format!("{}-{}@example.org", name.to_lowercase().replace(' ', "."), uuid::Uuid::now_v7().simple());
        let body =
            expect_json(self.post("/v1/users").json(&json!({ "name": name, "email": email })).send().await, 201).await;
        (body["id"].as_str().unwrap().to_owned(), body["token"].as_str().unwrap().to_owned())
    }

    /// A connection to the shard holding `user`.
    pub async fn shard_of(&self, user: &str) -> tokio_postgres::Client {
        for i in 0..SHARDS {
            let shard = self.dbs.shard(i).await;
            let found = shard.query_opt("SELECT 1 FROM users WHERE id = $1::text::uuid", &[&user]).await.unwrap();
            if found.is_some() {
                return shard;
            }
        }
        panic!("no shard holds user {user}");
    }

    /// Creates a product; returns its id.
    pub async fn create_product(&self, sku: &str, price_cents: i64, stock: i64) -> String {
        let body = json!({ "sku": sku, "name": format!("Product {sku}"), "description": "A thing", "price_cents": price_cents, "stock": stock });
        let product = expect_json(self.admin(self.post("/v1/products")).json(&body).send().await, 201).await;
        product["id"].as_str().unwrap().to_owned()
    }

    /// Credits the wallet of the user whose token this is, as the admin does (users cannot deposit):
    /// a user's token starts with the user's id.
    pub async fn deposit(&self, token: &str, key: &str, amount: i64) -> Response {
        self.deposit_for(&user_of(token), key, amount).await
    }

    /// The admin's deposit for the user with id `user` (any text: unknown and malformed ids too).
    pub async fn deposit_for(&self, user: &str, key: &str, amount: i64) -> Response {
        self.admin(self.post(&format!("/v1/admin/users/{user}/deposits")))
            .header("idempotency-key", key)
            .json(&json!({ "amount_cents": amount }))
            .send()
            .await
            .unwrap()
    }

    /// Invariants that must hold after any test, checked behind the API: every wallet's balance is
    /// its deposits less its debits, an order is confirmed exactly when it was debited (once, for its
    /// total), and every user's e-mail is claimed for that user in the catalogue.
    pub async fn check_invariants(&self) {
        let catalog = self.dbs.catalog().await;
        for i in 0..SHARDS {
            let shard = self.dbs.shard(i).await;
            let unbalanced = unbalanced_wallets(&shard).await;
            assert_eq!(unbalanced, 0, "shard {i} has wallets whose balance is not the sum of their ledger");
            let mismatched: i64 = shard
                .query_one(
                    "SELECT count(*) FROM orders o LEFT JOIN wallet_debits d ON d.order_id = o.id
                     WHERE (o.status = 'confirmed') <> (d.order_id IS NOT NULL)
                        OR (d.order_id IS NOT NULL AND d.amount_cents <> o.total_cents)",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(mismatched, 0, "shard {i} has orders whose status disagrees with their debit");
            for row in shard.query("SELECT id, email FROM users", &[]).await.unwrap() {
                let (id, email): (uuid::Uuid, String) = (row.get(0), row.get(1));
                let claim = catalog.query_opt("SELECT user_id FROM user_emails WHERE email = $1", &[&email]).await;
                let owner: Option<uuid::Uuid> = claim.unwrap().map(|r| r.get(0));
                assert_eq!(owner, Some(id), "{email} is not claimed for its user");
            }
        }
    }
}

impl TestApp {
    /// After the workers ran: no job is left pending or running in any database, and every failed
    /// order's stock was given back.
    /// Waits (up to 30 s) for the follow-ups of the work a test did (e-mail, search, webhooks).
    pub async fn check_queues_drained(&self) {
        let started = std::time::Instant::now();
        loop {
            let mut left = Vec::new();
            for (name, url) in std::iter::once(("catalogue".to_owned(), &self.dbs.catalog_url))
                .chain(self.dbs.shard_urls.iter().enumerate().map(|(i, url)| (format!("shard {i}"), url)))
            {
                let rows = connect(url)
                    .await
                    .query("SELECT kind, state, last_error FROM keel_jobs WHERE state IN ('pending', 'running')", &[])
                    .await
                    .unwrap();
                left.extend(rows.iter().map(|r| {
                    format!(
                        "{name}: {} {} {:?}",
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, Option<String>>(2)
                    )
                }));
            }
            if let Some(url) = &self.config.nats_url {
                let stream = keel_outbox::JetStream::connect(url, &self.config.nats_prefix).await.unwrap();
                let backlog = stream.backlog().await.unwrap();
                if backlog > 0 {
                    left.push(format!("{backlog} events in {}", stream.stream_name()));
                }
            }
            if left.is_empty() {
                break;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "jobs left unprocessed: {left:#?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for i in 0..SHARDS {
            let shard = self.dbs.shard(i).await;
            let failed: Vec<uuid::Uuid> = shard
                .query("SELECT id FROM orders WHERE status = 'failed'", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let catalog = self.dbs.catalog().await;
            let held: i64 = catalog
                .query_one(
                    "SELECT count(*) FROM stock_reservations WHERE order_id = ANY($1) AND NOT released",
                    &[&failed],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(held, 0, "failed orders on shard {i} still hold stock");
        }
        // Every product's reserved and sold units are its reservations held and sold.
        let unbalanced: Vec<String> = self
            .dbs
            .catalog()
            .await
            .query(
                "SELECT i.product_id::text FROM inventory i
                 LEFT JOIN (SELECT product_id, sum(quantity) FILTER (WHERE state = 'held') AS held,
                                   sum(quantity) FILTER (WHERE state = 'sold') AS sold
                            FROM stock_reservations GROUP BY product_id) r ON r.product_id = i.product_id
                 WHERE i.reserved <> coalesce(r.held, 0) OR i.sold <> coalesce(r.sold, 0)",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(unbalanced.is_empty(), "products whose stock disagrees with their reservations: {unbalanced:?}");
    }

    /// Polls an order until the saga has decided it.
    /// The product's inventory once nothing is reserved any more: an order's sale or release
    /// follows its decision, in a transaction of its own.
    pub async fn settled_inventory(&self, product: &str) -> Value {
        let started = std::time::Instant::now();
        loop {
            let inventory = expect_json(self.get(&format!("/v1/products/{product}/inventory")).send().await, 200).await;
            if inventory["reserved"] == 0 {
                return inventory;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "still reserved: {inventory}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_for_order(&self, token: &str, location: &str) -> Value {
        let started = std::time::Instant::now();
        loop {
            let order = expect_json(self.get(location).bearer_auth(token).send().await, 200).await;
            if order["status"] != "pending" {
                return order;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "order still pending: {order}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Puts `quantity` of `product` in the cart of the user whose token this is.
pub async fn add_to_cart(app: &TestApp, token: &str, product: &str, quantity: i64) {
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(token).json(&json!({ "quantity": quantity }));
    expect_json(put.send().await, 200).await;
}

/// Checks the cart out with the Idempotency-Key `key`; returns the order's location.
pub async fn checkout(app: &TestApp, token: &str, key: &str) -> String {
    let response = app.post("/v1/checkout").bearer_auth(token).header("idempotency-key", key).send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    expect_json(Ok(response), 202).await;
    location
}

/// Asserts the status and returns the JSON body, showing the body when the status is wrong.
pub async fn expect_json(response: reqwest::Result<Response>, status: u16) -> Value {
    let response = response.expect("the request was answered");
    let actual = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(actual, StatusCode::from_u16(status).unwrap(), "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}

/// Asserts a problem+json error with this status and a detail that mentions `mentions`.
pub async fn expect_problem(response: reqwest::Result<Response>, status: u16, mentions: &str) -> Value {
    let response = response.expect("the request was answered");
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let actual = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "unexpected status; body: {text}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"), "body: {text}");
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(problem["status"], status, "{problem}");
    assert!(problem["type"].as_str().is_some_and(|t| t.starts_with("/problems/")), "{problem}");
    assert!(problem["title"].as_str().is_some_and(|t| !t.is_empty()), "{problem}");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.to_lowercase().contains(&mentions.to_lowercase()), "detail {detail:?} should mention {mentions:?}");
    problem
}

/// The number of database queries the server says a response took (debug header).
pub fn db_queries(response: &Response) -> u32 {
    response.headers()["keel-db-queries"].to_str().unwrap().parse().unwrap()
}
