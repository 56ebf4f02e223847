//! A database that stops answering is failed fast: a watchdog per database, and a breaker that
//! [`Db::client`](super::Db::client) reads with one atomic load.
//!
//! TCP keepalives and `tcp_user_timeout` ([`super::DEAD_PEER`]) catch a peer whose kernel stopped
//! answering. They cannot catch a server whose processes stopped while its kernel still acknowledges
//! every packet (a frozen or SIGSTOPped backend, a VM paused mid-query, a backend stuck in
//! uninterruptible I/O): its connections look healthy and a query on them waits forever. Without this
//! module every request for such a database takes one of its pooled connections and hangs until the
//! request timeout, and once all of them are taken, waits [`POOL_WAIT_TIMEOUT`](super) for one.
//!
//! The watchdog sends `SELECT 1` on a connection of its own (outside the pool, so a busy pool is
//! never taken for a dead server) every [`PROBE_EVERY`]. When a probe gets no answer within
//! [`PROBE_TIMEOUT`], the database is **down**: every connection made until then is condemned (idle
//! ones are closed at once; one in use is closed when it comes back, instead of being handed out
//! again), and `Db::client()` fails at once with a 503 (`Retry-After: 1`). Probes then run on fresh
//! connections; after [`UP_AFTER`] answered in a row the database is **up** again and requests get
//! fresh connections. A probe that fails with an error (connection refused, closed by a restart) does
//! not open the breaker: requests then fail just as fast on their own, and a restart must not cost
//! a second of 503s once the server is back.
//!
//! No client-side deadline on each statement: a statement on a live server is bounded there by
//! `statement_timeout`, and one on a server that stopped answering is bounded by the request timeout
//! (jobs: the job timeout), which drops it; from at most `PROBE_EVERY + PROBE_TIMEOUT` after the
//! server stopped, no new request is handed one of its connections. A client deadline would have to
//! be longer than `statement_timeout` not to cut legitimate statements short, and so would add nothing.
//!
//! Under a process-wide connection budget ([`super::budget`], `keel up` with many shards), a watchdog
//! probes only while its pool has a connection handed out (or the database is down), and closes its
//! own connection otherwise: a request's connection is what can hang, so a freeze is still noticed
//! within `PROBE_EVERY + PROBE_TIMEOUT` of the first request caught by it, while an idle database
//! costs no connection. A probe's connection then also takes one of the budget's few probe slots
//! (`budget::probe_slot`); with none free, the probe waits for the next tick.
//!
//! Timings are constants, not settings: they are the same in tests and in production, and what they
//! trade off (detection in ~3 s against one `SELECT 1` a second per database) suits any deployment.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, WeakPool};
use tokio_postgres::{Client, Config};

/// How often each database is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe (connecting, when it must, and `SELECT 1`) may take before the database counts
/// as not answering: far above a healthy server's answer even under heavy load (a simple query
/// waits for no lock), short enough that requests fail fast within seconds of a server freezing.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Probes answered in a row, after being down, before requests are let through again: one answer
/// might come from a server that is only briefly back.
pub const UP_AFTER: u32 = 2;

/// The breaker of one database's pool.
pub(crate) struct Health {
    down: AtomicBool,
    /// Connections made before this instant (nanoseconds after `base`) are never handed out again.
    condemned_before: AtomicU64,
    base: Instant,
}

impl Health {
    pub(crate) fn new() -> Arc<Health> {
        Arc::new(Health { down: AtomicBool::new(false), condemned_before: AtomicU64::new(0), base: Instant::now() })
    }

    /// The hot path: one relaxed load.
    #[inline]
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Whether a connection made at `created` was made before the database last went down.
    pub(crate) fn condemns(&self, created: Instant) -> bool {
        let made = created.saturating_duration_since(self.base).as_nanos() as u64;
        made < self.condemned_before.load(Ordering::Relaxed)
    }

    fn go_down(&self) {
        let now = self.base.elapsed().as_nanos() as u64;
        self.condemned_before.fetch_max(now.max(1), Ordering::Relaxed);
        self.down.store(true, Ordering::Relaxed);
    }

    fn go_up(&self) {
        self.down.store(false, Ordering::Relaxed);
    }
}

/// The watchdog's own connection.
struct Probe {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    /// Under a connection budget, this probe's place among the process's connections.
    _slot: Option<super::budget::ProbeSlot>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        // A connection to a stopped server may never finish closing: stop polling it.
        self.connection.abort();
    }
}

/// Probes database `name` until its pool and breaker are gone.
pub(crate) async fn watch(
    name: String,
    config: Config,
    tls: keel_pgtls::Connector,
    health: Weak<Health>,
    pool: WeakPool,
) {
    let up = metrics::gauge!("keel_db_up", "db" => name.clone());
    let mut probe: Option<Probe> = None;
    let mut answered_in_a_row = 0u32;
    // Under a connection budget, a watchdog keeping a connection of its own to every database would
    // be most of the budget with many shards ([`super::budget`]).
    let budgeted = super::budget::get().is_some();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(health) = health.upgrade() else { return };
        if budgeted && !health.is_down() && !in_use(&pool) {
            // Nothing of this pool's can hang on the server: no probe, and no connection kept for one.
            probe = None;
            continue;
        }
        let slot = match &probe {
            Some(_) => None,
            None => match super::budget::probe_slot(health.is_down()) {
                Ok(slot) => slot,
                Err(super::budget::NoProbeSlot) => continue,
            },
        };
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, probe_once(&mut probe, &config, &tls, slot)).await;
        match outcome {
            Ok(Ok(())) => {
                answered_in_a_row = answered_in_a_row.saturating_add(1);
                if health.is_down() && answered_in_a_row >= UP_AFTER {
                    health.go_up();
                    tracing::warn!(db = %name, "the database answers again: requests for it are served");
                }
            }
            Ok(Err(error)) => {
                // Refused or closed: requests fail as fast on their own; try a fresh connection next.
                answered_in_a_row = 0;
                probe = None;
                tracing::debug!(db = %name, %error, "database probe failed");
            }
            Err(_elapsed) => {
                answered_in_a_row = 0;
                probe = None;
                if !health.is_down() {
                    health.go_down();
                    if let Some(pool) = pool.upgrade() {
                        close_condemned(&pool, &health);
                    }
                    metrics::counter!("keel_db_down_total", "db" => name.clone()).increment(1);
                    tracing::error!(
                        db = %name,
                        timeout = ?PROBE_TIMEOUT,
                        "the database does not answer: requests for it get 503 until it does, and its \
                         current connections are not used again"
                    );
                }
            }
        }
        // Set after every probe, not only on a change: another pool of the same database (workers')
        // writes the same series, and a scrape sees the state as of the last second either way.
        up.set(if health.is_down() { 0.0 } else { 1.0 });
    }
}

async fn probe_once(
    probe: &mut Option<Probe>,
    config: &Config,
    tls: &keel_pgtls::Connector,
    slot: Option<super::budget::ProbeSlot>,
) -> Result<(), String> {
    if probe.is_none() {
        let (client, connection) = config.connect(tls.clone()).await.map_err(|e| e.to_string())?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        *probe = Some(Probe { client, connection, _slot: slot });
    }
    let client = &probe.as_ref().expect("connected above").client;
    client.simple_query("SELECT 1").await.map(drop).map_err(|e| e.to_string())
}

/// Whether some connection of the pool is handed out: only such a connection can be waiting on a
/// server that stopped answering (an idle one is refused by the pre-recycle hook once the breaker
/// opens, and a new one is refused by `Db::client()`).
fn in_use(pool: &WeakPool) -> bool {
    pool.upgrade().is_some_and(|pool| {
        let status = pool.status();
        status.size > status.available
    })
}

/// Closes the idle connections the breaker condemned (those in use are refused on their return, by
/// the pool's pre-recycle hook).
fn close_condemned(pool: &Pool, health: &Health) {
    pool.retain(|_, metrics| !health.condemns(metrics.created));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn going_down_condemns_the_connections_made_until_then() {
        let health = Health::new();
        let before = Instant::now();
        assert!(!health.is_down());
        assert!(!health.condemns(before), "nothing is condemned before the database first goes down");
        std::thread::sleep(Duration::from_millis(2));
        health.go_down();
        let after = Instant::now();
        assert!(health.is_down());
        assert!(health.condemns(before));
        assert!(!health.condemns(after), "connections made after the fall are fresh");
        health.go_up();
        assert!(!health.is_down());
        assert!(health.condemns(before), "condemned connections stay condemned");
    }
}
