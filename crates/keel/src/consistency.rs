//! The consistency table (DESIGN §1), in one place: how stale each kind of data may be when read,
//! the cache policy that honours it, and where reads come from. Budgets are configuration
//! (`KEEL_CONSISTENCY_BUDGETS`); the strong kinds' budget is zero and cannot be changed.
//! `GET /v1/admin/consistency` serves the table with live counters.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use keel_cache::{Cache, Served, Shared, Tiers};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::Json;
use crate::startup::AppState;

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub name: &'static str,
    /// The default staleness budget; zero for strong kinds.
    pub budget: Duration,
    pub policy: &'static str,
    pub source: Source,
}

/// Where reads of a kind come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    /// Through this node's cache, kept in `tiers`, in front of `origin`. The shared tier (Redis)
    /// is optional: without it a [`Tiers::Both`] kind is cached in memory only, and a
    /// [`Tiers::SharedOnly`] kind is not cached at all.
    Cached { tiers: Tiers, origin: &'static str },
    /// Not through the caches.
    Direct(&'static str),
}

impl Source {
    /// What a node reads, in order, when it has the shared tier or not.
    pub fn describe(self, shared_tier: bool) -> String {
        match self {
            Source::Direct(origin) => origin.to_owned(),
            Source::Cached { tiers, origin } => {
                let memory = (tiers == Tiers::Both).then_some("memory");
                let redis = shared_tier.then_some("Redis");
                let path: Vec<&str> = memory.into_iter().chain(redis).chain([origin]).collect();
                path.join(" → ")
            }
        }
    }
}

pub const KINDS: &[Kind] = &[
    Kind {
        name: "profile",
        budget: Duration::from_secs(300),
        policy: "cache-aside",
        source: Source::Cached { tiers: Tiers::Both, origin: "shard" },
    },
    Kind {
        name: "product",
        budget: Duration::from_secs(60),
        policy: "write-through",
        source: Source::Cached { tiers: Tiers::Both, origin: "catalogue" },
    },
    // Only in the shared tier: a cart's owner may come back through any node (see `crate::carts`).
    Kind {
        name: crate::carts::CART_KIND,
        budget: Duration::from_secs(10),
        policy: "write-through",
        source: Source::Cached { tiers: Tiers::SharedOnly, origin: "shard primary" },
    },
    Kind {
        name: "like_count",
        budget: Duration::from_secs(2),
        policy: "write-back",
        source: Source::Direct("CRDT counter: own component + others merged every 250 ms"),
    },
    Kind {
        name: "feed",
        budget: Duration::from_secs(30),
        policy: "cache-aside",
        source: Source::Direct("not built yet"),
    },
    Kind { name: "search", budget: Duration::from_secs(2), policy: "derived", source: Source::Direct("search index") },
    Kind {
        name: "inventory",
        budget: Duration::ZERO,
        policy: "never cached",
        source: Source::Direct("catalogue primary"),
    },
    Kind { name: "wallet", budget: Duration::ZERO, policy: "never cached", source: Source::Direct("shard primary") },
    Kind { name: "order", budget: Duration::ZERO, policy: "never cached", source: Source::Direct("shard primary") },
];

/// The tiers a cached kind is kept in, as the table says.
fn tiers(kind: &str) -> Tiers {
    match KINDS.iter().find(|k| k.name == kind).map(|k| k.source) {
        Some(Source::Cached { tiers, .. }) => tiers,
        _ => panic!("{kind} is not a cached kind of the consistency table"),
    }
}

/// The budget of `kind` after configuration.
pub fn budget(config: &crate::config::Config, kind: &str) -> Duration {
    config
        .consistency_budgets
        .iter()
        .find(|(k, _)| k == kind)
        .map(|(_, b)| *b)
        .or_else(|| KINDS.iter().find(|k| k.name == kind).map(|k| k.budget))
        .unwrap_or(Duration::ZERO)
}

/// Checks `kind=duration` overrides: known, cacheable kinds only.
pub fn check_override(kind: &str, budget: Duration) -> Result<(), String> {
    let Some(known) = KINDS.iter().find(|k| k.name == kind) else {
        let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        return Err(format!("{kind:?} is not a kind of data; kinds are {}", names.join(", ")));
    };
    if known.budget.is_zero() && !budget.is_zero() {
        return Err(format!("{kind} is strongly consistent: its budget is 0"));
    }
    Ok(())
}

/// The caches of this node, one per cached kind, and the shared tier (Redis) if configured.
pub struct Caches {
    /// Public profiles (no e-mail), by user id.
    pub profiles: Cache<Uuid, Arc<crate::users::Profile>>,
    /// Products without their like count, by id (write-through).
    pub products: Cache<Uuid, Arc<crate::catalog::Product>>,
    /// Carts by owner, only in the shared tier (see [`crate::carts`]).
    pub carts: Cache<Uuid, Arc<crate::carts::Cart>>,
    pub shared: Option<Arc<Shared>>,
}

impl Caches {
    /// The caches; with `shared`, profiles, products and carts also live in Redis and this node
    /// hears of the other nodes' writes. (Like counts are not cached: each node holds a merged copy
    /// of every counter, see [`crate::likes`].)
    pub fn new(config: &crate::config::Config, shared: Option<Arc<Shared>>) -> Caches {
        let cart = crate::carts::CART_KIND;
        let mut profiles = Cache::new("profile", budget(config, "profile"), 100_000).tiers(tiers("profile"));
        let mut products = Cache::new("product", budget(config, "product"), 100_000).tiers(tiers("product"));
        let mut carts = Cache::new(cart, budget(config, cart), 100_000).tiers(tiers(cart));
        if let Some(shared) = &shared {
            profiles = profiles.shared(shared);
            products = products.shared(shared);
            carts = carts.shared(shared);
        }
        Caches { profiles, products, carts, shared }
    }

    /// The shared tier configured by `KEEL_REDIS_URL`, if any: subscribed to the invalidation channel
    /// when this returns (or given up on within a second, if Redis is down); values connect on use.
    pub async fn shared_tier(config: &crate::config::Config) -> Result<Option<Arc<Shared>>, String> {
        match &config.redis_url {
            Some(url) => Shared::connect(url, &config.redis_namespace)
                .await
                .map(Some)
                .map_err(|e| format!("KEEL_REDIS_URL: {e}")),
            None => Ok(None),
        }
    }

    fn of(&self, kind: &str) -> Option<keel_cache::Stats> {
        match kind {
            "profile" => Some(self.profiles.stats()),
            "product" => Some(self.products.stats()),
            "cart" => Some(self.carts.stats()),
            _ => None,
        }
    }
}

/// `Cache-Status` (RFC 9211) and `Age` (RFC 9111) for a response of a cacheable kind.
pub fn cache_headers(served: Served) -> [(HeaderName, HeaderValue); 2] {
    let (status, age) = match served {
        Served::Hit { age, ttl_left, shared: false } => {
            (format!("keel; hit; ttl={}", ttl_left.as_secs()), age.as_secs())
        }
        Served::Hit { age, ttl_left, shared: true } => {
            (format!("keel; hit; ttl={}; detail=shared", ttl_left.as_secs()), age.as_secs())
        }
        Served::Miss => ("keel; fwd=miss; stored".to_owned(), 0),
        Served::Coalesced => ("keel; fwd=miss; collapsed".to_owned(), 0),
        Served::Bypass => ("keel; fwd=bypass; detail=no-shared-tier".to_owned(), 0),
    };
    [
        (HeaderName::from_static("cache-status"), HeaderValue::from_str(&status).expect("ASCII")),
        (axum::http::header::AGE, HeaderValue::from(age)),
    ]
}

/// What a read that went around the cache says about it (the owner reading their own profile, a
/// product list).
pub fn bypass_headers(detail: &'static str) -> [(HeaderName, HeaderValue); 2] {
    [
        (
            HeaderName::from_static("cache-status"),
            HeaderValue::from_str(&format!("keel; fwd=bypass; detail={detail}")).expect("ASCII"),
        ),
        (axum::http::header::AGE, HeaderValue::from(0u64)),
    ]
}

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
    /// For write-back kinds: how much a crash can lose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_window_ms: Option<u64>,
    /// For the like count: how long ago this node merged the other nodes' flushed components (every
    /// read is served from the merged copy, counted in `hits`).
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
    let shared_tier = state.caches.shared.is_some();
    let kinds = KINDS
        .iter()
        .map(|k| {
            let mut stats = state.caches.of(k.name).unwrap_or_default();
            let mut merged_ms_ago = None;
            if k.name == "like_count" {
                let (reads, merged_ago) = state.likes.read_stats();
                stats.hits = reads;
                merged_ms_ago = merged_ago.map(|ago| ago.as_millis() as u64);
            }
            KindReport {
                kind: k.name,
                budget_s: budget(&state.config, k.name).as_secs_f64(),
                policy: k.policy,
                source: k.source.describe(shared_tier),
                hits: stats.hits,
                shared_hits: stats.shared_hits,
                misses: stats.misses,
                coalesced: stats.coalesced,
                evictions: stats.evictions,
                served_age_p99_ms: stats.served_age_p99_ms,
                loss_window_ms: (k.policy == "write-back").then(|| state.likes.loss_window().as_millis() as u64),
                merged_ms_ago,
            }
        })
        .collect();
    let shared_tier = state.caches.shared.as_ref().map(|s| {
        let stats = s.stats();
        SharedTier { up: stats.up, errors: stats.errors }
    });
    Ok(Json(Table { kinds, shared_tier }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(kind: &str, shared_tier: bool) -> String {
        KINDS.iter().find(|k| k.name == kind).unwrap().source.describe(shared_tier)
    }

    #[test]
    fn the_shared_tier_is_a_source_only_where_there_is_one() {
        assert_eq!(source("profile", true), "memory → Redis → shard");
        assert_eq!(source("profile", false), "memory → shard");
        assert_eq!(source("product", false), "memory → catalogue");
        assert_eq!(source("cart", true), "Redis → shard primary");
        assert_eq!(source("cart", false), "shard primary");
        assert_eq!(source("wallet", true), "shard primary");
        for kind in KINDS {
            assert!(!kind.source.describe(false).contains("Redis"), "{kind:?}");
        }
    }
}
