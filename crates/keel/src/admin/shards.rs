//! The shards: `GET /v1/admin/shards` (the map as this node routes by it, and each shard's users),
//! `POST /v1/admin/shards` (a new, empty shard: see [`crate::db::shard_map::register`]), bucket moves
//! and `POST /v1/admin/shards/rebalance` ([`super::rebalance`]). `keel shards` calls the same
//! functions as these handlers ([`status`], [`add_shard`], [`moves::start`],
//! [`super::rebalance::rebalance`]), so the command line and the API cannot drift apart.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use keel_shard::ShardId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::rebalance::{self, Rebalance, RebalanceError};
use crate::db::moves::{self, CancelError, Move, StartError};
use crate::db::shard_map::{self, AddError};
use crate::db::{ConnectError, Databases, Sql};
use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{Json, Path};
use crate::state::AppState;

/// How long a shard may take to count its users before it is reported down.
const COUNT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, ToSchema)]
pub struct Shards {
    /// The map's version this node routes by; every change raises it.
    pub version: i64,
    pub shards: Vec<ShardStatus>,
    /// Bucket moves: unfinished ones, then the newest finished, 20 at most.
    pub moves: Vec<Move>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ShardStatus {
    pub shard: u16,
    /// The buckets (0–1023) this shard holds.
    pub buckets: Vec<u16>,
    /// Users on the shard; null when it did not answer.
    pub users: Option<i64>,
    /// Whether it answered within 2 s.
    pub up: bool,
}

#[utoipa::path(get, path = "/v1/admin/shards", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "The shard map this node routes by, and each shard's users", body = Shards),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list(State(state): State<AppState>, _: Admin) -> Result<Json<Shards>, ApiError> {
    Ok(Json(status(&state.db).await.map_err(connect_error)?))
}

/// The shards as `db` routes by them now, each one's users (asked of all at once, each given
/// [`COUNT_TIMEOUT`]), and the recent moves.
pub async fn status(db: &Databases) -> Result<Shards, ConnectError> {
    let set = db.shards();
    let counts = set.all().map(|(_, db)| async move {
        let count =
            async { Ok::<i64, ConnectError>(db.client().await?.row("SELECT count(*) FROM users", &[]).await?.get(0)) };
        tokio::time::timeout(COUNT_TIMEOUT, count).await.ok().and_then(Result::ok)
    });
    let counts = futures_util::future::join_all(counts).await;
    let map = set.map();
    let shards = set
        .all()
        .zip(counts)
        .map(|((n, _), users)| ShardStatus {
            shard: n,
            buckets: map.assignments().filter(|(_, s)| *s == n).map(|(b, _)| b).collect(),
            users,
            up: users.is_some(),
        })
        .collect();
    let moves = moves::recent(db, 20).await?;
    Ok(Shards { version: set.version, shards, moves })
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewShard {
    /// A PostgreSQL connection string (URL or key=value) of an empty database that every Keel process
    /// can reach. Stored in the catalogue: prefer one without a password (a `.pgpass` file, a
    /// certificate) where the deployment allows it.
    pub url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ShardAdded {
    pub shard: u16,
}

#[utoipa::path(post, path = "/v1/admin/shards", tag = "admin", request_body = NewShard, security(("bearer" = [])),
    responses(
        (status = 201, description = "Migrated and registered, with no buckets yet", body = ShardAdded),
        (status = 400, description = "Not a PostgreSQL connection string, or a body that is not JSON", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "Already a shard, or the database holds users", body = Problem),
        (status = 422, description = "The database cannot be reached or migrated", body = Problem)))]
pub async fn add(
    State(state): State<AppState>,
    _: Admin,
    Json(input): Json<NewShard>,
) -> Result<(StatusCode, Json<ShardAdded>), ApiError> {
    let shard = add_shard(&state.db, &input.url).await.map_err(|e| match e {
        AddError::BadUrl(m) => ApiError::BadRequest(format!("url: {m}")),
        AddError::Unreachable(m) => ApiError::Unprocessable(format!("url: {m}")),
        AddError::Conflict(m) => ApiError::Conflict(m),
        AddError::Connect(e) => connect_error(e),
    })?;
    Ok((StatusCode::CREATED, Json(ShardAdded { shard })))
}

/// Adds the database at `url` (spaces around it ignored) as a new shard with no buckets.
pub async fn add_shard(db: &Databases, url: &str) -> Result<ShardId, AddError> {
    if url.trim().is_empty() {
        return Err(AddError::BadUrl("a PostgreSQL connection string is required".into()));
    }
    shard_map::register(db, url.trim()).await
}

fn connect_error(e: ConnectError) -> ApiError {
    match e {
        ConnectError::Db(e) => ApiError::from(e),
        ConnectError::Query(e) => ApiError::from(e),
        other => ApiError::Internal(other.to_string()),
    }
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMove {
    /// Bucket numbers (0–1023), from whichever shards hold them now.
    pub buckets: Vec<u16>,
    /// The shard they move to.
    pub to: u16,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MoveStarted {
    pub id: String,
}

#[utoipa::path(post, path = "/v1/admin/shards/moves", tag = "admin", request_body = NewMove, security(("bearer" = [])),
    responses(
        (status = 202, description = "Recorded; a worker carries it out (GET the move for its progress)", body = MoveStarted),
        (status = 400, description = "A body that is not JSON or not a move", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "A bucket is moving already, or every one is on that shard", body = Problem),
        (status = 422, description = "No such shard or bucket", body = Problem)))]
pub async fn start_move(
    State(state): State<AppState>,
    _: Admin,
    Json(input): Json<NewMove>,
) -> Result<(StatusCode, Json<MoveStarted>), ApiError> {
    let started = moves::start(&state.db, &input.buckets, input.to).await.map_err(start_error)?;
    Ok((StatusCode::ACCEPTED, Json(MoveStarted { id: started.id.to_string() })))
}

fn start_error(e: StartError) -> ApiError {
    match e {
        StartError::Invalid(m) => ApiError::Unprocessable(m),
        StartError::Conflict(m) => ApiError::Conflict(m),
        StartError::Connect(e) => connect_error(e),
    }
}

#[utoipa::path(get, path = "/v1/admin/shards/moves/{id}", tag = "admin",
    params(("id" = String, Path, description = "The move's id")), security(("bearer" = [])),
    responses((status = 200, description = "The move's state and progress", body = Move),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such move", body = Problem)))]
pub async fn get_move(State(state): State<AppState>, _: Admin, Path(id): Path<String>) -> Result<Json<Move>, ApiError> {
    let not_found = || ApiError::not_found("move", &id);
    let parsed: uuid::Uuid = id.parse().map_err(|_| not_found())?;
    moves::get(&state.db, parsed).await.map_err(connect_error)?.map(Json).ok_or_else(not_found)
}

#[utoipa::path(delete, path = "/v1/admin/shards/moves/{id}", tag = "admin",
    params(("id" = String, Path, description = "The move's id")), security(("bearer" = [])),
    responses((status = 202, description = "Cancelled: a worker undoes it and records it failed (GET the move)", body = Move),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such move", body = Problem),
        (status = 409, description = "Its map has switched already, or it has ended", body = Problem)))]
pub async fn cancel_move(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Move>), ApiError> {
    let not_found = || ApiError::not_found("move", &id);
    let parsed: uuid::Uuid = id.parse().map_err(|_| not_found())?;
    let cancelled = moves::cancel(&state.db, parsed).await.map_err(|e| match e {
        CancelError::NotFound(_) => not_found(),
        CancelError::Conflict(m) => ApiError::Conflict(m),
        CancelError::Connect(e) => connect_error(e),
    })?;
    Ok((StatusCode::ACCEPTED, Json(cancelled)))
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebalanceOptions {
    /// Only plan: answer with the moves it would ask for, and ask for none.
    #[serde(default)]
    pub dry_run: bool,
}

#[utoipa::path(post, path = "/v1/admin/shards/rebalance", tag = "admin", request_body = Option<RebalanceOptions>,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A dry run, or nothing worth moving: the plan, and no move asked for", body = Rebalance),
        (status = 202, description = "The plan's moves asked for; a worker carries them out (GET each move for its progress)",
            body = Rebalance),
        (status = 400, description = "A body that is not JSON", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "A move is not finished yet, or a move of the plan was refused", body = Problem),
        (status = 422, description = "A body that is not the options", body = Problem),
        (status = 503, description = "A shard did not answer with its users", body = Problem)))]
pub async fn rebalance(
    State(state): State<AppState>,
    _: Admin,
    request: Request,
) -> Result<(StatusCode, Json<Rebalance>), ApiError> {
    let options: RebalanceOptions = optional_json(request).await?;
    let done = rebalance::rebalance(&state.db, options.dry_run).await.map_err(|e| {
        let message = e.to_string();
        match e {
            RebalanceError::Busy(_) => ApiError::Conflict(message),
            RebalanceError::ShardDown(_) => ApiError::Unavailable(message),
            RebalanceError::Start { source: StartError::Connect(e), .. } | RebalanceError::Connect(e) => {
                connect_error(e)
            }
            // A move of the plan refused: the map or the moves changed since the plan was made (a
            // rebalance or a move asked for meanwhile). The message names the moves already started.
            RebalanceError::Start { .. } => ApiError::Conflict(message),
        }
    })?;
    let status = if done.moves.iter().any(|m| m.id.is_some()) { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(done)))
}

/// A JSON body that may be left out, `T::default()` then. One that is there goes through [`Json`],
/// so it is held to the same rules as any other body (a JSON content type, at most 1 MiB) and its
/// faults are told the same way.
async fn optional_json<T: DeserializeOwned + Default>(request: Request) -> Result<T, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes =
        Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await.map_err(
            |rejection| match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::PayloadTooLarge("the request body is larger than 1 MiB".into())
                }
                _ => ApiError::BadRequest(rejection.body_text()),
            },
        )?;
    if bytes.is_empty() {
        return Ok(T::default());
    }
    let Json(value) = Json::<T>::from_request(Request::from_parts(parts, Body::from(bytes)), &()).await?;
    Ok(value)
}
