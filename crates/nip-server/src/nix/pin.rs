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

fn parse_hash(name: &str) -> ApiResult<StorePathHash> {
    let hash = name
        .strip_suffix(".narinfo")
        .ok_or_else(|| ApiError::NotFound("no such endpoint: use /pin/<hash>.narinfo".into()))?;
    StorePathHash::parse(hash)
        .map_err(|e| ApiError::BadRequest(format!("invalid store path hash: {e}")))
}

/// Needs `scope` once any key exists (or when the caller sent one), and an unprefixed key.
async fn permit(state: &AppState, caller: &Caller, scope: Scope) -> ApiResult<()> {
    super::upload::require_unprefixed(state, caller, scope, "cannot pin store paths").await
}

async fn audited(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    r: ApiResult<StatusCode>,
) -> ApiResult<StatusCode> {
    let r = r.map(|status| (status, None));
    super::upload::audit_outcome(state, caller, action, target, r).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn pin(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let r = async {
        permit(&state, &caller, Scope::Write).await?;
        let hash = parse_hash(&name)?;
        if state.meta.get_narinfo(hash.as_str()).await?.is_none() {
            return Err(ApiError::NotFound(
                "this cache holds no narinfo for this hash: fetch or upload it first".into(),
            ));
        }
        state.meta.pin(hash.as_str(), nip_store::unix_now()).await?;
        Ok(StatusCode::OK)
    }
    .await;
    audited(&state, &caller, "nix-pin", &name, r).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn unpin(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let r = async {
        permit(&state, &caller, Scope::Admin).await?;
        let hash = parse_hash(&name)?;
        state.meta.unpin(hash.as_str()).await?;
        Ok(StatusCode::OK)
    }
    .await;
    audited(&state, &caller, "nix-unpin", &name, r).await
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
