//! The e-mail each user event causes: a welcome on sign-up, a receipt when an order is confirmed,
//! a notice with the reason when it fails.
//!
//! Exactly one message per event as far as Keel can make it: a delivery record (a processed-event
//! row on the user's shard) is checked before sending and written after, so retries after a
//! failure to send, and redeliveries after success, send nothing more. Only a crash between the
//! server's acceptance and the record can repeat a message, and then with the same `Message-ID`.

mod mailer;

use keel_outbox::{Job, JobError};
use lettre::message::Mailbox;
use uuid::Uuid;

use crate::config::Config;
use crate::db::{Databases, Db, Sql};
use crate::events::{ORDER_CONFIRMED, ORDER_FAILED, USER_REGISTERED};
pub use mailer::{Mail, Mailer};

/// Where Keel's e-mail goes ([`Mailer`]) and whom it is from.
pub struct Sender {
    mailer: Mailer,
    from: Mailbox,
}

impl Sender {
    pub fn from_config(config: &Config) -> Result<Sender, String> {
        Ok(Sender {
            mailer: Mailer::from_config(config)?,
            from: config.mail_from.parse().map_err(|e| format!("KEEL_MAIL_FROM: {e}"))?,
        })
    }
}

/// The delivery record's handler name in `keel_processed_events`.
const SENT: &str = "mail";

fn db_err(e: impl std::fmt::Display) -> JobError {
    JobError::from(e.to_string())
}

/// Sends the e-mail of a user event, once.
pub async fn send_for(db: &Databases, sender: &Sender, job: &Job) -> Result<(), JobError> {
    let user = job.payload["user_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()).ok_or("payload has no user_id")?;
    let shard = db.shard_of(user);
    let sent = shard
        .client()
        .await
        .map_err(db_err)?
        .maybe_row("SELECT 1 FROM keel_processed_events WHERE event_id = $1 AND handler = $2", &[&job.id, &SENT])
        .await
        .map_err(db_err)?;
    if sent.is_some() {
        return Ok(());
    }
    let Some(mail) = compose(&db.catalog, shard, job, user).await? else {
        return Ok(());
    };
    // No connection is held while the mail server answers, which may take seconds.
    if let Err(error) = sender.mailer.send(job.id, &sender.from, mail).await {
        metrics::counter!("keel_mail_failed_total", "event" => job.kind.clone()).increment(1);
        return Err(JobError::from(error));
    }
    metrics::counter!("keel_mail_sent_total", "event" => job.kind.clone()).increment(1);
    let client = shard.client().await.map_err(db_err)?;
    keel_outbox::mark_processed(&client, job.id, SENT).await.map_err(db_err)?;
    tracing::info!(event = %job.kind, "e-mail sent");
    Ok(())
}

async fn compose(catalog: &Db, shard: &Db, job: &Job, user: Uuid) -> Result<Option<Mail>, JobError> {
    let client = shard.client().await.map_err(db_err)?;
    let Some(row) = client.maybe_row("SELECT name, email FROM users WHERE id = $1", &[&user]).await.map_err(db_err)?
    else {
        return Err(JobError::from(format!("user {user} does not exist on its shard")));
    };
    let (name, email): (String, String) = (row.get(0), row.get(1));
    let to = Mailbox::new(Some(name.clone()), email.parse().map_err(|e| JobError::from(format!("{email}: {e}")))?);
    let order =
        || job.payload["order_id"].as_str().and_then(|s| Uuid::parse_str(s).ok()).ok_or("payload has no order_id");
    let mail = match job.kind.as_str() {
        USER_REGISTERED => Mail {
            to,
            subject: "Welcome to Keel".into(),
            body: format!("Hello {name},\n\nwelcome to Keel. Your account is ready.\n"),
        },
        ORDER_CONFIRMED => {
            let (total, items) = order_lines(&client, order()?).await?;
            drop(client);
            receipt(catalog, to, &name, order()?, total, items).await?
        }
        ORDER_FAILED => {
            let reason = match job.payload["reason"].as_str() {
                Some("out_of_stock") => "an item in it is out of stock",
                Some("insufficient_funds") => "your wallet balance did not cover it",
                _ => "it could not be completed",
            };
            Mail {
                to,
                subject: format!("Your order {} was not placed", order()?),
                body: format!(
                    "Hello {name},\n\nyour order\n\n  {}\n\nwas not placed: {reason}.\nNothing was charged.\n",
                    order()?
                ),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(mail))
}

/// The order's total and its items (product, quantity, unit price).
async fn order_lines(shard: &impl Sql, order: Uuid) -> Result<(i64, Vec<(Uuid, i32, i64)>), JobError> {
    let total: i64 = shard.row("SELECT total_cents FROM orders WHERE id = $1", &[&order]).await.map_err(db_err)?.get(0);
    let items = shard
        .rows(
            "SELECT product_id, quantity, price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id",
            &[&order],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok((total, items))
}

async fn receipt(
    catalog: &Db,
    to: Mailbox,
    name: &str,
    order: Uuid,
    total: i64,
    items: Vec<(Uuid, i32, i64)>,
) -> Result<Mail, JobError> {
    let products: Vec<Uuid> = items.iter().map(|(product, ..)| *product).collect();
    let names: std::collections::HashMap<Uuid, String> = catalog
        .client()
        .await
        .map_err(db_err)?
        .rows("SELECT id, name FROM products WHERE id = ANY($1)", &[&products])
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut body = format!("Hello {name},\n\nthank you for your order\n\n  {order}\n\n");
    for (product, quantity, price) in items {
        let product_name = names.get(&product).map_or("(a product no longer listed)", String::as_str);
        body.push_str(&format!("  {quantity} x {product_name} at {}\n", money(price)));
    }
    body.push_str(&format!("\nTotal: {}\n", money(total)));
    Ok(Mail { to, subject: format!("Receipt for order {order}"), body })
}

fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    #[test]
    fn money_has_two_decimals() {
        assert_eq!(super::money(123_456), "1234.56");
        assert_eq!(super::money(5), "0.05");
    }
}
