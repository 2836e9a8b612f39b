//! The Nix binary cache protocol: `/nix-cache-info`, `/pubkey`, `/<hash>.narinfo`, `/nar/<file>`,
//! and the same under `/upload/` (ncps' upload path: reads there never go upstream).
mod cache_info;
mod nar;
mod narinfo;
mod upload;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, put};
use axum::Router;

use crate::AppState;

/// What a read does when the cache lacks the narinfo or NAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnMiss {
    /// Fetch it from the upstreams (the root routes).
    AskUpstreams,
    /// Answer 404 (`/upload/…`), so `nix copy` uploads what the cache does not hold itself.
    NotFound,
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/nix-cache-info", get(cache_info::nix_cache_info))
        .route("/pubkey", get(cache_info::pubkey))
        .route(
            "/{name}",
            get(narinfo::get_narinfo)
                .put(upload::put_narinfo)
                .delete(upload::delete_narinfo),
        )
        .route(
            "/nar/{file}",
            get(nar::get_nar)
                .put(upload::put_nar)
                // NAR uploads stream to disk under their own size limit.
                .layer(DefaultBodyLimit::disable())
                .delete(upload::delete_nar),
        )
        .route("/upload/nix-cache-info", get(cache_info::nix_cache_info))
        .route("/upload/pubkey", get(cache_info::pubkey))
        .route(
            "/upload/{name}",
            get(narinfo::get_upload_narinfo).put(upload::put_narinfo),
        )
        .route(
            "/upload/nar/{file}",
            get(nar::get_upload_nar).merge(put(upload::put_nar).layer(DefaultBodyLimit::disable())),
        )
}
