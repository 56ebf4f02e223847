//! Building and running the HTTP application: `Application::build` binds the listener and assembles
//! the router; `run_until_stopped` serves until the shutdown future completes, then drains in-flight
//! requests for at most the configured time. `keel up`, `keel serve` and the tests all use this.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::consistency::Caches;
use crate::db::Databases;
use crate::http::auth::{digest, Digest32};
use crate::likes::LikeCounter;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Arc<Databases>,
    pub admin_token_digest: Digest32,
    pub config: Arc<Config>,
    /// This node's like counts, flushed by [`Application::run_until_stopped`].
    pub likes: Arc<LikeCounter>,
    /// This node's caches, one per cached kind of data.
    pub caches: Arc<Caches>,
}

pub struct Application {
    databases: Arc<Databases>,
    listener: TcpListener,
    router: Router,
    shutdown_timeout: Duration,
    config: Arc<Config>,
    likes: Arc<LikeCounter>,
}

impl Application {
    pub async fn build(config: Config, db: Databases, admin_token: &str) -> io::Result<Application> {
        crate::telemetry::init_metrics();
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {} (KEEL_LISTEN): {e}", config.listen)))?;
        let shutdown_timeout = config.shutdown_timeout;
        let databases = Arc::new(db);
        let config = Arc::new(config);
        let likes = Arc::new(LikeCounter::new());
        // The first merge before serving: a new node's first reads count the other nodes' likes.
        if let Err(e) = likes.merge_others(&databases.catalog).await {
            tracing::warn!(error = %e, "could not read the other nodes' like counts; the merger will retry");
        }
        let shared = Caches::shared_tier(&config).await.map_err(io::Error::other)?;
        let state = AppState {
            db: databases.clone(),
            admin_token_digest: digest(admin_token),
            config: config.clone(),
            likes: likes.clone(),
            caches: Arc::new(Caches::new(&config, shared)),
        };
        let router = crate::http::router(state);
        Ok(Application { databases, listener, router, shutdown_timeout, config, likes })
    }

    /// The databases this application serves, for workers running beside it.
    pub fn databases(&self) -> Arc<Databases> {
        self.databases.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes; then stops accepting, lets in-flight requests finish for
    /// up to the shutdown timeout, flushes the like counts, and returns.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let (served_tx, served_rx) = watch::channel(false);
        let served_signal = move || {
            let mut served_rx = served_rx.clone();
            async move {
                let _ = served_rx.wait_for(|served| *served).await;
            }
        };
        let catalog = self.databases.catalog.clone();
        let flusher = tokio::spawn(self.likes.clone().run_flusher(catalog.clone(), served_signal()));
        let merger = tokio::spawn(self.likes.clone().run_merger(catalog, served_signal()));
        let served = self.serve(shutdown).await;
        let _ = served_tx.send(true);
        let _ = flusher.await;
        let _ = merger.await;
        served
    }

    async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let (stopping_tx, mut stopping_rx) = watch::channel(false);
        let server = axum::serve(self.listener, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            let _ = stopping_tx.send(true);
        });
        let timeout = self.shutdown_timeout;
        let drain_deadline = async move {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            result = server => result,
            () = drain_deadline => {
                tracing::warn!(?timeout, "requests still in flight after the shutdown timeout; stopping anyway");
                Ok(())
            }
        }
    }
}

/// One shutdown signal for several parts of a process (the API and the workers): [`Stop::stopped`]
/// futures all complete once [`Stop::trigger`] is called.
#[derive(Clone)]
pub struct Stop {
    tx: Arc<watch::Sender<bool>>,
}

impl Stop {
    pub fn new() -> Stop {
        Stop { tx: Arc::new(watch::channel(false).0) }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}

impl Default for Stop {
    fn default() -> Stop {
        Stop::new()
    }
}

/// Serves the API and runs the workers in this process until Ctrl-C or SIGTERM; then both stop,
/// the API draining its requests and the workers finishing or releasing their jobs.
pub async fn serve_with_workers(app: Application) -> io::Result<()> {
    let stop = Stop::new();
    let workers = tokio::spawn(crate::jobs::run_workers(app.databases(), app.config.clone(), stop.stopped()));
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

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received Ctrl-C"),
        _ = term.recv() => tracing::info!("received SIGTERM"),
    }
}
