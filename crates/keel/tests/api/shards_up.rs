//! `keel up --shards N`: a new data directory gets N user shards and users are spread over all of
//! them; an existing one keeps the shards it has whatever is asked, and says so.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{connect, expect_json};
use crate::processes::{scratch_dir, Keel};

const PASSWORD: &str = "correct horse battery staple";
const USERS: usize = 40;

/// The `keel_shard_<i>` databases of the cluster, in order.
async fn shard_databases(maintenance: &str) -> Vec<String> {
    let client = connect(maintenance).await;
    let rows = client
        .query("SELECT datname::text FROM pg_database WHERE datname LIKE 'keel\\_shard\\_%' ORDER BY 1", &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// One keel up for both checks: the first start is the expensive part (initdb, five databases
/// migrated), so the restart reuses its data directory.
#[tokio::test]
async fn keel_up_creates_the_shards_asked_for_and_an_existing_directory_keeps_its_own() {
    let started = Instant::now();
    let scratch = scratch_dir("up-shards");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let log = scratch.join("keel.log");
    let client = reqwest::Client::new();
    // keel up's sockets are in DATA_DIR/run (or a shorter path if that is too long for a socket).
    let socket_dir = keel_pg::socket_dir_for(&data_dir.join("run"), 5432);
    let url = |db: &str| format!("host={} port=5432 user=keel dbname={db}", socket_dir.display());

    let mut keel = Keel::start(&["up", "--data-dir", &data_arg, "--shards", "4"], &[], &log);
    let first_start = keel.wait_ready(Duration::from_secs(60)).await;
    let shards: Vec<String> = (0..4).map(|i| format!("keel_shard_{i}")).collect();
    assert_eq!(shard_databases(&url("postgres")).await, shards);

    // Sign-ups at once; the first with a password, to sign in with after the restart.
    let mut signups = tokio::task::JoinSet::new();
    for i in 0..USERS {
        let (client, base) = (client.clone(), keel.address.clone());
        signups.spawn(async move {
            let email = format!("spread{i}@example.org");
            let mut body = json!({ "name": format!("S{i}"), "email": email });
            if i == 0 {
                body["password"] = json!(PASSWORD);
            }
            expect_json(client.post(format!("{base}/v1/users")).json(&body).send().await, 201).await
        });
    }
    let mut users: Vec<Value> = Vec::new();
    while let Some(user) = signups.join_next().await {
        users.push(user.unwrap());
    }

    // Each user is on the shard the initial, uniform map gives its bucket, and every shard has some.
    let mut per_shard = [0i64; 4];
    for (i, db) in shards.iter().enumerate() {
        let shard = connect(&url(db)).await;
        per_shard[i] = shard.query_one("SELECT count(*) FROM users", &[]).await.unwrap().get(0);
        for user in &users {
            let id = user["id"].as_str().unwrap();
            if usize::from(keel_shard::Bucket::of(id.as_bytes()).index()) % 4 == i {
                let uuid = uuid::Uuid::parse_str(id).unwrap();
                let found = shard.query_opt("SELECT 1 FROM users WHERE id = $1", &[&uuid]).await.unwrap();
                assert!(found.is_some(), "user {id} is not on {db}");
            }
        }
    }
    assert!(per_shard.iter().all(|n| *n >= 1), "every shard holds users: {per_shard:?}");
    assert_eq!(per_shard.iter().sum::<i64>(), USERS as i64, "{per_shard:?}");

    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());

    // Asked for 3 on a directory with 4: it starts with its 4, and says why the 3 was not applied.
    let before_restart = keel.log_text().len();
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg, "--shards", "3"], &[], &log);
    let restart = keel.wait_ready(Duration::from_secs(60)).await;
    let restart_log = keel.log_text()[before_restart..].to_owned();
    assert!(
        restart_log.contains("this data directory has 4 shards; --shards 3")
            && restart_log.contains("applies only to a new data directory")
            && restart_log.contains("POST /v1/admin/shards"),
        "no warning that --shards 3 was not applied; log:\n{restart_log}"
    );
    assert_eq!(shard_databases(&url("postgres")).await, shards);

    // Every user is still served, wherever they live, and the one with a password can sign in.
    for user in &users {
        let (id, token) = (user["id"].as_str().unwrap(), user["access_token"].as_str().unwrap());
        let profile = client.get(format!("{}/v1/users/{id}", keel.address)).bearer_auth(token).send().await;
        let profile = expect_json(profile, 200).await;
        assert_eq!(profile["id"], id);
    }
    let credentials = json!({ "email": "spread0@example.org", "password": PASSWORD });
    let session = client.post(format!("{}/v1/sessions", keel.address)).json(&credentials).send().await;
    expect_json(session, 201).await;

    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
    eprintln!(
        "keel up --shards 4: first start ready in {first_start:?}, restart with --shards 3 in {restart:?}; \
         {per_shard:?} users per shard; {:?} in all",
        started.elapsed()
    );
}
