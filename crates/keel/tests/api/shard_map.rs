//! The shard map while running: `GET /v1/admin/shards`, a shard added with `POST /v1/admin/shards`,
//! and a change to the map that every node routes by within moments, without a restart.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{cluster, connect, expect_json, expect_problem, TestApp, ADMIN_TOKEN};

/// How long a node may take to route by a changed map: the announcement arrives at once; the
/// version check every second is the fallback.
const LEARNS_WITHIN: Duration = Duration::from_secs(5);

async fn shards(client: &reqwest::Client, base: &str) -> Value {
    let response = client.get(format!("{base}/v1/admin/shards")).bearer_auth(ADMIN_TOKEN).send().await;
    expect_json(response, 200).await
}

/// A new database on the test cluster, unmigrated; dropped by the caller.
async fn empty_database() -> (String, String) {
    let name = format!("t_new_shard_{}", uuid::Uuid::now_v7().simple());
    keel::db::create_database(&cluster().maintenance_url(), &name, None).await.unwrap();
    (name.clone(), cluster().url(&name))
}

async fn drop_database(name: &str) {
    keel::db::drop_database(&cluster().maintenance_url(), name).await.unwrap();
}

#[tokio::test]
async fn the_map_lists_every_bucket_once_with_each_shards_users() {
    let app = TestApp::spawn().await;
    for i in 0..6 {
        app.create_user(&format!("Mapped {i}")).await;
    }
    let body = shards(&app.client, &app.address).await;
    assert!(body["version"].as_i64().unwrap() >= 1, "{body}");
    let listed = body["shards"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{body}");
    let mut buckets: Vec<u64> =
        listed.iter().flat_map(|s| s["buckets"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap())).collect();
    buckets.sort_unstable();
    assert_eq!(buckets, (0..1024).collect::<Vec<u64>>(), "every bucket on exactly one shard");
    let users: i64 = listed.iter().map(|s| s["users"].as_i64().unwrap()).sum();
    assert_eq!(users, 6);
    assert!(listed.iter().all(|s| s["up"] == true), "{body}");
    assert_eq!(body["moves"], json!([]));
}

#[tokio::test]
async fn an_added_shard_is_migrated_registered_and_known_to_every_node() {
    let app = TestApp::spawn().await;
    let other = app.second_node().await;
    let before = shards(&app.client, &other.address).await["version"].as_i64().unwrap();
    let (name, url) = empty_database().await;

    let added = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": url })).send().await;
    assert_eq!(expect_json(added, 201).await, json!({ "shard": 2 }));
    // Migrated: the new database has the shard schema.
    let direct = connect(&url).await;
    let users: i64 = direct.query_one("SELECT count(*) FROM users", &[]).await.unwrap().get(0);
    assert_eq!(users, 0);

    // This node knows it at once; the other within moments, with no restart.
    let here = shards(&app.client, &app.address).await;
    assert_eq!(here["shards"][2], json!({ "shard": 2, "buckets": [], "users": 0, "up": true }), "{here}");
    assert!(here["version"].as_i64().unwrap() > before);
    let started = Instant::now();
    loop {
        let there = shards(&app.client, &other.address).await;
        if there["shards"].as_array().unwrap().len() == 3 {
            assert_eq!(there["version"], here["version"]);
            break;
        }
        assert!(started.elapsed() < LEARNS_WITHIN, "the second node did not learn of the shard: {there}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("the second node knew of the new shard after {:?}", started.elapsed());

    // The same database again, a database that holds users (shard 0's), and input that is no URL.
    let again = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": url })).send().await;
    expect_problem(again, 409, "already").await;
    let (_, _) = app.create_user("Resident").await;
    let taken = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": app.dbs.shard_urls[0] })).send().await;
    expect_problem(taken, 409, "already").await;
    let garbage = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": "sslmode=sometimes" })).send().await;
    expect_problem(garbage, 400, "url").await;
    let empty = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": " " })).send().await;
    expect_problem(empty, 400, "url").await;

    other.stop().await;
    drop(direct);
    drop(app);
    drop_database(&name).await;
}

/// Buckets reassigned in the catalogue (as a move's cutover does) are routed by on every node
/// within moments: sign-ups through the second node land on the new shard, none on the old one.
#[tokio::test]
async fn a_changed_map_is_routed_by_without_a_restart() {
    let app = TestApp::spawn().await;
    let other = app.second_node().await;
    let workers = app.start_workers();
    let (name, url) = empty_database().await;
    let added = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": url })).send().await;
    expect_json(added, 201).await;

    // Every bucket of shard 1 to shard 2, and the change announced, as the map's owner would.
    let catalog = app.dbs.catalog().await;
    catalog
        .batch_execute(
            "BEGIN;
             UPDATE shard_map SET shard = 2 WHERE shard = 1;
             UPDATE shard_map_version SET version = version + 1;
             SELECT pg_notify('keel_shard_map', '');
             COMMIT;",
        )
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let there = shards(&app.client, &other.address).await;
        if there["shards"][1]["buckets"] == json!([]) {
            break;
        }
        assert!(started.elapsed() < LEARNS_WITHIN, "the second node still routes by the old map: {there}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("the second node routed by the new map after {:?}", started.elapsed());

    let mut on_new = 0;
    for i in 0..12 {
        let email = format!("moved-{i}-{}@example.org", uuid::Uuid::now_v7().simple());
        let response =
            app.client.post(format!("{}/v1/users", other.address)).json(&json!({ "name": "Moved", "email": email }));
        let id = expect_json(response.send().await, 201).await["id"].as_str().unwrap().to_owned();
        let on = |client: tokio_postgres::Client| {
            let id = id.clone();
            async move { client.query_opt("SELECT 1 FROM users WHERE id = $1::text::uuid", &[&id]).await.unwrap().is_some() }
        };
        assert!(!on(app.dbs.shard(1).await).await, "a sign-up went to the shard that holds no bucket any more");
        on_new += usize::from(on(connect(&url).await).await);
    }
    assert!(on_new > 0, "no sign-up of twelve reached the shard that took half the buckets");

    // The workers started a queue runner for the new shard: its sign-ups' events are run there.
    let new_shard = connect(&url).await;
    let started = Instant::now();
    loop {
        let row = new_shard
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state <> 'done') FROM keel_jobs",
                &[],
            )
            .await
            .unwrap();
        let (done, left): (i64, i64) = (row.get(0), row.get(1));
        if done > 0 && left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the new shard's jobs were not run: {done} done, {left} not"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    workers.stop().await;
    other.stop().await;
    drop(app);
    drop_database(&name).await;
}

/// The shard database computes a user's bucket as keel-shard does (its rows carry it, and a move
/// selects rows by it): the reference vector and a thousand random ids agree.
#[tokio::test]
async fn the_database_computes_the_same_bucket_as_the_router() {
    let app = TestApp::spawn().await;
    let shard = app.dbs.shard(0).await;
    let reference: uuid::Uuid = "0190c5a2-7b3e-7c4d-9e8f-0123456789ab".parse().unwrap();
    let bucket: i16 = shard.query_one("SELECT keel_bucket($1)", &[&reference]).await.unwrap().get(0);
    assert_eq!(bucket, 418);
    let ids: Vec<uuid::Uuid> = (0..1000).map(|_| uuid::Uuid::new_v4()).collect();
    let rows = shard.query("SELECT id, keel_bucket(id) FROM unnest($1::uuid[]) AS id", &[&ids]).await.unwrap();
    for row in rows {
        let (id, bucket): (uuid::Uuid, i16) = (row.get(0), row.get(1));
        assert_eq!(bucket, keel::db::bucket_of(keel::ids::UserId::from_uuid(id)), "{id}");
    }
    // A user's rows carry its bucket, filled in on insert.
    let (user, _) = app.create_user("Bucketed").await;
    let on = app.shard_of(&user).await;
    let stored: i16 =
        on.query_one("SELECT bucket FROM users WHERE id = $1::text::uuid", &[&user]).await.unwrap().get(0);
    assert_eq!(stored, keel::db::bucket_of(user.parse().unwrap()));
}
