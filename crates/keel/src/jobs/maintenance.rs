//! Housekeeping on each shard and the catalogue, run by the scheduler on one node at a time: old
//! records are deleted so the tables stay the size of their working set.
//!
//! Two retention periods (settings):
//! - `KEEL_JOB_RETENTION` (default a day): finished jobs, kept for inspection.
//! - `KEEL_RECORD_RETENTION` (default 30 days): dead jobs (until then they can be replayed), and the
//!   records that make a repeated event harmless — processed-event records, sent e-mails, finished
//!   webhook deliveries — and the reservations of failed orders (sold ones stay: the record of what
//!   was sold). These must outlive any redelivery of their event: a broker's or a lapsed
//!   lease's come within minutes, a replay of a dead job within its retention, which is this one.
//!
//! Every deletion runs in batches of [`keel_outbox::PRUNE_BATCH`] rows, each its own short statement,
//! found through an index on the record's age.

use std::sync::Arc;
use std::time::Duration;

use keel_outbox::Scheduler;

use super::JobContext;
use crate::config::Config;
use crate::db::{Db, DbError, Sql};

/// An Idempotency-Key is honoured this long; after that the same key is a new request.
pub const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
const EVERY: Duration = Duration::from_secs(600);
const JITTER: Duration = Duration::from_secs(120);
const FEED_TRIM_EVERY: Duration = Duration::from_secs(60);
const FEED_TRIM_JITTER: Duration = Duration::from_secs(10);

/// How long finished work is kept (see the module's comment).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub finished_jobs: Duration,
    pub records: Duration,
}

impl Retention {
    pub fn from_config(config: &Config) -> Retention {
        Retention { finished_jobs: config.job_retention, records: config.record_retention }
    }
}

/// The catalogue's housekeeping: its queue carries product events and webhook deliveries.
pub fn catalog_scheduler(catalog: &Db, ctx: Arc<JobContext>, retention: Retention) -> Scheduler<JobContext> {
    let db = catalog.clone();
    Scheduler::new(catalog.pool().clone(), ctx).every("prune-finished-jobs", EVERY, JITTER, move |_| {
        let db = db.clone();
        async move { report(prune(&db, Records::Catalog, retention).await) }
    })
}

pub fn scheduler(
    shard: &Db,
    ctx: Arc<JobContext>,
    retention: Retention,
    feed: crate::feed::Settings,
) -> Scheduler<JobContext> {
    let (for_jobs, for_keys, for_feeds) = (shard.clone(), shard.clone(), shard.clone());
    Scheduler::new(shard.pool().clone(), ctx)
        .every("prune-finished-jobs", EVERY, JITTER, move |_| {
            let shard = for_jobs.clone();
            async move { report(prune(&shard, Records::Shard, retention).await) }
        })
        .every("prune-idempotency-keys", EVERY, JITTER, move |_| {
            let shard = for_keys.clone();
            async move { report(prune_idempotency_keys(&shard).await) }
        })
        // Feeds grow with every activity copied in: each is kept to its newest `KEEL_FEED_LENGTH`.
        .every("trim-feeds", FEED_TRIM_EVERY, FEED_TRIM_JITTER, move |_| {
            let shard = for_feeds.clone();
            async move { report(crate::feed::fanout::trim(&shard, feed.length).await) }
        })
}

/// A task's outcome as the scheduler records it: what it did, or why it failed.
fn report(outcome: Result<String, DbError>) -> Result<String, String> {
    outcome.map_err(|e| e.to_string())
}

/// Which kind of database is pruned: each keeps its own records besides the queue's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records {
    Catalog,
    Shard,
}

/// Records older than the record retention, per kind of database: a statement deleting at most
/// `$2` rows older than `$1` seconds.
const PROCESSED_EVENTS: (&str, &str) = (
    "processed-event records",
    "DELETE FROM keel_processed_events WHERE (event_id, handler) IN (
         SELECT event_id, handler FROM keel_processed_events
         WHERE processed_at < now() - $1 * interval '1 second' LIMIT $2)",
);
const CATALOG_RECORDS: &[(&str, &str)] = &[
    PROCESSED_EVENTS,
    (
        "released stock reservations",
        "DELETE FROM stock_reservations WHERE (order_id, product_id) IN (
             SELECT order_id, product_id FROM stock_reservations
             WHERE state = 'released' AND coalesce(decided_at, created_at) < now() - $1 * interval '1 second'
             LIMIT $2)",
    ),
    (
        "finished webhook deliveries",
        "DELETE FROM webhook_deliveries WHERE id = ANY(ARRAY(
             SELECT id FROM webhook_deliveries
             WHERE status IN ('succeeded', 'dead') AND updated_at < now() - $1 * interval '1 second' LIMIT $2))",
    ),
];
const SHARD_RECORDS: &[(&str, &str)] = &[
    PROCESSED_EVENTS,
    (
        "sent e-mail records",
        "DELETE FROM email_deliveries WHERE event_id = ANY(ARRAY(
             SELECT event_id FROM email_deliveries
             WHERE sent_at IS NOT NULL AND sent_at < now() - $1 * interval '1 second' LIMIT $2))",
    ),
];

/// Deletes what `db` keeps past its retention: finished and dead jobs, and its kind's records.
/// Returns what it deleted, as a line for the scheduler's record.
pub async fn prune(db: &Db, records: Records, retention: Retention) -> Result<String, DbError> {
    let client = db.client().await?;
    let finished = keel_outbox::prune_finished(&client, retention.finished_jobs).await?;
    let dead = keel_outbox::prune_dead(&client, retention.records).await?;
    let mut report = format!("deleted {finished} finished jobs, {dead} dead jobs");
    let statements = match records {
        Records::Catalog => CATALOG_RECORDS,
        Records::Shard => SHARD_RECORDS,
    };
    let older_than = retention.records.as_secs_f64();
    for (what, sql) in statements {
        let mut deleted = 0;
        loop {
            let batch = client.exec(sql, &[&older_than, &keel_outbox::PRUNE_BATCH]).await?;
            deleted += batch;
            if batch < keel_outbox::PRUNE_BATCH as u64 {
                break;
            }
        }
        report.push_str(&format!(", {deleted} {what}"));
    }
    Ok(report)
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
