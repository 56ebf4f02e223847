//! Jobs claimed ahead of the free slots (`KindOptions::prefetch`): a claim takes many at once, the
//! runner still runs no more than the kind's concurrency, and a job held so long that its run could
//! outlast its lease is given back unrun, never run twice.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_outbox::{KindOptions, NewJob, Runner};
use uuid::Uuid;

#[derive(Default)]
struct Seen {
    runs: Mutex<HashMap<Uuid, usize>>,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_jobs_run_within_the_concurrency_and_none_runs_twice_when_held_past_its_lease() {
    let pool = common::database().await;
    // A lease of 2 s (timeout 1 s and 1 s more): one slot and 300 ms per run, so the eighth of eight
    // jobs claimed at once would start 2.1 s after its claim, its lease lapsed, and a later claim of
    // the same runner would take it again while it is still held. Held past 0.5 s, a job goes back.
    const JOBS: usize = 8;
    let options =
        KindOptions { concurrency: 1, prefetch: 10, timeout: Duration::from_secs(1), ..KindOptions::default() };
    let seen = Arc::new(Seen::default());
    let runner = Runner::new(pool.clone(), None, seen.clone()).poll_interval(Duration::from_millis(50)).register(
        "slow",
        options,
        |seen: Arc<Seen>, job| async move {
            let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
            seen.most_at_once.fetch_max(now, Ordering::SeqCst);
            *seen.runs.lock().unwrap().entry(job.id).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            seen.running.fetch_sub(1, Ordering::SeqCst);
            Ok::<(), String>(())
        },
    );
    let client = pool.get().await.unwrap();
    // One transaction: the runner's first claim finds all eight.
    client.batch_execute("BEGIN").await.unwrap();
    for i in 0..JOBS {
        keel_outbox::enqueue(&client, &NewJob::new("slow", i, serde_json::json!({}))).await.unwrap();
    }
    client.batch_execute("COMMIT").await.unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(runner.run(async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    }));
    let started = Instant::now();
    loop {
        let done: i64 =
            client.query_one("SELECT count(*) FROM keel_jobs WHERE state = 'done'", &[]).await.unwrap().get(0);
        if done == JOBS as i64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{done} of {JOBS} jobs done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    running.await.unwrap();

    assert_eq!(seen.most_at_once.load(Ordering::SeqCst), 1, "one slot: never two runs at once");
    let runs = seen.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), JOBS, "every job ran");
    assert!(runs.values().all(|n| *n == 1), "a job ran twice: {runs:?}");
    // Given back unrun is not an attempt: each job's one run is its first.
    let attempts: Vec<i32> =
        client.query("SELECT attempts FROM keel_jobs", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(attempts.iter().all(|a| *a == 1), "attempts: {attempts:?}");
}
