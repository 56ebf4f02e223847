//! The wallet: money comes in from the shop (the admin's deposits) or from a payment (the provider's
//! signed events), never from the wallet's owner.

use std::time::{SystemTime, UNIX_EPOCH};

use keel::webhooks::signing::{new_secret, SigningKey};
use reqwest::Response;
use serde_json::{json, Value};

use crate::helpers::{expect_json, expect_problem, TestApp, ADMIN_TOKEN, SHARDS};

async fn balance(app: &TestApp, token: &str) -> Value {
    expect_json(app.get("/v1/wallet").bearer_auth(token).send().await, 200).await["balance_cents"].clone()
}

/// Rows of `table` over every shard (the ledger and the payments, behind the API).
async fn count(app: &TestApp, table: &str) -> i64 {
    let mut n = 0;
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        n += shard.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get::<_, i64>(0);
    }
    n
}

/// The shard a user lives on, looked up behind the API.
async fn shard_of(app: &TestApp, user: &str) -> usize {
    let user: uuid::Uuid = user.parse().unwrap();
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        if shard.query_opt("SELECT 1 FROM users WHERE id = $1", &[&user]).await.unwrap().is_some() {
            return i;
        }
    }
    panic!("user {user} is on no shard")
}

#[tokio::test]
async fn deposits_raise_the_balance() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Saver").await;
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet, json!({ "balance_cents": 0 }));
    let made = expect_json(Ok(app.deposit(&token, "k1", 500).await), 201).await;
    assert_eq!(made["balance_cents"], 500);
    assert!(made["deposit_id"].is_string());
    let made = expect_json(Ok(app.deposit(&token, "k2", 250).await), 201).await;
    assert_eq!(made["balance_cents"], 750);
    assert_eq!(balance(&app, &token).await, 750);
    expect_problem(app.get("/v1/wallet").send().await, 401, "token").await;
    app.check_invariants().await;
}

/// Issue 22, item 8: a user cannot credit their own wallet, whatever they send; neither does the
/// admin through the user's route, nor a user through the admin's.
#[tokio::test]
async fn users_cannot_deposit_into_their_wallets() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Forger").await;
    let own = |token: Option<&str>| {
        let request = app.post("/v1/wallet/deposits").header("idempotency-key", "free-money");
        let request = request.json(&json!({ "amount_cents": 10_000_000_000_i64 }));
        match token {
            Some(token) => request.bearer_auth(token).send(),
            None => request.send(),
        }
    };
    expect_problem(own(Some(&token)).await, 403, "cannot be credited by its owner").await;
    expect_problem(own(Some(ADMIN_TOKEN)).await, 403, "/v1/admin/users/{id}/deposits").await;
    expect_problem(own(None).await, 401, "token").await;
    let as_admin = |token: &str| {
        app.post(&format!("/v1/admin/users/{id}/deposits"))
            .bearer_auth(token)
            .header("idempotency-key", "free-money")
            .json(&json!({ "amount_cents": 1_000 }))
            .send()
    };
    expect_problem(as_admin(&token).await, 403, "admin").await;
    let (_, other) = app.create_user("Accomplice").await;
    expect_problem(as_admin(&other).await, 403, "admin").await;
    expect_problem(app.post(&format!("/v1/admin/users/{id}/deposits")).send().await, 401, "admin").await;

    assert_eq!(balance(&app, &token).await, 0);
    assert_eq!(count(&app, "wallet_deposits").await, 0);
    // The route is still documented, as refusing.
    let doc = expect_json(app.get("/openapi.json").send().await, 200).await;
    let responses = doc["paths"]["/v1/wallet/deposits"]["post"]["responses"].as_object().unwrap();
    assert_eq!(responses.keys().collect::<Vec<_>>(), ["401", "403"]);
}

#[tokio::test]
async fn the_same_idempotency_key_deposits_once_and_replays_the_answer() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Saver").await;
    let first = expect_json(Ok(app.deposit(&token, "once", 1000).await), 201).await;
    let again = expect_json(Ok(app.deposit(&token, "once", 1000).await), 201).await;
    assert_eq!(first, again, "a replay returns the first answer, deposit id and all");
    assert_eq!(balance(&app, &token).await, 1000);

    expect_problem(Ok(app.deposit(&token, "once", 999).await), 422, "different request").await;
    // Keys are per user credited: another user's "once" is a new key.
    let (_, other) = app.create_user("Other").await;
    expect_json(Ok(app.deposit(&other, "once", 5).await), 201).await;

    // The admin's keys and the user's own are apart: the user checking out with the key the admin
    // credited them with is a checkout, not a clash.
    let product = app.create_product("KEYS", 100, 5).await;
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 1 }));
    expect_json(put.send().await, 200).await;
    let checkout = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "once");
    expect_json(checkout.send().await, 202).await;
    app.check_invariants().await;
}

#[tokio::test]
async fn deposits_are_checked() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Saver").await;
    let route = format!("/v1/admin/users/{id}/deposits");
    let no_key = app.admin(app.post(&route)).json(&json!({ "amount_cents": 5 })).send().await;
    expect_problem(no_key, 400, "Idempotency-Key").await;
    let long_key = "k".repeat(300);
    expect_problem(Ok(app.deposit(&token, &long_key, 5).await), 400, "Idempotency-Key").await;
    for (i, amount) in [0_i64, -5, 10_000_000_001, i64::MAX].into_iter().enumerate() {
        expect_problem(Ok(app.deposit(&token, &format!("bad{i}"), amount).await), 422, "amount_cents").await;
    }
    // Unknown users: a user id of no one, and a path that is no id at all.
    let nobody = uuid::Uuid::now_v7();
    expect_problem(Ok(app.deposit_for(&nobody.to_string(), "k", 5).await), 404, &nobody.to_string()).await;
    expect_problem(Ok(app.deposit_for("not-an-id", "k", 5).await), 404, "not-an-id").await;
    // Bodies that are not a deposit: a 4xx problem each, never a 500.
    let bodies: &[(&str, u16, &str)] = &[
        ("", 400, "not valid JSON"),
        ("{", 400, "not valid JSON"),
        ("[]", 422, "JSON object"),
        ("{}", 422, "amount_cents: is required"),
        (r#"{"amount_cents": "5"}"#, 422, "amount_cents"),
        (r#"{"amount_cents": 1.5}"#, 422, "amount_cents"),
        (r#"{"amount_cents": 1e400}"#, 422, "amount_cents"),
        (r#"{"amount_cents": 5, "user_id": "x"}"#, 422, "user_id: is not a field"),
    ];
    for (i, (body, status, mentions)) in bodies.iter().enumerate() {
        let request = app.admin(app.post(&route)).header("idempotency-key", format!("body{i}"));
        let response = request.header("content-type", "application/json").body(*body).send().await;
        expect_problem(response, *status, mentions).await;
    }
    let text = app.admin(app.post(&route)).header("idempotency-key", "text").body("5").send().await;
    expect_problem(text, 415, "JSON").await;
    assert_eq!(balance(&app, &token).await, 0);
    assert_eq!(count(&app, "wallet_deposits").await, 0);
}

#[tokio::test]
async fn a_hundred_concurrent_deposits_sum_exactly() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Saver").await;
    let mut deposits = tokio::task::JoinSet::new();
    for i in 1..=100_i64 {
        let request = app
            .admin(app.post(&format!("/v1/admin/users/{id}/deposits")))
            .header("idempotency-key", format!("deposit-{i}"))
            .json(&json!({ "amount_cents": i }));
        deposits.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = deposits.join_next().await {
        assert_eq!(status.unwrap(), 201);
    }
    assert_eq!(balance(&app, &token).await, 5050);
    app.check_invariants().await;
}

#[tokio::test]
async fn twenty_racing_requests_with_one_key_move_money_once() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Saver").await;
    let mut racers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let request = app
            .admin(app.post(&format!("/v1/admin/users/{id}/deposits")))
            .header("idempotency-key", "the-one-key")
            .json(&json!({ "amount_cents": 700 }));
        racers.spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = racers.join_next().await {
        answers.push(answer.unwrap());
    }
    assert!(answers.iter().all(|a| a == &answers[0]), "every racer gets the same answer: {answers:?}");
    assert_eq!(answers[0].0, 201);
    assert_eq!(balance(&app, &token).await, 700);
    assert_eq!(count(&app, "wallet_deposits").await, 1);
    app.check_invariants().await;
}

/// A payment provider: signs events as Standard Webhooks senders do.
struct Provider {
    key: SigningKey,
}

impl Provider {
    fn new() -> (Provider, SigningKey) {
        let key = SigningKey::parse(&new_secret()).unwrap();
        (Provider { key: key.clone() }, key)
    }

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    /// A `payment.succeeded` body.
    fn payment(payment_id: &str, user_id: &str, amount_cents: i64) -> String {
        json!({
            "type": "payment.succeeded",
            "timestamp": "2026-12-01T17:00:00Z",
            "data": { "payment_id": payment_id, "user_id": user_id, "amount_cents": amount_cents },
        })
        .to_string()
    }

    /// Sends `body` as message `id`, signed at `timestamp` with `key`.
    async fn send_signed(app: &TestApp, key: &SigningKey, id: &str, timestamp: i64, body: &str) -> Response {
        app.post("/v1/payments/events")
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", key.sign(id, timestamp, body.as_bytes()))
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// Sends `body` as message `id`, signed now.
    async fn send(&self, app: &TestApp, id: &str, body: &str) -> Response {
        Provider::send_signed(app, &self.key, id, Provider::now(), body).await
    }
}

async fn app_with_payments() -> (TestApp, Provider) {
    let (provider, key) = Provider::new();
    let app = TestApp::spawn_with(|config| config.payment_webhook_secret = Some(key)).await;
    (app, provider)
}

/// A provider retries an event until it gets a 2xx, and may send it again after one: the payment
/// credits once, and every delivery is answered 200 with the same deposit.
#[tokio::test]
async fn a_replayed_payment_event_credits_once() {
    let (app, provider) = app_with_payments().await;
    let (id, token) = app.create_user("Payer").await;
    let body = Provider::payment("pay_123", &id, 2_500);
    let first = expect_json(Ok(provider.send(&app, "msg_1", &body).await), 200).await;
    assert_eq!(first["payment_id"], "pay_123");
    assert_eq!(first["duplicate"], false);
    assert_eq!(balance(&app, &token).await, 2_500);

    // The same message again (a retry: same id, signed anew), and the same payment in another
    // message (a provider that re-sends it under a new message id).
    for message in ["msg_1", "msg_1", "msg_2"] {
        let again = expect_json(Ok(provider.send(&app, message, &body).await), 200).await;
        assert_eq!(again["duplicate"], true, "{again}");
        assert_eq!(again["deposit_id"], first["deposit_id"]);
    }
    assert_eq!(balance(&app, &token).await, 2_500);
    // The same payment id for another amount or user is not credited: 409. (Payment ids are unique
    // per shard, in the transaction of the credit: the other user is one on the same shard.)
    let (other, other_token) = loop {
        let (other, other_token) = app.create_user("Other").await;
        if shard_of(&app, &other).await == shard_of(&app, &id).await {
            break (other, other_token);
        }
    };
    for body in [Provider::payment("pay_123", &id, 9_999), Provider::payment("pay_123", &other, 2_500)] {
        expect_problem(Ok(provider.send(&app, "msg_3", &body).await), 409, "already credited").await;
    }
    assert_eq!((balance(&app, &token).await, balance(&app, &other_token).await), (json!(2_500), json!(0)));

    // Another payment credits again; the ledger has a deposit per payment.
    let second = Provider::payment("pay_456", &id, 500);
    assert_eq!(expect_json(Ok(provider.send(&app, "msg_4", &second).await), 200).await["duplicate"], false);
    assert_eq!(balance(&app, &token).await, 3_000);
    assert_eq!((count(&app, "payments").await, count(&app, "wallet_deposits").await), (2, 2));
    app.check_invariants().await;
}

/// Two deliveries of one event at the same moment (and a crowd of them): one credits, the others
/// wait for it and find it credited.
#[tokio::test]
async fn concurrent_deliveries_of_one_payment_credit_once() {
    let (app, provider) = app_with_payments().await;
    let provider = std::sync::Arc::new(provider);
    let (id, token) = app.create_user("Payer").await;
    for (round, deliveries) in [(0, 2), (1, 20)] {
        let body = Provider::payment(&format!("pay_race_{round}"), &id, 1_000);
        let now = Provider::now();
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..deliveries {
            let request = app
                .post("/v1/payments/events")
                .header("content-type", "application/json")
                .header("webhook-id", "msg_race")
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", provider.key.sign("msg_race", now, body.as_bytes()))
                .body(body.clone());
            requests.spawn(async move { expect_json(request.send().await, 200).await });
        }
        let answers = requests.join_all().await;
        let credited = answers.iter().filter(|a| a["duplicate"] == false).count();
        assert_eq!(credited, 1, "one delivery credits, the others find it credited: {answers:?}");
        assert!(answers.iter().all(|a| a["deposit_id"] == answers[0]["deposit_id"]), "{answers:?}");
        assert_eq!(balance(&app, &token).await, 1_000 * (round + 1));
    }
    assert_eq!((count(&app, "payments").await, count(&app, "wallet_deposits").await), (2, 2));
    app.check_invariants().await;
}

/// Nothing is credited without the provider's signature over this very body, made within 5 minutes.
#[tokio::test]
async fn forged_and_stale_payment_events_are_refused() {
    let (app, provider) = app_with_payments().await;
    let (id, token) = app.create_user("Target").await;
    let body = Provider::payment("pay_forged", &id, 1_000_000);
    let now = Provider::now();

    // Signed with another secret.
    let (forger, _) = Provider::new();
    expect_problem(Ok(forger.send(&app, "msg_1", &body).await), 401, "no webhook-signature matches").await;
    // Signed by the provider, then changed: the amount, or the message id.
    let signed = provider.key.sign("msg_1", now, body.as_bytes());
    let tampered = Provider::payment("pay_forged", &id, 9_000_000);
    for (message, body) in [("msg_1", tampered.as_str()), ("msg_2", body.as_str())] {
        let request = app
            .post("/v1/payments/events")
            .header("webhook-id", message)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", &signed)
            .body(body.to_owned());
        expect_problem(request.send().await, 401, "signature").await;
    }
    // Unsigned, or missing any one of the three headers.
    expect_problem(app.post("/v1/payments/events").body(body.clone()).send().await, 401, "webhook-id").await;
    let headers =
        [("webhook-id", "msg_1".to_owned()), ("webhook-timestamp", now.to_string()), ("webhook-signature", signed)];
    for missing in 0..headers.len() {
        let mut request = app.post("/v1/payments/events").body(body.clone());
        for (i, (name, value)) in headers.iter().enumerate() {
            if i != missing {
                request = request.header(*name, value);
            }
        }
        expect_problem(request.send().await, 401, headers[missing].0).await;
    }
    // A bearer token opens nothing here, the admin's included.
    let admin = app.admin(app.post("/v1/payments/events")).body(body.clone()).send().await;
    expect_problem(admin, 401, "webhook-id").await;

    // Correctly signed, at a timestamp more than 5 minutes away (either way): a captured message
    // replayed later, or a clock far off.
    for off in [-301, -3600, 301, 3600] {
        let stale = Provider::send_signed(&app, &provider.key, "msg_1", now + off, &body).await;
        expect_problem(Ok(stale), 401, "webhook-timestamp").await;
    }
    let garbled = app
        .post("/v1/payments/events")
        .header("webhook-id", "msg_1")
        .header("webhook-timestamp", "yesterday")
        .header("webhook-signature", provider.key.sign("msg_1", now, body.as_bytes()))
        .body(body.clone());
    expect_problem(garbled.send().await, 401, "webhook-timestamp").await;

    assert_eq!(balance(&app, &token).await, 0);
    assert_eq!((count(&app, "payments").await, count(&app, "wallet_deposits").await), (0, 0));
    // Within the 5 minutes, the same event is taken.
    let fresh = Provider::send_signed(&app, &provider.key, "msg_1", now - 240, &body).await;
    expect_json(Ok(fresh), 200).await;
    assert_eq!(balance(&app, &token).await, 1_000_000);
}

/// A signed event that cannot be applied is a 4xx problem, never a 500, and credits nothing; an event
/// of a type Keel does not act on is acknowledged (so the provider stops sending it) and ignored.
#[tokio::test]
async fn signed_payment_events_that_do_not_fit_are_refused_with_a_problem() {
    let (app, provider) = app_with_payments().await;
    let (id, token) = app.create_user("Payer").await;
    let nobody = uuid::Uuid::now_v7().to_string();
    let event = |data: Value| json!({ "type": "payment.succeeded", "timestamp": "2026-12-01T17:00:00Z", "data": data });
    let cases: Vec<(String, u16, &str)> = vec![
        ("".into(), 400, "not valid JSON"),
        ("{\"type\": ".into(), 400, "not valid JSON"),
        ("[]".into(), 422, "JSON object"),
        ("{}".into(), 422, "type: is required"),
        (json!({ "type": 7 }).to_string(), 422, "type: must be a string"),
        (
            json!({ "type": "payment.succeeded", "data": { "payment_id": "p", "user_id": id, "amount_cents": 5 } })
                .to_string(),
            422,
            "timestamp: is required",
        ),
        (json!({ "type": "payment.succeeded", "timestamp": "x" }).to_string(), 422, "data: is required"),
        (event(json!({ "user_id": id, "amount_cents": 5 })).to_string(), 422, "data.payment_id: is required"),
        (event(json!({ "payment_id": "p", "user_id": id })).to_string(), 422, "data.amount_cents: is required"),
        (event(json!({ "payment_id": "p", "user_id": id, "amount_cents": "5" })).to_string(), 422, "data.amount_cents"),
        (event(json!({ "payment_id": "p", "user_id": id, "amount_cents": 0 })).to_string(), 422, "data.amount_cents"),
        (event(json!({ "payment_id": "p", "user_id": id, "amount_cents": -5 })).to_string(), 422, "data.amount_cents"),
        (
            event(json!({ "payment_id": "p", "user_id": id, "amount_cents": 10_000_000_001_i64 })).to_string(),
            422,
            "data.amount_cents",
        ),
        (event(json!({ "payment_id": "", "user_id": id, "amount_cents": 5 })).to_string(), 422, "data.payment_id"),
        (
            event(json!({ "payment_id": "p".repeat(256), "user_id": id, "amount_cents": 5 })).to_string(),
            422,
            "data.payment_id",
        ),
        (
            event(json!({ "payment_id": "a\u{0}b", "user_id": id, "amount_cents": 5 })).to_string(),
            422,
            "data.payment_id",
        ),
        (event(json!({ "payment_id": "p", "user_id": "someone", "amount_cents": 5 })).to_string(), 422, "data.user_id"),
        (event(json!({ "payment_id": "p", "user_id": nobody, "amount_cents": 5 })).to_string(), 422, "no user"),
    ];
    for (i, (body, status, mentions)) in cases.iter().enumerate() {
        expect_problem(Ok(provider.send(&app, &format!("msg_{i}"), body).await), *status, mentions).await;
    }
    assert_eq!((count(&app, "payments").await, count(&app, "wallet_deposits").await), (0, 0));

    // Another type of event, even with a `data` Keel would not read: acknowledged, nothing credited.
    let refund = json!({ "type": "payment.refunded", "timestamp": "2026-12-01T17:00:00Z", "data": { "x": 1 } });
    let response = provider.send(&app, "msg_refund", &refund.to_string()).await;
    assert_eq!(response.status(), 204);
    // Fields Keel does not know are left alone (a provider may add some).
    let mut extra = event(json!({ "payment_id": "p", "user_id": id, "amount_cents": 5, "currency": "EUR" }));
    extra["id"] = json!("evt_1");
    expect_json(Ok(provider.send(&app, "msg_extra", &extra.to_string()).await), 200).await;
    assert_eq!(balance(&app, &token).await, 5);
    app.check_invariants().await;
}

/// Without `KEEL_PAYMENT_WEBHOOK_SECRET`, the route says so and takes nothing, signed or not.
#[tokio::test]
async fn payments_are_refused_until_configured() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Payer").await;
    let (provider, _) = Provider::new();
    let body = Provider::payment("pay_1", &id, 100);
    expect_problem(Ok(provider.send(&app, "msg_1", &body).await), 503, "payments are not configured").await;
    expect_problem(app.post("/v1/payments/events").body(body).send().await, 503, "KEEL_PAYMENT_WEBHOOK_SECRET").await;
    assert_eq!(balance(&app, &token).await, 0);
    assert_eq!(count(&app, "payments").await, 0);
}
