//! S4-peer: Keel's queue against graphile-worker, a PostgreSQL job queue nobody here wrote, on the
//! same machine and the same PostgreSQL with the same settings, one queue up at a time.
//!
//! graphile-worker is installed with npm (Node from Debian) into the build directory, at the version
//! `peer/package-lock.json` pins, and runs `peer/graphile.mjs` with its documented batched
//! configuration (64 jobs at once, a local queue of 1,000, completions batched with no delay), and
//! with a local queue of 5,000, which drained bursts faster on this machine; the better median is
//! the baseline. It runs on a private cluster of its own. Keel runs its no-op `keel.ping` kind,
//! which holds 5,000 jobs ahead of its 64 slots, on a new `keel up` each round. Both are timed the
//! same way: a burst of jobs inserted at once by one statement, from just before the insert until
//! the last is done.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keel_pg::{Cluster, ClusterSpec};
use serde_json::Value;

use crate::load::{median, Outcome};
use crate::scenarios::{connect, judged, ping_burst, steady_pings, Plan, ScenarioResult};
use crate::setup::Keel;

/// The steady rate both queues' enqueue-to-start latency is measured at.
const STEADY_RATE: f64 = 500.0;

/// Where `peer/` is, in the source tree this harness was built from.
fn peer_sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peer")
}

/// Installs graphile-worker into `target/bench-peer` (beside the build's profile directories) with
/// `npm ci`, from the lock file, unless that lock file is installed there already; returns the
/// directory to run `graphile.mjs` in.
fn install_graphile(bench_binary: &Path) -> PathBuf {
    let target = bench_binary.parent().and_then(Path::parent).expect("the bench binary is in target/<profile>/");
    let dir = target.join("bench-peer");
    std::fs::create_dir_all(&dir).unwrap();
    let sources = peer_sources();
    let lock = std::fs::read(sources.join("package-lock.json")).expect("peer/package-lock.json");
    let installed = std::fs::read(dir.join("package-lock.json")).ok();
    for file in ["package.json", "package-lock.json", "graphile.mjs"] {
        std::fs::copy(sources.join(file), dir.join(file)).unwrap_or_else(|e| panic!("copying peer/{file}: {e}"));
    }
    if installed.as_deref() != Some(&lock[..]) || !dir.join("node_modules/graphile-worker").exists() {
        eprintln!("keel-bench: installing graphile-worker with npm into {} …", dir.display());
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("running npm (scripts/install-deps.sh --test installs Node and npm)");
        assert!(status.success(), "npm ci of graphile-worker failed: {status}");
    }
    dir
}

/// The server settings keel up's cluster was started with (its command line), for the peer's own
/// cluster: the same PostgreSQL, set the same way. Where its socket is and how many connections it
/// takes are the peer's own.
async fn keel_settings(keel: &Keel) -> Vec<(String, String)> {
    let client = connect(&keel.db_url("keel_catalog")).await;
    let rows = client
        .query(
            "SELECT name, setting FROM pg_settings WHERE source = 'command line'
             AND name NOT IN ('port', 'unix_socket_directories', 'listen_addresses', 'max_connections')",
            &[],
        )
        .await
        .expect("reading keel up's server settings");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// graphile-worker's local queue sizes tried: its documented batching, and a larger one.
const LOCAL_QUEUES: [usize; 2] = [1000, 5000];

/// Runs `graphile.mjs` with `args` and a local queue of `local_queue` against the peer's cluster;
/// its one line of JSON.
fn graphile(dir: &Path, cluster: &ClusterSpec, local_queue: usize, args: &[String]) -> Value {
    let output = Command::new("node")
        .arg("graphile.mjs")
        .args(args)
        .current_dir(dir)
        .env("GW_LOCAL_QUEUE", local_queue.to_string())
        .env("PGHOST", &cluster.socket_dir)
        .env("PGPORT", cluster.port.to_string())
        .env("PGUSER", &cluster.superuser)
        .env("PGDATABASE", "postgres")
        .output()
        .expect("running node (scripts/install-deps.sh --test installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "graphile.mjs {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("graphile.mjs said {stdout}: {e}"))
}

pub async fn s4_peer(keel: &Keel, keel_binary: &Path, bench_binary: &Path, work: &Path, plan: &Plan) -> ScenarioResult {
    let dir = install_graphile(bench_binary);
    let mut spec = ClusterSpec::new(work.join("peer-pg/data"), work.join("peer-pg/run"));
    spec.port = 5433;
    spec.log_file = work.join("peer-pg/postgres.log");
    for (name, value) in keel_settings(keel).await {
        spec = spec.setting(&name, value);
    }
    let spec = spec.setting("listen_addresses", "").setting("max_connections", 200);
    let n = plan.jobs as i64;
    let rounds = if plan.smoke { 1 } else { 3 };
    let mut ours = Vec::new();
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); LOCAL_QUEUES.len()];
    let keel_dir = work.join("s4-peer-keel");
    let mut keel_steady = (0, vec![0.0; 3]);
    let mut graphile_steady = Value::Null;
    for round in 0..rounds {
        // Keel: a new keel up, idle for 2 s, then the burst; the last round also the steady rate.
        let fresh = Keel::start(keel_binary, &keel_dir).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let shard = connect(&fresh.db_url("keel_shard_0")).await;
        ours.push(ping_burst(&shard, n, "s4-peer").await);
        if round + 1 == rounds {
            keel_steady = steady_pings(&fresh, STEADY_RATE, plan.measure, "s4-peer-steady").await;
        }
        drop(shard);
        drop(fresh);
        // graphile-worker: its cluster up only while it runs (the script empties its jobs table).
        let cluster = tokio::task::spawn_blocking({
            let spec = spec.clone();
            move || Cluster::start(spec).expect("starting the peer's PostgreSQL cluster")
        })
        .await
        .unwrap();
        for (i, local_queue) in LOCAL_QUEUES.iter().enumerate() {
            let burst = graphile(&dir, &spec, *local_queue, &["burst".into(), n.to_string()]);
            theirs[i].push(burst["per_second"].as_f64().expect("a burst's per_second"));
        }
        if round + 1 == rounds {
            let seconds = plan.measure.as_secs().max(1).to_string();
            graphile_steady =
                graphile(&dir, &spec, LOCAL_QUEUES[0], &["rate".into(), STEADY_RATE.to_string(), seconds]);
        }
        tokio::task::spawn_blocking(move || cluster.stop(Duration::from_secs(30))).await.unwrap().unwrap();
        eprintln!(
            "  S4-peer round {}: keel {:.0}/s, graphile-worker {:.0}/s (local queue {}), {:.0}/s (local queue {})",
            round + 1,
            ours[round],
            theirs[0][round],
            LOCAL_QUEUES[0],
            theirs[1][round],
            LOCAL_QUEUES[1]
        );
    }
    let _ = std::fs::remove_dir_all(&keel_dir);
    let _ = std::fs::remove_dir_all(work.join("peer-pg"));

    let ms = |v: &Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let keel_median = median(&ours);
    let graphile_medians: Vec<f64> = theirs.iter().map(|runs| median(runs)).collect();
    let best = if graphile_medians[1] > graphile_medians[0] { 1 } else { 0 };
    let graphile_median = graphile_medians[best];
    let keel_outcome = Outcome {
        requests: n as u64 * rounds as u64,
        per_second: keel_median,
        p50_ms: keel_steady.1[0] * 1000.0,
        p99_ms: keel_steady.1[1] * 1000.0,
        p999_ms: keel_steady.1[2] * 1000.0,
        ..Outcome::default()
    };
    let graphile_outcome = Outcome {
        requests: n as u64 * rounds as u64,
        per_second: graphile_median,
        p50_ms: ms(&graphile_steady, "p50_ms"),
        p99_ms: ms(&graphile_steady, "p99_ms"),
        p999_ms: ms(&graphile_steady, "p999_ms"),
        ..Outcome::default()
    };
    let runs = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
    let mut result = ScenarioResult {
        id: "S4-peer",
        name: "queue against graphile-worker 0.18 (batched): no-op jobs, burst to done",
        baseline_name: format!(
            "graphile-worker, local queue {} (the better of {} and {}), same run, own cluster with keel up's settings",
            LOCAL_QUEUES[best], LOCAL_QUEUES[0], LOCAL_QUEUES[1]
        ),
        baseline_per_second: Some(graphile_median),
        target: "≥ 1.2× graphile-worker".into(),
        command: format!(
            "{rounds} rounds, alternating: a new keel up, {n} keel.ping jobs inserted at once on shard 0, timed to done; \
             then graphile-worker (64 at once, completeJobBatchDelay 0, local queue {} and then {}) on its own cluster, \
             {n} jobs by one add_jobs each time, timed to done and deleted. Latency: {STEADY_RATE:.0} jobs/s enqueued \
             one by one for {} s into each (graphile-worker with local queue {}), after its last burst",
            LOCAL_QUEUES[0],
            LOCAL_QUEUES[1],
            plan.measure.as_secs(),
            LOCAL_QUEUES[0]
        ),
        notes: format!(
            "medians of the rounds; Keel {} jobs/s; graphile-worker {} jobs/s with local queue {}, {} jobs/s with {}. \
             Percentiles are enqueue-to-start at {STEADY_RATE:.0} jobs/s ({} of Keel's started: started_at − created_at \
             of the rows, the claim's start; graphile-worker's at its task, from the insert's clock_timestamp(), {} jobs)",
            runs(&ours),
            runs(&theirs[0]),
            LOCAL_QUEUES[0],
            runs(&theirs[1]),
            LOCAL_QUEUES[1],
            keel_steady.0,
            graphile_steady["jobs"]
        ),
        keel: Some(keel_outcome),
        ..Default::default()
    };
    result.also.insert("graphile-worker", graphile_outcome);
    judged(result, keel_median / graphile_median, 1.2)
}
