//! `GET /v1/feed`: a page of the reader's feed, newest first. One query on the reader's shard for
//! the stored feed and, when the reader may follow large accounts, one more for which of them they
//! follow; those accounts' recent activities come from the cache (loaded on a miss from their shard).
//! Never a query per item or per followed user.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::{Activity, FeedState, FEED_ITEM_COLUMNS};
use crate::consistency::DataKind;
use crate::db::replicas::Floor;
use crate::db::Sql;
use crate::http::auth::AuthUser;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{Json, Query};
use crate::http::{cursor, timestamp, Page, PageParams};
use crate::ids::UserId;

/// How many of a large account's newest activities are cached and merged into its followers' feeds.
pub const RECENT_OF_LARGE: i64 = 100;

#[derive(Debug, Serialize, ToSchema)]
pub struct FeedItem {
    /// The activity's id.
    pub id: String,
    pub actor: Actor,
    /// `liked` or `followed`.
    #[schema(value_type = String)]
    pub verb: super::Verb,
    pub object: Object,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Actor {
    #[schema(value_type = String)]
    pub id: UserId,
    /// Their name when they acted.
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Object {
    /// `product` or `user`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: super::ObjectType,
    pub id: String,
}

impl From<&Activity> for FeedItem {
    fn from(a: &Activity) -> FeedItem {
        FeedItem {
            id: a.id.to_string(),
            actor: Actor { id: a.actor_id, name: a.actor_name.clone() },
            verb: a.verb,
            object: Object { kind: a.object_type, id: a.object_id.to_string() },
            created_at: timestamp(super::from_micros(a.created_at_us)),
        }
    }
}

#[utoipa::path(get, path = "/v1/feed", tag = "follows", params(PageParams),
    security(("bearer" = [])),
    responses((status = 200, description = "What the users the caller follows did, newest first. Consistency kind \
            `feed`, budget 30 s: an activity appears, and an unfollowed user's items leave, within it. Pages continue \
            after the previous page's last item, so items added meanwhile shift nothing.", body = Page<FeedItem>),
        (status = 400, description = "A cursor this API did not issue", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, description = "A limit out of range", body = Problem)))]
pub async fn feed(
    State(state): State<FeedState>,
    AuthUser(reader): AuthUser,
    Query(params): Query<PageParams>,
) -> Result<Json<Page<FeedItem>>, ApiError> {
    let started = Instant::now();
    let limit = PageParams::page_size(params.limit)?;
    let before = params.cursor.as_deref().map(|raw| cursor::read_keyed(cursor::FEED, raw)).transpose()?;
    let shard = state.db().shard_of(reader);
    // The reader's own unfollow takes items out of their feed at once: they read past it.
    let floor = state.users.floors.of(&shard, reader).await;
    let large = state.large.current();
    let sql = match before {
        None => format!(
            "SELECT {FEED_ITEM_COLUMNS} FROM feed_items WHERE user_id = $1 ORDER BY created_at DESC, activity_id DESC LIMIT $2"
        ),
        Some(_) => format!(
            "SELECT {FEED_ITEM_COLUMNS} FROM feed_items WHERE user_id = $1 AND (created_at, activity_id) < ($3, $4)
             ORDER BY created_at DESC, activity_id DESC LIMIT $2"
        ),
    };
    let (sql, wanted) = (sql.as_str(), limit + 1);
    let before_time = before.map(|(us, _)| super::from_micros(us));
    let before_id = before.map(|(_, id)| id);
    let large_ref = &large;
    let read = shard
        .read(DataKind::Feed, state.budget, floor, |client| async move {
            let rows = match (&before_time, &before_id) {
                (Some(t), Some(id)) => client.rows(sql, &[&reader, &wanted, t, id]).await?,
                _ => client.rows(sql, &[&reader, &wanted]).await?,
            };
            let followed_large: Vec<UserId> = if large_ref.is_empty() {
                Vec::new()
            } else {
                client
                    .rows(
                        "SELECT followee_id FROM follows WHERE user_id = $1 AND active AND followee_id = ANY($2)",
                        &[&reader, &**large_ref],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            };
            Ok((rows, followed_large))
        })
        .await?;
    let (rows, followed_large) = read.value;
    let mut items: Vec<Activity> = rows.iter().map(super::activity_from_row).collect();
    for actor in followed_large {
        let recent = recent_of(&state, actor).await?;
        items.extend(recent.iter().filter(|a| before.is_none_or(|b| super::feed_key(a) < b)).cloned());
    }
    // Newest first; an activity both copied and merged (an account that just crossed the limit) once.
    items.sort_unstable_by_key(|a| std::cmp::Reverse(super::feed_key(a)));
    items.dedup_by_key(|a| a.id);
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = match items.last() {
        Some(last) if more => Some(cursor::keyed(cursor::FEED, last.created_at_us, last.id)),
        _ => None,
    };
    metrics::histogram!("keel_feed_read_seconds").record(started.elapsed().as_secs_f64());
    Ok(Json(Page { items: items.iter().map(FeedItem::from).collect(), next_cursor }))
}

/// A large account's newest activities, through the cache (within the feed's budget).
async fn recent_of(state: &FeedState, actor: UserId) -> Result<Arc<Vec<Activity>>, ApiError> {
    let (recent, _) = state
        .recent
        .get_or_load_aged(&actor, || async {
            let sql = format!(
                "SELECT {} FROM activities WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
                super::ACTIVITY_COLUMNS
            );
            let sql = sql.as_str();
            let read = state
                .db()
                .shard_of(actor)
                .read(DataKind::Feed, state.budget, Floor::Any, |client| async move {
                    client.rows(sql, &[&actor, &RECENT_OF_LARGE]).await
                })
                .await?;
            let activities: Vec<Activity> = read.value.iter().map(super::activity_from_row).collect();
            Ok::<_, ApiError>((Arc::new(activities), read.lag))
        })
        .await?;
    Ok(recent)
}
