//! `GET /v1/admin/consistency`: the consistency table ([`crate::consistency`]) with this node's live
//! counters, read from the caches and the like counter it holds.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::consistency::{DataKind, KINDS};
use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::Json;
use crate::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct KindReport {
    pub kind: &'static str,
    pub budget_s: f64,
    pub policy: &'static str,
    /// Where this node reads the kind from, in order: the shared tier (Redis) appears only when
    /// this node is configured with one (`KEEL_REDIS_URL`).
    pub source: String,
    /// Served from this node's memory.
    pub hits: u64,
    /// Served from the shared tier (Redis).
    pub shared_hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub evictions: u64,
    pub served_age_p99_ms: f64,
    /// Database reads of this kind on this node served by a replica, and by the primary, since
    /// start: cache misses, lists and searches, routed by the kind's budget, and the strong kinds'
    /// reads, always from the primary. Kinds not read from a database per request count none.
    pub replica_reads: u64,
    pub primary_reads: u64,
    /// For the like count: how long ago this node merged the shards' tallies (every read is served
    /// from the merged copy, counted in `hits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_ms_ago: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Table {
    pub kinds: Vec<KindReport>,
    /// The shared tier (Redis), absent when not configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_tier: Option<SharedTier>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SharedTier {
    /// False while an outage is noticed: reads use this node's memory and the databases.
    pub up: bool,
    /// Failed or timed-out calls since start.
    pub errors: u64,
}

#[utoipa::path(get, path = "/v1/admin/consistency", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "The consistency table with this node's live counters", body = Table),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn table(State(state): State<AppState>, _: Admin) -> Result<Json<Table>, ApiError> {
    let shared_tier = state.shared.is_some();
    let kinds = KINDS
        .iter()
        .map(|k| {
            let mut stats = state.cache_stats(k.kind).unwrap_or_default();
            let mut merged_ms_ago = None;
            if k.kind == DataKind::LikeCount {
                let (reads, merged_ago) = state.likes.read_stats();
                stats.hits = reads;
                merged_ms_ago = merged_ago.map(|ago| ago.as_millis() as u64);
            }
            let [primary_reads, replica_reads] = state
                .db
                .all()
                .into_iter()
                .filter_map(|db| db.routing().map(|r| r.reads_of(k.kind)))
                .fold([0, 0], |[p, r], [dp, dr]| [p + dp, r + dr]);
            KindReport {
                replica_reads,
                primary_reads,
                kind: k.kind.name(),
                budget_s: state.config.budget(k.kind).as_secs_f64(),
                policy: k.policy.as_str(),
                source: k.source.describe(shared_tier),
                hits: stats.hits,
                shared_hits: stats.shared_hits,
                misses: stats.misses,
                coalesced: stats.coalesced,
                evictions: stats.evictions,
                served_age_p99_ms: stats.served_age_p99_ms,
                merged_ms_ago,
            }
        })
        .collect();
    let shared_tier = state.shared.as_ref().map(|s| {
        let stats = s.stats();
        SharedTier { up: stats.up, errors: stats.errors }
    });
    Ok(Json(Table { kinds, shared_tier }))
}
