//! The checkout saga never gives up on an accepted order: its job outlives an outage longer than the
//! retry budget it used to have (20 attempts), and a scheduled reconciler finishes orders whose job
//! is gone or dead and reservations left held.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Client;

use crate::helpers::{add_to_cart, checkout, connect, expect_json, TestApp, SHARDS};

/// The attempts after which the saga's job used to be dead, leaving its order pending for good.
const OLD_RETRY_BUDGET: i32 = 20;

async fn inventory(app: &TestApp, product: &str) -> Value {
    expect_json(app.get(&format!("/v1/products/{product}/inventory")).send().await, 200).await
}

async fn balance(app: &TestApp, token: &str) -> i64 {
    expect_json(app.get("/v1/wallet").bearer_auth(token).send().await, 200).await["balance_cents"].as_i64().unwrap()
}

/// A connection to the shard that holds `user`.
async fn shard_of(app: &TestApp, user: &str) -> Client {
    let id = uuid::Uuid::parse_str(user).unwrap();
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        if shard.query_opt("SELECT 1 FROM users WHERE id = $1", &[&id]).await.unwrap().is_some() {
            return shard;
        }
    }
    panic!("user {user} is on no shard");
}

/// The state and attempts of an order's `order.placed` job.
async fn saga_job(shard: &Client, order: &str) -> (String, i32) {
    let row = shard
        .query_one("SELECT state, attempts FROM keel_jobs WHERE kind = 'order.placed' AND aggregate_id = $1", &[&order])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Dead jobs in every database of the app.
async fn dead_jobs(app: &TestApp) -> Vec<String> {
    let mut dead = Vec::new();
    for url in std::iter::once(&app.dbs.catalog_url).chain(&app.dbs.shard_urls) {
        let rows = connect(url).await.query("SELECT kind, last_error FROM keel_jobs WHERE state = 'dead'", &[]).await;
        dead.extend(
            rows.unwrap().iter().map(|r| format!("{}: {:?}", r.get::<_, String>(0), r.get::<_, Option<String>>(1))),
        );
    }
    dead
}

/// Must show: the user's shard refuses the saga's transaction (another transaction holds the
/// wallet's row lock) for more attempts than the old retry budget; then it recovers, and the order
/// ends confirmed, the stock sold and the wallet debited once, with no dead job. The retry budget is
/// counted in attempts: the backoff cap and the lock timeout are shrunk so they come quickly.
#[tokio::test]
async fn the_saga_outlives_a_refusing_shard_for_longer_than_the_old_retry_budget() {
    let app = TestApp::spawn_with(|config| {
        config.saga_backoff_max = Duration::from_millis(5);
        config.saga_lock_timeout = Duration::from_millis(20);
    })
    .await;
    let (user, token) = app.create_user("Patient").await;
    expect_json(Ok(app.deposit(&token, "d", 10_000).await), 201).await;
    let product = app.create_product("OUTAGE", 1_500, 5).await;
    add_to_cart(&app, &token, &product, 2).await;

    // The outage: a transaction holds the wallet's row, so every debit of the saga's waits for it
    // and gives up after the lock timeout.
    let mut holder = shard_of(&app, &user).await;
    let outage = holder.transaction().await.unwrap();
    let user_id = uuid::Uuid::parse_str(&user).unwrap();
    outage.execute("SELECT 1 FROM wallets WHERE user_id = $1 FOR UPDATE", &[&user_id]).await.unwrap();

    let workers = app.start_workers();
    let location = checkout(&app, &token, "outage").await;
    let order = location.trim_start_matches("/v1/orders/").to_owned();
    let observer = shard_of(&app, &user).await;
    let started = Instant::now();
    loop {
        let (state, attempts) = saga_job(&observer, &order).await;
        assert_ne!(state, "dead", "the saga gave up after {attempts} attempts");
        if attempts > OLD_RETRY_BUDGET + 5 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "only {attempts} attempts so far");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pending = expect_json(app.get(&location).bearer_auth(&token).send().await, 200).await;
    assert_eq!(pending["status"], "pending", "{pending}");
    let held = inventory(&app, &product).await;
    assert_eq!(
        (held["on_hand"].as_i64(), held["reserved"].as_i64(), held["stock"].as_i64()),
        (Some(5), Some(2), Some(3))
    );

    // The shard recovers.
    outage.rollback().await.unwrap();
    let decided = app.wait_for_order(&token, &location).await;
    assert_eq!(decided["status"], "confirmed", "{decided}");
    // The run's own record follows the order's commit (completions are written in batches).
    let started = Instant::now();
    let (state, attempts) = loop {
        let (state, attempts) = saga_job(&observer, &order).await;
        if state != "running" || started.elapsed() > Duration::from_secs(10) {
            break (state, attempts);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(state, "done");
    assert!(attempts > OLD_RETRY_BUDGET, "{attempts} attempts");
    assert_eq!(balance(&app, &token).await, 7_000, "debited once");
    let sold = app.settled_inventory(&product).await;
    assert_eq!(
        (sold["on_hand"].as_i64(), sold["reserved"].as_i64(), sold["sold"].as_i64(), sold["stock"].as_i64()),
        (Some(3), Some(0), Some(2), Some(3)),
        "{sold}"
    );
    app.check_queues_drained().await;
    assert_eq!(dead_jobs(&app).await, Vec::<String>::new());
    workers.stop().await;
    app.check_invariants().await;
}

/// The value of a counter in `/metrics` (0 when absent).
async fn reconciled(app: &TestApp, outcome: &str) -> f64 {
    let text = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    let series = format!("keel_orders_reconciled_total{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Orders whose saga job died (as jobs did after 20 attempts before the saga retried forever) are
/// finished by the reconciler: one confirmed, one failed with its stock released; and a failed
/// order's reservation left held (its release interrupted) is released. Each is counted.
#[tokio::test]
async fn the_reconciler_finishes_orders_whose_saga_died_and_releases_stock_left_held() {
    let app = TestApp::spawn_with(|config| {
        config.order_reconcile_after = Duration::from_millis(300);
        config.order_reconcile_every = Duration::from_millis(100);
    })
    .await;
    let (rich_id, rich) = app.create_user("Rich").await;
    let (poor_id, poor) = app.create_user("Poor").await;
    expect_json(Ok(app.deposit(&rich, "d", 10_000).await), 201).await;
    expect_json(Ok(app.deposit(&poor, "d", 100).await), 201).await;
    let product = app.create_product("RECONCILE", 1_000, 10).await;
    add_to_cart(&app, &rich, &product, 3).await;
    add_to_cart(&app, &poor, &product, 2).await;
    let rich_order = checkout(&app, &rich, "k").await;
    let poor_order = checkout(&app, &poor, "k").await;
    // Their jobs died before any worker ran them.
    for (user, location) in [(&rich_id, &rich_order), (&poor_id, &poor_order)] {
        let order = location.trim_start_matches("/v1/orders/");
        let shard = shard_of(&app, user).await;
        let killed = shard
            .execute(
                "UPDATE keel_jobs SET state = 'dead', attempts = 20, last_error = 'database unavailable'
                 WHERE kind = 'order.placed' AND aggregate_id = $1",
                &[&order],
            )
            .await
            .unwrap();
        assert_eq!(killed, 1);
    }
    let (confirmed_before, failed_before) = (reconciled(&app, "confirmed").await, reconciled(&app, "failed").await);

    let workers = app.start_workers();
    assert_eq!(app.wait_for_order(&rich, &rich_order).await["status"], "confirmed");
    let failed = app.wait_for_order(&poor, &poor_order).await;
    assert_eq!(failed["failure_reason"], "insufficient_funds", "{failed}");
    assert_eq!((balance(&app, &rich).await, balance(&app, &poor).await), (7_000, 100));
    let stock = app.settled_inventory(&product).await;
    assert_eq!(
        (stock["on_hand"].as_i64(), stock["reserved"].as_i64(), stock["sold"].as_i64()),
        (Some(7), Some(0), Some(3))
    );
    assert!(reconciled(&app, "confirmed").await > confirmed_before);
    assert!(reconciled(&app, "failed").await > failed_before);

    // A failed order's release interrupted: its reservation is held again, as a crash would leave it.
    let catalog = app.dbs.catalog().await;
    let poor_order_id = uuid::Uuid::parse_str(poor_order.trim_start_matches("/v1/orders/")).unwrap();
    let product_id = uuid::Uuid::parse_str(&product).unwrap();
    let failed_before = reconciled(&app, "failed").await;
    catalog
        .batch_execute(&format!(
            "BEGIN;
             UPDATE stock_reservations SET state = 'held', decided_at = NULL, created_at = now() - interval '1 hour'
                 WHERE order_id = '{poor_order_id}';
             UPDATE inventory SET reserved = reserved + 2, version = version + 1 WHERE product_id = '{product_id}';
             COMMIT;"
        ))
        .await
        .unwrap();
    let started = Instant::now();
    while inventory(&app, &product).await["reserved"] != 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the held reservation was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stock = inventory(&app, &product).await;
    assert_eq!(
        (stock["on_hand"].as_i64(), stock["stock"].as_i64(), stock["sold"].as_i64()),
        (Some(7), Some(7), Some(3))
    );
    assert!(reconciled(&app, "failed").await > failed_before);
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}
