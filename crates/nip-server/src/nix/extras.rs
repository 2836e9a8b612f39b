//! The rest of the Nix binary cache protocol: `<hash>.ls` (NAR listings), `log/<drv>` (build
//! logs), `realisations/<id>.doi`, `debuginfo/<build-id>` and ncps' `build-trace-v2/<drv>/<out>`. GET and HEAD (with Range) under the
//! root ask the upstreams on a miss; under `/upload/` they serve stored files only. PUT (both
//! prefixes) stores a file as sent, with the rules of NAR uploads: `--cache-allow-put-verb`, a
//! write key once any key exists, audited, and every refusal a 4xx. The store side is
//! [`crate::cache::extras`].
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Extension;
use nip_core::store_path::{StorePath, StorePathHash};
use nip_store::{ExtraKind, ExtraRecord, PutExtra};

use crate::auth::Caller;
use crate::cache::extras as store;
use crate::error::{ApiError, ApiResult};
use crate::nix::{narinfo, upload, OnMiss};
use crate::range::{self, RangeAnswer};
use crate::AppState;

/// Checks a file's name as it appears in its URL and returns the name it is stored under.
fn parse_name(kind: ExtraKind, raw: &str) -> ApiResult<String> {
    let bad = |why: &str| ApiError::BadRequest(format!("invalid {} name: {why}", kind.as_str()));
    match kind {
        ExtraKind::Listing => {
            let hash = raw
                .strip_suffix(".ls")
                .ok_or_else(|| ApiError::NotFound("no such endpoint".into()))?;
            StorePathHash::parse(hash).map_err(|e| bad(&e.to_string()))?;
            Ok(hash.to_string())
        }
        ExtraKind::Log => {
            // Nix names a log by its derivation's store path base name.
            StorePath::parse_base_name(raw).map_err(|e| bad(&e.to_string()))?;
            if !raw.ends_with(".drv") {
                return Err(bad("expected a derivation (<hash>-<name>.drv)"));
            }
            Ok(raw.to_string())
        }
        ExtraKind::Realisation => {
            let id = raw
                .strip_suffix(".doi")
                .ok_or_else(|| bad("expected <drv hash>!<output>.doi"))?;
            crate::cache::realisation::parse_id(id).map_err(|e| bad(&e))?;
            Ok(id.to_string())
        }
        ExtraKind::DebugInfo => {
            // Nix 2.8 writes `debuginfo/<build id>.debug`, readers such as dwarffs ask for
            // `debuginfo/<build id>`: both name the same file.
            let id = raw.strip_suffix(".debug").unwrap_or(raw);
            let ok = (2..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
            if !ok {
                return Err(bad("expected an ELF build id in lowercase hex"));
            }
            Ok(id.to_string())
        }
        ExtraKind::BuildTrace => {
            // `<drv base name>/<output>[.doi]` (ncps strips the suffix too).
            let (drv, output) = raw
                .split_once('/')
                .ok_or_else(|| bad("expected <drv>/<output>"))?;
            let output = output.strip_suffix(".doi").unwrap_or(output);
            StorePath::parse_base_name(drv).map_err(|e| bad(&e.to_string()))?;
            if !drv.ends_with(".drv") {
                return Err(bad("expected a derivation (<hash>-<name>.drv)"));
            }
            if !crate::cache::realisation::valid_output_name(output) {
                return Err(bad("invalid output name"));
            }
            Ok(format!("{drv}/{output}"))
        }
    }
}

// Root files: `<hash>.narinfo` and `<hash>.ls` share the `/{name}` route.

pub async fn get_root(
    state: State<AppState>,
    Extension(on_miss): Extension<OnMiss>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    if name.ends_with(".ls") {
        let kind = ExtraKind::Listing;
        return get(&state, caller, method, headers, kind, &name, on_miss).await;
    }
    narinfo::get_narinfo(state, Extension(on_miss), caller, Path(name)).await
}

pub async fn put_root(
    state: State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    if name.ends_with(".ls") {
        return put(&state, caller, headers, ExtraKind::Listing, &name, body).await;
    }
    upload::put_narinfo(state, caller, Path(name), body).await
}

/// `log/`, `realisations/` and `debuginfo/`: one file name after the prefix; the route says which
/// kind ([`crate::nix::router`]).
pub async fn get_file(
    State(state): State<AppState>,
    Extension(on_miss): Extension<OnMiss>,
    Extension(kind): Extension<ExtraKind>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    get(&state, caller, method, headers, kind, &name, on_miss).await
}

pub async fn put_file(
    State(state): State<AppState>,
    Extension(kind): Extension<ExtraKind>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    put(&state, caller, headers, kind, &name, body).await
}

// `build-trace-v2/{drv}/{output}`: two path segments, one name.
pub async fn get_build_trace(
    State(state): State<AppState>,
    Extension(on_miss): Extension<OnMiss>,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    Path((drv, output)): Path<(String, String)>,
) -> ApiResult<Response> {
    let name = format!("{drv}/{output}");
    let kind = ExtraKind::BuildTrace;
    get(&state, caller, method, headers, kind, &name, on_miss).await
}

pub async fn put_build_trace(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    Path((drv, output)): Path<(String, String)>,
    body: Body,
) -> ApiResult<StatusCode> {
    let name = format!("{drv}/{output}");
    put(&state, caller, headers, ExtraKind::BuildTrace, &name, body).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(kind = kind.as_str(), name = %raw))]
async fn get(
    state: &AppState,
    caller: Caller,
    method: Method,
    headers: HeaderMap,
    kind: ExtraKind,
    raw: &str,
    on_miss: OnMiss,
) -> ApiResult<Response> {
    state.check_nix_read(&caller)?;
    let name = parse_name(kind, raw)?;
    let ask_upstreams = on_miss == OnMiss::AskUpstreams;
    let Some(rec) = crate::cache::extras::lookup(state, kind, &name, ask_upstreams).await? else {
        return Err(ApiError::NotFound(format!(
            "this cache has no such {}",
            describe(kind)
        )));
    };
    serve(state, &rec, &headers, &method).await
}

fn describe(kind: ExtraKind) -> &'static str {
    match kind {
        ExtraKind::Listing => "NAR listing",
        ExtraKind::Log => "build log",
        ExtraKind::Realisation => "realisation",
        ExtraKind::DebugInfo => "debug info file",
        ExtraKind::BuildTrace => "build trace entry",
    }
}

/// Sends a stored file as stored, with its Content-Type and Content-Encoding; Range applies to
/// the stored bytes.
async fn serve(
    state: &AppState,
    rec: &ExtraRecord,
    headers: &HeaderMap,
    method: &Method,
) -> ApiResult<Response> {
    let key = rec.blob_key()?;
    let size = rec.size as u64;
    let headers_for = |status, len| {
        let b = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, &rec.content_type)
            .header(header::CONTENT_LENGTH, len)
            .header(header::ACCEPT_RANGES, "bytes");
        match &rec.content_encoding {
            Some(enc) => b.header(header::CONTENT_ENCODING, enc),
            None => b,
        }
    };
    let (range, b) = match range::answer(headers, size, headers_for)? {
        RangeAnswer::Unsatisfiable(resp) => return Ok(resp),
        RangeAnswer::Send { range, builder } => (range, builder),
    };
    if method == Method::HEAD {
        return b.body(Body::empty()).map_err(ApiError::internal);
    }
    let Some(read) = state.blobs.read(&key, range).await? else {
        // The row outlived its bytes (a crash, or storage emptied by hand): forget the row so
        // the next request can fetch or accept the file again.
        tracing::warn!(kind = rec.kind.as_str(), name = %rec.name, "file recorded but missing from storage");
        state.meta.delete_extra(rec.kind, &rec.name).await?;
        return Err(ApiError::NotFound(format!(
            "this cache lost this {}; ask again",
            describe(rec.kind)
        )));
    };
    b.body(Body::from_stream(read.body))
        .map_err(ApiError::internal)
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(kind = kind.as_str(), name = %raw))]
async fn put(
    state: &AppState,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    kind: ExtraKind,
    raw: &str,
    body: Body,
) -> ApiResult<StatusCode> {
    let caller = upload::upload_caller(caller)?;
    let mut target = raw.to_string();
    let mut refused = false;
    let r = async {
        upload::permit(state, &caller, true).await?;
        let name = parse_name(kind, raw)?;
        target = name.clone();
        store_upload(state, &caller, &headers, kind, name, body, &mut refused).await
    }
    .await;
    // Trust refusals (forged or missing signatures, replacements) are an action of their own.
    let action = if refused {
        format!("{}-upload-refused", kind.as_str())
    } else {
        format!("{}-upload", kind.as_str())
    };
    upload::audited(state, &caller, &action, &target, r).await
}

async fn store_upload(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    kind: ExtraKind,
    name: String,
    body: Body,
    refused: &mut bool,
) -> ApiResult<(StatusCode, Option<(i64, String)>)> {
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => None,
        Some(v) => {
            let e = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
            if e.is_empty() || e == "identity" {
                None
            } else if store::valid_encoding(&e) {
                Some(e)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "unsupported Content-Encoding {e:?}; use xz, br, zstd, gzip or bzip2, or none"
                )));
            }
        }
    };
    let max = store::max_size(state, kind);
    let declared = crate::metrics::content_length(headers);
    let upload::StagedBody {
        reservation: _reservation, // declared first, so given back last
        staged,
        size,
        digest,
    } = upload::stage_body(state, caller, declared, body, max, describe(kind)).await?;
    let mut rec = ExtraRecord {
        kind,
        name,
        size: size as i64,
        sha256: hex::encode(digest),
        content_type: store::content_type(kind).to_string(),
        content_encoding: encoding,
        origin: nip_store::UPLOAD_ORIGIN.into(),
        uploaded_by: caller.key_name(),
        last_accessed_at: 0,
    };
    if matches!(kind, ExtraKind::Realisation | ExtraKind::BuildTrace) {
        // Checked against the trusted keys and signed by this cache: stored as rewritten.
        let accepted = crate::cache::realisation::accept_upload(state, &staged, &mut rec)
            .await
            .map_err(|e| {
                *refused = e.is_trust_refusal();
                ApiError::from(e)
            })?;
        if accepted == crate::cache::realisation::Accepted::AlreadyStored {
            return Ok((StatusCode::OK, None));
        }
    } else if kind != ExtraKind::Log && rec.content_encoding.is_none() {
        check_json(&staged, kind).await?;
    }
    match store::publish(state, &staged, &rec).await? {
        PutExtra::Inserted => {
            state.stats.activity(
                match kind {
                    ExtraKind::Listing => "ls-upload",
                    ExtraKind::Log => "log-upload",
                    ExtraKind::Realisation => "realisation-upload",
                    ExtraKind::DebugInfo => "debuginfo-upload",
                    ExtraKind::BuildTrace => "build-trace-upload",
                },
                rec.name.clone(),
            );
            Ok((StatusCode::OK, Some((rec.size, rec.sha256))))
        }
        PutExtra::Exists(e) if e.sha256 == rec.sha256 => {
            Ok((StatusCode::OK, Some((rec.size, rec.sha256))))
        }
        PutExtra::Exists(e) => {
            *refused = true;
            Err(ApiError::Conflict(format!(
            "this cache already holds another {} under this name (stored from {}); stored files are never replaced",
            describe(kind),
            e.origin
        )))
        }
    }
}

/// Listings and debug info files are JSON: anything else is refused before it is stored.
async fn check_json(staged: &nip_store::StagedFile, kind: ExtraKind) -> ApiResult<()> {
    let bytes = tokio::fs::read(staged.path())
        .await
        .map_err(ApiError::internal)?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| {
        ApiError::BadRequest(format!("the {} is not valid JSON: {e}", describe(kind)))
    })?;
    Ok(())
}
