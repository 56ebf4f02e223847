//! Two API nodes sharing the databases and a real redis-server (the second cache tier and the
//! channel of invalidations): a change on one node reaches the other within a second, an owner
//! reads their own writes through either node, and a randomized run of concurrent reads and writes
//! — with Redis killed and restarted in the middle — serves nothing older than its kind's budget,
//! strong kinds always at their latest, and no 5xx.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, TestApp};
use crate::peers::RedisServer;

pub(crate) fn cache_status(response: &reqwest::Response) -> String {
    response.headers().get("cache-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

/// An app whose node uses `redis` as the shared tier, with the given kinds' budgets overridden.
pub(crate) async fn app_with_redis(redis: &RedisServer, budgets: &[(&str, Duration)]) -> TestApp {
    let url = redis.url();
    let budgets: Vec<_> = budgets.iter().map(|(k, b)| (keel::consistency::DataKind::parse(k).unwrap(), *b)).collect();
    TestApp::spawn_with(move |config| {
        config.redis_url = Some(url);
        config.consistency_budgets = budgets;
    })
    .await
}

/// Polls `read` on a node until `done` holds; panics after `within`. Returns how long it took.
async fn served_within(within: Duration, mut read: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !read().await {
        assert!(started.elapsed() < within, "not served within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn a_change_on_node_a_is_served_by_node_b_within_a_second() {
    let redis = RedisServer::start().await;
    let app = app_with_redis(&redis, &[]).await;
    let node_b = app.second_node().await;
    let client = &app.client;
    let product = app.create_product("SHARED", 100, 5).await;
    let on_b = format!("{}/v1/products/{product}", node_b.address);
    // Node A wrote it through to Redis: node B's first read is a shared hit, and B then serves it from
    // memory. (Not always from the second read: if A's invalidation message for the creation reaches
    // B after B read Redis, B does not keep what it read — the safe side of that race.)
    let first = client.get(&on_b).send().await.unwrap();
    assert!(cache_status(&first).contains("hit") && cache_status(&first).contains("detail=shared"), "{first:?}");
    served_within(Duration::from_secs(1), async || {
        let status = cache_status(&client.get(&on_b).send().await.unwrap());
        status.starts_with("keel; hit;") && !status.contains("shared")
    })
    .await;

    let renamed = app.admin(app.patch(&format!("/v1/products/{product}"))).json(&json!({ "name": "Renamed on A" }));
    expect_json(renamed.send().await, 200).await;
    let took = served_within(Duration::from_secs(1), async || {
        expect_json(client.get(&on_b).send().await, 200).await["name"] == "Renamed on A"
    })
    .await;
    eprintln!("product change on A served by B after {took:?}");

    // Profiles (cache-aside): B has one cached; the owner changes it through A.
    let (user, token) = app.create_user("Before").await;
    let profile_on_b = format!("{}/v1/users/{user}", node_b.address);
    for _ in 0..2 {
        expect_json(client.get(&profile_on_b).send().await, 200).await;
    }
    let patch = app.patch(&format!("/v1/users/{user}")).bearer_auth(&token).json(&json!({ "name": "After" }));
    expect_json(patch.send().await, 200).await;
    served_within(Duration::from_secs(1), async || {
        expect_json(client.get(&profile_on_b).send().await, 200).await["name"] == "After"
    })
    .await;

    // Carts: the owner writes through one node and reads through the other at once, from Redis.
    let put = |base: &str, quantity: i64| {
        client
            .put(format!("{base}/v1/cart/items/{product}"))
            .bearer_auth(&token)
            .json(&json!({ "quantity": quantity }))
            .send()
    };
    let read_cart = |base: &str| client.get(format!("{base}/v1/cart")).bearer_auth(&token).send();
    for (writer, reader, quantity) in [(&app.address, &node_b.address, 2), (&node_b.address, &app.address, 3)] {
        expect_json(put(writer, quantity).await, 200).await;
        let response = read_cart(reader).await.unwrap();
        assert!(cache_status(&response).contains("hit; ttl="), "{}", cache_status(&response));
        let cart = expect_json(Ok(response), 200).await;
        assert_eq!(cart["items"][0]["quantity"], quantity, "the owner reads their own write on the other node");
    }
    node_b.stop().await;
}

/// What a writer did: version n (1-based) was sent at `sent[n-1]` and acknowledged at `acked[n-1]`.
#[derive(Default)]
struct WriteLog {
    sent: Vec<Instant>,
    acked: Vec<Instant>,
}

/// One read: which version it saw, when it was sent, its status and `Age`.
struct Read {
    kind: ReadKind,
    version: usize,
    started: Instant,
    status: u16,
    age: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ReadKind {
    ProductPublic,
    ProfilePublic,
    ProfileOwner,
    CartOwner,
    Wallet,
}

impl ReadKind {
    const ALL: [ReadKind; 5] = [
        ReadKind::ProductPublic,
        ReadKind::ProfilePublic,
        ReadKind::ProfileOwner,
        ReadKind::CartOwner,
        ReadKind::Wallet,
    ];

    /// The write log it reads from, and whether it must reflect every write acknowledged before it
    /// began (strong kinds, and an owner reading their own writes).
    fn log_and_strong(self) -> (&'static str, bool) {
        match self {
            ReadKind::ProductPublic => ("product", false),
            ReadKind::ProfilePublic => ("profile", false),
            ReadKind::ProfileOwner => ("profile", true),
            ReadKind::CartOwner => ("cart", true),
            ReadKind::Wallet => ("wallet", true),
        }
    }
}

fn version_of(name: &Value) -> usize {
    name.as_str().and_then(|n| n.strip_prefix('v')).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// xorshift: a reproducible stream of choices.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[tokio::test]
async fn a_randomized_two_node_run_serves_nothing_older_than_its_budget_even_when_redis_dies() {
    const RUN: Duration = Duration::from_secs(6);
    let budgets = [("profile", Duration::from_secs(1)), ("product", Duration::from_secs(1))];
    let mut redis = RedisServer::start().await;
    let app = app_with_redis(&redis, &budgets).await;
    let node_b = app.second_node().await;
    let bases = Arc::new([app.address.clone(), node_b.address.clone()]);
    let product = app.create_product("RANDOM", 100, 5).await;
    expect_json(
        app.admin(app.patch(&format!("/v1/products/{product}"))).json(&json!({"name": "v0"})).send().await,
        200,
    )
    .await;
    let (user, token) = app.create_user("v0").await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(32).build().unwrap();
    let logs: Arc<Mutex<HashMap<&'static str, WriteLog>>> = Arc::default();
    let reads: Arc<Mutex<Vec<Read>>> = Arc::default();
    let deadline = Instant::now() + RUN;

    // One sequential writer per kind: versions are totally ordered. Products and profiles are
    // written through node A only, so node B depends on invalidations (and, while Redis is down,
    // on its budgets); the owner's cart and wallet through either node.
    let mut tasks = tokio::task::JoinSet::new();
    for (kind, seed) in [("product", 1u64), ("profile", 2), ("cart", 3), ("wallet", 4)] {
        let (client, bases, logs, token, product, user) =
            (client.clone(), bases.clone(), logs.clone(), token.clone(), product.clone(), user.clone());
        tasks.spawn(async move {
            let mut seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut n = 0usize;
            while Instant::now() < deadline {
                n += 1;
                let base = match kind {
                    "product" | "profile" => &bases[0],
                    _ => &bases[(next(&mut seed) % 2) as usize],
                };
                let request = match kind {
                    "product" => client
                        .patch(format!("{base}/v1/products/{product}"))
                        .bearer_auth(crate::helpers::ADMIN_TOKEN)
                        .json(&json!({ "name": format!("v{n}") })),
                    "profile" => client
                        .patch(format!("{base}/v1/users/{user}"))
                        .bearer_auth(&token)
                        .json(&json!({ "name": format!("v{n}") })),
                    "cart" => client
                        .put(format!("{base}/v1/cart/items/{product}"))
                        .bearer_auth(&token)
                        .json(&json!({ "quantity": n })),
                    _ => client
                        .post(format!("{base}/v1/admin/users/{user}/deposits"))
                        .bearer_auth(crate::helpers::ADMIN_TOKEN)
                        .header("idempotency-key", format!("random-{n}"))
                        .json(&json!({ "amount_cents": 1 })),
                };
                let sent = Instant::now();
                let status = request.send().await.unwrap().status().as_u16();
                assert!(status < 300, "{kind} write {n} answered {status}");
                let acked = Instant::now();
                {
                    let mut logs = logs.lock().unwrap();
                    let log = logs.entry(kind).or_default();
                    log.sent.push(sent);
                    log.acked.push(acked);
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
    }
    // Readers: random kinds through random nodes.
    for reader in 0..6u64 {
        let (client, bases, reads, token, product, user) =
            (client.clone(), bases.clone(), reads.clone(), token.clone(), product.clone(), user.clone());
        tasks.spawn(async move {
            let mut seed = (reader + 11).wrapping_mul(0x2545_f491_4f6c_dd1d);
            while Instant::now() < deadline {
                let kind = ReadKind::ALL[(next(&mut seed) % 5) as usize];
                let base = &bases[(next(&mut seed) % 2) as usize];
                let request = match kind {
                    ReadKind::ProductPublic => client.get(format!("{base}/v1/products/{product}")),
                    ReadKind::ProfilePublic => client.get(format!("{base}/v1/users/{user}")),
                    ReadKind::ProfileOwner => client.get(format!("{base}/v1/users/{user}")).bearer_auth(&token),
                    ReadKind::CartOwner => client.get(format!("{base}/v1/cart")).bearer_auth(&token),
                    ReadKind::Wallet => client.get(format!("{base}/v1/wallet")).bearer_auth(&token),
                };
                let started = Instant::now();
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let age = response.headers().get("age").map_or(0, |a| a.to_str().unwrap().parse().unwrap());
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let version = match kind {
                    ReadKind::ProductPublic | ReadKind::ProfilePublic | ReadKind::ProfileOwner => {
                        version_of(&body["name"])
                    }
                    ReadKind::CartOwner => body["items"][0]["quantity"].as_u64().unwrap_or(0) as usize,
                    ReadKind::Wallet => body["balance_cents"].as_u64().unwrap_or(0) as usize,
                };
                reads.lock().unwrap().push(Read { kind, version, started, status, age });
            }
        });
    }
    // Chaos: Redis dies a third of the way in and comes back (empty) at two thirds.
    let port = redis.port;
    tokio::time::sleep(RUN / 3).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for base in bases.iter() {
        let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "Redis is optional: {base} stays ready");
    }
    let table = expect_json(app.admin(app.get("/v1/admin/consistency")).send().await, 200).await;
    assert_eq!(table["shared_tier"]["up"], false, "the outage is reported: {}", table["shared_tier"]);
    tokio::time::sleep(RUN / 3 - Duration::from_millis(300)).await;
    let _redis = RedisServer::start_on(port).await;
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let table = expect_json(app.admin(app.get("/v1/admin/consistency")).send().await, 200).await;
    assert_eq!(table["shared_tier"]["up"], true, "the shared tier is used again: {}", table["shared_tier"]);

    let logs = std::mem::take(&mut *logs.lock().unwrap());
    let reads = std::mem::take(&mut *reads.lock().unwrap());
    let budget = |log: &str| budgets.iter().find(|(k, _)| *k == log).map_or(Duration::from_secs(10), |(_, b)| *b);
    let mut worst: HashMap<ReadKind, (usize, Duration)> = HashMap::new();
    for read in reads.iter() {
        let (log_name, strong) = read.kind.log_and_strong();
        assert_eq!(read.status, 200, "a {:?} read answered {}", read.kind, read.status);
        let log = &logs[log_name];
        assert!(read.version <= log.sent.len(), "{:?} served v{}, never written", read.kind, read.version);
        // Stale by at least this much: the next version was acknowledged before this read began.
        let stale_by =
            log.acked.get(read.version).map_or(Duration::ZERO, |next| read.started.saturating_duration_since(*next));
        assert!(
            stale_by <= budget(log_name),
            "a {:?} read served v{} {stale_by:?} after v{} was acknowledged (budget {:?})",
            read.kind,
            read.version,
            read.version + 1,
            budget(log_name)
        );
        assert!(read.age <= budget(log_name).as_secs(), "{:?} Age {} over budget", read.kind, read.age);
        if strong {
            // Every write acknowledged before the read began is in it.
            let acknowledged = log.acked.iter().take_while(|acked| **acked <= read.started).count();
            assert!(
                read.version >= acknowledged,
                "a {:?} read saw v{} after v{acknowledged} was acknowledged",
                read.kind,
                read.version
            );
        }
        let entry = worst.entry(read.kind).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(stale_by);
    }
    for (kind, (count, stale)) in &worst {
        eprintln!("{kind:?}: {count} reads, most stale {stale:?}");
    }
    assert_eq!(worst.len(), ReadKind::ALL.len(), "every kind was read");
    assert!(worst.values().all(|(count, _)| *count > 20), "every kind was read often: {worst:?}");
    node_b.stop().await;
}
