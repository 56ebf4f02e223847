//! The authorization matrix: every route of the OpenAPI document (the list the router is built from)
//! called as each of four callers, against the status this table expects. A route the document has
//! and the table lacks fails the test, so a new route cannot be added without deciding who may call
//! it; an entry the document lacks fails it too. `ops.rs` checks the same table against the routes
//! the server answers.

use std::collections::BTreeSet;

use serde_json::json;

use crate::helpers::{expect_json, TestApp, ADMIN_TOKEN};

/// The callers, in the order of [`Access::expect`] (and the order they are tried in: the admin
/// last, so a change only the admin may make is made once, after everyone else was refused).
const CALLERS: [&str; 4] = ["anonymous", "another user", "owner", "admin"];

/// One route and who may call it.
pub struct Access {
    /// `METHOD /template` exactly as in the OpenAPI document.
    pub route: &'static str,
    /// The request made: the template with its parameters named after the fixtures of
    /// [`Fixtures::path`] (`{owner}`, `{product}`, …), and a query string if the route needs one.
    path: &'static str,
    /// A body that is valid for the caller the route is for (`{unique}` is replaced by a fresh word),
    /// so that an allowed caller gets the route's success status, not a 4xx about the input.
    body: Option<&'static str>,
    /// Whether to send a fresh `Idempotency-Key`.
    key: bool,
    /// The status for anonymous, another user, the owner, the admin.
    expect: [u16; 4],
}

impl Access {
    const fn new(route: &'static str, path: &'static str, expect: [u16; 4]) -> Access {
        Access { route, path, body: None, key: false, expect }
    }

    const fn body(self, body: &'static str) -> Access {
        Access { body: Some(body), ..self }
    }

    const fn key(self) -> Access {
        Access { key: true, ..self }
    }

    pub fn method(&self) -> &'static str {
        self.route.split_once(' ').expect("METHOD /path").0
    }

    pub fn template(&self) -> &'static str {
        self.route.split_once(' ').expect("METHOD /path").1
    }
}

/// Statuses, for reading the table.
const OK: u16 = 200;
const CREATED: u16 = 201;
const ACCEPTED: u16 = 202;
const NO_CONTENT: u16 = 204;
const UNAUTHORIZED: u16 = 401;
const FORBIDDEN: u16 = 403;
const NOT_FOUND: u16 = 404;
const UNPROCESSABLE: u16 = 422;

const ANYONE: [u16; 4] = [OK; 4];
const ADMIN_ONLY: [u16; 4] = [UNAUTHORIZED, FORBIDDEN, FORBIDDEN, OK];
/// Any user, for their own data (the cart, the wallet, orders): not the admin.
const USERS: [u16; 4] = [UNAUTHORIZED, OK, OK, FORBIDDEN];
/// An admin's change that creates something.
const ADMIN_CREATES: [u16; 4] = [UNAUTHORIZED, FORBIDDEN, FORBIDDEN, CREATED];
/// An admin's action on something that does not exist: the admin is let through and told so.
const ADMIN_FINDS_NOTHING: [u16; 4] = [UNAUTHORIZED, FORBIDDEN, FORBIDDEN, NOT_FOUND];
/// An admin's deletion.
const ADMIN_DELETES: [u16; 4] = [UNAUTHORIZED, FORBIDDEN, FORBIDDEN, NO_CONTENT];
/// A user's like, answered without a body.
const USERS_NO_CONTENT: [u16; 4] = [UNAUTHORIZED, NO_CONTENT, NO_CONTENT, FORBIDDEN];

/// Following the user the path names: anyone else may; they may not follow themselves.
const SOMEONE_ELSES_FOLLOW: [u16; 4] = [UNAUTHORIZED, NO_CONTENT, UNPROCESSABLE, FORBIDDEN];

/// Every route: who may call it. "The owner" is the user whose resource the path names (or, where
/// it names none, a user like the other).
pub const TABLE: &[Access] = &[
    // Operations: anyone.
    Access::new("GET /healthz", "/healthz", ANYONE),
    Access::new("GET /readyz", "/readyz", ANYONE),
    Access::new("GET /metrics", "/metrics", ANYONE),
    Access::new("GET /openapi.json", "/openapi.json", ANYONE),
    // Users: anyone signs up (a token is not needed, nor in the way); anyone reads a profile; only
    // its owner changes it.
    Access::new("POST /v1/users", "/v1/users", [CREATED; 4])
        .body(r#"{"name": "Someone", "email": "someone.{unique}@example.org"}"#),
    Access::new("GET /v1/users/{id}", "/v1/users/{owner}", ANYONE),
    Access::new("PATCH /v1/users/{id}", "/v1/users/{owner}", [UNAUTHORIZED, FORBIDDEN, OK, FORBIDDEN])
        .body(r#"{"bio": "changed"}"#),
    // Signing in and refreshing take credentials in the body, whatever the bearer token: these are
    // not right for anyone.
    Access::new("POST /v1/sessions", "/v1/sessions", [UNAUTHORIZED; 4])
        .body(r#"{"email": "nobody.{unique}@example.org", "password": "not the password"}"#),
    Access::new("POST /v1/sessions/refresh", "/v1/sessions/refresh", [UNAUTHORIZED; 4])
        .body(r#"{"refresh_token": "not.a.refresh.token"}"#),
    Access::new("GET /v1/sessions", "/v1/sessions", USERS),
    // A session of nobody's: a user is told there is no such session of theirs.
    Access::new("DELETE /v1/sessions/{id}", "/v1/sessions/{nothing}", [UNAUTHORIZED, NOT_FOUND, NOT_FOUND, FORBIDDEN]),
    // E-mailed codes and resets: always 202 (whether the address has an account is not told).
    Access::new("POST /v1/sessions/codes", "/v1/sessions/codes", [ACCEPTED; 4])
        .body(r#"{"email": "nobody.{unique}@example.org"}"#),
    Access::new("POST /v1/password-resets", "/v1/password-resets", [ACCEPTED; 4])
        .body(r#"{"email": "nobody.{unique}@example.org"}"#),
    Access::new("POST /v1/password-resets/confirm", "/v1/password-resets/confirm", [UNAUTHORIZED; 4])
        .body(r#"{"token": "not-a-token", "password": "quartz lantern beneath velvet"}"#),
    // Not a 6-digit code, so that the owner's guess is never right by chance.
    Access::new(
        "POST /v1/users/{id}/email-verification",
        "/v1/users/{owner}/email-verification",
        [UNAUTHORIZED, FORBIDDEN, UNPROCESSABLE, FORBIDDEN],
    )
    .body(r#"{"code": "not-a-code"}"#),
    Access::new(
        "POST /v1/users/{id}/email-verification/resend",
        "/v1/users/{owner}/email-verification/resend",
        [UNAUTHORIZED, FORBIDDEN, ACCEPTED, FORBIDDEN],
    ),
    // The catalogue: anyone reads, the admin writes.
    Access::new("GET /v1/products", "/v1/products", ANYONE),
    Access::new("POST /v1/products", "/v1/products", ADMIN_CREATES)
        .body(r#"{"sku": "SKU-{unique}", "name": "New", "description": "", "price_cents": 100, "stock": 1}"#),
    Access::new("GET /v1/products/{id}", "/v1/products/{product}", ANYONE),
    Access::new("PATCH /v1/products/{id}", "/v1/products/{product}", ADMIN_ONLY).body(r#"{"name": "Renamed"}"#),
    Access::new("GET /v1/products/{id}/inventory", "/v1/products/{product}/inventory", ANYONE),
    Access::new("PUT /v1/products/{id}/inventory", "/v1/products/{product}/inventory", ADMIN_ONLY)
        .body(r#"{"stock": 50}"#),
    Access::new("PUT /v1/products/{id}/like", "/v1/products/{product}/like", USERS_NO_CONTENT),
    Access::new("DELETE /v1/products/{id}/like", "/v1/products/{product}/like", USERS_NO_CONTENT),
    Access::new("GET /v1/search", "/v1/search?q=matrix", ANYONE),
    // Follows: a user follows another (the owner cannot follow themselves: 422); lists are public;
    // the feed is the caller's own.
    Access::new("PUT /v1/users/{id}/follow", "/v1/users/{owner}/follow", SOMEONE_ELSES_FOLLOW),
    Access::new("DELETE /v1/users/{id}/follow", "/v1/users/{owner}/follow", SOMEONE_ELSES_FOLLOW),
    Access::new("GET /v1/users/{id}/followers", "/v1/users/{owner}/followers", ANYONE),
    Access::new("GET /v1/users/{id}/following", "/v1/users/{owner}/following", ANYONE),
    Access::new("GET /v1/feed", "/v1/feed", USERS),
    // A user's own cart, wallet and orders: the token says whose.
    Access::new("GET /v1/cart", "/v1/cart", USERS),
    Access::new("PUT /v1/cart/items/{product_id}", "/v1/cart/items/{product}", USERS).body(r#"{"quantity": 2}"#),
    Access::new("DELETE /v1/cart/items/{product_id}", "/v1/cart/items/{product}", USERS),
    Access::new("GET /v1/wallet", "/v1/wallet", USERS),
    // Nobody credits a wallet here: users may not, and the admin has its own route.
    Access::new("POST /v1/wallet/deposits", "/v1/wallet/deposits", [UNAUTHORIZED, FORBIDDEN, FORBIDDEN, FORBIDDEN])
        .body(r#"{"amount_cents": 1000}"#)
        .key(),
    // The other user's cart is empty: allowed, and refused for that (422).
    Access::new("POST /v1/checkout", "/v1/checkout", [UNAUTHORIZED, UNPROCESSABLE, ACCEPTED, FORBIDDEN]).key(),
    Access::new("GET /v1/orders", "/v1/orders", USERS),
    // Another user's order does not exist for them: 404, not a 403 that would confirm it does.
    Access::new("GET /v1/orders/{id}", "/v1/orders/{order}", [UNAUTHORIZED, NOT_FOUND, OK, FORBIDDEN]),
    // Payments: only the provider's signature opens it; no bearer token does, the admin's included.
    Access::new("POST /v1/payments/events", "/v1/payments/events", [UNAUTHORIZED; 4]).body(concat!(
        r#"{"type": "payment.succeeded", "timestamp": "2026-01-01T00:00:00Z", "#,
        r#""data": {"payment_id": "p-{unique}", "user_id": "{owner}", "amount_cents": 100}}"#
    )),
    // Administration.
    Access::new("GET /v1/admin/queues", "/v1/admin/queues", ADMIN_ONLY),
    Access::new("GET /v1/admin/consistency", "/v1/admin/consistency", ADMIN_ONLY),
    Access::new("GET /v1/admin/replicas", "/v1/admin/replicas", ADMIN_ONLY),
    Access::new("GET /v1/admin/shards", "/v1/admin/shards", ADMIN_ONLY),
    // Shard 9 does not exist: the admin is told so.
    Access::new(
        "POST /v1/admin/shards/moves",
        "/v1/admin/shards/moves",
        [UNAUTHORIZED, FORBIDDEN, FORBIDDEN, UNPROCESSABLE],
    )
    .body(r#"{"buckets": [1], "to": 9}"#),
    Access::new("GET /v1/admin/shards/moves/{id}", "/v1/admin/shards/moves/{nothing}", ADMIN_FINDS_NOTHING),
    Access::new("DELETE /v1/admin/shards/moves/{id}", "/v1/admin/shards/moves/{nothing}", ADMIN_FINDS_NOTHING),
    // A dry run: the plan, and no move asked for.
    Access::new("POST /v1/admin/shards/rebalance", "/v1/admin/shards/rebalance", ADMIN_ONLY)
        .body(r#"{"dry_run": true}"#),
    Access::new("GET /v1/admin/stats", "/v1/admin/stats", ADMIN_ONLY),
    Access::new("GET /v1/admin/queries", "/v1/admin/queries?database=shard_0", ADMIN_ONLY),
    // Nothing listens there: the admin is told the database cannot be reached.
    Access::new("POST /v1/admin/shards", "/v1/admin/shards", [UNAUTHORIZED, FORBIDDEN, FORBIDDEN, UNPROCESSABLE])
        .body(r#"{"url": "postgres://keel@127.0.0.1:1/nothing"}"#),
    // No dead job has this id.
    Access::new("POST /v1/admin/jobs/{id}/retry", "/v1/admin/jobs/{nothing}/retry", ADMIN_FINDS_NOTHING),
    // The owner's own wallet included: only the admin credits it.
    Access::new("POST /v1/admin/users/{id}/deposits", "/v1/admin/users/{owner}/deposits", ADMIN_CREATES)
        .body(r#"{"amount_cents": 1000}"#)
        .key(),
    Access::new("GET /v1/webhooks", "/v1/webhooks", ADMIN_ONLY),
    Access::new("POST /v1/webhooks", "/v1/webhooks", ADMIN_CREATES)
        .body(r#"{"url": "http://127.0.0.1:9/{unique}", "events": ["order.confirmed"]}"#),
    Access::new("DELETE /v1/webhooks/{id}", "/v1/webhooks/{doomed_subscription}", ADMIN_DELETES),
    Access::new("GET /v1/webhooks/{id}/deliveries", "/v1/webhooks/{subscription}/deliveries", ADMIN_ONLY),
    Access::new(
        "POST /v1/webhooks/{id}/deliveries/{delivery_id}/retry",
        "/v1/webhooks/{subscription}/deliveries/{nothing}/retry",
        ADMIN_FINDS_NOTHING,
    ),
    Access::new("POST /v1/admin/users/{id}/lock", "/v1/admin/users/{nothing}/lock", ADMIN_FINDS_NOTHING),
    Access::new("POST /v1/admin/users/{id}/unlock", "/v1/admin/users/{owner}/unlock", ADMIN_DELETES),
    // Last, as they end the callers' sessions: deleting one's account (the owner's, whose token is
    // refused from then on), and signing out everywhere.
    Access::new("DELETE /v1/users/{id}", "/v1/users/{owner}", [UNAUTHORIZED, FORBIDDEN, ACCEPTED, FORBIDDEN]),
    Access::new("DELETE /v1/sessions", "/v1/sessions", [UNAUTHORIZED, NO_CONTENT, UNAUTHORIZED, FORBIDDEN]),
];

/// What the requests of the table refer to.
struct Fixtures {
    owner: (String, String),
    other: (String, String),
    product: String,
    order: String,
    subscription: String,
    doomed_subscription: String,
}

impl Fixtures {
    async fn make(app: &TestApp) -> Fixtures {
        let owner = app.create_user("Owner").await;
        let other = app.create_user("Other").await;
        let product = app.create_product("MATRIX", 100, 1_000).await;
        let put = |product: String| {
            let body = json!({ "quantity": 1 });
            app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&owner.1).json(&body).send()
        };
        // The owner's order (pending: no workers run).
        let ordered = app.create_product("MATRIX-ORDERED", 100, 1_000).await;
        expect_json(put(ordered).await, 200).await;
        let checkout = app.post("/v1/checkout").bearer_auth(&owner.1).header("idempotency-key", "fixture");
        let order = expect_json(checkout.send().await, 202).await["id"].as_str().unwrap().to_owned();
        // Something in the owner's cart that no pending order holds and the table never removes, so
        // the owner can always check out.
        expect_json(put(app.create_product("MATRIX-KEPT", 100, 1_000).await).await, 200).await;
        let subscribe = |n: u32| {
            let body = json!({ "url": format!("http://127.0.0.1:9/fixture-{n}"), "events": ["order.confirmed"] });
            app.admin(app.post("/v1/webhooks")).json(&body).send()
        };
        let subscription = expect_json(subscribe(1).await, 201).await["id"].as_str().unwrap().to_owned();
        let doomed_subscription = expect_json(subscribe(2).await, 201).await["id"].as_str().unwrap().to_owned();
        Fixtures { owner, other, product, order, subscription, doomed_subscription }
    }

    /// `text` with the fixtures' names replaced by their ids.
    fn fill(&self, text: &str) -> String {
        let nothing = uuid::Uuid::now_v7().to_string();
        let unique = uuid::Uuid::now_v7().simple().to_string();
        [
            ("{owner}", self.owner.0.as_str()),
            ("{product}", &self.product),
            ("{order}", &self.order),
            ("{doomed_subscription}", &self.doomed_subscription),
            ("{subscription}", &self.subscription),
            ("{nothing}", &nothing),
            ("{unique}", &unique),
        ]
        .iter()
        .fold(text.to_owned(), |text, (name, value)| text.replace(name, value))
    }

    /// The bearer token of each caller of [`CALLERS`].
    fn tokens(&self) -> [Option<&str>; 4] {
        [None, Some(&self.other.1), Some(&self.owner.1), Some(ADMIN_TOKEN)]
    }
}

/// The (method, template) pairs of every operation in an OpenAPI document.
fn operations(doc: &serde_json::Value) -> BTreeSet<String> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options", "trace"].contains(&method.as_str()) {
                operations.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    operations
}

/// Every route of the document, called by each caller, answers the table's status; the table and
/// the document list the same routes.
#[tokio::test]
async fn every_route_answers_each_caller_as_the_table_says() {
    // Payments configured, so that the payment route is refused for want of a signature (401), not
    // for want of configuration (503).
    let secret = keel::webhooks::signing::new_secret();
    let key = keel::webhooks::signing::SigningKey::parse(&secret).unwrap();
    let app = TestApp::spawn_with(|config| config.payment_webhook_secret = Some(key)).await;
    let fixtures = Fixtures::make(&app).await;

    let documented = operations(&expect_json(app.get("/openapi.json").send().await, 200).await);
    let tabled: BTreeSet<String> = TABLE.iter().map(|access| access.route.to_owned()).collect();
    assert_eq!(tabled.len(), TABLE.len(), "a route is in the table twice");
    let untabled: Vec<&String> = documented.difference(&tabled).collect();
    let undocumented: Vec<&String> = tabled.difference(&documented).collect();
    assert!(untabled.is_empty(), "routes with no entry in the authorization table: {untabled:?}");
    assert!(undocumented.is_empty(), "table entries for routes the API does not document: {undocumented:?}");

    let mut wrong = Vec::new();
    for access in TABLE {
        for ((caller, token), expected) in CALLERS.iter().zip(fixtures.tokens()).zip(access.expect) {
            let path = fixtures.fill(access.path);
            let mut request = app.client.request(access.method().parse().unwrap(), app.url(&path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = access.body {
                request = request.header("content-type", "application/json").body(fixtures.fill(body));
            }
            if access.key {
                request = request.header("idempotency-key", fixtures.fill("matrix-{unique}"));
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let text = response.text().await.unwrap();
            if status != expected {
                wrong.push(format!("{} as {caller}: {status}, expected {expected}: {text}", access.route));
            } else if status >= 400 && content_type.as_deref() != Some("application/problem+json") {
                wrong.push(format!("{} as {caller}: {status} is not a problem: {content_type:?}", access.route));
            }
        }
    }
    assert!(wrong.is_empty(), "{} of {} calls answered otherwise:\n{}", wrong.len(), TABLE.len() * 4, wrong.join("\n"));
    app.check_invariants().await;
}
