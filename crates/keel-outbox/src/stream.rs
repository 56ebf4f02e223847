//! NATS JetStream as the transport of events, for fleets where one database's queue should not be
//! what every worker polls.
//!
//! - The outbox stays where it is: events are still written on the caller's transaction. A
//!   [`Runner`] told to [`Runner::relay`] some kinds publishes their jobs to JetStream instead of
//!   running them (async publishes, at most `RELAY_IN_FLIGHT` unacknowledged per kind), and marks a
//!   job done once the stream acknowledged it. A crash between the two publishes again; the message
//!   id (job id and the time it became ready) lets JetStream drop that duplicate.
//! - A [`StreamRunner`] consumes each kind through a durable pull consumer with explicit acks and
//!   runs the same handlers as a [`Runner`] would. A failure is a negative ack with the kind's
//!   backoff (or the handler's `retry_in`); after the last attempt the job is recorded `dead` in its
//!   own database, where the queue statistics and [`crate::replay`] see it: a replay relays it again.
//!
//! Subjects are `<prefix>.events.<kind>` in one stream, `<PREFIX>_EVENTS`, with work-queue
//! retention: a message is gone once its consumer acknowledged it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer, context, stream, AckKind, ErrorCode};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::runner::{handler, invoke, lease, Handler, Kind, Registry};
use crate::{Job, JobError, KindOptions, Runner};

/// Unacknowledged publishes per relayed kind and database.
const RELAY_IN_FLIGHT: usize = 256;
/// The header naming the database an event came from, where its dead letter is recorded.
const SOURCE_HEADER: &str = "Keel-Source";

/// A connection to JetStream and the stream of one deployment's events.
#[derive(Clone)]
pub struct JetStream {
    context: jetstream::Context,
    prefix: String,
}

impl JetStream {
    /// Connects and makes sure the stream exists. `prefix` (letters, digits, `-`, `_`) names the
    /// subjects and the stream, so deployments (or tests) can share a server.
    pub async fn connect(url: &str, prefix: &str) -> Result<JetStream, String> {
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("{prefix:?} is not a subject prefix (letters, digits, '-' and '_')"));
        }
        let client = async_nats::connect(url).await.map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let context = jetstream::new(client);
        let js = JetStream { context, prefix: prefix.to_owned() };
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

    async fn publish(&self, source: &str, job: &Job) -> Result<(), String> {
        let ready_ms = millis(job.ready_at);
        let body = serde_json::to_vec(&Envelope::from(job)).map_err(|e| e.to_string())?;
        let message = PublishMessage::build()
            .payload(body.into())
            .message_id(format!("{}:{ready_ms}", job.id))
            .header(SOURCE_HEADER, source);
        let ack = self.context.send_publish(self.subject(&job.kind), message).await.map_err(|e| e.to_string())?;
        ack.await.map_err(|e| format!("JetStream did not acknowledge the event: {e}"))?;
        Ok(())
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
            max_attempts: i32::MAX,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            ..KindOptions::default()
        };
        for kind in kinds {
            let (js, source) = (js.clone(), source.to_owned());
            let publish: Handler<C> = handler(move |_ctx: Arc<C>, job: Job| {
                let (js, source) = (js.clone(), source.clone());
                async move { js.publish(&source, &job).await }
            });
            self = self.register_handler(kind, options.clone(), publish);
        }
        self
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
        let sources = Arc::new(self.sources);
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
    }
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

/// One kind's consumer: keeps a pull subscription open (re-opening it after errors) and runs up
/// to the kind's concurrency of handlers at once.
async fn consume<C: Send + Sync + 'static>(
    js: JetStream,
    ctx: Arc<C>,
    kind: Arc<Kind<C>>,
    sources: Arc<HashMap<String, Pool>>,
    shutdown_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(kind.options.concurrency));
    let mut running = JoinSet::new();
    while !*stop.borrow() {
        let mut messages = match subscribe(&js, &kind).await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(kind = %kind.name, error = %e, "cannot consume from JetStream; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        loop {
            // A slot first, then a message: a message is only taken when it can run at once.
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = stop.changed() => break,
            };
            let message = tokio::select! {
                message = messages.next() => message,
                _ = stop.changed() => break,
            };
            match message {
                Some(Ok(message)) => {
                    let (ctx, kind, sources) = (ctx.clone(), kind.clone(), sources.clone());
                    running.spawn(async move {
                        handle(ctx, &kind, &sources, message).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(kind = %kind.name, error = %e, "JetStream consumer error; resubscribing");
                    break;
                }
                None => break,
            }
            while running.try_join_next().is_some() {}
        }
    }
    let drained = tokio::time::timeout(shutdown_timeout, async { while running.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::warn!(kind = %kind.name, "handlers still running at shutdown; their messages will be redelivered");
        running.abort_all();
    }
}

async fn subscribe<C>(js: &JetStream, kind: &Kind<C>) -> Result<consumer::pull::Stream, String> {
    let stream = js.context.get_stream(js.stream_name()).await.map_err(|e| e.to_string())?;
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
    let consumer: consumer::PullConsumer = stream.create_consumer(config).await.map_err(|e| e.to_string())?;
    consumer.stream().max_messages_per_batch(kind.options.concurrency).messages().await.map_err(|e| e.to_string())
}

async fn handle<C: Send + Sync + 'static>(
    ctx: Arc<C>,
    kind: &Kind<C>,
    sources: &HashMap<String, Pool>,
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
    };
    let (id, attempt) = (job.id, job.attempt);
    let (outcome, span) = invoke(ctx, kind, job).await;
    let acked = match outcome {
        Ok(()) => message.ack().await,
        Err(error) if attempt >= kind.options.max_attempts => {
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
    sources: &HashMap<String, Pool>,
    source: Option<&str>,
    id: Uuid,
    error: &str,
    attempts: i32,
) -> Result<(), String> {
    let source = source.ok_or("the event does not name its database")?;
    let pool = sources.get(source).ok_or_else(|| format!("no database named {source}"))?;
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached(
            "UPDATE keel_jobs SET state = 'dead', attempts = $3, last_error = $2, finished_at = now(),
                 locked_until = NULL
             WHERE id = $1",
        )
        .await
        .map_err(|e| e.to_string())?;
    client.execute(&statement, &[&id, &error, &attempts]).await.map_err(|e| e.to_string())?;
    Ok(())
}
