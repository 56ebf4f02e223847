//! The HTTP ceiling: a minimal axum service answering the same routes with the same JSON bytes that
//! Keel returns, and nothing else. Keel's cached reads are measured against it in the same run.

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;

pub async fn serve(listen: &str, profile: String, product: String) -> std::io::Result<()> {
    let profile: &'static str = profile.leak();
    let product: &'static str = product.leak();
    let app = Router::new()
        .route("/v1/users/{id}", get(move || async move { ([(CONTENT_TYPE, "application/json")], profile) }))
        .route("/v1/products/{id}", get(move || async move { ([(CONTENT_TYPE, "application/json")], product) }))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await
}
