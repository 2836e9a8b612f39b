//! ncps' closure pins: `POST /pin/<hash>.narinfo` pins a stored narinfo (404 when this cache does
//! not hold it), `DELETE /pin/<hash>.narinfo` unpins it (200 whether it was pinned or not, as
//! ncps), `GET /pins` lists the pinned hashes as a JSON array. A pin keeps the narinfo and, through
//! its References, every path of its closure this cache holds (narinfos and NARs) out of LRU
//! eviction ([`nip_store::gc::pinned_closure_nars`]).
//!
//! ncps asks no credentials for these. Here, as for Nix uploads, none are needed before any key
//! exists; once one does, pinning needs a write key and unpinning an admin key (an unpinned
//! upload that no upstream has is lost when evicted), both without a cache-key prefix. Listing
//! is a Nix read.
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nip_core::store_path::StorePathHash;

use crate::auth::{Caller, Scope};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Pins (`pin`) or unpins the hash in `name` once the caller may, and audits the outcome.
async fn audited_pin(
    state: &AppState,
    caller: &Caller,
    name: &str,
    pin: bool,
) -> ApiResult<StatusCode> {
    let (scope, action) = if pin {
        (Scope::Write, "nix-pin")
    } else {
        (Scope::Admin, "nix-unpin")
    };
    let r = async {
        super::upload::require_unprefixed(state, caller, scope, "cannot pin store paths").await?;
        let hash = super::upload::parse_hash(name, "no such endpoint: use /pin/<hash>.narinfo")?;
        if !pin {
            state.meta.unpin(hash.as_str()).await?;
        } else if state.meta.get_narinfo(hash.as_str()).await?.is_some() {
            state.meta.pin(hash.as_str(), nip_store::unix_now()).await?;
        } else {
            return Err(ApiError::NotFound(
                "this cache holds no narinfo for this hash: fetch or upload it first".into(),
            ));
        }
        Ok((StatusCode::OK, None))
    }
    .await;
    super::upload::audit_outcome(state, caller, action, name, r).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn pin(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    audited_pin(&state, &caller, &name, true).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn unpin(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    audited_pin(&state, &caller, &name, false).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all)]
pub async fn pins(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<String>>> {
    state.check_nix_read(&caller)?;
    // The same table pins artifact keys (`nip admin pin`): only store path hashes are listed.
    let pins = state.meta.pins().await?;
    Ok(Json(
        pins.into_iter()
            .filter(|k| StorePathHash::parse(k).is_ok())
            .collect(),
    ))
}
