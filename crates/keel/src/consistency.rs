//! The consistency table, in one place: how stale each kind of data may be when read, the cache
//! policy that honours it, and where reads come from. Budgets are configuration
//! (`KEEL_CONSISTENCY_BUDGETS`, see [`crate::config::Config::budget`]); the strong kinds' budget is
//! zero and cannot be changed. Each cached kind's cache is declared by the module that owns the data
//! (`users`, `catalog`, `carts`) and built from its row here by [`crate::state::cache`];
//! `GET /v1/admin/consistency` ([`crate::admin::consistency`]) serves the table with live counters.

use std::time::Duration;

use keel_cache::Tiers;

/// A kind of data, as the table names it (in configuration, in the API and in cache metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataKind {
    Profile,
    Product,
    Cart,
    LikeCount,
    Feed,
    Search,
    Inventory,
    Wallet,
    Order,
    Session,
}

impl DataKind {
    pub fn name(self) -> &'static str {
        match self {
            DataKind::Profile => "profile",
            DataKind::Product => "product",
            DataKind::Cart => "cart",
            DataKind::LikeCount => "like_count",
            DataKind::Feed => "feed",
            DataKind::Search => "search",
            DataKind::Inventory => "inventory",
            DataKind::Wallet => "wallet",
            DataKind::Order => "order",
            DataKind::Session => "session",
        }
    }

    /// The kind named `name`, or an error that lists the kinds.
    pub fn parse(name: &str) -> Result<DataKind, String> {
        KINDS.iter().map(|k| k.kind).find(|k| k.name() == name).ok_or_else(|| {
            let names: Vec<&str> = KINDS.iter().map(|k| k.kind.name()).collect();
            format!("{name:?} is not a kind of data; kinds are {}", names.join(", "))
        })
    }

    /// This kind's row of the table.
    pub fn row(self) -> &'static Kind {
        KINDS.iter().find(|k| k.kind == self).expect("every kind has a row in KINDS")
    }

    /// The tiers a cached kind is kept in, as the table says.
    pub fn tiers(self) -> Tiers {
        match self.row().source {
            Source::Cached { tiers, .. } => tiers,
            Source::Direct(_) => panic!("{} is not a cached kind of the consistency table", self.name()),
        }
    }
}

/// How the copies of a kind are kept in step with its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Read through the cache, dropped from it when the source changes.
    CacheAside,
    /// The writer puts the committed value in the cache before it answers.
    WriteThrough,
    /// Counted in the same transaction as the row it counts, and merged into every node's memory:
    /// exact once merged, whatever crashes or disconnects happen.
    CountedWithRow,
    /// Made from the source by workers, after it changed.
    Derived,
    /// Carried by the client (a signed token); what ends it early is announced to every node and
    /// polled from its source.
    Revocable,
    NeverCached,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::CacheAside => "cache-aside",
            Policy::WriteThrough => "write-through",
            Policy::CountedWithRow => "counted with the row",
            Policy::Derived => "derived",
            Policy::Revocable => "signed token, revocations announced and polled",
            Policy::NeverCached => "never cached",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub kind: DataKind,
    /// The default staleness budget; zero for strong kinds.
    pub budget: Duration,
    pub policy: Policy,
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
        kind: DataKind::Profile,
        budget: Duration::from_secs(300),
        policy: Policy::CacheAside,
        source: Source::Cached { tiers: Tiers::Both, origin: "shard replica within budget, else primary" },
    },
    Kind {
        kind: DataKind::Product,
        budget: Duration::from_secs(60),
        policy: Policy::WriteThrough,
        source: Source::Cached { tiers: Tiers::Both, origin: "catalogue replica within budget, else primary" },
    },
    // Only in the shared tier: a cart's owner may come back through any node (see `crate::carts`).
    Kind {
        kind: DataKind::Cart,
        budget: Duration::from_secs(10),
        policy: Policy::WriteThrough,
        source: Source::Cached { tiers: Tiers::SharedOnly, origin: "shard primary" },
    },
    Kind {
        kind: DataKind::LikeCount,
        budget: Duration::from_secs(2),
        policy: Policy::CountedWithRow,
        source: Source::Direct("CRDT counter in memory: the shards' tallies merged every 250 ms (beyond 8 shards, each at least every 1.5 s)"),
    },
    Kind {
        kind: DataKind::Feed,
        budget: Duration::from_secs(30),
        // Stored feeds are copied by workers (fan-out on write); large accounts' recent activities
        // are merged in at read time from the cache (see `crate::feed`).
        policy: Policy::Derived,
        source: Source::Cached {
            tiers: Tiers::Both,
            origin: "large accounts' recent activities from their shard, merged with the reader's stored feed \
                     (shard replica within budget, else primary)",
        },
    },
    Kind {
        kind: DataKind::Search,
        budget: Duration::from_secs(2),
        policy: Policy::Derived,
        source: Source::Direct("search index: catalogue replica within budget, else primary"),
    },
    Kind {
        kind: DataKind::Inventory,
        budget: Duration::ZERO,
        policy: Policy::NeverCached,
        source: Source::Direct("catalogue primary"),
    },
    Kind {
        kind: DataKind::Wallet,
        budget: Duration::ZERO,
        policy: Policy::NeverCached,
        source: Source::Direct("shard primary"),
    },
    Kind {
        kind: DataKind::Order,
        budget: Duration::ZERO,
        policy: Policy::NeverCached,
        source: Source::Direct("shard primary"),
    },
    // A session is checked with no query: how soon a revocation (sign-out, a password change, a
    // lock) reaches every node is this budget (see `crate::http::auth::revocations`).
    Kind {
        kind: DataKind::Session,
        budget: Duration::from_secs(5),
        policy: Policy::Revocable,
        source: Source::Direct(
            "access token; revocations announced to every node, each shard polled every quarter budget",
        ),
    },
];

/// Checks a `kind=duration` override: a known kind, and no budget for a strong one.
pub fn check_override(name: &str, budget: Duration) -> Result<DataKind, String> {
    let kind = DataKind::parse(name)?;
    if kind.row().budget.is_zero() && !budget.is_zero() {
        return Err(format!("{name} is strongly consistent: its budget is 0"));
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(kind: &str, shared_tier: bool) -> String {
        DataKind::parse(kind).unwrap().row().source.describe(shared_tier)
    }

    #[test]
    fn every_kind_has_one_row_and_its_name_parses_back() {
        for row in KINDS {
            assert_eq!(KINDS.iter().filter(|k| k.kind == row.kind).count(), 1, "{row:?}");
            assert_eq!(DataKind::parse(row.kind.name()), Ok(row.kind));
        }
        assert!(DataKind::parse("profiles").unwrap_err().contains("like_count"));
    }

    #[test]
    fn the_shared_tier_is_a_source_only_where_there_is_one() {
        assert_eq!(source("profile", true), "memory → Redis → shard replica within budget, else primary");
        assert_eq!(source("profile", false), "memory → shard replica within budget, else primary");
        assert_eq!(source("product", false), "memory → catalogue replica within budget, else primary");
        assert_eq!(source("cart", true), "Redis → shard primary");
        assert_eq!(source("cart", false), "shard primary");
        assert_eq!(source("wallet", true), "shard primary");
        for kind in KINDS {
            assert!(!kind.source.describe(false).contains("Redis"), "{kind:?}");
        }
    }
}
