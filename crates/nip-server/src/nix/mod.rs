//! The Nix binary cache protocol: `/nix-cache-info`, `/pubkey`, `/<hash>.narinfo`, `/nar/<file>`.
mod cache_info;
mod nar;
mod narinfo;
mod upload;

use axum::routing::get;
use axum::Router;

use crate::AppState;

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
                .layer(axum::extract::DefaultBodyLimit::disable())
                .delete(upload::delete_nar),
        )
}
