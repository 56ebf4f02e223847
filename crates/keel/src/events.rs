//! Domain events: what happened, written to the outbox in the same transaction as the change, so an
//! event exists exactly when its change committed. Workers react to them (the checkout saga, e-mail,
//! the search index, webhooks); an event's payload is its `data`, as webhook receivers see it.
//!
//! Each event is a type: its fields are the payload, its [`Event::NAME`] the job kind. Producers
//! build the outbox job with [`event`], consumers read it back with [`Event::from_job`], so the
//! JSON of an event is written and read through the same struct. The orders' stored states
//! ([`OrderStatus`], [`FailureReason`]) are here too, as an event carries them.

use keel_outbox::{Job, JobError, NewJob};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{OrderId, ProductId, UserId};
use uuid::Uuid;

/// An event: a payload type and the name jobs and webhooks know it by.
pub trait Event: Serialize + DeserializeOwned {
    /// The job kind, and the `type` of its webhook deliveries.
    const NAME: &'static str;

    /// Reads the event a claimed job carries. The error names the event, the job, and what is wrong
    /// (a missing field, a value of the wrong type, a job of another kind).
    fn from_job(job: &Job) -> Result<Self, JobError> {
        if job.kind != Self::NAME {
            return Err(JobError::from(format!("job {} carries {}, not {}", job.id, job.kind, Self::NAME)));
        }
        Self::deserialize(&job.payload)
            .map_err(|e| JobError::from(format!("{} event {} has an unreadable payload: {e}", Self::NAME, job.id)))
    }
}

/// The outbox job of an event about `aggregate`, carrying the trace context of whatever caused it.
pub fn event<E: Event>(payload: &E, aggregate: impl ToString, traceparent: Option<String>) -> NewJob {
    // Payloads are structs of strings, numbers and ids: nothing in them can fail to become JSON.
    let data = serde_json::to_value(payload).expect("an event payload serializes to JSON");
    NewJob { traceparent, ..NewJob::new(E::NAME, aggregate, data) }
}

/// The events a webhook may subscribe to. The others are internal steps.
pub const SUBSCRIBABLE: &[&str] = &[
    UserRegistered::NAME,
    ProductCreated::NAME,
    ProductUpdated::NAME,
    OrderConfirmed::NAME,
    OrderFailed::NAME,
    crate::accounts::erasure::UserDeleted::NAME,
];

/// A user signed up (with their wallet, empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: UserId,
    pub name: String,
}

impl Event for UserRegistered {
    const NAME: &'static str = "user.registered";
}

/// A one-time secret was issued to a user's address: its e-mail is to be sent. Internal, never a
/// webhook: it carries what the e-mail worker needs to make the secret again with the signing key
/// (`accounts::codes::secret`), never the secret itself, nor the address (read from the code's row
/// when the e-mail is written, so a code replaced, used or expired meanwhile is not sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeIssued {
    pub user_id: UserId,
    pub issued: Issued,
}

impl Event for CodeIssued {
    const NAME: &'static str = "account.code_issued";
}

/// What a one-time secret is for (`accounts::codes`, which says how long each lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A 6-digit code to sign in with, instead of a password.
    SignIn,
    /// A 6-digit code proving the owner reads the address.
    VerifyEmail,
    /// A long token in a link, to set a new password.
    PasswordReset,
}

/// What an e-mail needs to carry a secret: the nonce and the key that make it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub purpose: Purpose,
    /// URL-safe base64.
    pub nonce: String,
    pub key_id: String,
}

/// A product as the API shows it (`catalog::Product`) and as its events carry it, committed (in an
/// event, the like count is the view of the node that made the change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Product)]
pub struct ProductData {
    #[schema(value_type = String)]
    pub id: ProductId,
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub like_count: i64,
    pub created_at: String,
    pub updated_at: String,
    /// Grows by one with every change to the product: of two copies, the one with the higher
    /// version is the newer (timestamps cannot tell: overlapping changes commit out of their order).
    /// Events written before versions existed carry none (0).
    #[serde(default)]
    pub version: i64,
}

/// A product was created: its data is the product.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProductCreated(pub ProductData);

impl Event for ProductCreated {
    const NAME: &'static str = "product.created";
}

/// A product's details changed: its data is the product as it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProductUpdated(pub ProductData);

impl Event for ProductUpdated {
    const NAME: &'static str = "product.updated";
}

/// A product's stock was set, ran out, or came back: its search document says whether it is in stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductStockChanged {
    pub product_id: ProductId,
    /// What can be bought (on hand less reserved) after an admin set the stock on hand; absent when a
    /// checkout sold the product out or a failed one gave it back (the search index reads the stock
    /// from the inventory either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stock: Option<i64>,
}

impl Event for ProductStockChanged {
    const NAME: &'static str = "product.stock_changed";
}

/// A checkout was accepted; the saga decides it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: OrderId,
    pub user_id: UserId,
}

impl Event for OrderPlaced {
    const NAME: &'static str = "order.placed";
}

/// The saga reserved the order's stock and debited its total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub total_cents: i64,
}

impl Event for OrderConfirmed {
    const NAME: &'static str = "order.confirmed";
}

/// The saga refused the order; nothing was charged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderFailed {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub reason: FailureReason,
}

impl Event for OrderFailed {
    const NAME: &'static str = "order.failed";
}

/// A user followed or stopped following another: the follower's side is written; the job writes the
/// followed user's side. `version` is the follower's row's after the change: the other side applies
/// a change only over an older version, so changes arriving in any order, or twice, end in the same
/// state as the follower's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowChanged {
    /// The follower.
    pub user_id: UserId,
    pub follower_name: String,
    pub followee_id: UserId,
    pub following: bool,
    pub version: i64,
    /// When the follower's row changed, in milliseconds since the epoch.
    pub changed_at_ms: i64,
}

impl Event for FollowChanged {
    const NAME: &'static str = "follow.changed";
}

crate::text_enum::text_enum! {
    /// What an actor did.
    Verb, "a feed verb" {
        Liked = "liked",
        Followed = "followed",
    }
}

crate::text_enum::text_enum! {
    /// What an activity is about.
    ObjectType, "a feed object type" {
        Product = "product",
        User = "user",
    }
}

/// One activity, as stored on the actor's shard, carried by its event, and copied into feeds. The
/// actor's name is the one they had when they acted: a feed shows it without a query per actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub id: Uuid,
    pub actor_id: UserId,
    pub actor_name: String,
    pub verb: Verb,
    pub object_type: ObjectType,
    pub object_id: Uuid,
    /// When it happened, in microseconds since the epoch (the database's precision): the feed's
    /// order, and what its cursors continue from.
    pub created_at_us: i64,
}

/// An erased user's follow: the followed user's side of it is deleted (a follower no longer counted,
/// if it was active). Carries the erased user's id and nothing else of theirs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowerErased {
    /// The erased follower.
    pub user_id: UserId,
    pub followee_id: UserId,
}

impl Event for FollowerErased {
    const NAME: &'static str = "follow.follower_erased";
}

/// A user did something their followers see in their feeds (see [`crate::feed`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityPosted {
    /// The actor.
    pub user_id: UserId,
    pub activity: Activity,
}

impl Event for ActivityPosted {
    const NAME: &'static str = "activity.posted";
}

/// An activity was withdrawn (an unlike, an unfollow): it leaves every feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityWithdrawn {
    /// The actor.
    pub user_id: UserId,
    pub activity_id: Uuid,
}

impl Event for ActivityWithdrawn {
    const NAME: &'static str = "activity.withdrawn";
}

/// Does nothing: measures the queue (or JetStream) itself, end to end (`make bench`, S4). Its
/// payload is `{}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ping {}

impl Event for Ping {
    const NAME: &'static str = "keel.ping";
}

crate::text_enum::text_enum! {
    /// Where an order is: the saga moves it from pending to confirmed or failed, once.
    OrderStatus, "an order status" {
        Pending = "pending",
        Confirmed = "confirmed",
        Failed = "failed",
    }
}

crate::text_enum::text_enum! {
    /// Why the saga failed an order.
    FailureReason, "a failure reason" {
        /// An item had less stock than the order asked for.
        OutOfStock = "out_of_stock",
        /// The wallet's balance was below the order's total.
        InsufficientFunds = "insufficient_funds",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job_of(job: NewJob) -> Job {
        Job {
            id: job.id,
            kind: job.kind,
            aggregate_id: job.aggregate_id,
            payload: job.payload,
            traceparent: job.traceparent,
            attempt: 1,
            created_at: std::time::SystemTime::now(),
            ready_at: std::time::SystemTime::now(),
            replays: 0,
        }
    }

    /// Writes `payload` as a job and reads it back; the JSON is what webhook receivers see.
    fn round_trip<E: Event + PartialEq + std::fmt::Debug>(
        payload: E,
        aggregate: impl ToString,
        expected: serde_json::Value,
    ) {
        let aggregate = aggregate.to_string();
        let job = event(&payload, &aggregate, Some("00-trace-span-01".into()));
        assert_eq!((job.kind.as_str(), job.aggregate_id.as_str()), (E::NAME, aggregate.as_str()));
        assert_eq!(job.traceparent.as_deref(), Some("00-trace-span-01"));
        assert_eq!(job.payload, expected, "{}", E::NAME);
        assert_eq!(E::from_job(&job_of(job)).unwrap(), payload);
    }

    /// The payloads keep the shape the producers wrote before they were types: the same fields,
    /// ids as strings.
    #[test]
    fn payloads_keep_their_json_shape() {
        let (user, order, product) = (UserId::new(), OrderId::new(), ProductId::new());
        round_trip(
            UserRegistered { user_id: user, name: "Ada".into() },
            user,
            json!({ "user_id": user, "name": "Ada" }),
        );
        round_trip(
            OrderPlaced { order_id: order, user_id: user },
            order,
            json!({ "order_id": order, "user_id": user }),
        );
        round_trip(
            OrderConfirmed { order_id: order, user_id: user, total_cents: 1250 },
            order,
            json!({ "order_id": order, "user_id": user, "total_cents": 1250 }),
        );
        round_trip(
            OrderFailed { order_id: order, user_id: user, reason: FailureReason::InsufficientFunds },
            order,
            json!({ "order_id": order, "user_id": user, "reason": "insufficient_funds" }),
        );
        round_trip(
            ProductStockChanged { product_id: product, stock: Some(7) },
            product,
            json!({ "product_id": product, "stock": 7 }),
        );
        round_trip(ProductStockChanged { product_id: product, stock: None }, product, json!({ "product_id": product }));
        let data = ProductData {
            id: product,
            sku: "SKU-1".into(),
            name: "Lamp".into(),
            description: "".into(),
            price_cents: 999,
            like_count: 3,
            created_at: "2025-01-01T00:00:00.000Z".into(),
            updated_at: "2025-01-02T00:00:00.000Z".into(),
            version: 4,
        };
        let product_json = json!({
            "id": product, "sku": "SKU-1", "name": "Lamp", "description": "", "price_cents": 999, "like_count": 3,
            "created_at": "2025-01-01T00:00:00.000Z", "updated_at": "2025-01-02T00:00:00.000Z", "version": 4,
        });
        round_trip(ProductCreated(data.clone()), product, product_json.clone());
        round_trip(ProductUpdated(data), product, product_json);
        round_trip(Ping {}, product, json!({}));
        let issued = Issued { purpose: Purpose::PasswordReset, nonce: "bm9uY2U".into(), key_id: "k1".into() };
        round_trip(
            CodeIssued { user_id: user, issued },
            user,
            json!({ "user_id": user, "issued": { "purpose": "password_reset", "nonce": "bm9uY2U", "key_id": "k1" } }),
        );
        assert_eq!(json!(user), json!(user.to_string()), "ids are their canonical text");
    }

    #[test]
    fn a_job_that_is_not_the_event_is_refused_with_what_is_wrong() {
        let (order, user) = (OrderId::new(), UserId::new());
        let placed = event(&OrderPlaced { order_id: order, user_id: user }, order, None);
        let error = OrderConfirmed::from_job(&job_of(placed.clone())).unwrap_err();
        assert!(error.message.contains("carries order.placed, not order.confirmed"), "{}", error.message);
        let mut job = job_of(placed);
        job.payload = json!({ "order_id": order });
        let error = OrderPlaced::from_job(&job).unwrap_err();
        assert!(error.message.contains("order.placed event") && error.message.contains("user_id"), "{}", error.message);
        job.payload = json!({ "order_id": 7, "user_id": user });
        assert!(OrderPlaced::from_job(&job).is_err());
    }

    #[test]
    fn stored_texts_are_written_once_and_read_back() {
        for status in OrderStatus::ALL {
            assert_eq!(status.as_str().parse::<OrderStatus>(), Ok(*status));
            assert_eq!(json!(status), json!(status.as_str()));
            assert_eq!(serde_json::from_value::<OrderStatus>(json!(status.as_str())).unwrap(), *status);
        }
        for reason in FailureReason::ALL {
            assert_eq!(reason.as_str().parse::<FailureReason>(), Ok(*reason));
            assert_eq!(json!(reason), json!(reason.as_str()));
        }
        let texts: Vec<&str> = OrderStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(texts, ["pending", "confirmed", "failed"]);
        let texts: Vec<&str> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(texts, ["out_of_stock", "insufficient_funds"]);
        assert_eq!("shipped".parse::<OrderStatus>().unwrap_err().to_string(), "\"shipped\" is not an order status");
        assert!(serde_json::from_value::<FailureReason>(json!("Out_Of_Stock")).is_err());
    }
}
