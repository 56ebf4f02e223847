//! The worker side: claims jobs of the registered kinds from one database and runs their handlers.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_postgres::{AsyncMessage, Row};
use tracing::Instrument;
use uuid::Uuid;

use crate::{backoff, backoff_ceiling, claim_by_index, db_error, execute_by_index, query_by_index, CHANNEL};

/// A claimed job, as its handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub aggregate_id: String,
    pub payload: serde_json::Value,
    pub traceparent: Option<String>,
    /// 1 on the first run.
    pub attempt: i32,
    pub created_at: SystemTime,
    /// When the job became ready to run (its creation, or the end of its backoff).
    pub ready_at: SystemTime,
    /// How many times the job was replayed after it was dead ([`crate::replay`]); 0 for a job that
    /// came through a broker.
    pub replays: i32,
}

impl Job {
    fn from_row(row: &Row) -> Job {
        Job {
            id: row.get("id"),
            kind: row.get("kind"),
            aggregate_id: row.get("aggregate_id"),
            payload: row.get("payload"),
            traceparent: row.get("traceparent"),
            attempt: row.get("attempts"),
            created_at: row.get("created_at"),
            ready_at: row.get("run_at"),
            replays: row.get("replays"),
        }
    }

    /// The trace id of the W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), if any.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref()?.split('-').nth(1)
    }
}

/// How one kind of job runs.
#[derive(Debug, Clone)]
pub struct KindOptions {
    /// Jobs of this kind running at once in this runner. Also the largest claim: with quick
    /// handlers, a larger value means fewer claim round trips per job (measured: no-op jobs went
    /// from about 2,000/s at 16 to 7,000/s at 64 on a 2-core machine).
    pub concurrency: usize,
    /// Runs before the job is dead; [`KindOptions::RETRY_FOREVER`] for never.
    pub max_attempts: i32,
    /// The first retry's backoff ceiling; it doubles with each attempt up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Spread each retry uniformly below its ceiling (full jitter). Off, every retry waits exactly
    /// its ceiling: only for tests that must see the delays grow.
    pub jitter: bool,
    /// A run taking longer fails. The lease is one and a half times this (at least a second more).
    pub timeout: Duration,
    /// At most this many jobs with the same `aggregate_id` run at once in this runner, so one slow
    /// group (say, one webhook endpoint) cannot take every slot of its kind. Claims of a grouped
    /// kind rank the whole ready backlog by group: meant for queues of thousands, not millions.
    pub group_concurrency: Option<usize>,
    /// Jobs claimed ahead of the free slots and held in this runner until one frees: claims of up to
    /// `concurrency + prefetch` rows, so a kind of quick jobs pays one claim per many jobs without
    /// running more than `concurrency` at once (no-op jobs: about 18,000/s with 64 slots and none
    /// held ahead, 31,000–33,000/s with 1,000 held ahead, on a 2-core machine). A held job's lease
    /// runs from its claim, so one held too long to finish within it is given back unrun (see
    /// [`hold_limit`]). Ahead-claimed jobs are this runner's alone: other runners cannot take them,
    /// so keep it 0 for kinds whose jobs take long. Not for grouped kinds (ignored there: a group's
    /// limit is judged when a job starts, on what runs here).
    pub prefetch: usize,
}

impl Default for KindOptions {
    fn default() -> KindOptions {
        KindOptions {
            concurrency: 64,
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3600),
            jitter: true,
            timeout: Duration::from_secs(60),
            group_concurrency: None,
            prefetch: 0,
        }
    }
}

/// The attempts policy: how many failed runs a kind allows before its job is `dead`.
impl KindOptions {
    /// `max_attempts` of a kind whose jobs are never given up: a failed run is always retried, on the
    /// kind's backoff (capped by `backoff_max`), however long the failure lasts. For work that must
    /// finish once accepted and can only fail transiently; such a kind's stuck jobs show as an old
    /// `oldest_pending_age_s` ([`crate::stats`]), never as dead ones.
    pub const RETRY_FOREVER: i32 = i32::MAX;

    /// These options, with no limit on attempts ([`KindOptions::RETRY_FOREVER`]).
    pub fn retry_forever(self) -> KindOptions {
        KindOptions { max_attempts: KindOptions::RETRY_FOREVER, ..self }
    }

    /// Whether failed attempt `attempt` (1-based) was the last one: the job is then `dead`.
    pub fn gives_up_after(&self, attempt: i32) -> bool {
        self.max_attempts != KindOptions::RETRY_FOREVER && attempt >= self.max_attempts
    }
}

/// How long a claimed job is reserved for its runner: its timeout and half as much again, so it
/// is only claimed again once its runner must have given up on it (or died).
pub(crate) fn lease(timeout: Duration) -> Duration {
    timeout + (timeout / 2).max(Duration::from_secs(1))
}

/// The longest a claimed job may wait in its runner for a free slot ([`KindOptions::prefetch`]) and
/// still start: a run that starts later could outlast the lease, and the job be claimed and run
/// again while it still runs here. Half the lease's margin over the timeout: the lease was set
/// by the server's clock when the claim ran, the wait is measured here from when its answer came.
pub(crate) fn hold_limit(timeout: Duration) -> Duration {
    (lease(timeout) - timeout) / 2
}

/// A failed run: why, and optionally when to try again instead of the kind's backoff (a server's
/// `Retry-After`, a retry schedule of the handler's own), or that no retry can succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    pub message: String,
    pub retry_in: Option<Duration>,
    /// No run of this job can succeed (a mail server refused the recipient for good): it is dead at
    /// once, with this message as the reason, rather than retried for hours. A replay runs it again.
    pub permanent: bool,
}

impl JobError {
    pub fn retry_in(message: impl Into<String>, delay: Duration) -> JobError {
        JobError { message: message.into(), retry_in: Some(delay), permanent: false }
    }

    pub fn permanent(message: impl Into<String>) -> JobError {
        JobError { message: message.into(), retry_in: None, permanent: true }
    }

    /// Whether the failed run `attempt` of a job of a kind with `options` leaves it dead.
    pub fn is_final(&self, options: &KindOptions, attempt: i32) -> bool {
        self.permanent || options.gives_up_after(attempt)
    }
}

impl From<String> for JobError {
    fn from(message: String) -> JobError {
        JobError { message, retry_in: None, permanent: false }
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> JobError {
        JobError::from(message.to_owned())
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;
pub(crate) type Handler<C> = Arc<dyn Fn(Arc<C>, Job) -> HandlerFuture + Send + Sync>;

pub(crate) struct Kind<C> {
    pub(crate) name: String,
    pub(crate) options: KindOptions,
    pub(crate) handler: Handler<C>,
    /// The state a successful run leaves the job in: `done`, or `relayed` for a relay's publish
    /// (the job is finished only when a handler behind the broker has run it).
    pub(crate) succeeded: &'static str,
    wake: Notify,
}

impl<C> Kind<C> {
    pub(crate) fn new(name: &str, options: KindOptions, handler: Handler<C>) -> Kind<C> {
        Kind { name: name.to_owned(), options, handler, succeeded: "done", wake: Notify::new() }
    }
}

/// Wraps a handler closure into the runners' handler type.
pub(crate) fn handler<C, F, Fut, E>(handler: F) -> Handler<C>
where
    C: Send + Sync + 'static,
    F: Fn(Arc<C>, Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<JobError> + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |ctx, job| {
        let handler = handler.clone();
        Box::pin(async move { handler(ctx, job).await.map_err(Into::into) })
    })
}

/// Where job handlers are registered: a [`Runner`] on a database's queue, or a
/// [`crate::StreamRunner`] on JetStream. Register with a function generic over this trait and the
/// same handlers serve both.
pub trait Registry<C>: Sized {
    /// Registers the handler of a kind. An `Err` (or a panic, or a timeout) is a failed attempt.
    fn register<F, Fut, E>(self, kind: &str, options: KindOptions, handler: F) -> Self
    where
        F: Fn(Arc<C>, Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<JobError> + 'static;
}

struct Shared<C> {
    pool: Pool,
    ctx: Arc<C>,
    poll_interval: Duration,
    shutdown_timeout: Duration,
}

/// A task that runs beside the kinds until the runner stops (given the stop signal).
pub(crate) type Background =
    Box<dyn FnOnce(Pool, watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Runs the handlers of the registered kinds against one database until shut down.
pub struct Runner<C> {
    shared: Arc<Shared<C>>,
    listen_url: Option<String>,
    /// How often one statement looks for every kind's ready jobs ([`Runner::check_ready_every`]).
    ready_check: Option<Duration>,
    kinds: Vec<Arc<Kind<C>>>,
    background: Vec<Background>,
}

impl<C: Send + Sync + 'static> Runner<C> {
    /// `listen_url` is a connection string for a dedicated `LISTEN` connection; without one the
    /// runner only polls.
    pub fn new(pool: Pool, listen_url: Option<String>, ctx: Arc<C>) -> Runner<C> {
        let shared =
            Shared { pool, ctx, poll_interval: Duration::from_secs(1), shutdown_timeout: Duration::from_secs(10) };
        Runner { shared: Arc::new(shared), listen_url, ready_check: None, kinds: Vec::new(), background: Vec::new() }
    }

    /// Looks for ready jobs of every kind with one statement every `interval`, and wakes the kinds
    /// that have some: for a runner without a `LISTEN` connection whose kinds poll rarely (a process
    /// with many databases, where a connection per database for `LISTEN` and a claim per kind per
    /// second on each would be most of its connections and CPU). Off by default.
    pub fn check_ready_every(mut self, interval: Duration) -> Self {
        self.ready_check = Some(interval);
        self
    }

    /// How often to look for jobs when no notification arrives (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        Arc::get_mut(&mut self.shared).expect("configured before running").poll_interval = interval;
        self
    }

    /// How long running jobs may finish after shutdown begins before they are released (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        Arc::get_mut(&mut self.shared).expect("configured before running").shutdown_timeout = timeout;
        self
    }

    /// Registers the handler of a kind. An `Err` (or a panic, or a timeout) is a failed attempt.
    pub fn register<F, Fut, E>(self, kind: &str, options: KindOptions, handler: F) -> Self
    where
        F: Fn(Arc<C>, Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<JobError> + 'static,
    {
        self.register_handler(kind, options, self::handler(handler))
    }

    pub(crate) fn register_handler(mut self, kind: &str, options: KindOptions, handler: Handler<C>) -> Self {
        self.kinds.push(Arc::new(Kind::new(kind, options, handler)));
        self
    }

    /// Registers a relay's publisher of a kind: a job it published stays `relayed`, not `done`.
    pub(crate) fn register_relay(mut self, kind: &str, options: KindOptions, publish: Handler<C>) -> Self {
        self.kinds.push(Arc::new(Kind { succeeded: "relayed", ..Kind::new(kind, options, publish) }));
        self
    }

    /// Runs `task` beside the kinds, on this runner's database, until the runner stops.
    pub(crate) fn beside(mut self, task: Background) -> Self {
        self.background.push(task);
        self
    }

    /// Runs until `shutdown` completes, then stops claiming, lets running jobs finish for up to the
    /// shutdown timeout, and releases the jobs still running so another runner takes them at once.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        if let Some(url) = self.listen_url.clone() {
            tasks.spawn(listen(url, self.shared.pool.clone(), self.kinds.clone(), stop_rx.clone()));
        }
        if let Some(interval) = self.ready_check {
            tasks.spawn(check_ready(self.shared.pool.clone(), self.kinds.clone(), interval, stop_rx.clone()));
        }
        for kind in &self.kinds {
            tasks.spawn(run_kind(self.shared.clone(), kind.clone(), stop_rx.clone()));
        }
        for task in self.background {
            tasks.spawn(task(self.shared.pool.clone(), stop_rx.clone()));
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

impl<C: Send + Sync + 'static> Registry<C> for Runner<C> {
    fn register<F, Fut, E>(self, kind: &str, options: KindOptions, handler: F) -> Self
    where
        F: Fn(Arc<C>, Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<JobError> + 'static,
    {
        Runner::register(self, kind, options, handler)
    }
}

/// Keeps a `LISTEN` connection open; on notifications, wakes the kinds that have jobs ready
/// ([`wake_ready`]). Reconnects when the connection drops, and wakes every kind then, since
/// notifications may have been missed.
async fn listen<C>(url: String, pool: Pool, kinds: Vec<Arc<Kind<C>>>, mut stop: watch::Receiver<bool>) {
    let wake_all = || kinds.iter().for_each(|k| k.wake.notify_one());
    let names: Vec<String> = kinds.iter().map(|k| k.name.clone()).collect();
    while !*stop.borrow() {
        // The pools' TLS policy: libpq's `sslmode` and `sslrootcert` in the connection string.
        match keel_pgtls::connect(&url).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) if tx.send(()).is_err() => break,
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
                    wake_all();
                    loop {
                        tokio::select! {
                            message = rx.recv() => match message {
                                Some(()) => {
                                    // The notifications that came meanwhile are answered by this one look.
                                    while rx.try_recv().is_ok() {}
                                    wake_ready(&pool, &kinds, &names).await;
                                }
                                None => break,
                            },
                            _ = stop.changed() => break,
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "job notifications unavailable; polling until reconnected"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Wakes the kinds that have a job ready to claim (pending and due, or running with a lapsed
/// lease), found with one statement for all of them: an index probe per kind, not a claim. A
/// notification says only that some job was enqueued: waking every kind made each claim (a
/// runner of a dozen kinds made a dozen claims per notification, eleven of them empty; PostgreSQL
/// used a core and a half for 500 no-op jobs a second). If the look fails, every kind is woken.
async fn wake_ready<C>(pool: &Pool, kinds: &[Arc<Kind<C>>], names: &[String]) {
    match ready_kinds(pool, names).await {
        Ok(ready) => kinds.iter().filter(|k| ready.contains(&k.name)).for_each(|k| k.wake.notify_one()),
        Err(e) => {
            tracing::warn!(error = %e, "checking for ready jobs failed; waking every kind");
            kinds.iter().for_each(|k| k.wake.notify_one());
        }
    }
}

async fn ready_kinds(pool: &Pool, names: &[String]) -> Result<Vec<String>, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached(
            "SELECT k FROM unnest($1::text[]) AS k
             WHERE EXISTS (SELECT 1 FROM keel_jobs WHERE kind = k AND state = 'pending' AND run_at <= now())
                OR EXISTS (SELECT 1 FROM keel_jobs WHERE kind = k AND state = 'running' AND locked_until < now())",
        )
        .await
        .map_err(|e| db_error(&e))?;
    let rows = query_by_index(&client, &statement, &[&names]).await.map_err(|e| db_error(&e))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Every `interval`, wakes the kinds that have a job ready to claim ([`wake_ready`]).
async fn check_ready<C>(pool: Pool, kinds: Vec<Arc<Kind<C>>>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let names: Vec<String> = kinds.iter().map(|k| k.name.clone()).collect();
    while !*stop.borrow() {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => break,
        }
        wake_ready(&pool, &kinds, &names).await;
    }
}

/// Jobs of one kind running in this runner, per group (see [`KindOptions::group_concurrency`]).
#[derive(Default)]
struct Groups(Mutex<HashMap<String, usize>>);

impl Groups {
    /// Takes a place in `group` unless it already runs `limit` jobs.
    fn enter(&self, group: &str, limit: usize) -> bool {
        let mut running = self.0.lock().unwrap();
        let count = running.entry(group.to_owned()).or_default();
        if *count >= limit {
            return false;
        }
        *count += 1;
        true
    }

    fn leave(&self, group: &str) {
        let mut running = self.0.lock().unwrap();
        if let Some(count) = running.get_mut(group) {
            *count -= 1;
            if *count == 0 {
                running.remove(group);
            }
        }
    }

    fn full(&self, limit: usize) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(_, n)| **n >= limit).map(|(g, _)| g.clone()).collect()
    }
}

async fn run_kind<C: Send + Sync + 'static>(
    shared: Arc<Shared<C>>,
    kind: Arc<Kind<C>>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(kind.options.concurrency));
    // Job id -> the attempt this runner claimed, to release only its own claims at shutdown.
    let in_flight: Arc<Mutex<HashMap<Uuid, i32>>> = Arc::default();
    let groups: Arc<Groups> = Arc::default();
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    let completer = tokio::spawn(complete_in_batches(shared.pool.clone(), done_rx, &["running"], kind.succeeded));
    let mut running = JoinSet::new();
    // Claimed ahead of the free slots ([`KindOptions::prefetch`]), oldest first, with when each
    // claim's answer came.
    let mut held: VecDeque<(Job, Instant)> = VecDeque::new();
    let prefetch = if kind.options.group_concurrency.is_some() { 0 } else { kind.options.prefetch };
    let hold_limit = hold_limit(kind.options.timeout);
    // Claims again once the held jobs are down to half the prefetch: a claim per many jobs, never
    // an empty slot waiting for one.
    let wants_claim = |held: usize, free: usize| free + prefetch > held && held <= prefetch / 2;
    while !*stop.borrow() {
        let free = slots.available_permits();
        if wants_claim(held.len(), free) {
            let limit = free + prefetch - held.len();
            match claim(&shared.pool, &kind, limit, &groups).await {
                Ok(jobs) => {
                    let more = jobs.len() == limit;
                    let mut over_limit = Vec::new();
                    let claimed_at = Instant::now();
                    for job in jobs {
                        if let Some(limit) = kind.options.group_concurrency {
                            // The claim ranked groups by what was ready, not by what runs here.
                            if !groups.enter(&job.aggregate_id, limit) {
                                over_limit.push((job.id, job.attempt));
                                continue;
                            }
                        }
                        held.push_back((job, claimed_at));
                    }
                    // Started before the round trip below, which would count as time held.
                    let start =
                        start_held(&shared, &kind, &mut held, hold_limit, &slots, &in_flight, &groups, &done_tx);
                    for job in start {
                        running.spawn(job);
                    }
                    if let Err(e) = release(&shared.pool, &over_limit).await {
                        tracing::warn!(kind = %kind.name, error = %e, "could not release jobs over their group's limit");
                    }
                    if more && over_limit.is_empty() && wants_claim(held.len(), slots.available_permits()) {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(kind = %kind.name, error = %e, "claiming jobs failed; retrying"),
            }
        }
        tokio::select! {
            () = kind.wake.notified() => {}
            () = tokio::time::sleep(shared.poll_interval) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {
                // Collect every other run that has ended too, so the next claim fills all the free
                // slots at once instead of one claim per finished job.
                while running.try_join_next().is_some() {}
            }
            _ = stop.changed() => {}
        }
        for job in start_held(&shared, &kind, &mut held, hold_limit, &slots, &in_flight, &groups, &done_tx) {
            running.spawn(job);
        }
    }
    // Claimed and never started: back to the queue at once, for any runner.
    let unstarted: Vec<(Uuid, i32)> = held.drain(..).map(|(job, _)| (job.id, job.attempt)).collect();
    if let Err(e) = release(&shared.pool, &unstarted).await {
        tracing::warn!(kind = %kind.name, error = %e, "could not release held jobs at shutdown; their leases will lapse instead");
    }
    let drained = tokio::time::timeout(shared.shutdown_timeout, async { while running.join_next().await.is_some() {} });
    if drained.await.is_err() {
        running.abort_all();
        while running.join_next().await.is_some() {}
        let unfinished: Vec<(Uuid, i32)> = in_flight.lock().unwrap().drain().collect();
        tracing::warn!(kind = %kind.name, jobs = unfinished.len(), "releasing jobs still running at shutdown");
        if let Err(e) = release(&shared.pool, &unfinished).await {
            tracing::warn!(error = %e, "could not release jobs; their leases will lapse instead");
        }
    }
    // Every run has ended: the completer records what is left and stops.
    drop(done_tx);
    let _ = completer.await;
}

/// Starts held jobs, oldest first, while slots are free, and gives back (unrun, for any runner to
/// claim again) those held past `hold_limit`; returns the runs to spawn.
#[allow(clippy::too_many_arguments)]
fn start_held<C: Send + Sync + 'static>(
    shared: &Arc<Shared<C>>,
    kind: &Arc<Kind<C>>,
    held: &mut VecDeque<(Job, Instant)>,
    hold_limit: Duration,
    slots: &Arc<Semaphore>,
    in_flight: &Arc<Mutex<HashMap<Uuid, i32>>>,
    groups: &Arc<Groups>,
    done_tx: &tokio::sync::mpsc::UnboundedSender<Finished>,
) -> Vec<impl Future<Output = ()> + Send + 'static> {
    let mut stale = Vec::new();
    let mut runs = Vec::new();
    while let Some((job, claimed_at)) = held.front() {
        if claimed_at.elapsed() > hold_limit {
            stale.push((job.id, job.attempt));
            if kind.options.group_concurrency.is_some() {
                // Its place in the group was taken when it was claimed.
                groups.leave(&job.aggregate_id);
            }
            held.pop_front();
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else { break };
        let (job, _) = held.pop_front().expect("looked at");
        in_flight.lock().unwrap().insert(job.id, job.attempt);
        runs.push(execute(
            shared.clone(),
            kind.clone(),
            job,
            permit,
            in_flight.clone(),
            groups.clone(),
            done_tx.clone(),
        ));
    }
    if !stale.is_empty() {
        metrics::counter!("keel_jobs_held_too_long_total", "kind" => kind.name.clone()).increment(stale.len() as u64);
        let pool = shared.pool.clone();
        let name = kind.name.clone();
        tokio::spawn(async move {
            if let Err(e) = release(&pool, &stale).await {
                tracing::warn!(kind = %name, error = %e, "could not give back jobs held too long; their leases will lapse instead");
            }
        });
    }
    runs
}

/// Ready pending jobs in run order. Two ordered index scans, not one scan with OR: an OR across the
/// partial indexes made PostgreSQL collect and sort every ready row on each claim, so claiming
/// slowed down as the queue grew (no-op jobs: 6,300/s with 20,000 queued, 3,100/s with 50,000).
const PENDING: &str = "SELECT id FROM keel_jobs WHERE kind = $1 AND state = 'pending' AND run_at <= now()
     ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED";

/// Ready pending jobs of a grouped kind: at most `$5` per group, none of the groups in `$4` (full
/// here already), so one group's backlog cannot fill the claim.
const PENDING_BY_GROUP: &str = "SELECT id FROM keel_jobs WHERE id IN (
         SELECT id FROM (
             SELECT id, run_at, row_number() OVER (PARTITION BY aggregate_id ORDER BY run_at) AS nth
             FROM keel_jobs
             WHERE kind = $1 AND state = 'pending' AND run_at <= now() AND aggregate_id <> ALL($4)
         ) ranked
         WHERE nth <= $5 ORDER BY run_at LIMIT $2
     ) AND state = 'pending' FOR UPDATE SKIP LOCKED";

async fn claim<C>(pool: &Pool, kind: &Kind<C>, limit: usize, groups: &Groups) -> Result<Vec<Job>, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let pending = if kind.options.group_concurrency.is_some() { PENDING_BY_GROUP } else { PENDING };
    // A lapsed claim counts as an attempt (it was counted when claimed): a job whose runs never end —
    // it kills its process, or hangs it — is dead once it has used the kind's attempts, instead of
    // being claimed again for ever. Never, for a kind that retries forever.
    let max_attempts = kind.options.max_attempts;
    // Judged on the row before the update (SET reads the old row): a lapsed claim that used its attempts.
    let bury = format!("(j.state = 'running' AND j.attempts >= {max_attempts})");
    let statement = client
        .prepare_cached(&format!(
            "WITH pending AS ({pending}), lapsed AS (
                 SELECT id FROM keel_jobs WHERE kind = $1 AND state = 'running' AND locked_until < now()
                 ORDER BY locked_until LIMIT $2 FOR UPDATE SKIP LOCKED
             ), ready AS (
                 SELECT id FROM lapsed UNION ALL SELECT id FROM pending LIMIT $2
             )
             -- The claimed rows are found by their ids (an index condition whatever the statistics
             -- say), not joined to `ready`: a join planned from statistics that said the table was
             -- empty read the whole primary key. A lapsed claim is `running`, a ready job
             -- `pending`, so a row's own columns say whether it is buried.
             UPDATE keel_jobs j
             SET state = CASE WHEN {bury} THEN 'dead' ELSE 'running' END,
                 attempts = CASE WHEN {bury} THEN j.attempts ELSE j.attempts + 1 END,
                 started_at = CASE WHEN {bury} THEN j.started_at ELSE now() END,
                 finished_at = CASE WHEN {bury} THEN now() END,
                 last_error = CASE WHEN {bury} THEN 'no run ended: its lease lapsed after each of ' || j.attempts || ' runs' ELSE j.last_error END,
                 locked_until = CASE WHEN {bury} THEN NULL ELSE now() + $3 * interval '1 second' END
             WHERE j.id = ANY(ARRAY(SELECT id FROM ready))
             -- After the update: only a buried job is `dead`.
             RETURNING j.id, j.kind, j.aggregate_id, j.payload, j.traceparent, j.attempts, j.created_at, j.run_at,
                 j.replays, j.state = 'dead' AS bury"
        ))
        .await
        .map_err(|e| e.to_string())?;
    let lease = lease(kind.options.timeout).as_secs_f64();
    let limit = limit as i64;
    let rows = match kind.options.group_concurrency {
        Some(per_group) => {
            let full = groups.full(per_group);
            claim_by_index(&client, &statement, &[&kind.name, &limit, &lease, &full, &(per_group as i64)]).await
        }
        None => claim_by_index(&client, &statement, &[&kind.name, &limit, &lease]).await,
    };
    let mut jobs = Vec::new();
    for row in rows.map_err(|e| e.to_string())? {
        let job = Job::from_row(&row);
        if row.get("bury") {
            metrics::counter!("keel_jobs_dead_total", "kind" => kind.name.clone()).increment(1);
            tracing::error!(job_id = %job.id, kind = %kind.name, attempts = job.attempt,
                "job dead: none of its runs ended (its lease lapsed each time)");
        } else {
            jobs.push(job);
        }
    }
    Ok(jobs)
}

/// Aborts a spawned task when dropped, so cancelling a run cancels its handler.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `kind`'s handler on `job` within its timeout, as its own task so that a panic is a failed
/// attempt rather than a dead runner, and records the run's metrics. Returns the outcome and the
/// job's span (its fields: job id, kind, attempt, trace id). Shared with the JetStream consumer.
pub(crate) async fn invoke<C: Send + Sync + 'static>(
    ctx: Arc<C>,
    kind: &Kind<C>,
    job: Job,
) -> (Result<(), JobError>, tracing::Span) {
    let kind_label = kind.name.clone();
    metrics::counter!("keel_jobs_started_total", "kind" => kind_label.clone()).increment(1);
    let waited = SystemTime::now().duration_since(job.ready_at).unwrap_or_default();
    metrics::histogram!("keel_job_pickup_seconds", "kind" => kind_label.clone()).record(waited.as_secs_f64());
    let span = tracing::info_span!("job", job_id = %job.id, kind = %kind.name, attempt = job.attempt,
        trace_id = job.trace_id().unwrap_or(""));
    let attempt = job.attempt;
    let started = std::time::Instant::now();
    let mut run = AbortOnDrop(tokio::spawn((kind.handler)(ctx, job).instrument(span.clone())));
    let outcome = match tokio::time::timeout(kind.options.timeout, &mut run.0).await {
        Ok(Ok(result)) => result,
        Ok(Err(join_error)) => Err(JobError::from(format!("handler panicked: {join_error}"))),
        Err(_) => Err(JobError::from(format!("handler ran longer than {:?}", kind.options.timeout))),
    };
    metrics::histogram!("keel_job_duration_seconds", "kind" => kind_label.clone())
        .record(started.elapsed().as_secs_f64());
    match &outcome {
        Ok(()) => metrics::counter!("keel_jobs_succeeded_total", "kind" => kind_label).increment(1),
        Err(error) => {
            let dead = error.is_final(&kind.options, attempt);
            metrics::counter!("keel_jobs_failed_total", "kind" => kind_label.clone()).increment(1);
            if dead {
                metrics::counter!("keel_jobs_dead_total", "kind" => kind_label).increment(1);
            }
            span.in_scope(|| tracing::warn!(error = %error.message, dead, "job failed"));
        }
    }
    (outcome, span)
}

impl KindOptions {
    /// The wait before retrying after failed attempt `attempt`: the handler's own, or the backoff.
    pub(crate) fn retry_delay(&self, attempt: i32, error: &JobError) -> Duration {
        if let Some(delay) = error.retry_in {
            delay
        } else if self.jitter {
            backoff(attempt, self.backoff_base, self.backoff_max)
        } else {
            backoff_ceiling(attempt, self.backoff_base, self.backoff_max)
        }
    }
}

async fn execute<C: Send + Sync + 'static>(
    shared: Arc<Shared<C>>,
    kind: Arc<Kind<C>>,
    job: Job,
    _slot: OwnedSemaphorePermit,
    in_flight: Arc<Mutex<HashMap<Uuid, i32>>>,
    groups: Arc<Groups>,
    done: tokio::sync::mpsc::UnboundedSender<Finished>,
) {
    let group = kind.options.group_concurrency.map(|_| job.aggregate_id.clone());
    let (id, attempt) = (job.id, job.attempt);
    let (outcome, span) = invoke(shared.ctx.clone(), &kind, job).await;
    let recorded = match &outcome {
        Ok(()) => done.send(Finished::claim(id, attempt)).map_err(|_| "the completer has stopped".to_owned()),
        Err(error) => {
            let dead = error.is_final(&kind.options, attempt);
            let delay = kind.options.retry_delay(attempt, error);
            let failed = fail(&shared.pool, (id, attempt), &error.message, dead, delay).await;
            if !dead && failed.is_ok() {
                // Notifications only announce new jobs: wake this kind when the retry is due, so
                // backoff is honoured to the millisecond rather than to the next poll.
                let kind = kind.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    kind.wake.notify_one();
                });
            }
            failed
        }
    };
    if let Err(e) = recorded {
        // The lease will lapse and the job run again: at least once, never lost.
        span.in_scope(|| tracing::warn!(error = %e, "could not record the job's outcome"));
    }
    in_flight.lock().unwrap().remove(&id);
    if let Some(group) = group {
        groups.leave(&group);
    }
}

/// The most completions recorded by one statement.
const MAX_COMPLETION_BATCH: usize = 1000;

/// A job whose handler succeeded, to be recorded. `claim` is the attempt a runner claimed it as:
/// the record then applies only if that claim still holds. A runner whose lease lapsed (it was
/// paused, or slow to record) must not finish the run of the runner that claimed the job after it.
/// The JetStream consumer has no claim to fence on (`None`): any run of the event finishes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Finished {
    id: Uuid,
    claim: Option<i32>,
}

impl Finished {
    pub(crate) fn claim(id: Uuid, attempt: i32) -> Finished {
        Finished { id, claim: Some(attempt) }
    }

    pub(crate) fn any_run(id: Uuid) -> Finished {
        Finished { id, claim: None }
    }
}

/// Records successful runs (jobs in a state of `from` become `to`: `done`, or `relayed`), many per
/// statement: while one batch is being written the next accumulates, so batches grow with load and
/// cost nothing in latency when idle.
///
/// A batch that cannot be written is tried again (with what arrived meanwhile) until it is: the
/// JetStream consumer has already acknowledged these events, so a record dropped here would leave
/// their rows `relayed` with nothing left in the stream to finish them. Once the senders are gone
/// (shutdown) a batch gets [`LAST_TRIES`] more tries; a runner's jobs left unrecorded then run
/// again when their leases lapse, a consumer's are relayed again after [`crate::stream`]'s staleness
/// limit: at least once either way.
pub(crate) async fn complete_in_batches(
    pool: Pool,
    mut done: tokio::sync::mpsc::UnboundedReceiver<Finished>,
    from: &'static [&'static str],
    to: &'static str,
) {
    let mut batch = Vec::new();
    let mut pause = Duration::from_millis(50);
    let mut last_tries = LAST_TRIES;
    loop {
        if batch.is_empty() {
            match done.recv().await {
                Some(id) => batch.push(id),
                None => return,
            }
        }
        while batch.len() < MAX_COMPLETION_BATCH {
            match done.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        match complete(&pool, &batch, from, to).await {
            Ok(()) => {
                batch.clear();
                pause = Duration::from_millis(50);
            }
            Err(e) => {
                metrics::counter!("keel_outbox_completion_retries_total").increment(1);
                let closed = done.is_closed() && done.is_empty();
                if closed {
                    last_tries -= 1;
                    if last_tries == 0 {
                        tracing::warn!(error = %e, jobs = batch.len(), "could not record finished jobs at shutdown; they will run again");
                        return;
                    }
                }
                tracing::warn!(error = %e, jobs = batch.len(), "could not record finished jobs; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Tries a batch of completions gets once nothing more can arrive (see [`complete_in_batches`]).
const LAST_TRIES: u32 = 5;

/// Where batches of different writers name the same rows, the rows are locked in id order before
/// they are updated (`ORDER BY id FOR UPDATE` in a materialized CTE): the relay's batches
/// (`running` → `relayed`) and the consumers' (→ `done`) often do, and two statements that lock
/// them in the orders their plans happen to visit them deadlock — PostgreSQL then aborts one, as it
/// did for one batch in a run of 50,000 events over NATS and for one in three runs of 2,000 on two
/// loaded cores. A runner's own completions (`running` → `done`) meet no other writer's batch but
/// a second runner's, after a lease lapsed, and a deadlock then is retried like any failed batch:
/// they update at once, since locking first writes every row twice (bursts of no-op jobs drained
/// about a tenth faster without it).
async fn complete(pool: &Pool, finished: &[Finished], from: &[&str], to: &str) -> Result<(), String> {
    let ids: Vec<Uuid> = finished.iter().map(|f| f.id).collect();
    let claims: Vec<Option<i32>> = finished.iter().map(|f| f.claim).collect();
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let locked_first = !(from == ["running"] && to == "done");
    let statement = if locked_first {
        client.prepare_cached(
            "WITH locked AS MATERIALIZED (
                 SELECT id FROM keel_jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE
             )
             UPDATE keel_jobs j
             SET state = $3, finished_at = CASE WHEN $3 = 'done' THEN now() END, locked_until = NULL,
                 last_error = NULL
             FROM locked, unnest($1::uuid[], $4::int4[]) AS f(id, claim)
             WHERE j.id = ANY($1) AND j.id = locked.id AND j.id = f.id AND j.state = ANY($2)
                 AND (f.claim IS NULL OR j.attempts = f.claim)",
        )
    } else {
        client.prepare_cached(
            "UPDATE keel_jobs j
             SET state = $3, finished_at = CASE WHEN $3 = 'done' THEN now() END, locked_until = NULL,
                 last_error = NULL
             FROM unnest($1::uuid[], $4::int4[]) AS f(id, claim)
             WHERE j.id = ANY($1) AND j.id = f.id AND j.state = ANY($2)
                 AND (f.claim IS NULL OR j.attempts = f.claim)",
        )
    }
    .await
    .map_err(|e| db_error(&e))?;
    execute_by_index(&client, &statement, &[&ids, &from, &to, &claims]).await.map_err(|e| db_error(&e))?;
    Ok(())
}

/// Records a failed run of the claim `(id, attempt)`, if that claim still holds (see [`Finished`]).
async fn fail(pool: &Pool, (id, attempt): (Uuid, i32), error: &str, dead: bool, delay: Duration) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached(
            "UPDATE keel_jobs
             SET state = CASE WHEN $3 THEN 'dead' ELSE 'pending' END,
                 run_at = CASE WHEN $3 THEN run_at ELSE now() + $4 * interval '1 second' END,
                 finished_at = CASE WHEN $3 THEN now() END,
                 locked_until = NULL, last_error = $2
             WHERE id = $1 AND state = 'running' AND attempts = $5",
        )
        .await
        .map_err(|e| e.to_string())?;
    let delay = delay.as_secs_f64();
    execute_by_index(&client, &statement, &[&id, &error, &dead, &delay, &attempt]).await.map_err(|e| db_error(&e))?;
    Ok(())
}

/// Gives claimed jobs `(id, attempt)` back to the queue without counting the interrupted run as an
/// attempt; a claim that lapsed and was taken by another runner is left to it.
async fn release(pool: &Pool, claims: &[(Uuid, i32)]) -> Result<(), String> {
    if claims.is_empty() {
        return Ok(());
    }
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = claims.iter().copied().unzip();
    let client = pool.get().await.map_err(|e| e.to_string())?;
    // Locked in id order, as [`complete`] does and for the same reason.
    let release = client
        .prepare_cached(
            "WITH locked AS MATERIALIZED (
             SELECT id FROM keel_jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE
         )
         UPDATE keel_jobs j SET state = 'pending', attempts = j.attempts - 1, run_at = now(), locked_until = NULL
         FROM locked, unnest($1::uuid[], $2::int4[]) AS c(id, attempt)
         WHERE j.id = ANY($1) AND j.id = locked.id AND j.id = c.id AND j.state = 'running' AND j.attempts = c.attempt",
        )
        .await
        .map_err(|e| db_error(&e))?;
    execute_by_index(&client, &release, &[&ids, &attempts]).await.map_err(|e| db_error(&e))?;
    Ok(())
}
