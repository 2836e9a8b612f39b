//! `POST /v1/artifacts/{key}` (write): multipart `file` + `metadata`. The file is streamed to a
//! staged temp file while hashed (memory stays flat), checked against the size limit and any
//! expected digest, fsynced and published; only then is the row committed and the key visible.
//! Keys are immutable: the same bytes again is 200, other bytes 409.
use axum::extract::multipart::{Field, Multipart, MultipartRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nip_core::api::{UploadResult, HEADER_SHA256};
use nip_store::staging::StageReservation;
use nip_store::{ArtifactRecord, PutArtifact, StagedFile};

use super::checked_key;
use crate::auth::{Caller, Scope};
use crate::cache;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Largest accepted metadata part.
const MAX_METADATA: usize = 1024 * 1024;

struct Received {
    staged: StagedFile,
    size: u64,
    sha256: String,
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(key = %key))]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let key = checked_key(&key)?.to_string();
    let mut multipart = multipart.ok();
    let result = receive_and_store(&state, &caller, &key, &headers, multipart.as_mut()).await;
    if let (Err(e), Some(m)) = (&result, multipart.as_mut()) {
        // Read what the client is still sending, so that it gets this answer rather than a
        // connection reset; not when the body is too large, which is why it was refused.
        if !matches!(
            e,
            ApiError::PayloadTooLarge(_)
                | ApiError::TooManyRequests(_)
                | ApiError::Unauthorized(_)
                | ApiError::Forbidden(_)
        ) {
            drain(m, state.config.max_upload_size).await;
        }
    }
    let (status, size, sha) = match &result {
        Ok((status, r)) => (status.as_u16(), Some(r.size as i64), Some(r.sha256.clone())),
        Err(e) => (e.status().as_u16(), None, None),
    };
    let mut entry = caller.audit_entry("artifact-upload", Some(&key), &status.to_string());
    entry.size = size;
    entry.sha256 = sha;
    state.audit(entry).await;
    let (status, body) = result?;
    tracing::debug!(
        status = status.as_u16(),
        size = body.size,
        "artifact upload"
    );
    Ok((status, Json(body)).into_response())
}

async fn receive_and_store(
    state: &AppState,
    caller: &Caller,
    key: &str,
    headers: &HeaderMap,
    multipart: Option<&mut Multipart>,
) -> ApiResult<(StatusCode, UploadResult)> {
    caller.require(Scope::Write, Some(key))?;
    let max = state.config.max_upload_size;
    let declared = crate::metrics::content_length(headers);
    // Multipart framing adds a little; anything far past the limit is refused before reading.
    let most = max.saturating_add(MAX_METADATA as u64 + 64 * 1024);
    if declared.is_some_and(|n| n > most) {
        return Err(too_large(max));
    }
    // Staging space is reserved for the declared body before any byte is read, and grows with
    // what arrives; it is given back when this returns, whatever the outcome.
    let mut reservation = state.reserve_staging(caller, declared.unwrap_or(0))?;
    let multipart = multipart.ok_or_else(|| {
        ApiError::BadRequest(
            "expected a multipart/form-data body with parts `file` and `metadata`".into(),
        )
    })?;
    let (file, metadata) = receive_parts(state, multipart, max, &mut reservation).await?;

    check_digest(headers, &metadata, &file.sha256)?;
    let result = UploadResult {
        key: key.to_string(),
        size: file.size,
        sha256: file.sha256.clone(),
        created: false,
    };
    if let Some(existing) = state.meta.get_artifact(key).await? {
        return if existing.sha256 == file.sha256 {
            Ok((StatusCode::OK, result))
        } else {
            Err(conflict(key))
        };
    }

    let field = |name: &str| {
        metadata
            .get(name)
            .and_then(|v| v.as_str())
            .map(String::from)
    };
    let rec = ArtifactRecord {
        key: key.to_string(),
        size: file.size as i64,
        sha256: file.sha256.clone(),
        metadata: serde_json::Value::Object(metadata.clone()).to_string(),
        created_at: nip_store::unix_now(),
    };
    match cache::artifact::publish(
        state,
        &file.staged,
        &rec,
        field("name").as_deref(),
        field("version").as_deref(),
    )
    .await?
    {
        PutArtifact::Created => Ok((
            StatusCode::CREATED,
            UploadResult {
                created: true,
                ..result
            },
        )),
        PutArtifact::AlreadyPresent(_) => Ok((StatusCode::OK, result)),
        PutArtifact::Conflict(_) => Err(conflict(key)),
    }
}

/// Reads the multipart body: the `file` part streamed to staging, the optional `metadata` part.
async fn receive_parts(
    state: &AppState,
    multipart: &mut Multipart,
    max: u64,
    reservation: &mut StageReservation,
) -> ApiResult<(Received, Metadata)> {
    let mut file: Option<Received> = None;
    let mut metadata: Option<Metadata> = None;
    while let Some(field) = multipart.next_field().await.map_err(bad_multipart)? {
        match field.name() {
            Some("file") if file.is_none() => {
                file = Some(receive_file(state, field, max, reservation).await?)
            }
            Some("metadata") if metadata.is_none() => {
                metadata = Some(receive_metadata(field).await?)
            }
            Some(other @ ("file" | "metadata")) => {
                return Err(ApiError::BadRequest(format!(
                    "part `{other}` appears twice"
                )));
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unexpected part {:?}: send only `file` and `metadata`",
                    other.unwrap_or("")
                )));
            }
        }
    }
    let file = file.ok_or_else(|| ApiError::BadRequest("the `file` part is missing".into()))?;
    Ok((file, metadata.unwrap_or_default()))
}

type Metadata = serde_json::Map<String, serde_json::Value>;

/// The SHA-256 the client expects (`X-Nip-Sha256`, else `metadata.sha256`) must be what arrived.
fn check_digest(headers: &HeaderMap, metadata: &Metadata, actual: &str) -> ApiResult<()> {
    let expected = headers
        .get(HEADER_SHA256)
        .map(|v| v.to_str().unwrap_or("").to_string())
        .or_else(|| {
            metadata
                .get("sha256")
                .and_then(|v| v.as_str())
                .map(String::from)
        });
    match expected {
        Some(expected) if !expected.eq_ignore_ascii_case(actual) => Err(ApiError::Unprocessable(format!(
            "the uploaded bytes have sha256 {actual}, but {expected:?} was expected: the upload was corrupted or the digest is wrong; nothing was stored"
        ))),
        _ => Ok(()),
    }
}

fn conflict(key: &str) -> ApiError {
    ApiError::Conflict(format!(
        "key {key:?} already holds different bytes; keys are immutable: use a new key, or have an admin delete it first"
    ))
}

fn too_large(max: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the artifact is larger than this server's limit of {max} bytes (--artifact-max-size)"
    ))
}

/// Discards the rest of the body (bounded in bytes and time).
async fn drain(multipart: &mut Multipart, limit: u64) {
    let mut seen: u64 = 0;
    let work = async {
        while let Ok(Some(mut field)) = multipart.next_field().await {
            while let Ok(Some(chunk)) = field.chunk().await {
                seen += chunk.len() as u64;
                if seen > limit {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), work).await;
}

fn bad_multipart(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::BadRequest(format!(
        "malformed or truncated multipart body: {}; nothing was stored",
        e.body_text()
    ))
}

async fn receive_file(
    state: &AppState,
    field: Field<'_>,
    max: u64,
    reservation: &mut StageReservation,
) -> ApiResult<Received> {
    let (staged, size, digest) = crate::state::stage_stream(
        state,
        field,
        max,
        reservation,
        || too_large(max),
        bad_multipart,
    )
    .await?;
    Ok(Received {
        staged,
        size,
        sha256: hex::encode(digest),
    })
}

async fn receive_metadata(mut field: Field<'_>) -> ApiResult<Metadata> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(bad_multipart)? {
        if buf.len() + chunk.len() > MAX_METADATA {
            return Err(ApiError::PayloadTooLarge(format!(
                "metadata is larger than {MAX_METADATA} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    match serde_json::from_slice(&buf) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest(
            "metadata must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!(
            "metadata is not valid JSON: {e}"
        ))),
    }
}
