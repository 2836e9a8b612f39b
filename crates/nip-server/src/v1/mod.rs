//! The `/v1` artifact cache API. Every route but `/v1/health` needs an API key.
pub mod artifacts;
mod download;
mod upload;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use nip_core::api::validate_key;

use crate::error::ApiError;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/artifacts", get(artifacts::list))
        .route(
            "/v1/artifacts/{key}",
            get(artifacts::lookup)
                .post(upload::upload)
                // Uploads stream to disk under their own size limit.
                .layer(DefaultBodyLimit::disable())
                .delete(artifacts::delete),
        )
        .route("/v1/artifacts/{key}/metadata", get(artifacts::metadata))
        .route("/v1/download/{key}", get(download::download))
}

/// Validates an artifact key from the path: a 400 before any lookup.
pub fn checked_key(key: &str) -> Result<&str, ApiError> {
    validate_key(key).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(key)
}
