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
//! Limits, so that no query costs a scan of the catalogue for nothing (see `terms`): a word of one
//! character is no prefix worth searching for (`a:*` matches most products), so it is left out beside
//! longer words and a query of only such words is a 422; more than 8 words that count is a 422, not a
//! silent cut; and only words of 4 characters or more are looked for with typos (a shorter word has
//! too few trigrams to mean anything: "tep" is 50% similar to every word that begins with "te").
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

use crate::consistency::DataKind;
use crate::db::replicas::Floor;
use crate::db::Sql;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{Json, Query};
use crate::http::{cursor, Page, PageParams};
use crate::ids::ProductId;
use crate::state::AppState;

/// The longest query accepted, in characters, and the most words of it that count (more: 422).
const MAX_QUERY_CHARS: usize = 200;
const MAX_TERMS: usize = 8;
/// The shortest word that counts, in characters: a one-character prefix matches most of the catalogue.
const MIN_TERM_CHARS: usize = 2;
/// The shortest word the typo fallback looks for: with fewer characters, a word's few trigrams make it
/// similar enough to too many names for the match to mean anything.
const MIN_TYPO_CHARS: usize = 4;

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

/// The words of a query that count, lower-cased: letters and digits only, so nothing in them is
/// tsquery syntax. Words shorter than [`MIN_TERM_CHARS`] are left out when the query has longer ones
/// (`red s` searches for `red`, as it did a keystroke earlier: the prefix `s:*` would cost reading
/// the index entries of every word beginning with an s, most of the catalogue, even beside `red`, to
/// narrow the hits by little); a query of only such words is refused (422), since `a:*` alone would
/// rank most of the catalogue. More than [`MAX_TERMS`] words that count is refused too (422), rather
/// than cut without a word.
fn terms(q: &str) -> Result<Vec<String>, ApiError> {
    let words: Vec<&str> = q.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    if words.is_empty() {
        return Err(ApiError::invalid("q", "give at least one word (letters or digits)"));
    }
    let terms: Vec<String> = words
        .iter()
        .filter(|w| w.chars().count() >= MIN_TERM_CHARS)
        .map(|w| w.chars().take(64).collect::<String>().to_lowercase())
        .collect();
    if terms.is_empty() {
        return Err(ApiError::invalid(
            "q",
            &format!(
                "give a word of at least {MIN_TERM_CHARS} characters (letters or digits): a one-character \
                 word is left out of a search, since it would match most of the catalogue"
            ),
        ));
    }
    if terms.len() > MAX_TERMS {
        return Err(ApiError::invalid(
            "q",
            &format!("give at most {MAX_TERMS} words of {MIN_TERM_CHARS} characters or more, not {}", terms.len()),
        ));
    }
    Ok(terms)
}

/// Every word as a prefix: `red sho` finds "Red shoes".
fn prefix_query(terms: &[String]) -> String {
    terms.iter().map(|t| format!("{t}:*")).collect::<Vec<_>>().join(" & ")
}

/// What the typo fallback looks for: the words of [`MIN_TYPO_CHARS`] characters or more, in order;
/// none when the query has no such word (its shorter words were searched for as prefixes only).
fn typo_phrase(terms: &[String]) -> Option<String> {
    let long: Vec<&str> = terms.iter().filter(|t| t.chars().count() >= MIN_TYPO_CHARS).map(String::as_str).collect();
    (!long.is_empty()).then(|| long.join(" "))
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
        (status = 422, description = "No query, one without a word of 2 characters or more (letters or \
            digits), one with more than 8 such words, one over 200 characters, or a limit out of 1 to 100",
            body = Problem),
    ))]
pub async fn search(
    State(state): State<AppState>,
    Query(params): Query<SearchParams>,
) -> Result<Json<Page<SearchHit>>, ApiError> {
    // A cursor that cannot be read is a 400 whatever else is wrong; values out of range are 422, a
    // limit's before the rules on the query's words (`q=x&limit=0` is about the limit).
    let after = params.cursor.as_deref().map(After::decode).transpose()?;
    let q = params.q.as_deref().map(str::trim).unwrap_or_default();
    if q.chars().count() > MAX_QUERY_CHARS {
        return Err(ApiError::invalid("q", &format!("must be at most {MAX_QUERY_CHARS} characters")));
    }
    let limit = PageParams::page_size(params.limit)?;
    let terms = terms(q)?;
    let query = fingerprint(&terms);
    if after.is_some_and(|a| a.query != query) {
        return Err(ApiError::BadRequest("cursor was returned for another query: give the same q".into()));
    }
    let (score, id) = (after.map(|a| a.score), after.map(|a| a.id));
    let (terms, mut mode) = (&terms, after.map_or(Mode::FullText, |a| a.mode));
    // The index is derived, eventually: a replica within the search budget answers as well as the
    // primary. Both queries of a search (exact, then typos) run on the one connection chosen.
    let budget = state.config.budget(DataKind::Search);
    let read = state
        .db
        .catalog
        .read(DataKind::Search, budget, Floor::Any, |client| async move {
            let mut mode = mode;
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
                        &[&prefix_query(terms), &(limit + 1), &score, &id],
                    )
                    .await?;
                if rows.is_empty() && after.is_none() {
                    // No exact match at all: perhaps a typo.
                    mode = Mode::Typos;
                }
            }
            // A typo cursor is only issued for a query with a phrase; the same terms give the same phrase.
            if let (Mode::Typos, Some(phrase)) = (mode, typo_phrase(terms)) {
                rows = client
                    .rows(
                        "SELECT product_id, name, description, price_cents, in_stock, score FROM (
                             SELECT product_id, name, description, price_cents, in_stock, word_similarity($1, name) AS score
                             FROM product_search WHERE $1 <% name
                         ) AS hits
                         WHERE $3::real IS NULL OR score < $3 OR (score = $3 AND product_id > $4::uuid)
                         ORDER BY score DESC, product_id
                         LIMIT $2",
                        &[&phrase, &(limit + 1), &score, &id],
                    )
                    .await?;
            }
            Ok((mode, rows))
        })
        .await?;
    let rows;
    (mode, rows) = read.value;
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
        let t = terms("  Red SHO!  & | :* 'xy' ").unwrap();
        assert_eq!(t, ["red", "sho", "xy"]);
        assert_eq!(prefix_query(&t), "red:* & sho:* & xy:*");
        assert_eq!(terms("&|!():*").unwrap_err().to_string(), "q: give at least one word (letters or digits)");
    }

    fn refusal(q: &str) -> String {
        let err = terms(q).unwrap_err();
        assert_eq!(err.status(), 422, "{q:?}: {err}");
        err.to_string()
    }

    #[test]
    fn one_character_words_are_left_out_beside_longer_ones_and_refused_alone() {
        assert_eq!(terms("red s").unwrap(), ["red"]);
        assert_eq!(terms("a:* | bo").unwrap(), ["bo"]);
        assert_eq!(terms("vitamin c 3").unwrap(), ["vitamin"]);
        assert_eq!(terms("日本 語").unwrap(), ["日本"], "characters, not bytes");
        assert_eq!(terms("É").unwrap_err().status(), 422, "one character, two bytes");
        for q in ["a", "a:*", "a:* | b", "!x & (y", "a b c d e f g h i j", "1 2 3"] {
            let message = refusal(q);
            assert!(message.starts_with("q: ") && message.contains("at least 2 characters"), "{q:?}: {message}");
        }
        // The same query with or without its one-character words: the same cursors serve both.
        assert_eq!(fingerprint(&terms("red s").unwrap()), fingerprint(&terms("red").unwrap()));
    }

    #[test]
    fn more_words_than_count_are_refused_not_cut() {
        let eight = "one two three four five six seven eight";
        assert_eq!(terms(eight).unwrap().len(), MAX_TERMS);
        assert_eq!(terms(&format!("{eight} a b c d e f g")).unwrap().len(), MAX_TERMS, "short words do not count");
        let message = refusal(&format!("{eight} nine"));
        assert!(
            message.starts_with("q: ") && message.contains("at most 8 words") && message.contains("not 9"),
            "{message}"
        );
        // Within the 200 characters, the most words there can be.
        assert!(refusal(&"ab ".repeat(66)).contains("not 66"));
    }

    #[test]
    fn only_words_of_four_characters_or_more_are_looked_for_with_typos() {
        let phrase = |q: &str| typo_phrase(&terms(q).unwrap());
        assert_eq!(phrase("coppr").as_deref(), Some("coppr"));
        assert_eq!(phrase("Wombat KETTEL").as_deref(), Some("wombat kettel"));
        assert_eq!(phrase("red coppr kettel").as_deref(), Some("coppr kettel"), "short words are prefixes only");
        assert_eq!(phrase("wonb").as_deref(), Some("wonb"));
        assert_eq!(phrase("tep"), None);
        assert_eq!(phrase("nar tep"), None);
        assert_eq!(phrase("日本語"), None, "three characters, nine bytes");
    }

    #[test]
    fn cursors_are_opaque_and_round_trip_exactly() {
        let query = fingerprint(&terms("red shoes").unwrap());
        let after = After { mode: Mode::Typos, query, score: 0.060_792_71, id: ProductId::new() };
        let encoded = after.encode();
        assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{encoded}");
        let decoded = After::decode(&encoded).unwrap();
        assert_eq!(decoded, after);
        assert_eq!(decoded.score.to_bits(), after.score.to_bits());
        assert_eq!(fingerprint(&terms("RED  shoes!").unwrap()), query, "the same terms, the same query");
        assert_ne!(fingerprint(&terms("red shoe").unwrap()), query);
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
