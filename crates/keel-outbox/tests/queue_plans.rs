//! Every statement the queue runs uses its index, whatever the table's statistics say when a burst
//! arrives. PostgreSQL's `auto_explain` logs the plan of every statement a runner's connections
//! run (on this test's databases only), and no plan may read `keel_jobs` by a sequential scan.
//!
//! The cliff this guards against: a prepared statement's generic plan is cached from the statistics
//! of the moment it is made. Made while the table was empty and analysed (a drained queue, after
//! autovacuum), every claim and completion scanned the whole table while a burst of 50,000 jobs
//! drained: 78 s instead of 3.5 s. See `query_by_index` in src/lib.rs for the fix.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use keel_outbox::{JobError, KindOptions, Runner};
use tokio::sync::watch;

/// Jobs in a burst: enough pages that a sequential scan is never the cheapest plan by accident.
const BURST: i64 = 5_000;

#[derive(Debug, Clone, Copy)]
enum Statistics {
    /// A new table: PostgreSQL assumes some size for a table never vacuumed.
    NeverAnalysed,
    /// The treatment of the cliff: emptied, `VACUUM ANALYZE`d, then the burst.
    AnalysedEmpty,
    /// Analysed with the burst already in it (most of the table pending, of one kind).
    AnalysedFull,
    /// A big drain's rows deleted and not vacuumed away, the table analysed in that state.
    BloatedAfterADrain,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queue_statement_uses_an_index_whatever_the_statistics_say() {
    for statistics in
        [Statistics::NeverAnalysed, Statistics::AnalysedEmpty, Statistics::AnalysedFull, Statistics::BloatedAfterADrain]
    {
        let plans = burst_with_plans(statistics).await;
        let on_the_queue: Vec<&String> = plans.iter().filter(|p| p.contains("keel_jobs")).collect();
        let scans: Vec<&&String> = on_the_queue.iter().filter(|p| reads_the_whole_table(p)).collect();
        assert!(
            scans.is_empty(),
            "{statistics:?}: {} of {} plans read the whole table, as:\n{}",
            scans.len(),
            on_the_queue.len(),
            scans[0]
        );
        // The plans were seen at all: each statement of the queue, by its index.
        for (what, index) in [
            ("claims", "keel_jobs_pending_idx"),
            ("lapsed-lease checks", "keel_jobs_running_idx"),
            ("completions by id", "keel_jobs_pkey"),
            ("statistics of dead jobs", "keel_jobs_dead_idx"),
            ("pruning", "keel_jobs_done_idx"),
        ] {
            assert!(
                on_the_queue.iter().any(|p| p.contains(index)),
                "{statistics:?}: no plan of the {what} uses {index}"
            );
        }
    }
}

/// A sequential scan of `keel_jobs`, or a scan of its primary key with no index condition: both
/// read every row (the second was what the planner chose for a claim's join, with sequential scans
/// off, from statistics that said the table was empty). A partial index read whole is not one: it
/// holds only the jobs of its state.
fn reads_the_whole_table(plan: &str) -> bool {
    let lines: Vec<&str> = plan.lines().collect();
    lines.iter().enumerate().any(|(i, line)| {
        line.contains("Seq Scan on keel_jobs")
            || (line.contains("Scan using keel_jobs_pkey")
                && !lines.get(i + 1).is_some_and(|next| next.contains("Index Cond")))
    })
}

/// Prepares the table's statistics, runs a burst of no-op jobs (and some that fail for good) through
/// a runner whose connections log every plan, then the statistics and pruning statements; returns
/// the plans logged meanwhile.
async fn burst_with_plans(statistics: Statistics) -> Vec<String> {
    let (setup, url) = common::database_and_url().await;
    let admin = setup.get().await.unwrap();
    admin.batch_execute(keel_outbox::WAKE_SCHEMA).await.unwrap();
    let name: String = admin.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    let insert_burst = |kind: &'static str| {
        let admin = &admin;
        async move {
            admin
                .execute(
                    "INSERT INTO keel_jobs (id, kind, aggregate_id, payload)
                     SELECT gen_random_uuid(), $1, 'burst', '{}' FROM generate_series(1, $2::bigint)",
                    &[&kind, &BURST],
                )
                .await
                .unwrap();
        }
    };
    match statistics {
        Statistics::NeverAnalysed => {}
        Statistics::AnalysedEmpty => admin.batch_execute("VACUUM ANALYZE keel_jobs").await.unwrap(),
        Statistics::AnalysedFull => {
            insert_burst("ping").await;
            admin.batch_execute("ANALYZE keel_jobs").await.unwrap();
        }
        Statistics::BloatedAfterADrain => {
            insert_burst("ping").await;
            drain(&setup, &setup, None::<std::future::Ready<()>>).await;
            admin.batch_execute("DELETE FROM keel_jobs; ANALYZE keel_jobs").await.unwrap();
        }
    }

    // From here, every new session of this database logs the plan of every statement it runs.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET session_preload_libraries = 'auto_explain';
             ALTER DATABASE {name} SET auto_explain.log_min_duration = 0;"
        ))
        .await
        .unwrap();
    let log = common::cluster_dir().join("postgres.log");
    let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let explained = common::pool(&url);

    let burst = async {
        if !matches!(statistics, Statistics::AnalysedFull) {
            // Idle claims first: the statements' plans are made (and, after five runs, cached) while
            // the table is as prepared.
            tokio::time::sleep(Duration::from_millis(600)).await;
            insert_burst("ping").await;
        }
        insert_burst("doomed").await;
        admin.batch_execute(&format!("NOTIFY {}", keel_outbox::CHANNEL)).await.unwrap();
    };
    drain(&explained, &setup, Some(burst)).await;
    // Jobs finished long ago, for the pruning statement to find by its index.
    admin
        .batch_execute("UPDATE keel_jobs SET finished_at = now() - interval '2 days' WHERE kind = 'ping'")
        .await
        .unwrap();
    let client = explained.get().await.unwrap();
    let stats = keel_outbox::stats(&client).await.unwrap();
    assert!(stats.iter().any(|k| k.kind == "doomed" && k.dead == BURST), "{statistics:?}: the failed jobs are dead");
    assert_eq!(keel_outbox::prune_finished(&client, Duration::from_secs(3600)).await.unwrap(), BURST as u64);
    drop(client);
    explained.close();

    // Each entry of auto_explain's starts with its "duration:" line; the plan follows it.
    let text = read_from(&log, from);
    text.split("LOG:  duration:").skip(1).map(str::to_owned).collect()
}

/// Runs the queue's kinds on `pool` until no job is left pending or running (as `observer`, a pool
/// whose plans are not logged, counts them); `meanwhile` (the burst) runs once the runner is up.
async fn drain(pool: &Pool, observer: &Pool, meanwhile: Option<impl std::future::Future<Output = ()>>) {
    let (stop, stopped) = watch::channel(false);
    let mut until_stopped = stopped.clone();
    let never_relayed = KindOptions { concurrency: 64, ..KindOptions::default() };
    let runner = Runner::new(pool.clone(), None, Arc::new(()))
        .poll_interval(Duration::from_millis(50))
        .check_ready_every(Duration::from_millis(100))
        .register("ping", never_relayed.clone(), |_: Arc<()>, _| async { Ok::<(), String>(()) })
        .register("doomed", KindOptions { max_attempts: 1, ..never_relayed }, |_: Arc<()>, _| async {
            Err::<(), JobError>(JobError::permanent("fails for good"))
        });
    let running = tokio::spawn(runner.run(async move {
        let _ = until_stopped.wait_for(|stop| *stop).await;
    }));
    if let Some(meanwhile) = meanwhile {
        meanwhile.await;
    }
    let client = observer.get().await.unwrap();
    // The observer's own statements are not the queue's (and its connection may be new enough to
    // have auto_explain loaded).
    client.batch_execute("SET auto_explain.log_min_duration = -1").await.unwrap();
    let started = Instant::now();
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM keel_jobs WHERE state IN ('pending', 'running')", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{left} jobs never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    let _ = stop.send(true);
    drop(stopped);
    running.await.unwrap();
}

/// The log from byte `from` on, once the server has written what its sessions logged.
fn read_from(log: &Path, from: u64) -> String {
    std::thread::sleep(Duration::from_millis(300));
    let bytes = std::fs::read(log).unwrap();
    String::from_utf8_lossy(&bytes[from as usize..]).into_owned()
}
