//! Bad input of every kind gets a clear 4xx problem: never a 500, a panic or a dropped connection.

use serde_json::json;

use crate::helpers::{expect_problem, TestApp, ADMIN_TOKEN};

#[tokio::test]
async fn malformed_bodies_get_clear_problems() {
    let app = TestApp::spawn().await;
    let post = || app.post("/v1/users");

    let syntax = post().header("content-type", "application/json").body("{\"name\": ").send().await;
    expect_problem(syntax, 400, "EOF").await;
    let not_json = post().header("content-type", "text/plain").body("name=ada").send().await;
    expect_problem(not_json, 415, "application/json").await;
    let no_type = post().body("{}").send().await;
    expect_problem(no_type, 415, "application/json").await;
    let wrong_type = post().json(&json!({ "name": 5, "email": "a@b.co" })).send().await;
    expect_problem(wrong_type, 422, "name").await;
    let missing = post().json(&json!({ "name": "Ada" })).send().await;
    expect_problem(missing, 422, "email").await;
    let unknown = post().json(&json!({ "name": "Ada", "email": "a@b.co", "nmae": "x" })).send().await;
    expect_problem(unknown, 422, "nmae").await;
    let array = post().json(&json!([1, 2])).send().await;
    expect_problem(array, 422, "").await;
    let bad_email = post().json(&json!({ "name": "Ada", "email": "not-an-address" })).send().await;
    expect_problem(bad_email, 422, "e-mail").await;
    let long_name = post().json(&json!({ "name": "x".repeat(101), "email": "a@b.co" })).send().await;
    expect_problem(long_name, 422, "name").await;
    let control = post().json(&json!({ "name": "A\u{0}da", "email": "a@b.co" })).send().await;
    expect_problem(control, 422, "control").await;
    let invalid_utf8 =
        post().header("content-type", "application/json").body(vec![b'"', 0xff, 0xfe, b'"']).send().await;
    let status = invalid_utf8.unwrap().status().as_u16();
    assert!((400..500).contains(&status), "invalid UTF-8: {status}");
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_refused() {
    let app = TestApp::spawn().await;
    let bio = "x".repeat((1 << 20) + 10);
    let response =
        app.post("/v1/users").json(&json!({ "name": "Big", "email": "big@example.org", "bio": bio })).send().await;
    expect_problem(response, 413, "1 MiB").await;
    // The connection pool still works afterwards.
    assert_eq!(app.get("/healthz").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn routes_methods_and_credentials_are_checked() {
    let app = TestApp::spawn().await;
    expect_problem(app.get("/v1/nothing-here").send().await, 404, "route").await;
    expect_problem(app.delete("/v1/users").send().await, 405, "method").await;
    expect_problem(app.get("/v1/wallet").header("authorization", "Basic abc").send().await, 401, "Bearer").await;
    expect_problem(app.get("/v1/wallet").bearer_auth("garbage").send().await, 401, "not valid").await;
    let forged = format!("{}.{}", uuid::Uuid::now_v7(), "0".repeat(64));
    expect_problem(app.get("/v1/wallet").bearer_auth(forged).send().await, 401, "not valid").await;
    expect_problem(app.get("/v1/wallet").bearer_auth(ADMIN_TOKEN).send().await, 403, "user").await;
}

/// A battery of hostile inputs against every route: whatever comes back is a 4xx problem.
#[tokio::test]
async fn no_input_produces_a_server_error() {
    let app = TestApp::spawn().await;
    let (user_id, token) = app.create_user("Target").await;
    let product = app.create_product("TARGET", 100, 1).await;
    let routes = [
        ("POST", "/v1/users".to_owned()),
        ("PATCH", format!("/v1/users/{user_id}")),
        ("POST", "/v1/products".to_owned()),
        ("PATCH", format!("/v1/products/{product}")),
        ("PUT", format!("/v1/products/{product}/inventory")),
        ("PUT", format!("/v1/cart/items/{product}")),
        ("POST", "/v1/wallet/deposits".to_owned()),
        ("POST", "/v1/webhooks".to_owned()),
    ];
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"{}".to_vec(),
        b"[]".to_vec(),
        b"\"string\"".to_vec(),
        b"{\"quantity\": 99999999999999999999999}".to_vec(),
        b"{\"amount_cents\": -9223372036854775808}".to_vec(),
        b"{\"stock\": 1e400}".to_vec(),
        b"{\"price_cents\": null, \"name\": {}}".to_vec(),
        b"{\"name\": \"\\ud800\"}".to_vec(),
        b"{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{".to_vec(),
        "[".repeat(10_000).into_bytes(),
        vec![0xff; 64],
    ];
    for (method, path) in &routes {
        for auth in [None, Some(token.as_str()), Some(ADMIN_TOKEN)] {
            for body in &bodies {
                let mut request = app
                    .client
                    .request(method.parse().unwrap(), app.url(path))
                    .header("content-type", "application/json")
                    .header("idempotency-key", "fuzz")
                    .body(body.clone());
                if let Some(auth) = auth {
                    request = request.bearer_auth(auth);
                }
                let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path}: dropped: {e}"));
                let status = response.status().as_u16();
                assert!(
                    (400..500).contains(&status),
                    "{method} {path} with {:?}: {status}",
                    String::from_utf8_lossy(&body[..body.len().min(40)])
                );
                assert_eq!(response.headers()["content-type"], "application/problem+json");
            }
        }
    }
    for query in ["limit=99999999999999999999", "limit=1&limit=2", "cursor=%00", "limit=%ff"] {
        for path in ["/v1/products?", "/v1/search?q=x&"] {
            let status = app.get(&format!("{path}{query}")).send().await.unwrap().status().as_u16();
            assert_eq!(status, 400, "{path}{query}");
        }
        let webhooks = app.admin(app.get(&format!("/v1/webhooks?{query}"))).send().await.unwrap();
        assert_eq!(webhooks.status(), 400, "/v1/webhooks?{query}");
    }
}
