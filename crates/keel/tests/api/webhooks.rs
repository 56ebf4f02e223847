//! Webhooks against real HTTP receivers: retries on a schedule with one `webhook-id`, signatures
//! checked by the reference library, dead letters and replay, 410 Gone, per-endpoint isolation and
//! the network policy.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, expect_problem, TestApp};
use crate::peers::{free_port, verify_with_reference_library, Receiver, Reply};

async fn subscribe(app: &TestApp, url: &str, events: &[&str]) -> Value {
    let body = json!({ "url": url, "events": events });
    expect_json(app.admin(app.post("/v1/webhooks")).json(&body).send().await, 201).await
}

async fn deliveries(app: &TestApp, webhook: &str) -> Vec<Value> {
    let page = expect_json(app.admin(app.get(&format!("/v1/webhooks/{webhook}/deliveries"))).send().await, 200).await;
    page["items"].as_array().unwrap().clone()
}

/// Polls the webhook's deliveries until one is in `status`.
async fn wait_for_delivery(app: &TestApp, webhook: &str, status: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let items = deliveries(app, webhook).await;
        if let Some(found) = items.iter().find(|d| d["status"] == status) {
            return found.clone();
        }
        assert!(started.elapsed() < within, "no {status} delivery within {within:?}: {items:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn schedule(waits: &str) -> impl FnOnce(&mut keel::config::Config) + '_ {
    move |config| {
        config.webhook_retry_schedule =
            waits.split(',').map(|w| humantime::parse_duration(w).unwrap()).collect::<Vec<_>>();
    }
}

#[tokio::test]
async fn an_endpoint_failing_twice_gets_the_event_three_times_with_one_id_and_valid_signatures() {
    let app = TestApp::spawn_with(schedule("1s,1s,1s")).await;
    let receiver = Receiver::start(vec![Reply::status(500), Reply::status(500)], Reply::status(200)).await;
    let webhook = subscribe(&app, &receiver.url, &["product.created"]).await;
    let secret = webhook["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    let workers = app.start_workers();

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let created = app
        .admin(app.post("/v1/products"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&json!({ "sku": "HOOK-1", "name": "Hook", "price_cents": 100, "stock": 1 }))
        .send()
        .await;
    let product = expect_json(created, 201).await;

    receiver.wait_for(3, Duration::from_secs(15)).await;
    // Nothing more comes once it was delivered.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let received = receiver.received();
    assert_eq!(received.len(), 3, "exactly three attempts");
    let id = received[0].header("webhook-id").to_owned();
    assert!(!id.is_empty());
    assert!(received.iter().all(|r| r.header("webhook-id") == id), "one webhook-id across retries");
    assert!(received.iter().all(|r| r.body == received[0].body), "the same body every time");
    let body = received[0].json();
    assert_eq!(body["type"], "product.created");
    assert_eq!(body["data"]["id"], product["id"]);
    assert_eq!(body["data"]["name"], "Hook");
    assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
    verify_with_reference_library(secret, &received);

    let delivery = wait_for_delivery(&app, webhook["id"].as_str().unwrap(), "succeeded", Duration::from_secs(5)).await;
    assert_eq!(delivery["attempts"], 3);
    assert_eq!(delivery["last_status_code"], 200);
    assert_eq!(delivery["event_id"], id.as_str());
    assert_eq!(delivery["event_type"], "product.created");
    assert_eq!(delivery["trace_id"], trace_id, "the delivery record names the request's trace");
    app.check_queues_drained().await;
    workers.stop().await;
}

#[tokio::test]
async fn an_endpoint_down_for_the_whole_schedule_ends_dead_and_a_replay_delivers() {
    let app = TestApp::spawn_with(schedule("200ms,200ms")).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let webhook = subscribe(&app, &url, &["user.registered"]).await;
    let webhook_id = webhook["id"].as_str().unwrap().to_owned();
    let workers = app.start_workers();
    let (user, _) = app.create_user("Dora").await;

    let dead = wait_for_delivery(&app, &webhook_id, "dead", Duration::from_secs(15)).await;
    assert_eq!(dead["attempts"], 3, "the first attempt and one per wait of the schedule");
    assert!(dead["last_status_code"].is_null());
    assert!(dead["last_error"].as_str().unwrap().contains("connect"), "{dead}");
    assert!(dead["next_attempt_at"].is_null());
    let queues = expect_json(app.admin(app.get("/v1/admin/queues")).send().await, 200).await;
    let dead_jobs: i64 = queues["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kind"] == "webhook.deliver")
        .map(|k| k["dead"].as_i64().unwrap())
        .sum();
    assert_eq!(dead_jobs, 1, "{queues}");

    // The endpoint comes back; the dead delivery is replayed and arrives once.
    let receiver = Receiver::start_on(port, vec![], Reply::status(204)).await;
    let retry = format!("/v1/webhooks/{webhook_id}/deliveries/{}/retry", dead["id"].as_str().unwrap());
    let replayed = expect_json(app.admin(app.post(&retry)).send().await, 202).await;
    assert_eq!(replayed["status"], "pending");
    let received = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received[0].json()["data"]["user_id"], user.as_str());
    let delivered = wait_for_delivery(&app, &webhook_id, "succeeded", Duration::from_secs(5)).await;
    assert_eq!(delivered["attempts"], 4);
    assert_eq!(delivered["last_status_code"], 204);
    expect_problem(app.admin(app.post(&retry)).send().await, 409, "only a dead delivery").await;
    let unknown = format!("/v1/webhooks/{webhook_id}/deliveries/{}/retry", uuid::Uuid::now_v7());
    expect_problem(app.admin(app.post(&unknown)).send().await, 404, "delivery").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.received().len(), 1);
    app.check_queues_drained().await;
    workers.stop().await;
}

#[tokio::test]
async fn gone_disables_the_subscription() {
    let app = TestApp::spawn_with(schedule("100ms")).await;
    let receiver = Receiver::start(vec![], Reply::status(410)).await;
    let webhook = subscribe(&app, &receiver.url, &["product.created", "product.updated"]).await;
    let webhook_id = webhook["id"].as_str().unwrap();
    let workers = app.start_workers();
    let product = app.create_product("GONE-1", 100, 1).await;
    let dead = wait_for_delivery(&app, webhook_id, "dead", Duration::from_secs(10)).await;
    assert_eq!((dead["attempts"].as_i64(), dead["last_status_code"].as_i64()), (Some(1), Some(410)), "{dead}");
    let listed = expect_json(app.admin(app.get("/v1/webhooks")).send().await, 200).await;
    assert_eq!(listed["items"][0]["enabled"], false, "{listed}");
    assert!(listed["items"][0]["disabled_reason"].as_str().unwrap().contains("410"));
    assert!(listed["items"][0].get("secret").is_none(), "the secret is shown only at creation");

    // Later events make no deliveries to a disabled subscription.
    let rename = app.admin(app.patch(&format!("/v1/products/{product}"))).json(&json!({ "name": "Renamed" }));
    expect_json(rename.send().await, 200).await;
    app.check_queues_drained().await;
    workers.stop().await;
    assert_eq!(deliveries(&app, webhook_id).await.len(), 1);
    assert_eq!(receiver.received().len(), 1);
}

/// 80 events to a slow endpoint (4 s per answer) and a fast one: with one queue and 64 slots, the
/// slow deliveries alone could hold every slot; held to 16 at a time, the fast endpoint gets all
/// its events while the slow one is still on its first few.
#[tokio::test]
async fn a_slow_endpoint_does_not_delay_the_others() {
    let app = TestApp::spawn().await;
    let slow = Receiver::start(vec![], Reply { delay: Duration::from_secs(4), ..Reply::status(200) }).await;
    let fast = Receiver::start(vec![], Reply::status(200)).await;
    subscribe(&app, &slow.url, &["product.created"]).await;
    subscribe(&app, &fast.url, &["product.created"]).await;
    let workers = app.start_workers();
    for i in 0..80 {
        app.create_product(&format!("ISO-{i}"), 100, 1).await;
    }
    let started = Instant::now();
    fast.wait_for(80, Duration::from_secs(10)).await;
    let slow_so_far = slow.received().len();
    let limit = keel::webhooks::PER_ENDPOINT_CONCURRENCY;
    assert!(slow_so_far <= limit, "the slow endpoint was called {slow_so_far} times already (limit {limit})");
    assert!(started.elapsed() < Duration::from_secs(4), "the fast endpoint waited for the slow one");
    workers.stop().await;
}

#[tokio::test]
async fn subscriptions_are_validated_and_managed() {
    let app = TestApp::spawn_with(|config| config.webhook_allow_loopback = Some(false)).await;
    let post = |body: Value| app.admin(app.post("/v1/webhooks")).json(&body).send();
    expect_problem(
        post(json!({ "url": "http://127.0.0.1:9/hook", "events": ["order.confirmed"] })).await,
        422,
        "KEEL_WEBHOOK_ALLOW_LOOPBACK",
    )
    .await;
    expect_problem(
        post(json!({ "url": "http://169.254.169.254/", "events": ["order.confirmed"] })).await,
        422,
        "link-local",
    )
    .await;
    expect_problem(post(json!({ "url": "ftp://example.org/", "events": ["order.confirmed"] })).await, 422, "http")
        .await;
    expect_problem(post(json!({ "url": "https://example.org/", "events": [] })).await, 422, "at least one").await;
    expect_problem(
        post(json!({ "url": "https://example.org/", "events": ["order.placed"] })).await,
        422,
        "order.placed",
    )
    .await;
    expect_problem(post(json!({ "url": "https://example.org/" })).await, 422, "events").await;
    let anonymous =
        app.post("/v1/webhooks").json(&json!({ "url": "https://example.org/", "events": ["order.failed"] }));
    expect_problem(anonymous.send().await, 401, "token").await;

    let created = subscribe(&app, "https://example.org/hooks/keel", &["order.failed", "order.failed"]).await;
    assert_eq!(created["events"], json!(["order.failed"]));
    let id = created["id"].as_str().unwrap();
    let listed = expect_json(app.admin(app.get("/v1/webhooks")).send().await, 200).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(deliveries(&app, id).await.len(), 0);
    let gone = format!("/v1/webhooks/{id}");
    assert_eq!(app.admin(app.delete(&gone)).send().await.unwrap().status(), 204);
    expect_problem(app.admin(app.delete(&gone)).send().await, 404, "webhook").await;
    expect_problem(app.admin(app.get(&format!("{gone}/deliveries"))).send().await, 404, "webhook").await;
    expect_problem(app.admin(app.get("/v1/webhooks/nope/deliveries")).send().await, 404, "webhook").await;
}

/// A name that resolves to a refused address is caught when delivering (DNS can change its answer
/// after the subscription was made): the delivery is dead at once, and nothing is sent.
#[tokio::test]
async fn a_name_resolving_to_a_refused_address_is_not_called() {
    let app = TestApp::spawn_with(|config| config.webhook_allow_loopback = Some(false)).await;
    let receiver = Receiver::start(vec![], Reply::status(200)).await;
    let url = receiver.url.replace("127.0.0.1", "localhost");
    let webhook = subscribe(&app, &url, &["product.created"]).await;
    let workers = app.start_workers();
    app.create_product("SSRF-1", 100, 1).await;
    let dead = wait_for_delivery(&app, webhook["id"].as_str().unwrap(), "dead", Duration::from_secs(10)).await;
    assert_eq!(dead["attempts"], 1, "refusals are not retried");
    assert!(dead["last_error"].as_str().unwrap().contains("loopback"), "{dead}");
    workers.stop().await;
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn retry_after_is_honoured_over_the_schedule() {
    let app = TestApp::spawn_with(schedule("100ms,100ms")).await;
    let busy = Reply { retry_after: Some(2), ..Reply::status(503) };
    let receiver = Receiver::start(vec![busy], Reply::status(200)).await;
    let webhook = subscribe(&app, &receiver.url, &["product.created"]).await;
    let workers = app.start_workers();
    app.create_product("LATER-1", 100, 1).await;
    let received = receiver.wait_for(2, Duration::from_secs(15)).await;
    let gap = received[1].at - received[0].at;
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}, not after Retry-After: 2");
    let pending = wait_for_delivery(&app, webhook["id"].as_str().unwrap(), "succeeded", Duration::from_secs(5)).await;
    assert_eq!(pending["attempts"], 2);
    app.check_queues_drained().await;
    workers.stop().await;
}
