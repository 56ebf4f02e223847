//! Evening out the users per shard (`POST /v1/admin/shards/rebalance`), and the `keel shards`
//! command line (status, add, move, rebalance) run as a process against a test app's databases,
//! carrying its move out itself with no worker running.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{cluster, expect_json, expect_problem, TestApp};

/// Users per test: enough for every shard to hold some, few enough to sign up in moments.
const USERS: usize = 60;

/// A new, empty database on the test cluster: its name (to drop it) and URL.
async fn empty_database() -> (String, String) {
    let name = format!("t_cli_shard_{}", uuid::Uuid::now_v7().simple());
    keel::db::create_database(&cluster().maintenance_url(), &name, None).await.unwrap();
    (name.clone(), cluster().url(&name))
}

/// Polls a move until it is done or failed.
async fn finished_move(app: &TestApp, id: &str) -> Value {
    let began = Instant::now();
    loop {
        let mv = expect_json(app.admin(app.get(&format!("/v1/admin/shards/moves/{id}"))).send().await, 200).await;
        if mv["state"] == "done" || mv["state"] == "failed" {
            return mv;
        }
        assert!(began.elapsed() < Duration::from_secs(120), "the move did not finish: {mv}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Users per shard as `GET /v1/admin/shards` counts them, keyed as the rebalance answers them.
async fn users_per_shard(app: &TestApp) -> BTreeMap<String, i64> {
    let shards = expect_json(app.admin(app.get("/v1/admin/shards")).send().await, 200).await;
    let listed = shards["shards"].as_array().unwrap();
    listed.iter().map(|s| (s["shard"].to_string(), s["users"].as_i64().unwrap())).collect()
}

fn as_counts(value: &Value) -> BTreeMap<String, i64> {
    value.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_i64().unwrap())).collect()
}

/// Every user reads their profile and wallet (which holds what was deposited for them).
async fn users_read_their_data(app: &TestApp, users: &[(String, String)]) {
    for (i, (id, token)) in users.iter().enumerate() {
        let profile = expect_json(app.get(&format!("/v1/users/{id}")).send().await, 200).await;
        assert_eq!(profile["id"], id.as_str());
        let wallet = expect_json(app.get("/v1/wallet").bearer_auth(token).send().await, 200).await;
        assert_eq!(wallet["balance_cents"], 100 + i as i64, "{id}: {wallet}");
    }
}

async fn sign_up_with_deposits(app: &TestApp, count: usize) -> Vec<(String, String)> {
    let mut users = Vec::with_capacity(count);
    for i in 0..count {
        let (id, token) = app.create_user(&format!("Rebalanced {i}")).await;
        let deposited = app.deposit_for(&id, "first", 100 + i as i64).await;
        assert_eq!(deposited.status(), 201);
        users.push((id, token));
    }
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_spreads_the_users_over_a_new_shard_and_they_keep_their_data() {
    let _heavy = crate::helpers::heavy_load().await;
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let users = sign_up_with_deposits(&app, USERS).await;
    let (name, url) = empty_database().await;
    let added = app.admin(app.post("/v1/admin/shards")).json(&json!({ "url": url })).send().await;
    assert_eq!(expect_json(added, 201).await["shard"], 2);
    let rebalance = || app.admin(app.post("/v1/admin/shards/rebalance"));

    // A dry run: the plan, and nothing asked for.
    let dry = expect_json(rebalance().json(&json!({ "dry_run": true })).send().await, 200).await;
    let before = as_counts(&dry["users_per_shard_before"]);
    assert_eq!(before, users_per_shard(&app).await);
    assert_eq!(before["2"], 0);
    assert!(!dry["moves"].as_array().unwrap().is_empty(), "{dry}");
    assert!(dry["moves"].as_array().unwrap().iter().all(|m| m.get("id").is_none()), "{dry}");
    let shards = expect_json(app.admin(app.get("/v1/admin/shards")).send().await, 200).await;
    assert_eq!(shards["moves"], json!([]), "a dry run asked for a move");

    // The real one (no body: not a dry run), then another while its moves are under way.
    let plan = expect_json(rebalance().send().await, 202).await;
    eprintln!("rebalance: {plan}");
    let moves = plan["moves"].as_array().unwrap().clone();
    assert_eq!(plan["users_per_shard_before"], dry["users_per_shard_before"]);
    assert_eq!(plan["users_per_shard_after"], dry["users_per_shard_after"]);
    assert!(moves.iter().any(|m| m["to"] == 2), "{plan}");
    expect_problem(rebalance().send().await, 409, "rebalance once it is done").await;

    let began = Instant::now();
    for planned in &moves {
        let mv = finished_move(&app, planned["id"].as_str().unwrap()).await;
        assert_eq!(mv["state"], "done", "{mv}");
        assert_eq!(mv["buckets"], planned["buckets"]);
    }
    eprintln!("{} moves done in {:?}", moves.len(), began.elapsed());

    // Users as the plan said, each shard within a tolerance of the mean: a bucket holds one or two of
    // these 60 users, and the plan stops within the heaviest bucket of the mean.
    let after = users_per_shard(&app).await;
    assert_eq!(after, as_counts(&plan["users_per_shard_after"]));
    let mean = USERS as f64 / 3.0;
    for (shard, users) in &after {
        assert!((*users as f64 - mean).abs() <= 3.0, "shard {shard}: {users} users, mean {mean}: {after:?}");
    }
    users_read_their_data(&app, &users).await;

    // Balanced now: nothing more to move.
    let again = expect_json(rebalance().json(&json!({})).send().await, 200).await;
    assert_eq!(again["moves"], json!([]), "{again}");

    // Bodies that are not the options.
    expect_problem(rebalance().json(&json!({ "dry_run": "yes" })).send().await, 422, "dry_run").await;
    expect_problem(rebalance().json(&json!({ "dryrun": true })).send().await, 422, "dryrun").await;

    workers.stop().await;
    app.check_invariants().await;
    drop(app);
    keel::db::drop_database(&cluster().maintenance_url(), &name).await.unwrap();
}

/// Runs `keel shards <args>` against `app`'s databases, as `keel migrate` would be configured.
async fn keel_shards(app: &TestApp, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"));
    command.arg("shards").args(args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        command.env_remove(key);
    }
    // No keel.toml of the checkout's is read.
    command.current_dir(crate::helpers::scratch_root());
    command.env("KEEL_CATALOG_URL", &app.dbs.catalog_url).env("KEEL_SHARD_URLS", app.dbs.shard_urls.join(","));
    let output = tokio::time::timeout(Duration::from_secs(180), command.kill_on_drop(true).output()).await;
    let output = output.expect("keel shards finished within 3 minutes").unwrap();
    eprintln!(
        "keel shards {}: {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The fields of shard `n`'s line of `keel shards status`: shard, buckets, users, up, ranges.
fn status_line(status: &str, n: u16) -> Vec<String> {
    let line = status
        .lines()
        .find(|line| line.split_whitespace().next() == Some(&n.to_string()))
        .unwrap_or_else(|| panic!("no line for shard {n} in:\n{status}"));
    line.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shards_command_adds_a_shard_and_carries_a_move_out_itself() {
    let _heavy = crate::helpers::heavy_load().await;
    // No workers: the command moves the buckets itself.
    let app = TestApp::spawn().await;
    let users = sign_up_with_deposits(&app, 20).await;
    let (name, url) = empty_database().await;

    let status = keel_shards(&app, &["status"]).await;
    assert_eq!(status.status.code(), Some(0));
    let text = stdout(&status);
    assert_eq!(status_line(&text, 0)[1..], ["512", &users_on(&app, 0).await.to_string(), "yes", "0-1022/2"]);
    assert_eq!(status_line(&text, 1)[3..], ["yes", "1-1023/2"]);
    assert!(text.contains("no move in progress"), "{text}");

    let added = keel_shards(&app, &["add", &url]).await;
    assert_eq!(added.status.code(), Some(0));
    assert!(stdout(&added).contains("shard 2 added"));
    let again = keel_shards(&app, &["add", &url]).await;
    assert_eq!(again.status.code(), Some(1), "the same database twice");

    // Buckets 0 to 9 and the first user's, to shard 2.
    let (user, token) = &users[0];
    let bucket = keel::db::bucket_of(user.parse().unwrap());
    let wanted = format!("0-9,{bucket}");
    let moved = keel_shards(&app, &["move", "--buckets", &wanted, "--to", "2"]).await;
    assert_eq!(moved.status.code(), Some(0));
    let progress = String::from_utf8_lossy(&moved.stderr);
    // Not a terminal: a line per state, the last one done.
    assert!(progress.contains(": copying, "), "{progress}");
    assert!(progress.lines().last().unwrap().contains(": done, "), "{progress}");
    assert!(stdout(&moved).contains(" done: "), "{}", stdout(&moved));

    let status = stdout(&keel_shards(&app, &["status"]).await);
    let line = status_line(&status, 2);
    let count = if bucket < 10 { 10 } else { 11 };
    assert_eq!(line[1], count.to_string(), "{status}");
    assert!(line[2].parse::<i64>().unwrap() >= 1, "the first user is on shard 2: {status}");
    assert_eq!(line[3], "yes");
    assert!(line[4].starts_with("0-9"), "{status}");
    // The API's node routes by the new map: the moved user reads their own data there.
    let began = Instant::now();
    loop {
        let shards = expect_json(app.admin(app.get("/v1/admin/shards")).send().await, 200).await;
        if shards["shards"][2]["buckets"].as_array().is_some_and(|b| b.len() == count) {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(5), "the node did not load the new map: {shards}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 100);
    let in_new: i64 = crate::helpers::connect(&url)
        .await
        .query_one("SELECT count(*) FROM users WHERE id = $1::text::uuid", &[user])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_new, 1);

    // A move whose map switched cannot be cancelled; one that does not exist is bad usage.
    let id = stdout(&moved).split_whitespace().nth(1).unwrap().trim_end_matches(':').to_owned();
    let late = keel_shards(&app, &["cancel", &id]).await;
    assert_eq!(late.status.code(), Some(1), "{}", String::from_utf8_lossy(&late.stderr));
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("move them back"),
        "{}",
        String::from_utf8_lossy(&late.stderr)
    );
    let unknown = keel_shards(&app, &["cancel", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(unknown.status.code(), Some(2));

    // Bad usage: no such bucket, no such shard, no bucket at all.
    for args in [["--buckets", "1024", "--to", "2"], ["--buckets", "3", "--to", "9"], ["--buckets", ",", "--to", "2"]] {
        let refused = keel_shards(&app, &[&["move"], &args[..]].concat()).await;
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
    }

    // A dry run of a rebalance plans moves to even out the users, and asks for none.
    let dry = keel_shards(&app, &["rebalance", "--dry-run"]).await;
    assert_eq!(dry.status.code(), Some(0));
    assert!(stdout(&dry).contains("a dry run: nothing moved"), "{}", stdout(&dry));
    let catalog = app.dbs.catalog().await;
    let unfinished: i64 = catalog
        .query_one("SELECT count(*) FROM shard_moves WHERE state NOT IN ('done', 'failed')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unfinished, 0);

    drop(catalog);
    app.check_invariants().await;
    drop(app);
    keel::db::drop_database(&cluster().maintenance_url(), &name).await.unwrap();
}

async fn users_on(app: &TestApp, shard: usize) -> i64 {
    app.dbs.shard(shard).await.query_one("SELECT count(*) FROM users", &[]).await.unwrap().get(0)
}
