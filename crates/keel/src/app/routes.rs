//! Every route of the API in one list, and the OpenAPI document generated from the same list, so a
//! route cannot exist without being documented. The layers every request passes through are added
//! here too.

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio_util::task::TaskTracker;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::error::{self, ApiError};
use crate::http::{middleware, rate_limit};
use crate::state::AppState;
use crate::{accounts, admin, carts, catalog, feed, likes, orders, search, users, wallet, webhooks};

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
pub fn router(state: AppState, writes: TaskTracker) -> Router {
    let (api, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(users::create_user))
        .routes(routes!(
            accounts::sessions::sign_in,
            accounts::sessions::list_sessions,
            accounts::sessions::end_all_sessions
        ))
        .routes(routes!(accounts::sessions::refresh))
        .routes(routes!(accounts::sessions::end_session))
        .routes(routes!(accounts::by_email::request_code))
        .routes(routes!(accounts::by_email::request_password_reset))
        .routes(routes!(accounts::by_email::confirm_password_reset))
        .routes(routes!(accounts::by_email::verify_email))
        .routes(routes!(accounts::by_email::resend_verification))
        .routes(routes!(users::get_user, users::update_user))
        .routes(routes!(catalog::create_product, catalog::list_products))
        .routes(routes!(catalog::get_product, catalog::update_product))
        .routes(routes!(catalog::get_inventory, catalog::set_inventory))
        .routes(routes!(carts::get_cart))
        .routes(routes!(carts::set_item, carts::delete_item))
        .routes(routes!(wallet::get_wallet))
        .routes(routes!(wallet::deposit))
        .routes(routes!(wallet::payments::receive_event))
        .routes(routes!(orders::checkout))
        .routes(routes!(orders::get_order))
        .routes(routes!(orders::list_orders))
        .routes(routes!(admin::queues))
        .routes(routes!(admin::retry_job))
        .routes(routes!(admin::deposits::deposit_for_user))
        .routes(routes!(accounts::erasure::delete_user))
        .routes(routes!(admin::locks::lock_user))
        .routes(routes!(admin::locks::unlock_user))
        .routes(routes!(admin::consistency::table))
        .routes(routes!(admin::replicas::list))
        .routes(routes!(admin::shards::list, admin::shards::add))
        .routes(routes!(admin::shards::start_move))
        .routes(routes!(admin::shards::get_move, admin::shards::cancel_move))
        .routes(routes!(admin::shards::rebalance))
        .routes(routes!(admin::stats::stats))
        .routes(routes!(admin::queries::top_statements))
        .routes(routes!(likes::like, likes::unlike))
        .routes(routes!(feed::follows::follow, feed::follows::unfollow))
        .routes(routes!(feed::follows::followers))
        .routes(routes!(feed::follows::following))
        .routes(routes!(feed::read::feed))
        .routes(routes!(search::search))
        .routes(routes!(webhooks::create_subscription, webhooks::list_subscriptions))
        .routes(routes!(webhooks::delete_subscription))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(webhooks::retry_delivery))
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    // Inside `observe`, so a refused request is logged and counted like any other.
    let limits = rate_limit::Limits::from_config(&state.config);
    let observe = middleware::Observe {
        debug_headers: state.config.debug_headers,
        timeout: state.config.request_timeout,
        writes,
    };
    api.merge(super::ops::router(doc))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this route does not accept that method".into())
        })
        // Innermost: a retried read runs within the same deadline, and is counted once.
        .layer(axum::middleware::from_fn(crate::http::retry::retry_reads))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(move |req, next| rate_limit::limit(req, next, limits.clone())))
        .layer(axum::middleware::from_fn(move |req, next| middleware::observe(req, next, observe.clone())))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(middleware::panic_response))
        .with_state(state)
}
