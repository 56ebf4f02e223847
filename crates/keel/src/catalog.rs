//! The product catalogue and its inventory, in the catalogue database.
//!
//! **Stock** is kept as two numbers per product, so that the admin's writes and the checkouts'
//! reservations never add up to units that were never there:
//!
//! - `on_hand`: the units the shop holds and has not sold, those held by orders being decided
//!   included. The admin sets it (`PUT /v1/products/{id}/inventory`); a confirmed order's units leave
//!   it (the saga's sale).
//! - `reserved`: the units held by orders the checkout saga has not decided yet. A reservation adds to
//!   it; the sale or the release of a failed order takes the units back out of it.
//! - `stock`, what a new order can take, is `on_hand − reserved` (a generated column), and
//!   `reserved ≤ on_hand` is a constraint: a checkout can never take more than the shop holds.
//! - `sold` counts the units confirmed orders took: a sale moves units from `on_hand` to `sold`, so
//!   `on_hand + sold` changes only when the admin sets `on_hand`.
//!
//! The admin cannot set `on_hand` below what is reserved (409: those units are promised to orders
//! being decided; the saga decides within seconds, then the write goes through). Every write of the
//! row, the saga's included, bumps `inventory.version`, which versions the search document.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use keel_cache::Served;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::ToSchema;

use crate::consistency::DataKind;
use crate::db::replicas::{Floor, Target};
use crate::db::{Databases, Sql};
use crate::events::{self, Event, ProductCreated, ProductStockChanged, ProductUpdated};
use crate::http::auth::Admin;
use crate::http::cache_headers::{bypass_headers, cache_headers};
use crate::http::error::{unique_violation, ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path, Query};
use crate::http::trace::TraceContext;
use crate::http::{number, text, timestamp, Page, PageParams};
use crate::ids::ProductId;
use crate::likes::counter::LikeCounter;

/// The largest price and stock accepted: far beyond any real shop, far below overflow.
const MAX_PRICE_CENTS: i64 = 100_000_000_000;
const MAX_STOCK: i64 = 1_000_000_000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// 1 to 64 characters of letters, digits, `.`, `_` and `-`; unique.
    pub sku: String,
    /// 1 to 200 characters.
    pub name: String,
    /// Up to 10,000 characters.
    #[serde(default)]
    pub description: String,
    /// 0 to 100,000,000,000.
    pub price_cents: i64,
    /// The units on hand to begin with: 0 to 1,000,000,000.
    pub stock: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProduct {
    pub sku: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub price_cents: Option<i64>,
}

/// Products without their like count, by id: write-through, so a node that changes a product
/// serves the change at once and the others hear of it; versioned by `products.version`, so of two
/// concurrent changes the one committed last is the one every cache keeps.
pub type ProductCache = keel_cache::Cache<ProductId, Arc<Product>>;

/// The version a product cache compares (see [`ProductCache`]).
pub fn version_of(product: &Arc<Product>) -> u64 {
    product.version as u64
}

/// What the catalogue's handlers reach (a part of [`crate::state::AppState`]): a product is shown
/// with this node's like count.
#[derive(Clone)]
pub struct CatalogState {
    pub db: Arc<Databases>,
    pub products: Arc<ProductCache>,
    pub likes: Arc<LikeCounter>,
}

/// A product, as the API shows it and as its events carry it.
pub use crate::events::ProductData as Product;

const PRODUCT_COLUMNS: &str = "id, sku, name, description, price_cents, created_at, updated_at, version";

/// A product from its row; `like_count` is this node's view of its counter (see [`crate::likes`]),
/// not counted as a read: a response reads it again when it is served.
fn product_from_row(row: &Row, likes: &LikeCounter) -> Product {
    let id: ProductId = row.get("id");
    Product {
        id,
        sku: row.get("sku"),
        name: row.get("name"),
        description: row.get("description"),
        price_cents: row.get("price_cents"),
        like_count: likes.current(id),
        created_at: timestamp(row.get("created_at")),
        updated_at: timestamp(row.get("updated_at")),
        version: row.get("version"),
    }
}

/// The units the shop holds: give `on_hand`, or `stock`, its name before reservations were counted
/// apart (the same meaning), not both.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    /// The units the shop holds and has not sold, those reserved by orders being decided included:
    /// 0 to 1,000,000,000, and not below `reserved`.
    pub on_hand: Option<i64>,
    /// The same as `on_hand`.
    pub stock: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Inventory {
    #[schema(value_type = String)]
    pub product_id: ProductId,
    /// What a new order can take now: `on_hand − reserved`.
    pub stock: i64,
    /// The units the shop holds and has not sold, those reserved included.
    pub on_hand: i64,
    /// The units held by orders being decided.
    pub reserved: i64,
    /// The units confirmed orders took, all told: only the admin changes `on_hand + sold`.
    pub sold: i64,
    /// Grows with every change of this product's stock (the admin's, and each checkout's).
    pub version: i64,
}

const INVENTORY_COLUMNS: &str = "on_hand, reserved, sold, stock, version";

fn inventory_from_row(id: ProductId, row: &Row) -> Inventory {
    Inventory {
        product_id: id,
        on_hand: row.get("on_hand"),
        reserved: row.get("reserved"),
        sold: row.get("sold"),
        stock: row.get("stock"),
        version: row.get("version"),
    }
}

fn sku(raw: &str) -> Result<String, ApiError> {
    let sku = text("sku", raw, 1, 64)?;
    if !sku.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(ApiError::invalid("sku", "use only letters, digits, '.', '_' and '-'"));
    }
    Ok(sku)
}

fn sku_taken(e: tokio_postgres::Error, sku: Option<&str>) -> ApiError {
    match unique_violation(&e) {
        Some(_) => ApiError::Conflict(format!("a product with sku {:?} already exists", sku.unwrap_or_default())),
        None => e.into(),
    }
}

#[utoipa::path(post, path = "/v1/products", tag = "catalog", request_body = CreateProduct,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = Product),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "The sku is taken", body = Problem),
        (status = 422, description = "A field is invalid", body = Problem),
    ))]
pub async fn create_product(
    State(state): State<CatalogState>,
    _: Admin,
    trace: TraceContext,
    Json(input): Json<CreateProduct>,
) -> Result<impl IntoResponse, ApiError> {
    let sku = sku(&input.sku)?;
    let name = text("name", &input.name, 1, 200)?;
    let description = text("description", &input.description, 0, 10_000)?;
    let price = number("price_cents", input.price_cents, 0, MAX_PRICE_CENTS)?;
    let stock = number("stock", input.stock, 0, MAX_STOCK)?;
    let id = ProductId::new();
    let mut client = state.db.catalog.client().await?;
    let tx = client.transaction().await?;
    let row = tx
        .row(
            &format!(
                "WITH product AS (
                     INSERT INTO products (id, sku, name, description, price_cents)
                     VALUES ($1, $2, $3, $4, $5) RETURNING {PRODUCT_COLUMNS}
                 ), stock AS (
                     INSERT INTO inventory (product_id, on_hand) SELECT id, $6::bigint FROM product
                 )
                 SELECT * FROM product"
            ),
            &[&id, &sku, &name, &description, &price, &stock],
        )
        .await
        .map_err(|e| sku_taken(e, Some(&sku)))?;
    let product = product_from_row(&row, &state.likes);
    announce(&tx, id, &ProductCreated(product.clone()), &trace).await?;
    state.db.catalog.commit_jobs(tx).await?;
    state.products.put(id, Arc::new(product.clone())).await;
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/products/{id}"))], Json(product)))
}

/// Writes an event about product `id` on the transaction that changed the product (committed with
/// `Db::commit_jobs`).
async fn announce(
    tx: &crate::db::Transaction<'_>,
    id: ProductId,
    event: &impl Event,
    trace: &TraceContext,
) -> Result<(), ApiError> {
    keel_outbox::enqueue(tx, &events::event(event, id, Some(trace.traceparent()))).await?;
    Ok(())
}

#[utoipa::path(patch, path = "/v1/products/{id}", tag = "catalog", request_body = UpdateProduct,
    params(("id" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The updated product", body = Product),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "The sku is taken", body = Problem),
        (status = 422, description = "A field is invalid", body = Problem),
    ))]
pub async fn update_product(
    State(state): State<CatalogState>,
    _: Admin,
    trace: TraceContext,
    Path(id): Path<String>,
    Json(input): Json<UpdateProduct>,
) -> Result<Json<Product>, ApiError> {
    let id = parse_id::<ProductId>("product", &id)?;
    if input.sku.is_none() && input.name.is_none() && input.description.is_none() && input.price_cents.is_none() {
        return Err(ApiError::Unprocessable("give at least one of sku, name, description, price_cents".into()));
    }
    let sku = input.sku.as_deref().map(sku).transpose()?;
    let name = input.name.as_deref().map(|n| text("name", n, 1, 200)).transpose()?;
    let description = input.description.as_deref().map(|d| text("description", d, 0, 10_000)).transpose()?;
    let price = input.price_cents.map(|p| number("price_cents", p, 0, MAX_PRICE_CENTS)).transpose()?;
    let mut client = state.db.catalog.client().await?;
    let tx = client.transaction().await?;
    let row = tx
        .maybe_row(
            &format!(
                "UPDATE products SET sku = coalesce($2, sku), name = coalesce($3, name),
                     description = coalesce($4, description), price_cents = coalesce($5, price_cents),
                     updated_at = now(), version = version + 1
                 WHERE id = $1 RETURNING {PRODUCT_COLUMNS}"
            ),
            &[&id, &sku, &name, &description, &price],
        )
        .await
        .map_err(|e| sku_taken(e, sku.as_deref()))?
        .ok_or_else(|| ApiError::not_found("product", &id.to_string()))?;
    let product = product_from_row(&row, &state.likes);
    announce(&tx, id, &ProductUpdated(product.clone()), &trace).await?;
    state.db.catalog.commit_jobs(tx).await?;
    // Write-through: this node serves the committed product at once (unless a change committed
    // after this one is already installed: versions decide, not the order the handlers finish in).
    state.products.put(id, Arc::new(product.clone())).await;
    Ok(Json(product))
}

#[utoipa::path(get, path = "/v1/products/{id}", tag = "catalog",
    params(("id" = String, Path)),
    responses((status = 200, description = "Up to the product budget (60 s) old, see `Cache-Status` and `Age`; \
        `like_count` converges within 2 s", body = Product), (status = 404, body = Problem)))]
pub async fn get_product(
    State(state): State<CatalogState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id::<ProductId>("product", &id)?;
    let (product, served, filled) = cached_product(&state, id).await?;
    let mut product = (*product).clone();
    product.like_count = state.likes.count(id);
    Ok((cache_headers(served, filled), Json(product)))
}

/// A product from this node's cache (loaded on a miss, from a replica within the product budget or
/// the primary), without its like count; 404 if none. Also where a miss of this caller's was read
/// from, and how far behind that source was.
pub async fn cached_product(
    state: &CatalogState,
    id: ProductId,
) -> Result<(Arc<Product>, Served, Option<(Target, Duration)>), ApiError> {
    let filled = OnceLock::new();
    let (product, served) = state
        .products
        .get_or_load_aged(&id, || async {
            let sql = format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1");
            let sql = sql.as_str();
            let read = state
                .db
                .catalog
                .read_one(DataKind::Product, state.products.ttl(), Floor::Any, |client| async move {
                    client.maybe_row(sql, &[&id]).await
                })
                .await?;
            let row = read.value.ok_or_else(|| ApiError::not_found("product", &id.to_string()))?;
            let _ = filled.set((read.target, read.lag));
            Ok::<_, ApiError>((Arc::new(product_from_row(&row, &state.likes)), read.lag))
        })
        .await?;
    Ok((product, served, filled.get().copied()))
}

#[utoipa::path(get, path = "/v1/products", tag = "catalog",
    params(PageParams),
    responses(
        (status = 200, description = "Products in creation order, read from the catalogue (not cached: \
            `Cache-Status: keel; fwd=bypass; detail=list`)", body = Page<Product>),
        (status = 400, description = "A parameter that cannot be read (`limit=ten`) or a cursor this API did not \
            issue", body = Problem),
        (status = 422, description = "A limit out of 1 to 100", body = Problem),
    ))]
pub async fn list_products(
    State(state): State<CatalogState>,
    Query(params): Query<PageParams>,
) -> Result<impl IntoResponse, ApiError> {
    let (limit, after) = params.validate()?;
    let after = after.map(ProductId::from_uuid);
    // Keyset pagination on the primary key: each page is one index range scan, however deep.
    let sql = format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2");
    let (sql, limit_plus_one) = (sql.as_str(), limit + 1);
    let read = state
        .db
        .catalog
        .read(DataKind::Product, state.products.ttl(), Floor::Any, |client| async move {
            client.rows(sql, &[&after, &limit_plus_one]).await
        })
        .await?;
    let page = Page::from_rows(read.value, limit, |r| product_from_row(r, &state.likes), |p| p.id.to_string());
    Ok((bypass_headers("list", read.lag), Json(page)))
}

#[utoipa::path(get, path = "/v1/products/{id}/inventory", tag = "catalog",
    params(("id" = String, Path)),
    responses((status = 200, description = "Current stock (on hand, reserved by orders being decided, and what a new \
        order can take), read from the primary", body = Inventory),
        (status = 404, body = Problem)))]
pub async fn get_inventory(
    State(state): State<CatalogState>,
    Path(id): Path<String>,
) -> Result<Json<Inventory>, ApiError> {
    let id = parse_id::<ProductId>("product", &id)?;
    let client = state.db.catalog.primary_for(DataKind::Inventory).await?;
    let row = client
        .maybe_row(&format!("SELECT {INVENTORY_COLUMNS} FROM inventory WHERE product_id = $1"), &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("product", &id.to_string()))?;
    Ok(Json(inventory_from_row(id, &row)))
}

#[utoipa::path(put, path = "/v1/products/{id}/inventory", tag = "catalog", request_body = SetStock,
    params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The units on hand are set; reservations are untouched", body = Inventory),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "Below the units reserved by orders being decided", body = Problem),
        (status = 422, body = Problem)))]
pub async fn set_inventory(
    State(state): State<CatalogState>,
    _: Admin,
    trace: TraceContext,
    Path(id): Path<String>,
    Json(input): Json<SetStock>,
) -> Result<Json<Inventory>, ApiError> {
    let id = parse_id::<ProductId>("product", &id)?;
    let on_hand = match (input.on_hand, input.stock) {
        (Some(on_hand), None) => number("on_hand", on_hand, 0, MAX_STOCK)?,
        (None, Some(stock)) => number("stock", stock, 0, MAX_STOCK)?,
        (None, None) => return Err(ApiError::invalid("on_hand", "give the units on hand (or `stock`)")),
        (Some(_), Some(_)) => return Err(ApiError::invalid("on_hand", "give on_hand or stock, not both")),
    };
    let mut client = state.db.catalog.client().await?;
    let tx = client.transaction().await?;
    // The row lock orders this write with the sagas' reservations and sales: the check below sees
    // what is reserved at the moment of the write, and holds until it commits.
    let reserved: i64 = tx
        .maybe_row("SELECT reserved FROM inventory WHERE product_id = $1 FOR UPDATE", &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("product", &id.to_string()))?
        .get(0);
    if on_hand < reserved {
        return Err(ApiError::Conflict(format!(
            "on_hand {on_hand} is below the {reserved} units reserved by orders being decided: set at least \
             {reserved}, or try again once those orders are decided"
        )));
    }
    let row = tx
        .row(
            &format!(
                "UPDATE inventory SET on_hand = $2, updated_at = now(), version = version + 1 WHERE product_id = $1
                 RETURNING {INVENTORY_COLUMNS}"
            ),
            &[&id, &on_hand],
        )
        .await?;
    let inventory = inventory_from_row(id, &row);
    announce(&tx, id, &ProductStockChanged { product_id: id, stock: Some(inventory.stock) }, &trace).await?;
    state.db.catalog.commit_jobs(tx).await?;
    Ok(Json(inventory))
}
