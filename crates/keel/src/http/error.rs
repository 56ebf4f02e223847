//! The one error type of the HTTP API, rendered as `application/problem+json` (RFC 9457).
//!
//! Each variant documents its status. Handlers turn what they know (a unique-constraint violation, a
//! missing row) into a specific variant at the call site; anything else becomes [`ApiError::Internal`],
//! whose cause is logged and never shown.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be read at all: a body that is not JSON, a query value that is not of
    /// the type wanted (`limit=ten`, a number beyond 64 bits, a parameter given twice), a cursor this
    /// API did not issue, a missing or malformed header.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no valid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: valid credentials, but not for this resource.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such resource (or route).
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the request conflicts with the current state (a duplicate e-mail or SKU).
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than the 1 MiB limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: the request can be read, but a value is wrong: out of range (`limit=0`, an empty `q`), a
    /// body field of the wrong JSON type, missing or unknown, an invalid e-mail address, a reused
    /// idempotency key with another body.
    #[error("{0}")]
    Unprocessable(String),
    /// 429: over a rate limit ([`crate::http::rate_limit`]); `Retry-After` says when to try again.
    #[error("{0}")]
    TooManyRequests(String),
    /// 503: a database cannot be reached or the request ran out of time; worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// 503: the request's database connection died under it (a restart, a failover). A read is
    /// run once more before this is answered ([`crate::http::retry`]).
    #[error("{0}")]
    ConnectionLost(String),
    /// 500: a bug or an unexpected failure. The cause is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A stable identifier of the kind of problem, such as `/problems/not-found`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What is wrong with this request, in words a person can act on.
    pub detail: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::ConnectionLost(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::MethodNotAllowed(_) => "method-not-allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::Unprocessable(_) => "validation-failed",
            ApiError::TooManyRequests(_) => "too-many-requests",
            ApiError::Unavailable(_) | ApiError::ConnectionLost(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            ApiError::Internal(_) => "an unexpected error occurred; it has been logged".to_owned(),
            other => other.to_string(),
        };
        Problem {
            kind: format!("/problems/{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
        }
    }

    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::NotFound(format!("no {what} with id {id:?}"))
    }

    pub fn invalid(field: &str, why: &str) -> ApiError {
        ApiError::Unprocessable(format!("{field}: {why}"))
    }
}

/// The `Retry-After` of a 503, in seconds.
pub const UNAVAILABLE_RETRY_AFTER_S: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(cause) => tracing::error!(%cause, "internal error"),
            ApiError::Unavailable(cause) | ApiError::ConnectionLost(cause) => tracing::warn!(%cause, "unavailable"),
            _ => {}
        }
        let problem = self.problem();
        let mut response = (self.status(), axum::Json(problem)).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let ApiError::Unavailable(_) | ApiError::ConnectionLost(_) = self {
            // What makes a 503 here passes in moments (a database restarting, a pool busy, a statement
            // cut short): tell clients when to try again rather than let them hammer or give up.
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(UNAVAILABLE_RETRY_AFTER_S));
        }
        if let ApiError::ConnectionLost(_) = self {
            response.extensions_mut().insert(crate::http::retry::ConnectionLost);
        }
        response
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        match e {
            DbError::Down(name) => ApiError::Unavailable(format!("the {name} database is not answering")),
            DbError::Pool(e) => ApiError::Unavailable(format!("database unavailable: {e}")),
            DbError::Query(e) => e.into(),
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> ApiError {
        // A connection that died mid-request (a database restart) is worth a retry: say so.
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        let shutting_down = e.code().is_some_and(|c| c.code().starts_with("57P") || c.code().starts_with("08"));
        if e.is_closed() || io || shutting_down {
            return ApiError::ConnectionLost(format!("database connection lost: {e}"));
        }
        // 57014: cancelled by `statement_timeout` (KEEL_STATEMENT_TIMEOUT): the database was too busy
        // or the query too slow this time, not a fault of the request.
        if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
            return ApiError::Unavailable(format!("a database statement took too long: {e}"));
        }
        // KB001: the user's bucket has just moved to another shard, and this node routed by the map
        // from before (it learns the new one within moments): the retry goes to the new shard.
        if e.code().is_some_and(|c| c.code() == crate::db::shard_map::BUCKET_MOVED) {
            metrics::counter!("keel_bucket_moved_refusals_total").increment(1);
            return ApiError::Unavailable("this account has just moved to another database: retry".into());
        }
        ApiError::Internal(format!("{e:?}"))
    }
}

/// The SQLSTATE of a unique-constraint violation and the constraint it names, for turning it into a
/// 409 at the call site.
pub fn unique_violation(e: &tokio_postgres::Error) -> Option<&str> {
    let db = e.as_db_error()?;
    (db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION).then(|| db.constraint().unwrap_or(""))
}
