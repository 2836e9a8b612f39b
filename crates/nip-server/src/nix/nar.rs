//! `GET|HEAD /nar/<filehash>.nar[.xz|.zst|.bz2|…]`: served from storage with Content-Length and
//! Range support; on a miss, streamed from upstream while it is cached (see [`crate::cache::fill`]).
//! `GET|HEAD /upload/nar/<file>` (ncps' upload path) serves stored NARs only: a miss is a 404.
use async_compression::tokio::bufread::ZstdEncoder;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Extension;
use futures::StreamExt;
use nip_core::nar_file::{Compression, NarFileName};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::auth::Caller;
use crate::cache::cluster;
use crate::cache::fill::{FillRole, FillSpec};
use crate::error::{ApiError, ApiResult};
use crate::nix::OnMiss;
use crate::range::{self, RangeAnswer};
use crate::stats::Kind;
use crate::AppState;

const NAR_CONTENT_TYPE: &str = "application/x-nix-nar";
/// Compressed bytes per body frame (the default 4 KiB would mean a write per 4 KiB).
const ZSTD_CHUNK: usize = 128 * 1024;

/// `/nar/<file>`, at the root and under `/upload/` (the route says [`OnMiss`]).
#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(file = %file))]
pub async fn get_nar(
    State(state): State<AppState>,
    Extension(on_miss): Extension<OnMiss>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> ApiResult<Response> {
    state.check_nix_read(&caller)?;
    let name = NarFileName::parse(&file)
        .map_err(|e| ApiError::BadRequest(format!("invalid NAR file name: {e}")))?;
    let file = name.file_name();
    let key = nip_store::BlobKey::nar(&file)?;

    if indexed(&state, &file).await? {
        if let Some(resp) =
            serve_stored(&state, &key, &headers, &method, name.compression()).await?
        {
            tracing::debug!("NAR hit");
            state.stats.hit(Kind::Nar);
            crate::jobs::Accessed::note(&state.accessed.nars, &file);
            let read = crate::nix::narinfo::nix_read("nar-read", &file, "200");
            state.read_audit.note(&caller, read);
            return Ok(resp);
        }
        // Another instance may have evicted it since this one saw the row.
        state.hot_nars.forget(&file);
        if state.meta.get_nar(&file).await?.is_some() {
            tracing::warn!("NAR recorded but missing from storage; fetching again");
        }
    }
    if on_miss == OnMiss::NotFound {
        return Err(ApiError::NotFound("this cache has no such NAR".into()));
    }
    miss(&state, &caller, &method, &headers, &name, key).await
}

/// A NAR not in storage: joins or starts its fill (one upstream fetch across the instances) and
/// streams it as it arrives.
async fn miss(
    state: &AppState,
    caller: &Caller,
    method: &Method,
    headers: &HeaderMap,
    name: &NarFileName,
    key: nip_store::BlobKey,
) -> ApiResult<Response> {
    let file = name.file_name();
    // Both at once: each is a round trip to the database.
    let (info, sources) = tokio::try_join!(
        state.meta.narinfo_for_nar(&file),
        state.meta.nar_sources(&file)
    )?;
    let Some(info) = info else {
        return Err(ApiError::NotFound(
            "this cache knows no narinfo for this NAR; fetch the narinfo first".into(),
        ));
    };
    let size = info.file_size.map(|n| n as u64);
    if method == Method::HEAD {
        // Answer from the narinfo without downloading the NAR.
        return nar_headers(StatusCode::OK, size)
            .body(Body::empty())
            .map_err(ApiError::internal);
    }
    let spec = FillSpec::for_narinfo(&info, sources).map_err(ApiError::internal)?;
    // One upstream fetch across the instances sharing the database: unless this instance is
    // filling it already, take the fill lease or wait for the instance that holds it.
    let lease = if state.fills.is_running(&file) {
        None
    } else {
        let stored = || crate::cache::nar::is_stored(state, &file, &key);
        match cluster::lead_or_wait(state, &format!("nar:{file}"), stored).await {
            cluster::Turn::Lead(lease) => Some(lease),
            cluster::Turn::Stored => {
                state.stats.coalesced(Kind::Nar);
                return serve_stored(state, &key, headers, method, name.compression())
                    .await?
                    .ok_or_else(|| ApiError::internal("NAR vanished right after it was stored"));
            }
        }
    };
    let (fill, role) = loop {
        match state.fills.join_or_start(state, spec.clone()).await? {
            Some(started) => break started,
            None => {
                if let Some(resp) =
                    serve_stored(state, &key, headers, method, name.compression()).await?
                {
                    return Ok(resp);
                }
                // A fill here stored it a moment ago, and the file is gone already (evicted,
                // or removed behind nip's back): fetch it again.
                if !state.fills.forget_stored(&file) {
                    return Err(ApiError::internal("NAR vanished right after it was stored"));
                }
            }
        }
    };
    if let Some(lease) = lease {
        // Held until the fill ends, whoever of its clients stays.
        let fill = fill.clone();
        tokio::spawn(async move {
            fill.finished().await;
            drop(lease);
        });
    }
    tracing::debug!(?role, "NAR miss: streaming from upstream");
    let read = crate::nix::narinfo::nix_read("nar-read", &file, "200 upstream");
    state.read_audit.note(caller, read);
    state.stats.miss(Kind::Nar);
    match role {
        FillRole::Started => state.stats.activity("nar-fetch", file.clone()),
        FillRole::Joined => state.stats.coalesced(Kind::Nar),
    }
    // The status waits for the first bytes: a fill that fails before any (a small NAR is
    // checked whole first) is a 502, not a 200 whose connection drops.
    let mut body = Box::pin(fill.stream());
    let first = match body.next().await {
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(e)) => return Err(ApiError::BadGateway(e.to_string())),
        None => None,
    };
    let rest = futures::stream::iter(first.map(Ok)).chain(body);
    nar_headers(StatusCode::OK, size)
        .body(Body::from_stream(rest))
        .map_err(ApiError::internal)
}

/// Whether the index has a row for this NAR: from memory when seen recently.
async fn indexed(state: &AppState, file: &str) -> ApiResult<bool> {
    if state.hot_nars.get(file).is_some() {
        return Ok(true);
    }
    let seen = state.hot_nars.generation();
    let found = state.meta.get_nar(file).await?.is_some();
    if found {
        state.hot_nars.insert(file, (), seen);
    }
    Ok(found)
}

fn nar_headers(status: StatusCode, size: Option<u64>) -> axum::http::response::Builder {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, NAR_CONTENT_TYPE)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    if let Some(n) = size {
        b = b.header(header::CONTENT_LENGTH, n);
    }
    b
}

/// Serves a stored NAR, honouring Range. `None` when the blob is not in storage.
async fn serve_stored(
    state: &AppState,
    key: &nip_store::BlobKey,
    headers: &HeaderMap,
    method: &Method,
    compression: Compression,
) -> ApiResult<Option<Response>> {
    // The common case, a whole GET, opens the file once: its size comes with it.
    if method == Method::GET && !headers.contains_key(header::RANGE) {
        let Some(read) = state.blobs.read(key, None).await? else {
            return Ok(None);
        };
        return Ok(Some(whole_body(read, compression, headers)?));
    }
    let Some(size) = state.blobs.stat(key).await? else {
        return Ok(None);
    };
    let (range, builder) =
        match range::answer(headers, size, |status, len| nar_headers(status, Some(len)))? {
            RangeAnswer::Unsatisfiable(resp) => return Ok(Some(resp)),
            RangeAnswer::Send { range, builder } => (range, builder),
        };
    if method == Method::HEAD {
        return Ok(Some(
            builder.body(Body::empty()).map_err(ApiError::internal)?,
        ));
    }
    let Some(read) = state.blobs.read(key, range).await? else {
        return Ok(None);
    };
    if range.is_none() {
        return Ok(Some(whole_body(read, compression, headers)?));
    }
    Ok(Some(
        builder
            .body(Body::from_stream(read.body))
            .map_err(ApiError::internal)?,
    ))
}

/// A whole stored NAR as a 200 response.
fn whole_body(
    read: nip_store::BlobRead,
    compression: Compression,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    // Uncompressed NARs (e.g. from `nix copy ?compression=none`) go out zstd-compressed to clients
    // that accept it, as Harmonia does; already compressed ones are served as stored.
    if compression == Compression::None && accepts_zstd(headers) {
        // The fastest level: this runs per download, on the server's CPU (about 2× level 3's
        // speed for a slightly larger output; see BENCHMARKS.md).
        let encoder = ZstdEncoder::with_quality(
            StreamReader::new(read.body),
            async_compression::Level::Fastest,
        );
        return nar_headers(StatusCode::OK, None)
            .header(header::CONTENT_ENCODING, "zstd")
            .header(header::VARY, "Accept-Encoding")
            .body(Body::from_stream(ReaderStream::with_capacity(
                encoder, ZSTD_CHUNK,
            )))
            .map_err(ApiError::internal);
    }
    nar_headers(StatusCode::OK, Some(read.size))
        .body(Body::from_stream(read.body))
        .map_err(ApiError::internal)
}

/// Whether `Accept-Encoding` lists zstd with a non-zero quality.
fn accepts_zstd(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            parts.next().is_some_and(|c| c.eq_ignore_ascii_case("zstd"))
                && parts.all(|p| p.replace(' ', "") != "q=0" && p.replace(' ', "") != "q=0.0")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_acceptance() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            m
        };
        assert!(accepts_zstd(&h("gzip, zstd")));
        assert!(accepts_zstd(&h("ZSTD;q=0.5")));
        assert!(!accepts_zstd(&h("zstd;q=0")));
        assert!(!accepts_zstd(&h("gzip, br")));
        assert!(!accepts_zstd(&HeaderMap::new()));
    }
}
