//! What follows an event besides the checkout saga: the search index, webhooks and e-mail.

use keel_outbox::{Job, JobError};
use uuid::Uuid;

use super::JobContext;
use crate::email;
use crate::{search, webhooks};

fn db_err(e: impl std::fmt::Display) -> JobError {
    JobError::from(e.to_string())
}

/// Product events, in the catalogue: the product's search document and the webhook deliveries
/// are written in one transaction, so they happen together, once.
pub async fn on_catalog_event(ctx: &JobContext, job: &Job) -> Result<(), JobError> {
    let product = Uuid::parse_str(&job.aggregate_id).map_err(|_| "the event is not about a product")?;
    let mut client = ctx.db.catalog.client().await.map_err(db_err)?;
    let tx = client.transaction().await.map_err(db_err)?;
    search::index_product(&tx, product).await.map_err(db_err)?;
    webhooks::fan_out(&tx, job).await.map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    search::record_index_lag(job.created_at);
    Ok(())
}

/// User and order events, from a shard: webhook deliveries (in the catalogue), then the e-mail.
/// Fan-out is idempotent, so when the e-mail fails and the event is retried it makes nothing new.
pub async fn on_user_event(ctx: &JobContext, job: &Job) -> Result<(), JobError> {
    {
        // The connection goes back to the pool before the e-mail takes others: a handler never
        // holds one connection while it waits for another, so handlers cannot starve each other.
        let mut client = ctx.db.catalog.client().await.map_err(db_err)?;
        let tx = client.transaction().await.map_err(db_err)?;
        webhooks::fan_out(&tx, job).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
    }
    email::send_for(&ctx.db, &ctx.email, job).await
}
