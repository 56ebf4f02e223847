//! Administration of the job queues: what is waiting, running and dead across every database (the
//! catalogue's queue and every shard's), and replaying a dead job. The consistency table and the
//! shop's credits to users' wallets are in their own modules, as are the shards and rebalancing.

pub mod consistency;
pub mod deposits;
pub mod locks;
pub mod queries;
pub mod rebalance;
pub mod replicas;
pub mod shards;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::Databases;
use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path};
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema, Default)]
pub struct QueueStats {
    pub kind: String,
    pub pending: i64,
    pub running: i64,
    pub dead: i64,
    /// Seconds since the oldest unfinished job (pending, running or relayed) was enqueued, over all
    /// databases: retries do not reset it.
    pub oldest_pending_age_s: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Queues {
    pub kinds: Vec<QueueStats>,
}

#[utoipa::path(get, path = "/v1/admin/queues", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Queues), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn queues(State(state): State<AppState>, _: Admin) -> Result<Json<Queues>, ApiError> {
    Ok(Json(Queues { kinds: queue_stats(&state.db).await? }))
}

/// Every kind's queue over all databases, counted live; also refreshes the queue gauges of
/// `/metrics`. Each call is a `GROUP BY` over the job table of every database: it runs for this
/// admin-only route and on the application's timer (`app::ops`), never for an anonymous scrape.
///
/// Every kind with a handler ([`crate::jobs::kinds`]) is reported, at zero while none of its jobs
/// is waiting, so dashboards and alerts see a series from the start rather than none; so is any
/// other kind found in a queue (jobs of a kind this build no longer handles).
pub async fn queue_stats(databases: &Databases) -> Result<Vec<QueueStats>, ApiError> {
    let mut merged: BTreeMap<String, QueueStats> = crate::jobs::kinds()
        .iter()
        .map(|kind| (kind.clone(), QueueStats { kind: kind.clone(), ..Default::default() }))
        .collect();
    // Scatter-gather: each database's queue counted there, merged here.
    for db in databases.all() {
        let client = db.client().await?;
        for stats in keel_outbox::stats(&client).await? {
            let entry = merged
                .entry(stats.kind.clone())
                .or_insert_with(|| QueueStats { kind: stats.kind, ..Default::default() });
            entry.pending += stats.pending;
            entry.running += stats.running;
            entry.dead += stats.dead;
            entry.oldest_pending_age_s = entry.oldest_pending_age_s.max(stats.oldest_pending_age_s);
        }
    }
    set_gauges(&merged);
    Ok(merged.into_values().collect())
}

/// Sets the queue gauges; a kind gauged before and gone from the queues since (its last jobs done
/// and pruned) is set to zero rather than left at its last value.
fn set_gauges(merged: &BTreeMap<String, QueueStats>) {
    // The recorder is the process's, so is the memory of what it was given.
    static GAUGED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut gauged = GAUGED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let gone: Vec<QueueStats> = gauged
        .iter()
        .filter(|kind| !merged.contains_key(*kind))
        .map(|kind| QueueStats { kind: kind.clone(), ..Default::default() })
        .collect();
    for stats in merged.values().chain(&gone) {
        let kind = stats.kind.clone();
        metrics::gauge!("keel_queue_depth", "kind" => kind.clone(), "state" => "pending").set(stats.pending as f64);
        metrics::gauge!("keel_queue_depth", "kind" => kind.clone(), "state" => "dead").set(stats.dead as f64);
        metrics::gauge!("keel_queue_oldest_pending_seconds", "kind" => kind).set(stats.oldest_pending_age_s);
    }
    gauged.extend(merged.keys().cloned());
}

#[utoipa::path(post, path = "/v1/admin/jobs/{id}/retry", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 202, description = "Queued again"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No dead job with this id", body = Problem)))]
pub async fn retry_job(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let id = parse_id::<uuid::Uuid>("dead job", &id)?;
    // A job id does not say which database holds it: ask each.
    for db in state.db.all() {
        let client = db.client().await?;
        if keel_outbox::replay(&client, id).await? {
            tracing::info!(job = %id, db = db.name(), "dead job replayed");
            return Ok(axum::http::StatusCode::ACCEPTED);
        }
    }
    Err(ApiError::not_found("dead job", &id.to_string()))
}
