use serde_json::{json, Value};

use crate::helpers::{expect_json, expect_problem, TestApp};

/// Places an order for what is in the user's cart; returns the Location and the 202 body.
async fn checkout(app: &TestApp, token: &str, key: &str) -> (String, Value) {
    let response = app.post("/v1/checkout").bearer_auth(token).header("idempotency-key", key).send().await.unwrap();
    let location = response.headers().get("location").map(|l| l.to_str().unwrap().to_owned());
    let body = expect_json(Ok(response), 202).await;
    (location.expect("a 202 names where to look"), body)
}

async fn add_to_cart(app: &TestApp, token: &str, product: &str, quantity: i64) {
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(token).json(&json!({ "quantity": quantity }));
    expect_json(put.send().await, 200).await;
}

async fn stock(app: &TestApp, product: &str) -> i64 {
    expect_json(app.get(&format!("/v1/products/{product}/inventory")).send().await, 200).await["stock"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn a_checkout_is_accepted_then_confirmed_by_the_saga() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, token) = app.create_user("Buyer").await;
    expect_json(Ok(app.deposit(&token, "d1", 10_000).await), 201).await;
    let anchor = app.create_product("ANCHOR", 1250, 5).await;
    add_to_cart(&app, &token, &anchor, 2).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .post("/v1/checkout")
        .bearer_auth(&token)
        .header("idempotency-key", "order-1")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted = expect_json(Ok(response), 202).await;
    assert_eq!(accepted["status"], "pending");
    assert_eq!(location, format!("/v1/orders/{}", accepted["id"].as_str().unwrap()));
    // The same key names the same order, Location and all.
    let (again_location, again) = checkout(&app, &token, "order-1").await;
    assert_eq!((again_location, again), (location.clone(), accepted.clone()));

    let order = app.wait_for_order(&token, &location).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["total_cents"], 2500);
    assert_eq!(order["items"], json!([{ "product_id": anchor, "quantity": 2, "price_cents": 1250 }]));
    assert!(order["failure_reason"].is_null());
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"], 7500);
    assert_eq!(stock(&app, &anchor).await, 3);
    let cart = expect_json(app.get("/v1/cart").bearer_auth(&token).send().await, 200).await;
    assert_eq!(cart["items"], json!([]), "a confirmed order clears its items from the cart");

    // The event the request caused, and the one its saga emitted, carry the request's trace.
    let mut traced = Vec::new();
    for i in 0..crate::helpers::SHARDS {
        let shard = app.dbs.shard(i).await;
        let orders = shard.query("SELECT kind, traceparent FROM keel_jobs WHERE kind LIKE 'order.%' ORDER BY id", &[]);
        for row in orders.await.unwrap() {
            traced.push((row.get::<_, String>(0), row.get::<_, Option<String>>(1).unwrap_or_default()));
        }
    }
    let kinds: Vec<&str> = traced.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["order.placed", "order.confirmed"]);
    assert!(traced.iter().all(|(_, t)| t.starts_with(&format!("00-{trace_id}-"))), "{traced:?}");

    let listed = expect_json(app.get("/v1/orders").bearer_auth(&token).send().await, 200).await;
    assert_eq!(listed["items"][0]["id"], accepted["id"]);
    // Another user cannot see it.
    let (_, other) = app.create_user("Other").await;
    expect_problem(app.get(&location).bearer_auth(&other).send().await, 404, "order").await;
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

#[tokio::test]
async fn refusals_fail_the_order_with_a_reason_and_give_the_stock_back() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, poor) = app.create_user("Poor").await;
    expect_json(Ok(app.deposit(&poor, "d", 100).await), 201).await;
    let boat = app.create_product("BOAT", 5_000, 3).await;
    add_to_cart(&app, &poor, &boat, 1).await;
    let (location, _) = checkout(&app, &poor, "k").await;
    let order = app.wait_for_order(&poor, &location).await;
    assert_eq!(
        (order["status"].as_str(), order["failure_reason"].as_str()),
        (Some("failed"), Some("insufficient_funds"))
    );
    assert_eq!(stock(&app, &boat).await, 3, "the reservation was released");
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&poor).send().await, 200).await["balance_cents"], 100);

    let (_, rich) = app.create_user("Rich").await;
    expect_json(Ok(app.deposit(&rich, "d", 1_000_000).await), 201).await;
    add_to_cart(&app, &rich, &boat, 4).await;
    let (location, _) = checkout(&app, &rich, "k").await;
    let order = app.wait_for_order(&rich, &location).await;
    assert_eq!(order["failure_reason"], "out_of_stock");
    assert_eq!(stock(&app, &boat).await, 3);

    let (_, empty) = app.create_user("Empty").await;
    let response = app.post("/v1/checkout").bearer_auth(&empty).header("idempotency-key", "k").send().await;
    expect_problem(response, 422, "cart is empty").await;
    let no_key = app.post("/v1/checkout").bearer_auth(&rich).send().await;
    expect_problem(no_key, 400, "Idempotency-Key").await;
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

#[tokio::test]
async fn with_the_workers_paused_a_checkout_is_still_accepted_and_pending() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Patient").await;
    expect_json(Ok(app.deposit(&token, "d", 10_000).await), 201).await;
    let product = app.create_product("P", 100, 10).await;
    add_to_cart(&app, &token, &product, 1).await;
    let (location, _) = checkout(&app, &token, "k").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let order = expect_json(app.get(&location).bearer_auth(&token).send().await, 200).await;
    assert_eq!(order["status"], "pending");
    assert_eq!(stock(&app, &product).await, 10, "nothing happens until a worker runs");

    let workers = app.start_workers();
    assert_eq!(app.wait_for_order(&token, &location).await["status"], "confirmed");
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

/// 40 users who can all pay race for the last 10 units, with two sets of workers competing.
#[tokio::test]
async fn no_oversell_when_forty_buyers_race_for_ten_units() {
    let app = TestApp::spawn().await;
    let product = app.create_product("LAST-TEN", 700, 10).await;
    let mut buyers = Vec::new();
    for i in 0..40 {
        let (_, token) = app.create_user(&format!("buyer{i}")).await;
        expect_json(Ok(app.deposit(&token, "d", 1_000).await), 201).await;
        add_to_cart(&app, &token, &product, 1).await;
        buyers.push(token);
    }
    let workers = [app.start_workers(), app.start_workers()];
    let mut placed = tokio::task::JoinSet::new();
    for token in buyers.clone() {
        let request = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "race");
        placed.spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 202);
            (token, response.headers()["location"].to_str().unwrap().to_owned())
        });
    }
    let mut outcomes = std::collections::HashMap::new();
    while let Some(result) = placed.join_next().await {
        let (token, location) = result.unwrap();
        let order = app.wait_for_order(&token, &location).await;
        let balance =
            expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"].as_i64();
        let outcome = order["failure_reason"].as_str().unwrap_or("confirmed").to_owned();
        let expected_balance = if outcome == "confirmed" { 300 } else { 1_000 };
        assert_eq!(balance, Some(expected_balance), "{outcome}: wallet agrees with the order");
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    assert_eq!(outcomes.get("confirmed"), Some(&10), "{outcomes:?}");
    assert_eq!(outcomes.get("out_of_stock"), Some(&30), "{outcomes:?}");
    assert_eq!(stock(&app, &product).await, 0);
    app.check_queues_drained().await;
    for w in workers {
        w.stop().await;
    }
    app.check_invariants().await;
}
