//! `GET /v1/admin/replicas`: every database's replicas as this node sees them: up or not, how far
//! behind, and how many reads each served ([`crate::db::replicas`]).

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::replicas::ReplicaStatus;
use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::Json;
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Replicas {
    pub databases: Vec<DatabaseReplicas>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DatabaseReplicas {
    /// `catalog`, `shard_0`, `shard_1`, …
    pub database: String,
    /// In the order configured (`KEEL_CATALOG_REPLICA_URLS`, `KEEL_SHARD_REPLICA_URLS`); empty for
    /// a database without replicas.
    pub replicas: Vec<ReplicaStatus>,
}

#[utoipa::path(get, path = "/v1/admin/replicas", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Every database's replicas, their lag as this node measured it, and the \
        reads each served", body = Replicas),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list(State(state): State<AppState>, _: Admin) -> Result<Json<Replicas>, ApiError> {
    let all = state.db.all();
    let databases = all
        .iter()
        .filter_map(|db| db.routing())
        .map(|routing| DatabaseReplicas { database: routing.database().to_owned(), replicas: routing.status() })
        .collect();
    Ok(Json(Replicas { databases }))
}
