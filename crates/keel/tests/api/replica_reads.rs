//! Reads routed to streaming replicas by each kind's budget and each replica's measured lag, against
//! the replicated test cluster (a primary and two hot standbys, see `helpers`): stale only within the
//! budget, strong kinds always current, an owner always reading their own writes on any node, a
//! replica's failure costing no request, and replicas taking most of the reads they may take.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::consistency::DataKind;
use serde_json::{json, Value};

use crate::helpers::{exclusive_replicas, expect_json, standby, TestApp, ADMIN_TOKEN, STANDBYS};
use crate::peers::RedisServer;
use crate::two_nodes::cache_status;

/// `GET /v1/admin/replicas` of the node at `base`.
async fn replicas(app: &TestApp, base: &str) -> Value {
    let response = app.client.get(format!("{base}/v1/admin/replicas")).bearer_auth(ADMIN_TOKEN).send().await;
    expect_json(response, 200).await
}

/// The replica `name` of `database` as the node at `base` sees it.
async fn replica(app: &TestApp, base: &str, database: &str, name: &str) -> Value {
    let all = replicas(app, base).await;
    let databases = all["databases"].as_array().unwrap();
    let db = databases.iter().find(|d| d["database"] == database).unwrap_or_else(|| panic!("{database} in {all}"));
    db["replicas"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap_or_else(|| panic!("{name}"))
}

/// Waits until every standby has replayed what the primary has written, and the node at `base` sees
/// every replica of every database up and less than 500 ms behind.
async fn wait_until_fresh(app: &TestApp, base: &str) {
    for i in 0..STANDBYS {
        standby::wait_caught_up(i).await;
    }
    let started = Instant::now();
    loop {
        let all = replicas(app, base).await;
        let every: Vec<&Value> =
            all["databases"].as_array().unwrap().iter().flat_map(|d| d["replicas"].as_array().unwrap()).collect();
        let fresh = |r: &&Value| r["up"] == true && r["lag_ms"].as_u64().is_some_and(|lag| lag < 500);
        if !every.is_empty() && every.iter().all(fresh) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "replicas not fresh within 10 s: {all}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `[primary_reads, replica_reads]` of a kind on the node at `base`.
async fn reads_of(app: &TestApp, base: &str, kind: &str) -> [u64; 2] {
    let response = app.client.get(format!("{base}/v1/admin/consistency")).bearer_auth(ADMIN_TOKEN).send().await;
    let table = expect_json(response, 200).await;
    let row = table["kinds"].as_array().unwrap().iter().find(|k| k["kind"] == kind).unwrap().clone();
    [row["primary_reads"].as_u64().unwrap(), row["replica_reads"].as_u64().unwrap()]
}

fn age(response: &reqwest::Response) -> u64 {
    response.headers()["age"].to_str().unwrap().parse().unwrap()
}

async fn pause_all() {
    for i in 0..STANDBYS {
        standby::pause_replay(i).await;
    }
}

async fn resume_all() {
    for i in 0..STANDBYS {
        standby::resume_replay(i).await;
    }
}

/// Replay paused on every replica, an owner changes their profile: they see it at once through
/// another node (their floor is past every replica, so the primary answers); anyone else may see the
/// old profile — from a replica, or cached from one — for at most the profile budget, then the new.
#[tokio::test]
async fn a_profile_change_is_read_at_once_by_its_owner_and_within_the_budget_by_others() {
    let _replicas = exclusive_replicas().await;
    let redis = RedisServer::start().await;
    let url = redis.url();
    let budget = Duration::from_secs(2);
    let app = TestApp::spawn_replicated(move |config| {
        config.redis_url = Some(url);
        config.consistency_budgets = vec![(DataKind::Profile, budget)];
    })
    .await;
    let node = app.second_node().await;
    let bases = [app.address.clone(), node.address.clone()];
    let (owner, token) = app.create_user("Owner").await;
    expect_json(
        app.patch(&format!("/v1/users/{owner}")).bearer_auth(&token).json(&json!({"bio": "before"})).send().await,
        200,
    )
    .await;
    for base in &bases {
        wait_until_fresh(&app, base).await;
    }
    let path = format!("/v1/users/{owner}");
    let first = app.client.get(format!("{}{path}", bases[1])).send().await.unwrap();
    assert_eq!(cache_status(&first), "keel; fwd=miss; stored; detail=replica", "a caught-up replica serves others");
    assert_eq!(expect_json(Ok(first), 200).await["bio"], "before");

    pause_all().await;
    let changed = app.patch(&path).bearer_auth(&token).json(&json!({"bio": "after"})).send().await;
    expect_json(changed, 200).await;
    let written = Instant::now();

    let own = app.client.get(format!("{}{path}", bases[1])).bearer_auth(&token).send().await.unwrap();
    assert_eq!(cache_status(&own), "keel; fwd=bypass; detail=owner");
    assert_eq!(expect_json(Ok(own), 200).await["bio"], "after", "the owner reads their write at once on another node");

    let (mut old_from_replica, mut last) = (0, [None, None]);
    while written.elapsed() < budget + Duration::from_secs(2) {
        for (i, base) in bases.iter().enumerate() {
            let asked = written.elapsed();
            let response = app.client.get(format!("{base}{path}")).send().await.unwrap();
            let (status, served_age) = (cache_status(&response), age(&response));
            let bio = expect_json(Ok(response), 200).await["bio"].as_str().unwrap().to_owned();
            assert!(served_age <= budget.as_secs(), "Age {served_age} s is past the {budget:?} budget ({status})");
            if bio == "before" {
                // Served no later than the write's commit plus the budget: asked before that.
                assert!(asked <= budget, "the old profile was served {asked:?} after the change ({status})");
                old_from_replica += usize::from(status.contains("detail=replica"));
            }
            last[i] = Some(bio);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(old_from_replica > 0, "a paused replica within the budget served the old profile at first");
    assert_eq!(last, [Some("after".to_owned()), Some("after".to_owned())], "then every node serves the new one");
    resume_all().await;
    node.stop().await;
}

/// Without a shared tier no node can know another's read-your-writes floors: the owner's own
/// profile comes from the primary, and so is never behind their write.
#[tokio::test]
async fn without_redis_the_owner_reads_their_own_profile_from_the_primary() {
    let _replicas = exclusive_replicas().await;
    let app = TestApp::spawn_replicated(|_| {}).await;
    let node = app.second_node().await;
    let (owner, token) = app.create_user("Owner").await;
    wait_until_fresh(&app, &node.address).await;
    pause_all().await;
    let path = format!("/v1/users/{owner}");
    expect_json(app.patch(&path).bearer_auth(&token).json(&json!({"bio": "after"})).send().await, 200).await;
    let before = reads_of(&app, &node.address, "profile").await;
    let own = app.client.get(format!("{}{path}", node.address)).bearer_auth(&token).send().await;
    assert_eq!(expect_json(own, 200).await["bio"], "after");
    let after = reads_of(&app, &node.address, "profile").await;
    assert_eq!([after[0] - before[0], after[1] - before[1]], [1, 0], "one read, from the primary");
    resume_all().await;
    node.stop().await;
}

/// Wallets, stock and orders are strong: with every replica paused, a deposit, a checkout and the
/// order's decision are read back as they are.
#[tokio::test]
async fn strong_reads_are_current_whatever_the_replicas_do() {
    let _replicas = exclusive_replicas().await;
    let app = TestApp::spawn_replicated(|_| {}).await;
    let workers = app.start_workers();
    let (user, token) = app.create_user("Buyer").await;
    let product = app.create_product("STRONG-1", 1000, 5).await;
    wait_until_fresh(&app, &app.address).await;
    pause_all().await;

    expect_json(Ok(app.deposit_for(&user, "d1", 5000).await), 201).await;
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 5000, "{wallet}");
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({"quantity": 2}));
    expect_json(put.send().await, 200).await;
    let response = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "c1").send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    expect_json(Ok(response), 202).await;
    let order = app.wait_for_order(&token, &location).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 3000, "{wallet}");
    assert_eq!(app.settled_inventory(&product).await["stock"], 3);
    for (kind, at_least) in [("wallet", 2), ("order", 1), ("inventory", 1)] {
        let [primary, replica] = reads_of(&app, &app.address, kind).await;
        assert!(
            primary >= at_least && replica == 0,
            "{kind}: {primary} reads from the primary, {replica} from replicas"
        );
    }
    resume_all().await;
    workers.stop().await;
}

/// A replica killed while clients read: no request fails, the replica is marked down and reads move
/// to the other replica or the primary; restarted, it is found up and takes reads again in seconds.
#[tokio::test]
async fn a_replica_killed_under_read_load_costs_no_request_and_is_used_again_once_back() {
    let _replicas = exclusive_replicas().await;
    let app = Arc::new(TestApp::spawn_replicated(|_| {}).await);
    for i in 0..5 {
        app.create_product(&format!("KILL-{i}"), 100 + i, 1).await;
    }
    wait_until_fresh(&app, &app.address).await;
    let (stop, served, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (app, stop, served, failed) = (app.clone(), stop.clone(), served.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let status = app.get("/v1/products?limit=5").send().await.map(|r| r.status().as_u16()).unwrap_or(0);
                    match status {
                        200 => served.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    standby::kill(0).await;
    let killed = Instant::now();
    while replica(&app, &app.address, "catalog", "replica_1").await["up"] != false {
        assert!(killed.elapsed() < Duration::from_secs(5), "the killed replica is marked down within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("killed replica marked down after {:?}", killed.elapsed());
    let other_before = replica(&app, &app.address, "catalog", "replica_2").await["reads"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other_after = replica(&app, &app.address, "catalog", "replica_2").await["reads"].as_u64().unwrap();
    assert!(other_after > other_before, "the other replica takes the reads");

    standby::restart(0).await;
    let restarted = Instant::now();
    let back_before = replica(&app, &app.address, "catalog", "replica_1").await["reads"].as_u64().unwrap();
    loop {
        let back = replica(&app, &app.address, "catalog", "replica_1").await;
        if back["up"] == true && back["reads"].as_u64().unwrap() > back_before {
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(5), "the restarted replica is used again within 5 s: {back}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("restarted replica used again after {:?}", restarted.elapsed());
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    let (served, failed) = (served.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("reads during the kill and restart: {served} served, {failed} failed");
    assert_eq!(failed, 0, "no read failed");
    assert!(served > 100, "the load ran: {served} reads");
}

/// With one replica caught up and a read-heavy load, the replica serves most of the reads that may
/// go to it: product lists and others' profiles missing from the caches.
#[tokio::test]
async fn a_caught_up_replica_serves_most_cache_miss_reads() {
    let _replicas = exclusive_replicas().await;
    let app = TestApp::spawn_replicated(|config| {
        config.catalog_replica_urls.truncate(1);
        config.shard_replica_urls.iter_mut().for_each(|urls| urls.truncate(1));
    })
    .await;
    let mut users = Vec::new();
    for i in 0..20 {
        users.push(app.create_user(&format!("Reader {i}")).await.0);
    }
    let product = app.create_product("MOSTLY-1", 100, 1).await;
    wait_until_fresh(&app, &app.address).await;
    let (products_before, profiles_before) =
        (reads_of(&app, &app.address, "product").await, reads_of(&app, &app.address, "profile").await);
    for round in 0..10 {
        expect_json(app.get("/v1/products?limit=10").send().await, 200).await;
        for user in &users[round * 2..round * 2 + 2] {
            expect_json(app.get(&format!("/v1/users/{user}")).send().await, 200).await;
        }
    }
    let (products_after, profiles_after) =
        (reads_of(&app, &app.address, "product").await, reads_of(&app, &app.address, "profile").await);
    let share = |before: [u64; 2], after: [u64; 2]| {
        let (primary, replica) = (after[0] - before[0], after[1] - before[1]);
        assert!(primary + replica > 0);
        replica as f64 / (primary + replica) as f64
    };
    let (products, profiles) = (share(products_before, products_after), share(profiles_before, profiles_after));
    eprintln!("share served by the replica: product lists {products:.2}, profiles {profiles:.2}");
    assert!(products > 0.5 && profiles > 0.5, "the replica serves most: {products:.2}, {profiles:.2}");

    // A product is cached where it was written: another node's miss fills from the replica.
    let node = app.second_node().await;
    wait_until_fresh(&app, &node.address).await;
    let cold = app.client.get(format!("{}/v1/products/{product}", node.address)).send().await.unwrap();
    assert_eq!(cache_status(&cold), "keel; fwd=miss; stored; detail=replica");
    let metrics = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with(r#"keel_db_reads_total{database="catalog",target="replica"}"#)),
        "reads are counted per database and target"
    );
    node.stop().await;
}
