use serde_json::json;

use crate::helpers::{db_queries, expect_json, expect_problem, TestApp};

#[tokio::test]
async fn a_cart_holds_priced_items_and_forgets_removed_ones() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Shopper").await;
    let anchor = app.create_product("ANCHOR", 1250, 10).await;
    let rope = app.create_product("ROPE", 300, 10).await;

    let empty = expect_json(app.get("/v1/cart").bearer_auth(&token).send().await, 200).await;
    assert_eq!(empty, json!({ "items": [], "total_cents": 0, "version": 0 }));

    let put = |product: &str, quantity: i64| {
        app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": quantity }))
    };
    expect_json(put(&anchor, 2).send().await, 200).await;
    let cart = expect_json(put(&rope, 3).send().await, 200).await;
    assert_eq!(
        cart,
        json!({ "items": [
            { "product_id": anchor, "quantity": 2, "price_cents": 1250 },
            { "product_id": rope, "quantity": 3, "price_cents": 300 },
        ], "total_cents": 3400, "version": 2 }),
        "each change of the owner's counts in the cart's version"
    );
    // Setting a quantity replaces it; 0 removes the item.
    let cart = expect_json(put(&anchor, 1).send().await, 200).await;
    assert_eq!(cart["total_cents"], 2150);
    let cart = expect_json(put(&anchor, 0).send().await, 200).await;
    assert_eq!(cart["items"].as_array().unwrap().len(), 1);
    let cart = expect_json(app.delete(&format!("/v1/cart/items/{rope}")).bearer_auth(&token).send().await, 200).await;
    assert_eq!(cart, json!({ "items": [], "total_cents": 0, "version": 5 }));
    // Removing what is not there is fine.
    expect_json(app.delete(&format!("/v1/cart/items/{rope}")).bearer_auth(&token).send().await, 200).await;
}

#[tokio::test]
async fn carts_are_private_and_checked() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Shopper").await;
    let (_, other) = app.create_user("Other").await;
    let product = app.create_product("P", 100, 1).await;
    let path = format!("/v1/cart/items/{product}");
    expect_problem(app.get("/v1/cart").send().await, 401, "token").await;
    expect_problem(app.put(&path).json(&json!({ "quantity": 1 })).send().await, 401, "token").await;

    expect_json(app.put(&path).bearer_auth(&token).json(&json!({ "quantity": 4 })).send().await, 200).await;
    let others = expect_json(app.get("/v1/cart").bearer_auth(&other).send().await, 200).await;
    assert_eq!(others["items"].as_array().unwrap().len(), 0, "another user's cart is their own");

    let missing = format!("/v1/cart/items/{}", uuid::Uuid::now_v7());
    expect_problem(app.put(&missing).bearer_auth(&token).json(&json!({ "quantity": 1 })).send().await, 404, "product")
        .await;
    for bad in [json!({ "quantity": -1 }), json!({ "quantity": 1001 }), json!({ "quantity": 1.5 }), json!({})] {
        expect_problem(app.put(&path).bearer_auth(&token).json(&bad).send().await, 422, "quantity").await;
    }
}

/// No N+1: reading a cart costs the same number of queries with one item as with ten.
#[tokio::test]
async fn reading_a_cart_costs_a_fixed_number_of_queries() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Shopper").await;
    let mut products = Vec::new();
    for i in 0..10 {
        products.push(app.create_product(&format!("N-{i}"), 100, 5).await);
    }
    let mut costs = Vec::new();
    for (i, product) in products.iter().enumerate() {
        let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 1 }));
        expect_json(put.send().await, 200).await;
        let response = app.get("/v1/cart").bearer_auth(&token).send().await.unwrap();
        costs.push(db_queries(&response));
        let cart = expect_json(Ok(response), 200).await;
        assert_eq!(cart["items"].as_array().unwrap().len(), i + 1);
    }
    // None to check the token (it is signed), one for the cart rows, one for their prices.
    assert!(costs.iter().all(|c| *c == 2), "queries per GET /v1/cart as it grows: {costs:?}");
}

/// Money is checked arithmetic: a cart whose total does not fit in 64 bits of cents is refused with
/// a 422 that says so, never priced with a wrapped number. No price the API accepts can get there
/// (at most 10^11 cents, 1,000 of each); a price set behind its back can.
#[tokio::test]
async fn a_cart_total_too_large_to_represent_is_refused() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Whale").await;
    let product = app.create_product("HUGE", 100, 10).await;
    let id = uuid::Uuid::parse_str(&product).unwrap();
    let catalog = app.dbs.catalog().await;
    catalog.execute("UPDATE products SET price_cents = $2 WHERE id = $1", &[&id, &(1i64 << 62)]).await.unwrap();

    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 2 }));
    expect_problem(put.send().await, 422, "too large").await;
    expect_problem(app.get("/v1/cart").bearer_auth(&token).send().await, 422, "too large").await;
    let checkout = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "k");
    expect_problem(checkout.send().await, 422, "too large").await;
    // One of them fits.
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 1 }));
    assert_eq!(expect_json(put.send().await, 200).await["total_cents"], 1i64 << 62);
}
