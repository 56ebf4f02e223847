//! Deleting an account (the right to erasure) and the admin's lock: afterwards no row of any
//! database names the user but their anonymised orders and ledger and the erasure's own record, the
//! address can sign up again, like counts dropped by their likes, Redis holds nothing of theirs, and
//! subscribers hear `user.deleted`; a worker killed in the middle of an erasure leaves it to be
//! finished; a lock ends a user's tokens on every node within the session budget.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{connect, expect_json, expect_problem, TestApp, TestDatabases, ADMIN_TOKEN};
use crate::peers::{Receiver, RedisServer, Reply};
use crate::processes::{scratch_dir, Keel};

const PASSWORD: &str = "correct horse battery staple";

/// Signs up with a password; returns the answer (the user and their first session).
async fn sign_up(client: &reqwest::Client, base: &str, name: &str, email: &str) -> Value {
    let body = json!({ "name": name, "email": email, "password": PASSWORD });
    expect_json(client.post(format!("{base}/v1/users")).json(&body).send().await, 201).await
}

async fn sign_in(client: &reqwest::Client, base: &str, email: &str) -> reqwest::Response {
    let body = json!({ "email": email, "password": PASSWORD });
    client.post(format!("{base}/v1/sessions")).json(&body).send().await.unwrap()
}

fn token(session: &Value) -> &str {
    session["access_token"].as_str().unwrap()
}

fn unique(word: &str) -> String {
    format!("{word}{}", uuid::Uuid::now_v7().simple())
}

async fn like_count(client: &reqwest::Client, base: &str, product: &str) -> i64 {
    let product = expect_json(client.get(format!("{base}/v1/products/{product}")).send().await, 200).await;
    product["like_count"].as_i64().unwrap()
}

/// Polls until `product`'s like count on `base` is `expected` (nodes merge the tallies every 250 ms).
async fn wait_for_likes(client: &reqwest::Client, base: &str, product: &str, expected: i64) {
    let started = Instant::now();
    loop {
        let count = like_count(client, base, product).await;
        if count == expected {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "like count {count}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` (a query returning one boolean, of `param`) until it holds.
async fn wait_until(db: &tokio_postgres::Client, check: &str, param: &str, within: Duration) {
    let started = Instant::now();
    while !db.query_one(check, &[&param]).await.unwrap().get::<_, bool>(0) {
        assert!(started.elapsed() < within, "not within {within:?}: {check} ({param})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until the user's erasure job is done: its last step (the caches) has run too.
const ERASED: &str = "SELECT EXISTS (SELECT 1 FROM keel_jobs WHERE kind = 'user.erasure' AND aggregate_id = $1
                      AND state = 'done') AND NOT EXISTS (SELECT 1 FROM users WHERE id = $1::text::uuid)";

/// Every row, in every table of every database, whose text contains `needle` (case-insensitively):
/// `(database, table, the row as JSON)`. Tables are listed from the catalogue of each database, so a
/// table added later is scanned too.
async fn rows_naming(urls: &[&str], needle: &str) -> Vec<(String, String, Value)> {
    let mut found = Vec::new();
    for (n, url) in urls.iter().enumerate() {
        let db = connect(url).await;
        let tables = db
            .query(
                "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
                 WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
                &[],
            )
            .await
            .unwrap();
        for table in tables.iter().map(|r| r.get::<_, String>(0)) {
            let query = format!("SELECT to_jsonb(t)::text FROM {table} t WHERE strpos(lower(t::text), lower($1)) > 0");
            for row in db.query(&query, &[&needle]).await.unwrap() {
                let db_name = if n == 0 { "catalogue".to_owned() } else { format!("shard {}", n - 1) };
                found.push((db_name, table.clone(), serde_json::from_str(row.get::<_, &str>(0)).unwrap()));
            }
        }
    }
    found
}

/// The erasure's own record, which carries the user's id and nothing else: its job, the
/// `user.deleted` event and that event's webhook deliveries.
fn is_the_erasures_record(table: &str, row: &Value, user: &str) -> bool {
    let only_the_id = |payload: &Value| payload == &json!({ "user_id": user });
    match table {
        "public.keel_jobs" => match row["kind"].as_str().unwrap() {
            "user.erasure" | "user.deleted" => only_the_id(&row["payload"]),
            // The erasure's own events for the feed: an activity of theirs out of every feed, a follow
            // of theirs ended on the other side; their id and nothing personal (no name).
            "activity.withdrawn" => {
                let payload = row["payload"].as_object().unwrap();
                payload.len() == 2 && payload["user_id"] == user && payload.contains_key("activity_id")
            }
            "follow.follower_erased" => {
                let payload = row["payload"].as_object().unwrap();
                payload.len() == 2 && payload["user_id"] == user && payload.contains_key("followee_id")
            }
            _ => false,
        },
        "public.webhook_deliveries" => {
            let body: Value = serde_json::from_str(row["body"].as_str().unwrap()).unwrap();
            row["event_type"] == "user.deleted" && only_the_id(&body["data"])
        }
        _ => false,
    }
}

/// The Redis keys naming `user`, with their values.
fn redis_keys(redis: &RedisServer, user: &str) -> Vec<(String, String)> {
    let cli = |args: &[&str]| {
        let output = std::process::Command::new("redis-cli").arg("-p").arg(redis.port.to_string()).args(args).output();
        String::from_utf8_lossy(&output.expect("redis-cli").stdout).into_owned()
    };
    let keys = cli(&["--scan", "--pattern", &format!("*{user}*")]);
    keys.lines().map(|key| (key.to_owned(), cli(&["GET", key]).trim().to_owned())).collect()
}

/// The whole erasure, in one app with Redis, a webhook subscriber and workers: everything the user
/// left is gone but the anonymised accounts.
#[tokio::test]
async fn deleting_an_account_erases_the_users_data_everywhere_but_the_anonymised_accounts() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let provider = keel::webhooks::signing::SigningKey::parse(&keel::webhooks::signing::new_secret()).unwrap();
    let key = provider.clone();
    let app = TestApp::spawn_with(move |config| {
        config.redis_url = Some(url);
        config.payment_webhook_secret = Some(key);
    })
    .await;
    let workers = app.start_workers();
    let receiver = Receiver::start(vec![], Reply::status(200)).await;
    let events = ["user.registered", "order.confirmed", "user.deleted"];
    let subscribe = app.admin(app.post("/v1/webhooks")).json(&json!({ "url": receiver.url, "events": events }));
    expect_json(subscribe.send().await, 201).await;

    let name = unique("Erasable Person ");
    let email = format!("{}@example.org", unique("erasable."));
    let user = sign_up(&app.client, &app.address, &name, &email).await;
    let id = user["id"].as_str().unwrap().to_owned();
    let token = token(&user).to_owned();
    let (_, keeper) = app.create_user("Keeper").await;
    let bought = app.create_product("ERASE-BOUGHT", 300, 10).await;
    let liked = app.create_product("ERASE-LIKED", 100, 10).await;

    // They follow the keeper and the keeper follows them: each side's rows and feeds carry their name
    // (the keeper's feed has their likes and follow).
    let keeper_id = crate::helpers::user_of(&keeper);
    for (whom, who) in [(&keeper_id, &token), (&id, &keeper)] {
        let follow = app.put(&format!("/v1/users/{whom}/follow")).bearer_auth(who).send().await.unwrap();
        assert_eq!(follow.status(), 204);
    }
    // Likes of theirs, and one of someone who stays.
    for (product, who) in [(&bought, &token), (&liked, &token), (&bought, &keeper)] {
        let like = app.put(&format!("/v1/products/{product}/like")).bearer_auth(who).send().await.unwrap();
        assert_eq!(like.status(), 204);
    }
    // Store credit from the shop and from a payment, an order paid with it (the accounts keep all
    // three), and an item left in the cart.
    let deposit = app.admin(app.post(&format!("/v1/admin/users/{id}/deposits"))).header("idempotency-key", "credit");
    expect_json(deposit.json(&json!({ "amount_cents": 1_000 })).send().await, 201).await;
    let payment_id = unique("pay_");
    let payment = json!({
        "type": "payment.succeeded",
        "timestamp": "2026-12-01T17:00:00Z",
        "data": { "payment_id": payment_id, "user_id": id, "amount_cents": 500 },
    })
    .to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let paid = app
        .post("/v1/payments/events")
        .header("content-type", "application/json")
        .header("webhook-id", "msg_erasure")
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", provider.sign("msg_erasure", now, payment.as_bytes()))
        .body(payment);
    expect_json(paid.send().await, 200).await;
    let put = |product: &str| {
        let request = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token);
        request.json(&json!({ "quantity": 1 })).send()
    };
    expect_json(put(&bought).await, 200).await;
    let placed = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "buy").send().await;
    let order = expect_json(placed, 202).await["id"].as_str().unwrap().to_owned();
    assert_eq!(app.wait_for_order(&token, &format!("/v1/orders/{order}")).await["status"], "confirmed");
    expect_json(put(&liked).await, 200).await;

    // Their profile and cart are cached, in this node's memory and in Redis.
    expect_json(app.get(&format!("/v1/users/{id}")).send().await, 200).await;
    expect_json(app.get("/v1/cart").bearer_auth(&token).send().await, 200).await;
    let cached: Vec<String> = redis_keys(&redis, &id).into_iter().map(|(key, _)| key).collect();
    assert_eq!(cached.iter().filter(|key| key.contains(":v:")).count(), 2, "profile and cart in Redis: {cached:?}");
    wait_for_likes(&app.client, &app.address, &bought, 2).await;
    wait_for_likes(&app.client, &app.address, &liked, 1).await;
    // Sign-ups of both users and the order reached the subscriber: their deliveries name the user.
    receiver.wait_for(3, Duration::from_secs(10)).await;
    app.check_queues_drained().await;
    let shard = app.shard_of(&id).await;

    let deleted = app.delete(&format!("/v1/users/{id}")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(deleted.status(), 202);
    expect_problem(app.get("/v1/cart").bearer_auth(&token).send().await, 401, "ended").await;
    wait_until(&shard, ERASED, &id, Duration::from_secs(30)).await;

    // Subscribers are told, with the id and nothing else.
    let received = receiver.wait_for(4, Duration::from_secs(10)).await;
    let told = received.iter().map(|r| r.json()).find(|body| body["type"] == "user.deleted");
    assert_eq!(told.expect("user.deleted delivered")["data"], json!({ "user_id": id }));
    // Like counts dropped by their likes, and only theirs.
    wait_for_likes(&app.client, &app.address, &bought, 1).await;
    wait_for_likes(&app.client, &app.address, &liked, 0).await;
    // The keeper no longer follows them nor is followed by them, and their feed is empty of them.
    app.check_queues_drained().await;
    let keeper_profile = expect_json(app.get(&format!("/v1/users/{keeper_id}")).bearer_auth(&keeper).send().await, 200);
    let keeper_profile = keeper_profile.await;
    assert_eq!(
        (keeper_profile["followers_count"].as_i64(), keeper_profile["following_count"].as_i64()),
        (Some(0), Some(0)),
        "{keeper_profile}"
    );
    let feed = expect_json(app.get("/v1/feed").bearer_auth(&keeper).send().await, 200).await;
    assert_eq!(feed["items"], json!([]), "{feed}");

    // No row of any database names them, but the erasure's own record, which holds the id alone.
    let urls: Vec<&str> =
        std::iter::once(app.dbs.catalog_url.as_str()).chain(app.dbs.shard_urls.iter().map(String::as_str)).collect();
    for needle in [&name, &email] {
        let found = rows_naming(&urls, needle).await;
        assert!(found.is_empty(), "rows still naming {needle}: {found:#?}");
    }
    let found = rows_naming(&urls, &id).await;
    let left: Vec<_> = found.iter().filter(|(_, table, row)| !is_the_erasures_record(table, row, &id)).collect();
    assert!(left.is_empty(), "rows still naming the user's id: {left:#?}");
    assert!(found.iter().any(|(_, table, _)| table == "public.webhook_deliveries"), "{found:#?}");

    // The accounts are kept, anonymised: the order and the ledger under a pseudonym, still adding up.
    let kept = shard
        .query_one(
            "SELECT o.user_id::text, o.status, o.total_cents, w.balance_cents,
                    (SELECT count(*) FROM wallet_deposits d WHERE d.user_id = o.user_id),
                    (SELECT count(*) FROM wallet_debits d WHERE d.user_id = o.user_id),
                    (SELECT user_id::text FROM payments WHERE payment_id = $2)
             FROM orders o JOIN wallets w ON w.user_id = o.user_id WHERE o.id = $1::text::uuid",
            &[&order, &payment_id],
        )
        .await
        .unwrap();
    let pseudonym: String = kept.get(0);
    assert_ne!(pseudonym, id);
    assert_eq!(
        (kept.get::<_, String>(1).as_str(), kept.get::<_, i64>(2), kept.get::<_, i64>(3)),
        ("confirmed", 300, 1_200)
    );
    assert_eq!((kept.get::<_, i64>(4), kept.get::<_, i64>(5)), (2, 1), "both deposits and the debit");
    assert_eq!(kept.get::<_, String>(6), pseudonym, "the payment is kept, with the provider's id");
    let catalog = app.dbs.catalog().await;
    let sold = "SELECT user_id::text FROM stock_reservations WHERE order_id = $1::text::uuid";
    let sold: String = catalog.query_one(sold, &[&order]).await.unwrap().get(0);
    assert_eq!(sold, pseudonym, "the record of the sale is kept too");
    app.check_invariants().await;

    // Nothing of theirs in Redis: what is left under their id is the invalidation counters and
    // versions, numbers that expire within two minutes.
    let left = redis_keys(&redis, &id);
    assert!(left.iter().all(|(key, value)| !key.contains(":v:") && value.parse::<u64>().is_ok()), "{left:?}");
    expect_problem(app.get(&format!("/v1/users/{id}")).send().await, 404, "user").await;

    // The address is free: no sign-in, and it signs up again, as someone new.
    expect_problem(Ok(sign_in(&app.client, &app.address, &email).await), 401, "not right").await;
    let again = sign_up(&app.client, &app.address, "Someone New", &email).await;
    assert_ne!(again["id"], id);
    workers.stop().await;
}

/// Only the owner deletes, with a sign-in more recent than `recent_sign_in`; a refresh does not
/// count as one. The deletion ends every session at once and locks the account until it is erased.
#[tokio::test]
async fn deleting_needs_the_owners_recent_sign_in_and_ends_every_session_at_once() {
    let app = TestApp::spawn_with(|config| config.recent_sign_in = Duration::from_secs(1)).await;
    let email = format!("{}@example.org", unique("recent."));
    let user = sign_up(&app.client, &app.address, "Recent Signer", &email).await;
    let id = user["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/users/{id}");
    let (_, other) = app.create_user("Other").await;
    expect_problem(app.delete(&path).send().await, 401, "token").await;
    expect_problem(app.delete(&path).bearer_auth(&other).send().await, 403, "owner").await;
    expect_problem(app.admin(app.delete(&path)).send().await, 403, "user").await;
    expect_problem(app.delete("/v1/users/not-an-id").bearer_auth(token(&user)).send().await, 404, "user").await;

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let refresh =
        |session: &Value| app.post("/v1/sessions/refresh").json(&json!({ "refresh_token": session["refresh_token"] }));
    let refreshed = expect_json(refresh(&user).send().await, 201).await;
    expect_problem(app.delete(&path).bearer_auth(token(&refreshed)).send().await, 403, "sign in again").await;
    let signed_in = expect_json(Ok(sign_in(&app.client, &app.address, &email).await), 201).await;
    assert_eq!(app.delete(&path).bearer_auth(token(&signed_in)).send().await.unwrap().status(), 202);

    // No workers run here: the account waits for its erasure, every session ended and locked.
    for session in [&refreshed, &signed_in] {
        expect_problem(app.get("/v1/wallet").bearer_auth(token(session)).send().await, 401, "ended").await;
        expect_problem(refresh(session).send().await, 401, "").await;
    }
    expect_problem(Ok(sign_in(&app.client, &app.address, &email).await), 403, "locked").await;
    // The erasure's lock is not the admin's to lift.
    let unlock = app.admin(app.post(&format!("/v1/admin/users/{id}/unlock")));
    expect_problem(unlock.send().await, 409, "being deleted").await;
}

/// A lock ends a user's sessions: the node that locked refuses their token at once, another node
/// within the session budget; sign-in is refused until the admin unlocks.
#[tokio::test]
async fn a_locked_users_tokens_stop_on_every_node_within_the_session_budget_until_unlocked() {
    let budget = Duration::from_secs(1);
    let app =
        TestApp::spawn_with(|config| config.consistency_budgets = vec![(keel::consistency::DataKind::Session, budget)])
            .await;
    let node_b = app.second_node().await;
    let email = format!("{}@example.org", unique("locked."));
    let user = sign_up(&app.client, &app.address, "Lockable", &email).await;
    let id = user["id"].as_str().unwrap().to_owned();
    let (_, other) = app.create_user("Other").await;
    let wallet = |base: &str, token: &str| app.client.get(format!("{base}/v1/wallet")).bearer_auth(token).send();
    let lock = |id: &str| app.post(&format!("/v1/admin/users/{id}/lock"));
    let unlock = |id: &str| app.post(&format!("/v1/admin/users/{id}/unlock"));

    // The admin's alone; an unknown user is not found.
    expect_problem(lock(&id).send().await, 401, "admin token").await;
    expect_problem(lock(&id).bearer_auth(&other).send().await, 403, "admin token").await;
    expect_problem(unlock(&id).bearer_auth(token(&user)).send().await, 403, "admin token").await;
    let nobody = uuid::Uuid::now_v7().to_string();
    expect_problem(app.admin(lock(&nobody)).send().await, 404, "user").await;
    expect_problem(app.admin(unlock(&nobody)).send().await, 404, "user").await;
    expect_problem(app.admin(lock("not-an-id")).send().await, 404, "user").await;

    assert_eq!(wallet(&node_b.address, token(&user)).await.unwrap().status(), 200);
    let locked = expect_json(app.admin(lock(&id)).send().await, 200).await;
    let locked_at = Instant::now();
    assert_eq!(locked["sessions_ended"], 1, "{locked}");
    expect_problem(wallet(&app.address, token(&user)).await, 401, "ended").await;
    while wallet(&node_b.address, token(&user)).await.unwrap().status() != 401 {
        assert!(locked_at.elapsed() < budget * 2, "node B still serves the locked user's token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("node B refused the locked user's token {:?} after the lock", locked_at.elapsed());
    expect_problem(Ok(sign_in(&app.client, &node_b.address, &email).await), 403, "locked").await;
    let refresh = app.post("/v1/sessions/refresh").json(&json!({ "refresh_token": user["refresh_token"] }));
    expect_problem(refresh.send().await, 401, "").await;
    // Locking again changes nothing.
    let again = expect_json(app.admin(lock(&id)).send().await, 200).await;
    assert_eq!((&again["locked_at"], &again["sessions_ended"]), (&locked["locked_at"], &json!(0)));

    // Unlocked: the user signs in again, on either node; the sessions the lock ended stay ended.
    assert_eq!(app.admin(unlock(&id)).send().await.unwrap().status(), 204);
    assert_eq!(app.admin(unlock(&id)).send().await.unwrap().status(), 204, "unlocking twice is fine");
    let back = expect_json(Ok(sign_in(&app.client, &node_b.address, &email).await), 201).await;
    assert_eq!(wallet(&app.address, token(&back)).await.unwrap().status(), 200);
    assert_eq!(wallet(&node_b.address, token(&user)).await.unwrap().status(), 401);
    node_b.stop().await;
}

/// A `keel worker` SIGKILLed in the middle of an erasure: the next worker finishes it. The test holds
/// a lock on the webhook deliveries so that the erasure is caught after its likes are withdrawn and
/// before anything else is done.
#[tokio::test]
async fn an_erasure_cut_off_by_a_killed_worker_is_finished_by_the_next() {
    let dbs = TestDatabases::create(true).await;
    let scratch = scratch_dir("erasure-killed-worker");
    let env = vec![
        ("KEEL_CATALOG_URL", dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        // A killed worker's jobs are claimed again 3 s after they started.
        ("KEEL_JOB_TIMEOUT", "2s".to_owned()),
    ];
    let mut api = Keel::start(&["serve"], &env, &scratch.join("api.log"));
    api.wait_ready(Duration::from_secs(30)).await;
    let (client, base) = (reqwest::Client::new(), api.address.clone());
    let email = format!("{}@example.org", unique("cut.off."));
    let user = sign_up(&client, &base, "Cut Off", &email).await;
    let id = user["id"].as_str().unwrap().to_owned();
    let mut products = Vec::new();
    for i in 0..30 {
        let body = json!({ "sku": format!("CUT-{i}"), "name": "Liked", "price_cents": 100, "stock": 1 });
        let created = client.post(format!("{base}/v1/products")).bearer_auth(ADMIN_TOKEN).json(&body).send().await;
        let product = expect_json(created, 201).await["id"].as_str().unwrap().to_owned();
        let like = client.put(format!("{base}/v1/products/{product}/like")).bearer_auth(token(&user)).send().await;
        assert_eq!(like.unwrap().status(), 204);
        products.push(product);
    }
    let mut shard = None;
    for i in 0..dbs.shard_urls.len() {
        let db = dbs.shard(i).await;
        if db.query_opt("SELECT 1 FROM users WHERE id = $1::text::uuid", &[&id]).await.unwrap().is_some() {
            shard = Some(db);
        }
    }
    let shard = shard.expect("the user's shard");
    let count = |sql: &'static str| {
        let (shard, id) = (&shard, &id);
        async move { shard.query_one(sql, &[id]).await.unwrap().get::<_, i64>(0) }
    };

    let mut holder = dbs.catalog().await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE webhook_deliveries IN SHARE MODE").await.unwrap();
    let deleted = client.delete(format!("{base}/v1/users/{id}")).bearer_auth(token(&user)).send().await;
    assert_eq!(deleted.unwrap().status(), 202);

    let mut first = Keel::start(&["worker"], &env, &scratch.join("worker1.log"));
    let catalog = dbs.catalog().await;
    let waiting = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                   AND query LIKE '%DELETE FROM webhook_deliveries WHERE event_type%' AND $1 <> '')";
    wait_until(&catalog, waiting, &id, Duration::from_secs(30)).await;
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    hold.rollback().await.unwrap();
    // Cut off midway: the likes withdrawn (and counted), the rest not done; the killed worker's
    // transaction in the catalogue is rolled back when its connection is found dead.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count("SELECT count(*) FROM likes WHERE user_id = $1::text::uuid").await, 0);
    assert_eq!(count("SELECT count(*) FROM users WHERE id = $1::text::uuid").await, 1, "not erased yet");
    assert_eq!(count("SELECT count(*) FROM sessions WHERE user_id = $1::text::uuid").await, 1, "not erased yet");
    let claims = "SELECT count(*) FROM user_emails WHERE user_id = $1::text::uuid";
    let claimed: i64 = catalog.query_one(claims, &[&id]).await.unwrap().get(0);
    assert_eq!(claimed, 1, "not freed yet");
    for product in &products {
        wait_for_likes(&client, &base, product, 0).await;
    }

    let mut second = Keel::start(&["worker"], &env, &scratch.join("worker2.log"));
    wait_until(&shard, ERASED, &id, Duration::from_secs(30)).await;
    let claimed: i64 = catalog.query_one(claims, &[&id]).await.unwrap().get(0);
    assert_eq!(claimed, 0, "the address is free");
    assert_eq!(count("SELECT count(*) FROM sessions WHERE user_id = $1::text::uuid").await, 0);
    let tallies = "SELECT coalesce(sum(likes - unlikes), 0)::bigint FROM like_tallies WHERE $1 <> ''";
    assert_eq!(count(tallies).await, 0, "every like withdrawn exactly once");
    sign_up(&client, &base, "Cut Off Again", &email).await;
    for node in [&mut api, &mut second] {
        node.signal(libc::SIGTERM);
        assert!(node.wait_exit(Duration::from_secs(30)).await.success());
    }
}

/// A table added later that holds user ids, and that erasure was not told about, stops erasures
/// (retried, with the table named in the job's error) rather than leave a user's rows behind.
#[tokio::test]
async fn an_unknown_table_with_user_ids_stops_erasures_rather_than_keep_their_rows() {
    // From the shard's queue, where a failed run's error is kept (JetStream keeps it elsewhere).
    let app = TestApp::spawn_with(|config| config.nats_url = None).await;
    for i in 0..app.dbs.shard_urls.len() {
        app.dbs.shard(i).await.batch_execute("CREATE TABLE loyalty_points (user_id uuid, points int)").await.unwrap();
    }
    let user = sign_up(&app.client, &app.address, "Loyal", &format!("{}@example.org", unique("loyal."))).await;
    let id = user["id"].as_str().unwrap().to_owned();
    let shard = app.shard_of(&id).await;
    assert_eq!(app.delete(&format!("/v1/users/{id}")).bearer_auth(token(&user)).send().await.unwrap().status(), 202);
    let workers = app.start_workers();
    let stopped = "SELECT EXISTS (SELECT 1 FROM keel_jobs WHERE kind = 'user.erasure' AND aggregate_id = $1
                   AND last_error LIKE '%loyalty_points%')";
    wait_until(&shard, stopped, &id, Duration::from_secs(10)).await;
    let left = shard.query_one("SELECT count(*) FROM sessions WHERE user_id = $1::text::uuid", &[&id]).await.unwrap();
    assert_eq!(left.get::<_, i64>(0), 1, "nothing erased");
    workers.stop().await;
}
