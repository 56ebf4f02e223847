//! Operational endpoints: liveness, readiness, Prometheus metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::time::Duration;

use super::error::ApiError;
use super::extract::Json;
use crate::db::migrations::{self, Schema};
use crate::startup::AppState;
use crate::telemetry;

/// How long readiness waits for each database before calling it unreachable.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(doc: utoipa::openapi::OpenApi) -> Router<AppState> {
    let doc = std::sync::Arc::new(doc);
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({ "status": "alive" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(move || async move { Json(serde_json::to_value(&*doc).unwrap_or_default()) }))
}

/// Ready when every database answers and is at the schema version this binary expects.
async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let mut problems = Vec::new();
    for (db, schema) in state.db.all().zip(std::iter::once(Schema::Catalog).chain(std::iter::repeat(Schema::Shard))) {
        match tokio::time::timeout(READY_CHECK_TIMEOUT, migrations::current_version(db)).await {
            Ok(Ok(version)) if version == schema.latest() => {}
            Ok(Ok(version)) => problems.push(format!(
                "{} is at schema version {version}, this binary needs {}: run `keel migrate`",
                db.name(),
                schema.latest()
            )),
            Ok(Err(e)) => problems.push(format!("{} is unreachable: {e}", db.name())),
            Err(_) => problems.push(format!("{} did not answer within {READY_CHECK_TIMEOUT:?}", db.name())),
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::Unavailable(problems.join("; ")));
    }
    Ok((StatusCode::OK, Json(serde_json::json!({ "status": "ready" }))))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    for db in state.db.all() {
        telemetry::record_pool(db.name(), db.pool_status());
    }
    if let Err(e) = crate::admin::queue_stats(&state).await {
        tracing::warn!(error = %e, "queue gauges not refreshed");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], telemetry::render_metrics())
}
