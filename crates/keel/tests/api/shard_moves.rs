//! Moving buckets between shards while they are written to (`POST /v1/admin/shards/moves`): two
//! API nodes and a worker, clients depositing (each deposit retried with its key until answered),
//! filling carts, liking and checking out on both nodes, while half of shard 0's buckets move to a
//! new shard. Nothing acknowledged is lost or doubled, and the old shard keeps none of the rows.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use keel::db::moves::HoldPoint;

use crate::helpers::{cluster, connect, expect_json, TestApp, ADMIN_TOKEN};

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// (user, key, deposit id, amount) of every acknowledged deposit.
    deposits: Vec<(String, String, String, i64)>,
    /// (token, order location) of every accepted checkout.
    orders: Vec<(String, String)>,
    /// Answers that are not allowed: a 5xx other than a 503 with Retry-After, or an unexpected 4xx.
    bad: Vec<String>,
    /// 503s with Retry-After (allowed during the fence).
    unavailable: usize,
    /// The longest a write took to be answered.
    longest_write: Duration,
}

/// Sends `request` until it is answered with something other than a 503 carrying Retry-After
/// (for 20 s at most: a fence lasts a moment, so a write refused that long is not waiting on one).
async fn until_answered(
    seen: &Mutex<Seen>,
    what: &str,
    send: impl Fn() -> reqwest::RequestBuilder,
) -> reqwest::Response {
    let first = Instant::now();
    loop {
        let began = Instant::now();
        let response = send().send().await;
        let took = began.elapsed();
        let retry = {
            let mut s = seen.lock().unwrap();
            s.longest_write = s.longest_write.max(took);
            match &response {
                Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after") => {
                    s.unavailable += 1;
                    first.elapsed() < Duration::from_secs(20)
                }
                Ok(r) => {
                    if r.status().is_server_error() {
                        s.bad.push(format!("{what}: {}", r.status()));
                    }
                    false
                }
                Err(e) => {
                    s.bad.push(format!("{what}: {e}"));
                    true
                }
            }
        };
        match response {
            Ok(r) if !retry => {
                if r.status() == 503 {
                    let text = r.text().await.unwrap_or_default();
                    seen.lock().unwrap().bad.push(format!("{what}: still 503 after 20 s: {text}"));
                    return send().send().await.unwrap();
                }
                return r;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn client_loop(
    bases: [String; 2],
    user: String,
    token: String,
    product: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::new();
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let base = &bases[round % 2];
        let key = format!("d-{user}-{round}");
        let amount = 100 + (round as i64 % 7);
        let url = format!("{base}/v1/admin/users/{user}/deposits");
        let deposit = || {
            http.post(&url)
                .bearer_auth(ADMIN_TOKEN)
                .header("idempotency-key", &key)
                .json(&json!({ "amount_cents": amount }))
        };
        let response = until_answered(&seen, "deposit", deposit).await;
        if response.status() == 201 {
            let body: Value = response.json().await.unwrap();
            let id = body["deposit_id"].as_str().unwrap().to_owned();
            seen.lock().unwrap().deposits.push((user.clone(), key.clone(), id, amount));
        } else {
            seen.lock().unwrap().bad.push(format!("deposit: {}", response.status()));
        }
        let like = format!("{base}/v1/products/{product}/like");
        let liked = if round.is_multiple_of(2) {
            until_answered(&seen, "like", || http.put(&like).bearer_auth(&token)).await
        } else {
            until_answered(&seen, "unlike", || http.delete(&like).bearer_auth(&token)).await
        };
        if !liked.status().is_success() {
            seen.lock().unwrap().bad.push(format!("like: {}", liked.status()));
        }
        if round % 3 == 2 {
            let item = format!("{base}/v1/cart/items/{product}");
            let put =
                until_answered(&seen, "cart", || http.put(&item).bearer_auth(&token).json(&json!({ "quantity": 1 })))
                    .await;
            if !put.status().is_success() {
                seen.lock().unwrap().bad.push(format!("cart: {}", put.status()));
            }
            let checkout = format!("{base}/v1/checkout");
            let order_key = format!("o-{user}-{round}");
            let placed = until_answered(&seen, "checkout", || {
                http.post(&checkout).bearer_auth(&token).header("idempotency-key", &order_key)
            })
            .await;
            match placed.status().as_u16() {
                202 => {
                    let location = placed.headers()["location"].to_str().unwrap().to_owned();
                    seen.lock().unwrap().orders.push((token.clone(), location));
                }
                // An empty cart, or one whose item a pending order is still checking out, is
                // refused as such.
                409 | 422 => {}
                other => seen.lock().unwrap().bad.push(format!("checkout: {other}")),
            }
        }
        round += 1;
    }
}

async fn rows_in(url: &str, buckets: &[i16]) -> i64 {
    let client = connect(url).await;
    let mut total = 0;
    for table in keel::db::moves::TABLES {
        let sql = format!("SELECT count(*) FROM {table} WHERE bucket = ANY($1)");
        total += client.query_one(&sql, &[&buckets]).await.unwrap().get::<_, i64>(0);
    }
    // Jobs are handed over after the switch rather than replicated; none may stay behind, nor be
    // left half handed over.
    let jobs =
        "SELECT (SELECT count(*) FROM keel_jobs WHERE bucket = ANY($1)) + (SELECT count(*) FROM keel_moving_jobs)";
    total + client.query_one(jobs, &[&buckets]).await.unwrap().get::<_, i64>(0)
}

/// Whether the parked job `id` is on shard `url` as it was parked (pending, to run in an hour), or
/// changed (false), or not there at all (none).
async fn parked_on(url: &str, id: uuid::Uuid) -> Option<bool> {
    let sql = "SELECT state = 'pending' AND run_at > now() + interval '30 minutes' FROM keel_jobs WHERE id = $1";
    connect(url).await.query_opt(sql, &[&id]).await.unwrap().map(|row| row.get(0))
}

/// A job about `user` waiting on shard `url` until an hour from now: a move must hand it over.
async fn park_job(url: &str, user: &str) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    let payload = json!({ "user_id": user });
    connect(url)
        .await
        .execute(
            "INSERT INTO keel_jobs (id, kind, aggregate_id, payload, run_at) VALUES ($1, 'keel.ping', $2, $3, now() + interval '1 hour')",
            &[&id, &user, &payload],
        )
        .await
        .unwrap();
    id
}

/// A new, empty shard 2 added to `app`, half of shard 0's buckets chosen to move there, a product,
/// and users enough (`at_least` in total, `moving_at_least` of them in the moving buckets).
struct Scene {
    /// The new shard's database, and its URL.
    name: String,
    new_url: String,
    moving: Vec<i16>,
    product: String,
    users: Vec<(String, String)>,
    moved_users: HashSet<String>,
    /// A job about a moved user, waiting (`park_job`).
    parked: uuid::Uuid,
}

impl Scene {
    async fn set_up(app: &TestApp, at_least: usize, moving_at_least: usize) -> Scene {
        let name = format!("t_moved_shard_{}", uuid::Uuid::now_v7().simple());
        keel::db::create_database(&cluster().maintenance_url(), &name, None).await.unwrap();
        let new_url = cluster().url(&name);
        let added = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": new_url })).send().await;
        assert_eq!(expect_json(added, 201).await["shard"], 2);
        let map = expect_json(app.admin(app.get("/v1/admin/shards")).send().await, 200).await;
        let shard0: Vec<i16> =
            map["shards"][0]["buckets"].as_array().unwrap().iter().map(|b| b.as_i64().unwrap() as i16).collect();
        let moving: Vec<i16> = shard0.iter().copied().step_by(2).collect();
        let product = app.create_product(&format!("MOVE-{}", uuid::Uuid::now_v7().simple()), 150, 100_000).await;
        let in_moving = |id: &String| moving.contains(&keel::db::bucket_of(id.parse().unwrap()));
        let mut users: Vec<(String, String)> = Vec::new();
        while users.iter().filter(|(id, _)| in_moving(id)).count() < moving_at_least || users.len() < at_least {
            users.push(app.create_user("Mover").await);
        }
        let moved_users: HashSet<String> =
            users.iter().filter(|(id, _)| in_moving(id)).map(|(id, _)| id.clone()).collect();
        let parked = park_job(&app.dbs.shard_urls[0], moved_users.iter().next().unwrap()).await;
        Scene { name, new_url, moving, product, users, moved_users, parked }
    }

    /// A client per user, alternating between `bases`, until `stop`.
    fn load(
        &self,
        bases: [String; 2],
        seen: &Arc<Mutex<Seen>>,
        stop: &Arc<AtomicBool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.users
            .iter()
            .map(|(id, token)| {
                let (id, token, product) = (id.clone(), token.clone(), self.product.clone());
                tokio::spawn(client_loop(bases.clone(), id, token, product, seen.clone(), stop.clone()))
            })
            .collect()
    }

    /// Asks for the move; returns its id.
    async fn start_move(&self, app: &TestApp) -> String {
        let body = json!({ "buckets": self.moving, "to": 2 });
        let started = expect_json(app.admin(app.post("/v1/admin/shards/moves")).json(&body).send().await, 202).await;
        started["id"].as_str().unwrap().to_owned()
    }

    /// What must hold after the move, whatever happened during it: every acknowledged deposit
    /// stored exactly once, every wallet its ledger, every accepted order decided, no prepared
    /// transaction, no row of the moved buckets on shard 0, no replication left behind.
    async fn check_after(&self, app: &TestApp, seen: &Seen) {
        self.check_nothing_lost(app, seen).await;
        assert_eq!(rows_in(&app.dbs.shard_urls[0], &self.moving).await, 0, "rows of moved buckets left on shard 0");
        let new_shard = connect(&self.new_url).await;
        let ids: Vec<uuid::Uuid> = self.moved_users.iter().map(|u| u.parse().unwrap()).collect();
        let there: i64 =
            new_shard.query_one("SELECT count(*) FROM users WHERE id = ANY($1)", &[&ids]).await.unwrap().get(0);
        assert_eq!(there, ids.len() as i64, "moved users missing on the new shard");
        assert_eq!(
            parked_on(&self.new_url, self.parked).await,
            Some(true),
            "the waiting job was not handed over as it was"
        );
        let history: i64 = new_shard
            .query_one("SELECT count(*) FROM keel_jobs WHERE bucket = ANY($1) AND state = 'done'", &[&self.moving])
            .await
            .unwrap()
            .get(0);
        assert!(history > 0, "the moved users' finished jobs were not handed over");
        self.check_no_replication(app).await;
    }

    /// Every acknowledged deposit stored exactly once, every wallet its ledger, every accepted order
    /// decided, on every shard, and no prepared transaction left.
    async fn check_nothing_lost(&self, app: &TestApp, seen: &Seen) {
        assert!(seen.bad.is_empty(), "answers that are not allowed: {:?}", seen.bad);
        for (token, location) in &seen.orders {
            let order = app.wait_for_order(token, location).await;
            assert!(order["status"] == "confirmed" || order["status"] == "failed", "{order}");
        }
        let urls: Vec<String> = app.dbs.shard_urls.iter().cloned().chain([self.new_url.clone()]).collect();
        let mut found: HashMap<String, i64> = HashMap::new();
        for url in &urls {
            let client = connect(url).await;
            for row in client.query("SELECT id::text FROM wallet_deposits", &[]).await.unwrap() {
                *found.entry(row.get(0)).or_default() += 1;
            }
            assert_eq!(crate::helpers::unbalanced_wallets(&client).await, 0, "a wallet is not its ledger on {url}");
            let undecided: i64 =
                client.query_one("SELECT count(*) FROM orders WHERE status = 'pending'", &[]).await.unwrap().get(0);
            assert_eq!(undecided, 0);
            let prepared: i64 = client
                .query_one("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(prepared, 0, "a prepared transaction left on {url}");
        }
        for (user, key, deposit, _) in &seen.deposits {
            assert_eq!(found.get(deposit), Some(&1), "deposit {deposit} ({user}, {key}) is not stored exactly once");
        }
    }

    /// No subscription on the new shard, no slot or publication on shard 0.
    async fn check_no_replication(&self, app: &TestApp) {
        let new_shard = connect(&self.new_url).await;
        let subscriptions: i64 = new_shard
            .query_one(
                "SELECT count(*) FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let old_shard = connect(&app.dbs.shard_urls[0]).await;
        let slots: i64 = old_shard
            .query_one("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()", &[])
            .await
            .unwrap()
            .get(0);
        let publications: i64 = old_shard.query_one("SELECT count(*) FROM pg_publication", &[]).await.unwrap().get(0);
        assert_eq!((subscriptions, slots, publications), (0, 0, 0), "replication left behind");
    }

    async fn drop_database(self) {
        keel::db::drop_database(&cluster().maintenance_url(), &self.name).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buckets_move_to_a_new_shard_under_live_writes_and_nothing_is_lost() {
    let _heavy = crate::helpers::heavy_load().await;
    let app = TestApp::spawn().await;
    let other = app.second_node().await;
    let workers = app.start_workers();
    let scene = Scene::set_up(&app, 12, 4).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = scene.load([app.address.clone(), other.address.clone()], &seen, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let id = scene.start_move(&app).await;
    let began = Instant::now();
    let mut states = Vec::new();
    let finished = loop {
        let mv = expect_json(app.admin(app.get(&format!("/v1/admin/shards/moves/{id}"))).send().await, 200).await;
        let state = mv["state"].as_str().unwrap().to_owned();
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        if state == "done" || state == "failed" {
            break mv;
        }
        assert!(began.elapsed() < Duration::from_secs(120), "the move did not finish: {mv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("move: {states:?} in {:?}: {finished}", began.elapsed());
    assert_eq!(finished["state"], "done", "{finished}");
    // Writes went on after the switch too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{} deposits, {} orders acknowledged; {} 503s with Retry-After; longest write {:?}; cutover pause {} ms",
        seen.deposits.len(),
        seen.orders.len(),
        seen.unavailable,
        seen.longest_write,
        finished["pause_ms"]
    );
    assert!(seen.deposits.iter().any(|(user, ..)| scene.moved_users.contains(user)), "no moved user deposited");
    scene.check_after(&app, &seen).await;

    // Both nodes route by the new map.
    let here = expect_json(app.admin(app.get("/v1/admin/shards")).send().await, 200).await;
    let there = expect_json(
        app.client.get(format!("{}/v1/admin/shards", other.address)).bearer_auth(ADMIN_TOKEN).send().await,
        200,
    )
    .await;
    let on_new: Vec<i16> =
        here["shards"][2]["buckets"].as_array().unwrap().iter().map(|b| b.as_i64().unwrap() as i16).collect();
    assert_eq!(on_new, scene.moving);
    assert_eq!(here["version"], there["version"]);
    assert_eq!(here["shards"][2]["buckets"], there["shards"][2]["buckets"]);

    // A key replayed after the move answers as the first time.
    for (user, key, deposit, amount) in
        seen.deposits.iter().filter(|(user, ..)| scene.moved_users.contains(user)).take(5)
    {
        let replay = app
            .admin(app.post(&format!("/v1/admin/users/{user}/deposits")))
            .header("idempotency-key", key)
            .json(&json!({ "amount_cents": amount }))
            .send()
            .await;
        assert_eq!(expect_json(replay, 201).await["deposit_id"], deposit.as_str());
    }

    workers.stop().await;
    other.stop().await;
    drop(app);
    scene.drop_database().await;
}

/// Whether the shard `target` is connected to has a subscription (a move's copy has begun).
async fn subscribed(target: &tokio_postgres::Client) -> bool {
    let sql = "SELECT count(*) FROM pg_subscription
               WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
    target.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) > 0
}

/// Waits (60 s at most) for move `id`, held at `point`, to be there.
async fn wait_until_held(
    app: &TestApp,
    id: &str,
    point: HoldPoint,
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
) {
    let began = Instant::now();
    loop {
        let there = match point {
            HoldPoint::Copying => subscribed(target).await,
            HoldPoint::Prepared | HoldPoint::Switched => {
                let sql = "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()";
                let prepared: i64 = source.query_one(sql, &[]).await.unwrap().get(0);
                let mv =
                    expect_json(app.admin(app.get(&format!("/v1/admin/shards/moves/{id}"))).send().await, 200).await;
                prepared > 0 && (mv["state"] == "cleanup") == (point == HoldPoint::Switched)
            }
            HoldPoint::HandingOver => {
                let sql = "SELECT count(*) FROM keel_moving_jobs";
                source.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) > 0
            }
        };
        if there {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(60), "the move never reached {point:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker killed in the middle of a move (held at `point` until then): the next one finishes it,
/// with the same guarantees — nothing acknowledged lost or doubled, no row left on the old shard,
/// no prepared transaction or replication left behind.
async fn a_move_killed_at(point: HoldPoint) {
    let _heavy = crate::helpers::heavy_load().await;
    // A killed worker's jobs run again once their leases lapse: short ones, so the orders it was
    // deciding are decided again within the test's wait.
    let app = TestApp::spawn_with(|config| config.job_timeout = Duration::from_secs(4)).await;
    let workers = app.start_workers();
    let scene = Scene::set_up(&app, 8, 3).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = scene.load([app.address.clone(), app.address.clone()], &seen, &stop);

    keel::db::moves::hold(&scene.new_url, point);
    let id = scene.start_move(&app).await;
    // Wait for the mover to reach the point.
    let source = connect(&app.dbs.shard_urls[0]).await;
    let target = connect(&scene.new_url).await;
    wait_until_held(&app, &id, point, &source, &target).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    workers.kill().await;
    keel::db::moves::release(&scene.new_url);
    let workers = app.start_workers();
    let began = Instant::now();
    let finished = loop {
        let mv = expect_json(app.admin(app.get(&format!("/v1/admin/shards/moves/{id}"))).send().await, 200).await;
        if mv["state"] == "done" || mv["state"] == "failed" {
            break mv;
        }
        assert!(began.elapsed() < Duration::from_secs(120), "the move was not finished after the kill: {mv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(finished["state"], "done", "{finished}");
    eprintln!(
        "killed at {point:?}: finished {:?} after the restart; pause {} ms",
        began.elapsed(),
        finished["pause_ms"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    scene.check_after(&app, &seen).await;
    workers.stop().await;
    drop((source, target));
    drop(app);
    scene.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_killed_mid_copy_is_finished_by_the_next_worker() {
    a_move_killed_at(HoldPoint::Copying).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_killed_in_the_cutover_before_the_switch_is_undone_and_done_again() {
    a_move_killed_at(HoldPoint::Prepared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_killed_in_the_cutover_after_the_switch_is_committed() {
    a_move_killed_at(HoldPoint::Switched).await;
}

/// Killed with a round of jobs on both shards (inserted on the new one, not yet deleted from the
/// old, where they wait marked as being handed over): the next worker finishes the round, and each
/// job is on the new shard once (the parked one still waiting, `check_after`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_killed_while_handing_over_jobs_hands_each_over_once() {
    a_move_killed_at(HoldPoint::HandingOver).await;
}

/// A move cancelled (`DELETE /v1/admin/shards/moves/{id}`) while held at `point` is undone while the
/// clients write: the move `failed` with its reason, its fences rolled back, its replication
/// dropped, nothing of the moving buckets left on the new shard, the map as it was, nothing
/// acknowledged lost or doubled, the parked job still waiting on shard 0. Cancelling it again is
/// refused.
async fn a_move_cancelled_at(point: HoldPoint) {
    let _heavy = crate::helpers::heavy_load().await;
    // Held at the cutover, the fence holds the sagas of orders in the moving buckets: each run waits
    // out its lock timeout (5 s) and is retried on a backoff that grows to KEEL_SAGA_BACKOFF_MAX (30 s
    // by default). Capped lower here, so that an order is decided within moments of the fence going,
    // well inside the 30 s `check_nothing_lost` waits for it (a fresh-clone run saw one still
    // pending after them, its last retry drawn late in the 30 s).
    let app = TestApp::spawn_with(|config| config.saga_backoff_max = Duration::from_secs(3)).await;
    let workers = app.start_workers();
    let scene = Scene::set_up(&app, 8, 3).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = scene.load([app.address.clone(), app.address.clone()], &seen, &stop);
    let version = expect_json(app.admin(app.get("/v1/admin/shards")).send().await, 200).await["version"].clone();

    keel::db::moves::hold(&scene.new_url, point);
    let id = scene.start_move(&app).await;
    let target = connect(&scene.new_url).await;
    let source = connect(&app.dbs.shard_urls[0]).await;
    wait_until_held(&app, &id, point, &source, &target).await;
    let cancelled = app.admin(app.delete(&format!("/v1/admin/shards/moves/{id}"))).send().await;
    assert_eq!(expect_json(cancelled, 202).await["cancelled"], true);
    keel::db::moves::release(&scene.new_url);
    let began = Instant::now();
    let finished = loop {
        let mv = expect_json(app.admin(app.get(&format!("/v1/admin/shards/moves/{id}"))).send().await, 200).await;
        if mv["state"] == "done" || mv["state"] == "failed" {
            break mv;
        }
        assert!(began.elapsed() < Duration::from_secs(60), "the cancelled move was not undone: {mv}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((&finished["state"], &finished["error"]), (&json!("failed"), &json!("cancelled by an admin")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    scene.check_nothing_lost(&app, &seen).await;
    scene.check_no_replication(&app).await;
    assert_eq!(rows_in(&scene.new_url, &scene.moving).await, 0, "rows of the moving buckets left on the new shard");
    assert_eq!(parked_on(&app.dbs.shard_urls[0], scene.parked).await, Some(true), "the parked job left shard 0");
    let map = expect_json(app.admin(app.get("/v1/admin/shards")).send().await, 200).await;
    assert_eq!(map["version"], version, "the map changed");
    assert_eq!(map["shards"][2]["buckets"], json!([]));
    assert_eq!(
        map["shards"][0]["users"].as_i64().unwrap() + map["shards"][1]["users"].as_i64().unwrap(),
        scene.users.len() as i64
    );
    let again = app.admin(app.delete(&format!("/v1/admin/shards/moves/{id}"))).send().await;
    assert_eq!(again.unwrap().status(), 409);
    workers.stop().await;
    drop((target, source));
    drop(app);
    scene.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_cancelled_in_its_copy_is_undone_and_the_map_stays() {
    a_move_cancelled_at(HoldPoint::Copying).await;
}

/// Cancelled with its fences prepared: the cutover gives up before the switch, and the writes that
/// waited at the fence go on, on shard 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_cancelled_in_its_cutover_gives_up_before_the_switch() {
    a_move_cancelled_at(HoldPoint::Prepared).await;
}
