//! One retry for a read whose database connection died under it.
//!
//! A database restart, a failover or an administrator ending sessions kills the pooled connections
//! in use: the statement fails with the connection, not because of anything the request did, and
//! a new connection (the pool makes one) usually works at once. For a request that changes nothing
//! — `GET` or `HEAD` with no body — running it again is safe, so it is run once more after a short
//! pause, and the client sees the answer instead of a 503. A write is never retried here: whether
//! its transaction committed before the connection died is unknown, and Idempotency-Keys are how a
//! client retries those.
//!
//! Handlers mark such a failure with [`ConnectionLost`] on their response (see
//! [`super::error::ApiError::ConnectionLost`]); any other answer, 503s included (a pool that is
//! busy, a statement that ran too long), is passed on as it is: retrying those would only add load.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;

/// On a response: the request failed because its database connection died mid-request.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLost;

/// The pause before the retry: long enough for the pool to notice the dead connections.
const PAUSE: Duration = Duration::from_millis(50);

/// Runs `request`; a read whose connection died is run once more.
pub async fn retry_reads(request: Request, next: Next) -> Response {
    let Some(again) = replayable(&request) else {
        return next.run(request).await;
    };
    let response = next.clone().run(request).await;
    if response.extensions().get::<ConnectionLost>().is_none() {
        return response;
    }
    metrics::counter!("keel_http_reads_retried_total").increment(1);
    tracing::info!("a read lost its database connection; running it once more");
    tokio::time::sleep(PAUSE).await;
    next.run(again).await
}

/// A copy of `request` to run again, if it is a read without a body.
fn replayable(request: &Request) -> Option<Request> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let headers = request.headers();
    let bodiless = headers.get(header::TRANSFER_ENCODING).is_none()
        && headers.get(header::CONTENT_LENGTH).is_none_or(|length| length == "0");
    if !bodiless {
        return None;
    }
    let mut copy = Request::new(Body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}
