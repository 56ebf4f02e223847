//! The scenarios. Each measures Keel and, in the same run, the ceiling it is compared with.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::load::{
    bearer, burst, closed_loop, closed_loop_recorded, combine_rounds, open_loop, open_loop_during, Call, MakeCall,
    Outcome, Recorded, Zipf,
};
use crate::setup::{Keel, Seed};

/// Durations and sizes: the full run, or the smoke run that only proves the harness works.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub warmup: Duration,
    pub measure: Duration,
    pub ids: usize,
    pub jobs: usize,
    /// S1 and S1a each run this many rounds, alternating (see [`alternating`]).
    pub rounds: usize,
    /// S6's burst: this many sign-ins at once (and as many seeded users have a password).
    pub sign_ins: usize,
    pub smoke: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ScenarioResult {
    pub id: &'static str,
    pub name: &'static str,
    /// None: the feature this scenario measures does not exist yet.
    pub keel: Option<Outcome>,
    pub baseline_name: String,
    pub baseline_per_second: Option<f64>,
    pub ratio: Option<f64>,
    pub target: String,
    pub met: Option<bool>,
    pub command: String,
    pub notes: String,
    /// Further measurements the scenario made, by name (S6: the reads unloaded, the sign-ins).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub also: BTreeMap<&'static str, Outcome>,
    /// Further figures that are not rates, by name, for BENCHMARKS.json (S7: read shares, lag).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub figures: BTreeMap<String, f64>,
}

pub const CONNECTIONS: usize = 64;

fn pg_bin(program: &str) -> String {
    let mut dirs: Vec<_> =
        std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs.iter()
        .rev()
        .map(|d| d.join("bin").join(program))
        .find(|p| p.exists())
        .map_or_else(|| program.to_owned(), |p| p.display().to_string())
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connecting to keel's cluster");
    tokio::spawn(connection);
    client
}

/// Creates (once) the database the pgbench baselines run in, with pgbench's own tables and copies of
/// the tables a checkout writes.
pub async fn prepare_pgbench(keel: &Keel, plan: &Plan) {
    let admin = connect(&keel.db_url("postgres")).await;
    admin.batch_execute("DROP DATABASE IF EXISTS bench_pgbench").await.unwrap();
    admin.batch_execute("CREATE DATABASE bench_pgbench").await.unwrap();
    let scale = if plan.smoke { "1" } else { "10" };
    let (host, db) = pg_target(keel);
    let status = Command::new(pg_bin("pgbench"))
        .args(["-i", "-q", "-s", scale, "-h", &host, "-U", "keel", &db])
        .output()
        .unwrap();
    assert!(status.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&status.stderr));
    let bench = connect(&keel.db_url("bench_pgbench")).await;
    bench.batch_execute(CHECKOUT_TABLES).await.unwrap();
}

const CHECKOUT_TABLES: &str = "
CREATE TABLE orders (id uuid PRIMARY KEY, user_id uuid NOT NULL, status text NOT NULL, total_cents bigint NOT NULL,
    failure_reason text, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON orders (user_id, id DESC);
CREATE TABLE order_items (order_id uuid, product_id uuid, quantity int, price_cents bigint, PRIMARY KEY (order_id, product_id));
CREATE TABLE idempotency_keys (user_id uuid, key text, request_hash bytea, status_code smallint, response text,
    location text, created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (user_id, key));
CREATE TABLE keel_jobs (id uuid PRIMARY KEY, kind text, aggregate_id text, payload jsonb, traceparent text,
    state text NOT NULL DEFAULT 'pending', run_at timestamptz NOT NULL DEFAULT now(), created_at timestamptz NOT NULL DEFAULT now());";

/// The same writes a checkout makes, in one transaction, with none of the HTTP, auth or cart reads.
const CHECKOUT_SCRIPT: &str = "\\set n random(1, 1000000000)
BEGIN;
INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, response) VALUES (gen_random_uuid(), 'k' || :n, '\\x00', 0, '');
WITH o AS (INSERT INTO orders (id, user_id, status, total_cents) VALUES (gen_random_uuid(), gen_random_uuid(), 'pending', 100) RETURNING id)
INSERT INTO order_items SELECT o.id, gen_random_uuid(), 1, 100 FROM o;
INSERT INTO keel_jobs (id, kind, aggregate_id, payload) VALUES (gen_random_uuid(), 'order.placed', 'x', '{}');
UPDATE idempotency_keys SET status_code = 202, response = '{}' WHERE key = 'k' || :n;
COMMIT;
";

fn pg_target(keel: &Keel) -> (String, String) {
    (keel.data_dir.join("data/run").display().to_string(), "bench_pgbench".to_owned())
}

/// Runs pgbench with `args` for the measured duration; returns its transactions per second.
fn pgbench(keel: &Keel, plan: &Plan, args: &[&str]) -> (f64, String) {
    let (host, db) = pg_target(keel);
    let seconds = plan.measure.as_secs().max(1).to_string();
    let clients = CONNECTIONS.to_string();
    let mut all: Vec<&str> =
        vec!["-n", "-M", "prepared", "-c", &clients, "-j", "2", "-T", &seconds, "-h", &host, "-U", "keel"];
    all.extend_from_slice(args);
    all.push(&db);
    let output = Command::new(pg_bin("pgbench")).args(&all).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "pgbench failed: {}{}", text, String::from_utf8_lossy(&output.stderr));
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (tps, format!("pgbench {}", all.join(" ")))
}

/// Waits until keel's workers have finished every job, so a scenario's backlog does not load the
/// next scenario's measurement.
pub async fn drain_queues(keel: &Keel) -> Duration {
    let started = Instant::now();
    for database in ["keel_catalog", "keel_shard_0", "keel_shard_1"] {
        let client = connect(&keel.db_url(database)).await;
        loop {
            let left: i64 = client
                .query_one("SELECT count(*) FROM keel_jobs WHERE state IN ('pending', 'running')", &[])
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(600), "keel's queues did not drain");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    started.elapsed()
}

pub fn judged(mut result: ScenarioResult, ratio: f64, target: f64) -> ScenarioResult {
    result.ratio = Some(ratio);
    result.met = Some(ratio >= target);
    result
}

/// For a ratio that must stay at or under `limit` (a slowdown); none measured, nothing judged.
fn judged_at_most(mut result: ScenarioResult, ratio: Option<f64>, limit: f64) -> ScenarioResult {
    result.ratio = ratio;
    result.met = ratio.map(|r| r <= limit);
    result
}

/// Served from a cache and loaded from the database, over profiles and products, from Keel's own
/// counters (`GET /v1/admin/consistency`).
async fn cache_counters(keel: &Keel) -> (u64, u64) {
    let table: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/admin/consistency", keel.base))
        .bearer_auth(crate::setup::ADMIN_TOKEN)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("reading the consistency table")
        .json()
        .await
        .expect("the consistency table is JSON");
    let kinds = table["kinds"].as_array().cloned().unwrap_or_default();
    let count = |field: &str| -> u64 {
        kinds
            .iter()
            .filter(|k| k["kind"] == "profile" || k["kind"] == "product")
            .map(|k| k[field].as_u64().unwrap_or(0))
            .sum()
    };
    (count("hits") + count("shared_hits"), count("misses") + count("coalesced"))
}

/// S1's calls: half profile reads, half product reads, Zipf over the seeded ids. With `tokens`, each
/// call also carries the `Authorization` value of a seeded user (see [`token_for`]); the draws of
/// the resources are the same either way, so both variants send the same reads.
fn cached_reads(seed: &Seed, tokens: Option<Arc<Vec<HeaderValue>>>) -> MakeCall {
    let zipf = Arc::new(Zipf::new(seed.users.len().min(seed.products.len()), 1.0));
    let users: Arc<Vec<String>> = Arc::new(seed.users.iter().map(|(id, _)| id.clone()).collect());
    let products = Arc::new(seed.products.clone());
    Arc::new(move |n, rng| {
        let i = zipf.sample(rng);
        let profile = n % 2 == 0;
        let mut call = if profile {
            Call::get(format!("/v1/users/{}", users[i]))
        } else {
            Call::get(format!("/v1/products/{}", products[i]))
        };
        if let Some(tokens) = &tokens {
            call.authorization = Some(tokens[token_for(n, tokens.len(), profile.then_some(i))].clone());
        }
        call
    })
}

/// Which of `count` users' tokens the `n`th call carries: spread over all of them by a hash of `n`
/// (not drawn from the generator, so that the resources drawn stay those of the anonymous run), and
/// never the token of `owner`, the user whose profile is read: an owner reading their own profile
/// goes around the cache by design, which is another call than S1's.
fn token_for(n: u64, count: usize, owner: Option<usize>) -> usize {
    let j = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) as usize % count;
    match owner {
        Some(owner) if owner == j && count > 1 => (j + 1) % count,
        _ => j,
    }
}

/// The order of two variants' rounds, `false` A and `true` B (S1 anonymous and S1a authenticated; S7
/// no replica and one): A B B A A B B A … (`rounds` of each), so that neither variant always runs
/// first, nor later into the run than the other on average.
pub fn alternating(rounds: usize) -> Vec<bool> {
    (0..rounds).flat_map(|k| if k % 2 == 0 { [false, true] } else { [true, false] }).collect()
}

/// The status of a read of `path` carrying a token that is not valid: 401 where the route verifies
/// tokens.
async fn bad_token_status(keel: &Keel, path: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{}{path}", keel.base))
        .bearer_auth("not-a-valid-token")
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

fn checks_tokens(status: u16) -> String {
    match status {
        401 => "401: the token is verified".to_owned(),
        200 => "200: the token is not looked at".to_owned(),
        other => format!("{other}"),
    }
}

/// S1 and S1a: the cached reads anonymously and with users' access tokens, in alternating rounds
/// of the same run; then S1's HTTP ceiling. Returns S1, S1a and the ceiling.
pub async fn s1_cached_read(
    keel: &Keel,
    baseline: &str,
    seed: &Seed,
    plan: &Plan,
) -> (ScenarioResult, ScenarioResult, f64) {
    let anonymous = cached_reads(seed, None);
    // Every `Authorization` value is made here, once per user: the load loop only clones them.
    let tokens: Arc<Vec<HeaderValue>> = Arc::new(seed.users.iter().map(|(_, token)| bearer(token)).collect());
    let authenticated = cached_reads(seed, Some(tokens));
    let profile_check = bad_token_status(keel, &format!("/v1/users/{}", seed.users[0].0)).await;
    let product_check = bad_token_status(keel, &format!("/v1/products/{}", seed.products[0])).await;

    let rounds = plan.rounds.max(1);
    let round = plan.measure / rounds as u32;
    let mut recorded: [Vec<Recorded>; 2] = [Vec::new(), Vec::new()];
    let mut order = Vec::new();
    let before = cache_counters(keel).await;
    for authed in alternating(rounds) {
        let variant = &mut recorded[usize::from(authed)];
        // A variant's first round warms up in full (caches, connections); later rounds only open
        // their connections again.
        let warmup = if variant.is_empty() { plan.warmup } else { plan.warmup / 5 };
        let make = if authed { authenticated.clone() } else { anonymous.clone() };
        let run = closed_loop_recorded(&keel.base, make, CONNECTIONS, warmup, round).await;
        order.push(format!("{} {:.0}", if authed { "B" } else { "A" }, run.per_second()));
        variant.push(run);
    }
    let after = cache_counters(keel).await;
    let (ours, authed) = (combine_rounds(&recorded[0]), combine_rounds(&recorded[1]));
    let (hits, loads) = (after.0 - before.0, after.1 - before.1);
    let hit_ratio = hits as f64 / (hits + loads).max(1) as f64;
    let ceiling = closed_loop(baseline, anonymous, CONNECTIONS, plan.warmup, plan.measure).await;
    let how_rounds = format!(
        "{rounds} rounds each of {:.1} s, alternating with S1a's as A B B A … (A anonymous, B authenticated; \
         warm-up {:.1} s before each variant's first round, {:.1} s before the others); the rate is the median \
         of a variant's rounds, the latencies over all its rounds. Rounds in order, /s: {}",
        round.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        (plan.warmup / 5).as_secs_f64(),
        order.join(", ")
    );
    let result = ScenarioResult {
        id: "S1",
        name: "cached read: GET /v1/users/{id} and /v1/products/{id}, Zipf over the seeded ids",
        baseline_name: "minimal axum service returning the same JSON".into(),
        baseline_per_second: Some(ceiling.per_second),
        target: "≥ 0.85× the HTTP ceiling".into(),
        command: format!("keel-bench: closed loop, {CONNECTIONS} connections, half users half products"),
        notes: format!(
            "{how_rounds}. Cache hit ratio over S1's and S1a's rounds (warm-up included), from Keel's counters: \
             {:.2}% ({hits} hits, {loads} database loads, profiles and products; the seeded products were \
             written through at creation). Profiles (cache-aside, 5 min) and products (write-through, 60 s) are \
             cached in process; a product read adds its like count from memory (the other nodes' components are \
             merged every 250 ms, not per read). One node, no Redis: the shared tier serves what a node's own \
             memory misses, which a single node's Zipf run rarely does.",
            hit_ratio * 100.0
        ),
        keel: Some(ours.clone()),
        ..Default::default()
    };
    let authenticated = ScenarioResult {
        id: "S1a",
        name: "authenticated cached read: S1's calls, each with Authorization: Bearer <a seeded user's access token>",
        baseline_name: "anonymous S1, measured in alternating rounds of the same run".into(),
        baseline_per_second: Some(ours.per_second),
        target: "≥ 0.9× anonymous S1".into(),
        command: format!(
            "keel-bench: closed loop, {CONNECTIONS} connections, S1's calls and draws, tokens spread over the {} \
             seeded users",
            seed.users.len()
        ),
        notes: format!(
            "{how_rounds}. Access tokens from the seed's sign-ups; each `Authorization` value is made once per token \
             before the run. A call never carries the token of the profile it reads: an owner's read of their own \
             profile goes around the cache by design, a different call. A token that is not valid is answered, on \
             a profile read: {}; on a product read: {}.",
            checks_tokens(profile_check),
            checks_tokens(product_check)
        ),
        keel: Some(authed.clone()),
        ..Default::default()
    };
    let ratio = authed.per_second / ours.per_second;
    (judged(result, ours.per_second / ceiling.per_second, 0.85), judged(authenticated, ratio, 0.9), ceiling.per_second)
}

pub async fn s2_strong_read(keel: &Keel, seed: &Seed, plan: &Plan, http_ceiling: f64) -> ScenarioResult {
    let zipf = Arc::new(Zipf::new(seed.products.len(), 1.0));
    let products = Arc::new(seed.products.clone());
    let make: MakeCall =
        Arc::new(move |_, rng| Call::get(format!("/v1/products/{}/inventory", products[zipf.sample(rng)])));
    let ours = closed_loop(&keel.base, make, CONNECTIONS, plan.warmup, plan.measure).await;
    let (db_tps, command) = pgbench(keel, plan, &["-S"]);
    let combined = 1.0 / (1.0 / http_ceiling + 1.0 / db_tps);
    let result = ScenarioResult {
        id: "S2",
        name: "strong read: GET /v1/products/{id}/inventory",
        baseline_name: format!("combined ceiling 1/(1/HTTP + 1/DB) with DB = {db_tps:.0} tps"),
        baseline_per_second: Some(combined),
        target: "≥ 0.8× the combined ceiling".into(),
        command: format!("keel-bench closed loop {CONNECTIONS} connections; DB: {command}"),
        keel: Some(ours.clone()),
        ..Default::default()
    };
    judged(result, ours.per_second / combined, 0.8)
}

pub async fn s3_accepted_write(keel: &Keel, seed: &Seed, plan: &Plan) -> ScenarioResult {
    let users = Arc::new(seed.users.clone());
    let make: MakeCall = Arc::new(move |n, _| {
        let (_, token) = &users[n as usize % users.len()];
        Call {
            method: reqwest::Method::POST,
            path: "/v1/checkout".into(),
            token: Some(token.clone()),
            authorization: None,
            headers: vec![("idempotency-key", format!("s3-{n}"))],
            json: None,
            // The carts are checked out again and again: one whose last order is still pending has
            // nothing left to charge (its items are that order's) and is refused.
            refusal: &[409],
        }
    });
    // The baseline first, on a quiet machine: Keel's run leaves a backlog of sagas behind it.
    // In the run's work directory, which goes with the run.
    let script = keel.data_dir.join("checkout.sql");
    std::fs::write(&script, CHECKOUT_SCRIPT).unwrap();
    let (tps, command) = pgbench(keel, plan, &["-f", script.to_str().unwrap()]);
    let ours = closed_loop(&keel.base, make, CONNECTIONS / 2, plan.warmup, plan.measure).await;
    let backlog = drain_queues(keel).await;
    let result = ScenarioResult {
        id: "S3",
        name: "accepted write: POST /v1/checkout (202)",
        baseline_name: "pgbench doing the same inserts in one transaction".into(),
        baseline_per_second: Some(tps),
        target: "≥ 0.8× its pgbench equivalent".into(),
        command: format!("keel-bench closed loop {} connections, unique Idempotency-Key each; {command}", CONNECTIONS / 2),
        notes: format!("keel up's own workers run the sagas on the same two cores during the run, and needed {:.1} s more to finish them afterwards; each cart holds a sold-out product, so every saga ends out_of_stock and the cart is whole again for a later checkout. A checkout of a cart whose last order is still pending is refused (409: its items are that order's): {} of them, counted in neither the rate nor the latencies.", backlog.as_secs_f64(), ours.refused),
        keel: Some(ours.clone()),
        ..Default::default()
    };
    judged(result, ours.per_second / tps, 0.8)
}

/// Inserts `n` no-op jobs on shard 0 at once, wakes the runners as Keel's enqueuers do (a NOTIFY
/// once committed), and returns how many were done per second, from the insert to the last one.
/// Waits by probing the partial indexes of the unfinished states every 20 ms (no `keel.ping` job
/// left pending or running), not by counting the rows done, which would read the table each time.
pub async fn ping_burst(shard: &tokio_postgres::Client, n: i64, tag: &str) -> f64 {
    let started = Instant::now();
    shard
        .execute(
            "INSERT INTO keel_jobs (id, kind, aggregate_id, payload)
             SELECT gen_random_uuid(), 'keel.ping', $2, '{}' FROM generate_series(1, $1::bigint)",
            &[&n, &tag],
        )
        .await
        .unwrap();
    shard.batch_execute("NOTIFY keel_jobs").await.unwrap();
    let unfinished = "SELECT EXISTS (SELECT 1 FROM keel_jobs WHERE kind = 'keel.ping' AND state = 'pending')
                          OR EXISTS (SELECT 1 FROM keel_jobs WHERE kind = 'keel.ping' AND state = 'running')";
    while shard.query_one(unfinished, &[]).await.unwrap().get::<_, bool>(0) {
        assert!(started.elapsed() < Duration::from_secs(300), "no-op jobs did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Enqueues no-op jobs on shard 0 one at a time at `rate` for `measure`, each insert followed by the
/// wake-up Keel's enqueuers send ([`keel_outbox::Waker`]), over 8 connections; returns how many
/// started and the 50th, 99th and 99.9th percentiles of their enqueue-to-start time, in seconds,
/// read from the rows (`started_at − created_at`, both the server's clock).
pub async fn steady_pings(keel: &Keel, rate: f64, measure: Duration, tag: &str) -> (i64, Vec<f64>) {
    let shard = connect(&keel.db_url("keel_shard_0")).await;
    let mut clients: Vec<Arc<tokio_postgres::Client>> = Vec::new();
    for _ in 0..8 {
        clients.push(Arc::new(connect(&keel.db_url("keel_shard_0")).await));
    }
    let start = tokio::time::Instant::now();
    let end = start + measure;
    let mut inserts = tokio::task::JoinSet::new();
    for i in 0u64.. {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        let client = clients[i as usize % clients.len()].clone();
        let tag = tag.to_owned();
        inserts.spawn(async move {
            client.execute("INSERT INTO keel_jobs (id, kind, aggregate_id, payload) VALUES (gen_random_uuid(), 'keel.ping', $1, '{}')", &[&tag]).await?;
            // Then the wake-up, as keel_outbox::Waker sends it after an enqueuing commit.
            client.batch_execute("BEGIN; SET LOCAL synchronous_commit TO off; NOTIFY keel_jobs; COMMIT").await
        });
        while inserts.try_join_next().is_some() {}
    }
    while inserts.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(2)).await;
    let row = shard.query_one(
        "SELECT count(*), coalesce(percentile_cont(ARRAY[0.5, 0.99, 0.999]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)), ARRAY[0,0,0]::float8[])
         FROM keel_jobs WHERE aggregate_id = $1 AND started_at IS NOT NULL", &[&tag]).await.unwrap();
    (row.get(0), row.get(1))
}

pub async fn s4_queue(keel: &Keel, plan: &Plan) -> ScenarioResult {
    let shard = connect(&keel.db_url("keel_shard_0")).await;
    // Maximum: a batch inserted at once, timed until all are done.
    let n = plan.jobs as i64;
    let started = Instant::now();
    let per_second = ping_burst(&shard, n, "s4-max").await;

    // Latency: enqueue one at a time at half that rate, then read start − enqueue from the rows.
    let rate = per_second / 2.0;
    let (started_jobs, quantiles) = steady_pings(keel, rate, plan.measure, "s4-rate").await;
    let p99_ms = quantiles[1] * 1000.0;
    let outcome = Outcome {
        requests: n as u64,
        errors: 0,
        refused: 0,
        seconds: started.elapsed().as_secs_f64(),
        per_second,
        p50_ms: quantiles[0] * 1000.0,
        p99_ms,
        p999_ms: quantiles[2] * 1000.0,
    };
    let met = per_second >= 10_000.0 && p99_ms <= 50.0;
    ScenarioResult {
        id: "S4",
        name: "queue: no-op jobs end to end (enqueue to done)",
        baseline_name: "absolute targets".into(),
        target: "≥ 10,000 jobs/s; enqueue-to-start p99 ≤ 50 ms at half that rate".into(),
        met: Some(met),
        command: format!(
            "{n} jobs inserted at once on shard 0, timed to done; then {rate:.0} jobs/s enqueued one by one for {} s",
            plan.measure.as_secs_f64()
        ),
        notes: format!("percentiles are enqueue-to-start of the {started_jobs} jobs of the half-rate phase"),
        keel: Some(outcome),
        ..Default::default()
    }
}

/// The queue after an idle spell that left its statistics saying "empty", as the cliff of a queue
/// was found: a new `keel up` of its own (its shard 0's queue holds nothing; the main run's holds the
/// seed's finished jobs, and statistics with rows in them plan no cliff), 5 s idle, `DELETE` of the
/// no-op jobs, `VACUUM ANALYZE keel_jobs` and a `CHECKPOINT`, 5 s in which the idle runners are woken
/// every 20 ms (their plans made again, and cached, from those statistics), then S4's burst. Before
/// keel-outbox planned its statements for this (see `query_by_index` there), it drained at 649/s
/// against S4's 12,573/s in the same run: plans cached from the empty table read all of it for
/// every claim and completion.
pub async fn s4_after_the_cliff(keel_binary: &Path, work: &Path, plan: &Plan, s4_per_second: f64) -> ScenarioResult {
    let dir = work.join("s4c-cliff");
    let keel = Keel::start(keel_binary, &dir).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let shard = connect(&keel.db_url("keel_shard_0")).await;
    // One statement at a time: VACUUM refuses to run in a string of several.
    for step in ["DELETE FROM keel_jobs WHERE kind = 'keel.ping'", "VACUUM ANALYZE keel_jobs", "CHECKPOINT"] {
        shard.batch_execute(step).await.unwrap_or_else(|e| panic!("S4c: {step}: {e}"));
    }
    // The idle queue's runners woken every 20 ms for 5 s, as a trickle of other jobs wakes them: each
    // wake-up makes every kind claim, so the claims are planned (and their plans cached) many
    // times over while the statistics say "empty".
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(5) {
        shard.batch_execute("NOTIFY keel_jobs").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = plan.jobs as i64;
    let started = Instant::now();
    let per_second = ping_burst(&shard, n, "s4-cliff").await;
    let seconds = started.elapsed().as_secs_f64();
    drop(shard);
    drop(keel);
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = Outcome { requests: n as u64, seconds, per_second, ..Outcome::default() };
    let result = ScenarioResult {
        id: "S4c",
        name: "queue after an idle spell analysed empty: S4's burst again",
        baseline_name: "S4's maximum, same run".into(),
        baseline_per_second: Some(s4_per_second),
        target: "≥ 0.8× S4".into(),
        command: format!(
            "a new keel up; 5 s idle; DELETE FROM keel_jobs WHERE kind = 'keel.ping'; VACUUM ANALYZE keel_jobs; \
             CHECKPOINT; 5 s of NOTIFY keel_jobs every 20 ms; {n} jobs inserted at once on its shard 0, timed to done"
        ),
        notes: "no latency percentiles: a burst's throughput only".into(),
        keel: Some(outcome),
        ..Default::default()
    };
    judged(result, per_second / s4_per_second, 0.8)
}

/// A shop's day: 28% profiles, 28% products, 27% searches (Zipf over the seeded ids), 5% feed
/// reads, 8% cart writes, 2% checkouts, 1% likes and unlikes, 1% follows and unfollows.
pub fn shop_day(seed: &Seed) -> MakeCall {
    let zipf = Arc::new(Zipf::new(seed.users.len().min(seed.products.len()), 1.0));
    let users = Arc::new(seed.users.clone());
    let products = Arc::new(seed.products.clone());
    Arc::new(move |n, rng| {
        let i = zipf.sample(rng);
        let (_, token) = &users[rng.next_u64() as usize % users.len()];
        let product = &products[i];
        let user_call = |method: reqwest::Method, path: String, json: Option<serde_json::Value>, key: bool| Call {
            method,
            path,
            token: Some(token.clone()),
            authorization: None,
            headers: if key { vec![("idempotency-key", format!("s5-{n}"))] } else { Vec::new() },
            json,
            // Only checkouts carry a key: a cart whose items a pending order already took is refused.
            refusal: if key { &[409] } else { &[] },
        };
        match rng.fraction() {
            f if f < 0.28 => Call::get(format!("/v1/users/{}", users[i].0)),
            f if f < 0.56 => Call::get(format!("/v1/products/{product}")),
            f if f < 0.83 => Call::get(format!("/v1/search?q=product+{}", i % 1000)),
            f if f < 0.88 => user_call(reqwest::Method::GET, "/v1/feed?limit=20".into(), None, false),
            f if f < 0.96 => user_call(
                reqwest::Method::PUT,
                format!("/v1/cart/items/{product}"),
                Some(serde_json::json!({ "quantity": 1 + n % 3 })),
                false,
            ),
            f if f < 0.98 => user_call(reqwest::Method::POST, "/v1/checkout".into(), None, true),
            f if f < 0.985 => user_call(reqwest::Method::PUT, format!("/v1/products/{product}/like"), None, false),
            f if f < 0.99 => user_call(reqwest::Method::DELETE, format!("/v1/products/{product}/like"), None, false),
            // Users follow and unfollow the popular ones (Zipf); nobody follows themselves.
            f if f < 0.995 && users[i].1 != *token => {
                user_call(reqwest::Method::PUT, format!("/v1/users/{}/follow", users[i].0), None, false)
            }
            f if f >= 0.995 && users[i].1 != *token => {
                user_call(reqwest::Method::DELETE, format!("/v1/users/{}/follow", users[i].0), None, false)
            }
            _ => Call::get(format!("/v1/users/{}", users[i].0)),
        }
    })
}

/// S5: the maximum of the mix (closed loop), then open loops at 50% and 80% of it, latency from
/// each request's intended send time.
pub async fn s5_shop_day(keel: &Keel, seed: &Seed, plan: &Plan) -> ScenarioResult {
    let make = shop_day(seed);
    let max = closed_loop(&keel.base, make.clone(), CONNECTIONS, plan.warmup, plan.measure).await;
    drain_queues(keel).await;
    let half = open_loop(&keel.base, make.clone(), max.per_second * 0.5, plan.warmup, plan.measure).await;
    drain_queues(keel).await;
    let most = open_loop(&keel.base, make, max.per_second * 0.8, plan.warmup, plan.measure).await;
    let backlog = drain_queues(keel).await;
    let met = half.p99_ms <= 10.0 && half.errors == 0;
    ScenarioResult {
        id: "S5",
        name: "a shop's day: 88% reads (profiles, products, search, feeds), 8% cart writes, 2% checkouts, 1% likes, 1% follows; open loop at 50% and 80%",
        keel: Some(half.clone()),
        baseline_name: format!("its own closed-loop maximum, {:.0}/s (p99 {:.2} ms)", max.per_second, max.p99_ms),
        baseline_per_second: Some(max.per_second),
        ratio: None,
        target: "p99 ≤ 10 ms at 50% of maximum, no errors".into(),
        met: Some(met),
        command: format!(
            "keel-bench: closed loop {CONNECTIONS} connections for the maximum; open loop at {:.0}/s and {:.0}/s, {} s each",
            max.per_second * 0.5,
            max.per_second * 0.8,
            plan.measure.as_secs_f64()
        ),
        notes: format!(
            "the row shows the 50% run; at 80% ({:.0}/s sent): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} errors. Workers ran the sagas, e-mail, search and webhook fan-out on the same cores and needed {:.1} s more afterwards. Checkouts of a cart whose items a pending order took were refused (409, in neither rates nor latencies): {}, {} and {} in the maximum, 50% and 80% runs.",
            most.per_second,
            most.p50_ms,
            most.p99_ms,
            most.p999_ms,
            most.errors,
            backlog.as_secs_f64(),
            max.refused,
            half.refused,
            most.refused
        ),
        ..Default::default()
    }
}

/// The reads' slowdown during the burst: p99 during over p99 unloaded; none without both.
fn p99_ratio(unloaded: &Outcome, during: &Outcome) -> Option<f64> {
    (unloaded.requests > 0 && during.requests > 0 && unloaded.p99_ms > 0.0).then(|| during.p99_ms / unloaded.p99_ms)
}

/// S6's sign-ins: `count` of them, spread over the seeded users that have a password.
fn sign_in_calls(seed: &Seed, count: usize) -> Vec<Call> {
    assert!(!seed.accounts.is_empty(), "S6 needs seeded users with a password");
    (0..count)
        .map(|i| {
            let (email, password) = &seed.accounts[i % seed.accounts.len()];
            Call {
                method: reqwest::Method::POST,
                path: "/v1/sessions".into(),
                token: None,
                authorization: None,
                headers: Vec::new(),
                json: Some(serde_json::json!({ "email": email, "password": password })),
                // Turned away (rate limit, overload, timeout): a refusal, counted apart from failures.
                refusal: &[429, 503],
            }
        })
        .collect()
}

/// S6: S1's anonymous reads at a fixed rate (open loop), unloaded, then during a burst of
/// `plan.sign_ins` sign-ins sent at once. `read_rate`: the reads per second to send.
pub async fn s6_sign_in_burst(keel: &Keel, seed: &Seed, plan: &Plan, read_rate: f64) -> ScenarioResult {
    let reads = cached_reads(seed, None);
    let unloaded = open_loop(&keel.base, reads.clone(), read_rate, plan.warmup, plan.measure).await;
    let calls = sign_in_calls(seed, plan.sign_ins);
    let (during, sign_ins) =
        open_loop_during(&keel.base, reads, read_rate, plan.warmup, burst(&keel.base, calls)).await;
    let ratio = p99_ratio(&unloaded, &during);
    let result = ScenarioResult {
        id: "S6",
        name: "sign-in burst: S1's anonymous reads during concurrent POST /v1/sessions (Argon2id)",
        baseline_name: format!(
            "the same reads unloaded just before: p50 {:.2} ms, p99 {:.2} ms over {} reads",
            unloaded.p50_ms, unloaded.p99_ms, unloaded.requests
        ),
        baseline_per_second: Some(unloaded.per_second),
        target: "reads' p99 during the burst ≤ 2× unloaded".into(),
        command: format!(
            "keel-bench: S1's anonymous calls in an open loop at {read_rate:.0}/s (a quarter of S1's anonymous rate), \
             {:.1} s unloaded, then during {} sign-ins sent at once on connections of their own",
            plan.measure.as_secs_f64(),
            plan.sign_ins
        ),
        notes: format!(
            "The ratio is of the reads' p99 latencies (from intended send times), during the burst over unloaded; \
             \"during\" is the reads intended from the burst's start to its last answer ({:.2} s). The burst: {} \
             signed in, {:.0}/s; sign-in latency from the burst's start p50 {:.0} ms, p99 {:.0} ms; {} refused (429 \
             or 503), {} failed. Each sign-in checks an Argon2id hash; Keel runs at most \
             KEEL_PASSWORD_HASH_CONCURRENCY (default: one per core) at once, on threads of their own at nice 19. Only {} seeded \
             users have a password (the burst's, each signed in {}×): a sign-up with a password costs a hash too, \
             so the others have none, to keep the seeding short.",
            sign_ins.seconds,
            sign_ins.requests,
            sign_ins.per_second,
            sign_ins.p50_ms,
            sign_ins.p99_ms,
            sign_ins.refused,
            sign_ins.errors,
            seed.accounts.len(),
            plan.sign_ins.div_ceil(seed.accounts.len().max(1)),
        ),
        keel: Some(during),
        also: BTreeMap::from([("reads unloaded", unloaded), ("sign-ins", sign_ins)]),
        ..Default::default()
    };
    judged_at_most(result, ratio, 2.0)
}

/// Checks the open-loop generator end to end against the baseline (used by the smoke run).
pub async fn open_loop_probe(baseline: &str, plan: &Plan) -> Outcome {
    let make: MakeCall = Arc::new(|_, _| Call::get("/healthz".into()));
    open_loop(baseline, make, 200.0, plan.warmup, plan.measure).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_so_that_neither_variant_always_goes_first() {
        assert_eq!(alternating(1), [false, true]);
        assert_eq!(alternating(2), [false, true, true, false]);
        let order = alternating(4);
        assert_eq!(order.iter().filter(|b| **b).count(), 4);
        // The mean position of each variant is the same: no drift favours one.
        let mean = |v: bool| order.iter().enumerate().filter(|(_, b)| **b == v).map(|(i, _)| i).sum::<usize>();
        assert_eq!(mean(false), mean(true));
    }

    #[test]
    fn tokens_spread_over_every_user_and_never_belong_to_the_profile_read() {
        let count = 50;
        let mut seen = vec![0u32; count];
        for n in 0..50_000u64 {
            let owner = (n % 7 == 0).then_some((n as usize / 3) % count);
            let j = token_for(n, count, owner);
            assert!(j < count);
            assert_ne!(Some(j), owner, "call {n}");
            seen[j] += 1;
        }
        assert!(seen.iter().all(|c| (700..1300).contains(c)), "{seen:?}");
        // One user only: their token, whatever they read.
        assert_eq!(token_for(5, 1, Some(0)), 0);
    }

    fn outcome(requests: u64, p99_ms: f64) -> Outcome {
        Outcome { requests, p99_ms, ..Outcome::default() }
    }

    #[test]
    fn the_burst_ratio_is_p99_during_over_p99_unloaded_and_is_judged_at_most() {
        assert_eq!(p99_ratio(&outcome(100, 2.0), &outcome(10, 3.0)), Some(1.5));
        assert_eq!(p99_ratio(&outcome(0, 0.0), &outcome(10, 3.0)), None);
        assert_eq!(p99_ratio(&outcome(100, 2.0), &outcome(0, 0.0)), None);
        let judged = |ratio| judged_at_most(ScenarioResult::default(), ratio, 2.0).met;
        assert_eq!(judged(Some(1.99)), Some(true));
        assert_eq!(judged(Some(2.0)), Some(true));
        assert_eq!(judged(Some(2.01)), Some(false));
        assert_eq!(judged(None), None);
    }

    #[test]
    fn authenticated_reads_are_the_anonymous_reads_with_a_prepared_token() {
        let seed = Seed {
            users: (0..4).map(|i| (format!("u{i}"), format!("token-{i}"))).collect(),
            products: (0..4).map(|i| format!("p{i}")).collect(),
            accounts: Vec::new(),
        };
        let tokens = Arc::new(seed.users.iter().map(|(_, t)| bearer(t)).collect::<Vec<_>>());
        let (anonymous, authenticated) = (cached_reads(&seed, None), cached_reads(&seed, Some(tokens)));
        let (mut a, mut b) = (crate::load::Rng::new(3), crate::load::Rng::new(3));
        for n in 0..200 {
            let (x, y) = (anonymous(n, &mut a), authenticated(n, &mut b));
            assert_eq!(x.path, y.path);
            assert!(x.authorization.is_none() && x.token.is_none());
            let value = y.authorization.expect("a token").to_str().unwrap().to_owned();
            assert!(value.starts_with("Bearer token-"));
            if let Some(user) = y.path.strip_prefix("/v1/users/u") {
                assert_ne!(value, format!("Bearer token-{user}"), "an owner's read");
            }
        }
    }

    #[test]
    fn sign_ins_spread_over_the_users_with_a_password() {
        let seed = Seed {
            users: Vec::new(),
            products: Vec::new(),
            accounts: vec![("a@x.example".into(), "pa".into()), ("b@x.example".into(), "pb".into())],
        };
        let calls = sign_in_calls(&seed, 5);
        assert_eq!(calls.len(), 5);
        assert!(calls.iter().all(|c| c.method == reqwest::Method::POST && c.path == "/v1/sessions"));
        assert_eq!(calls[3].json, Some(serde_json::json!({ "email": "b@x.example", "password": "pb" })));
        assert_eq!(calls[0].refusal, &[429, 503]);
    }
}
