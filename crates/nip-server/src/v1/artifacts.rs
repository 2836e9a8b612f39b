//! `GET /v1/artifacts/{key}` (read), `GET /v1/artifacts/{key}/metadata` (read),
//! `GET /v1/artifacts?name=&version=&limit=` (read), `DELETE /v1/artifacts/{key}` (admin).
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nip_core::api::{rfc3339, ArtifactInfo, ArtifactListItem};
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

/// An artifact read for `--audit-reads`: with its size and SHA-256 when it exists.
pub(crate) fn read<'a>(
    action: &'static str,
    key: &'a str,
    result: &'a str,
    rec: Option<&'a nip_store::ArtifactRecord>,
) -> crate::read_audit::Read<'a> {
    crate::read_audit::Read {
        action,
        target: key,
        result,
        size: rec.map(|r| r.size),
        sha256: rec.map(|r| r.sha256.as_str()),
    }
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
                state
                    .read_audit
                    .note(&caller, read("artifact-lookup", key, "404", None));
                return Err(not_found());
            };
            state.hot_artifacts.insert(key, rec.clone(), seen);
            rec
        }
    };
    let url = cache::artifact::presigned(&state, &rec).await?;
    state
        .read_audit
        .note(&caller, read("artifact-lookup", key, "200", Some(&rec)));
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

/// Largest listing body. A fixed constant, not a setting: metadata is at most 1 MiB per artifact
/// (see `v1::upload`), so 1000 items could be ~1 GiB held per request; 8 MiB still fits several
/// maximal items and any normal listing, and keeps memory flat under concurrent listings. Past it
/// the list is cut and says `"truncated": true`.
const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;

/// Rows read from the index at a time: each may carry up to 1 MiB of metadata, so the whole
/// `limit` is never loaded at once.
const LIST_PAGE_ROWS: i64 = 8;

/// `,"truncated":true}` plus the closing `]`: room kept so a cut list still fits the cap.
const LIST_TAIL_BYTES: usize = 32;

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}; use ?name=&version=&limit=")))?;
    let principal = caller.require(Scope::Read, None)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIST_LIMIT}"
        )));
    }
    let mut body = ListBody::new(MAX_LIST_BYTES);
    let mut cursor: Option<(i64, String)> = None;
    let mut remaining = limit;
    'pages: while remaining > 0 {
        let page = state
            .meta
            .list_artifacts(
                q.name.as_deref(),
                q.version.as_deref(),
                principal.prefix.as_deref(),
                cursor.as_ref().map(|(at, key)| (*at, key.as_str())),
                remaining.min(LIST_PAGE_ROWS),
            )
            .await?;
        let full_page = page.len() as i64 == remaining.min(LIST_PAGE_ROWS);
        for r in page {
            cursor = Some((r.created_at, r.key.clone()));
            if !body.push(&item(r))? {
                break 'pages;
            }
            remaining -= 1;
        }
        if !full_page {
            break;
        }
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], body.finish()).into_response())
}

fn item(r: nip_store::ArtifactRecord) -> ArtifactListItem {
    ArtifactListItem {
        metadata: serde_json::from_str(&r.metadata).unwrap_or(serde_json::Value::Null),
        key: r.key,
        size: r.size as u64,
        sha256: r.sha256,
        created_at: rfc3339(r.created_at),
    }
}

/// An [`ArtifactList`] serialized item by item, so only one item is ever held unserialized and
/// the body never grows past its cap.
struct ListBody {
    buf: Vec<u8>,
    cap: usize,
    items: usize,
    truncated: bool,
}

impl ListBody {
    fn new(cap: usize) -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(b"{\"artifacts\":[");
        ListBody {
            buf,
            cap,
            items: 0,
            truncated: false,
        }
    }

    /// Adds the item; false (and the list marked truncated) when it would pass the cap.
    fn push(&mut self, item: &ArtifactListItem) -> ApiResult<bool> {
        let json = serde_json::to_vec(item).map_err(ApiError::internal)?;
        if self.buf.len() + 1 + json.len() + LIST_TAIL_BYTES > self.cap {
            self.truncated = true;
            return Ok(false);
        }
        if self.items > 0 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&json);
        self.items += 1;
        Ok(true)
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.push(b']');
        if self.truncated {
            self.buf.extend_from_slice(b",\"truncated\":true");
        }
        self.buf.push(b'}');
        self.buf
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use nip_core::api::ArtifactList;

    fn sample(key: &str, meta_bytes: usize) -> ArtifactListItem {
        ArtifactListItem {
            key: key.into(),
            size: 3,
            sha256: "ab".repeat(32),
            created_at: rfc3339(1_700_000_000),
            metadata: serde_json::json!({ "name": "pkg", "blob": "x".repeat(meta_bytes) }),
        }
    }

    #[test]
    fn list_body_is_an_artifact_list() {
        let items = vec![sample("a", 10), sample("b", 0)];
        let mut body = ListBody::new(MAX_LIST_BYTES);
        for i in &items {
            assert!(body.push(i).unwrap());
        }
        let bytes = body.finish();
        let list: ArtifactList = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            list,
            ArtifactList {
                artifacts: items.clone(),
                truncated: false
            }
        );
        // Same bytes as serializing the struct: untruncated listings are unchanged.
        assert_eq!(
            bytes,
            serde_json::to_vec(&ArtifactList {
                artifacts: items,
                truncated: false
            })
            .unwrap()
        );
        let empty: ArtifactList = serde_json::from_slice(&ListBody::new(100).finish()).unwrap();
        assert!(empty.artifacts.is_empty() && !empty.truncated);
    }

    #[test]
    fn list_body_stops_at_the_cap_and_says_so() {
        let cap = 10_000;
        let mut body = ListBody::new(cap);
        let mut added = 0;
        while body.push(&sample(&format!("k{added}"), 1000)).unwrap() {
            added += 1;
        }
        assert!(added >= 8, "{added}");
        let bytes = body.finish();
        assert!(bytes.len() <= cap, "{}", bytes.len());
        let list: ArtifactList = serde_json::from_slice(&bytes).unwrap();
        assert!(list.truncated);
        assert_eq!(list.artifacts.len(), added);
    }
}
