//! Which sessions this node must refuse, learnt within the `session` budget (5 s by default) of
//! their revocation, on every node, without a query per request.
//!
//! A revocation (sign-out, sign-out everywhere, a password change or reset, an admin lock, a reused
//! refresh token) is first written on the user's shard (`sessions.revoked_at`): that row is the
//! truth. Nodes learn of it two ways:
//!
//! - **Announced** on the shared tier's channel (Redis pub/sub), heard within milliseconds. At most
//!   once: a node cut off from Redis, or a message lost, does not hear it.
//! - **Polled**: every node reads each shard's recent revocations every quarter budget (an index
//!   scan of the few rows revoked since its last look). This is the guarantee: whatever happens to
//!   Redis, a revocation is in every node's list within a quarter budget plus a poll.
//!
//! And a node that **cannot poll a shard** (that shard down, or this node cut off from it) for a
//! whole budget cannot know that its sessions are still valid: it refuses the tokens of that
//! shard's users with a 503 (and `Retry-After`) until it can poll again, rather than accept one
//! that may have been revoked. Users on the other shards are not affected.
//!
//! A node only needs to remember revocations as long as the tokens they stop can live (the access
//! token lifetime): an older token has expired anyway. A node starting up reads that far back before
//! it serves.
//!
//! Under a connection budget (`keel up` with more than 8 shards, [`crate::db::budget`]), each shard
//! is still polled every quarter budget (1.25 s by default), but the shards take turns, spread
//! evenly over that interval and at most [`LANES_UNDER_BUDGET`] at once, instead of all starting
//! together (100 shards polled at once took 100 connections at once, every 1.25 s); and the like
//! tallies are merged on the same visit, on the connection it has just used ([`Alongside`]): the
//! interval is theirs if that is shorter.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_cache::Shared;
use uuid::Uuid;

use crate::db::{Databases, Db, DbError, Sql};
use crate::ids::SessionId;

/// The name of revocations on the shared tier's channel.
const CHANNEL_KIND: &str = "session";

/// Under a connection budget, how many shards are read at once: by the first poll (before
/// serving), and by the loops taking turns, which wait for one another beyond this (a shard that
/// hangs holds one until the poll's timeout, a budget, or its breaker opens).
const LANES_UNDER_BUDGET: usize = 8;

/// Something else the API reads from every shard, on the same visit as the shard's revoked sessions
/// and so on a connection the visit has just used, under a connection budget: at least every
/// `every` (the polls then come as often, if that is more often than every quarter budget).
#[derive(Clone)]
pub struct Alongside {
    every: Duration,
    read: ReadShard,
}

type ReadShard = Arc<dyn Fn(Arc<Db>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

impl Alongside {
    /// `read` of a shard, on each visit, at least every `every`.
    pub fn new<F, Fut>(every: Duration, read: F) -> Alongside
    where
        F: Fn(Arc<Db>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Alongside { every, read: Arc::new(move |shard| Box::pin(read(shard))) }
    }
}

pub struct Revocations {
    /// Revoked sessions, and when this node may forget them (their tokens have expired by then).
    revoked: Mutex<HashMap<SessionId, Instant>>,
    /// Per shard (by position): when its last successful poll began, in milliseconds since `epoch`
    /// (0: never).
    polled: Vec<AtomicU64>,
    epoch: Instant,
    budget: Duration,
    /// How long a revocation is remembered: the access token lifetime.
    remember: Duration,
    shared: Option<Arc<Shared>>,
    /// Under a connection budget, the visits in progress ([`LANES_UNDER_BUDGET`]).
    lanes: tokio::sync::Semaphore,
}

impl Revocations {
    /// Revocations for `shards` shards, learnt within `budget`, kept for `remember` (the access
    /// token lifetime). With a shared tier, this node also hears the others' announcements.
    pub fn new(shards: usize, budget: Duration, remember: Duration, shared: Option<Arc<Shared>>) -> Arc<Revocations> {
        let revocations = Arc::new(Revocations {
            revoked: Mutex::default(),
            // One slot for every shard there could be (one per bucket at most), not only today's:
            // a shard added while the node runs is polled, and vouched for, like the others.
            polled: (0..shards.max(usize::from(keel_shard::BUCKETS))).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            budget,
            remember,
            shared: shared.clone(),
            lanes: tokio::sync::Semaphore::new(LANES_UNDER_BUDGET),
        });
        if let Some(shared) = shared {
            let hear = Arc::downgrade(&revocations);
            shared.on_announcement(CHANNEL_KIND, move |key| {
                // `None` (this node was cut off from the channel): the polls cover what was missed.
                let (Some(revocations), Some(key)) = (hear.upgrade(), key) else { return };
                let sessions: Vec<SessionId> = key.split(',').filter_map(|s| s.parse().ok()).collect();
                revocations.remember_revoked(&sessions);
            });
        }
        revocations
    }

    /// Whether `session` is revoked, as far as this node knows.
    pub fn is_revoked(&self, session: SessionId) -> bool {
        self.revoked.lock().unwrap().contains_key(&session)
    }

    /// Whether this node has heard from shard `shard` recently enough to vouch for its sessions:
    /// its last successful poll began less than a budget ago.
    pub fn can_vouch_for(&self, shard: usize) -> bool {
        let Some(polled) = self.polled.get(shard) else { return false };
        let polled = polled.load(Ordering::Relaxed);
        polled != 0 && self.millis_now().saturating_sub(polled) < self.budget.as_millis() as u64
    }

    /// Sessions just revoked on their shard: refused here at once, and announced to the other nodes.
    pub async fn revoked(&self, sessions: &[SessionId]) {
        if sessions.is_empty() {
            return;
        }
        self.remember_revoked(sessions);
        if let Some(shared) = &self.shared {
            let key: Vec<String> = sessions.iter().map(ToString::to_string).collect();
            // Failing is fine: the other nodes' polls find it within the budget.
            shared.announce(CHANNEL_KIND, &key.join(",")).await;
        }
    }

    fn remember_revoked(&self, sessions: &[SessionId]) {
        let forget_at = Instant::now() + self.remember;
        let mut revoked = self.revoked.lock().unwrap();
        for session in sessions {
            revoked.insert(*session, forget_at);
        }
        metrics::gauge!("keel_sessions_revoked_remembered").set(revoked.len() as f64);
    }

    /// Shard `shard` was read completely by a poll that began at `began`.
    fn heard_from(&self, shard: usize, began: u64) {
        if let Some(polled) = self.polled.get(shard) {
            polled.store(began, Ordering::Relaxed);
        }
    }

    fn millis_now(&self) -> u64 {
        // Never 0, which means "never polled".
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// Reads every shard's revocations of the last `lookback`, all shards at once; false if a shard
    /// did not answer within a budget.
    pub async fn poll(&self, db: &Databases, lookback: Duration) -> bool {
        let shards = db.shards();
        let polls = shards.all().map(|(shard, handle)| self.poll_shard(usize::from(shard), handle, lookback));
        if crate::db::budget::get().is_some() {
            // Many shards: a few at a time, not a connection to each at once.
            use futures_util::StreamExt;
            let answers: Vec<bool> =
                futures_util::stream::iter(polls).buffer_unordered(LANES_UNDER_BUDGET).collect().await;
            return answers.into_iter().all(|answered| answered);
        }
        futures_util::future::join_all(polls).await.into_iter().all(|answered| answered)
    }

    /// Reads one shard's revocations of the last `lookback`; false if it did not answer in a budget.
    async fn poll_shard(&self, shard: usize, handle: &Db, lookback: Duration) -> bool {
        let began = self.millis_now();
        let read = tokio::time::timeout(self.budget, recent_revocations(handle, lookback)).await;
        match read.unwrap_or_else(|_| Err(DbError::Down(handle.name().to_owned()))) {
            Ok(sessions) => {
                self.remember_revoked(&sessions);
                self.heard_from(shard, began);
                true
            }
            Err(e) => {
                metrics::counter!("keel_session_poll_errors_total").increment(1);
                tracing::warn!(shard, error = %e, "could not read the shard's revoked sessions");
                false
            }
        }
    }

    /// Polls each shard every quarter budget until `stop`, each in a loop of its own (a shard that
    /// hangs must not hold back the others' polls), and forgets revocations whose tokens have
    /// expired. A quarter, so that a shard is still vouched for after a poll or two failed (a
    /// restart, a connection lost): only a shard unheard for a whole budget is refused. Each poll
    /// looks back over the time since the shard's previous good poll began plus a budget: a
    /// revocation whose transaction began before a poll but committed after it carries the earlier
    /// time.
    ///
    /// Under a connection budget, the shards' loops take turns: shard `k` of `n` polls at `k/n` of
    /// the interval (a shard added later, at a random point of it), every interval, and `alongside`
    /// reads the shard right after each poll; the interval is then the quarter budget or
    /// `alongside.every`, whichever is shorter.
    pub async fn run(
        self: Arc<Self>,
        db: Arc<Databases>,
        stop: impl std::future::Future<Output = ()>,
        alongside: Option<Alongside>,
    ) {
        let quarter = (self.budget / 4).max(Duration::from_millis(50));
        let in_turn = crate::db::budget::get().is_some();
        let every = match &alongside {
            Some(alongside) if in_turn => quarter.min(alongside.every),
            _ => quarter,
        };
        // A loop per shard, and one more for each shard added while running (looked for every
        // quarter budget): a shard's users may arrive there (a bucket move) with their sessions.
        let polling = async {
            let mut loops = tokio::task::JoinSet::new();
            let mut started = std::collections::HashSet::new();
            let mut first = true;
            loop {
                let shards = db.shards();
                let n = shards.all().count().max(1) as u32;
                for (k, (shard, handle)) in (0u32..).zip(shards.all()) {
                    if !started.insert(shard) {
                        continue;
                    }
                    let (shard, handle) = (usize::from(shard), handle.clone());
                    if in_turn {
                        let offset = if first { every * k / n } else { keel_random::up_to(every) };
                        loops.spawn(self.clone().poll_in_turn(shard, handle, every, offset, alongside.clone()));
                    } else {
                        loops.spawn(self.clone().poll_forever(shard, handle, every));
                    }
                }
                first = false;
                tokio::time::sleep(quarter).await;
            }
        };
        let forget = async {
            loop {
                tokio::time::sleep(every).await;
                self.forget_expired();
            }
        };
        tokio::select! {
            () = polling => {}
            () = forget => {}
            () = stop => {}
        }
    }

    async fn poll_forever(self: Arc<Self>, shard: usize, handle: Arc<Db>, every: Duration) {
        // The first poll, before serving, began after `epoch`; a shard added later looks back as
        // far as a token lives.
        let mut last = self.epoch;
        loop {
            tokio::time::sleep(every).await;
            let began = Instant::now();
            let lookback = (began - last + self.budget).min(self.remember);
            if self.poll_shard(shard, &handle, lookback).await {
                last = began;
            }
        }
    }

    /// [`Revocations::poll_forever`] under a connection budget: every `every` from `offset` on, at
    /// most [`LANES_UNDER_BUDGET`] shards at once, and `alongside` read on the same visit.
    async fn poll_in_turn(
        self: Arc<Self>,
        shard: usize,
        handle: Arc<Db>,
        every: Duration,
        offset: Duration,
        alongside: Option<Alongside>,
    ) {
        let mut last = self.epoch;
        let mut turns = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
        turns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            turns.tick().await;
            let _lane = self.lanes.acquire().await.expect("never closed");
            let began = Instant::now();
            let lookback = (began - last + self.budget).min(self.remember);
            if self.poll_shard(shard, &handle, lookback).await {
                last = began;
            }
            if let Some(alongside) = &alongside {
                // Bounded like the poll: a shard that hangs must not keep its lane.
                let _ = tokio::time::timeout(self.budget, (alongside.read)(handle.clone())).await;
            }
        }
    }

    /// Forgets the revocations whose tokens have all expired.
    fn forget_expired(&self) {
        let now = Instant::now();
        self.revoked.lock().unwrap().retain(|_, forget_at| *forget_at > now);
    }

    /// How far back a node reads before it serves: every revocation whose tokens may still be alive.
    pub fn startup_lookback(&self) -> Duration {
        self.remember + self.budget
    }
}

async fn recent_revocations(shard: &Db, lookback: Duration) -> Result<Vec<SessionId>, DbError> {
    let client = shard.client().await?;
    let rows = client
        .rows(
            "SELECT id FROM sessions WHERE revoked_at > now() - make_interval(secs => $1)",
            &[&lookback.as_secs_f64()],
        )
        .await?;
    Ok(rows.iter().map(|r| SessionId::from_uuid(r.get::<_, Uuid>(0))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_is_vouched_for_only_within_a_budget_of_its_last_poll() {
        let revocations = Revocations::new(2, Duration::from_millis(200), Duration::from_secs(60), None);
        assert!(!revocations.can_vouch_for(0), "never polled");
        revocations.heard_from(0, revocations.millis_now());
        assert!(revocations.can_vouch_for(0));
        assert!(!revocations.can_vouch_for(1), "only the shard polled");
        assert!(!revocations.can_vouch_for(2), "no such shard");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!revocations.can_vouch_for(0), "a budget without a poll");
    }

    #[test]
    fn revoked_sessions_are_refused_until_their_tokens_have_expired() {
        let revocations = Revocations::new(1, Duration::from_secs(5), Duration::from_millis(100), None);
        let (gone, kept) = (SessionId::new(), SessionId::new());
        revocations.remember_revoked(&[gone]);
        assert!(revocations.is_revoked(gone) && !revocations.is_revoked(kept));
        std::thread::sleep(Duration::from_millis(150));
        revocations.forget_expired();
        assert!(!revocations.is_revoked(gone), "forgotten once every token it could stop has expired");
    }
}
