//! What wraps every request: a request id, a tracing span, RED metrics by route, the number of
//! database queries the request sent, a deadline, and a problem response for a panic.

use std::any::Any;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::ApiError;
use super::trace::TraceContext;
use crate::db::count_queries;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const DB_QUERIES: HeaderName = HeaderName::from_static("keel-db-queries");

/// Takes the caller's request id if it is a sane one, so logs join up across services; else makes one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| keel_random::hex(16), str::to_owned)
}

pub async fn observe(mut req: Request, next: Next, debug_headers: bool, timeout: Duration) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let trace = TraceContext::from_headers(req.headers());
    let trace_id = trace.trace_id.clone();
    req.extensions_mut().insert(trace);
    // The route template, not the path: `/v1/users/{id}` is one series, not one per user.
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = req.method().clone();
    let span = tracing::info_span!("request", request_id = %id, %trace_id, %method, %route);

    let (response, queries) = count_queries(
        async move {
            match tokio::time::timeout(timeout, next.run(req)).await {
                Ok(response) => response,
                Err(_) => ApiError::Unavailable(format!("the request took longer than {timeout:?}")).into_response(),
            }
        }
        .instrument(span.clone()),
    )
    .await;
    let mut response = response;

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let labels = [("method", method.to_string()), ("route", route.clone()), ("status", status.to_string())];
    metrics::counter!("keel_http_requests_total", &labels).increment(1);
    metrics::histogram!("keel_http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    metrics::histogram!("keel_http_db_queries_per_request", "route" => route).record(f64::from(queries));
    span.in_scope(|| {
        tracing::info!(status, latency_ms = elapsed.as_secs_f64() * 1e3, db_queries = queries, "request finished")
    });

    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    if debug_headers {
        response.headers_mut().insert(DB_QUERIES, HeaderValue::from(queries));
    }
    response
}

/// A handler that panicked: logged, and answered with a 500 problem instead of a dropped connection.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    ApiError::Internal(format!("handler panicked: {message}")).into_response()
}
