//! `GET|HEAD /v1/download/{key}` (read): the bytes, with Content-Length, ETag (the SHA-256) and
//! Range support; with `--s3-presign-downloads`, a GET is redirected to a presigned S3 URL.
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::artifacts::read;
use super::checked_key;
use crate::auth::{Caller, Scope};
use crate::error::{ApiError, ApiResult};
use crate::range::{parse_range, RangeRequest};
use crate::AppState;

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(key = %key))]
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    let key = checked_key(&key)?;
    caller.require(Scope::Read, Some(key))?;
    let note = |result: &str, rec: Option<&nip_store::ArtifactRecord>| {
        state
            .read_audit
            .note(&caller, read("artifact-download", key, result, rec))
    };
    let Some(rec) = state.meta.get_artifact(key).await? else {
        note("404", None);
        return Err(ApiError::NotFound("not found".into()));
    };
    let etag = format!("\"{}\"", rec.sha256);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        note("304", Some(&rec));
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    if method == Method::GET {
        if let Some(url) = crate::cache::artifact::presigned(&state, &rec).await? {
            // 307 keeps the method, and clients resend their Range header to the new location.
            let location = HeaderValue::from_str(&url).map_err(ApiError::internal)?;
            note("307", Some(&rec));
            return Ok((
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location)],
            )
                .into_response());
        }
    }
    let blob = nip_store::BlobKey::artifact(&rec.sha256)?;
    let size = rec.size as u64;
    let (status, range) = match parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    ) {
        RangeRequest::Full => (StatusCode::OK, None),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
        RangeRequest::Unsatisfiable => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            let v =
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(ApiError::internal)?;
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
            return Ok(resp);
        }
    };
    let len = range.map_or(size, |r| r.end - r.start + 1);
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(r) = range {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", r.start, r.end),
        );
    }
    crate::jobs::Accessed::note(&state.accessed.artifacts, &rec.key);
    state.stats.hit(crate::stats::Kind::Artifact);
    if state.read_audit.enabled() {
        let result = match method {
            Method::HEAD => format!("{} HEAD", status.as_u16()),
            _ => status.as_u16().to_string(),
        };
        note(&result, Some(&rec));
    }
    if method == Method::HEAD {
        return builder.body(Body::empty()).map_err(ApiError::internal);
    }
    let read = state.blobs.read(&blob, range).await?.ok_or_else(|| {
        ApiError::internal(format!(
            "artifact {key} is indexed but its bytes are missing"
        ))
    })?;
    builder
        .body(Body::from_stream(read.body))
        .map_err(ApiError::internal)
}
