//! `GET|HEAD /<hash>.narinfo`: served from the index, or fetched once from the best upstream that
//! has it signed by a trusted key, rewritten to point at this cache's `/nar/` and re-signed.
//! `GET|HEAD /upload/<hash>.narinfo` (ncps' upload path) serves the index only: a miss is a 404
//! and never goes upstream, so `nix copy --to …/upload` uploads what the cache lacks.
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use nip_core::nar_file::{Compression, NarFileName};
use nip_core::narinfo::NarInfo;
use nip_core::store_path::StorePathHash;
use nip_store::{NarInfoRecord, NarSource};

use crate::auth::Caller;
use crate::coalesce::Role;
use crate::error::{ApiError, ApiResult};
use crate::nix::OnMiss;
use crate::stats::Kind;
use crate::upstream::{Found, Lookup};
use crate::AppState;

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn get_narinfo(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    narinfo(state, caller, name, OnMiss::AskUpstreams).await
}

#[tracing::instrument(target = "nip::request", level = "debug", skip_all, fields(name = %name))]
pub async fn get_upload_narinfo(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    narinfo(state, caller, name, OnMiss::NotFound).await
}

async fn narinfo(
    state: AppState,
    caller: Caller,
    name: String,
    on_miss: OnMiss,
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
    let text = match state.hot_narinfos.get(hash.as_str()) {
        Some(text) => Some(text),
        None => {
            let seen = state.hot_narinfos.generation();
            let rec = state.meta.get_narinfo(hash.as_str()).await?;
            rec.map(|rec| {
                let text = Arc::<str>::from(rec.narinfo);
                state.hot_narinfos.insert(hash.as_str(), text.clone(), seen);
                text
            })
        }
    };
    if let Some(text) = text {
        tracing::debug!("narinfo hit");
        state.stats.hit(Kind::Narinfo);
        crate::jobs::Accessed::note(&state.accessed.narinfos, hash.as_str());
        return Ok(narinfo_response(text));
    }
    if on_miss == OnMiss::NotFound {
        return Err(ApiError::NotFound("this cache has no such narinfo".into()));
    }
    if state.is_known_missing(hash.as_str()) {
        tracing::debug!("narinfo negative-cache hit");
        state.stats.miss(Kind::Narinfo);
        return Err(not_found());
    }
    let st = state.clone();
    let h = hash.clone();
    let (outcome, role) = state
        .narinfo_lookups
        .run(
            hash.as_str().to_string(),
            move || fetch_and_store(st, h).boxed(),
            Err(Arc::from("lookup panicked")),
        )
        .await;
    tracing::debug!(coalesced = (role == Role::Joined), "narinfo miss");
    state.stats.miss(Kind::Narinfo);
    if role == Role::Joined {
        state.stats.coalesced(Kind::Narinfo);
    }
    match outcome {
        Ok(Some(text)) => Ok(narinfo_response(text)),
        Ok(None) => Err(not_found()),
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
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

async fn fetch_and_store(state: AppState, hash: StorePathHash) -> crate::NarInfoOutcome {
    // A request that missed just before an earlier fetch of this hash stored it and ended would
    // fetch it a second time: the database, asked again by the one fetch now running, knows.
    let stored = state
        .meta
        .get_narinfo(hash.as_str())
        .await
        .map_err(|e| Arc::<str>::from(e.to_string()))?;
    if let Some(rec) = stored {
        return Ok(Some(Arc::from(rec.narinfo)));
    }
    let found = match state.upstreams.lookup(&hash).await {
        Lookup::Found(found) => *found,
        Lookup::Missing => {
            state.remember_missing(hash.as_str());
            return Ok(None);
        }
        Lookup::Failed => return Ok(None),
    };
    let (record, sources) = match rewrite(&state, found) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(%hash, %why, "upstream narinfo cannot be served");
            state.remember_missing(hash.as_str());
            return Ok(None);
        }
    };
    state
        .meta
        .put_narinfo(&record, &sources)
        .await
        .map_err(|e| Arc::<str>::from(e.to_string()))?;
    state
        .stats
        .activity("narinfo-fetch", record.store_path.clone());
    Ok(Some(Arc::from(record.narinfo)))
}

/// The NAR file name this cache serves a narinfo's NAR under: `<filehash>.nar<ext>`.
fn nar_file_name(info: &NarInfo) -> Result<(NarFileName, u64), String> {
    let compression = info
        .compression_kind()
        .ok_or_else(|| format!("unknown compression {:?}", info.compression))?;
    match (&info.file_hash, info.file_size) {
        (Some(h), Some(size)) => Ok((NarFileName::new(h, compression), size)),
        // An uncompressed NAR's file is the NAR itself.
        (None, _) if compression == Compression::None => {
            Ok((NarFileName::new(&info.nar_hash, compression), info.nar_size))
        }
        _ => Err("narinfo has no FileHash/FileSize for a compressed NAR".into()),
    }
}

fn rewrite(state: &AppState, found: Found) -> Result<(NarInfoRecord, Vec<NarSource>), String> {
    let Found {
        mut info,
        upstream,
        alternates,
        ..
    } = found;
    let (file, file_size) = nar_file_name(&info)?;
    let file_hash = info
        .file_hash
        .clone()
        .unwrap_or_else(|| info.nar_hash.clone());
    if file_hash.algo != nip_core::hash::HashAlgo::Sha256 {
        return Err("FileHash is not sha256".into());
    }
    let source = |base: &reqwest::Url, nar_url: &str| -> Result<NarSource, String> {
        let url = base
            .join(nar_url)
            .map_err(|e| format!("bad NAR URL {nar_url:?}: {e}"))?;
        Ok(NarSource {
            url: url.to_string(),
            upstream: base.to_string(),
        })
    };
    let mut sources = vec![source(&upstream.url, &info.url)?];
    for (alt, alt_info) in &alternates {
        if let Ok(s) = source(&alt.url, &alt_info.url) {
            sources.push(s);
        }
    }
    info.url = format!("nar/{file}");
    info.file_hash = Some(file_hash.clone());
    info.file_size = Some(file_size);
    if state.config.sign_narinfo {
        info.sign(&state.signer);
    }
    let record = NarInfoRecord {
        hash: info.store_path.hash().as_str().to_string(),
        store_path: info.store_path.full(),
        nar_file: file.file_name(),
        file_size: Some(file_size as i64),
        file_hash: Some(file_hash.to_string()),
        nar_hash: info.nar_hash.to_string(),
        narinfo: info.to_text(),
        origin: upstream.name().to_string(),
    };
    Ok((record, sources))
}
