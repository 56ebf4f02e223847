//! What a client or a webhook endpoint could do to the server by sending odd input: grow the metrics
//! without bound with made-up methods, stall a delivery with a NUL or a huge error body; and what
//! the server owes to secrets: the scheme of `Authorization` in any case, a token never cached.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{expect_json, TestApp, ADMIN_TOKEN};
use crate::peers::{Receiver, Reply};

/// The methods that keep a label of their own in the request metrics.
const STANDARD_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"];

/// The `keel_http_requests_total` series whose method is not a standard one. The registry is shared
/// by every app in this binary, so this counts only what no other test makes.
async fn odd_method_series(app: &TestApp) -> Vec<String> {
    let text = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("keel_http_requests_total{"))
        .filter(|l| !STANDARD_METHODS.iter().any(|m| l.contains(&format!(r#"method="{m}""#))))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn made_up_methods_do_not_make_new_metric_series() {
    let app = TestApp::spawn().await;
    let before = odd_method_series(&app).await;
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("JUNK{i}").as_bytes()).unwrap();
        // A route that exists (answered 405) and one that does not (404).
        let path = if i % 2 == 0 { "/v1/products" } else { "/v1/no-such-route" };
        let status = app.client.request(method, app.url(path)).send().await.unwrap().status();
        assert!(status.is_client_error(), "{status}");
    }
    let after = odd_method_series(&app).await;
    assert!(after.len() <= before.len() + 4, "{} series became {}: {after:#?}", before.len(), after.len());
    assert!(after.iter().all(|l| l.contains(r#"method="OTHER""#)), "{after:#?}");
}

#[tokio::test]
async fn an_error_body_with_a_nul_and_a_megabyte_is_kept_as_a_clean_excerpt() {
    // Retried only after an hour: the delivery stays `retrying`, where the test reads it.
    let app = TestApp::spawn_with(|config| config.webhook_retry_schedule = vec![Duration::from_secs(3600)]).await;
    let mut body = b"bad\0news ".to_vec();
    body.resize(body.len() + (1 << 20), b'x');
    let failing = Reply { body: Box::leak(body.into_boxed_slice()), ..Reply::status(500) };
    let receiver = Receiver::start(vec![], failing).await;
    let created =
        app.admin(app.post("/v1/webhooks")).json(&json!({ "url": receiver.url, "events": ["product.created"] }));
    let webhook = expect_json(created.send().await, 201).await;
    let workers = app.start_workers();
    app.create_product("NUL-1", 100, 1).await;

    let path = format!("/v1/webhooks/{}/deliveries", webhook["id"].as_str().unwrap());
    let started = Instant::now();
    let delivery = loop {
        let page = expect_json(app.admin(app.get(&path)).send().await, 200).await;
        if let Some(found) = page["items"].as_array().unwrap().iter().find(|d| d["status"] == "retrying") {
            break found.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no retrying delivery: {page:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((delivery["attempts"].as_i64(), delivery["last_status_code"].as_i64()), (Some(1), Some(500)));
    // The NUL is gone, and of the megabyte only the excerpt's 200 characters are kept.
    let expected = format!("HTTP 500: badnews {}", "x".repeat(192));
    assert_eq!(delivery["last_error"].as_str(), Some(expected.as_str()), "{delivery:#}");
    assert_eq!(receiver.received().len(), 1);
    workers.stop().await;
}

#[tokio::test]
async fn the_sign_up_answer_with_the_token_is_not_to_be_stored() {
    let app = TestApp::spawn().await;
    let signed_up = app.post("/v1/users").json(&json!({ "name": "Secret", "email": "secret@example.org" }));
    let response = signed_up.send().await.unwrap();
    assert_eq!(response.headers().get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
    assert!(expect_json(Ok(response), 201).await["token"].is_string());
}

#[tokio::test]
async fn the_bearer_scheme_is_read_in_any_case() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Shouty").await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let wallet = app.get("/v1/wallet").header("authorization", format!("{scheme} {token}"));
        expect_json(wallet.send().await, 200).await;
        let webhooks = app.get("/v1/webhooks").header("authorization", format!("{scheme} {ADMIN_TOKEN}"));
        expect_json(webhooks.send().await, 200).await;
    }
    // A wrong token is refused whatever the case of its scheme.
    let last = if token.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &token[..token.len() - 1]);
    let refused = app.get("/v1/wallet").header("authorization", format!("bearer {forged}")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
}

/// IPv6 forms that carry an IPv4 address lead where that address does: IPv4-compatible, 6to4 and
/// NAT64 addresses for 127.0.0.1 or the metadata service are refused like the address itself. The
/// app runs with production's policy (tests otherwise allow loopback).
#[tokio::test]
async fn ipv6_addresses_carrying_an_inside_ipv4_address_are_refused() {
    let app = TestApp::spawn_with(|config| config.webhook_allow_loopback = Some(false)).await;
    for (host, mentions) in [
        ("[::7f00:1]", "127.0.0.1"),
        ("[::a9fe:a9fe]", "169.254.169.254"),
        ("[::ffff:7f00:1]", "127.0.0.1"),
        ("[2002:7f00:1::]", "127.0.0.1"),
        ("[2002:a9fe:a9fe::]", "169.254.169.254"),
        ("[64:ff9b::7f00:1]", "127.0.0.1"),
        ("[64:ff9b::a9fe:a9fe]", "169.254.169.254"),
        ("[64:ff9b:1::a9fe:a9fe]", "KEEL_WEBHOOK_ALLOW_PRIVATE"),
        ("[fec0::1]", "KEEL_WEBHOOK_ALLOW_PRIVATE"),
    ] {
        let body = json!({ "url": format!("http://{host}:8080/hook"), "events": ["product.created"] });
        let created = app.admin(app.post("/v1/webhooks")).json(&body).send().await;
        crate::helpers::expect_problem(created, 422, mentions).await;
    }
    // One carrying a public address is an ordinary subscription.
    let body = json!({ "url": "http://[2002:808:808::]/hook", "events": ["product.created"] });
    expect_json(app.admin(app.post("/v1/webhooks")).json(&body).send().await, 201).await;
}
