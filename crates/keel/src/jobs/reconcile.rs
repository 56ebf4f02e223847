//! The checkout saga's safety net: a scheduled reconciler that finishes what the saga's job did not.
//!
//! The saga's job is retried forever (`jobs::saga_options`), so in the normal course an order is
//! decided once its databases are back. The reconciler covers the rest: an order whose job is gone
//! or dead (dead under an older Keel, a queue restored from an older backup, a job deleted by hand),
//! and a reservation whose sale or release was never finished. Every `KEEL_ORDER_RECONCILE_EVERY`,
//! on one worker at a time:
//!
//! - on each shard, orders pending longer than `KEEL_ORDER_RECONCILE_AFTER`;
//! - in the catalogue, reservations held longer than that (routed to their order's shard by the
//!   user id they carry);
//!
//! are taken through the saga's own steps ([`saga::reconcile`]): a pending order is confirmed or
//! failed, a confirmed order's held units are sold, a failed order's are released. The steps are
//! idempotent and lock what they change, so a job and the reconciler may run one order at once.
//!
//! Anything the reconciler has to do means the saga did not do its work in time, so each is counted
//! (`keel_orders_reconciled_total` by outcome, an alert when it grows), and the age of the oldest
//! pending order and of the oldest held reservation are gauges (`keel_orders_pending_oldest_seconds`
//! per shard, `keel_stock_reservations_held_oldest_seconds`): an alert when they pass the threshold.

use std::sync::Arc;
use std::time::Duration;

use keel_outbox::Scheduler;

use super::JobContext;
use crate::config::Config;
use crate::db::{Db, DbError, Sql};
use crate::ids::{OrderId, UserId};
use crate::orders::saga::{self, Reconciled};

/// The most orders one run takes up, so that a run stays short after a long outage; the next run
/// takes the next ones.
const BATCH: i64 = 100;

/// When the reconciler runs and what it takes up.
#[derive(Debug, Clone, Copy)]
pub struct Reconciler {
    /// Orders pending (reservations held) longer than this are taken up.
    after: Duration,
    every: Duration,
}

impl Reconciler {
    pub fn from_config(config: &Config) -> Reconciler {
        Reconciler { after: config.order_reconcile_after, every: config.order_reconcile_every }
    }

    /// Orders pending too long on `shard`.
    pub fn shard_scheduler(&self, shard: &Db, ctx: Arc<JobContext>) -> Scheduler<JobContext> {
        let (shard, after) = (shard.clone(), self.after);
        Scheduler::new(shard.pool().clone(), ctx).every("reconcile-orders", self.every, self.every / 5, move |ctx| {
            let shard = shard.clone();
            async move { pending_orders(&ctx, &shard, after).await }
        })
    }

    /// Reservations held too long, in the catalogue.
    pub fn catalog_scheduler(&self, catalog: &Db, ctx: Arc<JobContext>) -> Scheduler<JobContext> {
        let (catalog, after) = (catalog.clone(), self.after);
        Scheduler::new(catalog.pool().clone(), ctx).every(
            "reconcile-reservations",
            self.every,
            self.every / 5,
            move |ctx| {
                let catalog = catalog.clone();
                async move { held_reservations(&ctx, &catalog, after).await }
            },
        )
    }
}

async fn pending_orders(ctx: &JobContext, shard: &Db, after: Duration) -> Result<String, String> {
    let stale = async {
        let client = shard.client().await?;
        let oldest: f64 = client
            .row(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
                 FROM orders WHERE status = 'pending'",
                &[],
            )
            .await?
            .get(0);
        metrics::gauge!("keel_orders_pending_oldest_seconds", "db" => shard.name().to_owned()).set(oldest);
        let rows = client
            .rows(
                "SELECT id, user_id FROM orders
                 WHERE status = 'pending' AND created_at < now() - $1 * interval '1 second'
                 ORDER BY created_at LIMIT $2",
                &[&after.as_secs_f64(), &BATCH],
            )
            .await?;
        Ok::<_, DbError>(rows.iter().map(|r| (r.get(0), r.get(1))).collect::<Vec<(OrderId, UserId)>>())
    };
    let stale = stale.await.map_err(|e| e.to_string())?;
    reconcile_all(ctx, "pending orders", stale).await
}

async fn held_reservations(ctx: &JobContext, catalog: &Db, after: Duration) -> Result<String, String> {
    let stale = async {
        let client = catalog.client().await?;
        let oldest: f64 = client
            .row(
                "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
                 FROM stock_reservations WHERE state = 'held'",
                &[],
            )
            .await?
            .get(0);
        metrics::gauge!("keel_stock_reservations_held_oldest_seconds").set(oldest);
        // Reservations of before carry no user; none of them is held (see the migration).
        let rows = client
            .rows(
                "SELECT order_id, user_id FROM stock_reservations
                 WHERE state = 'held' AND user_id IS NOT NULL AND created_at < now() - $1 * interval '1 second'
                 GROUP BY order_id, user_id ORDER BY min(created_at) LIMIT $2",
                &[&after.as_secs_f64(), &BATCH],
            )
            .await?;
        Ok::<_, DbError>(rows.iter().map(|r| (r.get(0), r.get(1))).collect::<Vec<(OrderId, UserId)>>())
    };
    let stale = stale.await.map_err(|e| e.to_string())?;
    reconcile_all(ctx, "held reservations", stale).await
}

/// Takes each order through the saga, one at a time (a reconciler has no hurry, and must leave the
/// pools to the API and the jobs); counts and logs each outcome.
async fn reconcile_all(ctx: &JobContext, what: &str, orders: Vec<(OrderId, UserId)>) -> Result<String, String> {
    let (mut confirmed, mut failed, mut orphans, mut errors) = (0, 0, 0, Vec::new());
    for (order, user) in orders {
        let outcome = saga::reconcile(&ctx.db, &ctx.carts, &ctx.saga, order, user).await;
        let label = match &outcome {
            Ok(Reconciled::Decided(outcome)) => outcome.as_str(),
            Ok(Reconciled::NoSuchOrder) => "no_such_order",
            Err(_) => "error",
        };
        metrics::counter!("keel_orders_reconciled_total", "outcome" => label).increment(1);
        match outcome {
            Ok(Reconciled::Decided(saga::Outcome::Confirmed)) => {
                confirmed += 1;
                tracing::warn!(%order, %user, "reconciled an order the saga had not finished: confirmed");
            }
            Ok(Reconciled::Decided(saga::Outcome::Failed)) => {
                failed += 1;
                tracing::warn!(%order, %user, "reconciled an order the saga had not finished: failed");
            }
            Ok(Reconciled::NoSuchOrder) => {
                orphans += 1;
                tracing::error!(%order, %user, "stock is held for an order its user's shard does not have; left held");
            }
            Err(e) => {
                tracing::warn!(%order, %user, error = %e, "could not reconcile an order; the next run tries again");
                errors.push(e.to_string());
            }
        }
    }
    let summary = format!(
        "{what}: {confirmed} confirmed, {failed} failed, {orphans} without an order, {} not reconciled",
        errors.len()
    );
    match errors.first() {
        None => Ok(summary),
        Some(first) => Err(format!("{summary} (first error: {first})")),
    }
}
