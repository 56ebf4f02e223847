//! Shopping carts: rows on the owner's shard, priced from the catalogue at read time.
//!
//! Cached write-through for the cart budget (10 s) in the shared tier only; without Redis (or while
//! it is down) carts are read from the shard.
//!
//! **The owner reads their own writes**, on any node, with no query when Redis has the cart: every
//! cart write puts the committed cart in Redis before it answers (write-through), and Redis never
//! takes an older cart over a newer one (each carries `users.owner_version`, bumped by every cart
//! write in the same statement, so two writes through two nodes finishing out of order keep the
//! newer). Without Redis, or while it is down, the cart is read from the shard. What is left: a
//! write whose Redis update failed while Redis still answers other nodes (a timeout, a cut link
//! from this node only) leaves the older cart there; the writer then keeps trying to drop it, and
//! it expires within the cart budget (10 s) anyway. (Before sessions, the token check read the
//! owner's version with the token, so such a cart was never served to its owner; with tokens
//! checked without a query, that guarantee would cost the query it saved on every cart read.)
//!
//! **A checkout charges a snapshot of the cart**: the owner's version it read. Each item row carries
//! the version of the write that last set it (`revision`), so a confirmed order takes out of the cart
//! only the items it bought as they were then ([`crate::orders::saga`]), and another checkout leaves
//! out the items a pending order holds that way ([`crate::orders`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use keel_cache::Written;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::Config;
use crate::consistency::DataKind;
use crate::db::replicas::Target;
use crate::db::{Databases, Sql};
use crate::http::auth::AuthUser;
use crate::http::cache_headers::cache_headers;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path};
use crate::http::number;
use crate::ids::{ProductId, UserId};
use crate::money::Cents;

/// Ends every statement that changes a cart (user `$1`): the change and the owner's version commit
/// together.
pub(crate) const BUMP_OWNER_VERSION: &str = "UPDATE users SET owner_version = owner_version + 1 WHERE id = $1";

/// The most of one product a cart may hold.
const MAX_QUANTITY: i64 = 1_000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuantity {
    /// 0 (removes the item) to 1,000.
    pub quantity: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CartItem {
    #[schema(value_type = String)]
    pub product_id: ProductId,
    pub quantity: i64,
    /// The product's current price.
    pub price_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Cart {
    pub items: Vec<CartItem>,
    pub total_cents: i64,
    /// How many changes of its owner's (item writes, checkouts) this cart reflects: it grows with
    /// each, so of two copies the higher is the newer.
    pub version: i64,
}

/// Carts by owner, in the shared tier only, versioned by `users.owner_version`. A change made
/// elsewhere (the checkout saga emptying a cart) bumps the version and drops the owner's entry with
/// [`keel_cache::Cache::invalidate`].
pub type CartCache = keel_cache::Cache<UserId, Arc<Cart>>;

/// The cart cache of this configuration (the API's and the workers').
pub fn cart_cache(config: &Config, shared: &Option<Arc<keel_cache::Shared>>) -> CartCache {
    crate::state::cache(config, DataKind::Cart, shared).versioned(|cart: &Arc<Cart>| cart.version as u64)
}

/// What the carts' handlers reach (a part of [`crate::state::AppState`]).
#[derive(Clone)]
pub struct CartsState {
    pub db: Arc<Databases>,
    pub carts: Arc<CartCache>,
}

/// Reads a cart and prices it: two queries whatever its size, one per database. The items and the
/// owner's version come from one statement, so they are of one moment.
pub(crate) async fn load_cart(db: &Databases, user: UserId) -> Result<Cart, ApiError> {
    let shard = db.shard_of(user).primary_for(DataKind::Cart).await?;
    let rows = shard
        .rows(
            "SELECT u.owner_version, c.product_id, c.quantity
             FROM users u LEFT JOIN cart_items c ON c.user_id = u.id
             WHERE u.id = $1 ORDER BY c.added_at, c.product_id",
            &[&user],
        )
        .await?;
    let version = rows.first().map_or(0, |r| r.get::<_, i64>(0));
    // The user's row alone (no item) is one row with a null product.
    let rows: Vec<_> = rows.into_iter().filter(|r| r.get::<_, Option<ProductId>>(1).is_some()).collect();
    if rows.is_empty() {
        return Ok(Cart { items: Vec::new(), total_cents: 0, version });
    }
    let ids: Vec<ProductId> = rows.iter().map(|r| r.get(1)).collect();
    let catalog = db.catalog.client().await?;
    let prices: std::collections::HashMap<ProductId, i64> = catalog
        .rows("SELECT id, price_cents FROM products WHERE id = ANY($1)", &[&ids])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let items: Vec<CartItem> = rows
        .iter()
        .filter_map(|r| {
            let product: ProductId = r.get(1);
            let price = *prices.get(&product)?;
            Some(CartItem { product_id: product, quantity: i64::from(r.get::<_, i32>(2)), price_cents: price })
        })
        .collect();
    let total = Cents::sum(items.iter().map(|i| Cents(i.price_cents).times(i.quantity)))
        .map_err(|_| ApiError::Unprocessable("the cart's total is too large to be represented".into()))?;
    Ok(Cart { items, total_cents: total.0, version })
}

#[utoipa::path(get, path = "/v1/cart", tag = "carts", security(("bearer" = [])),
    responses((status = 200, description = "The cart, with the owner's own writes; other changes (prices, a \
        confirmed order) up to the cart budget (10 s) late: see `Cache-Status` and `Age`", body = Cart),
        (status = 401, body = Problem)))]
pub async fn get_cart(
    State(state): State<CartsState>,
    AuthUser(user): AuthUser,
) -> Result<impl IntoResponse, ApiError> {
    let load = || async { load_cart(&state.db, user).await.map(Arc::new) };
    let (cart, served) = state.carts.get_or_load(&user, load).await?;
    // Carts are read from the shard's primary, always.
    Ok((cache_headers(served, Some((Target::Primary, Duration::ZERO))), Json(cart)))
}

/// Write-through: the cart as committed, read back and put in the cache before the owner hears of it
/// (a cart read back before a concurrent write of the owner's is older, and the cache keeps the
/// newer).
async fn committed(state: &CartsState, user: UserId) -> Result<Json<Arc<Cart>>, ApiError> {
    let cart = Arc::new(load_cart(&state.db, user).await?);
    if state.carts.put(user, cart.clone()).await == Written::Failed {
        tokio::spawn(drop_older_copy(state.carts.clone(), user, state.carts.ttl()));
    }
    Ok(Json(cart))
}

/// After a write-through failed: Redis may hold the cart as it was before, for other nodes to serve
/// the owner. Drop it as soon as Redis answers again, or give up when it would have expired.
async fn drop_older_copy(carts: Arc<CartCache>, user: UserId, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if carts.invalidate(&user).await != Written::Failed {
            return;
        }
    }
    tracing::warn!(%user, "could not update a cart in Redis after a change; its older copy expired there meanwhile");
}

#[utoipa::path(put, path = "/v1/cart/items/{product_id}", tag = "carts", request_body = SetQuantity,
    params(("product_id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The whole cart after the change", body = Cart),
        (status = 401, body = Problem), (status = 404, description = "No such product", body = Problem),
        (status = 422, body = Problem)))]
pub async fn set_item(
    State(state): State<CartsState>,
    AuthUser(user): AuthUser,
    Path(product): Path<String>,
    Json(input): Json<SetQuantity>,
) -> Result<Json<Arc<Cart>>, ApiError> {
    let product = parse_id::<ProductId>("product", &product)?;
    let quantity = number("quantity", input.quantity, 0, MAX_QUANTITY)? as i32;
    if quantity == 0 {
        return remove(&state, user, product).await;
    }
    let catalog = state.db.catalog.client().await?;
    if catalog.maybe_row("SELECT 1 FROM products WHERE id = $1", &[&product]).await?.is_none() {
        return Err(ApiError::not_found("product", &product.to_string()));
    }
    drop(catalog);
    let shard = state.db.shard_of(user).client().await?;
    // The item takes the owner's new version as its revision, in the statement that bumps it: a
    // checkout that read an older version did not see this write (see the module's comment).
    shard
        .exec(
            &format!(
                "WITH owner AS ({BUMP_OWNER_VERSION} RETURNING owner_version)
                 INSERT INTO cart_items (user_id, product_id, quantity, revision)
                 SELECT $1, $2, $3, owner_version FROM owner
                 ON CONFLICT (user_id, product_id) DO UPDATE
                 SET quantity = EXCLUDED.quantity, revision = EXCLUDED.revision"
            ),
            &[&user, &product, &quantity],
        )
        .await?;
    drop(shard);
    committed(&state, user).await
}

#[utoipa::path(delete, path = "/v1/cart/items/{product_id}", tag = "carts",
    params(("product_id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The whole cart after the change", body = Cart),
        (status = 401, body = Problem)))]
pub async fn delete_item(
    State(state): State<CartsState>,
    AuthUser(user): AuthUser,
    Path(product): Path<String>,
) -> Result<Json<Arc<Cart>>, ApiError> {
    let product = parse_id::<ProductId>("product", &product)?;
    remove(&state, user, product).await
}

/// Removing what is not there is not an error: the cart simply does not hold it afterwards.
async fn remove(state: &CartsState, user: UserId, product: ProductId) -> Result<Json<Arc<Cart>>, ApiError> {
    let shard = state.db.shard_of(user).client().await?;
    let remove =
        format!("WITH item AS (DELETE FROM cart_items WHERE user_id = $1 AND product_id = $2) {BUMP_OWNER_VERSION}");
    shard.exec(&remove, &[&user, &product]).await?;
    drop(shard);
    committed(state, user).await
}
