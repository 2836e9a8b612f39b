//! Nix uploads and deletes: `PUT /nar/<file>`, `PUT /<hash>.narinfo` (write key once any key
//! exists; `--cache-allow-put-verb`), and `DELETE` of both (admin; `--cache-allow-delete-verb`).
//! A NAR is checked against the file hash in its name before it is stored; a narinfo is accepted
//! only when its NAR is already stored with the FileHash and FileSize it states. Every refusal is
//! a 4xx: Nix 2.8 hangs on a 5xx answer to a PUT.
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use futures::StreamExt;
use nip_core::nar_file::NarFileName;
use nip_core::narinfo::{NarInfo, MAX_NARINFO_SIZE};
use nip_core::store_path::StorePathHash;
use nip_store::{NarInfoRecord, NarRecord};

use crate::auth::{Caller, Scope};
use crate::error::{ApiError, ApiResult};
use crate::fill::nar_blob_key;
use crate::AppState;

/// Checks the verb is enabled and the caller may use it (a key is needed once any key exists).
async fn permit(state: &AppState, caller: &Caller, put: bool) -> ApiResult<()> {
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
    if caller.principal.is_some() || state.keys_exist().await? {
        let p = caller.require(scope, None)?;
        if p.prefix.is_some() {
            return Err(ApiError::Forbidden(format!(
                "key {:?} is limited to a cache-key prefix and cannot change the Nix store cache",
                p.name
            )));
        }
    }
    Ok(())
}

fn parse_hash(name: &str) -> ApiResult<StorePathHash> {
    let hash = name
        .strip_suffix(".narinfo")
        .ok_or_else(|| ApiError::NotFound("no such endpoint".into()))?;
    StorePathHash::parse(hash)
        .map_err(|e| ApiError::BadRequest(format!("invalid store path hash: {e}")))
}

async fn audited(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    r: ApiResult<(StatusCode, Option<(i64, String)>)>,
) -> ApiResult<StatusCode> {
    let r = r.map_err(ApiError::for_nix_upload);
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
    caller: Caller,
    Path(file): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    let r = store_nar(&state, &caller, &file, body).await;
    audited(&state, &caller, "nar-upload", &file, r).await
}

async fn store_nar(
    state: &AppState,
    caller: &Caller,
    file: &str,
    body: Body,
) -> ApiResult<(StatusCode, Option<(i64, String)>)> {
    permit(state, caller, true).await?;
    let name = NarFileName::parse(file)
        .map_err(|e| ApiError::BadRequest(format!("invalid NAR file name: {e}")))?;
    let max = state.config.max_upload_size;
    let staged = state.staging.create().await?;
    let mut writer = nip_store::BatchedWriter::new(&staged);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("upload body ended early: {e}")))?;
        if writer.received() + chunk.len() as u64 > max {
            return Err(ApiError::PayloadTooLarge(format!(
                "NAR larger than this server's limit of {max} bytes"
            )));
        }
        writer.push(chunk).await?;
    }
    let (size, digest) = writer.finish().await?;
    if nip_core::base32::encode(&digest) != name.hash() {
        return Err(ApiError::BadRequest(
            "the NAR's bytes do not match the file hash in its name; nothing was stored".into(),
        ));
    }
    staged.sync().await?;
    state
        .blobs
        .put_file(&nar_blob_key(&name.file_name())?, staged.path())
        .await?;
    let sha = hex::encode(digest);
    state.budget.stored(size);
    state.stats.activity("nar-upload", name.file_name());
    state
        .meta
        .put_nar(&NarRecord {
            nar_file: name.file_name(),
            size: size as i64,
            sha256: sha.clone(),
        })
        .await?;
    Ok((StatusCode::OK, Some((size as i64, sha))))
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn put_narinfo(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    let r = store_narinfo(&state, &caller, &name, body).await;
    audited(&state, &caller, "narinfo-upload", &name, r).await
}

async fn store_narinfo(
    state: &AppState,
    caller: &Caller,
    name: &str,
    body: Body,
) -> ApiResult<(StatusCode, Option<(i64, String)>)> {
    permit(state, caller, true).await?;
    let hash = parse_hash(name)?;
    let bytes = axum::body::to_bytes(body, MAX_NARINFO_SIZE)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge(format!(
                "narinfo larger than {MAX_NARINFO_SIZE} bytes, or body cut short"
            ))
        })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::BadRequest("narinfo is not UTF-8".into()))?;
    let mut info =
        NarInfo::parse(text).map_err(|e| ApiError::BadRequest(format!("invalid narinfo: {e}")))?;
    if info.store_path.hash() != &hash {
        return Err(ApiError::BadRequest(
            "the narinfo's StorePath does not match the URL".into(),
        ));
    }
    let file = info
        .url
        .strip_prefix("nar/")
        .and_then(|f| NarFileName::parse(f).ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "URL {:?} must be nar/<filehash>.nar[.ext]",
                info.url
            ))
        })?;
    let stored = state
        .meta
        .get_nar(&file.file_name())
        .await?
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "upload the NAR first: PUT /nar/{file} (this cache does not have it)"
            ))
        })?;
    let file_hash_ok = info
        .file_hash
        .as_ref()
        .is_some_and(|h| hex::encode(&h.digest) == stored.sha256);
    if !file_hash_ok || info.file_size != Some(stored.size as u64) {
        return Err(ApiError::BadRequest(
            "FileHash/FileSize do not match the stored NAR".into(),
        ));
    }
    if state.config.sign_narinfo {
        info.sign(&state.signer);
    }
    let rec = NarInfoRecord {
        hash: hash.as_str().to_string(),
        store_path: info.store_path.full(),
        nar_file: file.file_name(),
        file_size: info.file_size.map(|n| n as i64),
        file_hash: info.file_hash.as_ref().map(|h| h.to_string()),
        nar_hash: info.nar_hash.to_string(),
        narinfo: info.to_text(),
        origin: "upload".into(),
    };
    state.meta.put_narinfo(&rec, &[]).await?;
    state.hot_narinfos.forget(hash.as_str());
    Ok((StatusCode::OK, None))
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn delete_narinfo(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let r = async {
        permit(&state, &caller, false).await?;
        let hash = parse_hash(&name)?;
        let deleted = state.meta.delete_narinfo(hash.as_str()).await?;
        state.hot_narinfos.forget(hash.as_str());
        if deleted {
            Ok((StatusCode::NO_CONTENT, None))
        } else {
            Err(ApiError::NotFound("no such narinfo".into()))
        }
    }
    .await;
    audited(&state, &caller, "narinfo-delete", &name, r).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(file = %file))]
pub async fn delete_nar(
    State(state): State<AppState>,
    caller: Caller,
    Path(file): Path<String>,
) -> ApiResult<StatusCode> {
    let r = async {
        permit(&state, &caller, false).await?;
        let name = NarFileName::parse(&file)
            .map_err(|e| ApiError::BadRequest(format!("invalid NAR file name: {e}")))?;
        let existed = state.meta.delete_nar(&name.file_name()).await?;
        state
            .blobs
            .delete(&nar_blob_key(&name.file_name())?)
            .await?;
        if existed {
            Ok((StatusCode::NO_CONTENT, None))
        } else {
            Err(ApiError::NotFound("no such NAR".into()))
        }
    }
    .await;
    audited(&state, &caller, "nar-delete", &file, r).await
}
