//! The HTTP toolkit every route shares, with no knowledge of the shop: the error type and its
//! problem documents, extractors, authentication, trace context, the telemetry middleware,
//! idempotency keys, cache headers, pagination and validation helpers. The routes themselves are
//! listed in [`crate::app::routes`].

pub mod auth;
pub mod cache_headers;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod middleware;
pub mod rate_limit;
pub mod retry;
pub mod trace;

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::{IntoParams, ToSchema};

use error::ApiError;

/// An RFC 3339 timestamp with microseconds, in UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Checks a text field: trimmed, then `min..=max` characters, no control characters but newlines.
pub fn text(field: &str, value: &str, min: usize, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    let len = value.chars().count();
    if len < min || len > max {
        let want = if min == 0 { format!("at most {max} characters") } else { format!("{min} to {max} characters") };
        return Err(ApiError::invalid(field, &format!("must be {want}, got {len}")));
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::invalid(field, "must not contain control characters"));
    }
    Ok(value.to_owned())
}

/// Checks a whole number is within `min..=max`.
pub fn number(field: &str, value: i64, min: i64, max: i64) -> Result<i64, ApiError> {
    if value < min || value > max {
        return Err(ApiError::invalid(field, &format!("must be from {min} to {max}, got {value}")));
    }
    Ok(value)
}

/// One page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last page. Opaque: pass it back as it is.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only says there is a next page.
    /// `key_of` gives an item's key (its id), which the next page continues after: the page encodes it
    /// into an opaque cursor, read back by [`PageParams::validate`].
    pub fn from_rows(
        rows: Vec<Row>,
        limit: i64,
        to_item: impl FnMut(&Row) -> T,
        key_of: impl Fn(&T) -> String,
    ) -> Page<T> {
        let more = rows.len() as i64 > limit;
        let items: Vec<T> = rows.iter().take(limit as usize).map(to_item).collect();
        let next_cursor =
            if more { items.last().map(|item| cursor::encode(cursor::LIST, key_of(item).as_bytes())) } else { None };
        Page { items, next_cursor }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// 1 to 100; default 20. Out of that range: 422; not a whole number: 400.
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page of the same list, as it was given: it is opaque, and
    /// does not expire. The next page continues after the last item of the previous one, so items
    /// added or removed meanwhile shift nothing. A cursor this API did not issue: 400.
    pub cursor: Option<String>,
}

impl PageParams {
    pub const DEFAULT_LIMIT: i64 = 20;
    pub const MAX_LIMIT: i64 = 100;

    /// The page size and the id to continue after (or before, for lists newest first): 400 for a
    /// cursor that cannot be read, 422 for a limit out of range.
    pub fn validate(&self) -> Result<(i64, Option<uuid::Uuid>), ApiError> {
        let after = self.cursor.as_deref().map(list_cursor).transpose()?;
        Ok((Self::page_size(self.limit)?, after))
    }

    /// A page size from `limit`: the default when absent, 422 when out of range.
    pub fn page_size(limit: Option<i64>) -> Result<i64, ApiError> {
        let limit = limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid("limit", &format!("must be from 1 to {}, got {limit}", Self::MAX_LIMIT)));
        }
        Ok(limit)
    }
}

/// The id a list cursor continues after.
fn list_cursor(raw: &str) -> Result<uuid::Uuid, ApiError> {
    let key = cursor::decode(cursor::LIST, raw).and_then(|key| String::from_utf8(key).ok());
    match key.as_deref().map(uuid::Uuid::try_parse) {
        Some(Ok(id)) => Ok(id),
        // Cursors used to be the bare id: ones issued before they became opaque still work.
        _ => uuid::Uuid::try_parse(raw).map_err(|_| cursor::not_ours(raw)),
    }
}

/// Opaque cursors: a tag byte naming the kind of cursor, then what it continues after, all in
/// URL-safe base64 without padding (so a cursor goes into a query string as it is). Clients are
/// told to pass them back unchanged; the tag lets a cursor of one kind be refused by another.
pub mod cursor {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    use super::error::ApiError;

    /// A list in id order: the key of the last item (its id, as text).
    pub const LIST: u8 = 1;
    /// A page of search results: see `search`.
    pub const SEARCH: u8 = 2;
    /// A page of a feed: the last item's time and id ([`keyed`]).
    pub const FEED: u8 = 3;
    /// A page of followers or followed users: the last edge's time and user id ([`keyed`]).
    pub const FOLLOWS: u8 = 4;

    pub fn encode(kind: u8, payload: &[u8]) -> String {
        let mut bytes = Vec::with_capacity(payload.len() + 1);
        bytes.push(kind);
        bytes.extend_from_slice(payload);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The payload of a cursor of `kind`, if `raw` is one.
    pub fn decode(kind: u8, raw: &str) -> Option<Vec<u8>> {
        let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
        match bytes.split_first() {
            Some((tag, payload)) if *tag == kind => Some(payload.to_vec()),
            _ => None,
        }
    }

    /// A cursor of a list in (time, id) order: `micros` since the epoch, big-endian, then the id.
    pub fn keyed(kind: u8, micros: i64, id: uuid::Uuid) -> String {
        let mut payload = micros.to_be_bytes().to_vec();
        payload.extend_from_slice(id.as_bytes());
        encode(kind, &payload)
    }

    /// The (time, id) a [`keyed`] cursor of `kind` continues from: 400 if `raw` is not one.
    pub fn read_keyed(kind: u8, raw: &str) -> Result<(i64, uuid::Uuid), ApiError> {
        let payload = decode(kind, raw).filter(|p| p.len() == 24).ok_or_else(|| not_ours(raw))?;
        let (micros, id) = payload.split_at(8);
        let micros = i64::from_be_bytes(micros.try_into().expect("8 bytes"));
        let id = uuid::Uuid::from_slice(id).expect("16 bytes");
        Ok((micros, id))
    }

    /// 400: a cursor that cannot be read is a request that cannot be parsed.
    pub fn not_ours(raw: &str) -> ApiError {
        let shown: String = raw.chars().take(100).collect();
        ApiError::BadRequest(format!("cursor {shown:?} is not one this API returned"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursors_are_opaque_and_round_trip() {
        let id = uuid::Uuid::now_v7();
        let encoded = cursor::encode(cursor::LIST, id.to_string().as_bytes());
        assert!(!encoded.contains(&id.simple().to_string()[..8]), "{encoded}");
        assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{encoded}");
        let params = |cursor: &str| PageParams { limit: None, cursor: Some(cursor.to_owned()) };
        assert_eq!(params(&encoded).validate().unwrap(), (PageParams::DEFAULT_LIMIT, Some(id)));
        // A bare id, as cursors were before, still works.
        assert_eq!(params(&id.to_string()).validate().unwrap().1, Some(id));
        let search = cursor::encode(cursor::SEARCH, id.to_string().as_bytes());
        for bad in ["nonsense", "", "%00", "AQ", &search] {
            assert_eq!(params(bad).validate().unwrap_err().status(), 400, "{bad:?}");
        }
    }

    #[test]
    fn limits_out_of_range_are_unprocessable() {
        for limit in [0, -1, 101, 1000] {
            let error = PageParams { limit: Some(limit), cursor: None }.validate().unwrap_err();
            assert_eq!(error.status(), 422, "{limit}");
            assert!(error.to_string().starts_with("limit: "), "{error}");
        }
        assert_eq!(PageParams::page_size(Some(100)).unwrap(), 100);
        assert_eq!(PageParams::page_size(None).unwrap(), 20);
    }
}
