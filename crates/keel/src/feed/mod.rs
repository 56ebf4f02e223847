//! Follows and the feed: who follows whom, what they did (activities), and each reader's feed of
//! what those they follow did, newest first. Everything is keyed by a user and lives on that user's
//! shard; the two sides of a follow usually live on different shards. docs/FEED.md tells the whole
//! story; in short:
//!
//! - **A follow** is written on the follower's shard in the request's transaction (the `follows`
//!   row, the follower's `following_count`, the "followed" activity) with a [`FollowChanged`] event;
//!   its job writes the followed user's side (`followers`, `followers_count`). The follower's row
//!   carries a version that grows with every change and the event carries it: the other side applies
//!   only newer versions, so retries, redeliveries and reordering all end where the follower's row is
//!   ([`follows`]).
//! - **An activity** (a like, a follow) is a row on the actor's shard and an [`ActivityPosted`] event
//!   in the same transaction; withdrawing it (an unlike, an unfollow) deletes the row with an
//!   [`ActivityWithdrawn`] event ([`post`], [`withdraw`]).
//! - **Fan-out on write**: the event's job copies the activity into each follower's stored feed, on
//!   that follower's shard, one statement per shard per batch of followers ([`fanout`]).
//! - **Fan-out on read**: an actor with more than `KEEL_FEED_FANOUT_LIMIT` followers is not copied;
//!   a reader who follows one gets its recent activities merged in when reading, from a cache kept
//!   within the feed's budget ([`LargeAccounts`], [`read`]).
//!
//! Consistency kind `feed`, budget 30 s: an activity is in followers' feeds, and an unfollowed
//! actor's items out of the reader's, within it.
//!
//! [`FollowChanged`]: crate::events::FollowChanged
//! [`ActivityPosted`]: crate::events::ActivityPosted
//! [`ActivityWithdrawn`]: crate::events::ActivityWithdrawn

pub mod fanout;
pub mod follows;
pub mod read;

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::config::Config;
use crate::db::{Databases, DbError, Sql};
use crate::events::{self, ActivityPosted, ActivityWithdrawn};
pub use crate::events::{Activity, ObjectType, Verb};
use crate::ids::UserId;
use crate::users::UsersState;

/// The columns an [`Activity`] is read from, in the `activities` table and in `feed_items`.
const ACTIVITY_COLUMNS: &str = "id, user_id AS actor_id, actor_name, verb, object_type, object_id, created_at";
const FEED_ITEM_COLUMNS: &str = "activity_id AS id, actor_id, actor_name, verb, object_type, object_id, created_at";

/// An activity from a row of [`ACTIVITY_COLUMNS`] or [`FEED_ITEM_COLUMNS`].
fn activity_from_row(row: &Row) -> Activity {
    Activity {
        id: row.get("id"),
        actor_id: row.get("actor_id"),
        actor_name: row.get("actor_name"),
        verb: row.get("verb"),
        object_type: row.get("object_type"),
        object_id: row.get("object_id"),
        created_at_us: micros(row.get("created_at")),
    }
}

/// The feed's order: newest first, ties broken by id (also descending).
fn feed_key(activity: &Activity) -> (i64, Uuid) {
    (activity.created_at_us, activity.id)
}

pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

pub fn from_micros(us: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)
}

/// Records that `actor` did `verb` to the object, in `tx` (the transaction that made the change),
/// with its event: the fan-out runs once it commits. Doing it again while the first stands changes
/// nothing (one live activity per actor, verb and object).
pub async fn post(
    tx: &impl GenericClient,
    actor: UserId,
    verb: Verb,
    object_type: ObjectType,
    object_id: Uuid,
    traceparent: Option<String>,
) -> Result<(), DbError> {
    let row = tx
        .maybe_row(
            &format!(
                "INSERT INTO activities (id, user_id, actor_name, verb, object_type, object_id)
                 SELECT $1, id, name, $3, $4, $5 FROM users WHERE id = $2
                 ON CONFLICT (user_id, verb, object_id) DO NOTHING
                 RETURNING {ACTIVITY_COLUMNS}"
            ),
            &[&Uuid::now_v7(), &actor, &verb.as_str(), &object_type.as_str(), &object_id],
        )
        .await?;
    if let Some(row) = row {
        let posted = ActivityPosted { user_id: actor, activity: activity_from_row(&row) };
        keel_outbox::enqueue(tx, &events::event(&posted, actor, traceparent)).await?;
    }
    Ok(())
}

/// Withdraws `actor`'s activity (an unlike, an unfollow), in `tx`, with its event: it leaves every
/// feed once the event's job ran.
pub async fn withdraw(
    tx: &impl GenericClient,
    actor: UserId,
    verb: Verb,
    object_id: Uuid,
    traceparent: Option<String>,
) -> Result<(), DbError> {
    let gone = tx
        .maybe_row(
            "DELETE FROM activities WHERE user_id = $1 AND verb = $2 AND object_id = $3 RETURNING id",
            &[&actor, &verb.as_str(), &object_id],
        )
        .await?;
    if let Some(row) = gone {
        let withdrawn = ActivityWithdrawn { user_id: actor, activity_id: row.get(0) };
        keel_outbox::enqueue(tx, &events::event(&withdrawn, actor, traceparent)).await?;
    }
    Ok(())
}

/// What the fan-out and the feed's reads are configured with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Actors with more followers than this are merged in at read time, not copied.
    pub fanout_limit: i64,
    /// The items each stored feed keeps.
    pub length: i64,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings { fanout_limit: config.feed_fanout_limit as i64, length: config.feed_length as i64 }
    }
}

/// How often a node asks the shards which accounts are over the fan-out limit: a third of the feed's
/// default budget, so an account that crosses it is merged in by readers well within the budget.
pub const LARGE_ACCOUNTS_EVERY: Duration = Duration::from_secs(10);

/// The accounts over the fan-out limit, as this node last asked the shards (an index range scan on
/// `followers_count` each). Readers merge in the recent activities of those they follow.
pub struct LargeAccounts {
    limit: i64,
    ids: RwLock<Arc<Vec<UserId>>>,
}

impl LargeAccounts {
    pub fn new(limit: i64) -> LargeAccounts {
        LargeAccounts { limit, ids: RwLock::default() }
    }

    pub fn current(&self) -> Arc<Vec<UserId>> {
        self.ids.read().expect("never poisoned").clone()
    }

    /// Asks every shard again.
    pub async fn refresh(&self, db: &Databases) -> Result<usize, DbError> {
        let mut ids = HashSet::new();
        for (_, shard) in db.shards().all() {
            let client = shard.client().await?;
            let rows = client.rows("SELECT id FROM users WHERE followers_count > $1", &[&self.limit]).await?;
            ids.extend(rows.iter().map(|r| r.get::<_, UserId>(0)));
        }
        let mut ids: Vec<UserId> = ids.into_iter().collect();
        ids.sort_unstable();
        let count = ids.len();
        *self.ids.write().expect("never poisoned") = Arc::new(ids);
        metrics::gauge!("keel_feed_large_accounts").set(count as f64);
        Ok(count)
    }

    /// Refreshes every [`LARGE_ACCOUNTS_EVERY`] until `stop` completes.
    pub async fn run(self: Arc<Self>, db: Arc<Databases>, stop: impl Future<Output = ()> + Send) {
        let mut stop = std::pin::pin!(stop);
        loop {
            if let Err(e) = self.refresh(&db).await {
                tracing::warn!(error = %e, "could not list the accounts over the feed's fan-out limit");
            }
            tokio::select! {
                () = tokio::time::sleep(LARGE_ACCOUNTS_EVERY) => {}
                () = &mut stop => return,
            }
        }
    }
}

/// Recent activities of large accounts, by actor: cache-aside within the feed's budget.
pub type RecentCache = keel_cache::Cache<UserId, Arc<Vec<Activity>>>;

/// What the follow and feed handlers reach (a part of [`crate::state::AppState`]).
#[derive(Clone)]
pub struct FeedState {
    /// Profiles, for the user being followed (it must exist; its name goes on the edge).
    pub users: UsersState,
    pub large: Arc<LargeAccounts>,
    pub recent: Arc<RecentCache>,
    pub budget: Duration,
}

impl FeedState {
    pub fn db(&self) -> &Arc<Databases> {
        &self.users.db
    }
}
