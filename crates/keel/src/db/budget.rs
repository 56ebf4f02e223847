//! A process-wide budget of connections, for a process with many shards (`keel up --shards 100`):
//! one pool per database and role keeps up to its size of connections for ever, so a process with
//! 100 shards held some 1,500 connections while idle, far past PostgreSQL's default
//! `max_connections` of 100.
//!
//! With a budget set ([`set`], once per process, before the pools are built), every pool built
//! afterwards opens its connections through [`Connect`], and each connection holds one of the
//! budget's [`Budget::permits`] from before it opens until it closes, whoever closes it. So the
//! pools of the process (API and workers, catalogue and every shard) never have more connections
//! open together than that, at any moment, bursts included:
//! - A pool that needs a connection while every permit is held closes an idle connection of any
//!   pool for it ([`closing_order`]); the permit comes back once that one is closed. If none is
//!   idle, it waits its turn: every [`WAIT_STEP`], while pools wait, one task closes idle
//!   connections (given back to their pools since), as many as are waiting, at most
//!   [`CLOSE_PER_STEP`]. The pool's `create_timeout` bounds the wait, as it bounds connecting.
//! - A fan-out over every shard (`GET /v1/admin/stats`, `GET /v1/admin/shards`) therefore goes as
//!   fast as permits come back instead of opening a connection to every shard at once.
//! - The workers' pools are background ones ([`background_pools`]): together they hold at most
//!   [`Budget::background_permits`], half, so that a backlog of jobs can never take the
//!   connections the API's requests need (what separate pools ensured before one budget).
//! - A reaper closes the connections idle for [`IDLE_TIMEOUT`], every [`REAP_EVERY`].
//!
//! Outside the pools, and so outside the permits:
//! - the health watchdogs' probes (`db::health`): under a budget a watchdog probes only while its
//!   pool has a connection handed out (or its database is down), and its probe's connection takes
//!   one of [`PROBES`] slots ([`probe_slot`]); with none free, that probe waits for its next tick.
//!   Without the slots, each pool in use at its watchdog's tick had a probe: 41 at once were seen
//!   at 100 shards;
//! - the catalogue's `LISTEN` connections (the catalogue queue's, and the shard map's of the API
//!   and of the workers) and the bucket movers' lock: four, within the ten of PostgreSQL's 100 that
//!   `keel up` leaves outside [`Budget::connections`], with room for the backends of closed
//!   connections that PostgreSQL has not finished ending.
//!
//! Without a budget (the default, and `keel up` with few shards) nothing here runs: pools open
//! their connections as they always have.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, WeakPool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often the reaper runs.
pub const REAP_EVERY: Duration = Duration::from_secs(1);
/// A connection not handed out for this long is closed (deadpool has no idle timeout of its own).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most health probes (`db::health`) with a connection open at once under a budget; they are
/// part of [`Budget::connections`], and the pools get the rest.
pub const PROBES: usize = 8;
/// While pools wait for permits, how often idle connections are looked for to close for them.
pub const WAIT_STEP: Duration = Duration::from_millis(10);
/// The most idle connections closed for waiting pools every [`WAIT_STEP`]. A closed connection's
/// permit comes back only once its task has ended: closing one per waiter at every step, before
/// those were back, closed far more than were needed. 400 a second is more than can be opened.
pub const CLOSE_PER_STEP: usize = 4;
/// An idle connection used this recently is closed for another pool's only if no other is idle.
pub const HOT: Duration = Duration::from_millis(100);
/// An idle connection not used for this long is closed before those used more recently: longer
/// than the API's rounds of the shards (every 1.25 s with the default session budget,
/// `http::auth::revocations`), so that it is not one a round is about to use again.
pub const COLD: Duration = Duration::from_secs(3);

/// How many connections the pools of this process may have open, and how a shard's pools are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most connections the process may hold, outside the few it keeps beyond any pool and
    /// budget (`LISTEN`, the movers' lock): the health probes' [`PROBES`] and the pools' permits.
    pub connections: usize,
    /// The user shards of the process.
    pub shards: usize,
    /// Up to this many shards, each shard's pools get their full configured size; beyond, the
    /// configured size is shared out, so that the shards together may hold what this many would.
    pub full_size_shards: usize,
}

impl Budget {
    /// A shard pool's size for a configured `size`: the share of `size × full_size_shards` one of
    /// `shards` gets, at least 2 (one job or request waiting for another's connection would
    /// otherwise wait for its whole transaction) and at most `size`.
    pub fn shard_pool_size(&self, size: usize) -> usize {
        (size * self.full_size_shards).div_ceil(self.shards.max(1)).clamp(size.min(2), size)
    }

    /// How many connections all the pools together may have open at any moment.
    pub fn permits(&self) -> usize {
        self.connections.saturating_sub(PROBES).max(1)
    }

    /// How many of [`Budget::permits`] the background pools (the workers', [`background_pools`])
    /// may hold together: half, so that the other half is always the API's to have.
    pub fn background_permits(&self) -> usize {
        (self.permits() / 2).max(1)
    }
}

/// Permits of one kind, and the connections waiting for one.
struct Gate {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Gate {
    fn new(permits: usize) -> Gate {
        Gate { permits: Arc::new(Semaphore::new(permits)), waiting: AtomicUsize::new(0) }
    }
}

struct State {
    budget: Budget,
    /// Every pool under the budget, in the order they were built, and whether it is a background
    /// one ([`background_pools`]).
    pools: Mutex<Vec<(WeakPool, bool)>>,
    /// Every pooled connection holds one of these ([`Budget::permits`]).
    all: Gate,
    /// A background pool's connection also holds one of these ([`Budget::background_permits`]).
    background: Gate,
    /// The health probes' slots ([`PROBES`]).
    probes: Arc<Semaphore>,
}

static STATE: OnceLock<State> = OnceLock::new();

tokio::task_local! {
    /// Set while the pools being built are background ones.
    static BACKGROUND: ();
}

/// Sets this process's budget and starts its reaper, and the task that closes idle connections for
/// waiting pools (within a Tokio runtime). Once per process: a second call changes nothing and
/// returns false.
pub fn set(budget: Budget) -> bool {
    if STATE.set(State::new(budget)).is_err() {
        return false;
    }
    tokio::spawn(async {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            reap();
        }
    });
    tokio::spawn(async {
        let mut tick = tokio::time::interval(WAIT_STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(state) = STATE.get() {
                for (gate, background_only) in [(&state.all, false), (&state.background, true)] {
                    let waiting = gate.waiting.load(Ordering::Relaxed);
                    if waiting > 0 {
                        state.close_idle(waiting.min(CLOSE_PER_STEP), background_only);
                    }
                }
            }
        }
    });
    true
}

/// This process's budget, if it has one.
pub fn get() -> Option<Budget> {
    STATE.get().map(|state| state.budget)
}

/// Builds pools with `building` (`Databases::open`) as background ones: under a budget, their
/// connections together take at most [`Budget::background_permits`], so that the workers' jobs
/// cannot take the connections the API's requests need, as separate pools ensured before every
/// pool shared one budget. Without a budget, just `building`. (The pools of a shard added while
/// running are built by the shard map's follower, outside this: the workers' are not background.)
pub async fn background_pools<F: Future>(building: F) -> F::Output {
    BACKGROUND.scope((), building).await
}

fn building_background() -> bool {
    BACKGROUND.try_with(|_| ()).is_ok()
}

/// Puts `pool` under the budget, if there is one.
pub(crate) fn register(pool: &Pool) {
    if let Some(state) = STATE.get() {
        state.pools.lock().expect("never poisoned").push((pool.weak(), building_background()));
    }
}

/// A health probe's place among the process's connections (one of the [`PROBES`], or a pool's
/// permit), held while its connection is open.
pub(crate) struct ProbeSlot {
    _permit: OwnedSemaphorePermit,
}

/// Every probe slot is taken: the probe waits for its next turn.
pub(crate) struct NoProbeSlot;

/// A slot for a health probe's connection: `Ok(None)` without a budget (probes are not counted),
/// `Ok(Some(_))` with one, `Err` if all [`PROBES`] are taken. The probe of a database that is
/// `down` may take a free permit of the pools' instead (its own pools hold none while it is down):
/// after many went down together (the cluster stalled), they come back together rather than a few
/// slots at a time. Never waits: a probe that waited for a slot would count the wait as the
/// database not answering.
pub(crate) fn probe_slot(down: bool) -> Result<Option<ProbeSlot>, NoProbeSlot> {
    let Some(state) = STATE.get() else { return Ok(None) };
    let permit = match state.probes.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) if down => state.all.permits.clone().try_acquire_owned().map_err(|_| NoProbeSlot)?,
        Err(_) => return Err(NoProbeSlot),
    };
    Ok(Some(ProbeSlot { _permit: permit }))
}

/// How a pool under the budget opens a connection: it takes a permit first (a background pool's,
/// two), closing another pool's idle connection for it if every permit is held, and the permits go
/// back when the connection closes, whoever closes it (the pool, the reaper, a broken socket).
pub(crate) struct Connect {
    tls: keel_pgtls::Connector,
    background: bool,
}

impl Connect {
    /// For a pool being built now: a background one within [`background_pools`].
    pub(crate) fn new(tls: keel_pgtls::Connector) -> Connect {
        Connect { tls, background: building_background() }
    }
}

type Connecting<'a> = Pin<
    Box<
        dyn Future<Output = Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>>
            + Send
            + 'a,
    >,
>;

impl deadpool_postgres::Connect for Connect {
    fn connect(&self, config: &tokio_postgres::Config) -> Connecting<'_> {
        let (config, tls, background) = (config.clone(), self.tls.clone(), self.background);
        Box::pin(async move {
            let permits = match STATE.get() {
                Some(state) => Some(state.permits(background).await),
                None => None,
            };
            let (client, connection) = config.connect(tls).await?;
            // The pool aborts this task when it drops the connection: the permits go with it.
            let task = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "a pooled connection ended with an error");
                }
                drop(permits);
            });
            Ok((client, task))
        })
    }
}

/// The permits one open connection holds.
struct Permits {
    _all: OwnedSemaphorePermit,
    _background: Option<OwnedSemaphorePermit>,
}

impl State {
    fn new(budget: Budget) -> State {
        State {
            budget,
            pools: Mutex::new(Vec::new()),
            all: Gate::new(budget.permits()),
            background: Gate::new(budget.background_permits()),
            probes: Arc::new(Semaphore::new(PROBES)),
        }
    }

    /// The permits for one more connection: a background pool's first, then one of all.
    async fn permits(&self, background: bool) -> Permits {
        let background = match background {
            true => Some(self.permit(&self.background, true).await),
            false => None,
        };
        Permits { _background: background, _all: self.permit(&self.all, false).await }
    }

    /// A permit of `gate`: at once if one is free; otherwise an idle connection that holds one is
    /// closed for it ([`closing_order`]; a background pool's, for `background_only`), or, if none is
    /// idle, by the task that looks for them every [`WAIT_STEP`] while some wait. Permits go to
    /// the waiters in the order they came.
    async fn permit(&self, gate: &Gate, background_only: bool) -> OwnedSemaphorePermit {
        if let Ok(permit) = gate.permits.clone().try_acquire_owned() {
            return permit;
        }
        gate.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&gate.waiting);
        self.close_idle(1, background_only);
        gate.permits.clone().acquire_owned().await.expect("the budget's semaphores are never closed")
    }

    /// The live pools, in the order they were built, and whether each is a background one.
    fn live_pools(&self) -> Vec<(Pool, bool)> {
        let mut weak = self.pools.lock().expect("never poisoned");
        weak.retain(|(pool, _)| pool.upgrade().is_some());
        weak.iter().filter_map(|(pool, background)| Some((pool.upgrade()?, *background))).collect()
    }

    /// Closes up to `n` idle connections, of any pool (of a background one, for
    /// `background_only`), in [`closing_order`]. Returns how many it closed.
    fn close_idle(&self, n: usize, background_only: bool) -> usize {
        let pools: Vec<Pool> = self
            .live_pools()
            .into_iter()
            .filter(|(_, background)| *background || !background_only)
            .map(|(pool, _)| pool)
            .collect();
        // Each idle connection by its pool (in the order the pools were built) and when it was made
        // (unique within a pool).
        let mut idle: Vec<(Duration, usize, Instant)> = Vec::new();
        for (i, pool) in pools.iter().enumerate() {
            pool.retain(|_, metrics| {
                idle.push((metrics.last_used(), i, metrics.created));
                true
            });
        }
        let closing = closing_order(idle, n);
        let mut closed = 0;
        for (i, pool) in pools.iter().enumerate() {
            let ours: Vec<Instant> = closing.iter().filter(|(p, _)| *p == i).map(|(_, made)| *made).collect();
            if !ours.is_empty() {
                closed += pool.retain(|_, metrics| !ours.contains(&metrics.created)).removed.len();
            }
        }
        closed
    }
}

/// One connection waiting for a permit, counted until it stops waiting (it got one, or the pool
/// gave up).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Of the idle connections `(idle for, pool, made at)`, the `n` to close first, as `(pool, made
/// at)`:
/// 1. those unused for [`COLD`] or more, the longest idle first;
/// 2. then those used between [`HOT`] and [`COLD`] ago, by the pools' order: those of the pool
///    registered last first (the workers' before the API's, which are built first, and a shard's
///    before those of lower-numbered ones), the longest idle first within a pool;
/// 3. then those used within [`HOT`], in the same order.
///
/// Not simply the least recently used: the API visits every shard in turn, more shards than there
/// are permits, and closing the connection used least recently would close, every time, the very
/// one the round needs next, so that every visit would open a connection. Closing by the pools'
/// order instead keeps the connections of a stable set of pools from one round to the next, and
/// only the others' visits open one.
fn closing_order(mut idle: Vec<(Duration, usize, Instant)>, n: usize) -> Vec<(usize, Instant)> {
    let tier = |idle: Duration| match idle {
        _ if idle >= COLD => 0,
        _ if idle >= HOT => 1,
        _ => 2,
    };
    idle.sort_unstable_by(|a, b| {
        let by_pool = if tier(a.0) == 0 { std::cmp::Ordering::Equal } else { b.1.cmp(&a.1) };
        tier(a.0).cmp(&tier(b.0)).then(by_pool).then(b.0.cmp(&a.0))
    });
    idle.into_iter().take(n).map(|(_, pool, made)| (pool, made)).collect()
}

/// One pass of the reaper: closes the connections idle for longer than [`IDLE_TIMEOUT`].
fn reap() {
    let Some(state) = STATE.get() else { return };
    for (pool, _) in state.live_pools() {
        pool.retain(|_, metrics| metrics.last_used() < IDLE_TIMEOUT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_pools_share_the_configured_size_beyond_the_full_size_shards() {
        let budget = |shards| Budget { connections: 90, shards, full_size_shards: 8 };
        assert_eq!(budget(8).shard_pool_size(16), 16);
        assert_eq!(budget(4).shard_pool_size(16), 16, "never more than configured");
        assert_eq!(budget(16).shard_pool_size(16), 8);
        assert_eq!(budget(100).shard_pool_size(16), 2, "16 × 8 / 100, at least 2");
        assert_eq!(budget(100).shard_pool_size(1), 1, "never more than configured");
    }

    #[test]
    fn the_pools_leave_room_for_the_probes() {
        let budget = Budget { connections: 90, shards: 100, full_size_shards: 8 };
        assert_eq!(budget.permits(), 90 - PROBES);
        assert_eq!(budget.background_permits(), (90 - PROBES) / 2, "the rest is the API's");
        assert_eq!(Budget { connections: 3, ..budget }.permits(), 1, "never none");
        assert_eq!(Budget { connections: 3, ..budget }.background_permits(), 1, "never none");
    }

    /// The permits, if they come within 50 ms.
    async fn within<F: Future + Unpin>(permits: &mut F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(50), permits).await.ok()
    }

    #[tokio::test]
    async fn background_pools_keep_to_their_share_and_waiters_are_served_in_turn() {
        // 4 permits, 2 of them at most for background pools.
        let state = State::new(Budget { connections: PROBES + 4, shards: 100, full_size_shards: 8 });
        let first = state.permits(true).await;
        let _second = state.permits(true).await;
        let mut third = std::pin::pin!(state.permits(true));
        assert!(within(&mut third).await.is_none(), "a third background connection waits, though two permits are free");
        let api = state.permits(false).await;
        let _api = state.permits(false).await;
        let mut more_api = std::pin::pin!(state.permits(false));
        assert!(within(&mut more_api).await.is_none(), "every permit is held");
        drop(first);
        // The background waiter has its share back, but the API's came first for the permit.
        let _more_api = within(&mut more_api).await.expect("the permit given back");
        assert!(within(&mut third).await.is_none());
        drop(api);
        assert!(within(&mut third).await.is_some());
    }

    #[test]
    fn idle_connections_are_closed_by_the_pools_order_sparing_those_just_used() {
        let now = Instant::now();
        let made = |ms| now + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        let idle = vec![
            (ms(10), 3, made(1)),
            (ms(500), 1, made(2)),
            (ms(300), 2, made(3)),
            (ms(900), 1, made(4)),
            (ms(200), 2, made(5)),
            (ms(4000), 0, made(6)),
            (ms(9000), 1, made(7)),
        ];
        assert_eq!(
            closing_order(idle.clone(), 9),
            vec![(1, made(7)), (0, made(6)), (2, made(3)), (2, made(5)), (1, made(4)), (1, made(2)), (3, made(1))],
            "the cold ones, longest idle first; then the last pool's first, the longest idle first \
             within a pool; one used within HOT last"
        );
        assert_eq!(closing_order(idle, 2).len(), 2);
        assert!(closing_order(Vec::new(), 1).is_empty());
    }
}
