//! The consistency table, in one place: how stale each kind of data may be when read, the cache
//! policy that honours it, and where reads come from. Budgets are configuration
//! (`KEEL_CONSISTENCY_BUDGETS`, see [`crate::config::Config::budget`]); the strong kinds' budget is
//! zero and cannot be changed. Each cached kind's cache is built by the module that owns the data
//! (`users`, `catalog`, `carts`) from its row here; `GET /v1/admin/consistency`
//! ([`crate::admin::consistency`]) serves the table with live counters.

use std::time::Duration;

use keel_cache::Tiers;

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

/// The kind a cart is, in the table and as its cache's name.
pub const CART: &str = "cart";

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
        name: CART,
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
pub fn tiers(kind: &str) -> Tiers {
    match KINDS.iter().find(|k| k.name == kind).map(|k| k.source) {
        Some(Source::Cached { tiers, .. }) => tiers,
        _ => panic!("{kind} is not a cached kind of the consistency table"),
    }
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
