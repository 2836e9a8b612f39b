//! The Nix binary cache protocol: `/nix-cache-info`, `/pubkey`, `/<hash>.narinfo`, `/nar/<file>`,
//! listings, logs, realisations, debug info and build traces (`extras`), and the same under
//! `/upload/` (ncps' upload path: reads there never go upstream).
mod cache_info;
mod extras;
mod nar;
mod narinfo;
mod pin;
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
            // `<hash>.narinfo`, and `<hash>.ls` (NAR listings) through `extras`.
            get(extras::get_root)
                .put(extras::put_root)
                .delete(upload::delete_narinfo),
        )
        // ncps' closure pins.
        .route(
            "/pin/{name}",
            axum::routing::post(pin::pin).delete(pin::unpin),
        )
        .route("/pins", get(pin::pins))
        .route("/log/{drv}", get(extras::get_log).put(extras::put_log))
        .route(
            "/realisations/{id}",
            get(extras::get_realisation).put(extras::put_realisation),
        )
        .route(
            "/debuginfo/{id}",
            get(extras::get_debuginfo).put(extras::put_debuginfo),
        )
        .route(
            "/build-trace-v2/{drv}/{output}",
            get(extras::get_build_trace).put(extras::put_build_trace),
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
            get(extras::get_upload_root).put(extras::put_root),
        )
        .route(
            "/upload/log/{drv}",
            get(extras::get_upload_log).put(extras::put_log),
        )
        .route(
            "/upload/realisations/{id}",
            get(extras::get_upload_realisation).put(extras::put_realisation),
        )
        .route(
            "/upload/debuginfo/{id}",
            get(extras::get_upload_debuginfo).put(extras::put_debuginfo),
        )
        .route(
            "/upload/build-trace-v2/{drv}/{output}",
            get(extras::get_upload_build_trace).put(extras::put_build_trace),
        )
        .route(
            "/upload/nar/{file}",
            get(nar::get_upload_nar).merge(put(upload::put_nar).layer(DefaultBodyLimit::disable())),
        )
}
