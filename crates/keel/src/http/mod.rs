//! The HTTP API: routes, the OpenAPI document generated from them, and what every route shares
//! (validation helpers, pagination, the telemetry middleware).

pub mod auth;
pub mod error;
pub mod extract;
mod middleware;
mod ops;
pub mod trace;

use std::time::SystemTime;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::startup::AppState;
use crate::{admin, carts, catalog, consistency, likes, orders, search, users, wallet, webhooks};
use error::ApiError;

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(OpenApi)]
#[openapi(
    info(title = "Keel", description = "A high-throughput commerce backend."),
    modifiers(&BearerAuth),
    components(schemas(error::Problem))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// Every route, and the OpenAPI document describing them. Both come from the same list, so a route
/// cannot exist without being documented.
pub fn router(state: AppState) -> Router {
    let (api, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(users::create_user))
        .routes(routes!(users::get_user, users::update_user))
        .routes(routes!(catalog::create_product, catalog::list_products))
        .routes(routes!(catalog::get_product, catalog::update_product))
        .routes(routes!(catalog::get_inventory, catalog::set_inventory))
        .routes(routes!(carts::get_cart))
        .routes(routes!(carts::set_item, carts::delete_item))
        .routes(routes!(wallet::get_wallet))
        .routes(routes!(wallet::deposit))
        .routes(routes!(orders::checkout))
        .routes(routes!(orders::get_order))
        .routes(routes!(orders::list_orders))
        .routes(routes!(admin::queues))
        .routes(routes!(admin::retry_job))
        .routes(routes!(consistency::table))
        .routes(routes!(likes::like, likes::unlike))
        .routes(routes!(search::search))
        .routes(routes!(webhooks::create_subscription, webhooks::list_subscriptions))
        .routes(routes!(webhooks::delete_subscription))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(webhooks::retry_delivery))
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let debug_headers = state.config.debug_headers;
    let request_timeout = state.config.request_timeout;
    api.merge(ops::router(doc))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this route does not accept that method".into())
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(move |req, next| {
            middleware::observe(req, next, debug_headers, request_timeout)
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(middleware::panic_response))
        .with_state(state)
}

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
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only says there is a next page.
    pub fn from_rows(
        rows: Vec<Row>,
        limit: i64,
        to_item: impl FnMut(&Row) -> T,
        cursor_of: impl Fn(&T) -> String,
    ) -> Page<T> {
        let more = rows.len() as i64 > limit;
        let items: Vec<T> = rows.iter().take(limit as usize).map(to_item).collect();
        let next_cursor = if more { items.last().map(cursor_of) } else { None };
        Page { items, next_cursor }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// 1 to 100; default 20.
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageParams {
    pub const DEFAULT_LIMIT: i64 = 20;
    pub const MAX_LIMIT: i64 = 100;

    /// The page size and the id to continue after.
    pub fn validate(&self) -> Result<(i64, Option<uuid::Uuid>), ApiError> {
        let limit = self.limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(ApiError::BadRequest(format!("limit must be from 1 to {}, got {limit}", Self::MAX_LIMIT)));
        }
        let after = match &self.cursor {
            None => None,
            Some(c) => Some(
                uuid::Uuid::try_parse(c)
                    .map_err(|_| ApiError::BadRequest(format!("cursor {c:?} is not one this API returned")))?,
            ),
        };
        Ok((limit, after))
    }
}
