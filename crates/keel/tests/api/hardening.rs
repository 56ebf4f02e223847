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
    for i in 0..1_000 {
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

/// The value of a metric series of a `/metrics` text, by its exact name and labels.
fn series(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// 10,000 reads of unknown users' profiles from clients that hang up at once, against a `keel serve`
/// process: every cache load they began ends — the flight map is empty again — and the server's
/// memory grows by less than 20 MB. (A load whose callers had all gone used to stay in the map.)
#[tokio::test]
async fn abandoned_reads_leave_no_load_behind_and_no_memory() {
    use tokio::io::AsyncWriteExt;
    let dbs = crate::helpers::TestDatabases::create(true).await;
    let scratch = crate::processes::scratch_dir("abandoned-reads");
    let env = vec![
        ("KEEL_CATALOG_URL", dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("KEEL_RATE_LIMIT", "off".to_owned()),
    ];
    let mut keel = crate::processes::Keel::start(&["serve"], &env, &scratch.join("serve.log"));
    keel.wait_ready(Duration::from_secs(60)).await;
    let address = keel.address.trim_start_matches("http://").to_owned();
    let abandon = |count: usize| {
        let address = address.clone();
        async move {
            let mut clients = tokio::task::JoinSet::new();
            for worker in 0..50 {
                let address = address.clone();
                clients.spawn(async move {
                    for _ in (worker..count).step_by(50) {
                        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
                        let id = uuid::Uuid::now_v7();
                        let request = format!("GET /v1/users/{id} HTTP/1.1\r\nhost: keel\r\n\r\n");
                        stream.write_all(request.as_bytes()).await.unwrap();
                        // Gone before the answer: the connection is closed, unread.
                        drop(stream);
                    }
                });
            }
            while let Some(done) = clients.join_next().await {
                done.unwrap();
            }
        }
    };
    // Warm up first: allocator arenas, pools and caches reach their working size.
    abandon(1_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = keel.resident_bytes();
    abandon(10_000).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let in_flight = loop {
        let metrics = client.get(format!("{}/metrics", keel.address)).send().await.unwrap().text().await.unwrap();
        let in_flight = series(&metrics, r#"keel_cache_loads_in_flight{kind="profile"}"#);
        if in_flight == Some(0.0) || started.elapsed() > Duration::from_secs(10) {
            break in_flight;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let grown = keel.resident_bytes().saturating_sub(before);
    eprintln!("10,000 abandoned reads: resident memory grew by {:.1} MB", grown as f64 / 1e6);
    assert_eq!(in_flight, Some(0.0), "profile loads still in flight after every client left");
    assert!(grown < 20_000_000, "resident memory grew by {grown} bytes");
    // And the server still answers.
    let unknown = client.get(format!("{}/v1/users/{}", keel.address, uuid::Uuid::now_v7())).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
}

/// A read whose database connection dies under it (an administrator ending sessions here; a restart
/// or a failover does the same) is run once more, on a new connection: the client gets its answer,
/// not a 503. A write that lost its connection is not run again (whether it committed is unknown):
/// it is a 503 with `Retry-After`, for the client to retry with its Idempotency-Key.
#[tokio::test]
async fn a_read_whose_connection_died_is_run_once_more_and_a_write_is_not() {
    let app = TestApp::spawn().await;
    let (user, token) = app.create_user("Reto Retry").await;
    let user_id: uuid::Uuid = user.parse().unwrap();
    let mut home = None;
    for i in 0..crate::helpers::SHARDS {
        let shard = app.dbs.shard(i).await;
        if shard.query_opt("SELECT 1 FROM users WHERE id = $1", &[&user_id]).await.unwrap().is_some() {
            home = Some(i);
        }
    }
    let shard_url = &app.dbs.shard_urls[home.expect("the user's shard")];
    let maintenance = crate::helpers::connect(&crate::helpers::cluster().maintenance_url()).await;
    // Runs `request` while a lock holds its first statement on the user's shard, ends the session that
    // statement runs on, then lets the lock go: the request's answer.
    let cut_under = |request: reqwest::RequestBuilder| {
        let (maintenance, shard_url) = (&maintenance, shard_url.clone());
        async move {
            let locker = crate::helpers::connect(&shard_url).await;
            let database: String = locker.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
            locker.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE").await.unwrap();
            let answer = tokio::spawn(request.send());
            let started = Instant::now();
            let waiting = loop {
                let sql = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'";
                if let Some(row) = maintenance.query_opt(sql, &[&database]).await.unwrap() {
                    break row.get::<_, i32>(0);
                }
                assert!(started.elapsed() < Duration::from_secs(10), "the request never waited on the lock");
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            maintenance.execute("SELECT pg_terminate_backend($1)", &[&waiting]).await.unwrap();
            locker.batch_execute("COMMIT").await.unwrap();
            answer.await.unwrap().unwrap()
        }
    };

    let read = cut_under(app.get(&format!("/v1/users/{user}")).bearer_auth(&token)).await;
    assert_eq!(read.status(), 200, "the read was run again on a new connection");
    assert_eq!(read.json::<serde_json::Value>().await.unwrap()["id"], user.as_str());

    let product = app.create_product("RETRY-1", 100, 5).await;
    let write = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 1 }));
    let write = cut_under(write).await;
    assert_eq!(write.status(), 503, "a write is not run again");
    assert_eq!(write.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
}
