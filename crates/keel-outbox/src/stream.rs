//! NATS JetStream as the transport of events, for fleets where one database's queue should not be
//! what every worker polls.
//!
//! - The outbox stays where it is: events are still written on the caller's transaction. A
//!   [`Runner`] told to [`Runner::relay`] some kinds publishes their jobs to JetStream instead of
//!   running them (async publishes, at most `RELAY_IN_FLIGHT` unacknowledged per kind), and marks a
//!   job `relayed` once the stream acknowledged it. A crash between the two publishes again; the
//!   message id (see [`message_id`]) lets JetStream drop that duplicate.
//! - **An event is finished when a handler has run it, not when the broker has it.** The consumer
//!   that ran it marks its row `done` in the database it came from (in batches). Should the server
//!   lose its store, the relay finds the rows still `relayed` from before the stream was made again
//!   and relays them again (`relay_again`): nothing Keel accepted is lost with the broker's disk.
//! - A [`StreamRunner`] consumes each kind through a durable pull consumer with explicit acks and
//!   runs the same handlers as a [`Runner`] would. A failure is a negative ack with the kind's
//!   backoff (or the handler's `retry_in`); after the last attempt the job is recorded `dead` in its
//!   own database, where the queue statistics and [`crate::replay`] see it: a replay relays it again.
//!
//! Subjects are `<prefix>.events.<kind>` in one stream, `<PREFIX>_EVENTS`, with work-queue
//! retention: a message is gone once its consumer acknowledged it.
//!
//! A server that lost the stream (restarted with an empty store, or someone deleted it) gets it
//! back without a restart of Keel: a relay whose publish finds no stream, and a consumer that finds
//! none, create it again as at start-up, and consumers re-create their durable consumers. The
//! failures are counted: `keel_outbox_relay_failures_total` and `keel_outbox_consumer_errors_total`,
//! by kind and a reason from a small fixed set.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer, context, stream, AckKind, ErrorCode};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::runner::{complete_in_batches, handler, invoke, lease, Finished, Handler, Kind, Registry};
use crate::{Job, JobError, KindOptions, Runner};

/// Unacknowledged publishes per relayed kind and database.
const RELAY_IN_FLIGHT: usize = 256;
/// The header naming the database an event came from, where its dead letter is recorded.
const SOURCE_HEADER: &str = "Keel-Source";
/// How long JetStream may take to answer an API request or acknowledge a publish.
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// A relay run's time limit (its kind's timeout): room for a publish whose acknowledgement timed
/// out to be tried again within the run (see [`JetStream::publish`]).
const RELAY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a relay run keeps starting publishes of its job: a last one may still wait out its
/// acknowledgement before `RELAY_TIMEOUT`.
const RELAY_RETRIES_FOR: Duration =
    RELAY_TIMEOUT.saturating_sub(JETSTREAM_TIMEOUT).saturating_sub(Duration::from_secs(1));
/// The first pause after a failure to publish or to consume; it doubles up to `MAX_PAUSE`, so an
/// unreachable server is asked about once a second, not in a busy loop.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// A consumer that hears nothing from the server for twice this long (no message, no heartbeat)
/// takes it for lost and opens again: the way a consumer deleted with its stream is noticed when
/// the server does not say so.
const CONSUMER_HEARTBEAT: Duration = Duration::from_secs(5);

/// A connection to JetStream and the stream of one deployment's events.
#[derive(Clone)]
pub struct JetStream {
    context: jetstream::Context,
    prefix: String,
    /// When this process last made sure the stream exists after finding it missing (see
    /// [`JetStream::restore_stream`]).
    restored: Arc<Mutex<Option<Instant>>>,
}

impl JetStream {
    /// Connects and makes sure the stream exists. `prefix` (letters, digits, `-`, `_`) names the
    /// subjects and the stream, so deployments (or tests) can share a server.
    pub async fn connect(url: &str, prefix: &str) -> Result<JetStream, String> {
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("{prefix:?} is not a subject prefix (letters, digits, '-' and '_')"));
        }
        let client = async_nats::connect(url).await.map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let mut context = jetstream::new(client);
        context.set_timeout(JETSTREAM_TIMEOUT);
        let js = JetStream { context, prefix: prefix.to_owned(), restored: Arc::default() };
        js.ensure_stream().await.map_err(|e| format!("JetStream stream {}: {e}", js.stream_name()))?;
        Ok(js)
    }

    /// The stream as this version of Keel configures it.
    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream_name(),
            subjects: vec![format!("{}.events.>", self.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            // Long enough to cover a relay that published, died, and had its lease lapse.
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// Finds the stream or creates it, safely when many processes start at once against a server
    /// that has none: the server lets one create win and refuses the others ("name already in use"
    /// or, on 2.9, "subjects overlap" with the stream the winner just made), so a refused create looks
    /// again and uses the winner's stream. A stream made by an older Keel with other settings is
    /// updated where JetStream allows it in place, and named clearly where it does not.
    async fn ensure_stream(&self) -> Result<(), String> {
        let wanted = self.stream_config();
        for _ in 0..5 {
            match self.context.get_stream(&wanted.name).await {
                Ok(mut found) => {
                    let info = found.info().await.map_err(|e| format!("cannot read its configuration: {e}"))?;
                    return self.reconcile_stream(&info.config, &wanted).await;
                }
                Err(e) if !is_jetstream_error(&e, &[ErrorCode::STREAM_NOT_FOUND]) => {
                    return Err(format!("cannot look it up: {e}"));
                }
                Err(_) => {}
            }
            match self.context.create_stream(wanted.clone()).await {
                Ok(_) => return Ok(()),
                Err(e)
                    if is_jetstream_error(&e, &[ErrorCode::STREAM_NAME_EXIST, ErrorCode::STREAM_SUBJECT_OVERLAP]) =>
                {
                    // Another process created it between our look-up and our create: look again.
                    tracing::debug!(error = %e, "lost the race to create the stream; using the winner's");
                }
                Err(e) => return Err(format!("cannot create it: {e}")),
            }
        }
        Err("it was created and removed again while this process started; is another deployment using the same prefix?"
            .to_owned())
    }

    /// Makes sure the stream exists again after a publish or a look-up begun at `begun` found it
    /// missing. Everything that finds it missing at once (up to `RELAY_IN_FLIGHT` publishes per
    /// relayed kind, every consumer) asks here together: the first makes sure, and the others,
    /// whose requests began before it was done, only try again, rather than each asking the
    /// server. Another process doing the same at the same time is what [`JetStream::ensure_stream`]
    /// is safe against.
    async fn restore_stream(&self, begun: Instant) -> Result<(), String> {
        let mut restored = self.restored.lock().await;
        if restored.is_some_and(|at| at > begun) {
            return Ok(());
        }
        self.ensure_stream().await.map_err(|e| format!("JetStream stream {} is missing: {e}", self.stream_name()))?;
        *restored = Some(Instant::now());
        tracing::warn!(stream = %self.stream_name(), "the JetStream stream was missing; it exists again");
        Ok(())
    }

    async fn reconcile_stream(&self, found: &stream::Config, wanted: &stream::Config) -> Result<(), String> {
        if found.retention != wanted.retention || found.storage != wanted.storage {
            // JetStream cannot change either in place: the operator must decide what happens to
            // the messages in it.
            return Err(format!(
                "it exists with retention {:?} and storage {:?}, where Keel needs {:?} and {:?}; \
                 neither can be changed in place: drain and delete the stream (nats stream rm {}), or choose \
                 another KEEL_NATS_PREFIX",
                found.retention, found.storage, wanted.retention, wanted.storage, wanted.name
            ));
        }
        if found.subjects == wanted.subjects && found.duplicate_window == wanted.duplicate_window {
            return Ok(());
        }
        let mut updated = found.clone();
        updated.subjects = wanted.subjects.clone();
        updated.duplicate_window = wanted.duplicate_window;
        self.context.update_stream(&updated).await.map_err(|e| format!("cannot update its configuration: {e}"))?;
        tracing::info!(stream = %wanted.name, "updated the JetStream stream's subjects and duplicate window");
        Ok(())
    }

    pub fn stream_name(&self) -> String {
        format!("{}_EVENTS", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    /// Events in the stream not yet acknowledged by their consumer (handled events leave it).
    pub async fn backlog(&self) -> Result<u64, String> {
        let mut stream = self.context.get_stream(self.stream_name()).await.map_err(|e| e.to_string())?;
        Ok(stream.info().await.map_err(|e| e.to_string())?.state.messages)
    }

    pub fn subject(&self, kind: &str) -> String {
        format!("{}.events.{kind}", self.prefix)
    }

    fn consumer_name(&self, kind: &str) -> String {
        format!("{}-{}", self.prefix, kind.replace(['.', '*', '>', ' '], "_"))
    }

    /// Publishes a relayed job and waits for JetStream to acknowledge it. Failures that may pass
    /// are retried here for a few seconds, under the same message id: a publish that timed out may
    /// have been stored, and JetStream drops a second one with its id, where a retry by the runner
    /// would come with a new id (see [`message_id`]). A stream found missing is made again first.
    async fn publish(&self, source: &str, job: &Job) -> Result<(), String> {
        let body = serde_json::to_vec(&Envelope::from(job)).map_err(|e| e.to_string())?;
        let give_up = Instant::now() + RELAY_RETRIES_FOR;
        let mut pause = FIRST_PAUSE;
        loop {
            let begun = Instant::now();
            let error = match self.publish_once(source, job, &body).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let (reason, may_pass) = match error.kind() {
                PublishErrorKind::StreamNotFound => ("no_stream", true),
                PublishErrorKind::TimedOut => ("timeout", true),
                PublishErrorKind::BrokenPipe => ("connection", true),
                _ => ("publish", false),
            };
            metrics::counter!("keel_outbox_relay_failures_total", "kind" => job.kind.clone(), "reason" => reason)
                .increment(1);
            if error.kind() == PublishErrorKind::StreamNotFound {
                self.restore_stream(begun).await?;
            }
            if !may_pass || Instant::now() + pause >= give_up {
                return Err(format!("JetStream did not take the event: {error}"));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    async fn publish_once(&self, source: &str, job: &Job, body: &[u8]) -> Result<(), PublishError> {
        let message = PublishMessage::build()
            .payload(body.to_vec().into())
            .message_id(message_id(job))
            .header(SOURCE_HEADER, source);
        self.context.send_publish(self.subject(&job.kind), message).await?.await?;
        Ok(())
    }
}

/// The `Nats-Msg-Id` of a relayed job (JetStream drops a publish under an id it stored within the
/// stream's duplicate window): the job id, and how many times it was replayed. It never changes
/// while the event is relayed — not for the retries [`JetStream::publish`] makes itself, nor when
/// the runner retries a relay run that failed (its publish may have been stored all the same), nor
/// for the run that takes a job over from a relay that died — so every copy of one relay is dropped
/// but the first. A replay of a dead job is a new delivery the operator asked for: a new id.
fn message_id(job: &Job) -> String {
    match job.replays {
        0 => job.id.to_string(),
        n => format!("{}:r{n}", job.id),
    }
}

/// Whether `error` is the JetStream API's answer with one of `codes`.
fn is_jetstream_error<K>(error: &async_nats::error::Error<K>, codes: &[ErrorCode]) -> bool
where
    K: JetStreamErrorKind + Clone + std::fmt::Debug + std::fmt::Display + PartialEq,
{
    error.kind().jetstream_error().is_some_and(|e| codes.contains(&e.error_code()))
}

/// The error kinds of stream look-ups and creates that can carry the JetStream API's own error.
trait JetStreamErrorKind {
    fn jetstream_error(&self) -> Option<&async_nats::jetstream::Error>;
}

impl JetStreamErrorKind for context::CreateStreamErrorKind {
    fn jetstream_error(&self) -> Option<&async_nats::jetstream::Error> {
        match self {
            context::CreateStreamErrorKind::JetStream(e) => Some(e),
            _ => None,
        }
    }
}

impl JetStreamErrorKind for context::GetStreamErrorKind {
    fn jetstream_error(&self) -> Option<&async_nats::jetstream::Error> {
        match self {
            context::GetStreamErrorKind::JetStream(e) => Some(e),
            _ => None,
        }
    }
}

impl JetStreamErrorKind for stream::ConsumerErrorKind {
    fn jetstream_error(&self) -> Option<&async_nats::jetstream::Error> {
        match self {
            stream::ConsumerErrorKind::JetStream(e) => Some(e),
            _ => None,
        }
    }
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// A job as it travels in a message.
#[derive(Serialize, Deserialize)]
struct Envelope {
    id: Uuid,
    kind: String,
    aggregate_id: String,
    payload: serde_json::Value,
    traceparent: Option<String>,
    created_at_ms: u64,
}

impl From<&Job> for Envelope {
    fn from(job: &Job) -> Envelope {
        Envelope {
            id: job.id,
            kind: job.kind.clone(),
            aggregate_id: job.aggregate_id.clone(),
            payload: job.payload.clone(),
            traceparent: job.traceparent.clone(),
            created_at_ms: millis(job.created_at),
        }
    }
}

impl<C: Send + Sync + 'static> Runner<C> {
    /// Publishes the jobs of `kinds` from this runner's database to JetStream rather than running
    /// them here. `source` names the database to the [`StreamRunner`] (see [`StreamRunner::source`]).
    pub fn relay(mut self, js: &JetStream, source: &str, kinds: &[&str]) -> Self {
        let options = KindOptions {
            concurrency: RELAY_IN_FLIGHT,
            // Never dead: while JetStream is away, events wait in the outbox.
            max_attempts: KindOptions::RETRY_FOREVER,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            timeout: RELAY_TIMEOUT,
            ..KindOptions::default()
        };
        for kind in kinds {
            let (js, source) = (js.clone(), source.to_owned());
            let publish: Handler<C> = handler(move |_ctx: Arc<C>, job: Job| {
                let (js, source) = (js.clone(), source.clone());
                async move { js.publish(&source, &job).await }
            });
            self = self.register_relay(kind, options.clone(), publish);
        }
        let (js, kinds) = (js.clone(), kinds.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>());
        self.beside(Box::new(move |pool, stop| Box::pin(relay_again(js, pool, kinds, stop))))
    }
}

/// How often a relay checks whether the stream was made anew since it relayed what is not done.
const RELAY_AGAIN_EVERY: Duration = Duration::from_secs(2);
/// Clocks of the broker and the database may differ: rows relayed this close to the stream's making
/// are relayed again too (a copy the stream already has is dropped by its message id).
const CLOCK_MARGIN: Duration = Duration::from_secs(2);
/// A row still `relayed` this long after it was relayed is relayed again whatever the stream's age:
/// the backstop for what the stream lost without being made anew (a single server's unsynced
/// writes at a power cut) and for a consumer that ran the event but died before recording it. A
/// copy still in the stream is then run twice; handlers are idempotent.
const STALE_RELAYED: Duration = Duration::from_secs(3600);

/// Relays again, as new, every event of `kinds` relayed before the stream was (re)made and not yet
/// run by a handler: a stream younger than such an event cannot hold it, whatever happened to the
/// server's store. Also those relayed more than [`STALE_RELAYED`] ago. Runs until `stop`.
async fn relay_again(js: JetStream, pool: Pool, kinds: Vec<String>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(RELAY_AGAIN_EVERY) => {}
            _ = stop.changed() => return,
        }
        let made = match js.context.get_stream(js.stream_name()).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => SystemTime::from(info.created),
                Err(_) => continue,
            },
            // No stream (yet): the next publish or consumer makes it.
            Err(_) => continue,
        };
        let result = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            // Locked in id order, as the consumers' batches lock the rows they finish: locked in
            // scan order, the two deadlock.
            let again = client
                .prepare_cached(
                    "WITH locked AS MATERIALIZED (
                     SELECT id FROM keel_jobs
                     WHERE state = 'relayed' AND kind = ANY($1)
                         AND started_at < greatest($2::timestamptz, $3::timestamptz)
                     ORDER BY id FOR UPDATE
                 )
                 UPDATE keel_jobs j SET state = 'pending', run_at = now()
                 FROM locked WHERE j.id = locked.id AND j.state = 'relayed'",
                )
                .await
                .map_err(|e| crate::db_error(&e))?;
            let (since, stale) = (made + CLOCK_MARGIN, SystemTime::now() - STALE_RELAYED);
            crate::execute_by_index(&client, &again, &[&kinds, &since, &stale]).await.map_err(|e| crate::db_error(&e))
        };
        match result.await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("keel_outbox_relayed_again_total").increment(n);
                tracing::warn!(events = n, stream = %js.stream_name(),
                    "the stream is younger than events relayed and not yet handled: relaying them again");
                let client = pool.get().await;
                if let Ok(client) = client {
                    let _ = client.execute("SELECT pg_notify($1, '')", &[&crate::CHANNEL]).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for events to relay again"),
        }
    }
}

/// Runs handlers for jobs that arrive through JetStream.
pub struct StreamRunner<C> {
    js: JetStream,
    ctx: Arc<C>,
    kinds: Vec<Arc<Kind<C>>>,
    sources: HashMap<String, Pool>,
    shutdown_timeout: Duration,
}

impl<C: Send + Sync + 'static> StreamRunner<C> {
    pub fn new(js: JetStream, ctx: Arc<C>) -> StreamRunner<C> {
        StreamRunner { js, ctx, kinds: Vec::new(), sources: HashMap::new(), shutdown_timeout: Duration::from_secs(10) }
    }

    /// The database relayed events named `name` came from: their dead letters are recorded there.
    pub fn source(mut self, name: &str, pool: Pool) -> Self {
        self.sources.insert(name.to_owned(), pool);
        self
    }

    /// How long running handlers may finish after shutdown begins (default 10 s); the messages of
    /// those still running are delivered again once their ack wait lapses.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Registers the handler of a kind, as [`Runner::register`] does.
    pub fn register<F, Fut, E>(mut self, kind: &str, options: KindOptions, handler: F) -> Self
    where
        F: Fn(Arc<C>, Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<JobError> + 'static,
    {
        self.kinds.push(Arc::new(Kind::new(kind, options, self::handler(handler))));
        self
    }

    /// Consumes every registered kind until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Per database: the handled events to mark `done` there, in batches.
        let mut completers = JoinSet::new();
        let sources: HashMap<String, Source> = self
            .sources
            .into_iter()
            .map(|(name, pool)| {
                let (done, handled) = tokio::sync::mpsc::unbounded_channel();
                // From `running` and `pending` too: the consumer may finish before the relay's own
                // (batched) record of the publish, or after a publish that timed out but was stored
                // sent the row back to wait for a retry; the relay then finds the row done and
                // leaves it, rather than leaving it `relayed` for ever.
                let from = &["relayed", "running", "pending"];
                completers.spawn(complete_in_batches(pool.clone(), handled, from, "done"));
                (name, Source { pool, done })
            })
            .collect();
        let sources = Arc::new(sources);
        let mut tasks = JoinSet::new();
        for kind in self.kinds {
            let consume = consume(
                self.js.clone(),
                self.ctx.clone(),
                kind,
                sources.clone(),
                self.shutdown_timeout,
                stop_rx.clone(),
            );
            tasks.spawn(consume);
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        // Every handler has ended: the completers record what is left and stop.
        drop(sources);
        while completers.join_next().await.is_some() {}
    }
}

/// A database events are relayed from: where their rows are marked `done` once handled, or `dead`.
struct Source {
    pool: Pool,
    done: tokio::sync::mpsc::UnboundedSender<Finished>,
}

impl<C: Send + Sync + 'static> Registry<C> for StreamRunner<C> {
    fn register<F, Fut, E>(self, kind: &str, options: KindOptions, handler: F) -> Self
    where
        F: Fn(Arc<C>, Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<JobError> + 'static,
    {
        StreamRunner::register(self, kind, options, handler)
    }
}

/// One kind's consumer: keeps a pull subscription open (re-opening it after errors, and making
/// the stream and the durable consumer again when the server lost them) and runs up to the kind's
/// concurrency of handlers at once.
async fn consume<C: Send + Sync + 'static>(
    js: JetStream,
    ctx: Arc<C>,
    kind: Arc<Kind<C>>,
    sources: Arc<HashMap<String, Source>>,
    shutdown_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(kind.options.concurrency));
    let mut running = JoinSet::new();
    let mut pause = FIRST_PAUSE;
    while !*stop.borrow() {
        let begun = Instant::now();
        let failure = match subscribe(&js, &kind).await {
            Ok(mut messages) => loop {
                // A slot first, then a message: a message is only taken when it can run at once.
                let permit = tokio::select! {
                    permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    _ = stop.changed() => break None,
                };
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = stop.changed() => break None,
                };
                match message {
                    Some(Ok(message)) => {
                        pause = FIRST_PAUSE;
                        let (ctx, kind, sources) = (ctx.clone(), kind.clone(), sources.clone());
                        running.spawn(async move {
                            handle(ctx, &kind, &sources, message).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => break Some(ConsumeError::from(e)),
                    None => break Some(ConsumeError { reason: "pull", message: "the subscription ended".to_owned() }),
                }
                while running.try_join_next().is_some() {}
            },
            Err(failure) => Some(failure),
        };
        let Some(failure) = failure else { break };
        metrics::counter!("keel_outbox_consumer_errors_total", "kind" => kind.name.clone(), "reason" => failure.reason)
            .increment(1);
        tracing::warn!(kind = %kind.name, error = %failure.message, "cannot consume from JetStream; retrying");
        if failure.reason == "no_stream" {
            if let Err(e) = js.restore_stream(begun).await {
                tracing::warn!(kind = %kind.name, error = %e, "cannot make the JetStream stream again; retrying");
            }
        }
        // Even after a failure that came at once (a subscription that ends as it opens), so that a
        // server that keeps failing is asked about once a second at most.
        tokio::select! {
            () = tokio::time::sleep(pause) => pause = (pause * 2).min(MAX_PAUSE),
            _ = stop.changed() => break,
        }
    }
    let drained = tokio::time::timeout(shutdown_timeout, async { while running.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::warn!(kind = %kind.name, "handlers still running at shutdown; their messages will be redelivered");
        running.abort_all();
    }
}

/// Why a consumer stopped or could not start: `reason`, from a small fixed set, labels the
/// metric; `message` is for the log.
struct ConsumeError {
    reason: &'static str,
    message: String,
}

impl ConsumeError {
    fn new(reason: &'static str, error: impl std::fmt::Display) -> ConsumeError {
        ConsumeError { reason, message: error.to_string() }
    }
}

impl From<consumer::pull::MessagesError> for ConsumeError {
    fn from(error: consumer::pull::MessagesError) -> ConsumeError {
        let reason = match error.kind() {
            // What a consumer deleted with its stream (or by hand) looks like.
            MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders => "no_consumer",
            MessagesErrorKind::MissingHeartbeat => "heartbeat",
            _ => "pull",
        };
        ConsumeError::new(reason, error)
    }
}

/// Opens a pull subscription on the kind's durable consumer, creating it if it does not exist.
/// A missing stream is `no_stream`: the caller makes it again and subscribes anew.
async fn subscribe<C>(js: &JetStream, kind: &Kind<C>) -> Result<consumer::pull::Stream, ConsumeError> {
    let stream = match js.context.get_stream(js.stream_name()).await {
        Ok(stream) => stream,
        Err(e) if is_jetstream_error(&e, &[ErrorCode::STREAM_NOT_FOUND]) => {
            return Err(ConsumeError::new("no_stream", e))
        }
        Err(e) => return Err(ConsumeError::new("subscribe", e)),
    };
    let name = js.consumer_name(&kind.name);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: js.subject(&kind.name),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: lease(kind.options.timeout),
        // Unlimited: the attempts are counted here, so that the last one is recorded dead rather
        // than silently never delivered again.
        max_deliver: -1,
        max_ack_pending: (kind.options.concurrency * 8) as i64,
        ..Default::default()
    };
    // Create-or-update is idempotent on the server: processes starting together all get the same
    // durable consumer, and one made by an older Keel takes the settings above where JetStream
    // allows updating them (it refuses, and says so, where it does not).
    let consumer: consumer::PullConsumer = match stream.create_consumer(config).await {
        Ok(consumer) => consumer,
        // Deleted between the look-up and the create.
        Err(e) if is_jetstream_error(&e, &[ErrorCode::STREAM_NOT_FOUND]) => {
            return Err(ConsumeError::new("no_stream", e))
        }
        Err(e) => return Err(ConsumeError::new("subscribe", e)),
    };
    consumer
        .stream()
        .max_messages_per_batch(kind.options.concurrency)
        .heartbeat(CONSUMER_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| ConsumeError::new("subscribe", e))
}

async fn handle<C: Send + Sync + 'static>(
    ctx: Arc<C>,
    kind: &Kind<C>,
    sources: &HashMap<String, Source>,
    message: jetstream::Message,
) {
    let (delivered, published) = match message.info() {
        Ok(info) => (info.delivered, SystemTime::from(info.published)),
        Err(e) => {
            tracing::warn!(kind = %kind.name, error = %e, "a message without JetStream metadata; dropping it");
            return;
        }
    };
    let envelope: Envelope = match serde_json::from_slice(&message.payload) {
        Ok(envelope) => envelope,
        Err(e) => {
            // Nothing can ever run it: terminate rather than redeliver forever.
            tracing::error!(kind = %kind.name, error = %e, "an event that is not a job; terminating it");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let source = message.headers.as_ref().and_then(|h| h.get(SOURCE_HEADER)).map(|v| v.as_str().to_owned());
    let job = Job {
        id: envelope.id,
        kind: envelope.kind,
        aggregate_id: envelope.aggregate_id,
        payload: envelope.payload,
        traceparent: envelope.traceparent,
        attempt: i32::try_from(delivered).unwrap_or(i32::MAX),
        created_at: UNIX_EPOCH + Duration::from_millis(envelope.created_at_ms),
        ready_at: published,
        replays: 0,
    };
    let (id, attempt) = (job.id, job.attempt);
    let (outcome, span) = invoke(ctx, kind, job).await;
    let acked = match outcome {
        Ok(()) => {
            // Finished: its row leaves `relayed` (or, if the source is unknown, it would only be
            // relayed again after a loss of the stream, and run again: handlers are idempotent).
            if let Some(source) = source.as_deref().and_then(|s| sources.get(s)) {
                let _ = source.done.send(Finished::any_run(id));
            }
            message.ack().await
        }
        Err(error) if error.is_final(&kind.options, attempt) => {
            match record_dead(sources, source.as_deref(), id, &error.message, attempt).await {
                Ok(()) => message.ack_with(AckKind::Term).await,
                Err(e) => {
                    span.in_scope(|| tracing::warn!(error = %e, "could not record the dead job; retrying it"));
                    message.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await
                }
            }
        }
        Err(error) => message.ack_with(AckKind::Nak(Some(kind.options.retry_delay(attempt, &error)))).await,
    };
    if let Err(e) = acked {
        // Unacknowledged, the message comes back after its ack wait: at least once.
        span.in_scope(|| tracing::warn!(error = %e, "could not acknowledge the message"));
    }
}

/// Marks the job dead in the database it was relayed from (its row is there, `done` as relayed).
async fn record_dead(
    sources: &HashMap<String, Source>,
    source: Option<&str>,
    id: Uuid,
    error: &str,
    attempts: i32,
) -> Result<(), String> {
    let source = source.ok_or("the event does not name its database")?;
    let pool = &sources.get(source).ok_or_else(|| format!("no database named {source}"))?.pool;
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached(
            "UPDATE keel_jobs SET state = 'dead', attempts = $3, last_error = $2, finished_at = now(),
                 locked_until = NULL
             WHERE id = $1",
        )
        .await
        .map_err(|e| e.to_string())?;
    crate::execute_by_index(&client, &statement, &[&id, &error, &attempts]).await.map_err(|e| crate::db_error(&e))?;
    Ok(())
}
