//! Operational endpoints: liveness, readiness, Prometheus metrics and the OpenAPI document, which
//! describes these too.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use utoipa::{OpenApi, ToSchema};

use crate::consistency::KINDS;
use crate::db::migrations::{self, Schema};
use crate::db::Databases;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::Json;
use crate::state::AppState;
use crate::telemetry;

/// How long readiness waits for each database before calling it unreachable.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the queue gauges of `/metrics` (`keel_queue_depth`, `keel_queue_oldest_pending_seconds`)
/// are counted again. Counting is a `GROUP BY` over the job table of every database, and `/metrics`
/// answers anyone: counted at each scrape, any caller could make every database do that work as
/// often as it liked. So a timer counts, and a scrape renders what the last count recorded, at most
/// this old — well within a Prometheus scrape interval (15 s or more).
pub(super) const QUEUE_GAUGES_REFRESH: Duration = Duration::from_secs(5);

#[derive(OpenApi)]
#[openapi(paths(healthz, readyz, metrics, openapi_json), components(schemas(Status)))]
struct OpsDoc;

/// The operational routes, with `doc` (the API's document) completed by their own description and
/// served at `/openapi.json`.
pub fn router(mut doc: utoipa::openapi::OpenApi) -> Router<AppState> {
    doc.merge(OpsDoc::openapi());
    let doc = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(move || openapi_json(doc.clone())))
}

/// How a process sees itself.
#[derive(Debug, Serialize, ToSchema)]
struct Status {
    /// `alive` or `ready`.
    #[schema(example = "ready")]
    status: &'static str,
}

/// Liveness: the process answers requests. Checks nothing else.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "The process is up: `{\"status\": \"alive\"}`", body = Status)))]
async fn healthz() -> Json<Status> {
    Json(Status { status: "alive" })
}

/// Ready when every database answers and is at the schema version this binary expects.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "Every database answers and is at this binary's schema version: \
            `{\"status\": \"ready\"}`", body = Status),
        (status = 503, description = "Not ready: the detail names each database that is unreachable or at another \
            schema version (why one is unreachable is logged, not answered)", body = Problem,
            content_type = "application/problem+json"),
    ))]
async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let mut problems = Vec::new();
    for (db, schema) in
        state.db.all().into_iter().zip(std::iter::once(Schema::Catalog).chain(std::iter::repeat(Schema::Shard)))
    {
        match tokio::time::timeout(READY_CHECK_TIMEOUT, migrations::current_version(&db)).await {
            Ok(Ok(version)) if version == schema.latest() => {}
            Ok(Ok(version)) => problems.push(format!(
                "{} is at schema version {version}, this binary needs {}: run `keel migrate`",
                db.name(),
                schema.latest()
            )),
            // The driver's words (addresses, database and role names) go to the log, not to callers.
            Ok(Err(e)) => {
                tracing::warn!(db = db.name(), error = %e, "readiness: database not reachable");
                problems.push(format!("{} is not reachable", db.name()));
            }
            Err(_) => problems.push(format!("{} did not answer within {READY_CHECK_TIMEOUT:?}", db.name())),
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::Unavailable(problems.join("; ")));
    }
    Ok((StatusCode::OK, Json(Status { status: "ready" })))
}

/// Prometheus metrics: requests by route and status, database pools, queues, caches, search lag.
///
/// A scrape sends no query: the queue gauges are those of the last refresh (every
/// [`QUEUE_GAUGES_REFRESH`], see [`refresh_queue_gauges`]); the pool gauges are read from the pools
/// in this process.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "The Prometheus text exposition format, version 0.0.4; the queue \
        gauges are counted on a timer (every few seconds), not at each scrape", body = String,
        content_type = "text/plain; version=0.0.4")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    for db in state.db.all() {
        telemetry::record_pool(db.name(), db.pool_status());
    }
    for kind in KINDS.iter().map(|row| row.kind) {
        if let Some(stats) = state.cache_stats(kind) {
            metrics::gauge!("keel_cache_loads_in_flight", "kind" => kind.name()).set(stats.loads_in_flight as f64);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], telemetry::render_metrics())
}

/// Counts every queue once and records the gauges; a database that cannot be counted leaves them
/// at their last values, and is logged.
pub(super) async fn refresh_queue_gauges_once(databases: &Databases) {
    if let Err(e) = crate::admin::queue_stats(databases).await {
        tracing::warn!(error = %e, "queue gauges not refreshed; /metrics shows the last counts");
    }
}

/// Refreshes the queue gauges every [`QUEUE_GAUGES_REFRESH`] until `stop` completes, which also
/// abandons a count in progress (shutdown does not wait on a slow database for a gauge).
pub(super) async fn refresh_queue_gauges(databases: std::sync::Arc<Databases>, stop: impl Future<Output = ()> + Send) {
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            () = tokio::time::sleep(QUEUE_GAUGES_REFRESH) => {}
            () = &mut stop => return,
        }
        tokio::select! {
            () = refresh_queue_gauges_once(&databases) => {}
            () = &mut stop => return,
        }
    }
}

/// This document: every route of the API, generated from the same list as the routes themselves.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object,
        content_type = "application/json")))]
async fn openapi_json(doc: Bytes) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc)
}
