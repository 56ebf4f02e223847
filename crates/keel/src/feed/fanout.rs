//! Fan-out on write: the jobs that copy an activity into its actor's followers' feeds, take a
//! withdrawn one out again, fill a new follower's feed with what they missed, and keep each stored
//! feed to its length.
//!
//! Every copy goes through the reader's own `follows` row, on the reader's shard, locked `FOR SHARE`:
//! the followed user's list of followers (`followers`) is written by a job and may lag, but the
//! reader's row is the truth, and an unfollow that commits while a copy runs either waits for the
//! copy (and then deletes what it wrote) or makes it skip that reader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use keel_outbox::{Job, JobError};
use uuid::Uuid;

use super::{Activity, Settings};
use crate::db::{Databases, Db, DbError, Sql};
use crate::events::{ActivityPosted, ActivityWithdrawn, Event};
use crate::ids::UserId;

/// Followers read per batch: each batch is then one statement per shard they live on.
const BATCH: i64 = 5000;
/// How many of a followed user's recent activities a new follower gets.
pub const BACKFILL: i64 = 100;

/// The job of an [`ActivityPosted`] event: copies the activity into every follower's feed, unless
/// the actor is over the fan-out limit (readers merge theirs in) or the activity was withdrawn.
pub async fn on_posted(db: &Databases, feed: Settings, job: &Job) -> Result<(), JobError> {
    let ActivityPosted { user_id: actor, activity } = ActivityPosted::from_job(job)?;
    Ok(fan_out(db, feed, actor, &activity).await?)
}

async fn fan_out(db: &Databases, feed: Settings, actor: UserId, activity: &Activity) -> Result<(), DbError> {
    let home = db.shard_of(actor);
    let client = home.client().await?;
    let found = client
        .maybe_row(
            "SELECT followers_count, EXISTS (SELECT 1 FROM activities WHERE id = $2) FROM users WHERE id = $1",
            &[&actor, &activity.id],
        )
        .await?;
    let Some(found) = found else { return Ok(()) }; // the actor's account is gone
    let (followers, live): (i64, bool) = (found.get(0), found.get(1));
    if !live {
        return Ok(()); // withdrawn before it was copied anywhere
    }
    if followers > feed.fanout_limit {
        metrics::counter!("keel_feed_fanout_skipped_total").increment(1);
        return Ok(());
    }
    drop(client);
    let started = Instant::now();
    let mut copied = 0;
    let mut after: Option<UserId> = None;
    loop {
        // The connection is given back before the copies take others (maybe from the same pool).
        let batch: Vec<UserId> = home
            .client()
            .await?
            .rows(
                "SELECT follower_id FROM followers WHERE user_id = $1 AND active AND ($2::uuid IS NULL OR follower_id > $2)
                 ORDER BY follower_id LIMIT $3",
                &[&actor, &after, &BATCH],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (shard, readers) in by_shard(db, &batch) {
            copied += copy(&shard, &readers, activity).await?;
        }
        if (batch.len() as i64) < BATCH {
            break;
        }
        after = batch.last().copied();
    }
    // Withdrawn while being copied? Its job may have run before these copies were written, and
    // missed them: take them out again. (Checked after the copies committed, so a withdrawal either
    // shows here or its job runs after them and sees them.)
    let still = home.client().await?.maybe_row("SELECT 1 FROM activities WHERE id = $1", &[&activity.id]).await?;
    if still.is_none() {
        remove_everywhere(db, activity.id).await?;
    }
    metrics::counter!("keel_feed_fanout_rows_total").increment(copied);
    let lag = SystemTime::now().duration_since(super::from_micros(activity.created_at_us)).unwrap_or_default();
    metrics::histogram!("keel_feed_fanout_lag_seconds").record(lag.as_secs_f64());
    tracing::debug!(activity = %activity.id, copied, took_ms = started.elapsed().as_millis() as u64, "activity fanned out");
    Ok(())
}

/// Users grouped by the shard that holds them.
pub(super) fn by_shard(db: &Databases, users: &[UserId]) -> Vec<(Arc<Db>, Vec<UserId>)> {
    let mut groups: HashMap<String, (Arc<Db>, Vec<UserId>)> = HashMap::new();
    for &user in users {
        let shard = db.shard_of(user);
        groups.entry(shard.name().to_owned()).or_insert_with(|| (shard, Vec::new())).1.push(user);
    }
    groups.into_values().collect()
}

/// Copies `activity` into the feeds of those of `readers` (all on `shard`) who follow its actor, in
/// one statement. Returns the rows written (a copy already there is not written again).
async fn copy(shard: &Db, readers: &[UserId], activity: &Activity) -> Result<u64, DbError> {
    let client = shard.client().await?;
    let written = client
        .exec(
            "INSERT INTO feed_items (user_id, activity_id, actor_id, actor_name, verb, object_type, object_id, created_at)
             SELECT f.user_id, $3, $2, $4, $5, $6, $7, $8 FROM follows f
             WHERE f.user_id = ANY($1) AND f.followee_id = $2 AND f.active
             FOR SHARE OF f
             ON CONFLICT DO NOTHING",
            &[
                &readers,
                &activity.actor_id,
                &activity.id,
                &activity.actor_name,
                &activity.verb.as_str(),
                &activity.object_type.as_str(),
                &activity.object_id,
                &super::from_micros(activity.created_at_us),
            ],
        )
        .await?;
    Ok(written)
}

/// The job of an [`ActivityWithdrawn`] event: the activity leaves every feed that has it.
pub async fn on_withdrawn(db: &Databases, job: &Job) -> Result<(), JobError> {
    let event = ActivityWithdrawn::from_job(job)?;
    remove_everywhere(db, event.activity_id).await?;
    Ok(())
}

/// Deletes an activity from every stored feed: one indexed statement per shard (its followers may
/// live on any, and some may have stopped following since).
async fn remove_everywhere(db: &Databases, activity: Uuid) -> Result<(), DbError> {
    let shards = db.shards();
    for (_, shard) in shards.all() {
        shard.client().await?.exec("DELETE FROM feed_items WHERE activity_id = $1", &[&activity]).await?;
    }
    Ok(())
}

/// A new follow: the followed user's recent activities (up to [`BACKFILL`]) into the follower's feed,
/// if they still follow. Large accounts are skipped (readers merge theirs in). Also what makes a
/// follow and an activity right after it meet: the activity's fan-out may have read the followers
/// before this follow reached them, but then this reads the activity.
pub async fn backfill(db: &Databases, feed: Settings, reader: UserId, actor: UserId) -> Result<(), DbError> {
    let home = db.shard_of(actor);
    let client = home.client().await?;
    let large =
        client.maybe_row("SELECT followers_count > $2 FROM users WHERE id = $1", &[&actor, &feed.fanout_limit]).await?;
    if large.is_none_or(|r| r.get::<_, bool>(0)) {
        return Ok(());
    }
    let recent: Vec<Activity> = client
        .rows(
            &format!(
                "SELECT {} FROM activities WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
                super::ACTIVITY_COLUMNS
            ),
            &[&actor, &BACKFILL],
        )
        .await?
        .iter()
        .map(super::activity_from_row)
        .collect();
    drop(client);
    if recent.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&Activity) -> String| recent.iter().map(f).collect::<Vec<String>>();
    let ids: Vec<Uuid> = recent.iter().map(|a| a.id).collect();
    let objects: Vec<Uuid> = recent.iter().map(|a| a.object_id).collect();
    let times: Vec<SystemTime> = recent.iter().map(|a| super::from_micros(a.created_at_us)).collect();
    let (names, verbs, types) = (
        column(|a| a.actor_name.clone()),
        column(|a| a.verb.as_str().to_owned()),
        column(|a| a.object_type.as_str().to_owned()),
    );
    db
        .shard_of(reader)
        .client()
        .await?
        .exec(
            "INSERT INTO feed_items (user_id, activity_id, actor_id, actor_name, verb, object_type, object_id, created_at)
             SELECT $1, a.id, $2, a.name, a.verb, a.object_type, a.object_id, a.created_at
             FROM unnest($3::uuid[], $4::text[], $5::text[], $6::text[], $7::uuid[], $8::timestamptz[])
                  AS a(id, name, verb, object_type, object_id, created_at)
             WHERE EXISTS (SELECT 1 FROM follows WHERE user_id = $1 AND followee_id = $2 AND active FOR SHARE)
             ON CONFLICT DO NOTHING",
            &[&reader, &actor, &ids, &names, &verbs, &types, &objects, &times],
        )
        .await?;
    // Any withdrawn meanwhile (their withdrawal's job may have run before these copies): out again.
    let live: Vec<Uuid> = home
        .client()
        .await?
        .rows("SELECT id FROM activities WHERE id = ANY($1)", &[&ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let gone: Vec<Uuid> = ids.into_iter().filter(|id| !live.contains(id)).collect();
    if !gone.is_empty() {
        db.shard_of(reader)
            .client()
            .await?
            .exec("DELETE FROM feed_items WHERE user_id = $1 AND activity_id = ANY($2)", &[&reader, &gone])
            .await?;
    }
    Ok(())
}

/// Housekeeping: keeps each stored feed on `shard` to its newest `length` items. Readers with longer
/// feeds are found through the primary key's index, 1,000 at a time.
pub async fn trim(shard: &Db, length: i64) -> Result<String, DbError> {
    let client = shard.client().await?;
    let mut deleted = 0;
    loop {
        let batch = client
            .exec(
                "WITH long AS (
                     SELECT user_id FROM feed_items GROUP BY user_id HAVING count(*) > $1 LIMIT 1000
                 ), cut AS (
                     SELECT l.user_id, k.created_at, k.activity_id FROM long l
                     CROSS JOIN LATERAL (
                         SELECT created_at, activity_id FROM feed_items g WHERE g.user_id = l.user_id
                         ORDER BY created_at DESC, activity_id DESC OFFSET $1 LIMIT 1
                     ) k
                 )
                 DELETE FROM feed_items f USING cut
                 WHERE f.user_id = cut.user_id AND (f.created_at, f.activity_id) <= (cut.created_at, cut.activity_id)",
                &[&length],
            )
            .await?;
        deleted += batch;
        if batch == 0 {
            break;
        }
    }
    Ok(format!("deleted {deleted} feed items beyond {length} per reader"))
}
