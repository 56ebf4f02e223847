//! Request extractors that reject with [`ApiError`] (so with `application/problem+json`) rather than
//! axum's plain-text rejections, and that say what was wrong in the API's own terms: the field (a
//! path into the JSON such as `items[2].quantity`, or a query parameter), the JSON type or the range
//! expected, and what was sent instead. Never a Rust type: serde's messages are rewritten.
//!
//! Statuses: a body that is not JSON at all, or a query string or path segment that cannot be read
//! as the type wanted (`limit=ten`), is 400; JSON that parses but does not fit the request (a
//! missing field, a string for a number, a number out of range) is 422.

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserializer, Serialize};

use super::error::ApiError;

/// Maps one of axum's body rejections to our error type by its status, keeping its text as the detail.
fn from_rejection(status: StatusCode, detail: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge("the request body is larger than 1 MiB".into()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => unsupported_media_type(),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(detail),
        s if s.is_client_error() => ApiError::BadRequest(detail),
        _ => ApiError::Internal(detail),
    }
}

fn unsupported_media_type() -> ApiError {
    ApiError::UnsupportedMediaType("the request body must be JSON, sent with Content-Type: application/json".into())
}

/// A JSON request body (`Content-Type: application/json`, at most 1 MiB), or a JSON response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(unsupported_media_type());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| from_rejection(r.status(), r.body_text()))?;
        parse_json(&bytes).map(Json)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `application/json`, or any `application/*+json`, with any parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else { return false };
    let token =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    kind == "application" && token(subtype) && (subtype == "json" || subtype.ends_with("+json"))
}

/// Parses a request body as `T`, which must be a JSON object (all request bodies are), describing any
/// failure in the API's terms.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = T::deserialize(ObjectsOnly(&mut deserializer)).and_then(|value| deserializer.end().map(|()| value));
    parsed.map_err(|e| json_problem(&e, || json_path::<T>(bytes, &e)))
}

/// Where in the body an error is (`items[2].quantity`; empty for the body itself). axum's `Json`
/// tracks the path as it deserializes, so on the (rare) error path the body is parsed once more by
/// it, and the path is what its message has in front of serde's.
fn json_path<T: DeserializeOwned>(bytes: &[u8], error: &serde_json::Error) -> String {
    let Err(rejection) = axum::Json::<T>::from_bytes(bytes) else { return String::new() };
    let Some(tracked) = std::error::Error::source(&rejection).map(ToString::to_string) else { return String::new() };
    let path = tracked.strip_suffix(&error.to_string()).and_then(|p| p.strip_suffix(": ")).unwrap_or_default();
    if path.is_empty() || path == "?" {
        String::new()
    } else {
        path.to_owned()
    }
}

/// A serde_json error as a problem: 400 if the body is not JSON, 422 if it is but does not fit.
fn json_problem(error: &serde_json::Error, path: impl FnOnce() -> String) -> ApiError {
    use serde_json::error::Category;
    let text = error.to_string();
    let at = format!(" at line {} column {}", error.line(), error.column());
    let message = text.strip_suffix(&at).unwrap_or(&text);
    let position =
        if error.line() > 0 { format!(" (line {}, column {})", error.line(), error.column()) } else { "".into() };
    match error.classify() {
        // JSON's grammar allows any exponent: a number it does not fit in 64 bits is well-formed.
        Category::Syntax if message == "number out of range" => {
            ApiError::Unprocessable(sentence(&path(), "body", "is a number too large to be represented"))
        }
        Category::Syntax | Category::Eof | Category::Io => {
            let what = match message {
                "trailing characters" => "there is more after the JSON value",
                "recursion limit exceeded" => "it is nested too deeply",
                "key must be a string" => "an object key must be a string",
                other => other,
            };
            ApiError::BadRequest(format!("the request body is not valid JSON: {what}{position}"))
        }
        Category::Data => {
            let (field, predicate) = rewrite(&path(), message);
            ApiError::Unprocessable(sentence(&field, "body", &predicate))
        }
    }
}

/// `field: predicate`, or `the request {whole} predicate` when the problem is with all of it.
fn sentence(field: &str, whole: &str, predicate: &str) -> String {
    if field.is_empty() {
        format!("the request {whole} {predicate}")
    } else {
        format!("{field}: {predicate}")
    }
}

/// Rewrites a message of serde's (without its position) about the value at `path` into the field it
/// concerns and what is wrong with it, in JSON terms.
fn rewrite(path: &str, message: &str) -> (String, String) {
    // The path is of the object holding the field.
    let field = |name: &str| -> String {
        let name = unquote(name);
        if path.is_empty() {
            name
        } else {
            format!("{path}.{name}")
        }
    };
    let mismatch = |rest: &str| rest.rsplit_once(", expected ").map(|(got, want)| (got.to_owned(), want.to_owned()));
    if let Some((got, want)) = message.strip_prefix("invalid type: ").and_then(mismatch) {
        return (path.to_owned(), format!("must be {}, got {}", expected(&want), unexpected(&got)));
    }
    if let Some((got, want)) = message.strip_prefix("invalid value: ").and_then(mismatch) {
        return (path.to_owned(), format!("must be {}, got {}", expected(&want), unexpected(&got)));
    }
    if let Some((length, want)) = message.strip_prefix("invalid length ").and_then(mismatch) {
        let want = expected(&want);
        let got = if want == "a JSON object" { "an array".to_owned() } else { format!("{length} elements") };
        return (path.to_owned(), format!("must be {want}, got {got}"));
    }
    if let Some(name) = message.strip_prefix("missing field ") {
        return (field(name), "is required".to_owned());
    }
    if let Some(name) = message.strip_prefix("duplicate field ") {
        return (field(name), "is given more than once".to_owned());
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (name, known) = rest.split_once(", ").unwrap_or((rest, ""));
        let known = match known.strip_prefix("expected ") {
            Some(list) => format!("; the fields are {}", names(list)),
            None => String::new(),
        };
        // The path already ends with an unknown field's name.
        let unknown = if path.is_empty() { unquote(name) } else { path.to_owned() };
        return (unknown, format!("is not a field of this request{known}"));
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let (name, known) = rest.split_once(", ").unwrap_or((rest, ""));
        let known = match known.strip_prefix("expected ") {
            Some(list) => format!("one of {}", names(list)),
            None => "another value".to_owned(),
        };
        return (path.to_owned(), format!("must be {known}, got {:?}", unquote(name)));
    }
    (path.to_owned(), plain(message).unwrap_or_else(|| "has a value of the wrong type".to_owned()))
}

/// serde's `` `a` ``, `` `a` or `b` `` and `` one of `a`, `b`, `c` `` as `a, b, c`.
fn names(list: &str) -> String {
    let list = list.strip_prefix("one of ").unwrap_or(list);
    list.split(", ").flat_map(|n| n.split(" or ")).map(unquote).collect::<Vec<_>>().join(", ")
}

fn unquote(name: &str) -> String {
    name.trim().trim_matches('`').to_owned()
}

/// What serde's visitors expect (`i64`, `a string`, `struct CreateUser`), as JSON.
fn expected(want: &str) -> String {
    fn whole(min: impl std::fmt::Display, max: impl std::fmt::Display) -> String {
        format!("a whole number from {min} to {max}")
    }
    let want = want.trim();
    match want {
        "i8" => whole(i8::MIN, i8::MAX),
        "i16" => whole(i16::MIN, i16::MAX),
        "i32" => whole(i32::MIN, i32::MAX),
        "i64" | "isize" => whole(i64::MIN, i64::MAX),
        "i128" => whole(i128::MIN, i128::MAX),
        "u8" => whole(0, u8::MAX),
        "u16" => whole(0, u16::MAX),
        "u32" => whole(0, u32::MAX),
        "u64" | "usize" => whole(0, u64::MAX),
        "u128" => whole(0, u128::MAX),
        "f32" | "f64" => "a number".to_owned(),
        "a string" | "a borrowed string" | "string" | "a string or bytes" => "a string".to_owned(),
        "a character" | "char" => "a string of one character".to_owned(),
        "a boolean" | "bool" => "true or false".to_owned(),
        "option" => "a value or null".to_owned(),
        "unit" | "null" => "null".to_owned(),
        "a sequence" | "an array" | "a set" => "a JSON array".to_owned(),
        "a map" | "map" => "a JSON object".to_owned(),
        w if w.starts_with("struct ") || w.starts_with("a struct") => "a JSON object".to_owned(),
        w if w.starts_with("a tuple of size ") || w.starts_with("an array of length ") => {
            let n = w.rsplit(' ').next().unwrap_or_default();
            format!("a JSON array of {n} elements")
        }
        w if w.starts_with("tuple") => "a JSON array".to_owned(),
        w if w.starts_with("enum ") || w.starts_with("variant ") => "one of the values this field accepts".to_owned(),
        w if w.starts_with("unit struct ") => "null".to_owned(),
        w => plain(w).unwrap_or_else(|| "a value of another type".to_owned()),
    }
}

/// What serde says it got (`integer `5``, `floating point `1e23``, `string "x"`), as JSON.
fn unexpected(got: &str) -> String {
    let quoted = |prefix: &str| got.strip_prefix(prefix).map(|v| v.trim_matches('`').to_owned());
    if let Some(n) = quoted("integer ").or_else(|| quoted("floating point ")) {
        return format!("the number {n}");
    }
    if let Some(b) = quoted("boolean ") {
        return b;
    }
    if let Some(s) = got.strip_prefix("string ") {
        // The string as serde quoted it, cut short if long.
        let mut short: String = s.chars().take(40).collect();
        if short.len() < s.len() {
            short.push_str("…\"");
        }
        return format!("the string {short}");
    }
    if let Some(c) = quoted("character ") {
        return format!("the string {c:?}");
    }
    match got {
        "null" | "unit value" => "null".to_owned(),
        "sequence" => "an array".to_owned(),
        "map" => "an object".to_owned(),
        other => plain(other).unwrap_or_else(|| "a value of another type".to_owned()),
    }
}

/// Words that would tell a client about the implementation, not about the API.
const RUST_WORDS: &[&str] = &[
    "struct",
    "enum",
    "variant",
    "tuple",
    "sequence",
    "floating point",
    "option",
    "unit",
    "newtype",
    "vec",
    "string",
    "str",
    "char",
    "bool",
    "i8",
    "i16",
    "i32",
    "i64",
    "i128",
    "isize",
    "u8",
    "u16",
    "u32",
    "u64",
    "u128",
    "usize",
    "f32",
    "f64",
    "hashmap",
    "btreemap",
    "box",
    "identifier",
    "byte",
];

/// `text` if it names no Rust type or serde notion (so it can be shown as it is), else `None`.
fn plain(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !(c.is_ascii_alphanumeric() || c == ' ')).collect();
    let leaks = RUST_WORDS.iter().any(|rust| {
        if rust.contains(' ') {
            lower.contains(rust)
        } else {
            words.iter().flat_map(|w| w.split(' ')).any(|w| w == *rust)
        }
    });
    (!leaks && !text.contains("::")).then(|| text.to_owned())
}

/// Query-string parameters. A parameter that cannot be read as the type wanted (`limit=ten`, a
/// number beyond 64 bits, a parameter given twice) is 400; handlers check ranges (422).
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::BadRequest(query_problem(&rejection.body_text()))),
        }
    }
}

/// Rewrites axum's `Failed to deserialize query string: limit: invalid digit found in string`.
fn query_problem(text: &str) -> String {
    let text = text.split_once(": ").map_or(text, |(_, rest)| rest);
    // serde's messages start with words and a space; a parameter's path has neither.
    let (param, message) = match text.split_once(": ") {
        Some((param, message))
            if !param.is_empty()
                && param.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']')) =>
        {
            (param, message)
        }
        _ => ("", text),
    };
    let predicate = match message {
        "invalid digit found in string" => "must be a whole number".to_owned(),
        "cannot parse integer from empty string" => "must be a whole number, got nothing".to_owned(),
        "number too large to fit in target type" | "number too small to fit in target type" => {
            "must be a whole number within 64 bits".to_owned()
        }
        "invalid float literal" => "must be a number".to_owned(),
        "provided string was not `true` or `false`" => "must be true or false".to_owned(),
        other => {
            let (field, predicate) = rewrite(param, other);
            return sentence(&field, "query string", &predicate);
        }
    };
    sentence(param, "query string", &predicate)
}

/// Path parameters.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(path_problem(rejection)),
        }
    }
}

fn path_problem(rejection: PathRejection) -> ApiError {
    let status = rejection.status();
    let detail = match &rejection {
        PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
            ErrorKind::ParseErrorAtKey { key, value, expected_type } => {
                format!("{key}: {value:?} is not {}", path_expected(expected_type))
            }
            ErrorKind::ParseErrorAtIndex { index, value, expected_type } => {
                format!("path segment {}: {value:?} is not {}", index + 1, path_expected(expected_type))
            }
            ErrorKind::ParseError { value, expected_type } => {
                format!("{value:?} is not {}", path_expected(expected_type))
            }
            ErrorKind::InvalidUtf8InPathParam { key } => format!("{key}: is not valid UTF-8 once percent-decoded"),
            ErrorKind::DeserializeError { key, value, message } => {
                let (_, predicate) = rewrite(key, message);
                format!("{key}: {value:?} {predicate}")
            }
            _ => "a part of the path could not be read".to_owned(),
        },
        _ => "a part of the path could not be read".to_owned(),
    };
    if status.is_server_error() {
        // A route declared with the wrong parameters: a bug, logged with axum's words.
        return ApiError::Internal(rejection.body_text());
    }
    ApiError::BadRequest(detail)
}

/// The type a path segment was to be parsed as (a Rust type name), as words.
fn path_expected(rust_type: &str) -> String {
    let short = rust_type.rsplit("::").next().unwrap_or(rust_type);
    match short {
        "Uuid" => "an id".to_owned(),
        other => match expected(other) {
            w if w == "a value of another type" => "valid here".to_owned(),
            w => w,
        },
    }
}

/// Parses a resource id from a path, as the type of id it is (`parse_id::<ProductId>("product", raw)`).
/// An id that does not parse (not a UUID) names nothing: 404, not 400.
pub fn parse_id<Id: std::str::FromStr>(what: &str, raw: &str) -> Result<Id, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found(what, raw))
}

/// serde_json's deserializer, except that a struct must be a JSON object: serde would also take an
/// array of its fields in order (`["Ada", "ada@example.org"]`), which no client means to send. Only
/// the top level is wrapped: the request bodies are objects, their fields are not structs.
struct ObjectsOnly<'a, R>(&'a mut serde_json::Deserializer<R>);

macro_rules! forward {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                self.0.$method(visitor)
            }
        )*
    };
}

impl<'de, R: serde_json::de::Read<'de>> Deserializer<'de> for ObjectsOnly<'_, R> {
    type Error = serde_json::Error;

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_newtype_struct(name, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple_struct(name, len, visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::Deserialize;

    use super::*;

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        name: String,
        count: i64,
        small: Option<u32>,
        ratio: Option<f64>,
        flag: Option<bool>,
        items: Option<Vec<Item>>,
        tags: Option<Vec<String>>,
        extra: Option<HashMap<String, i64>>,
    }

    #[allow(dead_code)]
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        quantity: i64,
        kind: Option<Kind>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        Plain,
        Gift,
    }

    /// The status and detail of parsing `body` as a [`Body`].
    fn problem(body: &str) -> (u16, String) {
        let error = parse_json::<Body>(body.as_bytes()).expect_err(body);
        (error.status().as_u16(), error.to_string())
    }

    fn assert_no_rust(detail: &str) {
        for word in [
            "struct ",
            "u32",
            "i64",
            "u64",
            "usize",
            "floating point",
            "enum ",
            "Vec",
            "Option",
            "String",
            "sequence",
            "invalid type",
            "Item",
            "Body",
            "Kind",
        ] {
            assert!(!detail.contains(word), "{detail:?} mentions {word:?}");
        }
    }

    #[test]
    fn json_problems_name_the_field_and_the_json_type() {
        let cases = [
            (r#"[1, 2]"#, 422, "the request body must be a JSON object, got an array"),
            (r#"[]"#, 422, "the request body must be a JSON object, got an array"),
            (r#"["n", 1]"#, 422, "the request body must be a JSON object, got an array"),
            (r#""text""#, 422, r#"the request body must be a JSON object, got the string "text""#),
            (r#"null"#, 422, "the request body must be a JSON object, got null"),
            (r#"{"name": 5, "count": 1}"#, 422, "name: must be a string, got the number 5"),
            (r#"{"name": "n", "count": "12"}"#, 422, r#"count: must be a whole number from -9223372036854775808 to 9223372036854775807, got the string "12""#),
            (r#"{"name": "n", "count": 100000000000000000000000}"#, 422, "count: must be a whole number from -9223372036854775808 to 9223372036854775807, got the number 1e+23"),
            (r#"{"name": "n", "count": 9223372036854775808}"#, 422, "count: must be a whole number from -9223372036854775808 to 9223372036854775807, got the number 9223372036854775808"),
            (r#"{"name": "n", "count": 1.5}"#, 422, "count: must be a whole number"),
            (r#"{"name": "n", "count": 1e400}"#, 422, "count: is a number too large"),
            (r#"{"name": "n", "count": 1, "small": -1}"#, 422, "small: must be a whole number from 0 to 4294967295, got the number -1"),
            (r#"{"name": "n", "count": 1, "ratio": "x"}"#, 422, "ratio: must be a number"),
            (r#"{"name": "n", "count": 1, "flag": 1}"#, 422, "flag: must be true or false, got the number 1"),
            (r#"{"name": "n", "count": true}"#, 422, "count: must be a whole number from -9223372036854775808 to 9223372036854775807, got true"),
            (r#"{"name": {}, "count": 1}"#, 422, "name: must be a string, got an object"),
            (r#"{"name": [], "count": 1}"#, 422, "name: must be a string, got an array"),
            (r#"{"name": null, "count": 1}"#, 422, "name: must be a string, got null"),
            (r#"{"name": "n"}"#, 422, "count: is required"),
            (r#"{"name": "n", "count": 1, "nmae": 1}"#, 422, "nmae: is not a field of this request; the fields are name, count, small"),
            (r#"{"name": "n", "count": 1, "name": "m"}"#, 422, "name: is given more than once"),
            (r#"{"name": "n", "count": 1, "items": [{"quantity": 1}, {"quantity": 2}, {"quantity": "3"}]}"#, 422, "items[2].quantity: must be a whole number"),
            (r#"{"name": "n", "count": 1, "items": [{}]}"#, 422, "items[0].quantity: is required"),
            (r#"{"name": "n", "count": 1, "items": {"quantity": 1}}"#, 422, "items: must be a JSON array, got an object"),
            (r#"{"name": "n", "count": 1, "items": [{"quantity": 1, "kind": "odd"}]}"#, 422, r#"items[0].kind: must be one of plain, gift, got "odd""#),
            (r#"{"name": "n", "count": 1, "tags": [1]}"#, 422, "tags[0]: must be a string, got the number 1"),
            (r#"{"name": "n", "count": 1, "extra": {"a": "b"}}"#, 422, "extra.a: must be a whole number"),
            (r#"{"name": "#, 400, "the request body is not valid JSON: EOF while parsing a value (line 1, column 9)"),
            (r#"{"name": "n", "count": 1} x"#, 400, "there is more after the JSON value"),
            (r#"{name: 1}"#, 400, "not valid JSON"),
            ("", 400, "not valid JSON"),
        ];
        let mut wrong = Vec::new();
        for (body, status, detail) in cases {
            let (actual_status, actual) = problem(body);
            if actual_status != status || !actual.contains(detail) {
                wrong.push(format!("{body}: {actual_status} {actual:?}, wanted {status} {detail:?}"));
            }
            assert_no_rust(&actual);
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        let long = format!(r#"{{"name": "n", "count": "{}"}}"#, "x".repeat(500));
        let (_, detail) = problem(&long);
        assert!(detail.len() < 200, "{detail}");
    }

    #[test]
    fn a_struct_is_not_taken_from_an_array() {
        assert!(parse_json::<Body>(br#"["n", 1, null, null, null, null, null, null]"#).is_err());
        assert_eq!(parse_json::<Body>(br#"{"name": "n", "count": 1}"#).unwrap().count, 1);
        // Other types are unaffected.
        assert_eq!(parse_json::<Vec<i64>>(b"[1, 2]").unwrap(), [1, 2]);
    }

    #[test]
    fn query_problems_name_the_parameter() {
        let cases = [
            (
                "Failed to deserialize query string: limit: invalid digit found in string",
                "limit: must be a whole number",
            ),
            (
                "Failed to deserialize query string: limit: number too large to fit in target type",
                "limit: must be a whole number within 64 bits",
            ),
            ("Failed to deserialize query string: duplicate field `limit`", "limit: is given more than once"),
            ("Failed to deserialize query string: missing field `q`", "q: is required"),
            (
                "Failed to deserialize query string: flag: invalid type: string \"x\", expected a boolean",
                "flag: must be true or false, got the string \"x\"",
            ),
        ];
        for (text, detail) in cases {
            assert_eq!(query_problem(text), detail);
        }
    }

    #[test]
    fn content_types() {
        let json = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            is_json(&headers)
        };
        assert!(json("application/json"));
        assert!(json("Application/JSON; charset=utf-8"));
        assert!(json("application/merge-patch+json"));
        assert!(!json("text/plain"));
        assert!(!json("application/jsonx"));
        assert!(!json("application/json x"));
        assert!(!json("application/"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
