//! What a response of a cacheable kind says about where it came from: `Cache-Status` (RFC 9211) and
//! `Age` (RFC 9111).

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use keel_cache::Served;

use crate::db::replicas::Target;

/// The headers of a response served through a cache. `filled` is where a miss of this caller's was
/// read from, and how far behind that source was (`Age` then counts it: a value from a replica is
/// as old as the replica's lag the moment it is read).
pub fn cache_headers(served: Served, filled: Option<(Target, Duration)>) -> [(HeaderName, HeaderValue); 2] {
    let (status, age) = match (served, filled) {
        (Served::Miss, Some((target, lag))) => {
            (format!("keel; fwd=miss; stored; detail={}", target.as_str()), lag.as_secs())
        }
        (served, _) => plain(served),
    };
    [
        (HeaderName::from_static("cache-status"), HeaderValue::from_str(&status).expect("ASCII")),
        (axum::http::header::AGE, HeaderValue::from(age)),
    ]
}

fn plain(served: Served) -> (String, u64) {
    match served {
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
    }
}

/// What a read that went around the cache says about it (the owner reading their own profile, a
/// product list), and how old its source was (a replica's lag; zero from the primary).
pub fn bypass_headers(detail: &'static str, age: Duration) -> [(HeaderName, HeaderValue); 2] {
    [
        (
            HeaderName::from_static("cache-status"),
            HeaderValue::from_str(&format!("keel; fwd=bypass; detail={detail}")).expect("ASCII"),
        ),
        (axum::http::header::AGE, HeaderValue::from(age.as_secs())),
    ]
}
