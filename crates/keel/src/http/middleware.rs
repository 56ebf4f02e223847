//! What wraps every request: a request id, a tracing span, RED metrics by route, the number of
//! database queries the request sent, a deadline, a problem response for a panic — and, for a
//! request that may change something, a task of its own that runs to its end whatever the client
//! does.
//!
//! **Why writes run as tasks.** A handler is a future; when its client disconnects (or the deadline
//! passes) the server drops it wherever it is. A write that has committed but not yet done what
//! follows the commit — putting the new value in a cache, counting, telling other nodes — would be
//! left half done: the database changed, the cache did not. So every request whose method may
//! change state (all but GET, HEAD and OPTIONS) is spawned on a [`TaskTracker`]: the client may go,
//! the write finishes, and shutdown waits for these tasks before it lets go of the databases.

use std::any::Any;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio_util::task::TaskTracker;
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

/// What [`observe`] needs from the configuration, and the tracker of the writes in flight.
#[derive(Clone)]
pub struct Observe {
    pub debug_headers: bool,
    pub timeout: Duration,
    pub writes: TaskTracker,
}

/// Whether a request may change state, and so must not be dropped half-way.
fn may_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The method as a metric label. Any token is a valid method, so the raw one would let each client
/// make new series at will (`curl -X FOO`): the standard ones are kept, every other is `OTHER`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

pub async fn observe(mut req: Request, next: Next, settings: Observe) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let trace = TraceContext::from_headers(req.headers());
    let trace_id = trace.trace_id.clone();
    req.extensions_mut().insert(trace);
    // The route template, not the path: `/v1/users/{id}` is one series, not one per user.
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = req.method().clone();
    let span = tracing::info_span!("request", request_id = %id, %trace_id, %method, %route);

    let handle = count_queries(next.run(req)).instrument(span.clone());
    let timeout = settings.timeout;
    let outcome = if may_write(&method) {
        let task = settings.writes.spawn(handle);
        tokio::time::timeout(timeout, async {
            task.await.unwrap_or_else(|e| match e.try_into_panic() {
                Ok(panic) => (panic_response(panic), 0),
                Err(_) => (ApiError::Unavailable("the server is stopping".into()).into_response(), 0),
            })
        })
        .await
    } else {
        tokio::time::timeout(timeout, handle).await
    };
    let (mut response, queries) = outcome.unwrap_or_else(|_| {
        let message = if may_write(&method) {
            format!("the request took longer than {timeout:?}; a change it makes may still complete")
        } else {
            format!("the request took longer than {timeout:?}")
        };
        (ApiError::Unavailable(message).into_response(), 0)
    });

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let labels =
        [("method", method_label(&method).to_owned()), ("route", route.clone()), ("status", status.to_string())];
    metrics::counter!("keel_http_requests_total", &labels).increment(1);
    metrics::histogram!("keel_http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    metrics::histogram!("keel_http_db_queries_per_request", "route" => route).record(f64::from(queries));
    span.in_scope(|| {
        tracing::info!(status, latency_ms = elapsed.as_secs_f64() * 1e3, db_queries = queries, "request finished")
    });

    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    if settings.debug_headers {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_name_the_standard_methods_and_lump_the_rest() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(method_label(&Method::TRACE), "TRACE");
        for junk in [&b"FOO"[..], b"JUNK123", b"get", b"PROPFIND"] {
            assert_eq!(method_label(&Method::from_bytes(junk).unwrap()), "OTHER", "{junk:?}");
        }
    }
}
