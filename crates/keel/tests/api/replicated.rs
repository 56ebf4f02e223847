//! The replicated test cluster (see `helpers`): its standbys follow the primary, and the controls
//! tests use on them do what they say.

use crate::helpers::{connect, exclusive_replicas, standby, TestApp, STANDBYS};

/// How many rows with this id a database has.
async fn rows(url: &str, id: i32) -> i64 {
    let client = connect(url).await;
    client.query_one("SELECT count(*) FROM replication_probe WHERE id = $1", &[&id]).await.unwrap().get(0)
}

/// The table these tests watch the standbys through, with row 1 in it.
async fn create_probe(primary: &tokio_postgres::Client) {
    let sql = "CREATE TABLE replication_probe (id int PRIMARY KEY); INSERT INTO replication_probe VALUES (1)";
    primary.batch_execute(sql).await.unwrap();
}

#[tokio::test]
async fn standbys_follow_the_primary_and_a_paused_one_falls_behind_until_resumed() {
    let _replicas = exclusive_replicas().await;
    let app = TestApp::spawn_replicated(|_| {}).await;
    assert_eq!(app.config.catalog_replica_urls, app.dbs.catalog_replica_urls);
    assert_eq!(app.config.catalog_replica_urls.len(), STANDBYS);
    assert_eq!(app.config.shard_replica_urls.len(), app.dbs.shard_urls.len());
    assert!(app.config.shard_replica_urls.iter().all(|urls| urls.len() == STANDBYS));
    let standbys = app.dbs.catalog_replica_urls.clone();

    let primary = app.dbs.catalog().await;
    create_probe(&primary).await;
    for (i, url) in standbys.iter().enumerate() {
        standby::wait_caught_up(i).await;
        assert_eq!(rows(url, 1).await, 1, "standby {i} has the row");
        let in_recovery: bool = connect(url).await.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
        assert!(in_recovery, "standby {i} is a standby");
    }

    standby::pause_replay(0).await;
    primary.execute("INSERT INTO replication_probe VALUES (2)", &[]).await.unwrap();
    standby::wait_caught_up(1).await;
    assert_eq!(rows(&standbys[1], 2).await, 1, "standby 1 replays on");
    assert_eq!(rows(&standbys[0], 2).await, 0, "standby 0 is paused");

    standby::resume_replay(0).await;
    standby::wait_caught_up(0).await;
    assert_eq!(rows(&standbys[0], 2).await, 1, "standby 0 caught up");
}

/// A standby killed outright comes back on its data and catches up with what it missed; and a test
/// that leaves a standby paused or killed leaves the next test a healthy cluster.
#[tokio::test]
async fn a_killed_standby_restarts_and_catches_up() {
    let replicas = exclusive_replicas().await;
    let app = TestApp::spawn_replicated(|_| {}).await;
    let standbys = app.dbs.catalog_replica_urls.clone();
    let primary = app.dbs.catalog().await;
    create_probe(&primary).await;

    standby::kill(1).await;
    assert!(tokio_postgres::connect(&standbys[1], tokio_postgres::NoTls).await.is_err(), "standby 1 is down");
    primary.execute("INSERT INTO replication_probe VALUES (2)", &[]).await.unwrap();
    standby::restart(1).await;
    standby::wait_caught_up(1).await;
    assert_eq!(rows(&standbys[1], 2).await, 1, "standby 1 caught up with what it missed");

    // Left broken, as a failing test might leave it: the next holder finds it mended.
    standby::pause_replay(0).await;
    standby::kill(1).await;
    drop(replicas);
    let _replicas = exclusive_replicas().await;
    primary.execute("INSERT INTO replication_probe VALUES (3)", &[]).await.unwrap();
    for (i, url) in standbys.iter().enumerate() {
        standby::wait_caught_up(i).await;
        assert_eq!(rows(url, 3).await, 1, "standby {i} replays again");
    }
}

/// `keel up --replicas 1`: the standby is copied from the primary on first start and follows it;
/// both stop cleanly with keel; the next start resumes it on its data; and a start with fewer
/// replicas drops the slot the standby no longer uses.
#[tokio::test]
async fn keel_up_runs_a_replica_that_follows_across_a_clean_restart() {
    use crate::helpers::{expect_json, ADMIN_TOKEN};
    use crate::processes::{scratch_dir, Keel};
    use serde_json::json;
    use std::path::Path;
    use std::time::{Duration, Instant};

    let scratch = scratch_dir("up-replicas");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let log = scratch.join("keel.log");
    let env = [("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned())];
    let client = reqwest::Client::new();
    let (primary_dir, replica_dir) = (data_dir.join("postgres"), data_dir.join("postgres-replica-1"));
    // The connection strings keel up routes reads with (its sockets are in DATA_DIR/run).
    let on = |port: u16, db: &str| format!("host={} port={port} user=keel dbname={db}", data_dir.join("run").display());
    let (primary_catalog, replica_catalog) = (on(5432, "keel_catalog"), on(5433, "keel_catalog"));
    let create_product = |address: String, sku: &'static str| {
        let request = client.post(format!("{address}/v1/products")).bearer_auth(ADMIN_TOKEN);
        let body = json!({ "sku": sku, "name": sku, "price_cents": 1, "stock": 2 });
        async move { expect_json(request.json(&body).send().await, 201).await }
    };
    // Waits until the replica has the product (it follows asynchronously).
    let replicated = |sku: &'static str| {
        let url = replica_catalog.clone();
        async move {
            let started = Instant::now();
            loop {
                let replica = crate::helpers::connect(&url).await;
                let in_recovery: bool = replica.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
                assert!(in_recovery, "the replica is a standby");
                let found: i64 =
                    replica.query_one("SELECT count(*) FROM products WHERE sku = $1", &[&sku]).await.unwrap().get(0);
                if found == 1 {
                    return;
                }
                assert!(started.elapsed() < Duration::from_secs(20), "{sku} never reached the replica");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let postmaster_gone = |pgdata: &Path| {
        let pid: Option<i32> = std::fs::read_to_string(pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok());
        pid.is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let slots = |url: String| async move {
        let primary = crate::helpers::connect(&url).await;
        let rows = primary.query("SELECT slot_name::text FROM pg_replication_slots ORDER BY 1", &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };

    let mut keel = Keel::start(&["up", "--data-dir", &data_arg, "--replicas", "1"], &env, &log);
    let first_start = keel.wait_ready(Duration::from_secs(60)).await;
    eprintln!("keel up --replicas 1: first start ready in {first_start:?}");
    assert!(replica_dir.join("standby.signal").exists(), "the replica is a standby");
    assert_eq!(slots(primary_catalog.clone()).await, ["keel_replica_1"]);
    create_product(keel.address.clone(), "BEFORE").await;
    replicated("BEFORE").await;

    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
    for pgdata in [&primary_dir, &replica_dir] {
        assert!(postmaster_gone(pgdata), "{} still running after keel stopped", pgdata.display());
    }
    let replica_log = || std::fs::read_to_string(data_dir.join("postgres-replica-1.log")).unwrap_or_default();
    assert!(replica_log().contains("database system is shut down"), "{}", replica_log());

    let before_restart = replica_log().len();
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg, "--replicas", "1"], &env, &log);
    keel.wait_ready(Duration::from_secs(60)).await;
    let base_backups = keel.log_text().matches("taking a base backup").count();
    assert_eq!(base_backups, 1, "the replica was resumed on its data, not copied again");
    let restart_log = replica_log()[before_restart..].to_owned();
    assert!(!restart_log.contains("not properly shut down"), "crash recovery after a clean stop:\n{restart_log}");
    let primary = crate::helpers::connect(&primary_catalog).await;
    let kept: i64 = primary.query_one("SELECT count(*) FROM products WHERE sku = 'BEFORE'", &[]).await.unwrap().get(0);
    assert_eq!(kept, 1, "the primary kept the product");
    drop(primary);
    replicated("BEFORE").await;
    create_product(keel.address.clone(), "AFTER").await;
    replicated("AFTER").await;

    keel.signal(libc::SIGINT);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
    for pgdata in [&primary_dir, &replica_dir] {
        assert!(postmaster_gone(pgdata), "{} still running after keel stopped", pgdata.display());
    }

    // Without replicas, the unused slot (which would keep WAL for ever) is dropped.
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &env, &log);
    keel.wait_ready(Duration::from_secs(60)).await;
    assert!(keel.log_text().contains("dropping the replication slot"), "log:\n{}", keel.log_text());
    assert!(slots(primary_catalog.clone()).await.is_empty());
    assert!(!replica_dir.exists(), "the replica's data, useless without its slot, is removed");
    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
}

/// A standby whose copy fails leaves nothing a later start would take for a cluster; one whose
/// earlier copy died after creating its slot reuses the slot.
#[tokio::test]
async fn a_failed_standby_copy_leaves_nothing_behind_and_a_leftover_slot_is_reused() {
    let _replicas = exclusive_replicas().await;
    let replicated = crate::helpers::replicated_cluster();
    let dir = crate::helpers::scratch_root().join(format!("standby-copies-{}", std::process::id()));
    let spec = |name: &str, primary: String, slot: &str| {
        let mut spec = keel_pg::ClusterSpec::new(dir.join(name), dir.join("run"));
        spec.port = 5450;
        spec.fast_initdb = true;
        spec.settings = vec![("listen_addresses".into(), "".into()), ("max_connections".into(), "500".into())];
        // A standby refuses to start with less of these than its primary has.
        spec.settings.extend(keel::db::moves::SERVER_SETTINGS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        spec.standby_of = Some(keel_pg::Standby { primary, slot: slot.to_owned() });
        spec
    };
    let start = |spec: keel_pg::ClusterSpec| tokio::task::spawn_blocking(move || keel_pg::Cluster::start(spec));

    // Nothing answers there: the copy fails, and neither a cluster nor a partial copy is left.
    let unreachable = spec("unreachable", format!("host={} port=1 user=keel", dir.display()), "keel_test_unreachable");
    let error = start(unreachable.clone()).await.unwrap().unwrap_err().to_string();
    assert!(error.contains("pg_basebackup"), "{error}");
    assert!(!unreachable.data_dir.join("PG_VERSION").exists());
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|name| name.to_string_lossy().contains("partial")), "{left:?}");

    // The slot exists already, as if an earlier copy had died after creating it.
    let primary = connect(&replicated.primary.maintenance_url()).await;
    primary.execute("SELECT pg_create_physical_replication_slot('keel_test_leftover')", &[]).await.unwrap();
    let leftover = spec("leftover", replicated.primary.url("postgres"), "keel_test_leftover");
    let cluster = start(leftover.clone()).await.unwrap().expect("a standby over the leftover slot");
    let standby = connect(&leftover.connection_string("postgres")).await;
    let in_recovery: bool = standby.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(in_recovery);
    // It streams through the slot (once its walreceiver has connected).
    let started = std::time::Instant::now();
    loop {
        let query = "SELECT active FROM pg_replication_slots WHERE slot_name = 'keel_test_leftover'";
        if primary.query_one(query, &[]).await.unwrap().get::<_, bool>(0) {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the standby does not use the slot");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(standby);
    tokio::task::spawn_blocking(move || cluster.stop(std::time::Duration::from_secs(30))).await.unwrap().unwrap();
    // Its walsender goes as the standby disconnects; then the slot can go.
    let started = std::time::Instant::now();
    while primary.execute("SELECT pg_drop_replication_slot('keel_test_leftover')", &[]).await.is_err() {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the slot stayed active");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
