//! Nix uploads and deletes: `PUT /nar/<file>`, `PUT /<hash>.narinfo` (write key once any key
//! exists; `--cache-allow-put-verb`), and `DELETE` of both (admin; `--cache-allow-delete-verb`).
//! A NAR is checked against the file hash in its name before it is stored; a narinfo goes through
//! the trust rules of [`crate::cache::upload`]. Every refusal is a 4xx: Nix 2.8 hangs on a 5xx
//! answer to a PUT.
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use nip_core::nar_file::NarFileName;
use nip_core::narinfo::MAX_NARINFO_SIZE;
use nip_core::store_path::StorePathHash;
use nip_store::staging::StageReservation;
use nip_store::{NarRecord, StagedFile};

use crate::auth::{Caller, Scope};
use crate::cache;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Checks the verb is enabled and the caller may use it (a key is needed once any key exists).
pub(super) async fn permit(state: &AppState, caller: &Caller, put: bool) -> ApiResult<()> {
    let (enabled, flag, scope) = if put {
        (
            state.config.allow_put,
            "--cache-allow-put-verb",
            Scope::Write,
        )
    } else {
        (
            state.config.allow_delete,
            "--cache-allow-delete-verb",
            Scope::Admin,
        )
    };
    if !enabled {
        return Err(ApiError::MethodNotAllowed(format!(
            "this cache does not accept this method; start nip serve with {flag}"
        )));
    }
    require_unprefixed(state, caller, scope, "cannot change the Nix store cache").await
}

/// Needs `scope` once any key exists (or when the caller sent one), and a key without a
/// cache-key prefix; `cannot` says, in the refusal, what a prefixed key cannot do.
pub(super) async fn require_unprefixed(
    state: &AppState,
    caller: &Caller,
    scope: Scope,
    cannot: &str,
) -> ApiResult<()> {
    if caller.principal.is_some() || state.keys_exist().await? {
        let p = caller.require(scope, None)?;
        if p.prefix.is_some() {
            return Err(ApiError::Forbidden(format!(
                "key {:?} is limited to a cache-key prefix and {cannot}",
                p.name
            )));
        }
    }
    Ok(())
}

/// The caller of a PUT: a failure to authenticate it (e.g. the database is down) is a 4xx too,
/// since Nix 2.8 hangs on a 5xx answer to a PUT.
pub(super) fn upload_caller(caller: Result<Caller, ApiError>) -> ApiResult<Caller> {
    caller.map_err(ApiError::for_nix_upload)
}

/// The store path hash of a `<hash>.narinfo` name; `not_found` is the 404 for any other name.
pub(super) fn parse_hash(name: &str, not_found: &str) -> ApiResult<StorePathHash> {
    let hash = name
        .strip_suffix(".narinfo")
        .ok_or_else(|| ApiError::NotFound(not_found.into()))?;
    StorePathHash::parse(hash)
        .map_err(|e| ApiError::BadRequest(format!("invalid store path hash: {e}")))
}

/// Audits a Nix upload or delete ([`audit_outcome`]), its errors made 4xx for Nix 2.8.
pub(super) async fn audited(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    r: ApiResult<(StatusCode, Option<(i64, String)>)>,
) -> ApiResult<StatusCode> {
    audit_outcome(
        state,
        caller,
        action,
        target,
        r.map_err(ApiError::for_nix_upload),
    )
    .await
}

/// Writes `action` on `target` to the audit log with the status of `r` (and the size and SHA-256
/// of what was stored, when given), and returns that status.
pub(super) async fn audit_outcome(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    r: ApiResult<(StatusCode, Option<(i64, String)>)>,
) -> ApiResult<StatusCode> {
    let status = match &r {
        Ok((s, _)) => s.as_u16(),
        Err(e) => e.status().as_u16(),
    };
    let mut entry = caller.audit_entry(action, Some(target), &status.to_string());
    if let Ok((_, Some((size, sha)))) = &r {
        entry.size = Some(*size);
        entry.sha256 = Some(sha.clone());
    }
    state.audit(entry).await;
    r.map(|(s, _)| s)
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(file = %file))]
pub async fn put_nar(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let caller = upload_caller(caller)?;
    let declared = crate::metrics::content_length(&headers);
    let r = store_nar(&state, &caller, &file, declared, body).await;
    audited(&state, &caller, "nar-upload", &file, r).await
}

async fn store_nar(
    state: &AppState,
    caller: &Caller,
    file: &str,
    declared: Option<u64>,
    body: Body,
) -> ApiResult<(StatusCode, Option<(i64, String)>)> {
    permit(state, caller, true).await?;
    let name = NarFileName::parse(file)
        .map_err(|e| ApiError::BadRequest(format!("invalid NAR file name: {e}")))?;
    let max = state.config.max_upload_size;
    let StagedBody {
        reservation: _reservation, // declared first, so given back last
        staged,
        size,
        digest,
    } = stage_body(state, caller, declared, body, max, "NAR").await?;
    if nip_core::base32::encode(&digest) != name.hash() {
        return Err(ApiError::BadRequest(
            "the NAR's bytes do not match the file hash in its name; nothing was stored".into(),
        ));
    }
    let rec = NarRecord {
        nar_file: name.file_name(),
        size: size as i64,
        sha256: hex::encode(digest),
    };
    let checked = cache::nar::Checked::Staged(&staged);
    cache::nar::publish(state, checked, &rec, cache::nar::Origin::Upload).await?;
    state.stats.activity("nar-upload", name.file_name());
    Ok((StatusCode::OK, Some((rec.size, rec.sha256))))
}

/// A Nix upload's body in staging, and the staging space it holds until dropped.
pub(super) struct StagedBody {
    pub staged: StagedFile,
    pub size: u64,
    pub digest: [u8; 32],
    pub reservation: StageReservation,
}

/// Streams a Nix upload's body (`declared` bytes by its Content-Length) to a staged file,
/// refusing more than `max` bytes with a 413 that names `what`. Staging space for the declared
/// body (Nix always sends Content-Length) is reserved before any byte is read, and grows with
/// what arrives; it is given back when the [`StagedBody`] is dropped, or on any error. Past the
/// bound: a 409 saying when to retry (`ApiError::for_nix_upload`).
pub(super) async fn stage_body(
    state: &AppState,
    caller: &Caller,
    declared: Option<u64>,
    body: Body,
    max: u64,
    what: &str,
) -> ApiResult<StagedBody> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "{what} larger than this server's limit of {max} bytes"
        ))
    };
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut reservation = state.reserve_staging(caller, declared.unwrap_or(0))?;
    let (staged, size, digest) = crate::state::stage_stream(
        state,
        body.into_data_stream(),
        max,
        &mut reservation,
        too_large,
        |e| ApiError::BadRequest(format!("upload body ended early: {e}")),
    )
    .await?;
    Ok(StagedBody {
        staged,
        size,
        digest,
        reservation,
    })
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn put_narinfo(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    let caller = upload_caller(caller)?;
    // The audit names the store path once it is known; trust refusals are an action of their own.
    let mut target = name.clone();
    let mut action = "narinfo-upload";
    let r = async {
        permit(&state, &caller, true).await?;
        let hash = parse_hash(&name, "no such endpoint")?;
        let bytes = axum::body::to_bytes(body, MAX_NARINFO_SIZE)
            .await
            .map_err(|_| {
                ApiError::PayloadTooLarge(format!(
                    "narinfo larger than {MAX_NARINFO_SIZE} bytes, or body cut short"
                ))
            })?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::BadRequest("narinfo is not UTF-8".into()))?;
        let info = cache::upload::parse(&hash, text)?;
        target = info.store_path.full();
        cache::upload::store(&state, info, caller.key_name())
            .await
            .map_err(|e| {
                if e.is_trust_refusal() {
                    action = "narinfo-upload-refused";
                }
                ApiError::from(e)
            })?;
        Ok((StatusCode::OK, None))
    }
    .await;
    audited(&state, &caller, action, &target, r).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn delete_narinfo(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    audited_delete(
        &state,
        &caller,
        "narinfo-delete",
        &name,
        "narinfo",
        || async {
            let hash = parse_hash(&name, "no such endpoint")?;
            let deleted = state.meta.delete_narinfo(hash.as_str()).await?;
            state.hot_narinfos.forget(hash.as_str());
            Ok(deleted)
        },
    )
    .await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(file = %file))]
pub async fn delete_nar(
    State(state): State<AppState>,
    caller: Caller,
    Path(file): Path<String>,
) -> ApiResult<StatusCode> {
    audited_delete(&state, &caller, "nar-delete", &file, "NAR", || async {
        let name = NarFileName::parse(&file)
            .map_err(|e| ApiError::BadRequest(format!("invalid NAR file name: {e}")))?;
        Ok(cache::nar::delete(&state, &name.file_name()).await?)
    })
    .await
}

/// A DELETE: allowed as an upload is, `delete` says whether there was something to delete,
/// and the outcome is audited as `action` on `target`.
async fn audited_delete<F, Fut>(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    what: &str,
    delete: F,
) -> ApiResult<StatusCode>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ApiResult<bool>>,
{
    let r = async {
        permit(state, caller, false).await?;
        if delete().await? {
            Ok((StatusCode::NO_CONTENT, None))
        } else {
            Err(ApiError::NotFound(format!("no such {what}")))
        }
    }
    .await;
    audited(state, caller, action, target, r).await
}
