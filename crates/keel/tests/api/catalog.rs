use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, expect_problem, TestApp, SHARDS};

#[tokio::test]
async fn the_admin_creates_and_changes_products() {
    let app = TestApp::spawn().await;
    let body = json!({ "sku": "ANC-1", "name": "Anchor", "description": "Heavy", "price_cents": 1250, "stock": 7 });
    expect_problem(app.post("/v1/products").json(&body).send().await, 401, "admin").await;
    let (_, user) = app.create_user("Shopper").await;
    expect_problem(app.post("/v1/products").bearer_auth(&user).json(&body).send().await, 403, "admin").await;

    let created = expect_json(app.admin(app.post("/v1/products")).json(&body).send().await, 201).await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(created["sku"], "ANC-1");
    assert_eq!(created["price_cents"], 1250);
    assert_eq!(created["like_count"], 0);
    let read = expect_json(app.get(&format!("/v1/products/{id}")).send().await, 200).await;
    assert_eq!(read, created);

    let duplicate = app.admin(app.post("/v1/products")).json(&body).send().await;
    expect_problem(duplicate, 409, "ANC-1").await;

    let patch = json!({ "name": "Big anchor", "price_cents": 1999 });
    let changed = expect_json(app.admin(app.patch(&format!("/v1/products/{id}"))).json(&patch).send().await, 200).await;
    assert_eq!(changed["name"], "Big anchor");
    assert_eq!(changed["price_cents"], 1999);
    assert_eq!(changed["description"], "Heavy");
    let other = app.create_product("OTHER", 5, 1).await;
    let clash = app.admin(app.patch(&format!("/v1/products/{other}"))).json(&json!({ "sku": "ANC-1" })).send().await;
    expect_problem(clash, 409, "ANC-1").await;
    let missing = uuid::Uuid::now_v7();
    let absent = app.admin(app.patch(&format!("/v1/products/{missing}"))).json(&patch).send().await;
    expect_problem(absent, 404, "product").await;
}

#[tokio::test]
async fn product_fields_are_validated() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({ "sku": "", "name": "n", "price_cents": 1, "stock": 1 }), "sku"),
        (json!({ "sku": "has space", "name": "n", "price_cents": 1, "stock": 1 }), "sku"),
        (json!({ "sku": "S", "name": "", "price_cents": 1, "stock": 1 }), "name"),
        (json!({ "sku": "S", "name": "n", "price_cents": -1, "stock": 1 }), "price_cents"),
        (json!({ "sku": "S", "name": "n", "price_cents": 1, "stock": -5 }), "stock"),
        (json!({ "sku": "S", "name": "n", "price_cents": 1e20, "stock": 1 }), "price_cents"),
        (json!({ "sku": "S", "name": "n", "price_cents": 1, "stock": 10_000_000_000_i64 }), "stock"),
        (json!({ "sku": "S", "name": "n", "price_cents": "12", "stock": 1 }), "price_cents"),
        (json!({ "sku": "S", "name": "n", "stock": 1 }), "price_cents"),
    ];
    for (body, field) in cases {
        let response = app.admin(app.post("/v1/products")).json(&body).send().await;
        expect_problem(response, 422, field).await;
    }
}

#[tokio::test]
async fn products_are_listed_in_stable_keyset_pages() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for i in 0..25 {
        created.push(app.create_product(&format!("SKU-{i:02}"), 100 + i, 1).await);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/products?limit=10&cursor={c}"),
            None => "/v1/products?limit=10".to_owned(),
        };
        let page = expect_json(app.get(&path).send().await, 200).await;
        pages += 1;
        seen.extend(page["items"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert!(!next.contains(seen.last().unwrap().as_str()), "the cursor is opaque: {next}");
                cursor = Some(next.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "every product once, in creation order");

    let default_page = expect_json(app.get("/v1/products").send().await, 200).await;
    assert_eq!(default_page["items"].as_array().unwrap().len(), 20);

    // Out of range: 422. Not readable at all (not a number, a cursor this API did not issue): 400.
    for (bad, status) in
        [("limit=0", 422), ("limit=101", 422), ("limit=-1", 422), ("limit=ten", 400), ("cursor=nonsense", 400)]
    {
        let response = app.get(&format!("/v1/products?{bad}")).send().await;
        expect_problem(response, status, bad.split('=').next().unwrap()).await;
    }
    // A bare id, as cursors were before they became opaque, still continues after that id.
    let after_tenth =
        expect_json(app.get(&format!("/v1/products?limit=1&cursor={}", created[9])).send().await, 200).await;
    assert_eq!(after_tenth["items"][0]["id"], created[10].as_str());
}

#[tokio::test]
async fn inventory_is_read_by_anyone_and_set_by_the_admin() {
    let app = TestApp::spawn().await;
    let id = app.create_product("INV-1", 500, 3).await;
    let path = format!("/v1/products/{id}/inventory");
    let stock = expect_json(app.get(&path).send().await, 200).await;
    assert_eq!(stock, json!({ "product_id": id, "stock": 3, "on_hand": 3, "reserved": 0, "sold": 0, "version": 1 }));

    let (_, user) = app.create_user("Shopper").await;
    expect_problem(app.put(&path).bearer_auth(&user).json(&json!({ "stock": 9 })).send().await, 403, "admin").await;
    expect_problem(app.admin(app.put(&path)).json(&json!({ "stock": -1 })).send().await, 422, "stock").await;
    expect_problem(app.admin(app.put(&path)).json(&json!({ "on_hand": -1 })).send().await, 422, "on_hand").await;
    expect_problem(app.admin(app.put(&path)).json(&json!({})).send().await, 422, "on_hand").await;
    let both = json!({ "on_hand": 9, "stock": 9 });
    expect_problem(app.admin(app.put(&path)).json(&both).send().await, 422, "not both").await;
    // `stock` is the name of before for the units on hand; with nothing reserved, all can be taken.
    let set = expect_json(app.admin(app.put(&path)).json(&json!({ "stock": 9 })).send().await, 200).await;
    assert_eq!(set, json!({ "product_id": id, "stock": 9, "on_hand": 9, "reserved": 0, "sold": 0, "version": 2 }));
    let set = expect_json(app.admin(app.put(&path)).json(&json!({ "on_hand": 8 })).send().await, 200).await;
    assert_eq!((set["on_hand"].as_i64(), set["stock"].as_i64(), set["version"].as_i64()), (Some(8), Some(8), Some(3)));
    assert_eq!(expect_json(app.get(&path).send().await, 200).await, set);

    let missing = format!("/v1/products/{}/inventory", uuid::Uuid::now_v7());
    expect_problem(app.get(&missing).send().await, 404, "product").await;
    expect_problem(app.admin(app.put(&missing)).json(&json!({ "stock": 1 })).send().await, 404, "product").await;
}

async fn inventory(app: &TestApp, product: &str) -> Value {
    expect_json(app.get(&format!("/v1/products/{product}/inventory")).send().await, 200).await
}

/// The regression of item 10: a reservation outstanding while the admin sets the stock, then
/// released, used to add its units on top of what the admin set (units that were never there). Now
/// the admin sets the units on hand, reserved ones included; a release only frees what was reserved,
/// and setting fewer on hand than are reserved is refused.
#[tokio::test]
async fn stock_the_admin_sets_while_an_order_holds_some_is_not_inflated_by_its_release() {
    let app = TestApp::spawn_with(|config| {
        config.saga_backoff_max = Duration::from_millis(10);
        config.saga_lock_timeout = Duration::from_millis(20);
    })
    .await;
    let (user, token) = app.create_user("Short").await;
    expect_json(Ok(app.deposit(&token, "d", 100).await), 201).await;
    let product = app.create_product("HELD", 1_000, 5).await;
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 3 }));
    expect_json(put.send().await, 200).await;

    let response = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "k").send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    expect_json(Ok(response), 202).await;
    // Hold the order's row, so that the saga reserves the stock and then waits to decide the order.
    let user_id = uuid::Uuid::parse_str(&user).unwrap();
    let order_id = uuid::Uuid::parse_str(location.trim_start_matches("/v1/orders/")).unwrap();
    let mut holder = None;
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        if shard.query_opt("SELECT 1 FROM users WHERE id = $1", &[&user_id]).await.unwrap().is_some() {
            holder = Some(shard);
        }
    }
    let mut holder = holder.expect("the user's shard");
    let order_row = holder.transaction().await.unwrap();
    order_row.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", &[&order_id]).await.unwrap();
    let workers = app.start_workers();
    let started = Instant::now();
    while inventory(&app, &product).await["reserved"] != 3 {
        assert!(started.elapsed() < Duration::from_secs(10), "the saga never reserved");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A stock count while 3 are held for the pending order: 10 in the shop, those 3 included.
    let path = format!("/v1/products/{product}/inventory");
    let below = app.admin(app.put(&path)).json(&json!({ "on_hand": 2 })).send().await;
    expect_problem(below, 409, "3 units reserved").await;
    let set = expect_json(app.admin(app.put(&path)).json(&json!({ "on_hand": 10 })).send().await, 200).await;
    assert_eq!(
        (set["on_hand"].as_i64(), set["reserved"].as_i64(), set["stock"].as_i64()),
        (Some(10), Some(3), Some(7))
    );

    // The order's row is free again; the wallet is short of money: the order fails and its 3 units
    // are released.
    order_row.rollback().await.unwrap();
    let order = app.wait_for_order(&token, &location).await;
    assert_eq!(order["failure_reason"], "insufficient_funds", "{order}");
    let after = app.settled_inventory(&product).await;
    assert_eq!(
        (after["on_hand"].as_i64(), after["reserved"].as_i64(), after["sold"].as_i64(), after["stock"].as_i64()),
        (Some(10), Some(0), Some(0), Some(10)),
        "the release freed the reserved units and added none: {after}"
    );
    assert!(after["version"].as_i64() > set["version"].as_i64(), "every write bumps the version");
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}
