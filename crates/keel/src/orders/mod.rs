//! Orders: `POST /v1/checkout` accepts an order and answers 202 at once; the checkout saga
//! ([`saga`]) then reserves stock, debits the wallet and confirms or fails it. Orders are
//! strongly consistent: always read from the owner's shard primary, never cached.
//!
//! **A checkout charges a snapshot of the cart**, the owner's cart version it read (kept with the
//! order as `cart_version`). The items of a pending order's snapshot are taken: another checkout,
//! with another Idempotency-Key, leaves them out, and is refused (409) when nothing else is in the
//! cart, so one cart is never charged twice. They are free again if the order fails, and leave the
//! cart when it is confirmed; an item added or changed after the checkout is a new one, neither
//! charged by that order nor removed by its confirmation.

pub mod saga;

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::ToSchema;

use crate::carts::{load_cart, CartItem};
use crate::consistency::DataKind;
use crate::db::{PgError, Sql};
use crate::events::{self, OrderPlaced};
pub use crate::events::{FailureReason, OrderStatus};
use crate::http::auth::AuthUser;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path, Query};
use crate::http::idempotency::{self, Claim, IdempotencyKey};
use crate::http::trace::TraceContext;
use crate::http::{timestamp, Page, PageParams};
use crate::ids::{OrderId, ProductId, UserId};
use crate::money::Cents;
use crate::state::AppState;

/// How many times a checkout reads the cart again when it changed before the order could be written.
const CART_READS: usize = 3;

#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    #[schema(value_type = String)]
    pub id: OrderId,
    /// Always `pending`: the saga decides.
    #[schema(value_type = String)]
    pub status: OrderStatus,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, Clone)]
pub struct OrderItem {
    #[schema(value_type = String)]
    pub product_id: ProductId,
    pub quantity: i64,
    /// The price when the order was placed.
    pub price_cents: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Order {
    #[schema(value_type = String)]
    pub id: OrderId,
    /// `pending`, `confirmed` or `failed`.
    #[schema(value_type = String)]
    pub status: OrderStatus,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    /// `out_of_stock` or `insufficient_funds` when failed.
    #[schema(value_type = Option<String>)]
    pub failure_reason: Option<FailureReason>,
    pub created_at: String,
    pub updated_at: String,
}

const ORDER_COLUMNS: &str = "id, status, total_cents, failure_reason, created_at, updated_at";

/// An order from its row; an error if the row holds a status or reason this version does not know.
fn order_from_row(row: &Row, items: Vec<OrderItem>) -> Result<Order, PgError> {
    Ok(Order {
        id: row.get("id"),
        status: row.try_get("status")?,
        items,
        total_cents: row.get("total_cents"),
        failure_reason: row.try_get("failure_reason")?,
        created_at: timestamp(row.get("created_at")),
        updated_at: timestamp(row.get("updated_at")),
    })
}

/// The items of many orders in one query.
async fn items_of(client: &impl Sql, orders: &[OrderId]) -> Result<HashMap<OrderId, Vec<OrderItem>>, ApiError> {
    let rows = client
        .rows(
            "SELECT order_id, product_id, quantity, price_cents FROM order_items WHERE order_id = ANY($1)
             ORDER BY order_id, product_id",
            &[&orders],
        )
        .await?;
    let mut items: HashMap<OrderId, Vec<OrderItem>> = HashMap::new();
    for row in rows {
        items.entry(row.get(0)).or_default().push(OrderItem {
            product_id: row.get(1),
            quantity: i64::from(row.get::<_, i32>(2)),
            price_cents: row.get(3),
        });
    }
    Ok(items)
}

#[utoipa::path(post, path = "/v1/checkout", tag = "orders",
    params(("Idempotency-Key" = String, Header, description = "Retries with the same key place one order")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted; follow Location for the outcome", body = Accepted,
            headers(("Location" = String, description = "/v1/orders/{id}"))),
        (status = 400, description = "No or a malformed Idempotency-Key", body = Problem),
        (status = 401, body = Problem),
        (status = 403, description = "The buyer's e-mail address is not verified (when \
            `KEEL_CHECKOUT_REQUIRES_VERIFIED_EMAIL` is on, the default)", body = Problem),
        (status = 409, description = "Everything in the cart is already being checked out by a pending order (placed \
            with another key), or the cart kept changing", body = Problem),
        (status = 422, description = "The cart is empty", body = Problem),
    ))]
pub async fn checkout(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdempotencyKey(key): IdempotencyKey,
    trace: TraceContext,
) -> Result<Response, ApiError> {
    let hash = idempotency::request_hash("checkout", &());
    for _ in 0..CART_READS {
        // Read the cart before taking a connection for the transaction: a request holding one pooled
        // connection while waiting for another can starve the pool under load.
        let cart = load_cart(&state.db, user).await?;
        let shard = state.db.shard_of(user);
        let mut client = shard.client().await?;
        let tx = client.transaction().await?;
        if let Claim::Replay { status, location, body } = idempotency::claim(&tx, user, &key, &hash).await? {
            return Ok(idempotency::json_response(status, location, body));
        }
        // The owner's row, locked: this user's checkouts and cart writes take turns until the commit,
        // so the cart read above is the cart now, or it is read again. Whether the address is verified
        // comes with it, at no extra round trip.
        let owner = tx
            .row("SELECT owner_version, email_verified_at IS NOT NULL FROM users WHERE id = $1 FOR UPDATE", &[&user])
            .await?;
        if state.config.checkout_requires_verified_email && !owner.get::<_, bool>(1) {
            // Rolled back with the key, so the same key works once the address is verified.
            return Err(ApiError::Forbidden(
                "verify your e-mail address before checking out: enter the code e-mailed to you at \
                 POST /v1/users/{id}/email-verification"
                    .into(),
            ));
        }
        let version: i64 = owner.get(0);
        if version != cart.version {
            continue;
        }
        if cart.items.is_empty() {
            // Rolled back with the key, so the key can be used again once the cart has something in it.
            return Err(ApiError::Unprocessable("the cart is empty: add items before checking out".into()));
        }
        let taken = taken_by_pending_orders(&tx, user).await?;
        let items: Vec<&CartItem> = cart.items.iter().filter(|i| !taken.contains_key(&i.product_id)).collect();
        if items.is_empty() {
            let mut pending: Vec<&OrderId> = taken.values().collect();
            pending.sort();
            pending.dedup();
            let orders = pending.iter().map(|id| format!("/v1/orders/{id}")).collect::<Vec<_>>().join(", ");
            // Rolled back with the key, as an empty cart is.
            return Err(ApiError::Conflict(format!(
                "everything in the cart is already being checked out by a pending order ({orders}); items added \
                 or changed since can be checked out, and the order's items again if it fails"
            )));
        }
        let total = Cents::sum(items.iter().map(|i| Cents(i.price_cents).times(i.quantity)))
            .map_err(|_| ApiError::Unprocessable("the cart's total is too large to be represented".into()))?;
        let id = OrderId::new();
        let products: Vec<ProductId> = items.iter().map(|i| i.product_id).collect();
        let quantities: Vec<i32> = items.iter().map(|i| i.quantity as i32).collect();
        let prices: Vec<i64> = items.iter().map(|i| i.price_cents).collect();
        tx.exec(
            "WITH new_order AS (
                 INSERT INTO orders (id, user_id, status, total_cents, cart_version) VALUES ($1, $2, $7, $3, $8)
             )
             -- The bucket given, not left to the trigger: it would look for the order, which this
             -- statement's CTE inserts out of its sight.
             INSERT INTO order_items (order_id, bucket, product_id, quantity, price_cents)
             SELECT $1, $9, * FROM unnest($4::uuid[], $5::int[], $6::bigint[])",
            &[
                &id,
                &user,
                &total.0,
                &products,
                &quantities,
                &prices,
                &OrderStatus::Pending.as_str(),
                &version,
                &crate::db::bucket_of(user),
            ],
        )
        .await?;
        let placed = OrderPlaced { order_id: id, user_id: user };
        keel_outbox::enqueue(&tx, &events::event(&placed, id, Some(trace.traceparent()))).await?;
        let location = format!("/v1/orders/{id}");
        let accepted = Accepted { id, status: OrderStatus::Pending };
        let response = idempotency::store(&tx, user, &key, StatusCode::ACCEPTED, Some(location), &accepted).await?;
        shard.commit_jobs(tx).await?;
        return Ok(response);
    }
    Err(ApiError::Conflict("the cart kept changing while checking out: try again".into()))
}

/// The cart items a pending order of the user's charges, each with that order: an item of its
/// snapshot still in the cart as it was then (not written since: its revision is not newer than the
/// order's cart version). Orders placed before snapshots were kept take nothing here.
async fn taken_by_pending_orders(tx: &impl Sql, user: UserId) -> Result<HashMap<ProductId, OrderId>, ApiError> {
    let rows = tx
        .rows(
            "SELECT c.product_id, o.id
             FROM orders o
             JOIN order_items i ON i.order_id = o.id
             JOIN cart_items c ON c.user_id = o.user_id AND c.product_id = i.product_id AND c.revision <= o.cart_version
             WHERE o.user_id = $1 AND o.status = $2 AND o.cart_version IS NOT NULL",
            &[&user, &OrderStatus::Pending.as_str()],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[utoipa::path(get, path = "/v1/orders/{id}", tag = "orders",
    params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "Read from the primary", body = Order),
        (status = 401, body = Problem), (status = 404, description = "No such order of this user", body = Problem)))]
pub async fn get_order(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    let id = parse_id::<OrderId>("order", &id)?;
    let client = state.db.shard_of(user).primary_for(DataKind::Order).await?;
    // Another user's order is simply not found: its existence is not theirs to learn.
    let row = client
        .maybe_row(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 AND user_id = $2"), &[&id, &user])
        .await?
        .ok_or_else(|| ApiError::not_found("order", &id.to_string()))?;
    let mut items = items_of(&client, &[id]).await?;
    Ok(Json(order_from_row(&row, items.remove(&id).unwrap_or_default())?))
}

#[utoipa::path(get, path = "/v1/orders", tag = "orders",
    params(PageParams),
    security(("bearer" = [])),
    responses((status = 200, description = "The caller's orders, newest first", body = Page<Order>),
        (status = 400, description = "A cursor this API did not issue, or a limit that is not a number", body = Problem),
        (status = 401, body = Problem),
        (status = 422, description = "A limit out of range", body = Problem)))]
pub async fn list_orders(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Query(params): Query<PageParams>,
) -> Result<Json<Page<Order>>, ApiError> {
    let (limit, before) = params.validate()?;
    let before = before.map(OrderId::from_uuid);
    let client = state.db.shard_of(user).primary_for(DataKind::Order).await?;
    let rows = client
        .rows(
            &format!(
                "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&user, &before, &(limit + 1)],
        )
        .await?;
    let ids: Vec<OrderId> = rows.iter().take(limit as usize).map(|r| r.get("id")).collect();
    let mut items = items_of(&client, &ids).await?;
    // A row that cannot be read fails the whole page.
    let page = Page::from_rows(
        rows,
        limit,
        |row| order_from_row(row, items.remove(&row.get::<_, OrderId>("id")).unwrap_or_default()),
        |order| order.as_ref().map(|o| o.id.to_string()).unwrap_or_default(),
    );
    Ok(Json(Page { items: page.items.into_iter().collect::<Result<_, _>>()?, next_cursor: page.next_cursor }))
}
