//! The checkout saga, run for each `order.placed` job: reserve stock in the catalogue → debit the
//! wallet and confirm the order on the user's shard; on a refusal, fail the order with a reason and
//! release whatever was reserved.
//!
//! Every step is idempotent by order id, so a crash anywhere followed by a redelivery gives the same
//! result: the order row's status says how far the saga got, a reservation exists at most once per
//! order and product (primary key), and a debit at most once per order (primary key). A failed order
//! is always released, even when a crash interrupted the release: a redelivered job for a failed
//! order only finishes the release.

use keel_outbox::{Job, JobError, NewJob};

use crate::carts::CartCache;
use crate::db::{Databases, Db, DbError, Sql, Transaction};
use crate::events::{self, Event, OrderConfirmed, OrderFailed, OrderPlaced, ProductStockChanged};
use crate::ids::{OrderId, ProductId, UserId};
use crate::orders::{FailureReason, OrderStatus};

struct Item {
    product: ProductId,
    quantity: i32,
}

struct PlacedOrder {
    id: OrderId,
    user: UserId,
    status: OrderStatus,
    total_cents: i64,
    items: Vec<Item>,
}

/// Runs (or resumes) the saga of one placed order; `carts` is told when a confirmed order emptied one.
pub async fn run(db: &Databases, carts: &CartCache, job: &Job) -> Result<(), JobError> {
    let OrderPlaced { order_id, user_id } = OrderPlaced::from_job(job)?;
    let shard = db.shard_of(user_id);
    let Some(order) = load(shard, order_id, user_id).await? else {
        return Err(JobError::from(format!("order {order_id} does not exist on its user's shard")));
    };
    Ok(advance(db, shard, carts, &order, job).await?)
}

/// Takes the order from where the last run left it to its outcome.
async fn advance(db: &Databases, shard: &Db, carts: &CartCache, order: &PlacedOrder, job: &Job) -> Result<(), DbError> {
    match order.status {
        OrderStatus::Pending => {}
        OrderStatus::Confirmed => return Ok(()),
        OrderStatus::Failed => return release(&db.catalog, order.id, job).await,
    }
    if !reserve(&db.catalog, order, job).await? {
        tracing::info!(order = %order.id, "out of stock");
        return fail(shard, order, FailureReason::OutOfStock, job).await;
    }
    if !debit_and_confirm(shard, order, job).await? {
        tracing::info!(order = %order.id, "insufficient funds");
        return release(&db.catalog, order.id, job).await;
    }
    tracing::info!(order = %order.id, "order confirmed");
    // The bought items left the cart: its owner should not see them there for the budget.
    carts.invalidate(&order.user).await;
    Ok(())
}

async fn load(shard: &Db, id: OrderId, user: UserId) -> Result<Option<PlacedOrder>, DbError> {
    let client = shard.client().await?;
    let Some(row) = client
        .maybe_row("SELECT status, total_cents FROM orders WHERE id = $1 AND user_id = $2", &[&id, &user])
        .await?
    else {
        return Ok(None);
    };
    let items = client
        .rows("SELECT product_id, quantity FROM order_items WHERE order_id = $1 ORDER BY product_id", &[&id])
        .await?
        .iter()
        .map(|r| Item { product: r.get(0), quantity: r.get(1) })
        .collect();
    Ok(Some(PlacedOrder { id, user, status: row.try_get(0)?, total_cents: row.get(1), items }))
}

/// Takes the order's stock, all of it or none. True if the order holds its stock (now or from an
/// earlier run); false if some item is short.
async fn reserve(catalog: &Db, order: &PlacedOrder, job: &Job) -> Result<bool, DbError> {
    let mut client = catalog.client().await?;
    let tx = client.transaction().await?;
    let held = tx.maybe_row("SELECT 1 FROM stock_reservations WHERE order_id = $1 LIMIT 1", &[&order.id]).await?;
    if held.is_some() {
        return Ok(true);
    }
    let products: Vec<ProductId> = order.items.iter().map(|i| i.product).collect();
    let quantities: Vec<i32> = order.items.iter().map(|i| i.quantity).collect();
    // Row locks in product order: two sagas over the same products can wait, never deadlock.
    let stock: std::collections::HashMap<ProductId, i64> = tx
        .rows(
            "SELECT product_id, stock FROM inventory WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE",
            &[&products],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if order.items.iter().any(|i| stock.get(&i.product).is_none_or(|s| *s < i64::from(i.quantity))) {
        return Ok(false);
    }
    let left = tx
        .rows(
            "UPDATE inventory i SET stock = i.stock - w.quantity, updated_at = now(), version = i.version + 1
             FROM unnest($1::uuid[], $2::int[]) AS w(product_id, quantity) WHERE i.product_id = w.product_id
             RETURNING i.product_id, i.stock",
            &[&products, &quantities],
        )
        .await?;
    let sold_out: Vec<ProductId> = left.iter().filter(|r| r.get::<_, i64>(1) == 0).map(|r| r.get(0)).collect();
    announce_stock_changes(&tx, &sold_out, job).await?;
    // A concurrent run of the same order fails here on the primary key, and its decrement with it.
    tx.exec(
        "INSERT INTO stock_reservations (order_id, product_id, quantity) SELECT $1, * FROM unnest($2::uuid[], $3::int[])",
        &[&order.id, &products, &quantities],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Debits the wallet and confirms the order in one transaction on the user's shard; or, when the
/// balance is short, fails the order. True if the order is confirmed.
async fn debit_and_confirm(shard: &Db, order: &PlacedOrder, job: &Job) -> Result<bool, DbError> {
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    match locked_status(&tx, order.id).await? {
        OrderStatus::Pending => {}
        OrderStatus::Confirmed => return Ok(true),
        OrderStatus::Failed => return Ok(false),
    }
    let debited = tx
        .maybe_row(
            "UPDATE wallets SET balance_cents = balance_cents - $2 WHERE user_id = $1 AND balance_cents >= $2
             RETURNING balance_cents",
            &[&order.user, &order.total_cents],
        )
        .await?;
    if debited.is_none() {
        set_failed(&tx, order, FailureReason::InsufficientFunds, job).await?;
        tx.commit().await?;
        return Ok(false);
    }
    let products: Vec<ProductId> = order.items.iter().map(|i| i.product).collect();
    tx.exec(
        "INSERT INTO wallet_debits (order_id, user_id, amount_cents) VALUES ($1, $2, $3)",
        &[&order.id, &order.user, &order.total_cents],
    )
    .await?;
    tx.exec(
        "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1",
        &[&order.id, &OrderStatus::Confirmed.as_str()],
    )
    .await?;
    tx.exec("DELETE FROM cart_items WHERE user_id = $1 AND product_id = ANY($2)", &[&order.user, &products]).await?;
    // The owner's next read of their cart must not be an older cached copy (see `crate::carts`).
    tx.exec(crate::carts::BUMP_OWNER_VERSION, &[&order.user]).await?;
    let confirmed = OrderConfirmed { order_id: order.id, user_id: order.user, total_cents: order.total_cents };
    keel_outbox::enqueue(&tx, &follow_up(&confirmed, order.id, job)).await?;
    tx.commit().await?;
    Ok(true)
}

/// Fails a pending order that could not get its stock.
async fn fail(shard: &Db, order: &PlacedOrder, reason: FailureReason, job: &Job) -> Result<(), DbError> {
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    match locked_status(&tx, order.id).await? {
        OrderStatus::Pending => set_failed(&tx, order, reason, job).await?,
        OrderStatus::Confirmed | OrderStatus::Failed => {}
    }
    tx.commit().await?;
    Ok(())
}

/// The order's status, its row locked until the transaction ends: the saga's steps on the order
/// row run one at a time, and each sees where the others left it.
async fn locked_status(tx: &Transaction<'_>, order: OrderId) -> Result<OrderStatus, DbError> {
    Ok(tx.row("SELECT status FROM orders WHERE id = $1 FOR UPDATE", &[&order]).await?.try_get(0)?)
}

async fn set_failed(
    tx: &Transaction<'_>,
    order: &PlacedOrder,
    reason: FailureReason,
    job: &Job,
) -> Result<(), DbError> {
    tx.exec(
        "UPDATE orders SET status = $3, failure_reason = $2, updated_at = now() WHERE id = $1",
        &[&order.id, &reason.as_str(), &OrderStatus::Failed.as_str()],
    )
    .await?;
    let failed = OrderFailed { order_id: order.id, user_id: order.user, reason };
    keel_outbox::enqueue(tx, &follow_up(&failed, order.id, job)).await?;
    Ok(())
}

/// An event caused by `job`, carrying its trace context on.
fn follow_up<E: Event>(payload: &E, aggregate: impl ToString, job: &Job) -> NewJob {
    events::event(payload, aggregate, job.traceparent.clone())
}

/// Gives back the stock of a failed order, once.
async fn release(catalog: &Db, order: OrderId, job: &Job) -> Result<(), DbError> {
    let mut client = catalog.client().await?;
    let tx = client.transaction().await?;
    let released = tx
        .rows(
            "UPDATE stock_reservations SET released = true WHERE order_id = $1 AND NOT released
             RETURNING product_id, quantity",
            &[&order],
        )
        .await?;
    if released.is_empty() {
        return Ok(());
    }
    let products: Vec<ProductId> = released.iter().map(|r| r.get(0)).collect();
    let quantities: Vec<i32> = released.iter().map(|r| r.get(1)).collect();
    tx.exec("SELECT 1 FROM inventory WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE", &[&products]).await?;
    let now = tx
        .rows(
            "UPDATE inventory i SET stock = i.stock + w.quantity, updated_at = now(), version = i.version + 1
             FROM unnest($1::uuid[], $2::int[]) AS w(product_id, quantity) WHERE i.product_id = w.product_id
             RETURNING i.product_id, i.stock, w.quantity",
            &[&products, &quantities],
        )
        .await?;
    let back: Vec<ProductId> =
        now.iter().filter(|r| r.get::<_, i64>(1) == i64::from(r.get::<_, i32>(2))).map(|r| r.get(0)).collect();
    announce_stock_changes(&tx, &back, job).await?;
    tx.commit().await?;
    Ok(())
}

/// Tells the search index about products that sold out or came back in stock. Other stock changes
/// do not change what search shows, so they cost no event.
async fn announce_stock_changes(tx: &Transaction<'_>, products: &[ProductId], job: &Job) -> Result<(), DbError> {
    for &product in products {
        let changed = ProductStockChanged { product_id: product, stock: None };
        keel_outbox::enqueue(tx, &follow_up(&changed, product, job)).await?;
    }
    Ok(())
}
