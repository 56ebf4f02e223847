//! `GET /v1/admin/stats`: the figures summed over the shards are those read from each shard's
//! database directly (with SQL of the test's own, not the endpoint's), and a shard that refuses
//! connections or hangs is left out and named, within the endpoint's timeout, never a 5xx.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{add_to_cart, checkout, cluster, connect, db_queries, expect_json, TestApp, SHARDS};

/// How long the endpoint waits for a shard (`SHARD_TIMEOUT` in src/admin/stats.rs).
const SHARD_TIMEOUT: Duration = Duration::from_secs(2);
/// What a request may take beyond that: scheduling, the other shard's statement, HTTP.
const SLACK: Duration = Duration::from_secs(1);

/// One shard's figures (or their sum over several), as the test reads them.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Figures {
    users: i64,
    pending: i64,
    confirmed: i64,
    failed: i64,
    revenue_cents: i64,
    wallet_balance_cents: i64,
    deposits_cents: i64,
}

impl Figures {
    /// Shard `i`'s figures, straight from its database: orders grouped by status (the endpoint
    /// filters one pass instead), each table summed on its own.
    async fn of_shard(app: &TestApp, i: usize) -> Figures {
        let shard = app.dbs.shard(i).await;
        let scalar = |sql: &'static str| {
            let shard = &shard;
            async move { shard.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        let mut figures = Figures {
            users: scalar("SELECT count(*) FROM users").await,
            wallet_balance_cents: scalar("SELECT coalesce(sum(balance_cents), 0)::int8 FROM wallets").await,
            deposits_cents: scalar("SELECT coalesce(sum(amount_cents), 0)::int8 FROM wallet_deposits").await,
            ..Figures::default()
        };
        let by_status = "SELECT status, count(*), sum(total_cents)::int8 FROM orders GROUP BY status";
        for row in shard.query(by_status, &[]).await.unwrap() {
            let (status, count, total): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
            match status.as_str() {
                "pending" => figures.pending = count,
                "confirmed" => (figures.confirmed, figures.revenue_cents) = (count, total),
                "failed" => figures.failed = count,
                other => panic!("an order status the schema does not allow: {other}"),
            }
        }
        figures
    }

    /// Every shard's figures, summed.
    async fn of_all_shards(app: &TestApp) -> Figures {
        let mut sum = Figures::default();
        for i in 0..SHARDS {
            sum = sum.plus(Figures::of_shard(app, i).await);
        }
        sum
    }

    fn plus(self, o: Figures) -> Figures {
        Figures {
            users: self.users + o.users,
            pending: self.pending + o.pending,
            confirmed: self.confirmed + o.confirmed,
            failed: self.failed + o.failed,
            revenue_cents: self.revenue_cents + o.revenue_cents,
            wallet_balance_cents: self.wallet_balance_cents + o.wallet_balance_cents,
            deposits_cents: self.deposits_cents + o.deposits_cents,
        }
    }

    /// The body `GET /v1/admin/stats` should answer with these figures and these shards missing.
    fn body(self, missing: &[u16]) -> Value {
        json!({
            "users": self.users,
            "orders": { "pending": self.pending, "confirmed": self.confirmed, "failed": self.failed },
            "revenue_cents": self.revenue_cents,
            "wallet_balance_cents": self.wallet_balance_cents,
            "deposits_cents": self.deposits_cents,
            "partial": !missing.is_empty(),
            "missing_shards": missing,
        })
    }
}

/// Which shard holds `user`.
async fn shard_index(app: &TestApp, user: &str) -> usize {
    for i in 0..SHARDS {
        let found = app.dbs.shard(i).await.query_opt("SELECT 1 FROM users WHERE id = $1::text::uuid", &[&user]).await;
        if found.unwrap().is_some() {
            return i;
        }
    }
    panic!("no shard holds user {user}");
}

/// Signs users up until every shard has at least `each`; returns each user's token and shard, and
/// their position among their shard's users (so that every shard gets every kind of customer).
async fn users_on_every_shard(app: &TestApp, each: usize) -> Vec<(String, usize, usize)> {
    let mut per_shard = [0usize; SHARDS];
    let mut users = Vec::new();
    while per_shard.iter().any(|n| *n < each) {
        assert!(users.len() < 100, "100 sign-ups and still a shard with fewer than {each}: {per_shard:?}");
        let (id, token) = app.create_user(&format!("Stats {}", users.len())).await;
        let shard = shard_index(app, &id).await;
        users.push((token, shard, per_shard[shard]));
        per_shard[shard] += 1;
    }
    users
}

/// The stats, and how long they took.
async fn stats(app: &TestApp) -> (reqwest::Result<reqwest::Response>, Duration) {
    let started = Instant::now();
    let response = app.admin(app.get("/v1/admin/stats")).send().await;
    (response, started.elapsed())
}

/// The name of shard `i`'s database.
async fn database_name(app: &TestApp, i: usize) -> String {
    app.dbs.shard(i).await.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn the_stats_are_the_sums_of_every_shard() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let product = app.create_product("STATS", 1_000, 1_000).await;
    // On every shard: customers whose order is confirmed (two deposits), refused for want of funds,
    // and who only deposit.
    let users = users_on_every_shard(&app, 3).await;
    let mut orders = Vec::new();
    let (mut confirmed, mut failed) = (0, 0);
    for (token, _, position) in &users {
        match position % 3 {
            0 => {
                expect_json(Ok(app.deposit(token, "d1", 1_500).await), 201).await;
                expect_json(Ok(app.deposit(token, "d2", 1_250).await), 201).await;
                add_to_cart(&app, token, &product, 2).await;
                orders.push((token, checkout(&app, token, "o1").await, "confirmed"));
                confirmed += 1;
            }
            1 => {
                expect_json(Ok(app.deposit(token, "d1", 500).await), 201).await;
                add_to_cart(&app, token, &product, 2).await;
                orders.push((token, checkout(&app, token, "o1").await, "failed"));
                failed += 1;
            }
            _ => {
                expect_json(Ok(app.deposit(token, "d1", 700).await), 201).await;
            }
        }
    }
    for (token, location, status) in &orders {
        let order = app.wait_for_order(token, location).await;
        assert_eq!(order["status"], *status, "{order}");
    }
    app.check_queues_drained().await;
    workers.stop().await;
    // And one order left pending: no workers to decide it.
    let (first, _, _) = &users[0];
    add_to_cart(&app, first, &product, 1).await;
    checkout(&app, first, "o2").await;

    let (response, took) = stats(&app).await;
    let response = response.unwrap();
    let queries = db_queries(&response);
    let body = expect_json(Ok(response), 200).await;
    let expected = Figures::of_all_shards(&app).await;
    assert_eq!(body, expected.body(&[]));
    assert_eq!(queries, SHARDS as u32, "one statement per shard");
    // What the test did, as a check on the test's own SQL.
    assert_eq!(expected.users, users.len() as i64);
    assert_eq!((expected.pending, expected.confirmed, expected.failed), (1, confirmed, failed));
    assert_eq!(expected.revenue_cents, 2_000 * confirmed);
    assert_eq!(expected.deposits_cents - expected.revenue_cents, expected.wallet_balance_cents);
    for i in 0..SHARDS {
        let shard = Figures::of_shard(&app, i).await;
        assert!(shard.users >= 3 && shard.confirmed >= 1 && shard.failed >= 1, "shard {i}: {shard:?}");
    }
    app.check_invariants().await;
    eprintln!("stats over {} users on {SHARDS} shards in {took:?}: {body}", users.len());
}

/// Users on every shard with deposits and a confirmed order each on every shard, the workers stopped.
async fn a_shop(app: &TestApp) {
    let workers = app.start_workers();
    let product = app.create_product("STATS", 1_000, 1_000).await;
    let mut orders = Vec::new();
    for (token, _, position) in users_on_every_shard(app, 2).await {
        expect_json(Ok(app.deposit(&token, "d1", 3_000).await), 201).await;
        if position == 0 {
            add_to_cart(app, &token, &product, 1).await;
            orders.push((checkout(app, &token, "o1").await, token));
        }
    }
    for (location, token) in &orders {
        assert_eq!(app.wait_for_order(token, location).await["status"], "confirmed");
    }
    app.check_queues_drained().await;
    workers.stop().await;
}

/// A shard that refuses connections (its database closed to them, its sessions ended): answered at
/// once, with the other shard's figures.
///
/// The pool's watchdog does not make this flaky: a probe that fails with an error (as connecting to
/// a closed database does) does not open its breaker, so the request tries the shard and is refused;
/// had the breaker opened, `client()` would fail at once. Either way the shard is left out quickly.
#[tokio::test]
async fn a_shard_that_refuses_connections_is_left_out_and_named() {
    let app = TestApp::spawn().await;
    a_shop(&app).await;
    let answering = Figures::of_shard(&app, 0).await;
    assert_ne!(answering, Figures::of_all_shards(&app).await, "shard 1 has figures of its own to leave out");

    let name = database_name(&app, 1).await;
    let maintenance = connect(&cluster().maintenance_url()).await;
    maintenance.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false")).await.unwrap();
    let end_sessions =
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()";
    maintenance.execute(end_sessions, &[&name]).await.unwrap();
    // pg_terminate_backend only signals: wait until the app's pooled sessions are gone.
    let started = Instant::now();
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1";
    while maintenance.query_one(sessions, &[&name]).await.unwrap().get::<_, i64>(0) > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "sessions of {name} are still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (response, took) = stats(&app).await;
    // Open again before anything can fail, so the databases can be dropped after the test.
    maintenance.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")).await.unwrap();
    let body = expect_json(response, 200).await;
    assert_eq!(body, answering.body(&[1]));
    assert!(took < SHARD_TIMEOUT + SLACK, "took {took:?}");
    eprintln!("shard 1 refusing connections: answered in {took:?}: {body}");
}

/// A shard that hangs (a lock its statement waits for): left out after the timeout, with the other
/// shard's figures; once it answers again, it is counted again.
#[tokio::test]
async fn a_shard_that_hangs_is_left_out_after_the_timeout() {
    let app = TestApp::spawn().await;
    a_shop(&app).await;
    let answering = Figures::of_shard(&app, 0).await;

    // Even reads of a table wait for an ACCESS EXCLUSIVE lock; the watchdog's `SELECT 1` does not.
    let locker = app.dbs.shard(1).await;
    locker.batch_execute("BEGIN; LOCK TABLE wallet_deposits IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let (response, took) = stats(&app).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let body = expect_json(response, 200).await;
    assert_eq!(body, answering.body(&[1]));
    assert!(took >= SHARD_TIMEOUT && took < SHARD_TIMEOUT + SLACK, "took {took:?}");

    let (again, took_again) = stats(&app).await;
    assert_eq!(expect_json(again, 200).await, Figures::of_all_shards(&app).await.body(&[]));
    eprintln!("shard 1 hanging: answered in {took:?}: {body}; after: {took_again:?}");
}
