//! Waking runners after jobs are committed, without putting a `NOTIFY` in the enqueuing transaction.
//!
//! A transaction that sends `NOTIFY` takes one lock for the whole PostgreSQL cluster at commit
//! (notifications are queued in commit order) and holds it until its commit record is flushed. Every
//! transaction that enqueued a job used to notify (an insert trigger did), so all of them, on every
//! database of the cluster, committed one at a time, each waiting for its own disk flush: no group
//! commit, and checkouts queued on that lock (PostgreSQL's `Lock: object` wait on `COMMIT`).
//!
//! Instead the enqueuer commits first and then [`Waker::poke`]s: one task per database sends the
//! `NOTIFY` on a transaction of its own, with `synchronous_commit` off (a notification lost in a
//! server crash costs a runner's poll interval, nothing else). Pokes that arrive while a `NOTIFY` is
//! on its way are folded into one more, sent after it: every poke is followed by a `NOTIFY` that
//! started after it, and under load there is about one `NOTIFY` per round trip, not one per job.

use std::sync::{Arc, OnceLock};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;

/// Wakes the runners listening on one database (see the module's documentation). Cheap to clone;
/// the task that sends the notifications starts at the first poke and ends with the last clone.
#[derive(Clone)]
pub struct Waker {
    pool: Pool,
    sender: Arc<OnceLock<mpsc::Sender<()>>>,
}

impl Waker {
    pub fn new(pool: Pool) -> Waker {
        Waker { pool, sender: Arc::new(OnceLock::new()) }
    }

    /// Call after committing a transaction that enqueued jobs on this database. Never waits; must be
    /// called within a Tokio runtime.
    pub fn poke(&self) {
        let sender = self.sender.get_or_init(|| {
            // One slot: a poke made while one waits to be sent is already covered by it.
            let (sender, receiver) = mpsc::channel(1);
            tokio::spawn(notify_on_pokes(self.pool.clone(), receiver));
            sender
        });
        let _ = sender.try_send(());
    }
}

async fn notify_on_pokes(pool: Pool, mut pokes: mpsc::Receiver<()>) {
    while pokes.recv().await.is_some() {
        let sent = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL synchronous_commit TO off; NOTIFY {}; COMMIT",
                    crate::CHANNEL
                ))
                .await
                .map_err(|e| crate::db_error(&e))
        };
        if let Err(e) = sent.await {
            // The runners' polls find the jobs all the same, a poll interval later.
            metrics::counter!("keel_outbox_wake_failures_total").increment(1);
            tracing::debug!(error = %e, "could not notify the job runners; they will find the jobs by polling");
        }
    }
}
