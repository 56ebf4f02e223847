//! Building and running the HTTP application: `Application::build` binds the listener and assembles
//! the router ([`routes`]); `run_until_stopped` serves until the shutdown future completes, then
//! drains in-flight requests — and writes still finishing for clients that left — for at most the
//! configured time. `keel up`, `keel serve` and the tests all use this. Connections are accepted and
//! served by [`connections`]: header-read and idle timeouts, and a cap on open connections.

mod connections;
mod ops;
pub mod routes;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::consistency::DataKind;
use crate::db::Databases;
use crate::http::auth::revocations::{Alongside, Revocations};
use crate::http::auth::tokens::Keys;
use crate::http::auth::{AdminToken, Authenticator};
use crate::likes::LikeCounter;
use crate::shutdown::{shutdown_signal, Stop};
use crate::state::AppState;

pub struct Application {
    databases: Arc<Databases>,
    listener: TcpListener,
    router: Router,
    shutdown_timeout: Duration,
    connection_limits: connections::ConnectionLimits,
    config: Arc<Config>,
    likes: Arc<LikeCounter>,
    large_accounts: Arc<crate::feed::LargeAccounts>,
    revocations: Arc<Revocations>,
    /// Requests that may change state run as tasks of their own (see [`crate::http::middleware`]).
    writes: TaskTracker,
}

impl Application {
    pub async fn build(config: Config, db: Databases, admin_token: &str) -> io::Result<Application> {
        crate::telemetry::init_metrics();
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {} (KEEL_LISTEN): {e}", config.listen)))?;
        let shutdown_timeout = config.shutdown_timeout;
        let connection_limits = connections::ConnectionLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: connections::connection_cap(config.max_connections),
        };
        // Replicas and read counters: after the metrics recorder, before the first read.
        db.route_reads(&config).map_err(|e| io::Error::other(e.to_string()))?;
        let databases = Arc::new(db);
        // Shards added and buckets moved while this node runs are routed to at once.
        crate::db::shard_map::follow(&databases);
        let config = Arc::new(config);
        let shared = crate::state::shared_tier(&config).await.map_err(io::Error::other)?;
        let auth = authenticator(&config, &databases, &shared).await?;
        let revocations = auth.revocations.clone();
        let state = AppState::new(databases.clone(), config.clone(), AdminToken::new(admin_token), shared, auth);
        let likes = state.likes.clone();
        let large_accounts = state.large_accounts.clone();
        // The first merge before serving: a new node's first reads count every like.
        if let Err(e) = likes.merge_shards(&databases).await {
            tracing::warn!(error = %e, "could not read the like tallies; the merger will retry");
        }
        // The first count of the queues before serving: the first scrape has every queue's gauges.
        ops::refresh_queue_gauges_once(&databases).await;
        let writes = TaskTracker::new();
        let router = routes::router(state, writes.clone());
        Ok(Application {
            databases,
            listener,
            router,
            shutdown_timeout,
            connection_limits,
            config,
            likes,
            large_accounts,
            revocations,
            writes,
        })
    }

    /// The databases this application serves: the API's pools (workers beside it have their own, see
    /// [`serve_with_workers`]).
    pub fn databases(&self) -> Arc<Databases> {
        self.databases.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes; then stops accepting, and lets in-flight requests and
    /// writes finish for up to the shutdown timeout.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let (served_tx, served_rx) = watch::channel(false);
        let served_signal = move || {
            let mut served_rx = served_rx.clone();
            async move {
                let _ = served_rx.wait_for(|served| *served).await;
            }
        };
        // Under a connection budget (many shards), the like tallies are merged on the visits that
        // poll each shard's revoked sessions, one connection for both; otherwise on their own.
        let (merger, alongside) = match crate::db::budget::get() {
            None => (Some(tokio::spawn(self.likes.clone().run_merger(self.databases.clone(), served_signal()))), None),
            Some(_) => {
                let likes = self.likes.clone();
                let merge = Alongside::new(crate::likes::MERGE_INTERVAL_MANY_SHARDS, move |shard| {
                    let likes = likes.clone();
                    async move { likes.merge_one_shard(&shard).await }
                });
                (None, Some(merge))
            }
        };
        let gauges = tokio::spawn(ops::refresh_queue_gauges(self.databases.clone(), served_signal()));
        let large_accounts = tokio::spawn(self.large_accounts.clone().run(self.databases.clone(), served_signal()));
        let revocations =
            tokio::spawn(self.revocations.clone().run(self.databases.clone(), served_signal(), alongside));
        let served = self.serve(shutdown).await;
        let _ = served_tx.send(true);
        if let Some(merger) = merger {
            let _ = merger.await;
        }
        let _ = gauges.await;
        let _ = large_accounts.await;
        let _ = revocations.await;
        served
    }

    async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let (stopping_tx, stopping_rx) = watch::channel(false);
        let connections = TaskTracker::new();
        // Accepts until stopping; the listener is closed when it returns, so no new connection waits.
        let accepting =
            connections::accept(self.listener, self.router, self.connection_limits, &connections, stopping_rx);
        let signal = async {
            shutdown.await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            stopping_tx.send_replace(true);
        };
        tokio::join!(accepting, signal);
        // Connections drain first (each finishes the request it is handling, then closes); then the
        // writes whose clients left before their answer.
        let writes = self.writes;
        let drained = async move {
            connections.close();
            connections.wait().await;
            writes.close();
            writes.wait().await;
        };
        let timeout = self.shutdown_timeout;
        tokio::select! {
            () = drained => Ok(()),
            () = tokio::time::sleep(timeout) => {
                tracing::warn!(?timeout, "requests still in flight after the shutdown timeout; stopping anyway");
                Ok(())
            }
        }
    }
}

/// The token checker: the configured keys, and the revoked sessions read from every shard before
/// the node serves (a shard that does not answer is polled again; until then its users' tokens are
/// refused with 503).
async fn authenticator(
    config: &Config,
    databases: &Arc<Databases>,
    shared: &Option<Arc<keel_cache::Shared>>,
) -> io::Result<Arc<Authenticator>> {
    let keys = Keys::new(config.token_keys.clone()).map_err(|e| {
        io::Error::other(format!("KEEL_TOKEN_KEYS: {e} (`keel up` makes one; `keel serve` needs it set)"))
    })?;
    let shards = databases.shards().all().count();
    let revocations =
        Revocations::new(shards, config.budget(DataKind::Session), config.access_token_ttl, shared.clone());
    if !revocations.poll(databases, revocations.startup_lookback()).await {
        tracing::warn!("a shard's revoked sessions could not be read; its users' tokens wait until they can");
    }
    Ok(Arc::new(Authenticator { keys, revocations, db: databases.clone() }))
}

/// Serves the API and runs the workers in this process until Ctrl-C or SIGTERM; then both stop,
/// the API draining its requests and the workers finishing or releasing their jobs.
///
/// `workers` are the workers' own pools ([`crate::jobs::open_databases`]), not the application's: a
/// backlog of jobs whose handlers hold connections (waiting on a lock, a slow statement) would
/// otherwise take every connection of a database, and requests would wait for one until their 503.
pub async fn serve_with_workers(app: Application, workers: Databases) -> io::Result<()> {
    let stop = Stop::new();
    let workers = tokio::spawn(crate::jobs::run_workers(Arc::new(workers), app.config.clone(), stop.stopped()));
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.trigger();
    });
    let served = app.run_until_stopped(stop.stopped()).await;
    stop.trigger();
    if let Ok(Err(e)) = workers.await {
        tracing::error!(error = %e, "the workers could not start");
    }
    served
}
