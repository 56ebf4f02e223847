//! W3C Trace Context (`traceparent`): every request belongs to a trace, continued from the caller's
//! `traceparent` header when it sends a valid one, else started here. Events a request causes carry
//! its `traceparent`, so the workers that handle them log under the same trace id.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

pub const HEADER: &str = "traceparent";

/// This request's place in its trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, shared by everything in the trace.
    pub trace_id: String,
    /// 16 lowercase hex digits naming this request's span.
    pub span_id: String,
    /// The caller's sampling decision (`01` sampled), kept as sent; `01` for traces started here.
    pub flags: String,
}

impl TraceContext {
    /// Continues the caller's trace (with a new span for this request), or starts a new one.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let parent = headers.get(HEADER).and_then(|v| v.to_str().ok()).and_then(parse);
        let (trace_id, flags) = parent.unwrap_or_else(|| (keel_random::hex(16), "01".to_owned()));
        TraceContext { trace_id, span_id: keel_random::hex(8), flags }
    }

    /// The `traceparent` value naming this request's span as the parent of what it causes.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// `(trace id, flags)` of a valid version-00 `traceparent`; None for anything else, which the
/// specification says to ignore (and start a new trace).
fn parse(value: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else { return None };
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = *version == "00"
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    valid.then(|| (trace_id.to_string(), flags.to_string()))
}

/// Set by the request middleware on every request.
impl<S: Send + Sync> FromRequestParts<S> for TraceContext {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<TraceContext>()
            .cloned()
            .unwrap_or_else(|| TraceContext::from_headers(&parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_continued_and_anything_else_starts_a_trace() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let continued = TraceContext::from_headers(&headers);
        assert_eq!(continued.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(continued.span_id, "00f067aa0ba902b7", "this request is a new span");
        assert_eq!(continued.traceparent().len(), 55);

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            headers.insert(HEADER, bad.parse().unwrap());
            let started = TraceContext::from_headers(&headers);
            assert_ne!(started.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_eq!(started.trace_id.len(), 32);
        }
    }
}
