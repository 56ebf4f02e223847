//! The e-mail each user event causes: a welcome on sign-up, a receipt when an order is confirmed,
//! a notice with the reason when it fails.
//!
//! Exactly one message per event as far as Keel can make it: a delivery record (a processed-event
//! row on the user's shard) is checked before sending and written after, so retries after a
//! failure to send, and redeliveries after success, send nothing more. Only a crash between the
//! server's acceptance and the record can repeat a message, and then with the same `Message-ID`.

mod address;
mod mailer;

use std::collections::HashMap;

use keel_outbox::{Job, JobError};
use lettre::message::Mailbox;
use uuid::Uuid;

use crate::config::Config;
use crate::db::{Databases, Db, DbError, Sql};
use crate::events::{Event, FailureReason, OrderConfirmed, OrderFailed, UserRegistered};
use crate::ids::{OrderId, ProductId, UserId};
pub use address::Email;
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

/// The events that send e-mail, read from their jobs.
enum UserEvent {
    Registered(UserRegistered),
    Confirmed(OrderConfirmed),
    Failed(OrderFailed),
}

impl UserEvent {
    /// The event of `job`; none for a kind that sends no e-mail.
    fn from_job(job: &Job) -> Result<Option<UserEvent>, JobError> {
        Ok(Some(match job.kind.as_str() {
            UserRegistered::NAME => UserEvent::Registered(UserRegistered::from_job(job)?),
            OrderConfirmed::NAME => UserEvent::Confirmed(OrderConfirmed::from_job(job)?),
            OrderFailed::NAME => UserEvent::Failed(OrderFailed::from_job(job)?),
            _ => return Ok(None),
        }))
    }

    /// Whom the e-mail is for.
    fn user(&self) -> UserId {
        match self {
            UserEvent::Registered(e) => e.user_id,
            UserEvent::Confirmed(e) => e.user_id,
            UserEvent::Failed(e) => e.user_id,
        }
    }
}

/// Sends the e-mail of a user event, once.
pub async fn send_for(db: &Databases, sender: &Sender, job: &Job) -> Result<(), JobError> {
    let Some(event) = UserEvent::from_job(job)? else {
        return Ok(());
    };
    let shard = db.shard_of(event.user());
    if already_sent(shard, job.id).await? {
        return Ok(());
    }
    let mail = compose(&db.catalog, shard, &event).await?;
    // No connection is held while the mail server answers, which may take seconds.
    if let Err(error) = sender.mailer.send(job.id, &sender.from, mail).await {
        metrics::counter!("keel_mail_failed_total", "event" => job.kind.clone()).increment(1);
        return Err(JobError::from(error));
    }
    metrics::counter!("keel_mail_sent_total", "event" => job.kind.clone()).increment(1);
    mark_sent(shard, job.id).await?;
    tracing::info!(event = %job.kind, "e-mail sent");
    Ok(())
}

/// Whether the e-mail of event `event` was sent (its delivery record exists).
async fn already_sent(shard: &Db, event: Uuid) -> Result<bool, DbError> {
    let client = shard.client().await?;
    let record = client
        .maybe_row("SELECT 1 FROM keel_processed_events WHERE event_id = $1 AND handler = $2", &[&event, &SENT])
        .await?;
    Ok(record.is_some())
}

/// Writes the delivery record of event `event`'s e-mail.
async fn mark_sent(shard: &Db, event: Uuid) -> Result<(), DbError> {
    let client = shard.client().await?;
    keel_outbox::mark_processed(&client, event, SENT).await?;
    Ok(())
}

async fn compose(catalog: &Db, shard: &Db, event: &UserEvent) -> Result<Mail, JobError> {
    let user = event.user();
    let client = shard.client().await?;
    let Some(Recipient { name, email }) = recipient(&client, user).await? else {
        return Err(JobError::from(format!("user {user} does not exist on its shard")));
    };
    // Stored only after `Email::parse` accepted it, with the same parser.
    let email = Email::parse(&email).map_err(JobError::from)?;
    let to = Mailbox::new(Some(name.clone()), email.address().clone());
    let mail = match event {
        UserEvent::Registered(_) => Mail {
            to,
            subject: "Welcome to Keel".into(),
            body: format!("Hello {name},\n\nwelcome to Keel. Your account is ready.\n"),
        },
        UserEvent::Confirmed(confirmed) => {
            let order = confirmed.order_id;
            let (total, items) = order_lines(&client, order).await?;
            drop(client);
            let names = product_names(catalog, &items).await?;
            receipt(to, &name, order, total, items, &names)
        }
        UserEvent::Failed(failed) => {
            let reason = match failed.reason {
                FailureReason::OutOfStock => "an item in it is out of stock",
                FailureReason::InsufficientFunds => "your wallet balance did not cover it",
            };
            let order = failed.order_id;
            Mail {
                to,
                subject: format!("Your order {order} was not placed"),
                body: format!(
                    "Hello {name},\n\nyour order\n\n  {order}\n\nwas not placed: {reason}.\nNothing was charged.\n"
                ),
            }
        }
    };
    Ok(mail)
}

struct Recipient {
    name: String,
    email: String,
}

/// Whom a user's e-mail goes to, if the user exists.
async fn recipient(shard: &impl Sql, user: UserId) -> Result<Option<Recipient>, DbError> {
    let row = shard.maybe_row("SELECT name, email FROM users WHERE id = $1", &[&user]).await?;
    Ok(row.map(|row| Recipient { name: row.get(0), email: row.get(1) }))
}

/// The order's total and its items (product, quantity, unit price).
async fn order_lines(shard: &impl Sql, order: OrderId) -> Result<(i64, Vec<(ProductId, i32, i64)>), DbError> {
    let total: i64 = shard.row("SELECT total_cents FROM orders WHERE id = $1", &[&order]).await?.get(0);
    let items = shard
        .rows(
            "SELECT product_id, quantity, price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id",
            &[&order],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok((total, items))
}

/// The names of the items' products, as the catalogue has them now.
async fn product_names(catalog: &Db, items: &[(ProductId, i32, i64)]) -> Result<HashMap<ProductId, String>, DbError> {
    let products: Vec<ProductId> = items.iter().map(|(product, ..)| *product).collect();
    let names = catalog
        .client()
        .await?
        .rows("SELECT id, name FROM products WHERE id = ANY($1)", &[&products])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(names)
}

fn receipt(
    to: Mailbox,
    name: &str,
    order: OrderId,
    total: i64,
    items: Vec<(ProductId, i32, i64)>,
    names: &HashMap<ProductId, String>,
) -> Mail {
    let mut body = format!("Hello {name},\n\nthank you for your order\n\n  {order}\n\n");
    for (product, quantity, price) in items {
        let product_name = names.get(&product).map_or("(a product no longer listed)", String::as_str);
        body.push_str(&format!("  {quantity} x {product_name} at {}\n", money(price)));
    }
    body.push_str(&format!("\nTotal: {}\n", money(total)));
    Mail { to, subject: format!("Receipt for order {order}"), body }
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
