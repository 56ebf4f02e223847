//! Product search: PostgreSQL full-text search over a search document per product, kept by a worker
//! from product events (so search is eventually consistent, by design: see the consistency table).
//!
//! A query matches a product when every word of it is a prefix of a word of the product's name or
//! description (stemmed, English), ranked by weight (name over description). Only when nothing
//! matches so does the query fall back to typo tolerance: names with a word similar enough to it
//! (trigrams), most similar first. Not both at once: a common word ("product") is similar to
//! every name, and ranking the whole catalogue by similarity cost 39 ms a query over 10,000
//! products, against 3 ms for the full-text query alone (EXPLAIN ANALYZE on this machine).
//!
//! Results page by keyset on the ranking order, (score descending, product id ascending), not by
//! offset: a page starts after the last hit of the previous one, so products indexed meanwhile do
//! not shift the pages, and a deep page costs no more than the first. The score is `ts_rank` (or, for
//! typos, `word_similarity`), a `real`: the cursor carries its exact bits, and the same function of
//! the same document and query gives the same bits again, so comparing with `=` is sound.

use std::time::SystemTime;

use axum::extract::State;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use sha2::{Digest, Sha256};

use crate::db::Sql;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{Json, Query};
use crate::http::{cursor, Page, PageParams};
use crate::ids::ProductId;
use crate::state::AppState;

/// The longest query accepted, in characters, and the most words of it that count.
const MAX_QUERY_CHARS: usize = 200;
const MAX_TERMS: usize = 8;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// What to look for: words, prefixes of words, or a word with a typo.
    pub q: Option<String>,
    /// 1 to 100; default 20. Out of that range: 422; not a whole number: 400.
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page, for the same `q`, passed back as it was given: it is
    /// opaque and does not expire. The next page starts after the last hit of the previous one in the
    /// ranking (best match first, ties by id), not at an offset: products added or removed meanwhile
    /// shift nothing, and a product whose name and description stay the same while paging is returned
    /// at most once over all the pages. A product edited while paging may move in the ranking, so it
    /// may be missed or returned twice. A cursor this API did not issue for this `q`: 400.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchHit {
    #[schema(value_type = String)]
    pub id: ProductId,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub in_stock: bool,
}

impl SearchHit {
    fn from_row(row: &Row) -> SearchHit {
        SearchHit {
            id: row.get("product_id"),
            name: row.get("name"),
            description: row.get("description"),
            price_cents: row.get("price_cents"),
            in_stock: row.get("in_stock"),
        }
    }
}

/// The words of a query, lower-cased: letters and digits only, so nothing in them is tsquery syntax.
fn terms(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(MAX_TERMS)
        .map(|w| w.chars().take(64).collect::<String>().to_lowercase())
        .collect()
}

/// Every word as a prefix: `red sho` finds "Red shoes".
fn prefix_query(terms: &[String]) -> String {
    terms.iter().map(|t| format!("{t}:*")).collect::<Vec<_>>().join(" & ")
}

/// How results are ranked: by full-text rank, or (when nothing matches exactly) by similarity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    FullText = 1,
    Typos = 2,
}

/// Where a page of results starts: after the hit with this score and id, in this mode, for the query
/// with this fingerprint.
#[derive(Debug, Clone, Copy, PartialEq)]
struct After {
    mode: Mode,
    query: [u8; 8],
    score: f32,
    id: ProductId,
}

/// Identifies a query's terms, so that a cursor is not used with another query.
fn fingerprint(terms: &[String]) -> [u8; 8] {
    let digest = Sha256::digest(terms.join(" ").as_bytes());
    let mut fingerprint = [0; 8];
    fingerprint.copy_from_slice(&digest[..8]);
    fingerprint
}

impl After {
    /// The mode, the query's fingerprint, the score's bits and the id: 29 bytes.
    fn encode(&self) -> String {
        let mut payload = Vec::with_capacity(29);
        payload.push(self.mode as u8);
        payload.extend_from_slice(&self.query);
        payload.extend_from_slice(&self.score.to_bits().to_be_bytes());
        payload.extend_from_slice(self.id.as_uuid().as_bytes());
        cursor::encode(cursor::SEARCH, &payload)
    }

    fn decode(raw: &str) -> Result<After, ApiError> {
        let payload =
            cursor::decode(cursor::SEARCH, raw).filter(|p| p.len() == 29).ok_or_else(|| cursor::not_ours(raw))?;
        let mode = match payload[0] {
            1 => Mode::FullText,
            2 => Mode::Typos,
            _ => return Err(cursor::not_ours(raw)),
        };
        let score = f32::from_bits(u32::from_be_bytes(payload[9..13].try_into().expect("4 bytes")));
        if !score.is_finite() {
            return Err(cursor::not_ours(raw));
        }
        Ok(After {
            mode,
            query: payload[1..9].try_into().expect("8 bytes"),
            score,
            id: Uuid::from_slice(&payload[13..]).map(ProductId::from_uuid).map_err(|_| cursor::not_ours(raw))?,
        })
    }
}

#[utoipa::path(get, path = "/v1/search", tag = "search",
    params(SearchParams),
    responses(
        (status = 200, description = "Products, best match first; the index lags the catalogue by up to its budget",
            body = Page<SearchHit>),
        (status = 400, description = "A parameter that cannot be read (`limit=ten`), or a cursor this API did not \
            issue for this query", body = Problem),
        (status = 422, description = "No query, one without a letter or digit, one over 200 characters, or a \
            limit out of 1 to 100", body = Problem),
    ))]
pub async fn search(
    State(state): State<AppState>,
    Query(params): Query<SearchParams>,
) -> Result<Json<Page<SearchHit>>, ApiError> {
    // A cursor that cannot be read is a 400 whatever else is wrong; values out of range are 422.
    let after = params.cursor.as_deref().map(After::decode).transpose()?;
    let q = params.q.as_deref().map(str::trim).unwrap_or_default();
    if q.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::invalid("q", &format!("must be at most {MAX_QUERY_CHARS} characters")));
    }
    let terms = terms(q);
    if terms.is_empty() {
        return Err(ApiError::invalid("q", "give at least one word (letters or digits)"));
    }
    let limit = PageParams::page_size(params.limit)?;
    let query = fingerprint(&terms);
    if after.is_some_and(|a| a.query != query) {
        return Err(ApiError::BadRequest("cursor was returned for another query: give the same q".into()));
    }
    let client = state.db.catalog.client().await?;
    let (score, id) = (after.map(|a| a.score), after.map(|a| a.id));
    let mut mode = after.map_or(Mode::FullText, |a| a.mode);
    let mut rows = Vec::new();
    if mode == Mode::FullText {
        rows = client
            .rows(
                "SELECT product_id, name, description, price_cents, in_stock, score FROM (
                     SELECT product_id, name, description, price_cents, in_stock, ts_rank(document, query) AS score
                     FROM product_search, to_tsquery('english', $1) AS query
                     WHERE document @@ query
                 ) AS hits
                 WHERE $3::real IS NULL OR score < $3 OR (score = $3 AND product_id > $4::uuid)
                 ORDER BY score DESC, product_id
                 LIMIT $2",
                &[&prefix_query(&terms), &(limit + 1), &score, &id],
            )
            .await?;
        if rows.is_empty() && after.is_none() {
            // No exact match at all: perhaps a typo.
            mode = Mode::Typos;
        }
    }
    if mode == Mode::Typos {
        rows = client
            .rows(
                "SELECT product_id, name, description, price_cents, in_stock, score FROM (
                     SELECT product_id, name, description, price_cents, in_stock, word_similarity($1, name) AS score
                     FROM product_search WHERE $1 <% name
                 ) AS hits
                 WHERE $3::real IS NULL OR score < $3 OR (score = $3 AND product_id > $4::uuid)
                 ORDER BY score DESC, product_id
                 LIMIT $2",
                &[&terms.join(" "), &(limit + 1), &score, &id],
            )
            .await?;
    }
    let items = rows.iter().take(limit as usize).map(SearchHit::from_row).collect();
    let next_cursor = match rows.get(limit as usize - 1) {
        Some(last) if rows.len() as i64 > limit => {
            Some(After { mode, query, score: last.get("score"), id: last.get("product_id") }.encode())
        }
        _ => None,
    };
    Ok(Json(Page { items, next_cursor }))
}

/// Brings a product's search document up to date with the product and its stock, as committed now.
/// Idempotent, and safe in any order: a document is only replaced by one at least as new, by the
/// rows' versions (counters bumped by every write; the sum of two growing counters grows).
pub(crate) async fn index_product(db: &impl Sql, product: ProductId) -> Result<(), tokio_postgres::Error> {
    db.exec(
        "INSERT INTO product_search (product_id, name, description, price_cents, in_stock, document, version)
         SELECT p.id, p.name, p.description, p.price_cents, i.stock > 0,
                setweight(to_tsvector('english', p.name), 'A') || setweight(to_tsvector('english', p.description), 'B'),
                p.version + i.version
         FROM products p JOIN inventory i ON i.product_id = p.id
         WHERE p.id = $1
         ON CONFLICT (product_id) DO UPDATE
         SET name = EXCLUDED.name, description = EXCLUDED.description, price_cents = EXCLUDED.price_cents,
             in_stock = EXCLUDED.in_stock, document = EXCLUDED.document, version = EXCLUDED.version,
             indexed_at = now()
         WHERE product_search.version <= EXCLUDED.version",
        &[&product],
    )
    .await?;
    Ok(())
}

/// Records how long after its event a change became searchable.
pub fn record_index_lag(event_created_at: SystemTime) {
    let lag = SystemTime::now().duration_since(event_created_at).unwrap_or_default();
    metrics::histogram!("keel_search_index_lag_seconds").record(lag.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_become_prefix_terms_without_syntax() {
        let t = terms("  Red SHO!  & | :* 'x' ");
        assert_eq!(t, ["red", "sho", "x"]);
        assert_eq!(prefix_query(&t), "red:* & sho:* & x:*");
        assert!(terms("&|!():*").is_empty());
        assert_eq!(terms("a b c d e f g h i j").len(), MAX_TERMS);
    }

    #[test]
    fn cursors_are_opaque_and_round_trip_exactly() {
        let query = fingerprint(&terms("red shoes"));
        let after = After { mode: Mode::Typos, query, score: 0.060_792_71, id: ProductId::new() };
        let encoded = after.encode();
        assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{encoded}");
        let decoded = After::decode(&encoded).unwrap();
        assert_eq!(decoded, after);
        assert_eq!(decoded.score.to_bits(), after.score.to_bits());
        assert_eq!(fingerprint(&terms("RED  shoes!")), query, "the same terms, the same query");
        assert_ne!(fingerprint(&terms("red shoe")), query);
        let list = crate::http::cursor::encode(crate::http::cursor::LIST, b"x");
        let nan = {
            let mut nan = after;
            nan.score = f32::NAN;
            nan.encode()
        };
        for bad in ["20", "abc", "", &list, &encoded[..encoded.len() - 2], &nan] {
            assert_eq!(After::decode(bad).unwrap_err().status(), 400, "{bad:?}");
        }
    }
}
