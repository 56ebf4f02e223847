//! The promises of the consistency table, kept under the conditions that break them —
//! clients that hang up mid-request, concurrent writes of one thing, a shared tier (Redis) that
//! hangs, and many readers of one cold key. Two API nodes over the same databases and a real
//! redis-server of each test's own; workers run beside them where jobs matter.
//!
//! Each test says what it proves; each counts what it saw with `eprintln!` (`--nocapture` shows it).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::{expect_json, TestApp, ADMIN_TOKEN};
use crate::peers::{Receiver, RedisServer, Reply};
use crate::two_nodes::{app_with_redis, cache_status};

/// The product budget the tests that wait it out configure (the default is a minute).
const PRODUCT_BUDGET: Duration = Duration::from_secs(2);
/// The like count's budget (the consistency table's default).
const LIKE_BUDGET: Duration = Duration::from_secs(2);
/// What a loaded machine may add to a budget: scheduling, a poll's own round trips.
const SLACK: Duration = Duration::from_secs(1);

fn age(response: &reqwest::Response) -> Option<u64> {
    response.headers().get("age").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// xorshift: a reproducible stream of choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Polls `check` until it passes or `within` has gone by: how long it took, or the last complaint.
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        match check().await {
            Ok(()) => return Ok(started.elapsed()),
            Err(why) if started.elapsed() >= within => return Err(format!("still, after {within:?}: {why}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// An API request, written by hand on a socket of its own (to be abandoned) or sent by reqwest.
#[derive(Clone)]
struct Call {
    /// The route, for the tallies.
    route: &'static str,
    method: &'static str,
    path: String,
    token: Option<String>,
    idempotency_key: Option<String>,
    body: Option<Value>,
}

impl Call {
    fn new(route: &'static str, method: &'static str, path: String) -> Call {
        Call { route, method, path, token: None, idempotency_key: None, body: None }
    }

    fn token(mut self, token: &str) -> Call {
        self.token = Some(token.to_owned());
        self
    }

    fn admin(self) -> Call {
        self.token(ADMIN_TOKEN)
    }

    fn key(mut self, key: String) -> Call {
        self.idempotency_key = Some(key);
        self
    }

    fn json(mut self, body: Value) -> Call {
        self.body = Some(body);
        self
    }

    /// Sends the whole request, then hangs up `abort` after the last byte without reading a thing.
    /// SO_LINGER 0 makes the close a reset (RST), as from a client that crashed or was killed.
    async fn abandon(&self, base: &str, abort: Option<Duration>) {
        let authority = base.strip_prefix("http://").expect("an http:// base");
        let mut stream = TcpStream::connect(authority).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_zero_linger().unwrap();
        let body = self.body.as_ref().map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{} {} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.method,
            self.path,
            body.len()
        );
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if let Some(key) = &self.idempotency_key {
            request.push_str(&format!("Idempotency-Key: {key}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        stream.write_all(request.as_bytes()).await.unwrap();
        if let Some(delay) = abort {
            wait_precisely(delay).await;
        }
        drop(stream);
    }

    /// Sends the request and reads the answer: its status.
    async fn complete(&self, client: &reqwest::Client, base: &str) -> u16 {
        let method = reqwest::Method::from_bytes(self.method.as_bytes()).unwrap();
        let mut request = client.request(method, format!("{base}{}", self.path));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = &self.idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = &self.body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let _ = response.bytes().await;
        status
    }
}

/// Sleeps `delay` to within a few microseconds (the timer's granularity is a millisecond, and the
/// window an abort must hit can be a fraction of one).
async fn wait_precisely(delay: Duration) {
    let until = Instant::now() + delay;
    if delay > Duration::from_millis(3) {
        tokio::time::sleep(delay - Duration::from_millis(2)).await;
    }
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

/// When a client hangs up, after its last byte: at once, within the few milliseconds a handler
/// takes (finely spread, where the windows between a commit and what follows it are), or anywhere
/// in 20 ms.
fn abort_point(rng: &mut Rng) -> Option<Duration> {
    match rng.below(4) {
        0 => None,
        1 | 2 => Some(Duration::from_micros(rng.below(4_000) as u64)),
        _ => Some(Duration::from_micros(rng.below(20_000) as u64)),
    }
}

/// The likes the shards hold for `product`, summed over every shard.
async fn likes_in_database(app: &TestApp, product: &str) -> i64 {
    let mut count = 0;
    for i in 0..app.dbs.shard_urls.len() {
        let shard = app.dbs.shard(i).await;
        let row = shard.query_one("SELECT count(*) FROM likes WHERE product_id::text = $1", &[&product]).await;
        count += row.unwrap().get::<_, i64>(0);
    }
    count
}

/// A user's cart as its shard holds it: quantity by product.
async fn cart_in_database(app: &TestApp, user: &str) -> BTreeMap<String, i64> {
    let mut cart = BTreeMap::new();
    for i in 0..app.dbs.shard_urls.len() {
        let shard = app.dbs.shard(i).await;
        let rows = shard
            .query("SELECT product_id::text, quantity FROM cart_items WHERE user_id::text = $1", &[&user])
            .await
            .unwrap();
        cart.extend(rows.iter().map(|r| (r.get::<_, String>(0), i64::from(r.get::<_, i32>(1)))));
    }
    cart
}

/// A cart as served: quantity by product (prices may lag by the cart budget; quantities may not).
fn quantities(cart: &Value) -> BTreeMap<String, i64> {
    let items = cart["items"].as_array().unwrap_or_else(|| panic!("not a cart: {cart}"));
    items.iter().map(|i| (i["product_id"].as_str().unwrap().to_owned(), i["quantity"].as_i64().unwrap())).collect()
}

async fn served_cart(client: &reqwest::Client, base: &str, token: &str) -> BTreeMap<String, i64> {
    quantities(&expect_json(client.get(format!("{base}/v1/cart")).bearer_auth(token).send().await, 200).await)
}

/// A product's name and price as the catalogue holds them.
async fn product_in_database(app: &TestApp, product: &str) -> (String, i64) {
    let row = app
        .dbs
        .catalog()
        .await
        .query_one("SELECT name, price_cents FROM products WHERE id::text = $1", &[&product])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The hit for `product` among what `GET /v1/search?q=<query>` finds.
async fn search_hit(client: &reqwest::Client, base: &str, query: &str, product: &str) -> Option<Value> {
    let url = format!("{base}/v1/search");
    let page = expect_json(client.get(url).query(&[("q", query), ("limit", "100")]).send().await, 200).await;
    page["items"].as_array().unwrap().iter().find(|hit| hit["id"] == product).cloned()
}

/// The consistency table of the node at `base`.
async fn consistency_table(client: &reqwest::Client, base: &str) -> Value {
    expect_json(client.get(format!("{base}/v1/admin/consistency")).bearer_auth(ADMIN_TOKEN).send().await, 200).await
}

fn kind_row<'a>(table: &'a Value, kind: &str) -> &'a Value {
    let kinds = table["kinds"].as_array().unwrap_or_else(|| panic!("no kinds in {table}"));
    kinds.iter().find(|k| k["kind"] == kind).unwrap_or_else(|| panic!("no {kind} row in {table}"))
}

/// Every mutating route, hammered by clients that send a whole request and hang up (a reset) at
/// once or within 20 ms, mixed with requests that run to their answer, spread over two nodes that
/// share Redis, with workers running. Afterwards every promise still holds:
///
/// - **like counts**: each product's `like_count` on both nodes equals the like rows summed over the
///   shards within the like budget (2 s; the test allows 2 s of slack) — a like or unlike committed
///   by a request whose client left before it was counted must still be counted;
/// - **products**: both nodes serve the catalogue's name and price within the product budget
///   (configured to 2 s; 1 s of slack);
/// - **carts**: the owner's cart on both nodes is the cart on the shard (quantities), without
///   waiting out the cart budget (10 s);
/// - **search**: once the queues drain, searching a product's name finds it at its catalogue price;
/// - the subscriptions listed are those stored, money, stock and reservations balance
///   ([`TestApp::check_invariants`]), and no job is left behind ([`TestApp::check_queues_drained`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_hang_up_mid_request_on_every_mutating_route_break_no_promise() {
    let redis = RedisServer::start().await;
    let app = app_with_redis(&redis, &[("product", PRODUCT_BUDGET)]).await;
    let node_b = app.second_node().await;
    let workers = app.start_workers();
    let receiver = Receiver::start(Vec::new(), Reply::status(204)).await;
    let bases = [app.address.clone(), node_b.address.clone()];
    let client = reqwest::Client::builder().pool_max_idle_per_host(32).build().unwrap();

    let mut products = Vec::new();
    for sku in ["HANGUP-A", "HANGUP-B", "HANGUP-C"] {
        products.push(app.create_product(sku, 1_000, 1_000_000).await);
    }
    // Shoppers like products and fill carts; buyers check out (the saga empties their carts).
    let mut shoppers = Vec::new();
    for i in 0..6 {
        shoppers.push(app.create_user(&format!("Shopper {i}")).await);
    }
    let mut buyers = Vec::new();
    for i in 0..3 {
        buyers.push(app.create_user(&format!("Buyer {i}")).await);
    }
    for (n, (_, token)) in shoppers.iter().chain(&buyers).enumerate() {
        assert_eq!(app.deposit(token, &format!("seed-{n}"), 10_000_000).await.status(), 201);
    }
    // Something to unlike and to check out from the start.
    for (_, token) in &shoppers {
        for product in products.iter().take(2) {
            let like = app.put(&format!("/v1/products/{product}/like")).bearer_auth(token);
            assert_eq!(like.send().await.unwrap().status(), 204);
        }
    }
    for (_, token) in &buyers {
        let put = app.put(&format!("/v1/cart/items/{}", products[0])).bearer_auth(token).json(&json!({"quantity": 1}));
        expect_json(put.send().await, 200).await;
    }
    let mut subscriptions = Vec::new();
    for i in 0..10 {
        let body = json!({ "url": format!("{}?kept={i}", receiver.url), "events": ["order.failed"] });
        let created = expect_json(app.admin(app.post("/v1/webhooks")).json(&body).send().await, 201).await;
        subscriptions.push(created["id"].as_str().unwrap().to_owned());
    }

    // What the clients do: (node, call, Some(when it hangs up) or None to read the answer).
    let mut rng = Rng(0x1717_5eed_c0ff_ee01);
    let mut plan: Vec<(usize, Call, Option<Option<Duration>>)> = Vec::new();
    let any = |rng: &mut Rng, of: &[String]| of[rng.below(of.len())].clone();
    let shopper_tokens: Vec<String> = shoppers.iter().map(|(_, t)| t.clone()).collect();
    let buyer_tokens: Vec<String> = buyers.iter().map(|(_, t)| t.clone()).collect();
    for i in 0..120 {
        // 40 abandoned likes and 40 abandoned unlikes, 20 and 20 answered.
        let (token, product) = (any(&mut rng, &shopper_tokens), any(&mut rng, &products));
        let path = format!("/v1/products/{product}/like");
        let call = match i % 2 {
            0 => Call::new("PUT like", "PUT", path),
            _ => Call::new("DELETE like", "DELETE", path),
        };
        let abandoned = (i < 80).then(|| abort_point(&mut rng));
        plan.push((rng.below(2), call.token(&token), abandoned));
    }
    for i in 0..10 {
        let (user, token) = &shoppers[i % shoppers.len()];
        let (buyer_token, product) = (&buyer_tokens[i % buyers.len()], any(&mut rng, &products));
        let email = format!("abandoned-{i}-{}@example.org", uuid::Uuid::now_v7().simple());
        let quantity = 1 + rng.below(5);
        let calls = [
            Call::new("POST user", "POST", "/v1/users".into()).json(json!({ "name": "Gone", "email": email })),
            Call::new("PATCH user", "PATCH", format!("/v1/users/{user}"))
                .token(token)
                .json(json!({ "name": format!("Renamed {i}") })),
            Call::new("POST product", "POST", "/v1/products".into()).admin().json(json!({
                "sku": format!("ABANDONED-{i}"), "name": format!("Abandoned {i}"), "price_cents": 100, "stock": 5
            })),
            Call::new("PATCH product", "PATCH", format!("/v1/products/{product}"))
                .admin()
                .json(json!({ "name": format!("Hangup Gadget v{i}"), "price_cents": 2_000 + i })),
            Call::new("PUT inventory", "PUT", format!("/v1/products/{product}/inventory"))
                .admin()
                .json(json!({ "stock": 500_000 + i })),
            Call::new("PUT cart item", "PUT", format!("/v1/cart/items/{product}"))
                .token(token)
                .json(json!({ "quantity": quantity })),
            Call::new("DELETE cart item", "DELETE", format!("/v1/cart/items/{product}")).token(token),
            Call::new("POST deposit", "POST", format!("/v1/admin/users/{user}/deposits"))
                .admin()
                .key(format!("abandoned-deposit-{i}"))
                .json(json!({ "amount_cents": 100 })),
            Call::new("POST checkout", "POST", "/v1/checkout".into())
                .token(buyer_token)
                .key(format!("abandoned-checkout-{i}")),
            Call::new("POST webhook", "POST", "/v1/webhooks".into())
                .admin()
                .json(json!({ "url": format!("{}?abandoned={i}", receiver.url), "events": ["order.failed"] })),
            Call::new("DELETE webhook", "DELETE", format!("/v1/webhooks/{}", subscriptions[i])).admin(),
        ];
        for call in calls {
            plan.push((rng.below(2), call, Some(abort_point(&mut rng))));
        }
        // Answered writes of the same kinds, meanwhile.
        let answered = [
            Call::new("PATCH product", "PATCH", format!("/v1/products/{product}"))
                .admin()
                .json(json!({ "name": format!("Hangup Gizmo v{i}"), "price_cents": 3_000 + i })),
            Call::new("PUT cart item", "PUT", format!("/v1/cart/items/{product}"))
                .token(token)
                .json(json!({ "quantity": quantity + 1 })),
            Call::new("POST deposit", "POST", format!("/v1/admin/users/{user}/deposits"))
                .admin()
                .key(format!("answered-deposit-{i}"))
                .json(json!({ "amount_cents": 100 })),
        ];
        for call in answered {
            plan.push((rng.below(2), call, None));
        }
        if let Some(buyer_token) = buyer_tokens.get(i) {
            let checkout = Call::new("POST checkout", "POST", "/v1/checkout".into()).token(buyer_token);
            plan.push((rng.below(2), checkout.key(format!("answered-checkout-{i}")), None));
        }
    }
    for i in (1..plan.len()).rev() {
        let j = rng.below(i + 1);
        plan.swap(i, j);
    }

    let tally: Arc<Mutex<BTreeMap<(&'static str, String), usize>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut running = tokio::task::JoinSet::new();
    for (node, call, abandoned) in plan {
        let (client, base, tally) = (client.clone(), bases[node].clone(), tally.clone());
        let permit = gate.clone().acquire_owned().await.unwrap();
        running.spawn(async move {
            let outcome = match abandoned {
                Some(abort) => {
                    call.abandon(&base, abort).await;
                    "abandoned".to_owned()
                }
                None => call.complete(&client, &base).await.to_string(),
            };
            *tally.lock().unwrap().entry((call.route, outcome)).or_default() += 1;
            drop(permit);
        });
    }
    while let Some(done) = running.join_next().await {
        done.unwrap();
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    for ((route, outcome), n) in &tally {
        eprintln!("{route:>16}: {n:>3} {outcome}");
    }
    let server_errors: Vec<_> = tally.keys().filter(|(_, outcome)| outcome.starts_with('5')).collect();
    let mut broken = Vec::new();
    if !server_errors.is_empty() {
        broken.push(format!("answered with a server error: {server_errors:?}"));
    }
    report_what_committed(&app).await;

    // Like counts, on both nodes, within the like budget.
    let likes = eventually(LIKE_BUDGET + 2 * SLACK, async || {
        let mut wrong = Vec::new();
        for product in &products {
            let stored = likes_in_database(&app, product).await;
            for base in &bases {
                let served = expect_json(client.get(format!("{base}/v1/products/{product}")).send().await, 200).await;
                if served["like_count"] != stored {
                    wrong.push(format!(
                        "{base} counts {} likes of {product}; the shards hold {stored}",
                        served["like_count"]
                    ));
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    })
    .await;
    eprintln!("like counts: {likes:?}");
    for product in &products {
        eprintln!("  {product}: {} likes in the shards", likes_in_database(&app, product).await);
    }
    broken.extend(likes.err().map(|e| format!("like counts: {e}")));

    // Products, on both nodes, within the product budget.
    let served_products = eventually(PRODUCT_BUDGET + SLACK, async || {
        let mut wrong = Vec::new();
        for product in &products {
            let (name, price) = product_in_database(&app, product).await;
            for base in &bases {
                let served = expect_json(client.get(format!("{base}/v1/products/{product}")).send().await, 200).await;
                if served["name"] != name.as_str() || served["price_cents"] != price {
                    wrong.push(format!(
                        "{base} serves {product} as {} at {}; the catalogue holds {name:?} at {price}",
                        served["name"], served["price_cents"]
                    ));
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    })
    .await;
    eprintln!("products: {served_products:?}");
    broken.extend(served_products.err().map(|e| format!("products: {e}")));

    // The shoppers' carts (no job touches them): the shard's, on both nodes, well within the budget.
    let carts = eventually(SLACK * 3, async || carts_match(&app, &client, &bases, &shoppers).await).await;
    eprintln!("shoppers' carts: {carts:?}");
    broken.extend(carts.err().map(|e| format!("shoppers' carts: {e}")));

    app.check_queues_drained().await;
    // The buyers' carts, once the saga has emptied those it confirmed.
    let carts = eventually(SLACK * 3, async || carts_match(&app, &client, &bases, &buyers).await).await;
    eprintln!("buyers' carts: {carts:?}");
    broken.extend(carts.err().map(|e| format!("buyers' carts: {e}")));

    // Search, after the queues drained.
    for product in &products {
        let (name, price) = product_in_database(&app, product).await;
        match search_hit(&client, &app.address, &name, product).await {
            Some(hit) if hit["price_cents"] == price && hit["name"] == name.as_str() => {}
            Some(hit) => {
                broken.push(format!("search shows {product} as {hit}; the catalogue holds {name:?} at {price}"))
            }
            None => broken.push(format!("searching {name:?} does not find {product}")),
        }
    }

    // Subscriptions: the list is what is stored.
    let stored: Vec<String> = app
        .dbs
        .catalog()
        .await
        .query("SELECT id::text FROM webhook_subscriptions ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let listed = expect_json(app.admin(app.get("/v1/webhooks?limit=100")).send().await, 200).await;
    let listed: Vec<String> =
        listed["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().into()).collect();
    if listed != stored {
        broken.push(format!("webhooks listed {listed:?}, stored {stored:?}"));
    }

    app.check_invariants().await;
    workers.stop().await;
    node_b.stop().await;
    assert!(broken.is_empty(), "{} promises broken:\n{}", broken.len(), broken.join("\n"));
}

/// Whether every one of `owners` reads, on every node, the cart its shard holds.
async fn carts_match(
    app: &TestApp,
    client: &reqwest::Client,
    bases: &[String],
    owners: &[(String, String)],
) -> Result<(), String> {
    let mut wrong = Vec::new();
    for (user, token) in owners {
        let stored = cart_in_database(app, user).await;
        for base in bases {
            let served = served_cart(client, base, token).await;
            if served != stored {
                wrong.push(format!("{base} serves {user} the cart {served:?}; the shard holds {stored:?}"));
            }
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// How many of the abandoned creations and payments committed anyway (they are told apart by their
/// e-mail addresses, skus, Idempotency-Keys and URLs).
async fn report_what_committed(app: &TestApp) {
    let catalog = app.dbs.catalog().await;
    let count =
        async |client: &tokio_postgres::Client, sql: &str| client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0);
    let products = count(&catalog, "SELECT count(*) FROM products WHERE sku LIKE 'ABANDONED-%'").await;
    let webhooks = count(&catalog, "SELECT count(*) FROM webhook_subscriptions WHERE url LIKE '%abandoned=%'").await;
    let kept = count(&catalog, "SELECT count(*) FROM webhook_subscriptions WHERE url LIKE '%kept=%'").await;
    let (mut users, mut deposits, mut checkouts) = (0, 0, 0);
    for i in 0..app.dbs.shard_urls.len() {
        let shard = app.dbs.shard(i).await;
        users += count(&shard, "SELECT count(*) FROM users WHERE email LIKE 'abandoned-%'").await;
        deposits +=
            count(&shard, "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'admin abandoned-deposit-%'").await;
        checkouts += count(&shard, "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'abandoned-checkout-%'").await;
    }
    eprintln!(
        "abandoned, yet committed: {users} of 10 sign-ups, {products} of 10 products, {deposits} of 10 deposits, \
         {checkouts} of 10 checkouts, {webhooks} of 10 subscriptions; {} of 10 deletions of subscriptions",
        10 - kept
    );
}

/// 150 pairs of PATCHes of one product's price, the two of a pair sent through node A at once (five
/// products in turn). After both are answered: node A serves the price the catalogue committed at
/// once (it wrote it through), node B within the product budget (configured to 2 s), and search
/// shows it once the queues drain. Every miss is counted and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_winner_of_concurrent_product_patches_is_what_every_node_serves() {
    const PRODUCTS: usize = 5;
    const PAIRS: usize = 150;
    let redis = RedisServer::start().await;
    let app = app_with_redis(&redis, &[("product", PRODUCT_BUDGET)]).await;
    let node_b = app.second_node().await;
    let workers = app.start_workers();
    let client = reqwest::Client::builder().pool_max_idle_per_host(32).build().unwrap();
    let (a, b) = (app.address.clone(), node_b.address.clone());
    let mut products = Vec::new();
    for (i, name) in ["Duel Anvil", "Duel Bellows", "Duel Chisel", "Duel Dowel", "Duel Easel"].iter().enumerate() {
        let body = json!({ "sku": format!("DUEL-{i}"), "name": name, "price_cents": 100, "stock": 1 });
        let created = expect_json(app.admin(app.post("/v1/products")).json(&body).send().await, 201).await;
        let id = created["id"].as_str().unwrap().to_owned();
        // Node B holds it too, and must hear of every change.
        expect_json(client.get(format!("{b}/v1/products/{id}")).send().await, 200).await;
        products.push((id, name.to_string()));
    }

    let mut broken: Vec<String> = Vec::new();
    let mut slowest_on_b = Duration::ZERO;
    let mut lost_on_a = 0;
    for round in 0..PAIRS / PRODUCTS {
        // One pair per product, the products at once.
        let mut pairs = tokio::task::JoinSet::new();
        for (p, (id, _)) in products.iter().enumerate() {
            let (client, a, id, pair) = (client.clone(), a.clone(), id.clone(), round * PRODUCTS + p);
            pairs.spawn(async move {
                let patch = |price: usize| {
                    client
                        .patch(format!("{a}/v1/products/{id}"))
                        .bearer_auth(ADMIN_TOKEN)
                        .json(&json!({ "price_cents": price }))
                        .send()
                };
                let (first, second) = tokio::join!(patch(10_000 + 2 * pair), patch(10_001 + 2 * pair));
                let statuses = (first.unwrap().status().as_u16(), second.unwrap().status().as_u16());
                let served = expect_json(client.get(format!("{a}/v1/products/{id}")).send().await, 200).await;
                (pair, id, statuses, served["price_cents"].as_i64())
            });
        }
        let mut answered = Vec::new();
        while let Some(done) = pairs.join_next().await {
            let (pair, id, statuses, on_a) = done.unwrap();
            // Nothing else writes the product now: this is what the later of the two committed.
            let (_, committed) = product_in_database(&app, &id).await;
            if statuses != (200, 200) {
                broken.push(format!("pair {pair} on {id}: the PATCHes answered {statuses:?}"));
            }
            if on_a != Some(committed) {
                lost_on_a += 1;
                broken.push(format!(
                    "pair {pair} on {id}: node A served {on_a:?} after both answered; committed {committed}"
                ));
            }
            answered.push((pair, id, committed));
        }
        // Node B, within the budget.
        let mut on_b = tokio::task::JoinSet::new();
        for (pair, id, committed) in answered.clone() {
            let (client, b) = (client.clone(), b.clone());
            on_b.spawn(async move {
                let url = format!("{b}/v1/products/{id}");
                let started = Instant::now();
                loop {
                    let served = expect_json(client.get(&url).send().await, 200).await["price_cents"].clone();
                    if served == committed {
                        return Ok(started.elapsed());
                    }
                    if started.elapsed() > PRODUCT_BUDGET + SLACK / 2 {
                        return Err(format!("node B serves {served} for pair {pair} on {id}; committed {committed}"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        while let Some(took) = on_b.join_next().await {
            match took.unwrap() {
                Ok(took) => slowest_on_b = slowest_on_b.max(took),
                Err(e) => broken.push(e),
            }
        }
        // Search, once the queues drain.
        app.check_queues_drained().await;
        for (pair, id, committed) in &answered {
            let name = &products.iter().find(|(p, _)| p == id).unwrap().1;
            match search_hit(&client, &a, name, id).await {
                Some(hit) if hit["price_cents"] == *committed => {}
                hit => broken.push(format!("pair {pair}: search shows {id} as {hit:?}; committed {committed}")),
            }
        }
    }
    eprintln!(
        "{PAIRS} pairs: node A served a losing price after {lost_on_a}; node B caught up within {slowest_on_b:?} at \
         worst; {} promises broken",
        broken.len()
    );
    workers.stop().await;
    node_b.stop().await;
    assert!(broken.is_empty(), "{} promises broken:\n{}", broken.len(), broken.join("\n"));
}

/// One owner writes their cart through two nodes at once: 100 pairs, pair i setting product X to i
/// through node A and product Y to i through node B. Once both are answered, the cart on either node
/// holds X = i and Y = i, every time. Then the same with Redis hung (SIGSTOP) for about 5 s: the
/// pairs are still answered and read back, and from the moment Redis carries on (SIGCONT) — through
/// the shared tier coming back into use — every read on either node, for seconds, shows the last
/// acknowledged quantities, never what Redis held from before it hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_writing_through_two_nodes_reads_every_acknowledged_write_even_across_a_hung_redis() {
    let redis = RedisServer::start().await;
    let app = app_with_redis(&redis, &[]).await;
    let node_b = app.second_node().await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(32).build().unwrap();
    let bases = [app.address.clone(), node_b.address.clone()];
    let (_, token) = app.create_user("Two Handed").await;
    let (x, y) = (app.create_product("PAIR-X", 100, 1).await, app.create_product("PAIR-Y", 200, 1).await);
    let put = |base: &str, product: &str, quantity: usize| {
        client
            .put(format!("{base}/v1/cart/items/{product}"))
            .bearer_auth(&token)
            .json(&json!({ "quantity": quantity }))
            .send()
    };
    let expected = |i: usize| BTreeMap::from([(x.clone(), i as i64), (y.clone(), i as i64)]);
    let show =
        |cart: &BTreeMap<String, i64>| format!("X={:?} Y={:?} ({} items)", cart.get(&x), cart.get(&y), cart.len());
    let mut broken: Vec<String> = Vec::new();
    let pair = async |i: usize, broken: &mut Vec<String>| {
        let started = Instant::now();
        let (on_a, on_b) = tokio::join!(put(&bases[0], &x, i), put(&bases[1], &y, i));
        let statuses = (on_a.unwrap().status().as_u16(), on_b.unwrap().status().as_u16());
        let took = started.elapsed();
        if statuses != (200, 200) {
            broken.push(format!("pair {i}: answered {statuses:?}"));
        }
        for base in &bases {
            let served = served_cart(&client, base, &token).await;
            if served != expected(i) {
                broken.push(format!("pair {i}: {base} serves {} after both were answered", show(&served)));
            }
        }
        took
    };

    for i in 1..=100 {
        pair(i, &mut broken).await;
    }
    let with_redis = broken.len();
    eprintln!("100 pairs with Redis up: {with_redis} promises broken");

    redis.pause();
    let paused = Instant::now();
    let mut last = 100;
    let mut slowest = Duration::ZERO;
    while paused.elapsed() < Duration::from_secs(5) {
        last += 1;
        slowest = slowest.max(pair(last, &mut broken).await);
    }
    let while_hung = broken.len() - with_redis;
    eprintln!("{} pairs while Redis was hung (slowest {slowest:?}): {while_hung} promises broken", last - 100);

    redis.resume();
    let resumed = Instant::now();
    let (mut reads, mut stale) = (0, 0);
    let mut back_in_use: Option<Instant> = None;
    loop {
        for base in &bases {
            let served = served_cart(&client, base, &token).await;
            reads += 1;
            if served != expected(last) {
                stale += 1;
                if stale <= 10 {
                    broken.push(format!(
                        "{:?} after Redis carried on, {base} serves {}; the last acknowledged pair is {last}",
                        resumed.elapsed(),
                        show(&served)
                    ));
                }
            }
            // Other traffic: a product this node does not hold makes it try Redis again (once a
            // second while it counts it as down).
            let unknown = format!("{base}/v1/products/{}", uuid::Uuid::now_v7());
            assert_eq!(client.get(unknown).send().await.unwrap().status(), 404);
        }
        if back_in_use.is_none() {
            let mut up = true;
            for base in &bases {
                up &= consistency_table(&client, base).await["shared_tier"]["up"] == true;
            }
            if up {
                back_in_use = Some(Instant::now());
                eprintln!("both nodes use Redis again {:?} after it carried on", resumed.elapsed());
            }
        }
        let read_long_enough = back_in_use.is_some_and(|at| at.elapsed() >= Duration::from_secs(1));
        if resumed.elapsed() >= Duration::from_secs(3) && read_long_enough {
            break;
        }
        if resumed.elapsed() >= Duration::from_secs(15) {
            broken.push("the nodes did not use Redis again within 15 s of it carrying on".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("{reads} reads after Redis carried on: {stale} did not show pair {last}");
    if stale > 10 {
        broken.push(format!("… and {} more reads after Redis carried on that did not show pair {last}", stale - 10));
    }
    node_b.stop().await;
    assert!(broken.is_empty(), "{} promises broken:\n{}", broken.len(), broken.join("\n"));
}

/// Node A writes a product through to Redis; 2.5 s later node B, which never read it, gets 40
/// concurrent reads of it. However B serves each — from Redis, or waiting for another reader that
/// went there (a collapsed response) — the value is 2.5 s old, and every `Age` must say at least 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collapsed_responses_tell_the_age_of_what_they_serve() {
    const READERS: usize = 40;
    let redis = RedisServer::start().await;
    let app = app_with_redis(&redis, &[]).await;
    let node_b = app.second_node().await;
    let product = app.create_product("AGED", 100, 1).await;
    let rename = app.admin(app.patch(&format!("/v1/products/{product}"))).json(&json!({ "name": "Aged on A" }));
    expect_json(rename.send().await, 200).await;
    let written = Instant::now();
    // One connection per reader, open before the reads, so the reads reach node B together.
    let client = reqwest::Client::builder().pool_max_idle_per_host(READERS * 2).build().unwrap();
    let mut warming = tokio::task::JoinSet::new();
    for _ in 0..READERS {
        warming.spawn(client.get(format!("{}/healthz", node_b.address)).send());
    }
    while let Some(warmed) = warming.join_next().await {
        assert!(warmed.unwrap().unwrap().status().is_success());
    }
    tokio::time::sleep_until((written + Duration::from_millis(2_500)).into()).await;

    let start = Arc::new(tokio::sync::Barrier::new(READERS));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..READERS {
        let (client, start, url) = (client.clone(), start.clone(), format!("{}/v1/products/{product}", node_b.address));
        readers.spawn(async move {
            start.wait().await;
            let response = client.get(url).send().await.unwrap();
            let (status, age, cache_status) = (response.status().as_u16(), age(&response), cache_status(&response));
            let body: Value = response.json().await.unwrap();
            (status, age, cache_status, body["name"].clone())
        });
    }
    let mut broken = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    while let Some(read) = readers.join_next().await {
        let (status, age, cache_status, name) = read.unwrap();
        eprintln!("{status} Age: {age:?} Cache-Status: {cache_status}");
        *seen.entry(cache_status.clone()).or_default() += 1;
        if status != 200 || name != "Aged on A" {
            broken.push(format!("answered {status} with the name {name}"));
        }
        if age.is_none_or(|age| age < 2) {
            broken.push(format!("Age {age:?} ({cache_status}) for a value written {:?} earlier", written.elapsed()));
        }
    }
    eprintln!("{READERS} concurrent reads on node B: {seen:?}");
    node_b.stop().await;
    assert!(broken.is_empty(), "{} of {READERS} reads misreport:\n{}", broken.len(), broken.join("\n"));
}

/// The consistency table's `like_count` hits count reads of a like count: one product read is one,
/// whether the product was a miss (loaded from the catalogue on a node that never read it) or a hit.
#[tokio::test]
async fn one_product_read_counts_one_like_count_read() {
    let app = TestApp::spawn().await;
    let node_b = app.second_node().await;
    let product = app.create_product("COUNTED", 100, 1).await;
    let hits = async || kind_row(&consistency_table(&app.client, &node_b.address).await, "like_count")["hits"].as_u64();
    let url = format!("{}/v1/products/{product}", node_b.address);
    for read in ["a miss", "a hit"] {
        let before = hits().await.expect("like_count hits");
        let response = app.client.get(&url).send().await.unwrap();
        let status = cache_status(&response);
        expect_json(Ok(response), 200).await;
        let after = hits().await.expect("like_count hits");
        eprintln!("{read} (Cache-Status: {status}): like_count hits {before} → {after}");
        assert_eq!(
            after - before,
            1,
            "one product read, {read} ({status}), counted {} like_count reads",
            after - before
        );
    }
    node_b.stop().await;
}
