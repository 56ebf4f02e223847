//! S7, replica offload: reads that reach a database every time, against a `keel up` with no replica
//! and one with a hot standby (`KEEL_REPLICAS=1`), in alternating rounds of the same run, each over
//! its own data directory and seed; the share of the routed reads each database's replica served
//! (from `keel_db_reads_total`); and the replicas' lag under S5's mix (`GET /v1/admin/replicas`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::load::{closed_loop_recorded, combine_rounds, Call, MakeCall, Recorded};
use crate::scenarios::{self, alternating, shop_day, Plan, ScenarioResult, CONNECTIONS};
use crate::setup::{self, Keel, Seed, ADMIN_TOKEN};

/// How often the replicas' lag is sampled, as often as Keel measures it.
const LAG_EVERY: Duration = Duration::from_millis(250);

/// Reads that reach the catalogue every time: half product list pages continuing after a product
/// drawn uniformly, half searches for a product's number (neither is cached).
fn uncached_reads(seed: &Seed) -> MakeCall {
    let products = Arc::new(seed.products.clone());
    Arc::new(move |n, rng| {
        let i = rng.next_u64() as usize % products.len();
        if n % 2 == 0 {
            // A product's id is a cursor Keel still reads (issued before cursors became opaque).
            Call::get(format!("/v1/products?limit=20&cursor={}", products[i]))
        } else {
            Call::get(format!("/v1/search?q=product+{i}"))
        }
    })
}

/// `keel_db_reads_total`, by (database, target).
type Reads = BTreeMap<(String, String), u64>;

/// The `keel_db_reads_total` series of a Prometheus text exposition.
fn parse_reads(text: &str) -> Reads {
    text.lines()
        .filter_map(|line| {
            let (labels, value) = line.strip_prefix("keel_db_reads_total{")?.split_once('}')?;
            let label = |name: &str| {
                labels.split(',').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    (key == name).then(|| value.trim_matches('"').to_owned())
                })
            };
            Some(((label("database")?, label("target")?), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

async fn reads(keel: &Keel) -> Reads {
    let text = reqwest::get(format!("{}/metrics", keel.base))
        .await
        .and_then(|r| r.error_for_status())
        .expect("reading /metrics")
        .text()
        .await
        .expect("the metrics text");
    parse_reads(&text)
}

/// The reads counted from `warmup` on, for `measure`: a closed loop's measured window.
async fn reads_during(keel: &Keel, warmup: Duration, measure: Duration) -> Reads {
    tokio::time::sleep(warmup).await;
    let before = reads(keel).await;
    tokio::time::sleep(measure).await;
    let after = reads(keel).await;
    after
        .into_iter()
        .map(|(key, n)| {
            let since = n.saturating_sub(before.get(&key).copied().unwrap_or(0));
            (key, since)
        })
        .collect()
}

fn add(total: &mut Reads, window: Reads) {
    for (key, n) in window {
        *total.entry(key).or_default() += n;
    }
}

/// Per database with reads, `(database, replica share in %, reads)`.
fn shares(reads: &Reads) -> Vec<(String, f64, u64)> {
    let mut by_database: BTreeMap<&str, [u64; 2]> = BTreeMap::new();
    for ((database, target), n) in reads {
        by_database.entry(database).or_default()[usize::from(target == "replica")] += n;
    }
    by_database
        .into_iter()
        .filter(|(_, [primary, replica])| primary + replica > 0)
        .map(|(database, [primary, replica])| {
            (database.to_owned(), replica as f64 * 100.0 / (primary + replica) as f64, primary + replica)
        })
        .collect()
}

/// "catalog 94% replica of 1234 reads; shard_0 …", or that none were counted.
fn shares_text(reads: &Reads) -> String {
    let shares = shares(reads);
    if shares.is_empty() {
        return "no routed reads counted".into();
    }
    shares
        .iter()
        .map(|(database, share, n)| format!("{database} {share:.0}% replica of {n} reads"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `GET /v1/admin/replicas` answered over a run, every [`LAG_EVERY`].
#[derive(Debug, Default)]
struct LagSamples {
    samples: usize,
    /// Samples in which some replica was down.
    down: usize,
    /// Replicas' `lag_ms` over every sample and database; one not yet measured (null) is left out.
    lags_ms: Vec<u64>,
    /// The most WAL bytes a replica had yet to replay at Keel's probe before a sample.
    max_lag_bytes: u64,
}

impl LagSamples {
    fn add(&mut self, status: &Value) {
        let replicas: Vec<&Value> = status["databases"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|database| database["replicas"].as_array().into_iter().flatten())
            .collect();
        self.samples += 1;
        self.down += usize::from(replicas.iter().any(|r| r["up"] != true));
        self.lags_ms.extend(replicas.iter().filter_map(|r| r["lag_ms"].as_u64()));
        self.max_lag_bytes = replicas.iter().filter_map(|r| r["lag_bytes"].as_u64()).fold(self.max_lag_bytes, u64::max);
    }

    /// The nearest-rank quantile `q` of the lags; 0 for none.
    fn quantile(&self, q: f64) -> u64 {
        let mut sorted = self.lags_ms.clone();
        sorted.sort_unstable();
        let rank = (q * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.max(1) - 1).copied().unwrap_or(0)
    }
}

/// Samples the replicas from `warmup` on, for `measure`.
async fn sample_lag(keel: &Keel, warmup: Duration, measure: Duration) -> LagSamples {
    let client = reqwest::Client::new();
    tokio::time::sleep(warmup).await;
    let end = tokio::time::Instant::now() + measure;
    let mut tick = tokio::time::interval(LAG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lag = LagSamples::default();
    while tick.tick().await < end {
        let status: Value = client
            .get(format!("{}/v1/admin/replicas", keel.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("reading GET /v1/admin/replicas")
            .json()
            .await
            .expect("the replicas are JSON");
        lag.add(&status);
    }
    lag
}

/// A `keel up` with `replicas` standbys over `dir`, seeded as the main run's (without passwords: no
/// sign-in here), addresses verified for S5's checkouts.
async fn start(keel_binary: &Path, dir: &Path, replicas: usize, plan: &Plan) -> (Keel, Seed) {
    eprintln!(
        "keel-bench: S7: starting keel up with KEEL_REPLICAS={replicas}, seeding {} users and products …",
        plan.ids
    );
    let keel = Keel::start_with(keel_binary, dir, &[("KEEL_REPLICAS", replicas.to_string())]).await;
    let seed = setup::seed(&keel.base, plan.ids, 0).await;
    setup::verify_emails(&keel).await;
    // The seed's welcome e-mails and index jobs are written (and, with a replica, replayed) while
    // they run: measuring before they are done would measure them.
    let drained = scenarios::drain_queues(&keel).await;
    eprintln!("keel-bench: S7: the seed's jobs were done after {:.1} s more", drained.as_secs_f64());
    (keel, seed)
}

/// S7: [`uncached_reads`] in a closed loop against a `keel up` with no replica (A) and one with one
/// (B), `plan.rounds` each, alternating; then S5's mix against B, closed loop, its replicas' lag
/// sampled. Both run under `work` and are stopped and removed afterwards.
pub async fn s7_replica_offload(keel_binary: &Path, work: &Path, plan: &Plan) -> ScenarioResult {
    let dirs = [work.join("s7-no-replica"), work.join("s7-one-replica")];
    let configurations = [start(keel_binary, &dirs[0], 0, plan).await, start(keel_binary, &dirs[1], 1, plan).await];
    let makes = configurations.each_ref().map(|(_, seed)| uncached_reads(seed));

    let rounds = plan.rounds.max(1);
    let round = plan.measure / rounds as u32;
    let mut recorded: [Vec<Recorded>; 2] = [Vec::new(), Vec::new()];
    let mut counted: [Reads; 2] = Default::default();
    let mut order = Vec::new();
    for b in alternating(rounds) {
        let i = usize::from(b);
        let keel = &configurations[i].0;
        // As S1's: a configuration's first round warms up in full, the later ones reopen connections.
        let warmup = if recorded[i].is_empty() { plan.warmup } else { plan.warmup / 5 };
        let (run, window) = tokio::join!(
            closed_loop_recorded(&keel.base, makes[i].clone(), CONNECTIONS, warmup, round),
            reads_during(keel, warmup, round)
        );
        order.push(format!("{} {:.0}", if b { "B" } else { "A" }, run.per_second()));
        add(&mut counted[i], window);
        recorded[i].push(run);
    }
    let spread = |runs: &[Recorded]| {
        let rates = runs.iter().map(Recorded::per_second);
        let (low, high) = rates.fold((f64::MAX, 0.0_f64), |(low, high), r| (low.min(r), high.max(r)));
        format!("{low:.0}–{high:.0}/s")
    };
    let (none, one) = (combine_rounds(&recorded[0]), combine_rounds(&recorded[1]));

    // S5's mix against B, shorter than S5's own run, its replicas sampled over the measured window.
    let (keel, seed) = &configurations[1];
    let mix_measure = plan.measure / 2;
    let (mix, lag, mix_reads) = tokio::join!(
        closed_loop_recorded(&keel.base, shop_day(seed), CONNECTIONS, plan.warmup, mix_measure),
        sample_lag(keel, plan.warmup, mix_measure),
        reads_during(keel, plan.warmup, mix_measure)
    );
    let mix = mix.outcome();
    let (lag_p99, lag_max) = (lag.quantile(0.99), lag.lags_ms.iter().copied().max().unwrap_or(0));

    // Both stopped at once: each waits for its clusters to shut down.
    std::thread::scope(|scope| {
        for configuration in configurations {
            scope.spawn(move || drop(configuration));
        }
    });
    for dir in &dirs {
        let _ = std::fs::remove_dir_all(dir);
    }

    let mut figures = BTreeMap::new();
    for (configuration, reads) in
        ["no replica", "one replica", "S5 mix, one replica"].iter().zip(counted.iter().chain([&mix_reads]))
    {
        for (database, share, n) in shares(reads) {
            figures.insert(format!("{configuration}: {database} replica share %"), share);
            figures.insert(format!("{configuration}: {database} routed reads"), n as f64);
        }
    }
    figures.insert("S5 mix: replica lag p99 ms".into(), lag_p99 as f64);
    figures.insert("S5 mix: replica lag max ms".into(), lag_max as f64);
    figures.insert("S5 mix: replica lag max bytes".into(), lag.max_lag_bytes as f64);
    figures.insert("S5 mix: lag samples".into(), lag.samples as f64);
    figures.insert("S5 mix: samples with a replica down".into(), lag.down as f64);

    let ratio = (none.per_second > 0.0).then(|| one.per_second / none.per_second);
    eprintln!(
        "  S7 routed reads: no replica: {}; one replica: {}; S5 mix: {}. S5 mix: replica lag p99 {lag_p99} ms, \
         max {lag_max} ms (at most {} bytes behind), {} samples, {} with a replica down",
        shares_text(&counted[0]),
        shares_text(&counted[1]),
        shares_text(&mix_reads),
        lag.max_lag_bytes,
        lag.samples,
        lag.down
    );
    ScenarioResult {
        id: "S7",
        name: "replica offload: uncached reads (GET /v1/products?cursor=…, GET /v1/search), keel up with one hot standby vs none",
        keel: Some(one.clone()),
        baseline_name: "the same reads against keel up with no replica, in alternating rounds of the same run".into(),
        baseline_per_second: Some(none.per_second),
        ratio,
        target: "none: the share of reads served by the replica is the figure (see notes)".into(),
        met: None,
        command: format!(
            "keel-bench: closed loop, {CONNECTIONS} connections, half product list pages (limit 20) after a product \
             drawn uniformly, half searches for a product's number; two keel ups (KEEL_REPLICAS=0 and 1), each over \
             its own data directory seeded with {} products and users; then S5's mix, closed loop, against the \
             one-replica keel up for {:.1} s after {:.1} s of warm-up",
            plan.ids,
            mix_measure.as_secs_f64(),
            plan.warmup.as_secs_f64()
        ),
        notes: format!(
            "{rounds} rounds each of {:.1} s, alternating as A B B A … (A no replica, B one replica; warm-up {:.1} s \
             before each configuration's first round, {:.1} s before the others; the keel up not measured stays up, \
             idle, as does the main run's). The rate is the median of a configuration's rounds; spread A {}, B {}. \
             Rounds in order, /s: {}. Share of the routed reads each database's replica served, from \
             keel_db_reads_total over the measured windows: no replica: {}; one replica: {}. Failed requests (not 2xx, \
             or no answer): A {}, B {}. Replica lag under S5's mix ({:.0}/s, {} failed; its routed reads: {}), GET \
             /v1/admin/replicas every {} ms: p99 {lag_p99} ms, max {lag_max} ms over {} lag_ms values (every replica \
             of every database, null ones left out) from {} samples, {} of them with a replica down; at most {} bytes \
             of WAL behind at a probe. Keel measures lag at its own probes every 250 ms, as the time since the newest \
             primary position the replica had replayed was noted: a caught-up replica reads 0 to 250 ms, one a few \
             milliseconds behind at each probe 250 to 500 ms. It bounds how stale a replica's answer may be, in steps \
             of a probe period; it is not the replay delay itself. On this one 2-core machine the standby runs on the \
             same cores and disk as the primary (and its replay, and Keel's probes, cost them too), so throughput with \
             a replica need not rise: the figure that carries over to a deployment whose replicas have machines of \
             their own is the share of reads moved off the primary. Product lists and searches are never cached; \
             profiles are left out, as a Zipf run soon has them all in cache.",

            round.as_secs_f64(),
            plan.warmup.as_secs_f64(),
            (plan.warmup / 5).as_secs_f64(),
            spread(&recorded[0]),
            spread(&recorded[1]),
            order.join(", "),
            shares_text(&counted[0]),
            shares_text(&counted[1]),
            none.errors,
            one.errors,
            mix.per_second,
            mix.errors,
            shares_text(&mix_reads),
            LAG_EVERY.as_millis(),
            lag.lags_ms.len(),
            lag.samples,
            lag.down,
            lag.max_lag_bytes
        ),
        also: BTreeMap::from([("no replica", none), ("S5 mix, one replica", mix)]),
        figures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# TYPE keel_db_reads_total counter
keel_db_reads_total{database=\"shard_1\",target=\"primary\"} 3
keel_db_reads_total{target=\"replica\",database=\"catalog\"} 940
keel_db_reads_total{database=\"catalog\",target=\"primary\"} 60
keel_db_reads_total_other{database=\"catalog\",target=\"primary\"} 7
keel_replica_up{database=\"catalog\",replica=\"replica_1\"} 1
";

    #[test]
    fn reads_are_read_from_the_exposition_whatever_the_labels_order() {
        let reads = parse_reads(METRICS);
        assert_eq!(reads.len(), 3);
        assert_eq!(reads[&("catalog".to_owned(), "replica".to_owned())], 940);
        assert_eq!(reads[&("catalog".to_owned(), "primary".to_owned())], 60);
        assert_eq!(reads[&("shard_1".to_owned(), "primary".to_owned())], 3);
    }

    #[test]
    fn shares_are_per_database_and_leave_out_those_without_reads() {
        let mut reads = parse_reads(METRICS);
        reads.insert(("shard_0".into(), "primary".into()), 0);
        assert_eq!(shares_text(&reads), "catalog 94% replica of 1000 reads, shard_1 0% replica of 3 reads");
        assert_eq!(shares_text(&Reads::new()), "no routed reads counted");
        let mut total = Reads::new();
        add(&mut total, reads.clone());
        add(&mut total, reads);
        assert_eq!(total[&("catalog".to_owned(), "replica".to_owned())], 1880);
    }

    #[test]
    fn lag_samples_count_downs_and_leave_out_unmeasured_lags() {
        let mut lag = LagSamples::default();
        lag.add(&serde_json::json!({ "databases": [
            { "database": "catalog", "replicas": [{ "name": "replica_1", "up": true, "lag_ms": 12, "lag_bytes": 8192 }] },
            { "database": "shard_0", "replicas": [{ "name": "replica_1", "up": false, "lag_ms": null }] },
        ]}));
        lag.add(&serde_json::json!({ "databases": [
            { "database": "catalog", "replicas": [{ "name": "replica_1", "up": true, "lag_ms": 300 }] },
        ]}));
        assert_eq!((lag.samples, lag.down, lag.lags_ms.clone(), lag.max_lag_bytes), (2, 1, vec![12, 300], 8192));
        assert_eq!(lag.quantile(0.5), 12);
        assert_eq!(lag.quantile(0.99), 300);
        lag.lags_ms = (1..=200).collect();
        assert_eq!(lag.quantile(0.99), 198);
        assert_eq!(LagSamples::default().quantile(0.99), 0);
    }
}
