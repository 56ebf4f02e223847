use serde_json::json;

use crate::helpers::{expect_json, expect_problem, TestApp};

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
    assert_eq!(stock, json!({ "product_id": id, "stock": 3 }));

    let (_, user) = app.create_user("Shopper").await;
    expect_problem(app.put(&path).bearer_auth(&user).json(&json!({ "stock": 9 })).send().await, 403, "admin").await;
    expect_problem(app.admin(app.put(&path)).json(&json!({ "stock": -1 })).send().await, 422, "stock").await;
    let set = expect_json(app.admin(app.put(&path)).json(&json!({ "stock": 9 })).send().await, 200).await;
    assert_eq!(set["stock"], 9);
    assert_eq!(expect_json(app.get(&path).send().await, 200).await["stock"], 9);

    let missing = format!("/v1/products/{}/inventory", uuid::Uuid::now_v7());
    expect_problem(app.get(&missing).send().await, 404, "product").await;
    expect_problem(app.admin(app.put(&missing)).json(&json!({ "stock": 1 })).send().await, 404, "product").await;
}
