//! `keel-bench run [--smoke] [--keel PATH] [--out DIR]`: starts `keel up` from a build, seeds it, runs
//! every scenario with its same-run baseline, and writes BENCHMARKS.md and BENCHMARKS.json.
//! `--smoke` runs everything briefly and small, judges no targets, and fails if the harness is broken.
//! `keel-bench baseline --listen ADDR --profile FILE --product FILE` is the HTTP-ceiling service.

mod baseline;
mod feed;
mod load;
mod moves;
mod offload;
mod peer;
mod report;
mod scenarios;
mod setup;
mod side_effects;
mod storage;

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use scenarios::{Plan, ScenarioResult};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("baseline") => {
            let read = |name: &str| std::fs::read_to_string(arg(&args, name).expect(name)).expect(name);
            let listen = arg(&args, "--listen").expect("--listen");
            match baseline::serve(&listen, read("--profile"), read("--product")).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keel-bench baseline: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("run") => run(&args).await,
        _ => {
            eprintln!("usage: keel-bench run [--smoke] [--keel PATH] [--out DIR] | keel-bench baseline --listen ADDR --profile FILE --product FILE");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &[String]) -> ExitCode {
    let smoke = args.iter().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(2),
            ids: 100,
            jobs: 500,
            rounds: 2,
            sign_ins: 20,
            smoke,
        }
    } else {
        Plan {
            warmup: Duration::from_secs(5),
            measure: Duration::from_secs(20),
            ids: 10_000,
            jobs: 50_000,
            rounds: 4,
            sign_ins: 200,
            smoke,
        }
    };
    let me = std::env::current_exe().expect("the bench binary's path");
    let keel_binary = arg(args, "--keel").map(PathBuf::from).unwrap_or_else(|| me.with_file_name("keel"));
    let out = PathBuf::from(arg(args, "--out").unwrap_or_else(|| ".".into()));
    let work = std::env::temp_dir().join(format!("keel-bench-{}", std::process::id()));

    eprintln!("keel-bench: starting {} …", keel_binary.display());
    let keel = setup::Keel::start(&keel_binary, &work).await;
    let with_password = plan.sign_ins.min(plan.ids);
    eprintln!("keel-bench: seeding {} users ({with_password} with a password) and {} products …", plan.ids, plan.ids);
    let seed = setup::seed(&keel.base, plan.ids, with_password).await;
    setup::verify_emails(&keel).await;
    // The seed's welcome e-mails and index jobs run in the background: S1's first rounds would
    // compete with them (rounds drifted from 22,000/s to 50,000/s when they did).
    let drained = scenarios::drain_queues(&keel).await;
    eprintln!("keel-bench: the seed's jobs were done after {:.1} s more", drained.as_secs_f64());

    // The baseline answers with the very bytes Keel sends for a profile and a product.
    let client = reqwest::Client::new();
    let fetch = |path: String| {
        let client = client.clone();
        async move { client.get(path).send().await.unwrap().text().await.unwrap() }
    };
    let profile = fetch(format!("{}/v1/users/{}", keel.base, seed.users[0].0)).await;
    let product = fetch(format!("{}/v1/products/{}", keel.base, seed.products[0])).await;
    std::fs::write(work.join("profile.json"), profile).unwrap();
    std::fs::write(work.join("product.json"), product).unwrap();
    let port = setup::free_port();
    let baseline_child = Command::new(&me)
        .args(["baseline", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--profile")
        .arg(work.join("profile.json"))
        .arg("--product")
        .arg(work.join("product.json"))
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the baseline service");
    let _baseline = setup::Process(baseline_child);
    let baseline = format!("http://127.0.0.1:{port}");
    setup::wait_ready(&format!("{baseline}/healthz")).await;
    scenarios::prepare_pgbench(&keel, &plan).await;

    // `KEEL_BENCH_ONLY=S1,S6` (say) runs S1 and those scenarios, and no side effects: for trying a
    // change to one of them quickly. Its report is not `make bench`'s.
    let only: Option<Vec<String>> =
        std::env::var("KEEL_BENCH_ONLY").ok().map(|list| list.split(',').map(|s| s.trim().to_owned()).collect());
    let runs = |id: &str| only.as_ref().is_none_or(|only| only.iter().any(|o| o == id));
    let mut results: Vec<ScenarioResult> = Vec::new();
    let (s1, s1a, http_ceiling) = scenarios::s1_cached_read(&keel, &baseline, &seed, &plan).await;
    let anonymous_reads = s1.keel.as_ref().map_or(0.0, |k| k.per_second);
    results.push(report_line_owned(s1, smoke));
    results.push(report_line_owned(s1a, smoke));
    if runs("S2") {
        results.push(report_line_owned(scenarios::s2_strong_read(&keel, &seed, &plan, http_ceiling).await, smoke));
    }
    if runs("S3") {
        results.push(report_line_owned(scenarios::s3_accepted_write(&keel, &seed, &plan).await, smoke));
    }
    if runs("S4") {
        let s4 = scenarios::s4_queue(&keel, &plan).await;
        let s4_max = s4.keel.as_ref().map_or(0.0, |k| k.per_second);
        results.push(report_line_owned(s4, smoke));
        results.push(report_line_owned(scenarios::s4_after_the_cliff(&keel_binary, &work, &plan, s4_max).await, smoke));
    }
    if runs("S4-peer") {
        results.push(report_line_owned(peer::s4_peer(&keel, &keel_binary, &me, &work, &plan).await, smoke));
    }
    if runs("S5") || runs("S5f") {
        // The social graph the feed reads and S5's follows work on.
        eprintln!("keel-bench: seeding follows …");
        let seeding = feed::seed_follows(&keel.base, &seed).await;
        scenarios::drain_queues(&keel).await;
        if runs("S5") {
            results.push(report_line_owned(scenarios::s5_shop_day(&keel, &seed, &plan).await, smoke));
        }
        if runs("S5f") {
            scenarios::drain_queues(&keel).await;
            results.push(report_line_owned(feed::s5_feed(&keel, &seed, &plan, seeding).await, smoke));
        }
    }
    // A quarter of S1's anonymous maximum: room left for the sign-ins' hashing.
    let read_rate = (anonymous_reads / 4.0).max(50.0);
    if runs("S6") {
        results.push(report_line_owned(scenarios::s6_sign_in_burst(&keel, &seed, &plan, read_rate).await, smoke));
    }
    if runs("S7") {
        results.push(report_line_owned(offload::s7_replica_offload(&keel_binary, &work, &plan).await, smoke));
    }
    if runs("S8") {
        results.push(report_line_owned(moves::s8_bucket_moves(&keel_binary, &work, &plan).await, smoke));
    }
    if only.is_some() {
        drop(keel);
        let _ = std::fs::remove_dir_all(&work);
        return ExitCode::SUCCESS;
    }
    // Storage, here: every scenario that writes to this keel up's shards has run (the seed; S3's and
    // S5's checkouts, S5's carts and likes, S6's sign-ins; S7 and S8 run keel ups of their own), and
    // once the jobs they left are done, the queue holds them as a shard keeps them (finished) rather
    // than as a backlog. The side effects would change nothing on a shard (their renames and webhook
    // deliveries are the catalog's, JetStream runs a keel up of its own): measured before them so that
    // the empty shard made for the measurement (`keel migrate`, a second of work) is dropped before
    // they are timed.
    eprintln!("keel-bench: storage …");
    scenarios::drain_queues(&keel).await;
    let storage = storage::measure(&keel, &keel_binary).await;
    eprintln!("{}", storage::console_line(&storage));
    eprintln!("keel-bench: side effects …");
    let effects = side_effects::measure(&keel, &seed, &plan, &keel_binary, &work).await;
    eprintln!(
        "side effects: webhooks {:.0}/s; index lag p50 {:.1} ms p99 {:.1} ms ({} samples); JetStream {}",
        effects.webhook_deliveries_per_second,
        effects.index_lag_p50_ms,
        effects.index_lag_p99_ms,
        effects.index_lag_samples,
        effects
            .jetstream_events_per_second
            .map_or("not measured (no nats-server)".into(), |r| format!("{r:.0} events/s"))
    );
    let probe = scenarios::open_loop_probe(&baseline, &plan).await;
    eprintln!(
        "open-loop probe: {:.0}/s sent at 200/s, p99 {:.2} ms, {} errors",
        probe.per_second, probe.p99_ms, probe.errors
    );

    let command = if smoke { "make bench-smoke" } else { "make bench" };
    let machine = report::machine(&scenarios_pg());
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("BENCHMARKS.md"), report::markdown(&machine, &results, &effects, &storage, command, smoke))
        .unwrap();
    let raw = serde_json::json!({ "machine": machine, "scenarios": results, "side_effects": effects,
        "storage": storage, "open_loop_probe": probe, "smoke": smoke });
    std::fs::write(out.join("BENCHMARKS.json"), serde_json::to_string_pretty(&raw).unwrap()).unwrap();
    eprintln!("keel-bench: wrote {}", out.join("BENCHMARKS.md").display());
    drop(keel);
    let _ = std::fs::remove_dir_all(&work);

    // The smoke run judges the harness, not the figures: every implemented scenario must have
    // measured something without errors, and the storage some users.
    let no_users = storage.total().is_none_or(|all| all.users == 0);
    let broken: Vec<&str> = results
        .iter()
        .filter(|r| r.keel.is_some() && r.keel.iter().chain(r.also.values()).any(|k| k.requests == 0 || k.errors > 0))
        .map(|r| r.id)
        .collect();
    if !broken.is_empty() || probe.requests == 0 || probe.errors > 0 || no_users {
        eprintln!(
            "keel-bench: broken scenarios: {} (open-loop probe: {} requests, {} errors; storage: {})",
            if broken.is_empty() { "none".to_owned() } else { broken.join(", ") },
            probe.requests,
            probe.errors,
            if no_users { "no user found on the shards" } else { "measured" }
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn scenarios_pg() -> String {
    let mut dirs: Vec<_> =
        std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs.last().map_or_else(|| "postgres".into(), |d| d.join("bin/postgres").display().to_string())
}

fn report_line_owned(r: ScenarioResult, smoke: bool) -> ScenarioResult {
    eprintln!("{}", report::console_line(&r, smoke));
    for line in report::also_lines(&r) {
        eprintln!("  {line}");
    }
    r
}
