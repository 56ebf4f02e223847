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
    expect_problem(array, 422, "JSON object").await;
    let bad_email = post().json(&json!({ "name": "Ada", "email": "not-an-address" })).send().await;
    expect_problem(bad_email, 422, "e-mail").await;
    // An address the mailer would refuse is refused at sign-up, not retried as mail for hours.
    let unmailable = post().json(&json!({ "name": "Ada", "email": "a,b@example.org" })).send().await;
    expect_problem(unmailable, 422, "e-mail").await;
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
        ("POST", format!("/v1/admin/users/{user_id}/deposits")),
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

/// Words of the implementation (Rust types, serde's vocabulary) that a problem must never show.
const RUST_WORDS: &[&str] = &[
    "struct ",
    "u32",
    "i64",
    "u64",
    "usize",
    "floating point",
    "enum ",
    "Vec",
    "Option",
    "String",
    "sequence",
    "invalid type",
    "CreateUser",
    "CreateProduct",
    "Failed to deserialize",
];

/// The detail of a problem, after checking its status and that it names no Rust type.
async fn detail_of(response: reqwest::Result<reqwest::Response>, status: u16, mentions: &[&str]) -> String {
    let problem = expect_problem(response, status, mentions[0]).await;
    let detail = problem["detail"].as_str().unwrap().to_owned();
    for word in RUST_WORDS {
        assert!(!detail.contains(word), "{detail:?} mentions {word:?}");
    }
    for mention in mentions {
        assert!(detail.contains(mention), "{detail:?} should mention {mention:?}");
    }
    detail
}

#[tokio::test]
async fn problems_describe_the_request_in_json_terms_not_rust_types() {
    let app = TestApp::spawn().await;
    let user = |body: &str| app.post("/v1/users").header("content-type", "application/json").body(body.to_owned());
    let product = |body: &str| {
        app.admin(app.post("/v1/products")).header("content-type", "application/json").body(body.to_owned())
    };

    // An array where an object is expected; an array with the fields in order is no object either.
    detail_of(user("[1, 2]").send().await, 422, &["body", "must be a JSON object", "array"]).await;
    detail_of(user("[]").send().await, 422, &["must be a JSON object"]).await;
    detail_of(user(r#"["Ada", "ada@example.org", null]"#).send().await, 422, &["must be a JSON object"]).await;
    detail_of(user(r#""Ada""#).send().await, 422, &["must be a JSON object", "string"]).await;
    // Integers too large, as digits and with an exponent: the field and the range, not a float.
    let range = "whole number from -9223372036854775808 to 9223372036854775807";
    let huge = r#"{"sku": "S", "name": "n", "price_cents": 100000000000000000000000, "stock": 1}"#;
    detail_of(product(huge).send().await, 422, &["price_cents", range]).await;
    let exponent = r#"{"sku": "S", "name": "n", "price_cents": 1, "stock": 1e23}"#;
    detail_of(product(exponent).send().await, 422, &["stock", range]).await;
    let beyond = r#"{"sku": "S", "name": "n", "price_cents": 1, "stock": 1e400}"#;
    detail_of(product(beyond).send().await, 422, &["stock", "too large"]).await;
    let fraction = r#"{"sku": "S", "name": "n", "price_cents": 1.5, "stock": 1}"#;
    detail_of(product(fraction).send().await, 422, &["price_cents", "whole number", "1.5"]).await;
    // A string where a number is expected, and the other way round.
    let string = r#"{"sku": "S", "name": "n", "price_cents": "12", "stock": 1}"#;
    detail_of(product(string).send().await, 422, &["price_cents", "whole number", "string \"12\""]).await;
    detail_of(user(r#"{"name": 5, "email": "a@b.co"}"#).send().await, 422, &["name", "must be a string"]).await;
    // A missing field, an unknown one.
    let missing = r#"{"sku": "S", "name": "n", "stock": 1}"#;
    detail_of(product(missing).send().await, 422, &["price_cents", "required"]).await;
    let unknown = r#"{"name": "Ada", "email": "a@b.co", "nmae": "x"}"#;
    detail_of(user(unknown).send().await, 422, &["nmae", "not a field", "name, email, bio"]).await;
    // Values of types no field takes here: objects, arrays, booleans, null.
    for (body, field, got) in [
        (r#"{"name": {"first": "Ada"}, "email": "a@b.co"}"#, "name", "an object"),
        (r#"{"name": "Ada", "email": ["a@b.co"]}"#, "email", "an array"),
        (r#"{"name": "Ada", "email": true}"#, "email", "true"),
        (r#"{"name": null, "email": "a@b.co"}"#, "name", "null"),
        (r#"{"name": "Ada", "email": "a@b.co", "bio": 7}"#, "bio", "the number 7"),
    ] {
        detail_of(user(body).send().await, 422, &[field, "must be a string", got]).await;
    }
    let events = r#"{"url": "https://example.org/hook", "events": ["product.created", 5]}"#;
    let webhook = app.admin(app.post("/v1/webhooks")).header("content-type", "application/json").body(events);
    detail_of(webhook.send().await, 422, &["events[1]", "must be a string", "the number 5"]).await;
    let events = r#"{"url": "https://example.org/hook", "events": "product.created"}"#;
    let webhook = app.admin(app.post("/v1/webhooks")).header("content-type", "application/json").body(events);
    detail_of(webhook.send().await, 422, &["events", "must be a JSON array", "string"]).await;
    // Not JSON at all: 400, with where it went wrong.
    detail_of(user(r#"{"name": "Ada",}"#).send().await, 400, &["not valid JSON", "line 1"]).await;
    detail_of(user(r#"{"name": "Ada", "email": "a@b.co"} {}"#).send().await, 400, &["not valid JSON"]).await;

    // Query strings and paths: the parameter, in words.
    detail_of(app.get("/v1/products?limit=ten").send().await, 400, &["limit", "whole number"]).await;
    detail_of(app.get("/v1/products?limit=99999999999999999999").send().await, 400, &["limit", "whole number"]).await;
    detail_of(app.get("/v1/products?limit=1&limit=2").send().await, 400, &["limit", "more than once"]).await;
    detail_of(app.get("/v1/search?q=x&limit=").send().await, 400, &["limit", "whole number"]).await;
    detail_of(app.get("/v1/products/%FF%FE").send().await, 400, &["id", "UTF-8"]).await;
}

/// 400 when a request cannot be read at all; 422 when it can, but a value is out of range.
#[tokio::test]
async fn query_values_out_of_range_are_422_and_unreadable_ones_400() {
    let app = TestApp::spawn().await;
    let lists = ["/v1/products?", "/v1/search?q=x&", "/v1/webhooks?"];
    let get = |path: String| {
        let request = app.get(&path);
        if path.starts_with("/v1/webhooks") {
            app.admin(request)
        } else {
            request
        }
    };
    for list in lists {
        for query in ["limit=0", "limit=-1", "limit=101", "limit=1000"] {
            detail_of(get(format!("{list}{query}")).send().await, 422, &["limit", "from 1 to 100"]).await;
        }
        for query in ["limit=ten", "limit=1.5", "cursor=nonsense", "cursor=20", "limit=5&cursor=%00"] {
            let what = query.split(['=', '&']).next().unwrap();
            let what = if query.contains("cursor") { "cursor" } else { what };
            detail_of(get(format!("{list}{query}")).send().await, 400, &[what]).await;
        }
    }
    let (_, token) = app.create_user("Pager").await;
    let orders = app.get("/v1/orders?limit=0").bearer_auth(&token).send().await;
    detail_of(orders, 422, &["limit"]).await;
    // An empty or too long q is a value out of range too.
    detail_of(app.get("/v1/search?q=").send().await, 422, &["q"]).await;
    detail_of(app.get(&format!("/v1/search?q={}", "a".repeat(201))).send().await, 422, &["q", "200"]).await;
}
