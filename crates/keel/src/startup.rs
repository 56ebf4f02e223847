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
use crate::db::Databases;
use crate::http::auth::{digest, Digest32};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Arc<Databases>,
    pub admin_token_digest: Digest32,
    pub config: Arc<Config>,
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    shutdown_timeout: Duration,
}

impl Application {
    pub async fn build(config: Config, db: Databases, admin_token: &str) -> io::Result<Application> {
        crate::telemetry::init_metrics();
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {} (KEEL_LISTEN): {e}", config.listen)))?;
        let shutdown_timeout = config.shutdown_timeout;
        let state = AppState { db: Arc::new(db), admin_token_digest: digest(admin_token), config: Arc::new(config) };
        Ok(Application { listener, router: crate::http::router(state), shutdown_timeout })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes; then stops accepting, lets in-flight requests finish for
    /// up to the shutdown timeout, and returns.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
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

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received Ctrl-C"),
        _ = term.recv() => tracing::info!("received SIGTERM"),
    }
}
