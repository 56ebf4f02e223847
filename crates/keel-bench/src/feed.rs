//! The social graph and the feed: the seed's follows, and S5f — feed reads at their maximum, and the
//! fan-out lag measured from outside (a like, then a follower's feed polled until it shows it).

use std::time::{Duration, Instant};

use crate::load::{bearer, closed_loop, Call, MakeCall, Outcome};
use crate::scenarios::{Plan, ScenarioResult, CONNECTIONS};
use crate::setup::{run_many, Keel, Seed};

/// Each seeded user follows this many others, so each is followed by as many.
pub const FOLLOWS_PER_USER: usize = 5;

/// The `k`th user that seeded user `i` follows, of `n`: a fixed stride, so the follower of any user is
/// known without asking ([`follower_of`]).
fn followee(i: usize, k: usize, n: usize) -> usize {
    (i + 1 + k * 97) % n
}

/// A seeded user that follows seeded user `j` (of `n`).
fn follower_of(j: usize, n: usize) -> usize {
    (j + n - 1) % n
}

/// Every seeded user follows [`FOLLOWS_PER_USER`] others (each follow is an activity, so feeds start
/// with the follows of those followed). Returns how long it took.
pub async fn seed_follows(base: &str, seed: &Seed) -> Duration {
    let started = Instant::now();
    let n = seed.users.len();
    if n < 2 {
        return started.elapsed();
    }
    let client = reqwest::Client::new();
    run_many(n * FOLLOWS_PER_USER, 32, |x| {
        let (i, k) = (x / FOLLOWS_PER_USER, x % FOLLOWS_PER_USER);
        let target = followee(i, k, n);
        let request = (target != i).then(|| {
            client.put(format!("{base}/v1/users/{}/follow", seed.users[target].0)).bearer_auth(&seed.users[i].1)
        });
        async move {
            if let Some(request) = request {
                let response = request.send().await.unwrap();
                assert!(response.status().is_success(), "seeding a follow: {}", response.status());
            }
        }
    })
    .await;
    started.elapsed()
}

/// A feed read of a random seeded user.
pub fn feed_reads(seed: &Seed) -> MakeCall {
    let tokens: Vec<_> = seed.users.iter().map(|(_, token)| bearer(token)).collect();
    std::sync::Arc::new(move |_, rng| Call {
        authorization: Some(tokens[rng.next_u64() as usize % tokens.len()].clone()),
        ..Call::get("/v1/feed?limit=20".into())
    })
}

/// S5f: feed reads (closed loop, random readers), then the fan-out lag of `samples` likes, one at a
/// time: from the like's answer to the first read of a follower's feed that shows it, polled every
/// 2 ms (so a figure is up to 2 ms late, plus a read's own time).
pub async fn s5_feed(keel: &Keel, seed: &Seed, plan: &Plan, seeding: Duration) -> ScenarioResult {
    let reads = closed_loop(&keel.base, feed_reads(seed), CONNECTIONS, plan.warmup, plan.measure).await;
    let samples = if plan.smoke { 10 } else { 200 };
    let client = reqwest::Client::new();
    let n = seed.users.len();
    let mut lags_ms = Vec::new();
    for s in 0..samples {
        let actor = (s * 7919) % n;
        let reader = follower_of(actor, n);
        let product = &seed.products[(s * 31 + 17) % seed.products.len()];
        // S5 may have unfollowed the pair, or liked the product already: a follow and an unlike
        // first (each idempotent), so that the like is a new activity the reader is owed.
        let follow = client
            .put(format!("{}/v1/users/{}/follow", keel.base, seed.users[actor].0))
            .bearer_auth(&seed.users[reader].1);
        assert_eq!(follow.send().await.unwrap().status(), 204, "S5f: a follow");
        let unlike =
            client.delete(format!("{}/v1/products/{product}/like", keel.base)).bearer_auth(&seed.users[actor].1);
        assert_eq!(unlike.send().await.unwrap().status(), 204, "S5f: an unlike");
        let liked = client
            .put(format!("{}/v1/products/{product}/like", keel.base))
            .bearer_auth(&seed.users[actor].1)
            .send()
            .await
            .unwrap();
        assert_eq!(liked.status(), 204, "S5f: a like");
        let answered = Instant::now();
        loop {
            let feed: serde_json::Value = client
                .get(format!("{}/v1/feed?limit=5", keel.base))
                .bearer_auth(&seed.users[reader].1)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let seen = feed["items"].as_array().is_some_and(|items| {
                items.iter().any(|i| {
                    i["verb"] == "liked"
                        && i["object"]["id"] == product.as_str()
                        && i["actor"]["id"] == seed.users[actor].0
                })
            });
            if seen {
                lags_ms.push(answered.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            assert!(answered.elapsed() < Duration::from_secs(30), "S5f: a like not in a follower's feed within 30 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    lags_ms.sort_by(f64::total_cmp);
    let at = |q: f64| lags_ms[((q * lags_ms.len() as f64).ceil() as usize).max(1) - 1];
    let (p50, p99) = (at(0.5), at(0.99));
    let met = p99 <= 30_000.0 && reads.errors == 0;
    ScenarioResult {
        id: "S5f",
        name: "the feed: reads at their maximum (closed loop), and the fan-out lag of a like",
        keel: Some(reads),
        baseline_name: "absolute target: the feed's budget".into(),
        target: "fan-out lag p99 within the feed's 30 s budget; no read errors".into(),
        met: Some(met),
        command: format!(
            "keel-bench: GET /v1/feed?limit=20 as random seeded users, closed loop, {CONNECTIONS} connections, {} s; \
             then {samples} likes one at a time (each after an unlike, and the reader's follow made sure of), each followed by a follower's GET /v1/feed?limit=5 every 2 ms until it shows the like",
            plan.measure.as_secs_f64()
        ),
        notes: format!(
            "fan-out lag (like answered → in a follower's feed, idle queue): p50 {p50:.1} ms, p99 {p99:.1} ms over {samples} likes. \
             Seeded graph: {} users, each following {FOLLOWS_PER_USER} and followed by {FOLLOWS_PER_USER} (seeded through the API in {:.1} s); \
             a feed page is one indexed query on the reader's shard.",
            seed.users.len(),
            seeding.as_secs_f64()
        ),
        also: std::collections::BTreeMap::from([(
            "fan-out lag",
            Outcome { requests: samples as u64, p50_ms: p50, p99_ms: p99, ..Outcome::default() },
        )]),
        ..Default::default()
    }
}
