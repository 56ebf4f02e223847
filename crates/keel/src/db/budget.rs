//! A process-wide budget of pooled connections, for a process with many shards (`keel up --shards
//! 100`): one pool per database and role keeps up to its size of connections for ever, so a process
//! with 100 shards held some 1,500 connections while idle, far past PostgreSQL's default
//! `max_connections` of 100.
//!
//! With a budget set ([`set`], once per process, before the pools are built), every pool built
//! afterwards registers here, and a reaper, every [`REAP_EVERY`]:
//! - closes connections idle for longer than [`IDLE_TIMEOUT`] in every pool;
//! - then, while all the pools together hold more than the budget, closes the idle connections used
//!   least recently, whichever pool they are in.
//!
//! Connections in use are never closed: a burst (`GET /v1/admin/stats` asks every shard at once)
//! may hold more for a moment, bounded by the pools' sizes ([`Budget::shard_pool_size`] scales a
//! shard's down as shards grow), and the next pass brings the count back within the budget.
//! Trimming once a second rather than at each new connection matters: the API's background readers
//! visit every shard in turn (the like tallies every 250 ms), and closing the least recently used
//! connection at once would close the very one the next visit needs, every visit.
//!
//! Without a budget (the default, and `keel up` with few shards) nothing here runs: pools behave
//! as they always have.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Pool, WeakPool};

/// How often the reaper runs.
pub const REAP_EVERY: Duration = Duration::from_secs(1);
/// A connection not handed out for this long is closed (deadpool has no idle timeout of its own).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many connections the pools of this process may keep, and how a shard's pools are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most connections all the pools together keep once a burst is over.
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
}

struct State {
    budget: Budget,
    pools: Mutex<Vec<WeakPool>>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Sets this process's budget and starts its reaper (within a Tokio runtime). Once per process: a
/// second call changes nothing and returns false.
pub fn set(budget: Budget) -> bool {
    if STATE.set(State { budget, pools: Mutex::new(Vec::new()) }).is_err() {
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
    true
}

/// This process's budget, if it has one.
pub fn get() -> Option<Budget> {
    STATE.get().map(|state| state.budget)
}

/// Puts `pool` under the budget, if there is one.
pub(crate) fn register(pool: &Pool) {
    if let Some(state) = STATE.get() {
        state.pools.lock().expect("never poisoned").push(pool.weak());
    }
}

/// One pass of the reaper (see the module's documentation).
fn reap() {
    let Some(state) = STATE.get() else { return };
    let pools: Vec<Pool> = {
        let mut weak = state.pools.lock().expect("never poisoned");
        weak.retain(|pool| pool.upgrade().is_some());
        weak.iter().filter_map(WeakPool::upgrade).collect()
    };
    let mut held = 0;
    for pool in &pools {
        pool.retain(|_, metrics| metrics.last_used() < IDLE_TIMEOUT);
        held += pool.status().size;
    }
    let excess = held.saturating_sub(state.budget.connections);
    if excess == 0 {
        return;
    }
    // The idle connections, least recently used first; close `excess` of them.
    let mut idle: Vec<Duration> = Vec::new();
    for pool in &pools {
        pool.retain(|_, metrics| {
            idle.push(metrics.last_used());
            true
        });
    }
    idle.sort_unstable_by(|a, b| b.cmp(a));
    let Some(&cutoff) = idle.get(excess.min(idle.len()).saturating_sub(1)) else { return };
    let mut closing = excess;
    for pool in &pools {
        pool.retain(|_, metrics| {
            let close = closing > 0 && metrics.last_used() >= cutoff;
            closing -= usize::from(close);
            !close
        });
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
}
