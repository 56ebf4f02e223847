//! Background work: one `keel-outbox` runner per database (the catalogue and every shard), with the
//! handlers of every job kind. `keel up` runs them beside the API; `keel worker` runs only them.
//!
//! | database  | job kind                                   | handler                                |
//! |-----------|--------------------------------------------|----------------------------------------|
//! | shard     | `order.placed`                             | the checkout saga ([`saga`])           |
//! | shard     | `user.registered`, `order.confirmed`, `order.failed` | webhooks fan-out, e-mail ([`reactions`]) |
//! | shard     | `account.code_issued`                      | e-mail ([`email::send_for`])           |
//! | shard     | `user.erasure`, `user.deleted`             | erasure, webhooks fan-out ([`erasure`]) |
//! | shard     | `follow.changed`, `follow.follower_erased` | the followed user's side ([`crate::feed::follows`]) |
//! | shard     | `activity.posted`, `activity.withdrawn`    | feed fan-out ([`crate::feed::fanout`]) |
//! | catalogue | `product.created`, `.updated`, `.stock_changed` | search index, webhooks fan-out    |
//! | catalogue | `webhook.deliver`                          | one delivery ([`crate::webhooks::delivery`]) |
//!
//! With `KEEL_NATS_URL` set, the event kinds are relayed from these queues to JetStream and run by
//! its consumers instead, with the same handlers; webhook deliveries stay on the catalogue's queue.

pub mod maintenance;
pub mod reactions;
pub mod reconcile;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::accounts::erasure::{self, Erasure, UserDeleted};
use crate::carts::CartCache;
use crate::config::Config;
use crate::db::{ConnectError, Databases, PoolOptions};
use crate::email;
use crate::events::{
    ActivityPosted, ActivityWithdrawn, CodeIssued, Event, FollowChanged, FollowerErased, OrderConfirmed, OrderFailed,
    OrderPlaced, Ping, ProductCreated, ProductStockChanged, ProductUpdated, UserRegistered,
};
use crate::orders::saga;
use crate::shutdown::Stop;
use crate::webhooks::{self, delivery::Deliverer};
use keel_outbox::{JetStream, Job, JobError, KindOptions, Registry, Runner, StreamRunner};

/// What handlers can reach.
pub struct JobContext {
    pub db: Arc<Databases>,
    pub email: email::Sender,
    pub deliverer: Deliverer,
    /// The carts' cache, to drop a cart a confirmed order emptied (carts live in the shared tier).
    pub carts: CartCache,
    /// How the checkout saga runs (its lock timeout).
    pub saga: saga::Settings,
    /// The profiles' cache, to drop an erased user's profile on every node and in Redis.
    pub profiles: crate::users::ProfileCache,
    /// The feed's fan-out limit and stored length.
    pub feed: crate::feed::Settings,
}

impl JobContext {
    pub async fn new(db: Arc<Databases>, config: &Config) -> Result<JobContext, String> {
        let shared = crate::state::shared_tier(config).await?;
        Ok(JobContext {
            db,
            email: email::Sender::from_config(config)?,
            deliverer: Deliverer::new(webhooks::policy(config), config.webhook_retry_schedule.clone()),
            carts: crate::carts::cart_cache(config, &shared),
            saga: saga::Settings::from_config(config),
            profiles: crate::state::cache(config, crate::consistency::DataKind::Profile, &shared),
            feed: crate::feed::Settings::from_config(config),
        })
    }
}

/// Options for the checkout saga: quick retries, since its failures are transient (a database
/// restart, a lock held); refusals (no stock, no money) are outcomes, not failures. Never dead: an
/// accepted order must be decided, however long its databases are away (it used to be dead after 20
/// attempts, minutes of an outage, leaving the order pending and its stock held). The backoff stops
/// growing at `KEEL_SAGA_BACKOFF_MAX`, so an order is decided at most that long after the outage.
fn saga_options(timeout: Duration, backoff_max: Duration) -> KindOptions {
    KindOptions {
        timeout,
        concurrency: 16,
        backoff_base: Duration::from_millis(100),
        backoff_max,
        ..KindOptions::default()
    }
    .retry_forever()
}

/// User and order events: their e-mail waits for the mail server for up to about a day
/// (backoff doubling from 1 s to 10 min, 150 attempts).
fn user_event_options(timeout: Duration) -> KindOptions {
    KindOptions {
        timeout,
        // At most a pool's worth of e-mails and fan-outs at once: the other kinds keep connections.
        concurrency: 16,
        max_attempts: 150,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(600),
        ..KindOptions::default()
    }
}

/// Product events: database work only, retried quickly.
fn product_event_options(timeout: Duration) -> KindOptions {
    KindOptions {
        timeout,
        concurrency: 16,
        max_attempts: 20,
        backoff_base: Duration::from_millis(200),
        ..KindOptions::default()
    }
}

/// Follows and the feed's fan-out: database work only. Quick retries (a failure is a database away
/// or a bucket moving), and many of them: a follow whose other side is never written would leave the
/// two sides disagreeing, and a fan-out never run an activity missing from feeds.
fn feed_options(timeout: Duration) -> KindOptions {
    KindOptions {
        timeout,
        concurrency: 16,
        max_attempts: 100,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(60),
        ..KindOptions::default()
    }
}

/// Webhook deliveries: the schedule is the handler's; at most 16 at once per endpoint, so a slow
/// endpoint holds 16 of the 64 slots and the others keep flowing.
fn delivery_options(deliverer: &Deliverer) -> KindOptions {
    KindOptions {
        timeout: webhooks::delivery::REQUEST_TIMEOUT + Duration::from_secs(5),
        max_attempts: deliverer.max_attempts(),
        group_concurrency: Some(webhooks::PER_ENDPOINT_CONCURRENCY),
        ..KindOptions::default()
    }
}

/// The events written on a shard, and on the catalogue. Scaled out, these travel through JetStream.
const SHARD_EVENTS: &[&str] = &[
    OrderPlaced::NAME,
    UserRegistered::NAME,
    OrderConfirmed::NAME,
    OrderFailed::NAME,
    Ping::NAME,
    CodeIssued::NAME,
    Erasure::NAME,
    UserDeleted::NAME,
    FollowChanged::NAME,
    ActivityPosted::NAME,
    ActivityWithdrawn::NAME,
    FollowerErased::NAME,
];
const CATALOG_EVENTS: &[&str] = &[ProductCreated::NAME, ProductUpdated::NAME, ProductStockChanged::NAME];

/// How long the event kinds' runs may take, and the saga's backoff cap.
#[derive(Clone, Copy)]
struct EventOptions {
    timeout: Duration,
    saga_backoff_max: Duration,
}

impl EventOptions {
    fn from_config(config: &Config) -> EventOptions {
        EventOptions { timeout: config.job_timeout, saga_backoff_max: config.saga_backoff_max }
    }
}

/// The handlers of every event, on whichever transport carries them.
fn register_event_handlers<R: Registry<JobContext>>(registry: R, options: EventOptions) -> R {
    let EventOptions { timeout, saga_backoff_max } = options;
    let mut registry = registry
        .register(OrderPlaced::NAME, saga_options(timeout, saga_backoff_max), |ctx, job| async move {
            saga::run(&ctx.db, &ctx.carts, &ctx.saga, &job).await
        })
        // No-op jobs, what `make bench` measures the queue by (S4, and S4-peer against
        // graphile-worker, whose local queue holds 1,000 or 5,000 there): 64 run at once, 5,000
        // more held ahead. Bursts of 50,000 drained at ~37,000/s with 1,000 held, ~43,000/s with 5,000.
        .register(Ping::NAME, KindOptions { prefetch: 5000, ..KindOptions::default() }, |_, _| async {
            Ok::<(), JobError>(())
        })
        .register(Erasure::NAME, erasure::options(timeout), |ctx, job| async move {
            erasure::erase(&ctx.db, erasure::Caches { profiles: &ctx.profiles, carts: &ctx.carts }, &job).await
        })
        .register(UserDeleted::NAME, user_event_options(timeout), |ctx, job| async move {
            erasure::tell_subscribers(&ctx.db.catalog, &job).await
        });
    for kind in [UserRegistered::NAME, OrderConfirmed::NAME, OrderFailed::NAME] {
        registry = registry.register(kind, user_event_options(timeout), |ctx, job| async move {
            reactions::on_user_event(&ctx, &job).await
        });
    }
    // An e-mailed secret: internal, so no webhook fan-out, only its e-mail.
    registry = registry.register(CodeIssued::NAME, user_event_options(timeout), |ctx, job| async move {
        email::send_for(&ctx.db, &ctx.email, &job).await
    });
    // The social graph and the feed: database work only, retried quickly and for long.
    registry = registry
        .register(FollowChanged::NAME, feed_options(timeout), |ctx, job| async move {
            crate::feed::follows::apply(&ctx.db, ctx.feed, &job).await
        })
        .register(ActivityPosted::NAME, feed_options(timeout), |ctx, job| async move {
            crate::feed::fanout::on_posted(&ctx.db, ctx.feed, &job).await
        })
        .register(ActivityWithdrawn::NAME, feed_options(timeout), |ctx, job| async move {
            crate::feed::fanout::on_withdrawn(&ctx.db, &job).await
        })
        .register(FollowerErased::NAME, feed_options(timeout), |ctx, job| async move {
            crate::feed::follows::forget_erased_follower(&ctx.db, &job).await
        });
    for kind in CATALOG_EVENTS {
        registry = registry.register(kind, product_event_options(timeout), |ctx, job| async move {
            reactions::on_catalog_event(&ctx, &job).await
        });
    }
    registry
}

/// The handler of webhook deliveries, which always run from the catalogue's queue.
fn register_deliveries<R: Registry<JobContext>>(registry: R, options: KindOptions) -> R {
    registry.register(webhooks::DELIVER, options, |ctx, job| async move {
        webhooks::delivery::run(&ctx.db.catalog, &ctx.deliverer, &job).await
    })
}

/// A registry that keeps only the names of the kinds registered on it: the list of every kind is
/// taken from the registration itself, so it cannot drift from it.
#[derive(Default)]
struct KindNames(Vec<String>);

impl Registry<JobContext> for KindNames {
    fn register<F, Fut, E>(mut self, kind: &str, _: KindOptions, _: F) -> Self
    where
        F: Fn(Arc<JobContext>, Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<JobError> + 'static,
    {
        self.0.push(kind.to_owned());
        self
    }
}

/// Every job kind this application has a handler for, on any database and transport, sorted: the
/// kinds the queue statistics and gauges report from the start, at zero until a job of theirs waits.
pub fn kinds() -> &'static [String] {
    static KINDS: OnceLock<Vec<String>> = OnceLock::new();
    KINDS.get_or_init(|| {
        let options = EventOptions { timeout: Duration::ZERO, saga_backoff_max: Duration::ZERO };
        let registry = register_event_handlers(KindNames::default(), options);
        let KindNames(mut names) = register_deliveries(registry, KindOptions::default());
        names.sort();
        names.dedup();
        names
    })
}

/// How the workers' pools are built: `KEEL_WORKER_POOL_SIZE` connections per database, with the
/// statement timeout of every pool (`KEEL_STATEMENT_TIMEOUT`).
pub fn pool_options(config: &Config) -> PoolOptions {
    PoolOptions { size: config.worker_pool_size, ..PoolOptions::from(config) }
}

/// The workers' own pools, one per database: a process that serves the API too (`keel up`) gives its
/// workers these, never the API's. A backlog of jobs then holds at most `KEEL_WORKER_POOL_SIZE`
/// connections per database while the API keeps its `KEEL_DB_POOL_SIZE`: handlers outnumber
/// connections (every kind has slots of its own), and on a shared pool a backlog whose handlers hold
/// their connection a while (a lock wait, a slow statement) left requests waiting for one until
/// their 503.
pub async fn open_databases(
    catalog_url: &str,
    shard_urls: &[String],
    config: &Config,
) -> Result<Databases, ConnectError> {
    // Under a connection budget (many shards), these are background pools: together they keep at
    // most part of the process's connections, the rest being the API's.
    crate::db::budget::background_pools(Databases::open(catalog_url, shard_urls, pool_options(config))).await
}

/// Under a connection budget: how often a shard's queue is checked for ready jobs, and how often
/// each kind still claims on its own (a check that failed is made up for by the next one). The
/// shards' runners start one after another over the first check's interval, so that their checks
/// and claims do not all come at once (100 shards: 100 checks and 800 claims in the same instant,
/// every time).
const QUIET_READY_CHECK: Duration = Duration::from_secs(5);
const QUIET_POLL: Duration = Duration::from_secs(60);

/// Runs every job kind on every database until `shutdown` completes; running jobs then get the
/// runners' shutdown timeout to finish before they are released to another worker. `db` should be
/// the workers' own pools ([`open_databases`]), never an API's.
///
/// Events run from their database's queue, or, with `KEEL_NATS_URL`, are relayed from it to
/// JetStream and run from there. Webhook deliveries always run from the catalogue's queue: they
/// are per-endpoint work with their own schedule, not events.
pub async fn run_workers(
    db: Arc<Databases>,
    config: Arc<Config>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let stop = Stop::new();
    let context = Arc::new(JobContext::new(db.clone(), &config).await?);
    let events = EventOptions::from_config(&config);
    let jetstream = match &config.nats_url {
        Some(url) => {
            Some(JetStream::connect(url, &config.nats_prefix).await.map_err(|e| format!("KEEL_NATS_URL: {e}"))?)
        }
        None => None,
    };
    let mut runners = tokio::task::JoinSet::new();
    // Under a connection budget (many shards, `crate::db::budget`), a shard's queue has no `LISTEN`
    // connection of its own and its kinds do not each poll every second: one statement looks for
    // every kind's ready jobs every few seconds. New jobs on a shard then wait up to that long.
    let quiet_shards = crate::db::budget::get().is_some();
    let spawn_runner = |runners: &mut tokio::task::JoinSet<()>,
                        db: &crate::db::Db,
                        shard: bool,
                        delay: Duration,
                        build: &dyn Fn(Runner<JobContext>) -> Runner<JobContext>| {
        let runner = if shard && quiet_shards {
            Runner::new(db.pool().clone(), None, context.clone())
                .check_ready_every(QUIET_READY_CHECK)
                .poll_interval(QUIET_POLL)
        } else {
            Runner::new(db.pool().clone(), Some(db.url().to_owned()), context.clone())
        };
        let runner = build(runner);
        let (stopped, name) = (stop.stopped(), db.name().to_owned());
        let stopped_early = stop.stopped();
        runners.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped_early => return,
                }
            }
            tracing::info!(db = %name, "worker started");
            runner.run(stopped).await;
        });
    };
    let deliveries = |runner: Runner<JobContext>| register_deliveries(runner, delivery_options(&context.deliverer));
    let retention = maintenance::Retention::from_config(&config);
    // The reconciler of orders pending too long: on each shard, and of reservations held too long, in
    // the catalogue.
    let reconciling = reconcile::Reconciler::from_config(&config);
    // Everything that runs per shard: its queue (run here, or relayed to JetStream), its
    // maintenance and its reconciler. For the shards there are at start, and for each added later.
    let start_shard = |runners: &mut tokio::task::JoinSet<()>, shard: &crate::db::Db, delay: Duration| {
        match &jetstream {
            None => spawn_runner(runners, shard, true, delay, &|runner| register_event_handlers(runner, events)),
            Some(js) => {
                spawn_runner(runners, shard, true, delay, &|runner| runner.relay(js, shard.name(), SHARD_EVENTS))
            }
        }
        runners.spawn(maintenance::scheduler(shard, context.clone(), retention, context.feed).run(stop.stopped()));
        runners.spawn(reconciling.shard_scheduler(shard, context.clone()).run(stop.stopped()));
    };
    // Shards added while running get workers of their own (below), on this process's own pools.
    crate::db::shard_map::follow(&db);
    let mut started: Vec<keel_shard::ShardId> = Vec::new();
    let mut map_changes = db.map_changes();
    let shards = db.shards();
    let count = shards.all().count().max(1) as u32;
    for (k, (n, shard)) in (0u32..).zip(shards.all()) {
        let delay = if quiet_shards { QUIET_READY_CHECK * k / count } else { Duration::ZERO };
        start_shard(&mut runners, shard, delay);
        started.push(n);
    }
    drop(shards);
    match &jetstream {
        None => spawn_runner(&mut runners, &db.catalog, false, Duration::ZERO, &|runner| {
            register_event_handlers(deliveries(runner), events)
        }),
        Some(js) => spawn_runner(&mut runners, &db.catalog, false, Duration::ZERO, &|runner| {
            deliveries(runner).relay(js, db.catalog.name(), CATALOG_EVENTS)
        }),
    }
    runners.spawn(maintenance::catalog_scheduler(&db.catalog, context.clone(), retention).run(stop.stopped()));
    // Bucket moves, carried out by one worker process at a time.
    runners.spawn(crate::db::moves::drive(db.clone(), stop.watch()));
    runners.spawn(reconciling.catalog_scheduler(&db.catalog, context.clone()).run(stop.stopped()));
    // The JetStream consumers know the databases events come from (to record them done there):
    // started again, with the new shard among them, when a shard is added.
    let mut consumers: Option<(Stop, tokio::task::JoinHandle<()>)> = None;
    let start_consumers = |js: &JetStream| {
        let mut consumer = StreamRunner::new(js.clone(), context.clone());
        for source in db.all() {
            consumer = consumer.source(source.name(), source.pool().clone());
        }
        let consumer = register_event_handlers(consumer, events);
        let own = Stop::new();
        let stopped = own.stopped();
        let task = tokio::spawn(async move {
            tracing::info!("JetStream consumers started");
            consumer.run(stopped).await;
        });
        (own, task)
    };
    if let Some(js) = &jetstream {
        consumers = Some(start_consumers(js));
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = map_changes.changed() => {
                if changed.is_err() {
                    continue;
                }
                let added: Vec<_> =
                    db.shards().all().filter(|(n, _)| !started.contains(n)).map(|(n, d)| (n, d.clone())).collect();
                if added.is_empty() {
                    continue;
                }
                for (n, shard) in added {
                    tracing::info!(shard = n, "workers started for a new shard");
                    start_shard(&mut runners, &shard, Duration::ZERO);
                    started.push(n);
                }
                if let (Some(js), Some((own, task))) = (&jetstream, consumers.take()) {
                    own.trigger();
                    let _ = task.await;
                    consumers = Some(start_consumers(js));
                }
            }
        }
    }
    stop.trigger();
    if let Some((own, task)) = consumers {
        own.trigger();
        let _ = task.await;
    }
    while runners.join_next().await.is_some() {}
    tracing::info!("workers stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_with_a_handler_is_listed_once_and_every_relayed_kind_has_one() {
        let kinds = kinds();
        assert!(kinds.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates: {kinds:?}");
        for kind in SHARD_EVENTS.iter().chain(CATALOG_EVENTS).chain([&webhooks::DELIVER]) {
            assert!(kinds.iter().any(|k| k == kind), "{kind} is not listed in {kinds:?}");
        }
        assert_eq!(kinds.len(), SHARD_EVENTS.len() + CATALOG_EVENTS.len() + 1, "{kinds:?}");
    }
}
