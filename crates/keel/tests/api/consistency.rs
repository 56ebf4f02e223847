//! The read path honours the consistency table: profiles cached (cache-aside, coalesced misses,
//! invalidated on write, the owner around the cache), every cacheable response saying what it
//! served, strong kinds never cached, and the table served with live counters.

use serde_json::json;

use crate::helpers::{db_queries, expect_json, expect_problem, TestApp};

fn cache_status(response: &reqwest::Response) -> String {
    response.headers().get("cache-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn a_thousand_concurrent_reads_of_a_cold_profile_cost_one_database_read() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_user("Popular").await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(1000).build().unwrap();
    let url = app.url(&format!("/v1/users/{id}"));
    let mut requests = tokio::task::JoinSet::new();
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    for _ in 0..1000 {
        let (client, url, start) = (client.clone(), url.clone(), start.clone());
        requests.spawn(async move {
            start.wait().await;
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            (db_queries(&response), cache_status(&response))
        });
    }
    let (mut queries, mut stored) = (0, 0);
    while let Some(result) = requests.join_next().await {
        let (q, status) = result.unwrap();
        queries += q;
        stored += usize::from(status.contains("fwd=miss; stored"));
        assert!(status.starts_with("keel; "), "{status:?}");
    }
    assert_eq!(queries, 1, "one database read for 1,000 concurrent requests");
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn cached_profiles_say_what_they_served_and_writes_invalidate_them() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Cached").await;
    let path = format!("/v1/users/{id}");
    let first = app.get(&path).send().await.unwrap();
    assert_eq!((cache_status(&first).as_str(), db_queries(&first)), ("keel; fwd=miss; stored; detail=primary", 1));
    assert_eq!(first.headers()["age"], "0");
    let second = app.get(&path).send().await.unwrap();
    let status = cache_status(&second);
    assert!(status.starts_with("keel; hit; ttl="), "{status}");
    let ttl: u64 = status.rsplit('=').next().unwrap().parse().unwrap();
    assert!((260..=300).contains(&ttl), "ttl {ttl} within the jittered 5 min budget");
    assert_eq!(db_queries(&second), 0);
    assert!(second.headers().contains_key("age"));
    let body: serde_json::Value = second.json().await.unwrap();
    assert!(body.get("email").is_none(), "a cached profile is the public one");

    // The owner changes it and reads their own write at once, around the cache.
    let renamed = app.patch(&path).bearer_auth(&token).json(&json!({ "name": "Renamed" })).send().await;
    expect_json(renamed, 200).await;
    let own = app.get(&path).bearer_auth(&token).send().await.unwrap();
    assert_eq!(cache_status(&own), "keel; fwd=bypass; detail=owner");
    let own: serde_json::Value = own.json().await.unwrap();
    assert_eq!((own["name"].as_str(), own["email"].is_string()), (Some("Renamed"), true));
    // Everyone else: the write invalidated the cached copy on this node.
    let other = app.get(&path).send().await.unwrap();
    assert_eq!(cache_status(&other), "keel; fwd=miss; stored; detail=primary");
    assert_eq!(other.json::<serde_json::Value>().await.unwrap()["name"], "Renamed");
}

#[tokio::test]
async fn strong_kinds_are_never_served_from_a_cache() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Strong").await;
    let product = app.create_product("STRONG", 100, 3).await;
    for _ in 0..3 {
        for response in [
            app.get(&format!("/v1/products/{product}/inventory")).send().await.unwrap(),
            app.get("/v1/wallet").bearer_auth(&token).send().await.unwrap(),
            app.get("/v1/orders").bearer_auth(&token).send().await.unwrap(),
        ] {
            assert_eq!(response.status(), 200);
            assert!(!cache_status(&response).contains("hit"), "{}", cache_status(&response));
            assert!(db_queries(&response) >= 1, "a strong read goes to the database");
        }
    }
}

#[tokio::test]
async fn the_consistency_table_is_served_with_live_counters() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Counted").await;
    for _ in 0..3 {
        app.get(&format!("/v1/users/{id}")).send().await.unwrap();
    }
    let table = expect_json(app.admin(app.get("/v1/admin/consistency")).send().await, 200).await;
    let kinds = table["kinds"].as_array().unwrap();
    let names: Vec<&str> = kinds.iter().map(|k| k["kind"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["profile", "product", "cart", "like_count", "feed", "search", "inventory", "wallet", "order", "session"]
    );
    let kind = |name: &str| kinds.iter().find(|k| k["kind"] == name).unwrap().clone();
    let profile = kind("profile");
    assert_eq!((profile["budget_s"].as_f64(), profile["policy"].as_str()), (Some(300.0), Some("cache-aside")));
    assert_eq!((profile["misses"].as_u64(), profile["hits"].as_u64()), (Some(1), Some(2)), "{profile}");
    for strong in ["inventory", "wallet", "order"] {
        assert_eq!(kind(strong)["budget_s"], 0.0);
    }
    // Counted in the like's own statement: nothing is held in memory to lose.
    assert_eq!(kind("like_count")["policy"], "counted with the row");
    assert!(kinds.iter().all(|k| k.get("loss_window_ms").is_none()), "{table}");
    // This node has no shared tier: the table says what it reads, with no Redis in it.
    assert!(table.get("shared_tier").is_none(), "{table}");
    let source = |name: &str| kind(name)["source"].as_str().unwrap().to_owned();
    assert_eq!(source("profile"), "memory → shard replica within budget, else primary");
    assert_eq!(source("product"), "memory → catalogue replica within budget, else primary");
    assert_eq!(source("cart"), "shard primary", "carts are cached only in the shared tier");
    assert_eq!(source("wallet"), "shard primary");
    for kind in kinds {
        assert!(!kind["source"].as_str().unwrap().contains("Redis"), "{kind}");
    }
    expect_problem(app.get("/v1/admin/consistency").bearer_auth(&token).send().await, 403, "admin").await;
}

#[tokio::test]
async fn products_are_written_through_and_read_from_the_cache() {
    let app = TestApp::spawn().await;
    let product = app.create_product("THROUGH", 100, 1).await;
    let path = format!("/v1/products/{product}");
    // Created through this node: cached already.
    let first = app.get(&path).send().await.unwrap();
    let status = cache_status(&first);
    assert!(status.starts_with("keel; hit; ttl="), "{status}");
    let ttl: u64 = status.rsplit('=').next().unwrap().parse().unwrap();
    assert!((50..=60).contains(&ttl), "ttl {ttl} within the jittered 60 s budget");
    let renamed = app.admin(app.patch(&path)).json(&json!({ "name": "Through, renamed" })).send().await;
    expect_json(renamed, 200).await;
    let after = app.get(&path).send().await.unwrap();
    assert!(cache_status(&after).contains("hit"), "the write went through the cache");
    assert_eq!(after.json::<serde_json::Value>().await.unwrap()["name"], "Through, renamed");
    // Repeated reads cost no product query; the like count's other-node share is cached briefly.
    let again = app.get(&path).send().await.unwrap();
    assert!(db_queries(&again) <= 1, "{}", db_queries(&again));
}

/// Every response of a cacheable kind says how it was served, also when it went around the cache:
/// product lists are not cached, and carts live only in the shared tier, absent here.
#[tokio::test]
async fn responses_that_went_around_the_cache_say_so() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Around").await;
    let product = app.create_product("AROUND", 100, 3).await;
    let list = app.get("/v1/products").send().await.unwrap();
    assert_eq!(
        (cache_status(&list).as_str(), list.headers()["age"].to_str().unwrap()),
        ("keel; fwd=bypass; detail=list", "0")
    );
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 2 }));
    expect_json(put.send().await, 200).await;
    let cart = app.get("/v1/cart").bearer_auth(&token).send().await.unwrap();
    assert_eq!(cache_status(&cart), "keel; fwd=bypass; detail=no-shared-tier");
    assert_eq!(expect_json(Ok(cart), 200).await["items"][0]["quantity"], 2);
}

/// With a shared tier the table names it among the sources of the kinds it holds.
#[tokio::test]
async fn with_redis_the_consistency_table_names_the_shared_tier() {
    let redis = crate::peers::RedisServer::start().await;
    let url = redis.url();
    let app = TestApp::spawn_with(move |config| config.redis_url = Some(url)).await;
    let table = expect_json(app.admin(app.get("/v1/admin/consistency")).send().await, 200).await;
    assert_eq!(table["shared_tier"]["up"], true, "{table}");
    let kinds = table["kinds"].as_array().unwrap();
    let source = |name: &str| {
        let kind = kinds.iter().find(|k| k["kind"] == name).unwrap();
        kind["source"].as_str().unwrap().to_owned()
    };
    assert_eq!(source("profile"), "memory → Redis → shard replica within budget, else primary");
    assert_eq!(source("product"), "memory → Redis → catalogue replica within budget, else primary");
    assert_eq!(source("cart"), "Redis → shard primary");
    assert_eq!(source("wallet"), "shard primary", "strong kinds are never cached, with Redis or not");
}
