//! What follows an event besides the checkout saga: the search index, webhooks and e-mail.

use keel_outbox::{Job, JobError};

use super::JobContext;
use crate::db::{Db, DbError};
use crate::email;
use crate::ids::ProductId;
use crate::{search, webhooks};

/// Product events, in the catalogue: the product's search document and the webhook deliveries
/// are written in one transaction, so they happen together, once.
pub async fn on_catalog_event(ctx: &JobContext, job: &Job) -> Result<(), JobError> {
    let product: ProductId = job.aggregate_id.parse().map_err(|_| "the event is not about a product")?;
    index_and_fan_out(&ctx.db.catalog, product, job).await?;
    search::record_index_lag(job.created_at);
    Ok(())
}

async fn index_and_fan_out(catalog: &Db, product: ProductId, job: &Job) -> Result<(), DbError> {
    let mut client = catalog.client().await?;
    let tx = client.transaction().await?;
    search::index_product(&tx, product).await?;
    webhooks::fan_out(&tx, job).await?;
    catalog.commit_jobs(tx).await?;
    Ok(())
}

/// User and order events, from a shard: webhook deliveries (in the catalogue), then the e-mail.
/// Fan-out is idempotent, so when the e-mail fails and the event is retried it makes nothing new.
pub async fn on_user_event(ctx: &JobContext, job: &Job) -> Result<(), JobError> {
    fan_out(&ctx.db.catalog, job).await?;
    email::send_for(&ctx.db, &ctx.email, job).await
}

/// The webhook deliveries of `job`, in a transaction of their own. Its connection goes back to the
/// pool before the e-mail takes others: a handler never holds one connection while it waits for
/// another, so handlers cannot starve each other.
async fn fan_out(catalog: &Db, job: &Job) -> Result<(), DbError> {
    let mut client = catalog.client().await?;
    let tx = client.transaction().await?;
    webhooks::fan_out(&tx, job).await?;
    catalog.commit_jobs(tx).await?;
    Ok(())
}
