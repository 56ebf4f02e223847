//! What a response of a cacheable kind says about where it came from: `Cache-Status` (RFC 9211) and
//! `Age` (RFC 9111).

use axum::http::{HeaderName, HeaderValue};
use keel_cache::Served;

/// The headers of a response served through a cache.
pub fn cache_headers(served: Served) -> [(HeaderName, HeaderValue); 2] {
    let (status, age) = match served {
        Served::Hit { age, ttl_left, shared: false } => {
            (format!("keel; hit; ttl={}", ttl_left.as_secs()), age.as_secs())
        }
        Served::Hit { age, ttl_left, shared: true } => {
            (format!("keel; hit; ttl={}; detail=shared", ttl_left.as_secs()), age.as_secs())
        }
        Served::Miss => ("keel; fwd=miss; stored".to_owned(), 0),
        // A caller that waited for another's lookup says what that lookup found, and how old it is.
        Served::Coalesced { age, ttl_left, shared: true } => {
            (format!("keel; hit; ttl={}; detail=shared; collapsed", ttl_left.as_secs()), age.as_secs())
        }
        Served::Coalesced { age, .. } => ("keel; fwd=miss; collapsed".to_owned(), age.as_secs()),
        Served::Bypass => ("keel; fwd=bypass; detail=no-shared-tier".to_owned(), 0),
    };
    [
        (HeaderName::from_static("cache-status"), HeaderValue::from_str(&status).expect("ASCII")),
        (axum::http::header::AGE, HeaderValue::from(age)),
    ]
}

/// What a read that went around the cache says about it (the owner reading their own profile, a
/// product list).
pub fn bypass_headers(detail: &'static str) -> [(HeaderName, HeaderValue); 2] {
    [
        (
            HeaderName::from_static("cache-status"),
            HeaderValue::from_str(&format!("keel; fwd=bypass; detail={detail}")).expect("ASCII"),
        ),
        (axum::http::header::AGE, HeaderValue::from(0u64)),
    ]
}
