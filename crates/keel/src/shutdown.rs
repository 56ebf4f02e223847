//! Stopping: one signal for the parts of a process that stop together (the API and the workers), and
//! the operating system's signals that start it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

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

    /// The flag itself, for loops that look at it between steps.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
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

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received Ctrl-C"),
        _ = term.recv() => tracing::info!("received SIGTERM"),
    }
}
