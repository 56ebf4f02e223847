use serde_json::Value;

use crate::helpers::{expect_json, expect_problem, TestApp};

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::spawn().await;
    assert_eq!(expect_json(app.get("/healthz").send().await, 200).await["status"], "alive");
    assert_eq!(expect_json(app.get("/readyz").send().await, 200).await["status"], "ready");

    // A shard whose schema is behind this binary makes the node unready, and says which and why.
    let shard = app.dbs.shard(1).await;
    shard.execute("DELETE FROM keel_migrations", &[]).await.unwrap();
    expect_problem(app.get("/readyz").send().await, 503, "shard1 is at schema version 0").await;
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_show_the_pools() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_user("Metered").await;
    expect_json(app.get(&format!("/v1/users/{id}")).send().await, 200).await;
    let response = app.get("/metrics").send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let has = |needle: &str| text.lines().any(|l| l.contains(needle));
    assert!(has(r#"keel_http_requests_total{method="GET",route="/v1/users/{id}",status="200"}"#), "{text}");
    assert!(has(r#"keel_http_request_duration_seconds_bucket{method="POST",route="/v1/users",status="201""#));
    assert!(has("keel_http_db_queries_per_request_bucket"));
    for db in ["catalog", "shard0", "shard1"] {
        assert!(has(&format!(r#"keel_db_pool_connections{{db="{db}",state="idle"}}"#)), "pool gauge for {db}");
        assert!(has(&format!(r#"keel_db_pool_max_connections{{db="{db}"}} 8"#)), "pool size for {db}");
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let given = app.get("/healthz").header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(given.headers()["x-request-id"], "trace-me-42");
    let made = app.get("/v1/nothing").send().await.unwrap();
    assert_eq!(made.headers()["x-request-id"].len(), 32);
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let app = TestApp::spawn().await;
    let doc = expect_json(app.get("/openapi.json").send().await, 200).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    let expected: &[(&str, &[&str])] = &[
        ("/v1/users", &["post"]),
        ("/v1/users/{id}", &["get", "patch"]),
        ("/v1/products", &["get", "post"]),
        ("/v1/products/{id}", &["get", "patch"]),
        ("/v1/products/{id}/inventory", &["get", "put"]),
        ("/v1/cart", &["get"]),
        ("/v1/cart/items/{product_id}", &["put", "delete"]),
        ("/v1/wallet", &["get"]),
        ("/v1/wallet/deposits", &["post"]),
    ];
    for (path, methods) in expected {
        let item = paths.get(*path).unwrap_or_else(|| panic!("{path} is not documented"));
        for method in *methods {
            assert!(item.get(*method).is_some(), "{method} {path} is not documented");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in ["Problem", "Profile", "CreatedUser", "Product", "Cart", "DepositMade"] {
        assert!(schemas.contains_key(schema), "schema {schema} is missing");
    }
    let product: &Value = &schemas["Product"]["properties"];
    assert_eq!(product["price_cents"]["type"], "integer");
}

/// Every route the server answers, by method.
const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
    ("/openapi.json", &["get"]),
    ("/v1/users", &["post"]),
    ("/v1/users/{id}", &["get", "patch"]),
    ("/v1/products", &["get", "post"]),
    ("/v1/products/{id}", &["get", "patch"]),
    ("/v1/products/{id}/inventory", &["get", "put"]),
    ("/v1/products/{id}/like", &["put", "delete"]),
    ("/v1/cart", &["get"]),
    ("/v1/cart/items/{product_id}", &["put", "delete"]),
    ("/v1/wallet", &["get"]),
    ("/v1/wallet/deposits", &["post"]),
    ("/v1/checkout", &["post"]),
    ("/v1/orders", &["get"]),
    ("/v1/orders/{id}", &["get"]),
    ("/v1/search", &["get"]),
    ("/v1/admin/queues", &["get"]),
    ("/v1/admin/jobs/{id}/retry", &["post"]),
    ("/v1/admin/consistency", &["get"]),
    ("/v1/webhooks", &["get", "post"]),
    ("/v1/webhooks/{id}", &["delete"]),
    ("/v1/webhooks/{id}/deliveries", &["get"]),
    ("/v1/webhooks/{id}/deliveries/{delivery_id}/retry", &["post"]),
];

/// The routes answered and the routes documented are the same: each of [`ROUTES`] is in the
/// document, and each operation of the document is answered (not "no such route", not 405).
#[tokio::test]
async fn every_route_the_server_answers_is_in_the_openapi_document() {
    let app = TestApp::spawn().await;
    let doc = expect_json(app.get("/openapi.json").send().await, 200).await;
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in ROUTES {
        let item = paths.get(*path).unwrap_or_else(|| panic!("{path} is not documented"));
        for method in *methods {
            assert!(item.get(*method).is_some(), "{method} {path} is not documented");
        }
    }
    // The operational routes say what they answer.
    let responses = |path: &str| doc["paths"][path]["get"]["responses"].clone();
    assert!(responses("/healthz")["200"]["content"]["application/json"].is_object());
    assert!(responses("/readyz")["200"].is_object() && responses("/readyz")["503"].is_object());
    let metrics = responses("/metrics")["200"]["content"].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert!(metrics.iter().all(|t| t.starts_with("text/plain")) && !metrics.is_empty(), "{metrics:?}");
    assert!(responses("/openapi.json")["200"]["content"]["application/json"].is_object());

    let id = uuid::Uuid::now_v7().to_string();
    for (path, item) in paths {
        let concrete: String =
            path.split('/').map(|s| if s.starts_with('{') { id.as_str() } else { s }).collect::<Vec<_>>().join("/");
        for method in item.as_object().unwrap().keys() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            // Unauthenticated, without a body: nothing is changed.
            let request = app.client.request(method.to_uppercase().parse().unwrap(), app.url(&concrete));
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert_ne!(status, 405, "{method} {path} is documented, not answered: {body}");
            assert!(!(status == 404 && body.contains("no such route")), "{method} {path} is documented, not answered");
        }
    }
}
