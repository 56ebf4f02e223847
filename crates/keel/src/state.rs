//! What every handler can reach, built once per process: the databases, the configuration, the
//! admin token's digest, this node's like counts, and its caches, one per cached kind of the
//! consistency table, each owned by the module whose data it holds.
//!
//! The modules that own a part of it (users, the catalogue and likes, carts) take only a view of
//! their parts (`UsersState`, `CatalogState`, `CartsState`, made here with axum's `FromRef`), so
//! this module depends on them and not the other way round; so do the HTTP toolkit's extractors
//! (the databases and the admin token). The other handlers take the whole [`AppState`].

use std::hash::Hash;
use std::sync::Arc;

use axum::extract::FromRef;
use keel_cache::{Cache, Shared};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::accounts::password::Hasher;
use crate::accounts::AccountsState;
use crate::carts::{CartCache, CartsState};
use crate::catalog::{CatalogState, ProductCache};
use crate::config::Config;
use crate::consistency::DataKind;
use crate::db::floors::Floors;
use crate::db::Databases;
use crate::feed::{FeedState, LargeAccounts, RecentCache};
use crate::http::auth::{AdminToken, Authenticator};
use crate::likes::LikeCounter;
use crate::users::{ProfileCache, UsersState};

#[derive(Clone)]
pub struct AppState {
    pub db: Arc<Databases>,
    pub admin_token: AdminToken,
    pub config: Arc<Config>,
    /// Every product's like count, merged from the shards' tallies by
    /// [`crate::app::Application::run_until_stopped`].
    pub likes: Arc<LikeCounter>,
    /// Public profiles (no e-mail), by user id: cache-aside.
    pub profiles: Arc<ProfileCache>,
    /// Products without their like count, by id: write-through.
    pub products: Arc<ProductCache>,
    /// Carts by owner, in the shared tier only (see [`crate::carts`]).
    pub carts: Arc<CartCache>,
    /// The shared tier (Redis), if configured.
    pub shared: Option<Arc<Shared>>,
    /// Verifies access tokens with no query; knows the revoked sessions.
    pub auth: Arc<Authenticator>,
    /// Password hashing, off the executor and bounded.
    pub hasher: Arc<Hasher>,
    /// Sign-ins being checked at once (see [`AccountsState::sign_ins`]).
    pub sign_ins: Arc<tokio::sync::Semaphore>,
    /// Users' read-your-writes floors, for reads that may go to replicas.
    pub floors: Floors,
    /// The accounts over the feed's fan-out limit, refreshed by
    /// [`crate::app::Application::run_until_stopped`].
    pub large_accounts: Arc<LargeAccounts>,
    /// Large accounts' recent activities, by actor: cache-aside within the feed's budget.
    pub recent_activities: Arc<RecentCache>,
}

impl AppState {
    pub fn new(
        db: Arc<Databases>,
        config: Arc<Config>,
        admin_token: AdminToken,
        shared: Option<Arc<Shared>>,
        auth: Arc<Authenticator>,
    ) -> Self {
        AppState {
            hasher: Arc::new(Hasher::new(config.password_hash_concurrency)),
            sign_ins: Arc::new(tokio::sync::Semaphore::new(2 * config.password_hash_concurrency)),
            floors: Floors::new(shared.clone(), config.longest_budget()),
            auth,
            profiles: Arc::new(cache(&config, DataKind::Profile, &shared)),
            products: Arc::new(cache(&config, DataKind::Product, &shared).versioned(crate::catalog::version_of)),
            carts: Arc::new(crate::carts::cart_cache(&config, &shared)),
            likes: Arc::new(LikeCounter::new()),
            large_accounts: Arc::new(LargeAccounts::new(config.feed_fanout_limit as i64)),
            recent_activities: Arc::new(cache(&config, DataKind::Feed, &shared)),
            db,
            admin_token,
            config,
            shared,
        }
    }

    /// The counters of a cached kind's cache on this node.
    pub fn cache_stats(&self, kind: DataKind) -> Option<keel_cache::Stats> {
        match kind {
            DataKind::Profile => Some(self.profiles.stats()),
            DataKind::Product => Some(self.products.stats()),
            DataKind::Cart => Some(self.carts.stats()),
            DataKind::Feed => Some(self.recent_activities.stats()),
            DataKind::LikeCount
            | DataKind::Search
            | DataKind::Inventory
            | DataKind::Wallet
            | DataKind::Order
            | DataKind::Session => None,
        }
    }
}

impl FromRef<AppState> for Arc<Databases> {
    fn from_ref(state: &AppState) -> Self {
        state.db.clone()
    }
}

impl FromRef<AppState> for AdminToken {
    fn from_ref(state: &AppState) -> Self {
        state.admin_token
    }
}

impl FromRef<AppState> for Arc<Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

impl FromRef<AppState> for AccountsState {
    fn from_ref(state: &AppState) -> Self {
        AccountsState {
            db: state.db.clone(),
            auth: state.auth.clone(),
            hasher: state.hasher.clone(),
            sign_ins: state.sign_ins.clone(),
            config: state.config.clone(),
        }
    }
}

impl FromRef<AppState> for UsersState {
    fn from_ref(state: &AppState) -> Self {
        UsersState {
            db: state.db.clone(),
            profiles: state.profiles.clone(),
            accounts: AccountsState::from_ref(state),
            floors: state.floors.clone(),
        }
    }
}

impl FromRef<AppState> for FeedState {
    fn from_ref(state: &AppState) -> Self {
        FeedState {
            users: UsersState::from_ref(state),
            large: state.large_accounts.clone(),
            recent: state.recent_activities.clone(),
            budget: state.config.budget(DataKind::Feed),
        }
    }
}

impl FromRef<AppState> for CatalogState {
    fn from_ref(state: &AppState) -> Self {
        CatalogState { db: state.db.clone(), products: state.products.clone(), likes: state.likes.clone() }
    }
}

impl FromRef<AppState> for CartsState {
    fn from_ref(state: &AppState) -> Self {
        CartsState { db: state.db.clone(), carts: state.carts.clone() }
    }
}

/// The cache of a kind of the consistency table: its budget after configuration, its tiers, and the
/// shared tier when there is one (workers build the ones they invalidate this way too).
pub fn cache<K, V>(config: &Config, kind: DataKind, shared: &Option<Arc<Shared>>) -> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + std::fmt::Display + std::str::FromStr + 'static,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    let cache = Cache::new(kind.name(), config.budget(kind), 100_000).tiers(kind.tiers());
    match shared {
        Some(shared) => cache.shared(shared),
        None => cache,
    }
}

/// The shared tier configured by `KEEL_REDIS_URL`, if any: subscribed to the invalidation channel
/// when this returns (or given up on within a second, if Redis is down); values connect on use.
pub async fn shared_tier(config: &Config) -> Result<Option<Arc<Shared>>, String> {
    match &config.redis_url {
        Some(url) => {
            Shared::connect(url, &config.redis_namespace).await.map(Some).map_err(|e| format!("KEEL_REDIS_URL: {e}"))
        }
        None => Ok(None),
    }
}
