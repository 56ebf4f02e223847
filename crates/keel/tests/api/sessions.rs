//! Sessions: signing in on other devices (a password, an e-mailed code), signing out one of them on
//! two real `keel serve` nodes (the revocation timed), refresh rotation with its retry window and reuse detection, tokens
//! checked with no query, and what a node does when it cannot hear revocations (Redis gone) or
//! cannot read them (a shard gone).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::accounts_by_email::{code_in, Inbox};
use crate::helpers::{db_queries, expect_json, expect_problem, TestApp, TestDatabases, ADMIN_TOKEN, SHARDS};
use crate::peers::{free_port, RedisServer, SmtpServer};
use crate::processes::{scratch_dir, Keel};
use crate::two_nodes::{app_with_redis, cache_status};

const PASSWORD: &str = "correct horse battery staple";

/// Signs up with a password on `base`; returns the answer (the user and their first session).
async fn sign_up(client: &reqwest::Client, base: &str, email: &str) -> Value {
    let body = json!({ "name": "Sam Session", "email": email, "password": PASSWORD });
    expect_json(client.post(format!("{base}/v1/users")).json(&body).send().await, 201).await
}

async fn sign_in(client: &reqwest::Client, base: &str, email: &str, agent: &str) -> Value {
    let body = json!({ "email": email, "password": PASSWORD });
    let request = client.post(format!("{base}/v1/sessions")).header("user-agent", agent).json(&body);
    expect_json(request.send().await, 201).await
}

async fn wallet_status(client: &reqwest::Client, base: &str, token: &Value) -> u16 {
    let request = client.get(format!("{base}/v1/wallet")).bearer_auth(token.as_str().unwrap());
    request.send().await.unwrap().status().as_u16()
}

/// Polls until `token` is refused on `base`; returns how long that took after `since`.
async fn refused_within(
    client: &reqwest::Client,
    base: &str,
    token: &Value,
    since: Instant,
    within: Duration,
) -> Duration {
    loop {
        let status = wallet_status(client, base, token).await;
        if status == 401 {
            return since.elapsed();
        }
        assert_eq!(status, 200, "a token is either accepted or refused");
        assert!(since.elapsed() < within, "the token was still accepted on {base} after {within:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_session_ended_on_one_serve_node_is_refused_on_both_within_the_budget() {
    let dbs = TestDatabases::create(true).await;
    let redis = RedisServer::start().await;
    let scratch = scratch_dir("sessions");
    let smtp_port = free_port();
    let mut inbox = Inbox::new(SmtpServer::start(smtp_port, &scratch.join("maildir")).await);
    let env = vec![
        ("KEEL_CATALOG_URL", dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("KEEL_REDIS_URL", redis.url()),
        ("KEEL_SMTP_URL", format!("smtp://127.0.0.1:{smtp_port}")),
    ];
    let mut a = Keel::start(&["serve"], &env, &scratch.join("a.log"));
    let mut b = Keel::start(&["serve"], &env, &scratch.join("b.log"));
    // The e-mail goes out from a worker process of its own.
    let mut worker = Keel::start(&["worker"], &env, &scratch.join("worker.log"));
    a.wait_ready(Duration::from_secs(30)).await;
    b.wait_ready(Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let email = "two.devices@example.org";

    // A laptop signs up through A; a phone signs in with the password through B; a tablet with a
    // code e-mailed to the address (read from the SMTP server), through A.
    let laptop = sign_up(&client, &a.address, email).await;
    let phone = sign_in(&client, &b.address, email, "phone/1.0").await;
    let ask = client.post(format!("{}/v1/sessions/codes", b.address)).json(&json!({ "email": email }));
    assert_eq!(ask.send().await.unwrap().status(), 202);
    let code = code_in(&inbox.next_mail(email, "Your Keel sign-in code").await);
    let by_code = client.post(format!("{}/v1/sessions", a.address)).header("user-agent", "tablet");
    let tablet = expect_json(by_code.json(&json!({ "email": email, "code": code })).send().await, 201).await;
    let listed = client.get(format!("{}/v1/sessions", a.address)).bearer_auth(laptop["access_token"].as_str().unwrap());
    let listed = expect_json(listed.send().await, 200).await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[0]["id"], laptop["session_id"]);
    assert_eq!(listed[0]["current"], true);
    assert_eq!(listed[1]["id"], phone["session_id"]);
    assert_eq!(listed[1]["user_agent"], "phone/1.0");
    assert_eq!(listed[1]["current"], false);
    assert_eq!(listed[2]["id"], tablet["session_id"]);
    for node in [&a.address, &b.address] {
        for device in [&laptop, &phone, &tablet] {
            assert_eq!(wallet_status(&client, node, &device["access_token"]).await, 200);
        }
    }

    // The laptop ends the phone's session through A: the phone's token is refused on both nodes
    // within the session budget (5 s), the laptop's still works.
    let end = client
        .delete(format!("{}/v1/sessions/{}", a.address, phone["session_id"].as_str().unwrap()))
        .bearer_auth(laptop["access_token"].as_str().unwrap());
    let ended = Instant::now();
    assert_eq!(end.send().await.unwrap().status(), 204);
    let on_a = refused_within(&client, &a.address, &phone["access_token"], ended, Duration::from_secs(5)).await;
    let on_b = refused_within(&client, &b.address, &phone["access_token"], ended, Duration::from_secs(5)).await;
    eprintln!("revocation: refused on the node that ended it after {on_a:?}, on the other node after {on_b:?}");
    for node in [&a.address, &b.address] {
        for device in [&laptop, &tablet] {
            assert_eq!(wallet_status(&client, node, &device["access_token"]).await, 200);
        }
    }
    let refused = client.get(format!("{}/v1/wallet", b.address)).bearer_auth(phone["access_token"].as_str().unwrap());
    expect_problem(refused.send().await, 401, "session has ended").await;

    for node in [&mut a, &mut b, &mut worker] {
        node.signal(libc::SIGTERM);
        assert!(node.wait_exit(Duration::from_secs(30)).await.success());
    }
}

#[tokio::test]
async fn refresh_rotates_a_retry_within_the_window_gets_the_same_pair_and_a_late_replay_ends_the_session() {
    let app = TestApp::spawn_with(|config| config.refresh_reuse_window = Duration::from_secs(1)).await;
    let node_b = app.second_node().await;
    let client = &app.client;
    let first = sign_up(client, &app.address, "rotating@example.org").await;
    let refresh = |base: &str, token: &Value| {
        let body = json!({ "refresh_token": token.as_str().unwrap() });
        client.post(format!("{base}/v1/sessions/refresh")).json(&body).send()
    };
    let pair = |answer: &Value| (answer["access_token"].clone(), answer["refresh_token"].clone());

    // Each refresh answers a new pair for the same session.
    let second = expect_json(refresh(&app.address, &first["refresh_token"]).await, 201).await;
    assert_eq!(second["session_id"], first["session_id"]);
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    // A retry of the same exchange through the other node, within the window: the same answer.
    let retried = expect_json(refresh(&node_b.address, &first["refresh_token"]).await, 201).await;
    assert_eq!(pair(&retried), pair(&second), "a retry within the window gets the pair it was answered");
    let third = expect_json(refresh(&app.address, &second["refresh_token"]).await, 201).await;
    assert_ne!(pair(&third), pair(&second));
    assert_eq!(wallet_status(client, &app.address, &third["access_token"]).await, 200);

    // The first token again, after the window: reuse. The whole session ends, its newest pair too.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    expect_problem(refresh(&node_b.address, &first["refresh_token"]).await, 401, "already used").await;
    let ended = Instant::now();
    refused_within(client, &node_b.address, &third["access_token"], ended, Duration::from_millis(100)).await;
    refused_within(client, &app.address, &third["access_token"], ended, Duration::from_secs(5)).await;
    expect_problem(refresh(&app.address, &third["refresh_token"]).await, 401, "session has ended").await;

    // Garbage, and a token of a session that does not exist, are refused the same way.
    expect_problem(refresh(&app.address, &json!("a.b.c")).await, 401, "not valid").await;
    node_b.stop().await;
}

/// No query to authenticate: a cached cart (in Redis) and a cached product cost none at all; the
/// owner's profile (read around the cache, to see their own writes) costs its own read only.
#[tokio::test]
async fn authenticated_cached_reads_run_no_authentication_query() {
    let redis = RedisServer::start().await;
    let app = app_with_redis(&redis, &[]).await;
    let (user, token) = app.create_user("Queryless").await;
    let product = app.create_product("QUERYLESS", 250, 5).await;
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&json!({ "quantity": 2 }));
    expect_json(put.send().await, 200).await;
    for path in ["/v1/cart".to_owned(), format!("/v1/products/{product}")] {
        let response = app.get(&path).bearer_auth(&token).send().await.unwrap();
        assert!(cache_status(&response).contains("hit"), "{path}: {}", cache_status(&response));
        assert_eq!(db_queries(&response), 0, "{path}");
        expect_json(Ok(response), 200).await;
    }
    let own_profile = app.get(&format!("/v1/users/{user}")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(db_queries(&own_profile), 1, "the profile's own read, nothing to authenticate");
    expect_json(Ok(own_profile), 200).await;
}

/// A node that cannot hear revocations (Redis gone) still learns them within the budget: it polls
/// every shard's recent revocations every half budget.
#[tokio::test]
async fn with_redis_gone_a_revocation_still_reaches_the_other_node_within_the_budget() {
    let mut redis = RedisServer::start().await;
    let budget = Duration::from_secs(2);
    let app = app_with_redis(&redis, &[("session", budget)]).await;
    let node_b = app.second_node().await;
    let client = &app.client;
    let email = "deaf.node@example.org";
    let laptop = sign_up(client, &app.address, email).await;
    let phone = sign_in(client, &node_b.address, email, "phone").await;
    redis.kill();

    let end = client
        .delete(app.url(&format!("/v1/sessions/{}", phone["session_id"].as_str().unwrap())))
        .bearer_auth(laptop["access_token"].as_str().unwrap());
    let ended = Instant::now();
    assert_eq!(end.send().await.unwrap().status(), 204);
    let took = refused_within(client, &node_b.address, &phone["access_token"], ended, budget).await;
    eprintln!("revocation without Redis reached the other node after {took:?} (budget {budget:?})");
    assert_eq!(wallet_status(client, &node_b.address, &laptop["access_token"]).await, 200);
    node_b.stop().await;
}

/// A node that cannot read a shard's revocations for a whole budget cannot vouch for that shard's
/// sessions: their tokens get a 503 (with Retry-After) until it can again; other shards' users are
/// served throughout.
#[tokio::test]
async fn a_node_that_cannot_read_a_shards_revocations_refuses_its_tokens_with_503_until_it_can() {
    let budget = Duration::from_secs(1);
    let app =
        TestApp::spawn_with(|config| config.consistency_budgets = vec![(keel::consistency::DataKind::Session, budget)])
            .await;
    // A user on each shard.
    let mut users: Vec<Option<(String, String)>> = vec![None; SHARDS];
    while users.iter().any(Option::is_none) {
        let (id, token) = app.create_user("Sharded").await;
        let shard = app.databases.shards().route(&keel::db::shard_key(id.parse().unwrap())).shard;
        users[usize::from(shard)].get_or_insert((id, token));
    }
    let users: Vec<(String, String)> = users.into_iter().map(Option::unwrap).collect();
    let app = &app;
    let status = |token: String| async move { app.get("/v1/wallet").bearer_auth(&token).send().await.unwrap() };

    // Shard 0's revocations cannot be read (its table renamed away): after a budget, its users' tokens
    // are refused with 503, shard 1's are served.
    let shard0 = app.dbs.shard(0).await;
    shard0.execute("ALTER TABLE sessions RENAME TO sessions_away", &[]).await.unwrap();
    tokio::time::sleep(budget + budget / 2).await;
    let refused = status(users[0].1.clone()).await;
    assert!(refused.headers().contains_key("retry-after"));
    expect_problem(Ok(refused), 503, "cannot be checked").await;
    assert_eq!(status(users[1].1.clone()).await.status(), 200);

    // Readable again: served again within a poll.
    shard0.execute("ALTER TABLE sessions_away RENAME TO sessions", &[]).await.unwrap();
    let started = Instant::now();
    while status(users[0].1.clone()).await.status() != 200 {
        assert!(started.elapsed() < budget * 3, "still refused after the shard answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn expired_forged_and_malformed_tokens_are_refused_with_401() {
    let app = TestApp::spawn_with(|config| config.access_token_ttl = Duration::from_secs(1)).await;
    let user = sign_up(&app.client, &app.address, "short.lived@example.org").await;
    let token = user["access_token"].as_str().unwrap().to_owned();
    assert_eq!(wallet_status(&app.client, &app.address, &user["access_token"]).await, 200);

    let other_keys =
        keel::http::auth::tokens::Keys::new(vec![keel::http::auth::tokens::TokenKey::generate("test")]).unwrap();
    let claims = keel::http::auth::tokens::AccessClaims {
        sub: user["id"].as_str().unwrap().parse().unwrap(),
        sid: user["session_id"].as_str().unwrap().parse().unwrap(),
        iat: keel::http::auth::tokens::unix_now(),
        exp: keel::http::auth::tokens::unix_now() + 600,
    };
    for (forged, why) in [
        (other_keys.sign_access(&claims), "not valid"),
        ("x.y.z".to_owned(), "not valid"),
        (format!("{token}x"), "not valid"),
        (user["refresh_token"].as_str().unwrap().to_owned(), "not valid"),
    ] {
        expect_problem(app.get("/v1/wallet").bearer_auth(&forged).send().await, 401, why).await;
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    expect_problem(app.get("/v1/wallet").bearer_auth(&token).send().await, 401, "expired").await;
}
