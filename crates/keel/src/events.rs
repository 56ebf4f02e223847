//! Domain events: what happened, written to the outbox in the same transaction as the change, so an
//! event exists exactly when its change committed. Workers react to them (the checkout saga, e-mail,
//! the search index, webhooks); an event's payload is its `data`, as webhook receivers see it.

use keel_outbox::NewJob;

pub const USER_REGISTERED: &str = "user.registered";
pub const PRODUCT_CREATED: &str = "product.created";
pub const PRODUCT_UPDATED: &str = "product.updated";
/// A product's stock was set, ran out, or came back: its search document says whether it is in stock.
pub const PRODUCT_STOCK_CHANGED: &str = "product.stock_changed";
/// A checkout was accepted; the saga decides it.
pub const ORDER_PLACED: &str = "order.placed";
pub const ORDER_CONFIRMED: &str = "order.confirmed";
pub const ORDER_FAILED: &str = "order.failed";
/// Does nothing: measures the queue (or JetStream) itself, end to end (`make bench`, S4).
pub const PING: &str = "keel.ping";

/// The events a webhook may subscribe to. The others are internal steps.
pub const SUBSCRIBABLE: &[&str] = &[USER_REGISTERED, PRODUCT_CREATED, PRODUCT_UPDATED, ORDER_CONFIRMED, ORDER_FAILED];

/// An event about `aggregate`, carrying the trace context of whatever caused it.
pub fn event(kind: &str, aggregate: impl ToString, data: serde_json::Value, traceparent: Option<String>) -> NewJob {
    NewJob { traceparent, ..NewJob::new(kind, aggregate, data) }
}
