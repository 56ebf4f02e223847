//! The `keel-outbox` queue and runner against a real shard database: retries, dead letters, replay,
//! leases and pickup latency.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_outbox::{KindOptions, NewJob, Runner};
use serde_json::json;

use crate::helpers::{expect_json, TestApp};

struct Probe {
    runs: AtomicUsize,
    times: Mutex<Vec<Instant>>,
    fail_first: usize,
    healed: AtomicBool,
}

impl Probe {
    fn new(fail_first: usize) -> Arc<Probe> {
        Arc::new(Probe {
            runs: AtomicUsize::new(0),
            times: Mutex::default(),
            fail_first,
            healed: AtomicBool::new(false),
        })
    }

    fn run(&self) -> Result<(), String> {
        self.times.lock().unwrap().push(Instant::now());
        let run = self.runs.fetch_add(1, Ordering::SeqCst);
        if run < self.fail_first && !self.healed.load(Ordering::SeqCst) {
            return Err(format!("failure {}", run + 1));
        }
        Ok(())
    }
}

fn runner(app: &TestApp, probe: Arc<Probe>, kind: &str, options: KindOptions) -> Runner<Probe> {
    let shard = app.databases.shard(0).unwrap();
    Runner::new(shard.pool().clone(), Some(shard.url().to_owned()), probe)
        .poll_interval(Duration::from_millis(200))
        .register(kind, options, |probe, _job| async move { probe.run() })
}

/// Enqueues a job on shard 0 as Keel's own code does: committed, then the runners woken.
async fn enqueue(app: &TestApp, kind: &str) -> uuid::Uuid {
    let shard = app.databases.shard(0).unwrap();
    let client = shard.client().await.unwrap();
    let job = NewJob::new(kind, "test", json!({}));
    keel_outbox::enqueue(&client, &job).await.unwrap();
    shard.wake_runners();
    job.id
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_failing_job_is_retried_with_growing_delays_until_it_succeeds() {
    let app = TestApp::spawn().await;
    let probe = Probe::new(3);
    let options = KindOptions {
        backoff_base: Duration::from_millis(100),
        jitter: false, // so the growth is exact; with jitter each delay is only bounded by these
        ..KindOptions::default()
    };
    let stop = keel::shutdown::Stop::new();
    let run = tokio::spawn(runner(&app, probe.clone(), "test.flaky", options).run(stop.stopped()));
    enqueue(&app, "test.flaky").await;
    wait_until("the fourth run", || probe.runs.load(Ordering::SeqCst) == 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(probe.runs.load(Ordering::SeqCst), 4, "three failures and one success: no run after success");
    let times = probe.times.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, ceiling) in gaps.iter().zip([100, 200, 400]) {
        assert!(*gap >= Duration::from_millis(ceiling), "gaps {gaps:?}");
    }
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "delays grow: {gaps:?}");
    stop.trigger();
    run.await.unwrap();
    app.check_queues_drained().await;
}

#[tokio::test]
async fn a_job_that_always_fails_is_dead_listed_and_runs_again_when_replayed() {
    let app = TestApp::spawn().await;
    let probe = Probe::new(usize::MAX);
    let options = KindOptions { max_attempts: 3, backoff_base: Duration::from_millis(10), ..KindOptions::default() };
    let stop = keel::shutdown::Stop::new();
    let run = tokio::spawn(runner(&app, probe.clone(), "test.doomed", options).run(stop.stopped()));
    let id = enqueue(&app, "test.doomed").await;
    wait_until("three runs", || probe.runs.load(Ordering::SeqCst) == 3).await;

    let queues = loop {
        let queues = expect_json(app.admin(app.get("/v1/admin/queues")).send().await, 200).await;
        let kind = queues["kinds"].as_array().unwrap().iter().find(|k| k["kind"] == "test.doomed").cloned();
        if kind.as_ref().is_some_and(|k| k["dead"] == 1) {
            break kind.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(queues["pending"], 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(probe.runs.load(Ordering::SeqCst), 3, "a dead job is not run again by itself");

    probe.healed.store(true, Ordering::SeqCst);
    let replay = app.admin(app.post(&format!("/v1/admin/jobs/{id}/retry"))).send().await.unwrap();
    assert_eq!(replay.status(), 202);
    wait_until("the replayed run", || probe.runs.load(Ordering::SeqCst) == 4).await;
    let unknown = app.admin(app.post(&format!("/v1/admin/jobs/{}/retry", uuid::Uuid::now_v7()))).send().await;
    assert_eq!(unknown.unwrap().status(), 404);
    stop.trigger();
    run.await.unwrap();
    app.check_queues_drained().await;
}

#[tokio::test]
async fn the_job_of_a_worker_that_died_is_run_again_when_its_lease_lapses() {
    let app = TestApp::spawn().await;
    let id = enqueue(&app, "test.orphan").await;
    // As a worker that claimed the job and was killed leaves it.
    let client = app.databases.shard(0).unwrap().client().await.unwrap();
    client
        .execute(
            "UPDATE keel_jobs SET state = 'running', attempts = 1, locked_until = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let probe = Probe::new(0);
    let stop = keel::shutdown::Stop::new();
    let run = tokio::spawn(runner(&app, probe.clone(), "test.orphan", KindOptions::default()).run(stop.stopped()));
    wait_until("the orphan runs", || probe.runs.load(Ordering::SeqCst) == 1).await;
    stop.trigger();
    run.await.unwrap();
    app.check_queues_drained().await;
}

/// A job whose runs never end (each kills or hangs its process, so its lease lapses) counts each
/// lapsed run as an attempt, and is dead once it has used them all, rather than claimed for ever.
#[tokio::test]
async fn a_job_whose_runs_never_end_is_dead_after_its_attempts() {
    let app = TestApp::spawn().await;
    let id = enqueue(&app, "test.poison").await;
    // As the third runner to claim it leaves it when it dies too.
    let client = app.databases.shard(0).unwrap().client().await.unwrap();
    client
        .execute(
            "UPDATE keel_jobs SET state = 'running', attempts = 3, locked_until = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let probe = Probe::new(0);
    let stop = keel::shutdown::Stop::new();
    let options = KindOptions { max_attempts: 3, ..KindOptions::default() };
    let run = tokio::spawn(runner(&app, probe.clone(), "test.poison", options).run(stop.stopped()));
    let started = Instant::now();
    let (state, error) = loop {
        let row = client.query_one("SELECT state, last_error FROM keel_jobs WHERE id = $1", &[&id]).await.unwrap();
        let (state, error): (String, Option<String>) = (row.get(0), row.get(1));
        if state != "running" || started.elapsed() > Duration::from_secs(10) {
            break (state, error);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(state, "dead", "a job whose three runs all lapsed, with three attempts allowed");
    assert!(error.as_deref().unwrap_or_default().contains("lease lapsed"), "the reason is stored: {error:?}");
    assert_eq!(probe.runs.load(Ordering::SeqCst), 0, "it is not run a fourth time");
    stop.trigger();
    run.await.unwrap();
    // A kind that retries for ever runs it again, however many runs lapsed. (Enqueued only once the
    // first runner has stopped: it would bury the job, or run it, itself.)
    let forever = enqueue(&app, "test.poison").await;
    client
        .execute(
            "UPDATE keel_jobs SET state = 'running', attempts = 50, locked_until = now() - interval '1 second' WHERE id = $1",
            &[&forever],
        )
        .await
        .unwrap();
    let stop = keel::shutdown::Stop::new();
    let options = KindOptions::default().retry_forever();
    let run = tokio::spawn(runner(&app, probe.clone(), "test.poison", options).run(stop.stopped()));
    wait_until("the job of a kind that never gives up runs", || probe.runs.load(Ordering::SeqCst) == 1).await;
    stop.trigger();
    run.await.unwrap();
    client.execute("DELETE FROM keel_jobs WHERE id = $1", &[&id]).await.unwrap();
    app.check_queues_drained().await;
}

/// A runner whose lease lapsed while its handler ran (it was paused, say) and whose job another
/// runner claimed meanwhile must not record its outcome over that claim: neither finish the job
/// under the other runner nor send it back to wait.
#[tokio::test]
async fn an_outcome_is_recorded_only_while_its_claim_holds() {
    for succeeds in [true, false] {
        let app = TestApp::spawn().await;
        let gate = Arc::new((tokio::sync::Notify::new(), tokio::sync::Notify::new()));
        let shard = app.databases.shard(0).unwrap();
        let runner = Runner::new(shard.pool().clone(), Some(shard.url().to_owned()), gate.clone()).register(
            "test.overtaken",
            KindOptions::default(),
            move |gate: Arc<(tokio::sync::Notify, tokio::sync::Notify)>, _job| async move {
                gate.0.notify_one();
                gate.1.notified().await;
                if succeeds {
                    Ok(())
                } else {
                    Err("failed".to_owned())
                }
            },
        );
        let stop = keel::shutdown::Stop::new();
        let run = tokio::spawn(runner.run(stop.stopped()));
        let id = enqueue(&app, "test.overtaken").await;
        gate.0.notified().await;
        // Meanwhile its lease lapsed and another runner claimed it: the second attempt, leased anew.
        let client = shard.client().await.unwrap();
        let sql =
            "UPDATE keel_jobs SET attempts = attempts + 1, locked_until = now() + interval '1 hour' WHERE id = $1";
        client.execute(sql, &[&id]).await.unwrap();
        gate.1.notify_one();
        // Shutdown waits for the run to end and for its outcome to be written.
        stop.trigger();
        run.await.unwrap();
        let row = client.query_one("SELECT state, attempts FROM keel_jobs WHERE id = $1", &[&id]).await.unwrap();
        let (state, attempts): (String, i32) = (row.get(0), row.get(1));
        assert_eq!(
            (state.as_str(), attempts),
            ("running", 2),
            "the first run ({succeeds}) left the second's claim alone"
        );
        client.execute("DELETE FROM keel_jobs WHERE id = $1", &[&id]).await.unwrap();
        app.check_queues_drained().await;
    }
}

/// On an idle queue an enqueued job starts at once: it is woken by the NOTIFY its enqueuer's waker
/// sends after the commit, not found by polling.
#[tokio::test]
async fn an_enqueued_job_starts_within_milliseconds() {
    let app = TestApp::spawn().await;
    let probe = Probe::new(0);
    let stop = keel::shutdown::Stop::new();
    // A poll interval far above the bound: only the notification can make the bound.
    let runner = runner(&app, probe.clone(), "test.noop", KindOptions::default()).poll_interval(Duration::from_secs(5));
    let run = tokio::spawn(runner.run(stop.stopped()));
    tokio::time::sleep(Duration::from_millis(200)).await; // the LISTEN connection is up
    for i in 0..1000 {
        enqueue(&app, "test.noop").await;
        wait_until("the job ran", || probe.runs.load(Ordering::SeqCst) > i).await;
    }
    stop.trigger();
    run.await.unwrap();
    let client = app.dbs.shard(0).await;
    let row = client
        .query_one(
            "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))
             FROM keel_jobs WHERE kind = 'test.noop'",
            &[],
        )
        .await
        .unwrap();
    let p99_ms = row.get::<_, f64>(0) * 1000.0;
    eprintln!("pickup latency p99 over 1000 jobs: {p99_ms:.1} ms");
    // Loose: the benchmark measures it precisely; other tests share these two cores.
    assert!(p99_ms < 250.0, "p99 pickup latency {p99_ms:.1} ms");
    app.check_queues_drained().await;
}

/// At shutdown a job still running after the grace period is released at once (not left to its
/// lease), and the interrupted run does not count as an attempt.
#[tokio::test]
async fn a_job_still_running_at_shutdown_is_released() {
    let app = TestApp::spawn().await;
    let probe = Probe::new(0);
    let shard = app.databases.shard(0).unwrap();
    let runner = Runner::new(shard.pool().clone(), Some(shard.url().to_owned()), probe.clone())
        .shutdown_timeout(Duration::from_millis(200))
        .register("test.slow", KindOptions::default(), |probe, _job| async move {
            probe.runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<(), String>(())
        });
    let stop = keel::shutdown::Stop::new();
    let run = tokio::spawn(runner.run(stop.stopped()));
    let id = enqueue(&app, "test.slow").await;
    wait_until("the slow job runs", || probe.runs.load(Ordering::SeqCst) == 1).await;
    stop.trigger();
    tokio::time::timeout(Duration::from_secs(5), run).await.expect("shutdown within the grace period").unwrap();
    let client = shard.client().await.unwrap();
    let row = client.query_one("SELECT state, attempts FROM keel_jobs WHERE id = $1", &[&id]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), ("pending".to_owned(), 0));
}

/// Two nodes run the same schedule against one database: each period's run happens once, on one
/// of them, however their jittered checks interleave.
#[tokio::test]
async fn a_scheduled_task_runs_once_per_period_across_nodes() {
    let app = TestApp::spawn().await;
    let shard = app.databases.shard(0).unwrap();
    let runs: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let stop = keel::shutdown::Stop::new();
    let mut nodes = Vec::new();
    for node in 0..2 {
        let runs = runs.clone();
        let scheduler = keel_outbox::Scheduler::new(shard.pool().clone(), Arc::new(())).every(
            "test-tick",
            Duration::from_millis(400),
            Duration::from_millis(100),
            move |_| {
                let runs = runs.clone();
                async move {
                    runs.lock().unwrap().push((node, Instant::now()));
                    Ok("ticked".to_owned())
                }
            },
        );
        nodes.push(tokio::spawn(scheduler.run(stop.stopped())));
    }
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    stop.trigger();
    for node in nodes {
        node.await.unwrap();
    }
    let runs = runs.lock().unwrap().clone();
    // Each node checks every 400–500 ms; one run per 400 ms period at most.
    assert!((3..=8).contains(&runs.len()), "{} runs in 3 s", runs.len());
    for pair in runs.windows(2) {
        assert!(pair[1].1 - pair[0].1 >= Duration::from_millis(350), "two runs in one period: {runs:?}");
    }
    let client = app.dbs.shard(0).await;
    let row = client
        .query_one("SELECT runs, last_result FROM keel_schedule_runs WHERE name = 'test-tick'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), runs.len() as i64);
    assert_eq!(row.get::<_, String>(1), "ticked");
}

#[tokio::test]
async fn housekeeping_deletes_old_finished_jobs_and_expired_idempotency_keys() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Keeper").await;
    expect_json(Ok(app.deposit(&token, "recent", 5).await), 201).await;
    let shard_db = app.databases.shard(0).unwrap();
    let shard1 = app.databases.shard(1).unwrap();
    for shard in [shard_db, shard1] {
        let client = shard.client().await.unwrap();
        client
            .execute(
                "INSERT INTO keel_jobs (id, kind, aggregate_id, payload, state, finished_at) VALUES
                   (gen_random_uuid(), 'old', 'x', '{}', 'done', now() - interval '2 days'),
                   (gen_random_uuid(), 'new', 'x', '{}', 'done', now()),
                   (gen_random_uuid(), 'dead', 'x', '{}', 'dead', now() - interval '2 days')",
                &[],
            )
            .await
            .unwrap();
        // The admin's deposit keys are stored in a space of their own ("admin <key>", admin/deposits.rs).
        let expire = "UPDATE idempotency_keys SET created_at = now() - interval '2 days' WHERE key = 'admin recent'";
        client.execute(expire, &[]).await.unwrap();
        let retention = keel::jobs::maintenance::Retention::from_config(&app.config);
        keel::jobs::maintenance::prune(&shard, keel::jobs::maintenance::Records::Shard, retention).await.unwrap();
        keel::jobs::maintenance::prune_idempotency_keys(&shard).await.unwrap();
        let kinds: Vec<String> = client
            .query("SELECT kind FROM keel_jobs WHERE kind IN ('old', 'new', 'dead') ORDER BY kind", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(kinds, ["dead", "new"], "old finished jobs go; recent ones and dead ones younger than a month stay");
        let keys: i64 = client.query_one("SELECT count(*) FROM idempotency_keys", &[]).await.unwrap().get(0);
        assert_eq!(keys, 0);
    }
    // The expired key is a new request now: a second deposit.
    expect_json(Ok(app.deposit(&token, "recent", 5).await), 201).await;
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"], 10);
}

/// The processed-event record a handler writes in its own transaction: the first delivery of an
/// event applies it, a redelivery finds it applied, and a rolled-back attempt leaves no record.
#[tokio::test]
async fn a_processed_event_is_recorded_once_and_only_when_committed() {
    let app = TestApp::spawn().await;
    let shard = app.databases.shard(0).unwrap();
    let event = uuid::Uuid::now_v7();
    let mut client = shard.client().await.unwrap();
    let rolled_back = client.transaction().await.unwrap();
    assert!(keel_outbox::mark_processed(&rolled_back, event, "test.handler").await.unwrap());
    rolled_back.rollback().await.unwrap();
    let first = client.transaction().await.unwrap();
    assert!(keel_outbox::mark_processed(&first, event, "test.handler").await.unwrap(), "the rollback left no record");
    first.commit().await.unwrap();
    assert!(!keel_outbox::mark_processed(&client, event, "test.handler").await.unwrap(), "a redelivery is seen");
    assert!(keel_outbox::mark_processed(&client, event, "other.handler").await.unwrap(), "records are per handler");
}

/// Over NATS JetStream the guarantees are the same: a job relayed from the outbox is retried with
/// backoff, is recorded dead in its own database after its last attempt (where the queue
/// statistics see it), and a replay relays it again and runs it.
#[tokio::test]
async fn over_jetstream_a_failing_job_is_retried_dead_lettered_and_replayed() {
    let app = TestApp::spawn().await;
    let shard = app.databases.shard(0).unwrap();
    let prefix = format!("q{}", uuid::Uuid::now_v7().simple());
    let js = keel_outbox::JetStream::connect(crate::peers::nats_url(), &prefix).await.unwrap();
    let probe = Probe::new(usize::MAX);
    let options = KindOptions { max_attempts: 3, backoff_base: Duration::from_millis(50), ..KindOptions::default() };
    let stop = keel::shutdown::Stop::new();
    let relay = Runner::new(shard.pool().clone(), Some(shard.url().to_owned()), probe.clone())
        .poll_interval(Duration::from_millis(200))
        .relay(&js, shard.name(), &["test.doomed"]);
    let consumer = keel_outbox::StreamRunner::new(js.clone(), probe.clone())
        .source(shard.name(), shard.pool().clone())
        .register("test.doomed", options, |probe, _job| async move { probe.run() });
    let tasks = [tokio::spawn(relay.run(stop.stopped())), tokio::spawn(consumer.run(stop.stopped()))];

    let id = enqueue(&app, "test.doomed").await;
    let client = shard.client().await.unwrap();
    let state = || async {
        let row = client.query_one("SELECT state, attempts FROM keel_jobs WHERE id = $1", &[&id]).await.unwrap();
        (row.get::<_, String>(0), row.get::<_, i32>(1))
    };
    let started = Instant::now();
    while state().await.0 != "dead" {
        assert!(started.elapsed() < Duration::from_secs(20), "never dead: {:?}", state().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state().await, ("dead".to_owned(), 3));
    assert_eq!(probe.runs.load(Ordering::SeqCst), 3, "three attempts, then no more");
    let stats = keel_outbox::stats(&client).await.unwrap();
    assert!(stats.iter().any(|s| s.kind == "test.doomed" && s.dead == 1), "{stats:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(probe.runs.load(Ordering::SeqCst), 3, "a dead job is not delivered again by itself");
    assert_eq!(js.backlog().await.unwrap(), 0, "the dead message left the stream");

    // Replayed: relayed again (a new message, not dropped as a duplicate) and run to success.
    probe.healed.store(true, Ordering::SeqCst);
    assert!(keel_outbox::replay(&client, id).await.unwrap());
    wait_until("the replayed run", || probe.runs.load(Ordering::SeqCst) == 4).await;
    let started = Instant::now();
    while js.backlog().await.unwrap() > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the replayed event was never acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The consumer records the row done once it ran the job (not the relay: an event is finished
    // when it ran, not when the stream has it); that write is batched.
    let started = Instant::now();
    while state().await.0 != "done" {
        assert!(started.elapsed() < Duration::from_secs(10), "the replayed job is {:?}", state().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.trigger();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The value of the sample `series` (name and labels, as rendered) in a `/metrics` text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// On an idle system every kind with a handler has its queue series, at zero, before any job of
/// it was ever enqueued: a dashboard or an alert sees 0, not nothing.
#[tokio::test]
async fn every_known_kind_reports_an_empty_queue_before_its_first_job() {
    let app = TestApp::spawn().await;
    let kinds = keel::jobs::kinds();
    for kind in ["order.placed", "user.registered", "product.created", "webhook.deliver"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} is a known kind: {kinds:?}");
    }

    // The series exist. Their values are asserted through this app's own /v1/admin/queues below:
    // the metrics registry is shared by every app in this test binary, and another test's scrape
    // may set a kind's gauge from its own databases at any moment.
    let metrics = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    for kind in kinds {
        for state in ["pending", "dead"] {
            let series = format!(r#"keel_queue_depth{{kind="{kind}",state="{state}"}}"#);
            assert!(sample(&metrics, &series).is_some(), "{series} missing from\n{metrics}");
        }
        let series = format!(r#"keel_queue_oldest_pending_seconds{{kind="{kind}"}}"#);
        assert!(sample(&metrics, &series).is_some(), "{series} missing from\n{metrics}");
    }

    let queues = expect_json(app.admin(app.get("/v1/admin/queues")).send().await, 200).await;
    let listed = queues["kinds"].as_array().unwrap();
    let names: Vec<&str> = listed.iter().map(|k| k["kind"].as_str().unwrap()).collect();
    assert_eq!(names, *kinds, "{queues}");
    for kind in listed {
        assert_eq!(
            (&kind["pending"], &kind["running"], &kind["dead"], kind["oldest_pending_age_s"].as_f64()),
            (&json!(0), &json!(0), &json!(0), Some(0.0)),
            "{kind}"
        );
    }
}

/// A kind's gauge follows its queue down to zero once its jobs are gone, rather than keeping the
/// last depth it had.
#[tokio::test]
async fn a_queue_gauge_returns_to_zero_when_its_jobs_are_gone() {
    let app = TestApp::spawn().await;
    let series = r#"keel_queue_depth{kind="test.gauged",state="pending"}"#;
    // `/metrics` shows the gauges a timer counts; `/v1/admin/queues` counts at once and updates them.
    let counted_now = || async { expect_json(app.admin(app.get("/v1/admin/queues")).send().await, 200).await };
    let id = enqueue(&app, "test.gauged").await;
    counted_now().await;
    let metrics = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&metrics, series), Some(1.0), "{metrics}");
    let client = app.databases.shard(0).unwrap().client().await.unwrap();
    client.execute("DELETE FROM keel_jobs WHERE id = $1", &[&id]).await.unwrap();
    counted_now().await;
    let metrics = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&metrics, series), Some(0.0), "{metrics}");
}

/// Past their retention, dead jobs and the records that make a repeated event harmless are deleted
/// too — processed events, sent e-mails, finished webhook deliveries — in batches, while younger
/// ones, e-mails not yet sent and deliveries still under way stay.
#[tokio::test]
async fn housekeeping_deletes_records_past_their_retention_in_batches() {
    use keel::jobs::maintenance::{prune, Records, Retention};
    let app = TestApp::spawn().await;
    let retention = Retention { finished_jobs: Duration::from_secs(3600), records: Duration::from_secs(7 * 24 * 3600) };
    let shard = app.databases.shard(0).unwrap();
    let client = shard.client().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO keel_jobs (id, kind, aggregate_id, payload, state, finished_at)
               SELECT gen_random_uuid(), 'old', 'x', '{}', 'done', now() - interval '2 hours' FROM generate_series(1, 12000);
             INSERT INTO keel_jobs (id, kind, aggregate_id, payload, state, finished_at) VALUES
               (gen_random_uuid(), 'dead-old', 'x', '{}', 'dead', now() - interval '8 days'),
               (gen_random_uuid(), 'dead-young', 'x', '{}', 'dead', now() - interval '6 days');
             INSERT INTO keel_processed_events (event_id, handler, processed_at) VALUES
               (gen_random_uuid(), 'old', now() - interval '8 days'), (gen_random_uuid(), 'young', now());
             INSERT INTO email_deliveries (event_id, claimed_until, sent_at) VALUES
               (gen_random_uuid(), now() - interval '8 days', now() - interval '8 days'),
               (gen_random_uuid(), now(), now()),
               (gen_random_uuid(), now() - interval '8 days', NULL);",
        )
        .await
        .unwrap();
    let report = prune(&shard, Records::Shard, retention).await.unwrap();
    assert!(report.starts_with("deleted 12000 finished jobs, 1 dead jobs"), "{report}");
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM keel_jobs WHERE kind IN ('old', 'dead-old')").await, 0);
    assert_eq!(count("SELECT count(*) FROM keel_jobs WHERE kind = 'dead-young'").await, 1);
    assert_eq!(count("SELECT count(*) FROM keel_processed_events WHERE handler IN ('old', 'young')").await, 1);
    assert_eq!(count("SELECT count(*) FROM email_deliveries").await, 2, "the young sent one and the unsent one stay");
    assert_eq!(count("SELECT count(*) FROM email_deliveries WHERE sent_at IS NULL").await, 1);

    // The catalogue: finished webhook deliveries past the retention go, unfinished ones stay.
    let catalog = app.databases.catalog.client().await.unwrap();
    catalog
        .batch_execute(
            "INSERT INTO webhook_subscriptions (id, url, secret, events)
               VALUES ('00000000-0000-7000-8000-000000000001', 'https://example.org/hook', 'whsec_x', '{}');
             INSERT INTO webhook_deliveries (id, subscription_id, event_id, event_type, body, status, updated_at)
               SELECT gen_random_uuid(), '00000000-0000-7000-8000-000000000001', gen_random_uuid(), 't', '{}', status,
                      now() - age
               FROM (VALUES ('succeeded', interval '8 days'), ('dead', interval '8 days'),
                            ('succeeded', interval '1 day'), ('retrying', interval '8 days')) AS d(status, age);",
        )
        .await
        .unwrap();
    let product: uuid::Uuid = app.create_product("RETAINED-1", 100, 5).await.parse().unwrap();
    catalog
        .execute(
            "INSERT INTO stock_reservations (order_id, product_id, quantity, state, decided_at, created_at)
             SELECT gen_random_uuid(), $1, 1, state, now() - age, now() - age
             FROM (VALUES ('released', interval '8 days'), ('released', interval '1 day'),
                          ('sold', interval '8 days')) AS r(state, age)",
            &[&product],
        )
        .await
        .unwrap();
    let report = prune(&app.databases.catalog, Records::Catalog, retention).await.unwrap();
    assert!(report.contains("1 released stock reservations, 2 finished webhook deliveries"), "{report}");
    let reservations: Vec<String> = catalog
        .query("SELECT state FROM stock_reservations WHERE product_id = $1 ORDER BY state", &[&product])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reservations, ["released", "sold"], "the young released one and the sold one stay");
    catalog.execute("DELETE FROM stock_reservations WHERE product_id = $1", &[&product]).await.unwrap();
    // No workers run here: the product's own event is not this test's.
    catalog.execute("DELETE FROM keel_jobs WHERE kind = 'product.created'", &[]).await.unwrap();
    let left: Vec<String> = catalog
        .query("SELECT status FROM webhook_deliveries ORDER BY status", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["retrying", "succeeded"]);
    client.execute("DELETE FROM keel_jobs WHERE kind = 'dead-young'", &[]).await.unwrap();
    app.check_queues_drained().await;
}
