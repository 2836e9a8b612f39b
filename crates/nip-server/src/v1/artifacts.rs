//! `GET /v1/artifacts/{key}` (read), `GET /v1/artifacts/{key}/metadata` (read),
//! `GET /v1/artifacts?name=&version=&limit=` (read), `DELETE /v1/artifacts/{key}` (admin).
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nip_core::api::{rfc3339, ArtifactInfo, ArtifactList, ArtifactListItem};
use nip_store::ArtifactRecord;
use serde::Deserialize;

use super::{artifact_blob_key, checked_key};
use crate::auth::{Caller, Scope};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

fn not_found() -> ApiError {
    ApiError::NotFound("not found".into())
}

pub fn download_url(key: &str) -> String {
    format!("/v1/download/{key}")
}

/// How long a presigned download URL stays valid (`--s3-presign-downloads`): long enough to start
/// a large download, short enough that a leaked URL soon stops working.
pub const PRESIGN_TTL: std::time::Duration = std::time::Duration::from_secs(900);

/// With `--s3-presign-downloads`, a presigned URL of the artifact's bytes. The download then
/// bypasses this server, so it counts as an access now (for retention and LRU). When signing
/// fails (e.g. credentials not fetched yet), `None`: the bytes go through this server instead.
pub async fn presigned(state: &AppState, rec: &ArtifactRecord) -> ApiResult<Option<String>> {
    if !state.config.s3_presign_downloads {
        return Ok(None);
    }
    let url = match state
        .blobs
        .presigned_get(&artifact_blob_key(&rec.sha256)?, PRESIGN_TTL)
        .await
    {
        Ok(url) => url,
        Err(e) => {
            tracing::warn!(key = %rec.key, error = %e, "cannot presign a download URL; serving the bytes directly");
            None
        }
    };
    if url.is_some() {
        crate::jobs::Accessed::note(&state.accessed.artifacts, &rec.key);
        state.stats.hit(crate::stats::Kind::Artifact);
    }
    Ok(url)
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(key = %key))]
pub async fn lookup(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<ArtifactInfo>> {
    let key = checked_key(&key)?;
    caller.require(Scope::Read, Some(key))?;
    // Misses are not kept: an upload elsewhere must show at once.
    let rec = match state.hot_artifacts.get(key) {
        Some(rec) => rec,
        None => {
            let seen = state.hot_artifacts.generation();
            let Some(rec) = state.meta.get_artifact(key).await? else {
                state.stats.miss(crate::stats::Kind::Artifact);
                return Err(not_found());
            };
            state.hot_artifacts.insert(key, rec.clone(), seen);
            rec
        }
    };
    let url = presigned(&state, &rec).await?;
    Ok(Json(ArtifactInfo {
        key: rec.key.clone(),
        download_url: url.unwrap_or_else(|| download_url(&rec.key)),
        size: rec.size as u64,
        sha256: rec.sha256,
        created_at: rfc3339(rec.created_at),
    }))
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(key = %key))]
pub async fn metadata(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    let key = checked_key(&key)?;
    caller.require(Scope::Read, Some(key))?;
    let rec = state.meta.get_artifact(key).await?.ok_or_else(not_found)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], rec.metadata).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    name: Option<String>,
    version: Option<String>,
    limit: Option<i64>,
}

const DEFAULT_LIST_LIMIT: i64 = 50;
const MAX_LIST_LIMIT: i64 = 1000;

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ArtifactList>> {
    let Query(q) = query
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}; use ?name=&version=&limit=")))?;
    let principal = caller.require(Scope::Read, None)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIST_LIMIT}"
        )));
    }
    let records = state
        .meta
        .list_artifacts(
            q.name.as_deref(),
            q.version.as_deref(),
            principal.prefix.as_deref(),
            limit,
        )
        .await?;
    let artifacts = records
        .into_iter()
        .map(|r| ArtifactListItem {
            metadata: serde_json::from_str(&r.metadata).unwrap_or(serde_json::Value::Null),
            key: r.key,
            size: r.size as u64,
            sha256: r.sha256,
            created_at: rfc3339(r.created_at),
        })
        .collect();
    Ok(Json(ArtifactList { artifacts }))
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(key = %key))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let key = checked_key(&key)?;
    if let Err(e) = caller.require(Scope::Admin, Some(key)) {
        state
            .audit(caller.audit_entry(
                "artifact-delete",
                Some(key),
                &format!("{}", e.status().as_u16()),
            ))
            .await;
        return Err(e);
    }
    let rec = delete_artifact(&state, key).await?;
    let mut entry = caller.audit_entry(
        "artifact-delete",
        Some(key),
        if rec.is_some() { "204" } else { "404" },
    );
    if let Some(r) = &rec {
        entry.size = Some(r.size);
        entry.sha256 = Some(r.sha256.clone());
    }
    state.audit(entry).await;
    rec.map(|_| StatusCode::NO_CONTENT).ok_or_else(not_found)
}

/// Removes an artifact's row, then its bytes unless another key shares them.
pub async fn delete_artifact(state: &AppState, key: &str) -> ApiResult<Option<ArtifactRecord>> {
    let deleted = state.meta.delete_artifact(key).await?;
    state.hot_artifacts.forget(key);
    let Some((rec, shared)) = deleted else {
        return Ok(None);
    };
    if !shared {
        state.blobs.delete(&artifact_blob_key(&rec.sha256)?).await?;
    }
    Ok(Some(rec))
}
