//! Housekeeping on each shard and the catalogue, run by the scheduler on one node at a time: finished jobs and expired
//! idempotency keys are deleted so the tables stay the size of their working set.

use std::sync::Arc;
use std::time::Duration;

use keel_outbox::Scheduler;

use super::JobContext;
use crate::db::{Db, DbError, Sql};

/// Finished jobs are kept this long, for inspection, then deleted.
pub const JOB_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// An Idempotency-Key is honoured this long; after that the same key is a new request.
pub const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
const EVERY: Duration = Duration::from_secs(600);
const JITTER: Duration = Duration::from_secs(120);

/// The catalogue's housekeeping: its queue carries product events and webhook deliveries.
pub fn catalog_scheduler(catalog: &Db, ctx: Arc<JobContext>) -> Scheduler<JobContext> {
    let db = catalog.clone();
    Scheduler::new(catalog.pool().clone(), ctx).every("prune-finished-jobs", EVERY, JITTER, move |_| {
        let db = db.clone();
        async move { report(prune_finished_jobs(&db).await) }
    })
}

pub fn scheduler(shard: &Db, ctx: Arc<JobContext>) -> Scheduler<JobContext> {
    let (for_jobs, for_keys) = (shard.clone(), shard.clone());
    Scheduler::new(shard.pool().clone(), ctx)
        .every("prune-finished-jobs", EVERY, JITTER, move |_| {
            let shard = for_jobs.clone();
            async move { report(prune_finished_jobs(&shard).await) }
        })
        .every("prune-idempotency-keys", EVERY, JITTER, move |_| {
            let shard = for_keys.clone();
            async move { report(prune_idempotency_keys(&shard).await) }
        })
}

/// A task's outcome as the scheduler records it: what it did, or why it failed.
fn report(outcome: Result<String, DbError>) -> Result<String, String> {
    outcome.map_err(|e| e.to_string())
}

pub async fn prune_finished_jobs(db: &Db) -> Result<String, DbError> {
    let client = db.client().await?;
    let deleted = keel_outbox::prune_finished(&client, JOB_RETENTION).await?;
    Ok(format!("deleted {deleted} finished jobs"))
}

pub async fn prune_idempotency_keys(shard: &Db) -> Result<String, DbError> {
    let client = shard.client().await?;
    let deleted = client
        .exec(
            "DELETE FROM idempotency_keys WHERE created_at < now() - $1 * interval '1 second'",
            &[&IDEMPOTENCY_KEY_TTL.as_secs_f64()],
        )
        .await?;
    Ok(format!("deleted {deleted} expired idempotency keys"))
}
