//! The Nix binary cache protocol: `/nix-cache-info`, `/pubkey`, `/<hash>.narinfo`, `/nar/<file>`.
mod cache_info;
mod nar;
mod narinfo;

use axum::routing::get;
use axum::Router;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/nix-cache-info", get(cache_info::nix_cache_info))
        .route("/pubkey", get(cache_info::pubkey))
        .route("/{name}", get(narinfo::get_narinfo))
        .route("/nar/{file}", get(nar::get_nar))
}
