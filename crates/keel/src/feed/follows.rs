//! Follows: `PUT`/`DELETE /v1/users/{id}/follow`, and the lists of followers and followed users.
//!
//! The follower's side (`follows`, `following_count`, the "followed" activity) is written in the
//! request's transaction on the follower's shard, with a [`FollowChanged`] event; the followed
//! user's side (`followers`, `followers_count`) by that event's job ([`apply`]), on their shard.
//! The follower's row is never deleted, only made inactive, and its `version` grows with every
//! change: the job applies a change only over an older version, so whatever order events arrive in,
//! and however often, the other side ends as the follower's row is, and each count moves exactly
//! when its side's row turns active or inactive.

use axum::extract::State;
use axum::http::StatusCode;
use keel_outbox::{Job, JobError};
use serde::Serialize;
use utoipa::ToSchema;

use super::{fanout, FeedState, ObjectType, Settings, Verb};
use crate::consistency::DataKind;
use crate::db::replicas::{Floor, Target};
use crate::db::{Databases, DbError, Sql, Transaction};
use crate::events::{self, Event, FollowChanged, FollowerErased};
use crate::http::auth::{AuthUser, Caller};
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path, Query};
use crate::http::trace::TraceContext;
use crate::http::{cursor, Page, PageParams};
use crate::ids::UserId;

/// A user in a list of followers or followed users.
#[derive(Debug, Serialize, ToSchema)]
pub struct FollowUser {
    #[schema(value_type = String)]
    pub id: UserId,
    /// Their name when the follow was made.
    pub name: String,
}

/// The user the path names, who must not be the caller (422).
fn other_than(caller: UserId, id: &str) -> Result<UserId, ApiError> {
    let other = parse_id::<UserId>("user", id)?;
    if other == caller {
        return Err(ApiError::Unprocessable("a user cannot follow themselves".into()));
    }
    Ok(other)
}

/// Whom the caller may follow: another user, who exists (404 otherwise). Their public profile, through
/// the profile cache, gives the name the edge keeps.
async fn other_user(state: &FeedState, caller: UserId, id: &str) -> Result<(UserId, String), ApiError> {
    let followee = other_than(caller, id)?;
    let profile = crate::users::cached_profile(&state.users, followee).await?;
    Ok((followee, profile.name.clone()))
}

#[utoipa::path(put, path = "/v1/users/{id}/follow", tag = "follows", params(("id" = String, Path, description = "The user to follow")),
    security(("bearer" = [])),
    responses((status = 204, description = "Followed (already: no change)"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, description = "No such user", body = Problem),
        (status = 422, description = "The caller's own id", body = Problem)))]
pub async fn follow(
    State(state): State<FeedState>,
    AuthUser(caller): AuthUser,
    trace: TraceContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (followee, name) = other_user(&state, caller, &id).await?;
    let shard = state.db().shard_of(caller);
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    let changed = tx
        .maybe_row(
            "INSERT INTO follows (user_id, followee_id, followee_name, active, version) VALUES ($1, $2, $3, true, 1)
             ON CONFLICT (user_id, followee_id) DO UPDATE
             SET active = true, version = follows.version + 1, followee_name = EXCLUDED.followee_name, changed_at = now()
             WHERE NOT follows.active
             RETURNING version, changed_at",
            &[&caller, &followee, &name],
        )
        .await?;
    if let Some(row) = changed {
        announce(&tx, caller, followee, true, &row, trace.traceparent()).await?;
        super::post(&tx, caller, Verb::Followed, ObjectType::User, followee.as_uuid(), Some(trace.traceparent()))
            .await?;
    }
    shard.commit_jobs(tx).await?;
    state.users.floors.wrote(&shard, &client, caller).await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/users/{id}/follow", tag = "follows", params(("id" = String, Path, description = "The user to stop following")),
    security(("bearer" = [])),
    responses((status = 204, description = "Not followed (any more)"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, description = "No such user", body = Problem),
        (status = 422, description = "The caller's own id", body = Problem)))]
pub async fn unfollow(
    State(state): State<FeedState>,
    AuthUser(caller): AuthUser,
    trace: TraceContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let followee = other_than(caller, &id)?;
    let shard = state.db().shard_of(caller);
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    let changed = tx
        .maybe_row(
            "UPDATE follows SET active = false, version = version + 1, changed_at = now()
             WHERE user_id = $1 AND followee_id = $2 AND active
             RETURNING version, changed_at",
            &[&caller, &followee],
        )
        .await?;
    let Some(row) = changed else {
        drop(tx);
        drop(client);
        // Nothing to undo: still a 404 for a user who does not exist.
        other_user(&state, caller, &id).await?;
        return Ok(StatusCode::NO_CONTENT);
    };
    announce(&tx, caller, followee, false, &row, trace.traceparent()).await?;
    super::withdraw(&tx, caller, Verb::Followed, followee.as_uuid(), Some(trace.traceparent())).await?;
    // The reader's own feed is on this shard: the unfollowed user's items leave it with the
    // unfollow. A fan-out copying one of theirs meanwhile holds this row `FOR SHARE` and skips it.
    tx.exec("DELETE FROM feed_items WHERE user_id = $1 AND actor_id = $2", &[&caller, &followee]).await?;
    shard.commit_jobs(tx).await?;
    state.users.floors.wrote(&shard, &client, caller).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Counts the follower's change and writes its event, in the request's transaction.
async fn announce(
    tx: &Transaction<'_>,
    follower: UserId,
    followee: UserId,
    following: bool,
    changed: &tokio_postgres::Row,
    traceparent: String,
) -> Result<(), ApiError> {
    let by: i64 = if following { 1 } else { -1 };
    let follower_name: String = tx
        .maybe_row(
            "UPDATE users SET following_count = following_count + $2 WHERE id = $1 RETURNING name",
            &[&follower, &by],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("user", &follower.to_string()))?
        .get(0);
    let event = FollowChanged {
        user_id: follower,
        follower_name,
        followee_id: followee,
        following,
        version: changed.get("version"),
        changed_at_ms: super::micros(changed.get("changed_at")) / 1000,
    };
    keel_outbox::enqueue(tx, &events::event(&event, follower, Some(traceparent))).await?;
    Ok(())
}

/// The job of a [`FollowChanged`] event: the followed user's side, on their shard, applied only over
/// an older version, with their count moved when the edge turns active or inactive. A new follow
/// then copies the followed user's recent activities into the follower's feed ([`fanout::backfill`]).
pub async fn apply(db: &Databases, feed: Settings, job: &Job) -> Result<(), JobError> {
    let event = FollowChanged::from_job(job)?;
    Ok(apply_event(db, feed, &event).await?)
}

async fn apply_event(db: &Databases, feed: Settings, event: &FollowChanged) -> Result<(), DbError> {
    let shard = db.shard_of(event.followee_id);
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    let changed_at = super::from_micros(event.changed_at_ms * 1000);
    // A row to lock, even for the first change: its version 0 is older than any change's.
    tx.exec(
        "INSERT INTO followers (user_id, follower_id, follower_name, active, version, changed_at)
         VALUES ($1, $2, $3, false, 0, $4) ON CONFLICT DO NOTHING",
        &[&event.followee_id, &event.user_id, &event.follower_name, &changed_at],
    )
    .await?;
    let row = tx
        .row(
            "SELECT active, version FROM followers WHERE user_id = $1 AND follower_id = $2 FOR UPDATE",
            &[&event.followee_id, &event.user_id],
        )
        .await?;
    let (active, version): (bool, i64) = (row.get(0), row.get(1));
    if event.version > version {
        tx.exec(
            "UPDATE followers SET active = $3, version = $4, changed_at = $5, follower_name = $6
             WHERE user_id = $1 AND follower_id = $2",
            &[&event.followee_id, &event.user_id, &event.following, &event.version, &changed_at, &event.follower_name],
        )
        .await?;
        if active != event.following {
            let by: i64 = if event.following { 1 } else { -1 };
            tx.exec(
                "UPDATE users SET followers_count = followers_count + $2 WHERE id = $1",
                &[&event.followee_id, &by],
            )
            .await?;
        }
    }
    tx.commit().await?;
    drop(client);
    if event.following {
        fanout::backfill(db, feed, event.user_id, event.followee_id).await?;
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/users/{id}/followers", tag = "follows",
    params(("id" = String, Path, description = "The user"), PageParams),
    responses((status = 200, description = "Who follow the user, newest first. Others may see a list up to the \
            profile budget (5 min) late; a follow reaches the followed user's list through the queue.", body = Page<FollowUser>),
        (status = 400, description = "A cursor this API did not issue", body = Problem),
        (status = 404, description = "No such user", body = Problem),
        (status = 422, description = "A limit out of range", body = Problem)))]
pub async fn followers(
    State(state): State<FeedState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<PageParams>,
) -> Result<Json<Page<FollowUser>>, ApiError> {
    list(&state, caller, &id, &params, Side::Followers).await
}

#[utoipa::path(get, path = "/v1/users/{id}/following", tag = "follows",
    params(("id" = String, Path, description = "The user"), PageParams),
    responses((status = 200, description = "Whom the user follows, newest first. The user reads their own follows \
            at once; others up to the profile budget (5 min) late.", body = Page<FollowUser>),
        (status = 400, description = "A cursor this API did not issue", body = Problem),
        (status = 404, description = "No such user", body = Problem),
        (status = 422, description = "A limit out of range", body = Problem)))]
pub async fn following(
    State(state): State<FeedState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<PageParams>,
) -> Result<Json<Page<FollowUser>>, ApiError> {
    list(&state, caller, &id, &params, Side::Following).await
}

#[derive(Clone, Copy)]
enum Side {
    Followers,
    Following,
}

/// One page of a user's followers or followed users, keyset-paginated on (time of the follow, id),
/// from their shard: a replica within the profile budget, or one past the owner's own last write.
async fn list(
    state: &FeedState,
    caller: Caller,
    id: &str,
    params: &PageParams,
    side: Side,
) -> Result<Json<Page<FollowUser>>, ApiError> {
    let user = parse_id::<UserId>("user", id)?;
    let limit = PageParams::page_size(params.limit)?;
    let after = params.cursor.as_deref().map(|raw| cursor::read_keyed(cursor::FOLLOWS, raw)).transpose()?;
    let (table, other, name) = match side {
        Side::Followers => ("followers", "follower_id", "follower_name"),
        Side::Following => ("follows", "followee_id", "followee_name"),
    };
    // The partial index on (user_id, changed_at DESC, other DESC) WHERE active serves both forms.
    let sql = match after {
        None => format!(
            "SELECT {other} AS id, {name} AS name, changed_at FROM {table} WHERE user_id = $1 AND active
             ORDER BY changed_at DESC, {other} DESC LIMIT $2"
        ),
        Some(_) => format!(
            "SELECT {other} AS id, {name} AS name, changed_at FROM {table} WHERE user_id = $1 AND active
             AND (changed_at, {other}) < ($3, $4) ORDER BY changed_at DESC, {other} DESC LIMIT $2"
        ),
    };
    let shard = state.db().shard_of(user);
    let floor = if caller.user() == Some(user) { state.users.floors.of(&shard, user).await } else { Floor::Any };
    let budget = state.users.profiles.ttl();
    let (sql, rows_wanted) = (sql.as_str(), limit + 1);
    let after_time = after.map(|(us, _)| super::from_micros(us));
    let after_id = after.map(|(_, id)| id);
    let query = |client: crate::db::Client| async move {
        let rows = match (&after_time, &after_id) {
            (Some(t), Some(id)) => client.rows(sql, &[&user, &rows_wanted, t, id]).await?,
            _ => client.rows(sql, &[&user, &rows_wanted]).await?,
        };
        // An empty list of a user who does not exist is a 404, not an empty page.
        let exists =
            !rows.is_empty() || client.maybe_row("SELECT 1 FROM users WHERE id = $1", &[&user]).await?.is_some();
        Ok((rows, exists))
    };
    let mut read = shard.read(DataKind::Profile, budget, floor, query).await?;
    if !read.value.1 && read.target == Target::Replica {
        // A replica may not have a new user yet: only the primary says there is none.
        read = shard.read(DataKind::Profile, budget, Floor::Primary, query).await?;
    }
    let (rows, exists) = read.value;
    if !exists {
        return Err(ApiError::not_found("user", &user.to_string()));
    }
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next_cursor = match rows.last() {
        Some(last) if more => Some(cursor::keyed(
            cursor::FOLLOWS,
            super::micros(last.get("changed_at")),
            last.get::<_, UserId>("id").as_uuid(),
        )),
        _ => None,
    };
    let items = rows.iter().map(|r| FollowUser { id: r.get("id"), name: r.get("name") }).collect();
    Ok(Json(Page { items, next_cursor }))
}

/// Erasure, on the erased user's shard, in its transaction (before their rows are deleted with the
/// other tables they are in): for each of their follows, an event that deletes its other side, and
/// for each of their activities, one that takes it out of every feed. Returns the events, for the
/// erasure to write once it has deleted the jobs that named the user: they carry the user's id and
/// nothing else of theirs.
pub async fn erased_user_leaves(
    tx: &Transaction<'_>,
    user: UserId,
) -> Result<Vec<keel_outbox::NewJob>, crate::db::PgError> {
    let mut jobs = Vec::new();
    for row in tx.rows("SELECT followee_id FROM follows WHERE user_id = $1", &[&user]).await? {
        let erased = FollowerErased { user_id: user, followee_id: row.get(0) };
        jobs.push(events::event(&erased, user, None));
    }
    for row in tx.rows("SELECT id FROM activities WHERE user_id = $1", &[&user]).await? {
        let withdrawn = crate::events::ActivityWithdrawn { user_id: user, activity_id: row.get(0) };
        jobs.push(events::event(&withdrawn, user, None));
    }
    Ok(jobs)
}

/// The job of a [`FollowerErased`] event: the followed user's side of an erased user's follow goes,
/// and their count with it if it was active. One statement: safe to run again.
pub async fn forget_erased_follower(db: &Databases, job: &Job) -> Result<(), JobError> {
    let event = FollowerErased::from_job(job)?;
    db.shard_of(event.followee_id)
        .client()
        .await?
        .exec(
            "WITH gone AS (DELETE FROM followers WHERE user_id = $1 AND follower_id = $2 RETURNING active)
             UPDATE users SET followers_count = followers_count - 1
             WHERE id = $1 AND EXISTS (SELECT 1 FROM gone WHERE active)",
            &[&event.followee_id, &event.user_id],
        )
        .await
        .map_err(DbError::from)?;
    Ok(())
}

/// Erasure, before the user's shard is erased: everyone who ever followed them forgets it, on each
/// follower's shard (where a follow is decided): the follow row goes (their following count with it,
/// if active), and so does their "followed" activity, with its withdrawal event, and the followers'
/// jobs that name the erased user. One transaction per shard; safe to repeat (what is gone stays gone).
pub async fn erased_user_is_unfollowed(db: &Databases, user: UserId) -> Result<(), DbError> {
    let followers: Vec<UserId> = db
        .shard_of(user)
        .client()
        .await?
        .rows("SELECT follower_id FROM followers WHERE user_id = $1", &[&user])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (shard, followers) in fanout::by_shard(db, &followers) {
        let mut client = shard.client().await?;
        let tx = client.transaction().await?;
        tx.exec(
            "WITH gone AS (DELETE FROM follows WHERE user_id = ANY($1) AND followee_id = $2 RETURNING user_id, active)
             UPDATE users SET following_count = following_count - 1
             WHERE id IN (SELECT user_id FROM gone WHERE active)",
            &[&followers, &user],
        )
        .await?;
        let withdrawn = tx
            .rows(
                "DELETE FROM activities WHERE user_id = ANY($1) AND verb = $2 AND object_id = $3 RETURNING user_id, id",
                &[&followers, &Verb::Followed.as_str(), &user.as_uuid()],
            )
            .await?;
        for row in &withdrawn {
            let event = crate::events::ActivityWithdrawn { user_id: row.get(0), activity_id: row.get(1) };
            keel_outbox::enqueue(&tx, &events::event(&event, row.get::<_, UserId>(0), None)).await?;
        }
        // The followers' own jobs that name the erased user (a follow's, its activity's), finished or
        // not yet run: what they would do is undone above. A scan of the queue, as erasures are rare.
        tx.exec(
            "DELETE FROM keel_jobs WHERE state IN ('pending', 'done', 'dead')
             AND ((kind = $2 AND payload->>'followee_id' = $1) OR (kind = $3 AND payload->'activity'->>'object_id' = $1))",
            &[&user.to_string(), &FollowChanged::NAME, &crate::events::ActivityPosted::NAME],
        )
        .await?;
        shard.commit_jobs(tx).await?;
    }
    Ok(())
}
