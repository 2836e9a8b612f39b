//! `GET|HEAD /nix-cache-info` (public unless `--cache-require-auth-read`) and `GET /pubkey`
//! (always public: it is what clients need to trust this cache).
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::AppState;

/// As ncps (pkg/server/server.go): below cache.nixos.org's 40, so Nix prefers this cache.
const PRIORITY: u32 = 10;

pub async fn nix_cache_info(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<impl IntoResponse> {
    state.check_nix_read(&caller)?;
    Ok((
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {PRIORITY}\n",
            nip_core::store_path::STORE_DIR
        ),
    ))
}

pub async fn pubkey(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain")],
        state.public_key.to_string(),
    )
}
