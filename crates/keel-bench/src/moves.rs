//! S8, bucket moves under load: a `keel up` of its own, seeded with many users (a deposit and a cart
//! each, a like and an order for every fourth), a new shard added (`POST /v1/admin/shards`), then half
//! of shard 0's buckets moved to it (`POST /v1/admin/shards/moves`) while S5's mix runs against the
//! API in an open loop. Measured: the move's duration and rates (rows, users), the pause the
//! cutover reports (`pause_ms`), and the latency of the mix's writes around the cutover against
//! before the move, with every 503 (Retry-After) and error counted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::load::{closed_loop, Call, MakeCall, Outcome, Rng};
use crate::scenarios::{self, shop_day, Plan, ScenarioResult, CONNECTIONS};
use crate::setup::{self, Keel, Seed, ADMIN_TOKEN};

/// How often the move is polled: the resolution of its phases' timings and of the cutover window.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How far the cutover window reaches either side of the polls that bracket the switch.
const AROUND: Duration = Duration::from_secs(1);
/// A 503 with Retry-After (a write to a bucket that moved under a node still routing by the old
/// map) is sent again after this, for [`RETRY_FOR`] at most, as Keel's own move test does.
const RETRY_AFTER: Duration = Duration::from_millis(20);
const RETRY_FOR: Duration = Duration::from_secs(20);
/// No request of the mix waits longer than this for an answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The name of the database made for the new shard in `keel up`'s cluster.
const NEW_SHARD_DB: &str = "keel_shard_2";

/// Sizes: the full run moves enough rows for a rate to mean something; the smoke run only proves
/// the harness.
struct Sizes {
    users: usize,
    products: usize,
    /// The longest the move may take before the scenario gives up.
    move_timeout: Duration,
    /// The mix runs this long before the move is asked for (after its warm-up).
    before: Duration,
}

fn sizes(plan: &Plan) -> Sizes {
    if plan.smoke {
        Sizes { users: 300, products: 50, move_timeout: Duration::from_secs(120), before: Duration::from_secs(1) }
    } else {
        Sizes { users: 20_000, products: 1_000, move_timeout: Duration::from_secs(900), before: plan.measure / 2 }
    }
}

/// One request of the mix as it was answered.
#[derive(Clone, Copy, Debug)]
struct Event {
    /// Its intended send time, from the load's start.
    at: Duration,
    /// From its intended send time to its final answer (after any 503s sent again).
    latency: Duration,
    /// The final status; 0 for no answer.
    status: u16,
    /// Not a GET: a cart write, a checkout, a like or an unlike.
    write: bool,
    /// A refusal by design (a checkout's 409): in neither the latencies nor the errors.
    refused: bool,
    /// 503s with Retry-After it met before its final answer.
    unavailable: u32,
}

impl Event {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn failed(&self) -> bool {
        !self.ok() && !self.refused
    }
}

/// Sends `call`, again after [`RETRY_AFTER`] for each 503 with Retry-After; returns the final
/// status (0 for no answer) and how many such 503s it met.
async fn send(client: &reqwest::Client, base: &str, call: &Call) -> (u16, u32) {
    let first = std::time::Instant::now();
    let mut unavailable = 0;
    loop {
        let mut request = client.request(call.method.clone(), format!("{base}{}", call.path));
        if let Some(token) = &call.token {
            request = request.bearer_auth(token);
        }
        if let Some(value) = &call.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value.clone());
        }
        for (name, value) in &call.headers {
            request = request.header(*name, value);
        }
        if let Some(json) = &call.json {
            request = request.json(json);
        }
        let Ok(response) = request.send().await else { return (0, unavailable) };
        let status = response.status().as_u16();
        let again = status == 503 && response.headers().contains_key(reqwest::header::RETRY_AFTER);
        // Read the body: a response is only complete when it has arrived.
        if response.bytes().await.is_err() {
            return (0, unavailable);
        }
        if !again {
            return (status, unavailable);
        }
        unavailable += 1;
        if first.elapsed() >= RETRY_FOR {
            return (status, unavailable);
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// An open loop at `rate` from `origin` until `stop`, every request recorded with its intended time.
async fn open_loop_events(
    base: String,
    make: MakeCall,
    rate: f64,
    origin: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Event> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client");
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut rng = Rng::new(8);
    let mut inflight = tokio::task::JoinSet::new();
    for n in 0u64.. {
        let intended = origin + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(intended).await;
        if stop.load(Ordering::Acquire) {
            break;
        }
        let call = make(n, &mut rng);
        let (client, base, events) = (client.clone(), base.clone(), events.clone());
        inflight.spawn(async move {
            let (status, unavailable) = send(&client, &base, &call).await;
            let event = Event {
                at: intended - origin,
                latency: intended.elapsed(),
                status,
                write: call.method != reqwest::Method::GET,
                refused: call.refusal.contains(&status),
                unavailable,
            };
            events.lock().unwrap().push(event);
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    let events = std::mem::take(&mut *events.lock().unwrap());
    events
}

/// The requests intended in `[from, to)` that `keep` keeps, as an outcome over that window.
fn outcome(events: &[Event], from: Duration, to: Duration, keep: impl Fn(&Event) -> bool) -> Outcome {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let (mut errors, mut refused) = (0, 0);
    for e in events.iter().filter(|e| e.at >= from && e.at < to && keep(e)) {
        if e.ok() {
            let _ = histogram.record(e.latency.as_micros().max(1) as u64);
        } else if e.refused {
            refused += 1;
        } else {
            errors += 1;
        }
    }
    Outcome::from_histogram(&histogram, errors, refused, to.saturating_sub(from).as_secs_f64().max(1e-3))
}

/// The longest answered latency (ms) of the requests intended in `[from, to)` that `keep` keeps.
fn max_ms(events: &[Event], from: Duration, to: Duration, keep: impl Fn(&Event) -> bool) -> f64 {
    events
        .iter()
        .filter(|e| e.at >= from && e.at < to && e.ok() && keep(e))
        .map(|e| e.latency.as_secs_f64() * 1000.0)
        .fold(0.0, f64::max)
}

/// The polls of the move: (time from the load's start, state).
type Polls = Vec<(Duration, String)>;

/// The window the switch happened in: from the last poll that saw the move before it (copying,
/// catching up or in the cutover) to the first that saw it after (cleanup or done).
fn switch_window(polls: &Polls) -> Option<(Duration, Duration)> {
    let after = polls.iter().position(|(_, s)| s == "cleanup" || s == "done")?;
    let before = polls[..after].last().map_or(polls[after].0, |(t, _)| *t);
    Some((before, polls[after].0))
}

/// When each state was first seen, and for how long (until the next state was first seen).
fn phases(polls: &Polls) -> Vec<(String, Duration)> {
    let mut firsts: Vec<(String, Duration)> = Vec::new();
    for (t, state) in polls {
        if firsts.last().is_none_or(|(s, _)| s != state) {
            firsts.push((state.clone(), *t));
        }
    }
    firsts
        .iter()
        .enumerate()
        .map(|(i, (state, t))| (state.clone(), firsts.get(i + 1).map_or(Duration::ZERO, |(_, next)| *next - *t)))
        .collect()
}

/// An admin request's status and JSON body (null for none).
async fn admin_json(request: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
    let response = request.bearer_auth(ADMIN_TOKEN).send().await.unwrap_or_else(|e| panic!("S8: {what}: {e}"));
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Users and products for S8: every user signs up (no password), is credited a deposit (with an
/// idempotency key) and puts a sold-out product in the cart; once addresses are verified, every
/// fourth likes a product and checks out (an order the saga fails as out of stock, the cart kept).
async fn seed(keel: &Keel, users: usize, products: usize) -> Seed {
    let client = reqwest::Client::new();
    let base = keel.base.clone();
    let create = |body: Value| {
        let (client, base) = (client.clone(), base.clone());
        async move { setup::create_product(&client, &base, &body).await }
    };
    let sold_out = create(json!({ "sku": "S8-SOLD-OUT", "name": "Sold out", "price_cents": 100, "stock": 0 })).await;
    let products = setup::run_many(products, 32, |i| {
        create(json!({ "sku": format!("S8-SKU-{i}"), "name": format!("Product {i}"),
            "description": "A product used by the benchmark", "price_cents": 100 + i as i64, "stock": 1_000_000_000 }))
    })
    .await;
    let users = setup::run_many(users, 32, |i| {
        let (client, base, sold_out) = (client.clone(), base.clone(), sold_out.clone());
        async move {
            let body = json!({ "name": format!("Mover {i}"), "email": format!("mover{i}@bench.example") });
            let response = client.post(format!("{base}/v1/users")).json(&body).send().await.expect("S8: a sign-up");
            let status = response.status();
            let user: Value = response.json().await.unwrap_or_default();
            assert!(status.is_success(), "S8: signing up seeded user {i}: {status} {user}");
            let token = user["access_token"].as_str().or(user["token"].as_str()).expect("an access token");
            let (id, token) = (user["id"].as_str().unwrap().to_owned(), token.to_owned());
            let deposit = client
                .post(format!("{base}/v1/admin/users/{id}/deposits"))
                .bearer_auth(ADMIN_TOKEN)
                .header("idempotency-key", "seed")
                .json(&json!({ "amount_cents": 10_000_000_000_i64 }))
                .send()
                .await
                .expect("S8: a seed deposit");
            assert!(deposit.status().is_success(), "S8: the seed deposit of user {i}: {}", deposit.status());
            let cart = client
                .put(format!("{base}/v1/cart/items/{sold_out}"))
                .bearer_auth(&token)
                .json(&json!({ "quantity": 1 }))
                .send()
                .await
                .expect("S8: a seed cart write");
            assert!(cart.status().is_success(), "S8: the seed cart of user {i}: {}", cart.status());
            (id, token)
        }
    })
    .await;
    setup::verify_emails(keel).await;
    let every_fourth: Vec<(String, String)> = users.iter().step_by(4).cloned().collect();
    let liked = products.clone();
    setup::run_many(every_fourth.len(), 32, |i| {
        let (client, base) = (client.clone(), base.clone());
        let (_, token) = every_fourth[i].clone();
        let product = liked[i % liked.len()].clone();
        async move {
            let like = client
                .put(format!("{base}/v1/products/{product}/like"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("S8: a seed like");
            assert!(like.status().is_success(), "S8: a seed like: {}", like.status());
            let order = client
                .post(format!("{base}/v1/checkout"))
                .bearer_auth(&token)
                .header("idempotency-key", "seed-order")
                .send()
                .await
                .expect("S8: a seed checkout");
            assert!(order.status().is_success(), "S8: a seed checkout: {}", order.status());
        }
    })
    .await;
    Seed { users, products, accounts: Vec::new() }
}

/// (users per shard, shard 0's buckets) from `GET /v1/admin/shards`.
async fn shards(client: &reqwest::Client, keel: &Keel) -> (BTreeMap<u64, i64>, Vec<u64>) {
    let (status, map) = admin_json(client.get(format!("{}/v1/admin/shards", keel.base)), "GET /v1/admin/shards").await;
    assert_eq!(status, 200, "S8: GET /v1/admin/shards answered {status}: {map}");
    let list = map["shards"].as_array().cloned().unwrap_or_default();
    let users = list.iter().map(|s| (s["shard"].as_u64().unwrap_or(0), s["users"].as_i64().unwrap_or(-1))).collect();
    let shard0 = list
        .iter()
        .find(|s| s["shard"] == 0)
        .and_then(|s| s["buckets"].as_array())
        .map(|b| b.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    (users, shard0)
}

/// S8: see the module's documentation. Its `keel up` runs under `work` and is stopped and removed
/// afterwards.
pub async fn s8_bucket_moves(keel_binary: &Path, work: &Path, plan: &Plan) -> ScenarioResult {
    let sizes = sizes(plan);
    let dir = work.join("s8-moves");
    eprintln!(
        "keel-bench: S8: starting keel up, seeding {} users ({} with a like and an order) and {} products …",
        sizes.users,
        sizes.users.div_ceil(4),
        sizes.products
    );
    let keel = Keel::start(keel_binary, &dir).await;
    let seeding = std::time::Instant::now();
    let seed = seed(&keel, sizes.users, sizes.products).await;
    let seeded = seeding.elapsed();
    let drained = scenarios::drain_queues(&keel).await;
    eprintln!(
        "keel-bench: S8: seeded in {:.1} s; the seed's jobs were done after {:.1} s more",
        seeded.as_secs_f64(),
        drained.as_secs_f64()
    );

    // The rate: half the mix's closed-loop maximum on this keel up (S5's judged point).
    let make = shop_day(&seed);
    let probe_for = (plan.measure / 4).max(Duration::from_millis(500));
    let max = closed_loop(&keel.base, make.clone(), CONNECTIONS, plan.warmup, probe_for).await;
    assert!(max.requests > 0, "S8: the mix's closed loop had no answer ({} failed)", max.errors);
    // At least 100/s: some 11 writes a second, so that no window is without writes.
    let rate = (max.per_second * 0.5).max(100.0);
    scenarios::drain_queues(&keel).await;

    // The new shard: a database in keel up's own cluster, registered with no buckets.
    let client = reqwest::Client::new();
    let cluster = scenarios::connect(&keel.db_url("postgres")).await;
    cluster
        .batch_execute(&format!("CREATE DATABASE {NEW_SHARD_DB}"))
        .await
        .unwrap_or_else(|e| panic!("S8: CREATE DATABASE {NEW_SHARD_DB}: {e}"));
    drop(cluster);
    let (status, added) = admin_json(
        client.post(format!("{}/v1/admin/shards", keel.base)).json(&json!({ "url": keel.db_url(NEW_SHARD_DB) })),
        "POST /v1/admin/shards",
    )
    .await;
    assert_eq!(status, 201, "S8: POST /v1/admin/shards answered {status}: {added}");
    let to = added["shard"].as_u64().unwrap_or_else(|| panic!("S8: the new shard's number in {added}"));
    let (users_before, shard0) = shards(&client, &keel).await;
    let moving: Vec<u64> = shard0.iter().copied().step_by(2).collect();
    assert!(!moving.is_empty(), "S8: shard 0 holds no bucket: {users_before:?}");

    // The mix in an open loop; the move asked for once it has run `before` past its warm-up.
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(open_loop_events(keel.base.clone(), make, rate, origin, stop.clone()));
    tokio::time::sleep_until(origin + plan.warmup + sizes.before).await;
    let posted = origin.elapsed();
    let (status, started) = admin_json(
        client.post(format!("{}/v1/admin/shards/moves", keel.base)).json(&json!({ "buckets": moving, "to": to })),
        "POST /v1/admin/shards/moves",
    )
    .await;
    assert_eq!(status, 202, "S8: POST /v1/admin/shards/moves answered {status}: {started}");
    let id = started["id"].as_str().unwrap_or_else(|| panic!("S8: a move id in {started}")).to_owned();
    let mut polls: Polls = Vec::new();
    let finished = loop {
        let (status, mv) = admin_json(
            client.get(format!("{}/v1/admin/shards/moves/{id}", keel.base)),
            "GET /v1/admin/shards/moves/{id}",
        )
        .await;
        let at = origin.elapsed();
        assert_eq!(status, 200, "S8: GET /v1/admin/shards/moves/{id} answered {status}: {mv}");
        let state = mv["state"].as_str().unwrap_or("?").to_owned();
        polls.push((at, state.clone()));
        if state == "done" || state == "failed" {
            break mv;
        }
        if at - posted > sizes.move_timeout {
            stop.store(true, Ordering::Release);
            panic!(
                "S8: the move was not done within {} s: state {state}, error {}, {} of {} rows copied; states seen: {:?}",
                sizes.move_timeout.as_secs(),
                mv["error"],
                mv["rows_copied"],
                mv["rows_total"],
                phases(&polls).iter().map(|(s, d)| format!("{s} {:.1} s", d.as_secs_f64())).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    let done = origin.elapsed();
    assert_eq!(finished["state"], "done", "S8: the move failed: error {}; {finished}", finished["error"]);
    // The writes after the switch too: the mix goes on a second more.
    tokio::time::sleep(AROUND).await;
    stop.store(true, Ordering::Release);
    let events = load.await.expect("S8: the open loop");
    let (users_after, _) = shards(&client, &keel).await;
    drop(keel);
    let _ = std::fs::remove_dir_all(&dir);

    let (switch_from, switch_to) = switch_window(&polls).expect("a done move was seen switched");
    let (around_from, around_to) = (switch_from.saturating_sub(AROUND), switch_to + AROUND);
    let measured_from = plan.warmup;
    let writes = |e: &Event| e.write;
    let before = outcome(&events, measured_from, posted, writes);
    let around = outcome(&events, around_from, around_to, writes);
    let during = outcome(&events, posted, done, writes);
    let all_during = outcome(&events, posted, done, |_| true);
    let (before_max, around_max) =
        (max_ms(&events, measured_from, posted, writes), max_ms(&events, around_from, around_to, writes));
    let measured: Vec<&Event> = events.iter().filter(|e| e.at >= measured_from).collect();
    let unavailable: u32 = measured.iter().map(|e| e.unavailable).sum();
    let met_unavailable = measured.iter().filter(|e| e.unavailable > 0).count();
    let failed: Vec<&&Event> = measured.iter().filter(|e| e.failed()).collect();
    let mut failed_statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for e in &failed {
        *failed_statuses.entry(e.status).or_default() += 1;
    }
    let failed_text = if failed.is_empty() {
        "none".to_owned()
    } else {
        failed_statuses.iter().map(|(s, n)| format!("{n}× {s}")).collect::<Vec<_>>().join(", ")
    };

    let seconds = (done - posted).as_secs_f64();
    let to_switch = (switch_to - posted).as_secs_f64();
    let rows = finished["rows_copied"].as_i64().unwrap_or(0);
    let users_moved = users_after.get(&to).copied().unwrap_or(-1);
    let shard0_delta = users_before.get(&0).copied().unwrap_or(0) - users_after.get(&0).copied().unwrap_or(0);
    let pause_ms = finished["pause_ms"].as_f64();
    let phases_text = phases(&polls)
        .iter()
        .filter(|(s, _)| s != "done")
        .map(|(s, d)| format!("{s} {:.2} s", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ");
    let pause_text = pause_ms.map_or("none reported".to_owned(), |p| format!("{p:.1} ms"));
    eprintln!(
        "  S8 move: {} buckets, {rows} rows and {users_moved} users in {seconds:.2} s ({:.0} rows/s, {:.0} users/s; \
         switched after {to_switch:.2} s: {:.0} rows/s to the switch); phases: {phases_text}; pause_ms {pause_text}; writes before p99 {:.2} ms \
         max {before_max:.2} ms, around the cutover ({:.2} s) p99 {:.2} ms max {around_max:.2} ms over {} writes; \
         503s with Retry-After {unavailable} (on {met_unavailable} requests); failed: {failed_text}",
        moving.len(),
        rows as f64 / seconds,
        users_moved as f64 / seconds,
        rows as f64 / to_switch,
        before.p99_ms,
        (around_to - around_from).as_secs_f64(),
        around.p99_ms,
        around.requests
    );

    let mut figures = BTreeMap::new();
    figures.insert("users seeded".into(), sizes.users as f64);
    figures.insert("buckets moved".into(), moving.len() as f64);
    figures.insert("move seconds (POST to done)".into(), seconds);
    figures.insert("move seconds to the switch (POST to cleanup seen)".into(), to_switch);
    figures.insert("rows moved (rows_copied at done)".into(), rows as f64);
    figures.insert("rows per second".into(), rows as f64 / seconds);
    figures.insert("rows per second to the switch".into(), rows as f64 / to_switch);
    figures.insert("users moved (users on the new shard at done)".into(), users_moved as f64);
    figures.insert("users per second".into(), users_moved as f64 / seconds);
    figures.insert("shard 0 users before less after".into(), shard0_delta as f64);
    if let Some(p) = pause_ms {
        figures.insert("pause_ms (the cutover's own)".into(), p);
    }
    figures.insert("mix rate sent /s".into(), rate);
    figures.insert("writes before the move p99 ms".into(), before.p99_ms);
    figures.insert("writes before the move max ms".into(), before_max);
    figures.insert("writes around the cutover p99 ms".into(), around.p99_ms);
    figures.insert("writes around the cutover max ms".into(), around_max);
    figures.insert("writes around the cutover".into(), around.requests as f64);
    figures.insert("cutover window seconds".into(), (around_to - around_from).as_secs_f64());
    figures.insert("503s with Retry-After".into(), f64::from(unavailable));
    figures.insert("requests that met a 503".into(), met_unavailable as f64);
    figures.insert("failed requests".into(), failed.len() as f64);

    let row = Outcome { per_second: rows as f64 / seconds, ..all_during.clone() };
    ScenarioResult {
        id: "S8",
        name: "bucket moves under load: half of shard 0's buckets moved to a new shard while S5's mix runs (open loop)",
        keel: Some(row),
        baseline_name: "the mix's writes before the move, same run".into(),
        baseline_per_second: None,
        ratio: (before.p99_ms > 0.0 && around.requests > 0).then(|| around.p99_ms / before.p99_ms),
        target: "none: a measurement (move rate, pause; see notes)".into(),
        met: None,
        command: format!(
            "keel-bench: a keel up of its own (KEEL_SHARDS=2) seeded through the API with {} users (sign-up, a \
             deposit, a cart item; every fourth a like and a checkout) and {} products; CREATE DATABASE {NEW_SHARD_DB} \
             in its cluster and POST /v1/admin/shards with its connection string; S5's mix in an open loop at \
             {rate:.0}/s (half its closed-loop maximum on this keel up, 100/s at least; {:.0}/s over {:.1} s); after {:.1} s of \
             warm-up and {:.1} s more, POST /v1/admin/shards/moves with every other bucket of shard 0 ({} buckets) \
             to shard {to}, GET /v1/admin/shards/moves/{{id}} every {} ms until done; the mix stops {:.0} s after",
            sizes.users,
            sizes.products,
            max.per_second,
            probe_for.as_secs_f64(),
            plan.warmup.as_secs_f64(),
            sizes.before.as_secs_f64(),
            moving.len(),
            POLL_EVERY.as_millis(),
            AROUND.as_secs_f64()
        ),
        notes: format!(
            "The row: the keel /s column is the rows moved per second (rows_copied at done over POST to done); the \
             latencies and errors are of every request of the mix intended from the POST to done, from intended \
             send times; the ratio is the writes' p99 around the cutover over before the move. The move: {rows} \
             rows (rows_copied at done: the moved buckets' rows, every user table, on the new shard) and \
             {users_moved} users (the new shard's count in GET /v1/admin/shards; shard 0 lost {shard0_delta}) in \
             {seconds:.2} s from the POST to done: {:.0} rows/s, {:.0} users/s. The switch was seen {to_switch:.2} s \
             after the POST ({:.0} rows/s to the switch: copy, catch-up and cutover); the rest is cleanup, which waits a 3 s grace for nodes to load the new map before \
             deleting the old rows. Phases as polled (every {} ms): {phases_text}. The cutover's own pause_ms \
             (writes to the moving buckets held from its fence to the prepared transactions' commit): \
             {pause_text}. The mix's writes (cart writes, checkouts, likes and unlikes; 11% of it) as the load \
             saw them, latency from each intended send time to its final answer: before the move (from the \
             warm-up's end to the POST) p50 {:.2} ms, p99 {:.2} ms, max {before_max:.2} ms over {} writes; around the \
             cutover (intended from {:.0} ms before the last poll that saw the move unswitched to {:.0} ms after \
             the first that saw it switched: {:.2} s) p50 {:.2} ms, p99 {:.2} ms, max {around_max:.2} ms over {} \
             writes; over the whole move p99 {:.2} ms over {} writes. A 503 with Retry-After is sent again after \
             {} ms (for {} s at most) and the write's latency runs to its final answer: {unavailable} such 503s, \
             met by {met_unavailable} requests. Failed requests (no answer, or a status neither 2xx nor a \
             checkout's 409) from the warm-up's end on: {failed_text}. Seeding took {:.1} s and the seed's jobs \
             {:.1} s more. One 2-core machine: the load generator, Keel, its workers, the logical replication \
             (source and target in the same cluster) and the mover share it.",
            rows as f64 / seconds,
            users_moved as f64 / seconds,
            rows as f64 / to_switch,
            POLL_EVERY.as_millis(),
            before.p50_ms,
            before.p99_ms,
            before.requests,
            AROUND.as_millis(),
            AROUND.as_millis(),
            (around_to - around_from).as_secs_f64(),
            around.p50_ms,
            around.p99_ms,
            around.requests,
            during.p99_ms,
            during.requests,
            RETRY_AFTER.as_millis(),
            RETRY_FOR.as_secs(),
            seeded.as_secs_f64(),
            drained.as_secs_f64()
        ),
        also: BTreeMap::from([
            ("writes before the move", before),
            ("writes around the cutover", around),
            ("writes during the move", during),
        ]),
        figures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polls(states: &[(u64, &str)]) -> Polls {
        states.iter().map(|(ms, s)| (Duration::from_millis(*ms), (*s).to_owned())).collect()
    }

    #[test]
    fn the_switch_window_is_bracketed_by_the_polls_either_side() {
        let seen = polls(&[
            (100, "copying"),
            (150, "catching_up"),
            (200, "cutover"),
            (250, "cutover"),
            (300, "cleanup"),
            (350, "done"),
        ]);
        assert_eq!(switch_window(&seen), Some((Duration::from_millis(250), Duration::from_millis(300))));
        // Seen switched at the first poll: the window is that poll.
        let seen = polls(&[(100, "done")]);
        assert_eq!(switch_window(&seen), Some((Duration::from_millis(100), Duration::from_millis(100))));
        assert_eq!(switch_window(&polls(&[(100, "copying")])), None);
    }

    #[test]
    fn phases_last_until_the_next_state_is_first_seen() {
        let seen = polls(&[(100, "copying"), (150, "copying"), (400, "catching_up"), (500, "cleanup"), (3600, "done")]);
        let got: Vec<(String, u64)> = phases(&seen).into_iter().map(|(s, d)| (s, d.as_millis() as u64)).collect();
        assert_eq!(
            got,
            [("copying".into(), 300), ("catching_up".into(), 100), ("cleanup".into(), 3100), ("done".into(), 0)]
        );
    }

    fn event(at_ms: u64, latency_ms: u64, status: u16, write: bool) -> Event {
        Event {
            at: Duration::from_millis(at_ms),
            latency: Duration::from_millis(latency_ms),
            status,
            write,
            refused: status == 409,
            unavailable: 0,
        }
    }

    #[test]
    fn outcomes_keep_the_window_and_count_refusals_and_failures_apart() {
        let events = [
            event(10, 5, 200, true),
            event(20, 50, 201, true),
            event(30, 1, 200, false),
            event(40, 1, 409, true),
            event(50, 1, 500, true),
            event(2000, 900, 200, true),
        ];
        let writes = |e: &Event| e.write;
        let o = outcome(&events, Duration::ZERO, Duration::from_secs(1), writes);
        assert_eq!((o.requests, o.refused, o.errors), (2, 1, 1));
        assert!((o.p99_ms - 50.0).abs() < 0.1, "{}", o.p99_ms);
        assert_eq!(max_ms(&events, Duration::ZERO, Duration::from_secs(1), writes), 50.0);
        assert_eq!(max_ms(&events, Duration::ZERO, Duration::from_secs(3), writes), 900.0);
        assert_eq!(outcome(&events, Duration::ZERO, Duration::from_secs(1), |_| true).requests, 3);
    }
}
