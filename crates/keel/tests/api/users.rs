use serde_json::json;

use crate::helpers::{expect_json, expect_problem, TestApp, SHARDS};

#[tokio::test]
async fn signing_up_returns_the_user_signed_in_and_stores_no_secret() {
    let app = TestApp::spawn().await;
    let password = "correct horse battery staple";
    let response = app
        .post("/v1/users")
        .json(&json!({ "name": " Ada Lovelace ", "email": "Ada@Example.org", "bio": "analyst", "password": password }))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(response.headers()["cache-control"], "no-store");
    let user = expect_json(Ok(response), 201).await;
    let id = user["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/users/{id}"));
    assert_eq!(user["name"], "Ada Lovelace");
    assert_eq!(user["email"], "ada@example.org");
    assert_eq!(user["bio"], "analyst");
    assert!(user["created_at"].as_str().unwrap().ends_with('Z'));
    // A session, as a sign-in answers it; `token` is the deprecated name of the access token.
    let access = user["access_token"].as_str().unwrap();
    assert_eq!(user["token"], user["access_token"]);
    assert_eq!(user["user_id"], user["id"]);
    assert!(user["session_id"].is_string() && user["refresh_token"].as_str().unwrap().len() > 40);
    let expires_in = user["access_expires_in"].as_u64().unwrap();
    assert!((890..=900).contains(&expires_in), "{expires_in}");
    expect_json(app.get("/v1/wallet").bearer_auth(access).send().await, 200).await;

    // Nothing a client holds is stored: no token in any column, the password only as Argon2id.
    let shard = app.shard_of(id).await;
    let row = shard.query_one("SELECT password_hash, token_hash FROM users", &[]).await.unwrap();
    let hash: String = row.get(0);
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
    assert!(!hash.contains(password));
    assert_eq!(row.get::<_, Option<Vec<u8>>>(1), None);
    let sessions = shard.query("SELECT s::text FROM sessions s", &[]).await.unwrap();
    assert_eq!(sessions.len(), 1);
    let session_text: String = sessions[0].get(0);
    for secret in [access, user["refresh_token"].as_str().unwrap()] {
        let mac = secret.rsplit('.').next().unwrap();
        assert!(!session_text.contains(mac), "{session_text}");
    }
    app.check_invariants().await;
}

#[tokio::test]
async fn a_weak_password_is_refused_with_what_is_wrong() {
    let app = TestApp::spawn().await;
    for (password, why) in
        [("short", "too short"), ("password", "too easy to guess"), ("p@ssw0rd12", "too easy to guess")]
    {
        let request = json!({ "name": "Weak", "email": "weak@example.org", "password": password });
        expect_problem(app.post("/v1/users").json(&request).send().await, 422, why).await;
    }
    let long = "x".repeat(129);
    let request = json!({ "name": "Long", "email": "long@example.org", "password": long });
    expect_problem(app.post("/v1/users").json(&request).send().await, 422, "too long").await;
}

#[tokio::test]
async fn an_email_is_unique_across_shards_whatever_its_case() {
    let app = TestApp::spawn().await;
    let first = app.post("/v1/users").json(&json!({ "name": "A", "email": "same@example.org" })).send().await;
    expect_json(first, 201).await;
    // Many users with the same address at once: one wins, wherever their ids land.
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..10 {
        let request = app.post("/v1/users").json(&json!({ "name": format!("B{i}"), "email": "SAME@example.org" }));
        attempts.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = attempts.join_next().await {
        assert_eq!(status.unwrap(), 409);
    }
    let again = app.post("/v1/users").json(&json!({ "name": "C", "email": "same@EXAMPLE.org" })).send().await;
    expect_problem(again, 409, "already registered").await;
    app.check_invariants().await;
}

#[tokio::test]
async fn users_are_spread_over_the_shards_by_the_hash_of_their_id() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..24 {
        ids.push(app.create_user(&format!("user{i}")).await.0);
    }
    let mut per_shard = [0usize; SHARDS];
    for id in &ids {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        let bucket = keel_shard::Bucket::of(id.as_bytes());
        let expected_shard = usize::from(bucket.index()) % SHARDS; // the initial, uniform map
        let shard = app.dbs.shard(expected_shard).await;
        let row = shard.query_opt("SELECT bucket FROM users WHERE id = $1", &[&uuid]).await.unwrap();
        let stored_bucket: i16 = row.unwrap_or_else(|| panic!("user {id} is not on shard {expected_shard}")).get(0);
        assert_eq!(stored_bucket as u16, bucket.index());
        per_shard[expected_shard] += 1;
    }
    assert!(per_shard.iter().all(|n| *n > 0), "both shards hold users: {per_shard:?}");
}

#[tokio::test]
async fn a_profile_shows_the_email_only_to_its_owner() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Grace").await;
    let (_, other) = app.create_user("Alan").await;

    let public = expect_json(app.get(&format!("/v1/users/{id}")).send().await, 200).await;
    assert_eq!(public["name"], "Grace");
    assert!(public.get("email").is_none(), "{public}");
    assert!(public["updated_at"].is_string());
    let to_other = expect_json(app.get(&format!("/v1/users/{id}")).bearer_auth(&other).send().await, 200).await;
    assert!(to_other.get("email").is_none());
    let to_owner = expect_json(app.get(&format!("/v1/users/{id}")).bearer_auth(&token).send().await, 200).await;
    assert!(to_owner["email"].as_str().unwrap().starts_with("grace-"));
}

#[tokio::test]
async fn only_the_owner_may_change_a_profile() {
    let app = TestApp::spawn().await;
    let (id, token) = app.create_user("Grace").await;
    let (_, other) = app.create_user("Alan").await;
    let path = format!("/v1/users/{id}");

    expect_problem(app.patch(&path).json(&json!({ "bio": "x" })).send().await, 401, "token").await;
    expect_problem(app.patch(&path).bearer_auth(&other).json(&json!({ "bio": "x" })).send().await, 403, "owner").await;
    expect_problem(app.admin(app.patch(&path)).json(&json!({ "bio": "x" })).send().await, 403, "user").await;
    let bad_token = format!("{id}.not-the-secret");
    expect_problem(app.patch(&path).bearer_auth(bad_token).json(&json!({ "bio": "x" })).send().await, 401, "not valid")
        .await;

    let changed =
        expect_json(app.patch(&path).bearer_auth(&token).json(&json!({ "bio": "Admiral" })).send().await, 200).await;
    assert_eq!(changed["bio"], "Admiral");
    assert_eq!(changed["name"], "Grace");
    assert_ne!(changed["updated_at"], changed["created_at"]);
    let read = expect_json(app.get(&path).send().await, 200).await;
    assert_eq!(read["bio"], "Admiral");

    expect_problem(app.patch(&path).bearer_auth(&token).json(&json!({})).send().await, 422, "at least one").await;
    expect_problem(app.patch(&path).bearer_auth(&token).json(&json!({ "name": "" })).send().await, 422, "name").await;
}

#[tokio::test]
async fn unknown_users_are_not_found() {
    let app = TestApp::spawn().await;
    let missing = uuid::Uuid::now_v7();
    expect_problem(app.get(&format!("/v1/users/{missing}")).send().await, 404, &missing.to_string()).await;
    expect_problem(app.get("/v1/users/not-an-id").send().await, 404, "not-an-id").await;
}
