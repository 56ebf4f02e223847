//! Delivering one event to one endpoint: sign, POST, and record what happened. A non-2xx answer, a
//! timeout or a connection error is retried on the configured schedule (or when the endpoint's
//! `Retry-After` says); 410 Gone disables the subscription; after the last retry the delivery is dead.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_outbox::{Job, JobError};
use uuid::Uuid;

use super::network::{redacted, redacted_in, refusal, NetworkPolicy, PolicyResolver};
use super::{signing, DeliveryStatus};
use crate::db::{Db, DbError, PgError, Sql};

/// The longest an endpoint may take to answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured; beyond it, the schedule's own wait applies.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How much of an endpoint's error body is kept in the delivery record.
const ERROR_EXCERPT: usize = 200;
/// How much of an endpoint's error body is read to make the excerpt: an endpoint may answer with
/// anything, of any size, and only the first [`ERROR_EXCERPT`] characters are kept.
const ERROR_BODY_READ: usize = 4096;

/// What the delivery worker needs: an HTTP client confined by the network policy, and the schedule.
pub struct Deliverer {
    http: reqwest::Client,
    policy: NetworkPolicy,
    schedule: Vec<Duration>,
}

/// The outcome of one attempt.
#[derive(Debug)]
enum Attempt {
    Delivered(u16),
    Gone,
    /// The address is not allowed: retrying cannot help.
    Refused(String),
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
}

/// Why a delivery job failed: the endpoint (retried on the webhook schedule, or not at all once the
/// delivery is dead), or the database (retried on the queue's own backoff).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{error}")]
    Endpoint { error: String, retry_in: Option<Duration> },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<PgError> for DeliveryError {
    fn from(e: PgError) -> DeliveryError {
        DeliveryError::Db(e.into())
    }
}

impl From<DeliveryError> for JobError {
    fn from(e: DeliveryError) -> JobError {
        match e {
            DeliveryError::Endpoint { error, retry_in: Some(wait) } => JobError::retry_in(error, wait),
            DeliveryError::Endpoint { error, retry_in: None } => JobError::from(error),
            DeliveryError::Db(e) => JobError::from(e),
        }
    }
}

impl Deliverer {
    pub fn new(policy: NetworkPolicy, schedule: Vec<Duration>) -> Deliverer {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            // A redirect could lead anywhere, past the policy: a receiver must give its final URL.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver(policy)))
            .user_agent(concat!("Keel-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the webhook HTTP client's settings are valid");
        Deliverer { http, policy, schedule }
    }

    /// Runs before the delivery is dead: the first and one per wait of the schedule.
    pub fn max_attempts(&self) -> i32 {
        self.schedule.len() as i32 + 1
    }

    /// The wait before retry `attempt` (1-based), jittered by up to 10% either way so that
    /// deliveries that failed together do not all return together.
    fn wait_before_retry(&self, attempt: i32) -> Option<Duration> {
        let wait = *self.schedule.get(usize::try_from(attempt - 1).ok()?)?;
        Some(keel_random::jitter(wait, 0.1))
    }

    async fn attempt(&self, url: &str, secret: &str, event_id: Uuid, body: &str) -> Attempt {
        if let Some(reason) = literal_refusal(self.policy, url) {
            return Attempt::Refused(reason);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        let id = event_id.to_string();
        let signature = match signing::sign(secret, &id, now, body) {
            Ok(signature) => signature,
            Err(e) => return Attempt::Refused(e.to_string()),
        };
        let sent = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await;
        // reqwest's message quotes the whole URL, secrets in it included: the error is stored and
        // logged without it (the subscription names the endpoint).
        let response = match sent.map_err(reqwest::Error::without_url) {
            Ok(response) => response,
            Err(e) if error_chain(&e).contains("refused to call") => return Attempt::Refused(error_chain(&e)),
            Err(e) => return Attempt::Failed { status: None, error: error_chain(&e), retry_after: None },
        };
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Attempt::Delivered(status);
        }
        if status == 410 {
            return Attempt::Gone;
        }
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(retry_after);
        let excerpt = excerpt(&body_prefix(response, ERROR_BODY_READ).await);
        Attempt::Failed { status: Some(status), error: format!("HTTP {status}: {excerpt}"), retry_after }
    }
}

/// The first `limit` bytes of a body, read chunk by chunk: the rest is never read, so a large answer
/// costs no more than a small one. What could not be read (a reset, the timeout) ends it early.
async fn body_prefix(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut prefix = Vec::new();
    while prefix.len() < limit {
        let Ok(Some(chunk)) = response.chunk().await else { break };
        prefix.extend_from_slice(&chunk[..chunk.len().min(limit - prefix.len())]);
    }
    prefix
}

/// The start of an error body as text that can be stored and shown: PostgreSQL's text cannot hold
/// NUL (the delivery's record would fail to update, and the delivery would neither advance nor die),
/// and other control characters would garble a log line or a terminal. Newlines and tabs stay.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .filter(|&c| !c.is_control() || c == '\n' || c == '\t')
        .take(ERROR_EXCERPT)
        .collect()
}

/// An IP address in the URL itself never reaches the resolver, so it is checked here.
fn literal_refusal(policy: NetworkPolicy, url: &str) -> Option<String> {
    let host = reqwest::Url::parse(url).ok()?.host_str()?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let ip: IpAddr = host.parse().ok()?;
    refusal(policy, ip).map(|reason| format!("refused to call {host}: {reason}"))
}

/// The error and its causes: reqwest's own message alone says only "error sending request".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let wait = match value.trim().parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value.trim()).ok()?.duration_since(SystemTime::now()).unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The handler of [`super::DELIVER`] jobs; the job id is the delivery id.
pub async fn run(catalog: &Db, deliverer: &Deliverer, job: &Job) -> Result<(), DeliveryError> {
    let client = catalog.client().await?;
    let Some(row) = client
        .maybe_row(
            "SELECT d.event_id, d.body, d.status, s.id AS subscription, s.url, s.secret, s.enabled
             FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id WHERE d.id = $1",
            &[&job.id],
        )
        .await?
    else {
        tracing::info!("the webhook was deleted; nothing to deliver");
        return Ok(());
    };
    match row.get("status") {
        DeliveryStatus::Succeeded => return Ok(()),
        DeliveryStatus::Pending | DeliveryStatus::Retrying | DeliveryStatus::Dead => {}
    }
    let (event_id, subscription): (Uuid, Uuid) = (row.get("event_id"), row.get("subscription"));
    if !row.get::<_, bool>("enabled") {
        record(&client, job.id, DeliveryStatus::Dead, None, Some("the subscription is disabled"), None).await?;
        return Ok(());
    }
    let (url, secret, body): (String, String, String) = (row.get("url"), row.get("secret"), row.get("body"));
    // An attempt counts from when it starts: one cut off by a crash was still seen by the receiver.
    client
        .exec("UPDATE webhook_deliveries SET attempts = attempts + 1, updated_at = now() WHERE id = $1", &[&job.id])
        .await?;
    // The connection goes back to the pool while the endpoint answers (up to 10 s): deliveries
    // must not hold connections the API needs.
    drop(client);
    let outcome = deliverer.attempt(&url, &secret, event_id, &body).await;
    let client = catalog.client().await?;
    let label = match &outcome {
        Attempt::Delivered(_) => "delivered",
        Attempt::Gone => "gone",
        Attempt::Refused(_) => "refused",
        Attempt::Failed { .. } => "failed",
    };
    metrics::counter!("keel_webhook_attempts_total", "outcome" => label).increment(1);
    match outcome {
        Attempt::Delivered(code) => {
            tracing::info!(url = %redacted(&url), %subscription, status = code, "webhook delivered");
            Ok(record(&client, job.id, DeliveryStatus::Succeeded, Some(code), None, None).await?)
        }
        Attempt::Gone => {
            tracing::warn!(url = %redacted(&url), %subscription,
                "webhook endpoint answered 410 Gone; disabling the subscription");
            client
                .exec(
                    "UPDATE webhook_subscriptions SET enabled = false, disabled_reason = 'the endpoint answered 410 Gone'
                     WHERE id = $1",
                    &[&subscription],
                )
                .await?;
            Ok(record(&client, job.id, DeliveryStatus::Dead, Some(410), Some("410 Gone: subscription disabled"), None)
                .await?)
        }
        Attempt::Refused(reason) => {
            tracing::warn!(url = %redacted(&url), %subscription, reason = %redacted_in(&reason, &url),
                "webhook refused by the network policy");
            Ok(record(&client, job.id, DeliveryStatus::Dead, None, Some(&reason), None).await?)
        }
        Attempt::Failed { status, error, retry_after } => {
            let wait = deliverer.wait_before_retry(job.attempt).map(|w| retry_after.unwrap_or(w));
            let state = if wait.is_some() { DeliveryStatus::Retrying } else { DeliveryStatus::Dead };
            tracing::warn!(url = %redacted(&url), %subscription, status, error = %redacted_in(&error, &url),
                attempt = job.attempt, retry_in = ?wait, "webhook delivery failed");
            record(&client, job.id, state, status, Some(&error), wait).await?;
            Err(DeliveryError::Endpoint { error, retry_in: wait })
        }
    }
}

async fn record(
    client: &impl Sql,
    delivery: Uuid,
    status: DeliveryStatus,
    code: Option<u16>,
    error: Option<&str>,
    retry_in: Option<Duration>,
) -> Result<(), PgError> {
    client
        .exec(
            "UPDATE webhook_deliveries
             SET status = $2, last_status_code = $3, last_error = $4,
                 next_attempt_at = now() + $5 * interval '1 second', updated_at = now()
             WHERE id = $1",
            &[&delivery, &status.as_str(), &code.map(i32::from), &error, &retry_in.map(|d| d.as_secs_f64())],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("99999999"), Some(MAX_RETRY_AFTER));
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let wait = retry_after(&soon).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn the_schedule_is_jittered_and_ends() {
        let policy = NetworkPolicy { allow_loopback: false, allow_private: false };
        let deliverer = Deliverer::new(policy, vec![Duration::from_secs(10), Duration::from_secs(100)]);
        assert_eq!(deliverer.max_attempts(), 3);
        for _ in 0..100 {
            let first = deliverer.wait_before_retry(1).unwrap();
            assert!(first >= Duration::from_secs(9) && first <= Duration::from_secs(11), "{first:?}");
        }
        assert!(deliverer.wait_before_retry(2).unwrap() >= Duration::from_secs(90));
        assert_eq!(deliverer.wait_before_retry(3), None);
    }

    #[test]
    fn an_excerpt_holds_no_nul_or_control_characters_and_is_bounded() {
        assert_eq!(excerpt(b"boom\0 at\r\n\tline 2\x1b[31m\x7f"), "boom at\n\tline 2[31m");
        assert_eq!(excerpt("caf\u{e9} \u{85}ok".as_bytes()), "caf\u{e9} ok");
        // Bytes that are not UTF-8 (or a character cut at the read limit) become U+FFFD.
        assert_eq!(excerpt(b"bad \xff\xe2\x82"), "bad \u{fffd}\u{fffd}");
        assert_eq!(excerpt(&[b'x'; 10_000]).len(), ERROR_EXCERPT);
    }

    #[tokio::test]
    async fn only_the_start_of_an_error_body_is_read() {
        let big = reqwest::Response::from(axum::http::Response::new(vec![b'x'; 1 << 20]));
        assert_eq!(body_prefix(big, ERROR_BODY_READ).await.len(), ERROR_BODY_READ);
        let small = reqwest::Response::from(axum::http::Response::new("short".to_owned()));
        assert_eq!(body_prefix(small, ERROR_BODY_READ).await, b"short");
    }

    #[test]
    fn literal_addresses_are_checked_before_sending() {
        let policy = NetworkPolicy { allow_loopback: false, allow_private: false };
        assert!(literal_refusal(policy, "http://127.0.0.1:8080/hook").is_some());
        assert!(literal_refusal(policy, "http://[::1]:8080/hook").is_some());
        assert!(literal_refusal(policy, "https://example.org/hook").is_none());
    }
}
