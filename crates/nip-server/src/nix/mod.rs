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
use axum::routing::{delete, get, post};
use axum::{Extension, Router};
use nip_store::ExtraKind;

use crate::AppState;

/// What a read does when the cache lacks the narinfo or NAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnMiss {
    /// Fetch it from the upstreams (the root routes).
    AskUpstreams,
    /// Answer 404 (`/upload/…`), so `nix copy` uploads what the cache does not hold itself.
    NotFound,
}

/// The same files at the root and under `/upload/`; deletes and pins only at the root.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(files(OnMiss::AskUpstreams))
        .nest("/upload", files(OnMiss::NotFound))
        .route("/{name}", delete(upload::delete_narinfo))
        .route("/nar/{file}", delete(upload::delete_nar))
        // ncps' closure pins.
        .route("/pin/{name}", post(pin::pin).delete(pin::unpin))
        .route("/pins", get(pin::pins))
}

fn files(on_miss: OnMiss) -> Router<AppState> {
    let file = |kind: ExtraKind| {
        get(extras::get_file)
            .put(extras::put_file)
            .layer(Extension(kind))
    };
    Router::new()
        .route("/nix-cache-info", get(cache_info::nix_cache_info))
        .route("/pubkey", get(cache_info::pubkey))
        // `<hash>.narinfo`, and `<hash>.ls` (NAR listings) through `extras`.
        .route("/{name}", get(extras::get_root).put(extras::put_root))
        .route("/log/{drv}", file(ExtraKind::Log))
        .route("/realisations/{id}", file(ExtraKind::Realisation))
        .route("/debuginfo/{id}", file(ExtraKind::DebugInfo))
        .route(
            "/build-trace-v2/{drv}/{output}",
            get(extras::get_build_trace).put(extras::put_build_trace),
        )
        .route(
            "/nar/{file}",
            get(nar::get_nar)
                .put(upload::put_nar)
                // NAR uploads stream to disk under their own size limit.
                .layer(DefaultBodyLimit::disable()),
        )
        .layer(Extension(on_miss))
}
