//! Background work: one `keel-outbox` runner per shard database, with the handlers of every job kind.
//! `keel up` runs them beside the API; `keel worker` runs only them.

pub mod checkout;
pub mod maintenance;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keel_outbox::{KindOptions, Runner};

use crate::db::Databases;
use crate::orders::{ORDER_CONFIRMED, ORDER_FAILED, ORDER_PLACED};
use crate::startup::Stop;

/// What handlers can reach.
pub struct JobContext {
    pub db: Arc<Databases>,
}

/// Options for the checkout saga: quick retries, since its failures are transient (a database
/// restart); refusals (no stock, no money) are outcomes, not failures.
fn saga_options(timeout: Duration) -> KindOptions {
    KindOptions {
        timeout,
        concurrency: 16,
        max_attempts: 20,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(60),
        ..KindOptions::default()
    }
}

/// Runs every job kind on every shard until `shutdown` completes; running jobs then get the
/// runners' shutdown timeout to finish before they are released to another worker.
pub async fn run_workers(
    db: Arc<Databases>,
    job_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let stop = Stop::new();
    let context = Arc::new(JobContext { db: db.clone() });
    let mut runners = tokio::task::JoinSet::new();
    for (index, shard) in db.shards.all() {
        let runner = Runner::new(shard.pool().clone(), Some(shard.url().to_owned()), context.clone())
            .register(
                ORDER_PLACED,
                saga_options(job_timeout),
                |ctx, job| async move { checkout::run(&ctx, &job).await },
            )
            // Nothing consumes these events yet: e-mail and webhooks arrive with the side-effects issue.
            .register(ORDER_CONFIRMED, KindOptions::default(), |_, _| async { Ok(()) })
            .register(ORDER_FAILED, KindOptions::default(), |_, _| async { Ok(()) });
        let stopped = stop.stopped();
        runners.spawn(async move {
            tracing::info!(shard = index, "worker started");
            runner.run(stopped).await;
        });
        runners.spawn(maintenance::scheduler(shard, context.clone()).run(stop.stopped()));
    }
    shutdown.await;
    stop.trigger();
    while runners.join_next().await.is_some() {}
    tracing::info!("workers stopped");
}
