//! Scheduled work: tasks that run every so often, on one node of a fleet at a time.
//!
//! Every node runs a [`Scheduler`] with the same schedules. Each node checks a schedule at jittered
//! intervals, so a fleet started together does not fire together. A check takes a transaction-level
//! advisory lock named after the schedule (so only one node is ever deciding) and runs the task only
//! if the schedule's last run, recorded in `keel_schedule_runs`, is at least one period old: however
//! many nodes check, each period's run happens once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::task::JoinSet;

/// The table the scheduler needs; include it in the database's migrations.
pub const SCHEDULE_SCHEMA: &str = "
CREATE TABLE keel_schedule_runs (
    name        text PRIMARY KEY,
    last_run_at timestamptz NOT NULL,
    last_result text,
    runs        bigint NOT NULL DEFAULT 0
);";

type TaskFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
type Task<C> = Arc<dyn Fn(Arc<C>) -> TaskFuture + Send + Sync>;

struct Schedule<C> {
    name: String,
    every: Duration,
    jitter: Duration,
    task: Task<C>,
}

pub struct Scheduler<C> {
    pool: Pool,
    ctx: Arc<C>,
    schedules: Vec<Arc<Schedule<C>>>,
}

impl<C: Send + Sync + 'static> Scheduler<C> {
    pub fn new(pool: Pool, ctx: Arc<C>) -> Scheduler<C> {
        Scheduler { pool, ctx, schedules: Vec::new() }
    }

    /// Runs `task` once every `every` across all nodes sharing the database; each node checks after
    /// `every` plus a random share of `jitter`. The task's `Ok` text is recorded as the last result.
    pub fn every<F, Fut>(mut self, name: &str, every: Duration, jitter: Duration, task: F) -> Self
    where
        F: Fn(Arc<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let task: Task<C> = Arc::new(move |ctx| Box::pin(task(ctx)));
        self.schedules.push(Arc::new(Schedule { name: name.to_owned(), every, jitter, task }));
        self
    }

    /// Runs the schedules until `shutdown` completes. A task already running is finished first.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut loops = JoinSet::new();
        for schedule in self.schedules {
            let (pool, ctx, mut stop) = (self.pool.clone(), self.ctx.clone(), stop_rx.clone());
            loops.spawn(async move {
                loop {
                    let wait = schedule.every + keel_random::up_to(schedule.jitter);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return,
                    }
                    if let Err(e) = run_if_due(&pool, &ctx, &schedule).await {
                        tracing::warn!(schedule = %schedule.name, error = %e, "scheduled task failed");
                    }
                }
            });
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        while loops.join_next().await.is_some() {}
    }
}

/// Runs the schedule's task if no node has run it within its period. True if it ran here.
async fn run_if_due<C>(pool: &Pool, ctx: &Arc<C>, schedule: &Schedule<C>) -> Result<bool, String> {
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock(hashtextextended('keel_schedule:' || $1, 0))", &[&schedule.name])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if !locked {
        return Ok(false);
    }
    let due: bool = tx
        .query_one(
            "WITH known AS (
                 INSERT INTO keel_schedule_runs (name, last_run_at) VALUES ($1, '-infinity')
                 ON CONFLICT (name) DO NOTHING
             )
             SELECT coalesce((SELECT last_run_at <= now() - $2 * interval '1 second'
                              FROM keel_schedule_runs WHERE name = $1), true)",
            &[&schedule.name, &schedule.every.as_secs_f64()],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if !due {
        return Ok(false);
    }
    let result = (schedule.task)(ctx.clone()).await;
    let recorded = match &result {
        Ok(summary) => summary.clone(),
        Err(error) => format!("failed: {error}"),
    };
    tx.execute(
        "UPDATE keel_schedule_runs SET last_run_at = now(), last_result = $2, runs = runs + 1 WHERE name = $1",
        &[&schedule.name, &recorded],
    )
    .await
    .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    metrics::counter!("keel_scheduled_runs_total", "schedule" => schedule.name.clone(), "ok" => result.is_ok().to_string())
        .increment(1);
    tracing::info!(schedule = %schedule.name, result = %recorded, "scheduled task ran");
    result.map(|_| true)
}
