//! The checkout saga, run for each `order.placed` job: reserve stock in the catalogue → debit the
//! wallet and confirm the order on the user's shard → sell the reserved units; on a refusal, fail the
//! order with a reason and release whatever was reserved.
//!
//! Every step is idempotent by order id, so a crash anywhere followed by a redelivery gives the same
//! result: the order row's status says how far the saga got, a reservation exists at most once per
//! order and product (primary key) and moves only forward (`held` → `sold` or `released`), and a debit
//! exists at most once per order (primary key). A redelivered job for a failed order only finishes the
//! release; for a confirmed one, only the sale.
//!
//! **The saga never gives up on an accepted order.** Its job is retried forever, on a capped backoff
//! (`KEEL_SAGA_BACKOFF_MAX`), whatever the outage; a run blocked on a row lock fails after
//! `KEEL_SAGA_LOCK_TIMEOUT` and is retried rather than holding its connection. And a scheduled
//! reconciler (`crate::jobs::reconcile`) takes up orders pending too long and reservations held too
//! long, whatever became of their job (a job dead under an older Keel, a queue restored from an older
//! backup), through [`reconcile`]: the same steps, so it and a job may run one order at once.
//!
//! Stock is counted as on hand and reserved (see [`crate::catalog`]): a reservation raises
//! `reserved`, a sale lowers `on_hand` and `reserved` together, a release lowers `reserved`. So an
//! admin's write of `on_hand` while orders are being decided is never undone or inflated by them.

use std::collections::HashMap;

use keel_outbox::{Job, JobError};

use crate::carts::CartCache;
use crate::config::Config;
use crate::db::{Client, Databases, Db, DbError, Sql, Transaction};
use crate::events::{self, Event, OrderConfirmed, OrderFailed, OrderPlaced, ProductStockChanged};
use crate::ids::{OrderId, ProductId, UserId};
use crate::orders::{FailureReason, OrderStatus};

crate::text_enum::text_enum! {
    /// Where a stock reservation is: held while its order is decided, then sold (the order was
    /// confirmed) or released (it failed), once.
    ReservationState, "a reservation state" {
        Held = "held",
        Sold = "sold",
        Released = "released",
    }
}

/// How the saga runs, from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `KEEL_SAGA_LOCK_TIMEOUT`, as PostgreSQL's `lock_timeout` takes it.
    lock_timeout: String,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings { lock_timeout: format!("{}ms", config.saga_lock_timeout.as_millis().max(1)) }
    }
}

/// How a saga's run (or a reconciliation) left its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Confirmed,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Confirmed => "confirmed",
            Outcome::Failed => "failed",
        }
    }
}

struct Item {
    product: ProductId,
    quantity: i32,
}

struct PlacedOrder {
    id: OrderId,
    user: UserId,
    status: OrderStatus,
    total_cents: i64,
    /// The owner's cart version the checkout charged (`None` for orders placed before it was kept).
    cart_version: Option<i64>,
    items: Vec<Item>,
}

/// One run of the saga over one order: what it reaches, and the trace its follow-up events carry.
struct Saga<'a> {
    db: &'a Databases,
    carts: &'a CartCache,
    settings: &'a Settings,
    traceparent: Option<String>,
}

/// Runs (or resumes) the saga of one placed order; `carts` is told when a confirmed order emptied one.
pub async fn run(db: &Databases, carts: &CartCache, settings: &Settings, job: &Job) -> Result<(), JobError> {
    let OrderPlaced { order_id, user_id } = OrderPlaced::from_job(job)?;
    let saga = Saga { db, carts, settings, traceparent: job.traceparent.clone() };
    let Some(order) = load(&db.shard_of(user_id), order_id, user_id).await? else {
        return Err(JobError::from(format!("order {order_id} does not exist on its user's shard")));
    };
    saga.advance(&order).await?;
    Ok(())
}

/// What [`reconcile`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// The order is decided, and its stock sold or released.
    Decided(Outcome),
    /// Its user's shard has no such order: its reservations are left as they are, for a person to
    /// look at (releasing stock an order may yet need could oversell).
    NoSuchOrder,
}

/// Takes an order to its outcome, as its job would, from wherever it stands: for the reconciler,
/// which finds orders pending too long and reservations held too long.
pub async fn reconcile(
    db: &Databases,
    carts: &CartCache,
    settings: &Settings,
    order: OrderId,
    user: UserId,
) -> Result<Reconciled, DbError> {
    let saga = Saga { db, carts, settings, traceparent: None };
    match load(&db.shard_of(user), order, user).await? {
        Some(order) => Ok(Reconciled::Decided(saga.advance(&order).await?)),
        None => Ok(Reconciled::NoSuchOrder),
    }
}

async fn load(shard: &Db, id: OrderId, user: UserId) -> Result<Option<PlacedOrder>, DbError> {
    let client = shard.client().await?;
    let Some(row) = client
        .maybe_row("SELECT status, total_cents, cart_version FROM orders WHERE id = $1 AND user_id = $2", &[&id, &user])
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
    Ok(Some(PlacedOrder {
        id,
        user,
        status: row.try_get(0)?,
        total_cents: row.get(1),
        cart_version: row.get(2),
        items,
    }))
}

impl Saga<'_> {
    /// Takes the order from where the last run left it to its outcome.
    async fn advance(&self, order: &PlacedOrder) -> Result<Outcome, DbError> {
        match order.status {
            OrderStatus::Pending => {}
            OrderStatus::Confirmed => {
                self.sell(order.id).await?;
                return Ok(Outcome::Confirmed);
            }
            OrderStatus::Failed => {
                self.release(order.id).await?;
                return Ok(Outcome::Failed);
            }
        }
        if !self.reserve(order).await? {
            tracing::info!(order = %order.id, "out of stock");
            return match self.fail(order, FailureReason::OutOfStock).await? {
                // Another run got further meanwhile: finish what it started.
                OrderStatus::Confirmed => self.sell(order.id).await.map(|()| Outcome::Confirmed),
                OrderStatus::Pending | OrderStatus::Failed => self.release(order.id).await.map(|()| Outcome::Failed),
            };
        }
        if !self.debit_and_confirm(order).await? {
            tracing::info!(order = %order.id, "insufficient funds");
            self.release(order.id).await?;
            return Ok(Outcome::Failed);
        }
        tracing::info!(order = %order.id, "order confirmed");
        // The bought items left the cart: its owner should not see them there for the budget.
        self.carts.invalidate(&order.user).await;
        self.sell(order.id).await?;
        Ok(Outcome::Confirmed)
    }

    /// A transaction that waits at most the saga's lock timeout for any row lock: a run blocked
    /// behind another transaction fails and is retried later, instead of holding its connection
    /// and worker slot for as long as the other holds the lock.
    async fn begin<'c>(&self, client: &'c mut Client) -> Result<Transaction<'c>, DbError> {
        let tx = client.transaction().await?;
        tx.exec("SELECT set_config('lock_timeout', $1, true)", &[&self.settings.lock_timeout]).await?;
        Ok(tx)
    }

    /// Holds the order's stock, all of it or none. True if the order holds its stock (now or from an
    /// earlier run); false if some item is short.
    async fn reserve(&self, order: &PlacedOrder) -> Result<bool, DbError> {
        let mut client = self.db.catalog.client().await?;
        let tx = self.begin(&mut client).await?;
        let products: Vec<ProductId> = order.items.iter().map(|i| i.product).collect();
        let quantities: Vec<i32> = order.items.iter().map(|i| i.quantity).collect();
        let available = lock_inventory(&tx, &products).await?;
        // Looked for under the locks: a concurrent run of this order that reserved has committed
        // by now, and is seen, rather than its units counted as taken by someone else.
        let held = tx.maybe_row("SELECT 1 FROM stock_reservations WHERE order_id = $1 LIMIT 1", &[&order.id]).await?;
        if held.is_some() {
            return Ok(true);
        }
        if order.items.iter().any(|i| available.get(&i.product).is_none_or(|s| *s < i64::from(i.quantity))) {
            return Ok(false);
        }
        let left = tx
            .rows(
                "UPDATE inventory i SET reserved = i.reserved + w.quantity, updated_at = now(), version = i.version + 1
                 FROM unnest($1::uuid[], $2::int[]) AS w(product_id, quantity) WHERE i.product_id = w.product_id
                 RETURNING i.product_id, i.stock",
                &[&products, &quantities],
            )
            .await?;
        let sold_out: Vec<ProductId> = left.iter().filter(|r| r.get::<_, i64>(1) == 0).map(|r| r.get(0)).collect();
        self.announce_stock_changes(&tx, &sold_out).await?;
        tx.exec(
            "INSERT INTO stock_reservations (order_id, user_id, product_id, quantity, state)
             SELECT $1, $2, w.product_id, w.quantity, $5 FROM unnest($3::uuid[], $4::int[]) AS w(product_id, quantity)",
            &[&order.id, &order.user, &products, &quantities, &ReservationState::Held.as_str()],
        )
        .await?;
        self.db.catalog.commit_jobs(tx).await?;
        Ok(true)
    }

    /// Debits the wallet and confirms the order in one transaction on the user's shard; or, when the
    /// balance is short, fails the order. True if the order is confirmed.
    async fn debit_and_confirm(&self, order: &PlacedOrder) -> Result<bool, DbError> {
        let shard = self.db.shard_of(order.user);
        let mut client = shard.client().await?;
        let tx = self.begin(&mut client).await?;
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
            self.set_failed(&tx, order, FailureReason::InsufficientFunds).await?;
            shard.commit_jobs(tx).await?;
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
        // The owner's next read of their cart must not be an older cached copy (see `crate::carts`).
        // Bumped before the items are deleted: a cart write locks the user's row and then its
        // item, so locking them the other way round here deadlocked with one (seen with a client
        // adding to its cart while its previous order was confirmed).
        tx.exec(crate::carts::BUMP_OWNER_VERSION, &[&order.user]).await?;
        // The bought items leave the cart as the checkout saw them: an item written after it (added,
        // or its quantity changed) has a newer revision and stays. Orders from before snapshots were
        // kept take their products out whatever their revision.
        tx.exec(
            "DELETE FROM cart_items WHERE user_id = $1 AND product_id = ANY($2)
                 AND ($3::bigint IS NULL OR revision <= $3)",
            &[&order.user, &products, &order.cart_version],
        )
        .await?;
        let confirmed = OrderConfirmed { order_id: order.id, user_id: order.user, total_cents: order.total_cents };
        keel_outbox::enqueue(&tx, &self.follow_up(&confirmed, order.id)).await?;
        shard.commit_jobs(tx).await?;
        Ok(true)
    }

    /// Fails a pending order that could not get its stock. Returns the status it found.
    async fn fail(&self, order: &PlacedOrder, reason: FailureReason) -> Result<OrderStatus, DbError> {
        let shard = self.db.shard_of(order.user);
        let mut client = shard.client().await?;
        let tx = self.begin(&mut client).await?;
        let status = locked_status(&tx, order.id).await?;
        if status == OrderStatus::Pending {
            self.set_failed(&tx, order, reason).await?;
        }
        shard.commit_jobs(tx).await?;
        Ok(status)
    }

    async fn set_failed(
        &self,
        tx: &Transaction<'_>,
        order: &PlacedOrder,
        reason: FailureReason,
    ) -> Result<(), DbError> {
        tx.exec(
            "UPDATE orders SET status = $3, failure_reason = $2, updated_at = now() WHERE id = $1",
            &[&order.id, &reason.as_str(), &OrderStatus::Failed.as_str()],
        )
        .await?;
        let failed = OrderFailed { order_id: order.id, user_id: order.user, reason };
        keel_outbox::enqueue(tx, &self.follow_up(&failed, order.id)).await?;
        Ok(())
    }

    /// An event caused by this run, carrying its trace context on.
    fn follow_up<E: Event>(&self, payload: &E, aggregate: impl ToString) -> keel_outbox::NewJob {
        events::event(payload, aggregate, self.traceparent.clone())
    }

    /// Sells a confirmed order's held units, once: they leave `reserved` and `on_hand` together for
    /// `sold`, so what a new order can take does not change.
    async fn sell(&self, order: OrderId) -> Result<(), DbError> {
        self.decide(order, ReservationState::Sold).await
    }

    /// Gives back the stock of a failed order, once.
    async fn release(&self, order: OrderId) -> Result<(), DbError> {
        self.decide(order, ReservationState::Released).await
    }

    /// Moves the order's undecided reservations to `to` (sold or released) and the inventory with
    /// them.
    async fn decide(&self, order: OrderId, to: ReservationState) -> Result<(), DbError> {
        let mut client = self.db.catalog.client().await?;
        let tx = self.begin(&mut client).await?;
        // Reservations made before stock was counted apart are `sold` from the start (see the
        // migration); if such an order fails, its units go back on hand.
        let from: &[&str] = match to {
            ReservationState::Sold => &[ReservationState::Held.as_str()],
            ReservationState::Released => &[ReservationState::Held.as_str(), ReservationState::Sold.as_str()],
            ReservationState::Held => unreachable!("a reservation is never held again"),
        };
        let decided = tx
            .rows(
                "WITH before AS (
                     SELECT product_id, state FROM stock_reservations
                     WHERE order_id = $1 AND state = ANY($2) FOR UPDATE
                 )
                 UPDATE stock_reservations r SET state = $3, decided_at = now()
                 FROM before WHERE r.order_id = $1 AND r.product_id = before.product_id
                 RETURNING r.product_id, r.quantity, before.state",
                &[&order, &from, &to.as_str()],
            )
            .await?;
        if decided.is_empty() {
            return Ok(());
        }
        let products: Vec<ProductId> = decided.iter().map(|r| r.get(0)).collect();
        lock_inventory(&tx, &products).await?;
        // Per product: what leaves `reserved` and what `on_hand` gains (negative: a sale).
        let (mut unreserve, mut on_hand) = (Vec::new(), Vec::new());
        for row in &decided {
            let quantity = i64::from(row.get::<_, i32>(1));
            let was: ReservationState = row.try_get(2)?;
            match (was, to) {
                (ReservationState::Held, ReservationState::Sold) => {
                    unreserve.push(quantity);
                    on_hand.push(-quantity);
                }
                (ReservationState::Held, _) => {
                    unreserve.push(quantity);
                    on_hand.push(0);
                }
                // A sale of before, undone.
                (_, _) => {
                    unreserve.push(0);
                    on_hand.push(quantity);
                }
            }
        }
        let now = tx
            .rows(
                "UPDATE inventory i
                 SET reserved = i.reserved - w.unreserve, on_hand = i.on_hand + w.on_hand,
                     sold = i.sold - w.on_hand, updated_at = now(), version = i.version + 1
                 FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS w(product_id, unreserve, on_hand)
                 WHERE i.product_id = w.product_id
                 RETURNING i.product_id, i.stock, w.unreserve + w.on_hand",
                &[&products, &unreserve, &on_hand],
            )
            .await?;
        // Back in stock: what a new order can take went from nothing to what came back.
        let back: Vec<ProductId> = now
            .iter()
            .filter(|r| r.get::<_, i64>(2) > 0 && r.get::<_, i64>(1) == r.get::<_, i64>(2))
            .map(|r| r.get(0))
            .collect();
        self.announce_stock_changes(&tx, &back).await?;
        self.db.catalog.commit_jobs(tx).await?;
        Ok(())
    }

    /// Tells the search index about products that sold out or came back in stock. Other stock
    /// changes do not change what search shows, so they cost no event.
    async fn announce_stock_changes(&self, tx: &Transaction<'_>, products: &[ProductId]) -> Result<(), DbError> {
        for &product in products {
            let changed = ProductStockChanged { product_id: product, stock: None };
            keel_outbox::enqueue(tx, &self.follow_up(&changed, product)).await?;
        }
        Ok(())
    }
}

/// Locks the products' inventory rows in product order, so that two transactions over the same
/// products wait for each other and never deadlock; returns what a new order can take of each.
async fn lock_inventory(tx: &Transaction<'_>, products: &[ProductId]) -> Result<HashMap<ProductId, i64>, DbError> {
    Ok(tx
        .rows(
            "SELECT product_id, stock FROM inventory WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE",
            &[&products],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The order's status, its row locked until the transaction ends: the saga's steps on the order
/// row run one at a time, and each sees where the others left it.
async fn locked_status(tx: &Transaction<'_>, order: OrderId) -> Result<OrderStatus, DbError> {
    Ok(tx.row("SELECT status FROM orders WHERE id = $1 FOR UPDATE", &[&order]).await?.try_get(0)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_lock_timeout_is_passed_in_milliseconds() {
        let config = Config { saga_lock_timeout: Duration::from_millis(1500), ..Config::default() };
        assert_eq!(Settings::from_config(&config).lock_timeout, "1500ms");
    }

    #[test]
    fn reservation_states_read_as_stored() {
        let texts: Vec<&str> = ReservationState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(texts, ["held", "sold", "released"], "the migration's CHECK names the same");
    }
}
