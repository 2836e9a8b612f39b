//! `GET|HEAD /nix-cache-info` and `GET /pubkey`: public, no authentication.
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;

/// Lower than cache.nixos.org's 40, so Nix prefers this cache when both are configured.
const PRIORITY: u32 = 30;

pub async fn nix_cache_info() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {PRIORITY}\n",
            nip_core::store_path::STORE_DIR
        ),
    )
}

pub async fn pubkey(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain")],
        state.public_key.to_string(),
    )
}
