//! The rest of the Nix binary cache protocol in the store: NAR listings (`<hash>.ls`), build logs
//! (`log/<drv>`), realisations (`realisations/<id>.doi`) and debug info (`debuginfo/<build-id>`).
//! Bytes are kept as sent (compressed or not, `Content-Encoding` recorded), published before
//! their row, counted in the size budget and evicted least recently used first. A stored file is
//! never replaced. On a miss they are fetched from the upstreams that have them; a listing no
//! upstream has is made from the stored NAR ([`crate::cache::listing`]).
use futures::StreamExt;
use nip_store::{ExtraKind, ExtraRecord, PutExtra, StagedFile};

use crate::cache::CacheError;
use crate::AppState;

/// Largest listing or build log stored (logs of big builds run to tens of MiB uncompressed).
pub const MAX_LARGE: u64 = 64 * 1024 * 1024;
/// Largest realisation or debug info file: small JSON documents.
pub const MAX_SMALL: u64 = 1024 * 1024;

/// The size limit of a kind, never above the server's upload limit.
pub fn max_size(state: &AppState, kind: ExtraKind) -> u64 {
    let cap = match kind {
        ExtraKind::Listing | ExtraKind::Log => MAX_LARGE,
        ExtraKind::Realisation | ExtraKind::DebugInfo | ExtraKind::BuildTrace => MAX_SMALL,
    };
    cap.min(state.config.max_upload_size)
}

/// The Content-Type a kind is served with (Nix's own choice when it uploads them).
pub fn content_type(kind: ExtraKind) -> &'static str {
    match kind {
        ExtraKind::Log => "text/plain; charset=utf-8",
        ExtraKind::Listing
        | ExtraKind::Realisation
        | ExtraKind::DebugInfo
        | ExtraKind::BuildTrace => "application/json",
    }
}

/// Where a binary cache keeps a file, relative to its root (Nix 2.8 writes debug info as
/// `debuginfo/<build id>.debug`, other writers without the suffix).
pub fn cache_paths(kind: ExtraKind, name: &str) -> Vec<String> {
    match kind {
        ExtraKind::Listing => vec![format!("{name}.ls")],
        ExtraKind::Log => vec![format!("log/{name}")],
        ExtraKind::Realisation => vec![format!("realisations/{name}.doi")],
        ExtraKind::DebugInfo => vec![
            format!("debuginfo/{name}"),
            format!("debuginfo/{name}.debug"),
        ],
        ExtraKind::BuildTrace => vec![
            format!("build-trace-v2/{name}.doi"),
            format!("build-trace-v2/{name}"),
        ],
    }
}

/// The encodings a stored file may carry: what Nix and Hydra compress these files with.
pub fn valid_encoding(e: &str) -> bool {
    matches!(e, "xz" | "br" | "zstd" | "gzip" | "bzip2")
}

/// Publishes a staged file whose size and SHA-256 `rec` records, then its row: bytes first,
/// fsynced and renamed into place. A file already stored under the name is kept and returned.
pub async fn publish(
    state: &AppState,
    staged: &StagedFile,
    rec: &ExtraRecord,
) -> Result<PutExtra, CacheError> {
    if let Some(existing) = state.meta.get_extra(rec.kind, &rec.name).await? {
        return Ok(PutExtra::Exists(Box::new(existing)));
    }
    staged.sync().await?;
    let key = rec.blob_key()?;
    state.blobs.put_file(&key, staged.path()).await?;
    let put = state.meta.put_extra(rec).await?;
    match &put {
        PutExtra::Inserted => {
            state.budget.stored(rec.size as u64);
            count(rec.kind, "stored");
        }
        // Another upload won the race: its bytes stay, ours go (they have another key unless
        // they are the same bytes).
        PutExtra::Exists(e) if e.sha256 != rec.sha256 => state.blobs.delete(&key).await?,
        PutExtra::Exists(_) => {}
    }
    Ok(put)
}

/// Counts an event of a kind for `/metrics` (`nip_nix_extras_total{kind, event}`).
pub fn count(kind: ExtraKind, event: &'static str) {
    metrics::counter!("nip_nix_extras_total", "kind" => kind.as_str(), "event" => event)
        .increment(1);
}

/// The stored file, or (with `ask_upstreams`) one fetched from the first upstream that has it.
pub async fn lookup(
    state: &AppState,
    kind: ExtraKind,
    name: &str,
    ask_upstreams: bool,
) -> Result<Option<ExtraRecord>, CacheError> {
    if let Some(rec) = state.meta.get_extra(kind, name).await? {
        count(kind, "hit");
        let now = nip_store::unix_now();
        // Access times only steer eviction: written at most once a minute per file, off the
        // request's path.
        if rec.last_accessed_at < now - 60 {
            let (meta, name) = (state.meta.clone(), name.to_string());
            tokio::spawn(async move {
                if let Err(e) = meta.touch_extra(kind, &name, now).await {
                    tracing::debug!(error = %e, "cannot record an access time");
                }
            });
        }
        return Ok(Some(rec));
    }
    if !ask_upstreams {
        return Ok(None);
    }
    count(kind, "miss");
    // An absence is remembered for `--cache-negative-ttl`, as a narinfo's is: tools that probe
    // many names (debug info by build id, listings) would otherwise ask the upstreams each time.
    let missing = format!("{}:{name}", kind.as_str());
    if !state.is_known_missing(&missing, false) {
        match fetch(state, kind, name).await? {
            Fetched::Found(rec) => return Ok(Some(rec)),
            Fetched::Absent { certain } => state.remember_missing(&missing, certain),
            Fetched::NoAnswer => {}
        }
    }
    // No upstream has a listing: made from the stored NAR when it is here.
    match (kind, nip_core::store_path::StorePathHash::parse(name)) {
        (ExtraKind::Listing, Ok(hash)) => crate::cache::listing::generate(state, &hash).await,
        _ => Ok(None),
    }
}

/// What asking the upstreams for a file came to.
enum Fetched {
    Found(ExtraRecord),
    /// An upstream said it lacks the file; `certain` when every upstream was asked and did.
    Absent {
        certain: bool,
    },
    /// No upstream could tell (all down, error pages, timeouts).
    NoAnswer,
}

/// Asks the healthy upstreams, best priority first, for the file; stores the first copy found
/// (a realisation only once [`crate::cache::realisation`] accepted its signatures).
async fn fetch(state: &AppState, kind: ExtraKind, name: &str) -> Result<Fetched, CacheError> {
    let all = state.upstreams.list();
    let mut upstreams: Vec<_> = all.iter().filter(|u| u.is_healthy()).cloned().collect();
    upstreams.sort_by_key(|u| u.priority());
    let (mut absent, mut certain) = (false, upstreams.len() == all.len());
    for u in upstreams {
        for path in cache_paths(kind, name) {
            let Ok(url) = u.url.join(&path) else {
                continue;
            };
            match fetch_one(state, kind, name, &u, url).await {
                Ok(Some(rec)) => {
                    count(kind, "fetched");
                    return Ok(Fetched::Found(rec));
                }
                Ok(None) => absent = true,
                Err(why) => {
                    certain = false;
                    tracing::debug!(upstream = %u.name(), kind = kind.as_str(), %why, "cannot fetch from upstream");
                }
            }
        }
    }
    Ok(match absent {
        true => Fetched::Absent { certain },
        false => Fetched::NoAnswer,
    })
}

/// Asks every upstream, healthy or not, whether it has the file, for an upload that must not
/// shadow an upstream's copy: the first copy found is stored (and the upload is judged against
/// it); `Err(names)` lists the upstreams that could not tell (down, an error page, a timeout).
pub async fn ask_every_upstream(
    state: &AppState,
    kind: ExtraKind,
    name: &str,
) -> Result<(), Vec<String>> {
    let mut upstreams: Vec<_> = state.upstreams.list().to_vec();
    upstreams.sort_by_key(|u| u.priority());
    let mut unknown = Vec::new();
    for u in upstreams {
        let mut certain = true;
        for path in cache_paths(kind, name) {
            let Ok(url) = u.url.join(&path) else {
                continue;
            };
            match fetch_one(state, kind, name, &u, url).await {
                Ok(Some(_)) => {
                    count(kind, "fetched");
                    return Ok(());
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::debug!(upstream = %u.name(), kind = kind.as_str(), %why, "upstream cannot tell whether it has this file");
                    certain = false;
                }
            }
        }
        if !certain {
            unknown.push(u.name().to_string());
        }
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(unknown)
    }
}

/// One upstream's copy, stored; `None` when it has none (404/410). Errors are the upstream's
/// (as text): it could not tell.
async fn fetch_one(
    state: &AppState,
    kind: ExtraKind,
    name: &str,
    upstream: &crate::upstream::Upstream,
    url: reqwest::Url,
) -> Result<Option<ExtraRecord>, String> {
    let resp = state.upstreams.get(url).await.map_err(|e| e.to_string())?;
    match resp.status() {
        reqwest::StatusCode::OK => {}
        // A certain "not here".
        reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::GONE => return Ok(None),
        other => return Err(format!("HTTP {other}")),
    }
    let encoding = resp
        .headers()
        .get(reqwest::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty() && v != "identity");
    if encoding.as_deref().is_some_and(|e| !valid_encoding(e)) {
        return Err(format!("unknown Content-Encoding {encoding:?}"));
    }
    let max = max_size(state, kind);
    let staged = state.staging.create().await.map_err(|e| e.to_string())?;
    let mut writer = nip_store::BatchedWriter::new(&staged);
    let mut body = Box::pin(state.upstreams.body_stream(resp));
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if writer.received() + chunk.len() as u64 > max {
            return Err(format!("larger than {max} bytes"));
        }
        writer.push(chunk).await.map_err(|e| e.to_string())?;
    }
    let (size, digest) = writer.finish().await.map_err(|e| e.to_string())?;
    let mut rec = ExtraRecord {
        kind,
        name: name.to_string(),
        size: size as i64,
        sha256: hex::encode(digest),
        content_type: content_type(kind).to_string(),
        content_encoding: encoding,
        origin: upstream.name().to_string(),
        uploaded_by: None,
        last_accessed_at: 0,
    };
    if matches!(kind, ExtraKind::Realisation | ExtraKind::BuildTrace) {
        if rec.content_encoding.is_some() {
            return Err("compressed realisations cannot be checked".into());
        }
        let bytes = tokio::fs::read(staged.path())
            .await
            .map_err(|e| e.to_string())?;
        let checked = crate::cache::realisation::accept_fetched(
            state,
            kind,
            name,
            &bytes,
            upstream.trusted(),
        )?;
        crate::cache::realisation::rewrite(&staged, &mut rec, &checked)
            .await
            .map_err(|e| e.to_string())?;
    }
    match publish(state, &staged, &rec)
        .await
        .map_err(|e| e.to_string())?
    {
        PutExtra::Inserted => Ok(Some(rec)),
        PutExtra::Exists(e) => Ok(Some(*e)),
    }
}
