//! The e-mail each user event causes: a welcome on sign-up (with the code that verifies the
//! address), a receipt when an order is confirmed, a notice with the reason when it fails, and the
//! one-time secrets of accounts (a sign-in code, a verification code, a password reset token).
//!
//! A secret is not in the event: it is made again here from its row with the signing key
//! ([`codes::live`]), and only while it is live — a code replaced, used or expired before its e-mail
//! went out is not sent. Secrets are never logged.
//!
//! Exactly one message per event as far as Keel can make it, with `email_deliveries` on the user's
//! shard:
//!
//! 1. **Claim** the event's e-mail in one statement: only if it was not sent and nobody holds a live
//!    claim. Two handlers given the same event at once (a redelivery by the broker, a lease that
//!    lapsed under a slow worker) cannot both pass; the loser retries later and finds it sent.
//! 2. **Send**, holding no database connection while the mail server answers.
//! 3. **Record** the server's acceptance at once, in its own statement — not with the job's
//!    completion, which is written in batches. If the database cannot take it (a restart), this
//!    process keeps trying in the background until it can, and never sends that e-mail again
//!    meanwhile: what it knows it did, it does not redo.
//!
//! A failure to send releases the claim for the next attempt; a handler that dies holding one leaves
//! it to lapse ([`CLAIM`]). What remains is what no sender can know: a process killed while the mail
//! server stores the message and answers (measured: up to about 50 ms under load), or between its
//! answer and the record (one commit), sends the message again once the claim lapses — with the same
//! `Message-ID`. So does a database outage longer than the claim that ends just as another worker
//! retries.

mod address;
mod mailer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_outbox::{Job, JobError};
use lettre::message::Mailbox;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::accounts::codes::{self, Purpose};
use crate::config::Config;
use crate::db::{Databases, Db, DbError, Sql};
use crate::events::{CodeIssued, Event, FailureReason, OrderConfirmed, OrderFailed, UserRegistered};
use crate::http::auth::tokens::Keys;
use crate::ids::{OrderId, ProductId, UserId};
pub use address::Email;
pub use mailer::{Mail, Mailer};

/// Where Keel's e-mail goes ([`Mailer`]) and whom it is from.
pub struct Sender {
    mailer: Mailer,
    from: Mailbox,
    /// E-mails this process sent whose record the database has not taken yet (it is being retried).
    unrecorded: Arc<Mutex<HashSet<Uuid>>>,
    /// Leave to hand an e-mail to the mail server (`KEEL_MAIL_CONCURRENCY`). What a crash can repeat
    /// is the exchanges in flight at that moment, so this bounds it per crash (with 48 at once, one
    /// kill could repeat 48 e-mails). Taken before the claim, so no claim lapses while its handler
    /// waits here.
    sending: Arc<Semaphore>,
    /// The signing keys, which make the e-mailed secrets again (`KEEL_TOKEN_KEYS`, as the API's). A
    /// worker without them sends every other e-mail; a secret's e-mail fails until they are set.
    keys: Option<Keys>,
}

impl Sender {
    pub fn from_config(config: &Config) -> Result<Sender, String> {
        Ok(Sender {
            mailer: Mailer::from_config(config)?,
            from: config.mail_from.parse().map_err(|e| format!("KEEL_MAIL_FROM: {e}"))?,
            unrecorded: Arc::default(),
            sending: Arc::new(Semaphore::new(config.mail_concurrency)),
            keys: match config.token_keys.is_empty() {
                true => None,
                false => Some(Keys::new(config.token_keys.clone()).map_err(|e| format!("KEEL_TOKEN_KEYS: {e}"))?),
            },
        })
    }

    /// Records that event `event`'s e-mail was accepted: now if the database takes it, else in the
    /// background, retried until it does (this process sends nothing for that event meanwhile).
    /// Each try routes anew: the user's bucket may have moved to another shard meanwhile (its record
    /// with it), and the old shard refuses the write.
    async fn record_sent(&self, db: &Arc<Databases>, user: UserId, event: Uuid) {
        let Err(error) = mark_sent(&db.shard_of(user), event).await else { return };
        tracing::warn!(%error, %event, "could not record a sent e-mail; retrying until the database takes it");
        metrics::counter!("keel_mail_record_retries_total").increment(1);
        self.unrecorded.lock().unwrap().insert(event);
        let (db, unrecorded) = (db.clone(), self.unrecorded.clone());
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(50);
            while mark_sent(&db.shard_of(user), event).await.is_err() {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            unrecorded.lock().unwrap().remove(&event);
            tracing::info!(%event, "recorded the sent e-mail");
        });
    }
}

/// How long a claim to send one event's e-mail lasts: longer than the mail server may take (10 s)
/// and recording its answer, so a live handler never loses its claim; a dead one's lapses, and its
/// e-mail goes out this much later.
const CLAIM: Duration = Duration::from_secs(30);

/// What [`claim`] found.
enum Claim {
    /// This handler may send.
    Ours,
    /// Sent already: nothing to do.
    Sent,
    /// Another handler holds the claim, for this much longer.
    Busy(Duration),
}

/// The events that send e-mail, read from their jobs.
enum UserEvent {
    Registered(UserRegistered),
    Confirmed(OrderConfirmed),
    Failed(OrderFailed),
    Code(CodeIssued),
}

impl UserEvent {
    /// The event of `job`; none for a kind that sends no e-mail.
    fn from_job(job: &Job) -> Result<Option<UserEvent>, JobError> {
        Ok(Some(match job.kind.as_str() {
            UserRegistered::NAME => UserEvent::Registered(UserRegistered::from_job(job)?),
            OrderConfirmed::NAME => UserEvent::Confirmed(OrderConfirmed::from_job(job)?),
            OrderFailed::NAME => UserEvent::Failed(OrderFailed::from_job(job)?),
            CodeIssued::NAME => UserEvent::Code(CodeIssued::from_job(job)?),
            _ => return Ok(None),
        }))
    }

    /// Whom the e-mail is for.
    fn user(&self) -> UserId {
        match self {
            UserEvent::Registered(e) => e.user_id,
            UserEvent::Confirmed(e) => e.user_id,
            UserEvent::Failed(e) => e.user_id,
            UserEvent::Code(e) => e.user_id,
        }
    }
}

/// Sends the e-mail of a user event, once.
pub async fn send_for(db: &Arc<Databases>, sender: &Sender, job: &Job) -> Result<(), JobError> {
    let Some(event) = UserEvent::from_job(job)? else {
        return Ok(());
    };
    if sender.unrecorded.lock().unwrap().contains(&job.id) {
        return Ok(()); // sent by this process; its record is on its way
    }
    let shard = &*db.shard_of(event.user());
    let _sending = sender.sending.acquire().await.expect("the semaphore is never closed");
    match claim(shard, job.id, event.user()).await? {
        Claim::Ours => {}
        Claim::Sent => return Ok(()),
        Claim::Busy(left) => return Err(JobError::retry_in("another handler is sending this e-mail", left)),
    }
    let mail = match compose(&db.catalog, shard, sender.keys.as_ref(), &event).await {
        Ok(Some(mail)) => mail,
        Ok(None) => {
            // Nothing worth sending (a secret no longer live): done, and no later run sends it.
            release(shard, job.id).await?;
            metrics::counter!("keel_mail_skipped_total", "event" => job.kind.clone()).increment(1);
            tracing::info!(event = %job.kind, "e-mail not sent: its secret was replaced, used or expired");
            return Ok(());
        }
        Err(error) => {
            release(shard, job.id).await?;
            return Err(error);
        }
    };
    // No connection is held while the mail server answers, which may take seconds.
    if let Err(error) = sender.mailer.send(job.id, &sender.from, mail).await {
        metrics::counter!("keel_mail_failed_total", "event" => job.kind.clone(), "permanent" => error.permanent.to_string())
            .increment(1);
        release(shard, job.id).await?;
        return Err(if error.permanent {
            // Dead at once, with the server's reason: retrying a refused recipient for hours helps nobody.
            JobError::permanent(format!("the mail server refused this e-mail for good: {}", error.message))
        } else {
            JobError::from(error.message)
        });
    }
    sender.record_sent(db, event.user(), job.id).await;
    metrics::counter!("keel_mail_sent_total", "event" => job.kind.clone()).increment(1);
    tracing::info!(event = %job.kind, "e-mail sent");
    Ok(())
}

/// Takes the claim to send event `event`'s e-mail to `user`, in one statement (see the module's
/// comment). The record carries the user's bucket: it moves with the user (docs/SHARDING.md).
async fn claim(shard: &Db, event: Uuid, user: UserId) -> Result<Claim, DbError> {
    let client = shard.client().await?;
    let claimed = client
        .maybe_row(
            "INSERT INTO email_deliveries (event_id, claimed_until, bucket)
             VALUES ($1, now() + $2 * interval '1 second', keel_bucket($3))
             ON CONFLICT (event_id) DO UPDATE
             SET claimed_until = EXCLUDED.claimed_until, attempts = email_deliveries.attempts + 1
             WHERE email_deliveries.sent_at IS NULL AND email_deliveries.claimed_until <= now()
             RETURNING 1",
            &[&event, &CLAIM.as_secs_f64(), &user],
        )
        .await?;
    if claimed.is_some() {
        return Ok(Claim::Ours);
    }
    let row = client
        .row(
            "SELECT sent_at IS NOT NULL, extract(epoch FROM greatest(claimed_until - now(), interval '0'))::float8
             FROM email_deliveries WHERE event_id = $1",
            &[&event],
        )
        .await?;
    Ok(if row.get(0) { Claim::Sent } else { Claim::Busy(Duration::from_secs_f64(row.get(1))) })
}

/// Gives a claim back after a failure to send, so the next attempt need not wait for it to lapse.
async fn release(shard: &Db, event: Uuid) -> Result<(), DbError> {
    let client = shard.client().await?;
    client
        .exec("UPDATE email_deliveries SET claimed_until = now() WHERE event_id = $1 AND sent_at IS NULL", &[&event])
        .await?;
    Ok(())
}

/// Writes that event `event`'s e-mail was accepted by the mail server.
async fn mark_sent(shard: &Db, event: Uuid) -> Result<(), DbError> {
    let client = shard.client().await?;
    client.exec("UPDATE email_deliveries SET sent_at = now() WHERE event_id = $1", &[&event]).await?;
    Ok(())
}

/// The e-mail of `event`, or `None` when there is nothing worth sending.
async fn compose(catalog: &Db, shard: &Db, keys: Option<&Keys>, event: &UserEvent) -> Result<Option<Mail>, JobError> {
    let user = event.user();
    let client = shard.client().await?;
    let Some(Recipient { name, email }) = recipient(&client, user).await? else {
        return Err(JobError::from(format!("user {user} does not exist on its shard")));
    };
    let mailbox = |email: &str| {
        // Stored only after `Email::parse` accepted it, with the same parser.
        let email = Email::parse(email).map_err(JobError::from)?;
        Ok::<_, JobError>(Mailbox::new(Some(name.clone()), email.address().clone()))
    };
    let to = mailbox(&email)?;
    let no_keys =
        || JobError::from("KEEL_TOKEN_KEYS is not set: this worker cannot make the secrets of e-mailed codes");
    let mail = match event {
        UserEvent::Registered(_) => {
            let mut body = format!("Hello {name},\n\nwelcome to Keel. Your account is ready.\n");
            // The code sign-up issued, if still live and for this address (a resend or a change of
            // address since has its own e-mail).
            let code = match keys {
                Some(keys) => codes::live(&client, keys, user, Purpose::VerifyEmail, None).await?,
                None => None,
            };
            if let Some(code) = code.filter(|code| code.email == email) {
                body.push_str(&format!(
                    "\nTo verify your e-mail address, enter this code:\n\n  {}\n\nIt is valid for {}.\n",
                    code.secret,
                    validity(Purpose::VerifyEmail)
                ));
            }
            Mail { to, subject: "Welcome to Keel".into(), body }
        }
        UserEvent::Code(CodeIssued { issued, .. }) => {
            let Some(code) =
                codes::live(&client, keys.ok_or_else(no_keys)?, user, issued.purpose, Some(issued)).await?
            else {
                return Ok(None);
            };
            // To the address the code was issued for: after a change of address, the new one.
            secret_mail(mailbox(&code.email)?, &name, user, issued.purpose, &code.secret)
        }
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
    Ok(Some(mail))
}

/// The e-mail carrying a one-time secret.
fn secret_mail(to: Mailbox, name: &str, user: UserId, purpose: Purpose, secret: &str) -> Mail {
    let valid = validity(purpose);
    let (subject, body) = match purpose {
        Purpose::SignIn => (
            "Your Keel sign-in code",
            format!(
                "Hello {name},\n\nyour code to sign in to Keel is\n\n  {secret}\n\nIt is valid for {valid}, once. \
                 If you did not ask for it, ignore this e-mail: nobody can sign in with it but you.\n"
            ),
        ),
        Purpose::VerifyEmail => (
            "Verify your e-mail address",
            format!(
                "Hello {name},\n\nto verify that this address is yours, enter this code:\n\n  {secret}\n\n\
                 It is valid for {valid}. If you did not ask for it, ignore this e-mail.\n"
            ),
        ),
        Purpose::PasswordReset => (
            "Reset your Keel password",
            format!(
                "Hello {name},\n\nto choose a new password, use this password reset token:\n\n  {}\n\n\
                 It is valid for {valid} and works once; using it signs you out everywhere. If you did not ask \
                 for it, ignore this e-mail: your password stays as it is.\n",
                codes::reset_token(user, secret)
            ),
        ),
    };
    Mail { to, subject: subject.into(), body }
}

/// How long a secret is valid, in words: "10 minutes", "24 hours".
fn validity(purpose: Purpose) -> String {
    let minutes = purpose.lifetime().as_secs() / 60;
    if minutes >= 120 && minutes.is_multiple_of(60) {
        format!("{} hours", minutes / 60)
    } else {
        format!("{minutes} minutes")
    }
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

    #[test]
    fn secrets_are_valid_for_their_lifetime_in_words() {
        use super::{validity, Purpose};
        assert_eq!(validity(Purpose::SignIn), "10 minutes");
        assert_eq!(validity(Purpose::VerifyEmail), "24 hours");
        assert_eq!(validity(Purpose::PasswordReset), "30 minutes");
    }
}
