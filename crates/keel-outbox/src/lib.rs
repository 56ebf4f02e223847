//! A transactional outbox that is also the job queue, on PostgreSQL.
//!
//! - [`enqueue`] writes a job on the caller's own transaction: the job exists exactly when the change
//!   that caused it committed (the outbox pattern, with no separate relay needed for a Postgres queue).
//! - A [`Runner`] claims ready jobs with `FOR UPDATE SKIP LOCKED`, so any number of runners on any
//!   number of processes share a database without handing one job to two of them. It wakes on
//!   `LISTEN/NOTIFY` ([`Waker::poke`] after the enqueuing commit) and polls as a fallback.
//! - Delivery is at least once: a job is claimed with a lease, and a job whose runner died is claimed
//!   again when the lease lapses. Handlers make that safe by being idempotent, keyed by the job id
//!   ([`mark_processed`]).
//! - A failed job is retried with exponential backoff and full jitter; after its last attempt it is
//!   `dead`, kept, and can be replayed ([`replay`]).
//!
//! - Scaled out, [`Runner::relay`] moves chosen kinds to NATS JetStream and a [`StreamRunner`] runs
//!   them from there, with the same handlers and guarantees (see the `stream` module).
//! - A [`Scheduler`] runs periodic tasks on one node of a fleet at a time, with jittered starts.
//!
//! The crate knows nothing of what the jobs do: handlers are closures over a context of the caller's.

mod runner;
mod schedule;
mod stream;
mod wake;

pub use runner::{Job, JobError, KindOptions, Registry, Runner};
pub use schedule::{Scheduler, SCHEDULE_SCHEMA};
pub use stream::{JetStream, StreamRunner};
pub use wake::Waker;

use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio_postgres::Error as PgError;
use uuid::Uuid;

/// The tables, indexes and trigger the queue needs; include it in the database's migrations.
pub const SCHEMA: &str = include_str!("schema.sql");

/// The `relayed` state of events handed to a broker; a migration after [`SCHEMA`].
pub const RELAY_SCHEMA: &str = include_str!("relay_schema.sql");

/// Drops [`SCHEMA`]'s insert trigger, whose `NOTIFY` serialized the commits of every enqueuing
/// transaction: after it, enqueuers wake the runners with a [`Waker`] once committed. A migration
/// after [`SCHEMA`].
pub const WAKE_SCHEMA: &str = include_str!("wake_schema.sql");

/// The notification channel runners listen on ([`Waker`] signals it).
pub const CHANNEL: &str = "keel_jobs";

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The event id; UUIDv7 keeps ids in creation order.
    pub id: Uuid,
    pub kind: String,
    pub aggregate_id: String,
    pub payload: serde_json::Value,
    pub traceparent: Option<String>,
    /// Run no earlier than this long from now.
    pub delay: Duration,
}

impl NewJob {
    pub fn new(kind: &str, aggregate_id: impl ToString, payload: serde_json::Value) -> NewJob {
        NewJob {
            id: Uuid::now_v7(),
            kind: kind.to_owned(),
            aggregate_id: aggregate_id.to_string(),
            payload,
            traceparent: None,
            delay: Duration::ZERO,
        }
    }
}

/// Writes `job` on the caller's client or transaction. Enqueue inside the transaction that makes the
/// change the job reacts to, and both commit or neither does. Once committed, [`Waker::poke`] the
/// database's waker (under [`WAKE_SCHEMA`]), or the job waits for the runners' next poll.
pub async fn enqueue(client: &impl GenericClient, job: &NewJob) -> Result<(), PgError> {
    let statement = client
        .prepare_cached(
            "INSERT INTO keel_jobs (id, kind, aggregate_id, payload, traceparent, run_at)
             VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 microsecond')",
        )
        .await?;
    let delay_us = job.delay.as_micros() as f64;
    client
        .execute(&statement, &[&job.id, &job.kind, &job.aggregate_id, &job.payload, &job.traceparent, &delay_us])
        .await?;
    Ok(())
}

/// Records that `handler` applied event `event_id`; false if it had already. Call it in the
/// handler's own transaction, before its effects, and skip the effects when it returns false.
pub async fn mark_processed(client: &impl GenericClient, event_id: Uuid, handler: &str) -> Result<bool, PgError> {
    let statement = client
        .prepare_cached("INSERT INTO keel_processed_events (event_id, handler) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .await?;
    Ok(client.execute(&statement, &[&event_id, &handler]).await? == 1)
}

/// Puts a dead job back in the queue with fresh attempts. False if there is no dead job with that id.
pub async fn replay(client: &impl GenericClient, id: Uuid) -> Result<bool, PgError> {
    let statement = client
        .prepare_cached(
            "UPDATE keel_jobs SET state = 'pending', attempts = 0, run_at = now(), locked_until = NULL,
                 finished_at = NULL, replays = replays + 1
             WHERE id = $1 AND state = 'dead'",
        )
        .await?;
    let replayed = client.execute(&statement, &[&id]).await? == 1;
    if replayed {
        client.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
    }
    Ok(replayed)
}

/// The most rows one pruning statement deletes: each statement stays short (well within any
/// `statement_timeout`) and holds its locks briefly, however large the backlog of old rows.
pub const PRUNE_BATCH: i64 = 5_000;

/// Deletes jobs finished (`done`) more than `older_than` ago, in batches; returns how many.
pub async fn prune_finished(client: &deadpool_postgres::Client, older_than: Duration) -> Result<u64, PgError> {
    prune(client, "done", older_than).await
}

/// Deletes dead jobs more than `older_than` old, in batches; returns how many. Until then they can
/// be inspected and replayed.
pub async fn prune_dead(client: &deadpool_postgres::Client, older_than: Duration) -> Result<u64, PgError> {
    prune(client, "dead", older_than).await
}

async fn prune(client: &deadpool_postgres::Client, state: &'static str, older_than: Duration) -> Result<u64, PgError> {
    // The state is written into the statement, not passed: only then can every plan of it use the
    // state's partial index on `finished_at`.
    let statement = client
        .prepare_cached(&format!(
            "DELETE FROM keel_jobs WHERE id = ANY(ARRAY(
                 SELECT id FROM keel_jobs WHERE state = '{state}' AND finished_at < now() - $1 * interval '1 second'
                 LIMIT $2
             ))"
        ))
        .await?;
    let mut deleted = 0;
    loop {
        let batch = execute_by_index(client, &statement, &[&older_than.as_secs_f64(), &PRUNE_BATCH]).await?;
        deleted += batch;
        if batch < PRUNE_BATCH as u64 {
            return Ok(deleted);
        }
    }
}

/// The state of one kind of job in one database.
#[derive(Debug, Clone, PartialEq)]
pub struct KindStats {
    pub kind: String,
    /// Waiting to run, or relayed to a broker and not yet run by a handler.
    pub pending: i64,
    pub running: i64,
    pub dead: i64,
    /// Seconds since the oldest job not yet finished (pending, running, or relayed and not yet run)
    /// was enqueued; 0 when there is none. From its creation, not its `run_at`, which every retry
    /// moves forward (and into the future while it backs off): a job stuck failing — a broker down,
    /// a mail server refusing — must show as old, not as just ready or not ready at all. (A job
    /// enqueued with a delay counts that delay too.)
    pub oldest_pending_age_s: f64,
}

/// Pending, running and dead counts per kind, with the age of the oldest unfinished job.
pub async fn stats(client: &deadpool_postgres::Client) -> Result<Vec<KindStats>, PgError> {
    // One arm per state, each the predicate of that state's partial index: `state <> 'done'` can
    // use none of them, and finished jobs are kept for a day, so it read the whole table.
    let statement = client
        .prepare_cached(
            "SELECT kind, sum(pending)::bigint, sum(running)::bigint, sum(dead)::bigint,
                    coalesce(extract(epoch FROM now() - min(oldest)), 0)::float8
             FROM (
                 SELECT kind, count(*) AS pending, 0 AS running, 0 AS dead, min(created_at) AS oldest
                     FROM keel_jobs WHERE state = 'pending' GROUP BY kind
                 UNION ALL SELECT kind, count(*), 0, 0, min(created_at) FROM keel_jobs WHERE state = 'relayed' GROUP BY kind
                 UNION ALL SELECT kind, 0, count(*), 0, min(created_at) FROM keel_jobs WHERE state = 'running' GROUP BY kind
                 UNION ALL SELECT kind, 0, 0, count(*), NULL FROM keel_jobs WHERE state = 'dead' GROUP BY kind
             ) per_state
             GROUP BY kind ORDER BY kind",
        )
        .await?;
    Ok(query_by_index(client, &statement, &[])
        .await?
        .iter()
        .map(|r| KindStats {
            kind: r.get(0),
            pending: r.get(1),
            running: r.get(2),
            dead: r.get(3),
            oldest_pending_age_s: r.get(4),
        })
        .collect())
}

/// Runs one of the queue's prepared statements in a transaction planned for it (below), in one
/// round trip: the `BEGIN`, the statement and the `COMMIT` are sent together (each request goes
/// out when its future is first polled, and `try_join3` polls them in that order) and answered
/// together. Prepared, so that nothing has to be asked of the server before the statement is sent:
/// a statement given as text would be prepared first, and its execution would follow the `COMMIT`.
///
/// Why: every statement the queue runs has an index made for it, and must use it whatever the
/// table's statistics say. Planned from statistics that say the table is empty — a drained queue
/// after `VACUUM ANALYZE`, which autovacuum does by itself — any plan looks as cheap as any other:
/// PostgreSQL chose sequential scans, and, with those turned off, a claim that read the whole
/// primary key to join 64 claimed ids (it guessed one row on each side). And the statements are
/// prepared: PostgreSQL caches a prepared statement's generic plan, made once, and keeps it while a
/// burst fills the table, until the next analyze. A burst of 50,000 no-op jobs drained at 650/s
/// instead of 13,000/s (`make bench`'s S4c). So each runs with
/// - `plan_cache_mode = force_custom_plan`: planned at every run, with its parameters, from the
///   table's size on disk now (PostgreSQL scales the analysed density by the current number of
///   pages, and takes the density from the row width when the table was analysed empty), so the
///   plan follows the table as it fills and drains. Planning costs a fraction of a millisecond per
///   statement, and each claims or completes a batch;
/// - `enable_seqscan = off`: a table small enough for a sequential scan to win is read by its
///   index all the same, at no real cost.
///
/// Both are `LOCAL` to the statement's own transaction, so the pooled connection goes back as it
/// came: the callers' own statements on the same pool are planned as usual. `tests/queue_plans.rs`
/// logs every plan a runner's connections make under four states of the statistics and fails on
/// a sequential scan of `keel_jobs` or a scan of its primary key without an index condition.
pub(crate) async fn query_by_index(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, PgError> {
    pipelined(client, PLANNED, client.query(statement, params)).await
}

/// [`query_by_index`], committed without waiting for the commit to reach the disk
/// (`synchronous_commit = off` for this transaction alone): for claims. A claim lost to a crash of
/// the server leaves its jobs as they were before it — claimable again, as a claim whose runner
/// died is — and nothing else can have depended on it durably: the record of a run that followed
/// (its completion, committed synchronously) is later in the write-ahead log, so it reaches the
/// disk only with the claim. A claim is then a commit no one waits for the disk on: with claims of
/// hundreds of rows back to back, that wait was a tenth of a burst's time.
pub(crate) async fn claim_by_index(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, PgError> {
    pipelined(client, PLANNED_NOT_WAITING_FOR_DISK, client.query(statement, params)).await
}

/// [`query_by_index`] for a statement whose rows are not wanted: how many it changed.
pub(crate) async fn execute_by_index(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, PgError> {
    pipelined(client, PLANNED, client.execute(statement, params)).await
}

/// The transaction of [`query_by_index`].
const PLANNED: &str = "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL plan_cache_mode = force_custom_plan";
/// The transaction of [`claim_by_index`].
const PLANNED_NOT_WAITING_FOR_DISK: &str = "BEGIN; SET LOCAL enable_seqscan = off; \
    SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL synchronous_commit = off";

async fn pipelined<T>(
    client: &tokio_postgres::Client,
    begin: &str,
    run: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    let (_, out, _) =
        futures_util::future::try_join3(client.batch_execute(begin), run, client.batch_execute("COMMIT")).await?;
    Ok(out)
}

/// A PostgreSQL error for the log: the server's SQLSTATE and message where it gave one (its
/// `Display` alone says only "db error"), else the client's error.
pub(crate) fn db_error(error: &PgError) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Exponential backoff with full jitter: before retry `n` (1-based), wait a uniformly random time in
/// `[0, min(max, base · 2^(n-1))]`. The ceiling grows exponentially; the jitter spreads retries of
/// jobs that failed together so they do not return together.
pub fn backoff_ceiling(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).clamp(0, 30) as u32;
    base.saturating_mul(1u32 << exponent).min(max)
}

pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    keel_random::up_to(backoff_ceiling(attempt, base, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceilings_double_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let ceilings: Vec<u128> = (1..=6).map(|n| backoff_ceiling(n, base, max).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff_ceiling(1000, base, max), max, "no overflow for absurd attempts");
        for n in 1..=6 {
            assert!(backoff(n, base, max) <= backoff_ceiling(n, base, max));
        }
    }

    #[test]
    fn a_kind_that_retries_forever_never_gives_up_and_its_backoff_stays_capped() {
        let limited = KindOptions { max_attempts: 20, ..KindOptions::default() };
        assert!(!limited.gives_up_after(19));
        assert!(limited.gives_up_after(20), "the 20th failed run of 20 is the last");
        let forever = limited.retry_forever();
        assert_eq!(forever.max_attempts, KindOptions::RETRY_FOREVER);
        for attempt in [1, 20, 21, 1_000_000, i32::MAX - 1, i32::MAX] {
            assert!(!forever.gives_up_after(attempt), "attempt {attempt}");
        }
        let max = Duration::from_secs(30);
        let forever = KindOptions { backoff_max: max, jitter: false, ..forever };
        for attempt in [20, 1_000_000, i32::MAX] {
            assert_eq!(forever.retry_delay(attempt, &JobError::from("down")), max, "attempt {attempt}");
        }
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let ceiling = Duration::from_secs(1);
        let samples: Vec<f64> = (0..1000).map(|_| backoff(1, ceiling, ceiling).as_secs_f64()).collect();
        assert!(samples.iter().all(|f| (0.0..=1.0).contains(f)));
        assert!(samples.iter().any(|f| *f < 0.1) && samples.iter().any(|f| *f > 0.9));
    }
}
