//! Narinfo lookups beyond the index: one coalesced upstream fetch per hash however many requests
//! ask at once, absences remembered for `--cache-negative-ttl`; a fetched narinfo is rewritten to
//! point at this cache's `/nar/`, signed and stored (never replacing a stored one).
use std::sync::Arc;

use futures::FutureExt;
use nip_core::hash::NixHash;
use nip_core::nar_file::{Compression, NarFileName};
use nip_core::narinfo::NarInfo;
use nip_core::store_path::StorePathHash;
use nip_store::{NarInfoRecord, NarSource, PutNarInfo};

use crate::cache::CacheError;
use crate::coalesce::Role;
use crate::stats::Kind;
use crate::upstream::{Found, Lookup};
use crate::AppState;

/// What asking the upstreams for a narinfo the index lacked came to.
#[derive(Clone, Debug)]
pub enum Fetched {
    /// In the index now (fetched, or stored meanwhile): the narinfo as served.
    Stored(Arc<str>),
    /// No upstream that answered has a trusted narinfo. `unknown` names the upstreams that
    /// were skipped or did not answer: empty when the absence is certain.
    Missing { unknown: Arc<[String]> },
    /// An upstream has a trusted narinfo this cache cannot serve (e.g. an xz NAR without
    /// FileHash, which it cannot check): absent for readers, but an upload must still match it.
    Unservable {
        upstream: String,
        info: Arc<NarInfo>,
    },
    /// The index failed.
    Failed(Arc<str>),
}

/// The narinfo for `hash` as served: from memory, the index, or (with `ask_upstreams`) fetched
/// from the upstreams. `None` when absent. Counts hits, misses and coalesced misses.
pub async fn get(
    state: &AppState,
    hash: &StorePathHash,
    ask_upstreams: bool,
) -> Result<Option<Arc<str>>, CacheError> {
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
        return Ok(Some(text));
    }
    if !ask_upstreams {
        return Ok(None);
    }
    state.stats.miss(Kind::Narinfo);
    if state.is_known_missing(hash.as_str(), false) {
        tracing::debug!("narinfo negative-cache hit");
        return Ok(None);
    }
    let (outcome, role) = fetch(state, hash).await;
    tracing::debug!(coalesced = (role == Role::Joined), "narinfo miss");
    if role == Role::Joined {
        state.stats.coalesced(Kind::Narinfo);
    }
    match outcome {
        Fetched::Stored(text) => Ok(Some(text)),
        Fetched::Missing { .. } | Fetched::Unservable { .. } => Ok(None),
        Fetched::Failed(e) => Err(CacheError::Unavailable(e.to_string())),
    }
}

/// Asks the upstreams for `hash` (coalesced with every other request for it) and stores what a
/// trusted upstream has. Callers check the index and the negative cache first.
pub async fn fetch(state: &AppState, hash: &StorePathHash) -> (Fetched, Role) {
    let st = state.clone();
    let h = hash.clone();
    state
        .narinfo_lookups
        .run(
            hash.as_str().to_string(),
            move || fetch_and_store(st, h).boxed(),
            Fetched::Failed(Arc::from("lookup panicked")),
        )
        .await
}

async fn fetch_and_store(state: AppState, hash: StorePathHash) -> Fetched {
    // A request that missed just before an earlier fetch of this hash stored it and ended would
    // fetch it a second time: that fetch left the narinfo in memory. (Another instance's fetch
    // is found by the lease below.)
    if let Some(text) = state.hot_narinfos.get(hash.as_str()) {
        return Fetched::Stored(text);
    }
    // One upstream lookup across the instances sharing the database.
    let stored = || async { matches!(state.meta.get_narinfo(hash.as_str()).await, Ok(Some(_))) };
    let _lease =
        match super::cluster::lead_or_wait(&state, &format!("narinfo:{hash}"), stored).await {
            super::cluster::Turn::Lead(lease) => lease,
            super::cluster::Turn::Stored => {
                return match state.meta.get_narinfo(hash.as_str()).await {
                    Ok(Some(rec)) => Fetched::Stored(Arc::from(rec.narinfo)),
                    Ok(None) => {
                        Fetched::Failed(Arc::from("narinfo vanished right after it was stored"))
                    }
                    Err(e) => Fetched::Failed(Arc::from(e.to_string())),
                };
            }
        };
    let found = match state.upstreams.lookup(&hash).await {
        Lookup::Found(found) => *found,
        Lookup::Missing { unknown } => {
            state.remember_missing(hash.as_str(), unknown.is_empty());
            return Fetched::Missing {
                unknown: unknown.into(),
            };
        }
        Lookup::Failed { unknown } => {
            return Fetched::Missing {
                unknown: unknown.into(),
            }
        }
    };
    let upstream = found.upstream.name().to_string();
    let info = Arc::new(found.info.clone());
    let (record, sources) = match rewrite(&state, found) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(%hash, %why, "upstream narinfo cannot be served");
            // Absent for readers; not certain for uploads, which must still compare with it.
            state.remember_missing(hash.as_str(), false);
            return Fetched::Unservable { upstream, info };
        }
    };
    let seen = state.hot_narinfos.generation();
    let stored = match state.meta.put_narinfo(&record, &sources).await {
        Ok(PutNarInfo::Inserted) => {
            state
                .stats
                .activity("narinfo-fetch", record.store_path.clone());
            super::prefetch::after_fetch(&state, &record, sources);
            Arc::<str>::from(record.narinfo)
        }
        // Stored meanwhile (an upload, or another instance's fetch): that one stands.
        Ok(PutNarInfo::Exists(existing)) => Arc::from(existing.narinfo),
        Err(e) => return Fetched::Failed(Arc::from(e.to_string())),
    };
    state
        .hot_narinfos
        .insert(hash.as_str(), stored.clone(), seen);
    Fetched::Stored(stored)
}

/// The NAR file name this cache serves a narinfo's NAR under, with the file's SHA-256 and size
/// when known: `<filehash>.nar<ext>`. Without a FileHash (Attic, niks3, nix-serve) it is
/// `<narhash>.nar<ext>`, and the fill checks the bytes by decompressing them against NarHash
/// and NarSize (the signed part of the narinfo) instead.
fn nar_file_name(info: &NarInfo) -> Result<(NarFileName, Option<NixHash>, Option<u64>), String> {
    let compression = info
        .compression_kind()
        .ok_or_else(|| format!("unknown compression {:?}", info.compression))?;
    match &info.file_hash {
        Some(h) => Ok((NarFileName::new(h, compression), Some(h.clone()), info.file_size)),
        // An uncompressed NAR's file is the NAR itself.
        None if compression == Compression::None => Ok((
            NarFileName::new(&info.nar_hash, compression),
            Some(info.nar_hash.clone()),
            Some(info.nar_size),
        )),
        None if crate::cache::fill::can_check_nar_hash(compression) => {
            Ok((NarFileName::new(&info.nar_hash, compression), None, None))
        }
        None => Err(format!(
            "narinfo has no FileHash for a {} NAR, and this cache can check only zstd, xz and bzip2 NARs by their NarHash",
            compression.narinfo_name()
        )),
    }
}

fn rewrite(state: &AppState, found: Found) -> Result<(NarInfoRecord, Vec<NarSource>), String> {
    let Found {
        mut info,
        upstream,
        alternates,
        key,
    } = found;
    let (file, file_hash, file_size) = nar_file_name(&info)?;
    let sha256 = |h: &NixHash| h.algo == nip_core::hash::HashAlgo::Sha256;
    if !file_hash.as_ref().map_or(sha256(&info.nar_hash), sha256) {
        return Err("FileHash (or NarHash, without one) is not sha256".into());
    }
    // `upstream` is the upstream's name (credentials masked): what logs and errors show, and how
    // a fill finds the upstream again to track its health.
    let source = |up: &crate::upstream::Upstream, nar_url: &str| -> Result<NarSource, String> {
        let url = up
            .url
            .join(nar_url)
            .map_err(|e| format!("bad NAR URL {nar_url:?}: {e}"))?;
        Ok(NarSource {
            url: url.to_string(),
            upstream: up.name().to_string(),
        })
    };
    let mut sources = vec![source(&upstream, &info.url)?];
    for (alt, alt_info) in &alternates {
        if let Ok(s) = source(alt, &alt_info.url) {
            sources.push(s);
        }
    }
    info.url = format!("nar/{file}");
    // Without a FileHash the narinfo is served without both, as Nix accepts (only StorePath,
    // URL, NarHash and NarSize are required); the fill checks NarHash and NarSize.
    info.file_hash = file_hash.clone();
    info.file_size = file_size.filter(|_| file_hash.is_some());
    if state.config.sign_narinfo {
        info.sign(&state.signer);
    }
    let record = NarInfoRecord {
        hash: info.store_path.hash().as_str().to_string(),
        store_path: info.store_path.full(),
        nar_file: file.file_name(),
        file_size: info.file_size.map(|n| n as i64),
        file_hash: file_hash.map(|h| h.to_string()),
        nar_hash: info.nar_hash.to_string(),
        narinfo: info.to_text(),
        origin: upstream.name().to_string(),
        // None: an unsigned narinfo of a `?trusted=1` upstream, vouched for by nobody but the
        // operator's choice of that upstream (its origin says which).
        signed_by: key,
        uploaded_by: None,
    };
    Ok((record, sources))
}
