//! `GET /v1/artifacts/{key}` (read), `GET /v1/artifacts/{key}/metadata` (read),
//! `GET /v1/artifacts?name=&version=&limit=` (read), `DELETE /v1/artifacts/{key}` (admin).
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nip_core::api::{rfc3339, ArtifactInfo, ArtifactList, ArtifactListItem};
use serde::Deserialize;

use super::checked_key;
use crate::auth::{Caller, Scope};
use crate::cache;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

fn not_found() -> ApiError {
    ApiError::NotFound("not found".into())
}

pub fn download_url(key: &str) -> String {
    format!("/v1/download/{key}")
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
    let url = cache::artifact::presigned(&state, &rec).await?;
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
    let rec = cache::artifact::delete(&state, key).await?;
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
