//! `GET|HEAD /<hash>.narinfo`: served from the index, or fetched once from the best upstream that
//! has it signed by a trusted key ([`crate::cache::narinfo`]).
//! `GET|HEAD /upload/<hash>.narinfo` (ncps' upload path) serves the index only: a miss is a 404
//! and never goes upstream, so `nix copy --to …/upload` uploads what the cache lacks.
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use nip_core::store_path::StorePathHash;

use crate::auth::Caller;
use crate::cache;
use crate::error::{ApiError, ApiResult};
use crate::nix::OnMiss;
use crate::AppState;

/// `/<hash>.narinfo`, at the root and under `/upload/` (the route says [`OnMiss`]).
#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn get_narinfo(
    State(state): State<AppState>,
    Extension(on_miss): Extension<OnMiss>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    state.check_nix_read(&caller)?;
    let Some(hash) = name.strip_suffix(".narinfo") else {
        return Err(ApiError::NotFound("no such endpoint".into()));
    };
    let hash = StorePathHash::parse(hash).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid store path hash: {e}; expected 32 nix-base32 characters"
        ))
    })?;
    let ask_upstreams = on_miss == OnMiss::AskUpstreams;
    let text = cache::narinfo::get(&state, &hash, ask_upstreams).await?;
    let result = if text.is_some() { "200" } else { "404" };
    state
        .read_audit
        .note(&caller, nix_read("narinfo-read", &name, result));
    match text {
        Some(text) => Ok(narinfo_response(text)),
        None if ask_upstreams => Err(not_found()),
        None => Err(ApiError::NotFound("this cache has no such narinfo".into())),
    }
}

/// A Nix read for `--audit-reads`.
pub(crate) fn nix_read<'a>(
    action: &'static str,
    target: &'a str,
    result: &'a str,
) -> crate::read_audit::Read<'a> {
    crate::read_audit::Read {
        action,
        target,
        result,
        size: None,
        sha256: None,
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("no upstream cache has this store path".into())
}

fn narinfo_response(text: Arc<str>) -> Response {
    // Bytes from the shared text: no copy per request.
    (
        [(header::CONTENT_TYPE, "text/x-nix-narinfo")],
        axum::body::Bytes::from_owner(ArcStr(text)),
    )
        .into_response()
}

struct ArcStr(Arc<str>);

impl AsRef<[u8]> for ArcStr {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}
