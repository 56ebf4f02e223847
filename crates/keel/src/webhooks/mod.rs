//! Webhooks for integrators, per the Standard Webhooks 1.0 specification: subscriptions (admin), a
//! delivery per subscription and event made when the event is handled (fan-out), delivered by a
//! worker with retries on a schedule ([`delivery`]), listed and replayable.

pub mod delivery;
pub mod network;
pub mod signing;
mod status;

use std::net::IpAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use keel_outbox::{Job, NewJob};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::db::{DbError, Sql, Transaction};
use crate::events::SUBSCRIBABLE;
use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path, Query};
use crate::http::{timestamp, Page, PageParams};
use crate::state::AppState;
use network::NetworkPolicy;
pub use status::DeliveryStatus;

/// The job that delivers one event to one endpoint; its group is the subscription, so a slow or
/// dead endpoint holds only its own few slots.
pub const DELIVER: &str = "webhook.deliver";
/// Deliveries to one subscription running at once in one worker (of 64 delivery slots).
pub const PER_ENDPOINT_CONCURRENCY: usize = 16;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// An `http` or `https` URL; private addresses are refused unless configured.
    pub url: String,
    /// Any of `user.registered`, `user.deleted`, `product.created`, `product.updated`, `order.confirmed`,
    /// `order.failed`.
    pub events: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Subscription {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub enabled: bool,
    /// Why deliveries stopped (the endpoint answered 410 Gone), if they did.
    pub disabled_reason: Option<String>,
    pub created_at: String,
}

impl Subscription {
    fn from_row(row: &Row) -> Subscription {
        Subscription {
            id: row.get::<_, Uuid>("id").to_string(),
            url: row.get("url"),
            events: row.get("events"),
            enabled: row.get("enabled"),
            disabled_reason: row.get("disabled_reason"),
            created_at: timestamp(row.get("created_at")),
        }
    }
}

/// A new subscription, with the secret its receiver verifies signatures with: shown only now.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedSubscription {
    #[serde(flatten)]
    pub subscription: Subscription,
    /// `whsec_…`
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    pub id: String,
    /// Sent as `webhook-id`: the same on every attempt.
    pub event_id: String,
    pub event_type: String,
    pub status: DeliveryStatus,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
    /// The trace of the request that caused the event.
    pub trace_id: Option<String>,
    pub created_at: String,
}

impl Delivery {
    fn from_row(row: &Row) -> Delivery {
        Delivery {
            id: row.get::<_, Uuid>("id").to_string(),
            event_id: row.get::<_, Uuid>("event_id").to_string(),
            event_type: row.get("event_type"),
            status: row.get("status"),
            attempts: row.get("attempts"),
            last_status_code: row.get("last_status_code"),
            last_error: row.get("last_error"),
            next_attempt_at: row.get::<_, Option<std::time::SystemTime>>("next_attempt_at").map(timestamp),
            trace_id: row.get("trace_id"),
            created_at: timestamp(row.get("created_at")),
        }
    }
}

const SUBSCRIPTION_COLUMNS: &str = "id, url, events, enabled, disabled_reason, created_at";
const DELIVERY_COLUMNS: &str =
    "id, event_id, event_type, status, attempts, last_status_code, last_error, next_attempt_at, trace_id, created_at";

/// The network policy in force for this process (see [`network`]).
pub fn policy(config: &crate::config::Config) -> NetworkPolicy {
    NetworkPolicy {
        allow_loopback: config.webhook_allow_loopback.unwrap_or(false),
        allow_private: config.webhook_allow_private,
    }
}

fn check_url(raw: &str, policy: NetworkPolicy) -> Result<String, ApiError> {
    if raw.len() > 2000 {
        return Err(ApiError::invalid("url", "must be at most 2000 characters"));
    }
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| ApiError::invalid("url", &format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ApiError::invalid("url", "must be an http or https URL"));
    }
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| ApiError::invalid("url", "must name a host"))?;
    let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
    // Names are checked when delivering, since what they resolve to can change.
    if let Some(reason) = literal.and_then(|ip| network::refusal(policy, ip)) {
        return Err(ApiError::invalid("url", &reason));
    }
    Ok(url.to_string())
}

fn check_events(events: &[String]) -> Result<Vec<String>, ApiError> {
    if events.is_empty() {
        return Err(ApiError::invalid("events", "subscribe to at least one event"));
    }
    let mut checked: Vec<String> = Vec::new();
    for event in events {
        if !SUBSCRIBABLE.contains(&event.as_str()) {
            return Err(ApiError::invalid("events", &format!("{event:?} is not one of {}", SUBSCRIBABLE.join(", "))));
        }
        if !checked.contains(event) {
            checked.push(event.clone());
        }
    }
    Ok(checked)
}

#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = CreateSubscription,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Subscribed; the secret is shown only now", body = CreatedSubscription),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, description = "A bad URL, a refused address, or an unknown event", body = Problem),
    ))]
pub async fn create_subscription(
    State(state): State<AppState>,
    _: Admin,
    Json(input): Json<CreateSubscription>,
) -> Result<impl IntoResponse, ApiError> {
    let url = check_url(&input.url, policy(&state.config))?;
    let events = check_events(&input.events)?;
    let id = Uuid::now_v7();
    let secret = signing::new_secret();
    let client = state.db.catalog.client().await?;
    let row = client
        .row(
            &format!(
                "INSERT INTO webhook_subscriptions (id, url, events, secret) VALUES ($1, $2, $3, $4)
                 RETURNING {SUBSCRIPTION_COLUMNS}"
            ),
            &[&id, &url, &events, &secret],
        )
        .await?;
    let created = CreatedSubscription { subscription: Subscription::from_row(&row), secret };
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/webhooks/{id}"))], Json(created)))
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", params(PageParams),
    security(("bearer" = [])),
    responses((status = 200, description = "Subscriptions, oldest first", body = Page<Subscription>),
        (status = 400, description = "A parameter that cannot be read (`limit=ten`) or a cursor this API did not \
            issue", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, description = "A limit out of 1 to 100", body = Problem)))]
pub async fn list_subscriptions(
    State(state): State<AppState>,
    _: Admin,
    Query(params): Query<PageParams>,
) -> Result<Json<Page<Subscription>>, ApiError> {
    let (limit, after) = params.validate()?;
    let client = state.db.catalog.client().await?;
    let rows = client
        .rows(
            &format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE $1::uuid IS NULL OR id > $1
                 ORDER BY id LIMIT $2"
            ),
            &[&after, &(limit + 1)],
        )
        .await?;
    Ok(Json(Page::from_rows(rows, limit, Subscription::from_row, |s| s.id.clone())))
}

#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 204, description = "Unsubscribed; its deliveries are dropped"),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn delete_subscription(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id::<Uuid>("webhook", &id)?;
    let client = state.db.catalog.client().await?;
    match client.exec("DELETE FROM webhook_subscriptions WHERE id = $1", &[&id]).await? {
        0 => Err(ApiError::not_found("webhook", &id.to_string())),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

async fn subscription_exists(client: &impl Sql, id: Uuid) -> Result<(), ApiError> {
    match client.maybe_row("SELECT 1 FROM webhook_subscriptions WHERE id = $1", &[&id]).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found("webhook", &id.to_string())),
    }
}

#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path), PageParams),
    security(("bearer" = [])),
    responses((status = 200, description = "Deliveries, newest first", body = Page<Delivery>),
        (status = 400, description = "A parameter that cannot be read (`limit=ten`) or a cursor this API did not \
            issue", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 422, description = "A limit out of 1 to 100", body = Problem)))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    Query(params): Query<PageParams>,
) -> Result<Json<Page<Delivery>>, ApiError> {
    let id = parse_id::<Uuid>("webhook", &id)?;
    let (limit, before) = params.validate()?;
    let client = state.db.catalog.client().await?;
    subscription_exists(&client, id).await?;
    let rows = client
        .rows(
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
                 WHERE subscription_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
            ),
            &[&id, &before, &(limit + 1)],
        )
        .await?;
    Ok(Json(Page::from_rows(rows, limit, Delivery::from_row, |d| d.id.clone())))
}

#[utoipa::path(post, path = "/v1/webhooks/{id}/deliveries/{delivery_id}/retry", tag = "webhooks",
    params(("id" = String, Path), ("delivery_id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 202, description = "Queued again with a fresh retry schedule", body = Delivery),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "Only a dead delivery can be replayed", body = Problem)))]
pub async fn retry_delivery(
    State(state): State<AppState>,
    _: Admin,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Delivery>), ApiError> {
    let id = parse_id::<Uuid>("webhook", &id)?;
    let delivery = parse_id::<Uuid>("delivery", &delivery)?;
    let mut client = state.db.catalog.client().await?;
    let tx = client.transaction().await?;
    let status: DeliveryStatus = tx
        .maybe_row(
            "SELECT status FROM webhook_deliveries WHERE id = $1 AND subscription_id = $2 FOR UPDATE",
            &[&delivery, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("delivery", &delivery.to_string()))?
        .get(0);
    match status {
        DeliveryStatus::Dead => {}
        DeliveryStatus::Pending | DeliveryStatus::Retrying | DeliveryStatus::Succeeded => {
            return Err(ApiError::Conflict(format!("the delivery is {status}: only a dead delivery can be replayed")));
        }
    }
    if !keel_outbox::replay(&tx, delivery).await? {
        return Err(ApiError::Conflict("the delivery's job is not dead yet; try again in a moment".into()));
    }
    let row = tx
        .row(
            &format!(
                "UPDATE webhook_deliveries SET status = $2, next_attempt_at = now(), updated_at = now()
                 WHERE id = $1 RETURNING {DELIVERY_COLUMNS}"
            ),
            &[&delivery, &DeliveryStatus::Pending.as_str()],
        )
        .await?;
    state.db.catalog.commit_jobs(tx).await?;
    Ok((StatusCode::ACCEPTED, Json(Delivery::from_row(&row))))
}

/// Makes a delivery, and its job, for every enabled subscription to the event, on the caller's
/// catalogue transaction (committed with `Db::commit_jobs`). A redelivered event makes nothing new (one delivery per subscription and
/// event). Returns how many deliveries were made.
pub async fn fan_out(tx: &Transaction<'_>, event: &Job) -> Result<usize, DbError> {
    if !SUBSCRIBABLE.contains(&event.kind.as_str()) {
        return Ok(0);
    }
    let subscriptions: Vec<Uuid> = tx
        .rows("SELECT id FROM webhook_subscriptions WHERE enabled AND events @> ARRAY[$1]", &[&event.kind])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if subscriptions.is_empty() {
        return Ok(0);
    }
    let body = serde_json::json!({
        "type": event.kind,
        "timestamp": timestamp(event.created_at),
        "data": event.payload,
    })
    .to_string();
    let mut made = 0;
    for subscription in subscriptions {
        let id = Uuid::now_v7();
        let inserted = tx
            .maybe_row(
                "INSERT INTO webhook_deliveries (id, subscription_id, event_id, event_type, body, trace_id, status)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (subscription_id, event_id) DO NOTHING RETURNING 1",
                &[
                    &id,
                    &subscription,
                    &event.id,
                    &event.kind,
                    &body,
                    &event.trace_id(),
                    &DeliveryStatus::Pending.as_str(),
                ],
            )
            .await?;
        if inserted.is_some() {
            let job = NewJob {
                id,
                traceparent: event.traceparent.clone(),
                ..NewJob::new(DELIVER, subscription, serde_json::json!({}))
            };
            keel_outbox::enqueue(tx, &job).await?;
            made += 1;
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_for_scheme_host_and_address() {
        let strict = NetworkPolicy { allow_loopback: false, allow_private: false };
        assert!(check_url("https://hooks.example.org/keel", strict).is_ok());
        assert!(check_url("ftp://example.org/", strict).is_err());
        assert!(check_url("not a url", strict).is_err());
        assert!(check_url("http://127.0.0.1:9000/", strict).is_err());
        assert!(check_url("http://[::1]:9000/", strict).is_err());
        assert!(check_url("http://169.254.169.254/latest/meta-data", strict).is_err());
        let local = NetworkPolicy { allow_loopback: true, allow_private: false };
        assert!(check_url("http://127.0.0.1:9000/", local).is_ok());
    }

    #[test]
    fn events_must_be_subscribable_and_are_deduplicated() {
        let events = check_events(&["order.confirmed".into(), "order.confirmed".into()]).unwrap();
        assert_eq!(events, ["order.confirmed"]);
        assert!(check_events(&[]).is_err());
        assert!(check_events(&["order.placed".into()]).is_err());
    }
}
