//! Filling the cache with a NAR from upstream while streaming it to every client that asks.
//!
//! One fill per NAR file runs in its own task: it downloads into a staged temp file, hashing as it
//! goes; clients (the first and any that join later) read the temp file up to the length written
//! so far, so a late joiner still gets the whole body. Only after size and hash check out is the
//! file fsynced, published and recorded. On any failure nothing is cached and every client's
//! stream ends in an error, so no client sees a complete-looking body with bad bytes.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use nip_store::staging::read_at;
use nip_store::{BlobKey, NarRecord, NarSource, StagedFile};
use tokio::sync::watch;
use tracing::Instrument;

use crate::AppState;

/// Chunk size for client reads of a file being filled.
const READ_CHUNK: usize = 256 * 1024;
/// How long a source that failed to deliver a NAR is tried last for that NAR.
const FAILED_SOURCE_TTL: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub enum FillState {
    Running { written: u64 },
    Done { written: u64 },
    Failed(Arc<str>),
}

/// What must be fetched and what it must look like.
#[derive(Clone, Debug)]
pub struct FillSpec {
    pub nar_file: String,
    pub sources: Vec<NarSource>,
    pub file_size: Option<u64>,
    /// Expected SHA-256 of the file's bytes.
    pub sha256: [u8; 32],
}

/// Why a fill stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("no upstream is known to have this NAR")]
    NoSource,
    /// The last source tried failed (or clients already had bytes from it).
    #[error("{upstream}: {message}")]
    Download { upstream: String, message: String },
    #[error("cannot store the NAR: {0}")]
    Store(#[from] crate::cache::CacheError),
}

pub struct Fill {
    file: Arc<std::fs::File>,
    state: watch::Receiver<FillState>,
    /// The announced size: the last byte is held back until the hash is checked, so a client
    /// can never hold a complete-looking body whose bytes turn out wrong.
    expected_size: Option<u64>,
}

/// Whether a request started a fill or joined one under way (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillRole {
    Started,
    Joined,
}

pub struct Fills {
    inflight: tokio::sync::Mutex<HashMap<String, Arc<Fill>>>,
    failed_sources: Mutex<HashMap<(String, String), Instant>>,
    started: std::sync::atomic::AtomicU64,
}

impl Default for Fills {
    fn default() -> Self {
        Fills {
            inflight: tokio::sync::Mutex::new(HashMap::new()),
            failed_sources: Mutex::new(HashMap::new()),
            started: Default::default(),
        }
    }
}

impl Fills {
    /// Fills started since the server started (each is one upstream download).
    pub fn started_count(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Joins the fill of `spec.nar_file` or starts one. `None` when the NAR got stored in the
    /// meantime: the caller serves it from storage.
    pub async fn join_or_start(
        self: &Arc<Self>,
        ctx: &AppState,
        spec: FillSpec,
    ) -> Result<Option<(Arc<Fill>, FillRole)>, nip_store::StoreError> {
        let mut map = self.inflight.lock().await;
        if let Some(fill) = map.get(&spec.nar_file) {
            return Ok(Some((fill.clone(), FillRole::Joined)));
        }
        // Re-checked under the lock: a fill may have finished since the caller looked.
        if ctx
            .blobs
            .stat(&BlobKey::nar(&spec.nar_file)?)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        let staged = ctx.staging.create().await?;
        let (tx, rx) = watch::channel(FillState::Running { written: 0 });
        let fill = Arc::new(Fill {
            file: staged.file.clone(),
            state: rx,
            expected_size: spec.file_size,
        });
        map.insert(spec.nar_file.clone(), fill.clone());
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (fills, ctx) = (self.clone(), ctx.clone());
        // The download outlives the request that started it; its span stays a child of it.
        let span = tracing::info_span!("NAR fill", nar_file = %spec.nar_file);
        tokio::spawn(async move {
            let nar_file = spec.nar_file.clone();
            let started = Instant::now();
            let result = fills.run(&ctx, spec, staged, &tx).await;
            let state = match result {
                Ok(written) => {
                    tracing::debug!(%nar_file, bytes = written, ms = started.elapsed().as_millis() as u64, "NAR cached");
                    FillState::Done { written }
                }
                Err(why) => {
                    tracing::warn!(%nar_file, %why, "NAR fill failed; nothing cached");
                    FillState::Failed(why.to_string().into())
                }
            };
            let _ = tx.send(state);
            fills.inflight.lock().await.remove(&nar_file);
        }.instrument(span));
        Ok(Some((fill, FillRole::Started)))
    }

    /// Sources in order, those that recently failed for this NAR last.
    fn order_sources(&self, nar_file: &str, sources: Vec<NarSource>) -> Vec<NarSource> {
        let mut bad = self
            .failed_sources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        bad.retain(|_, t| t.elapsed() < FAILED_SOURCE_TTL);
        let (mut good, rest): (Vec<_>, Vec<_>) = sources
            .into_iter()
            .partition(|s| !bad.contains_key(&(nar_file.to_string(), s.url.clone())));
        good.extend(rest);
        good
    }

    fn mark_failed(&self, nar_file: &str, url: &str) {
        self.failed_sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((nar_file.to_string(), url.to_string()), Instant::now());
    }

    async fn run(
        &self,
        ctx: &AppState,
        spec: FillSpec,
        staged: StagedFile,
        tx: &watch::Sender<FillState>,
    ) -> Result<u64, FillError> {
        let sources = self.order_sources(&spec.nar_file, spec.sources.clone());
        let mut last_error = FillError::NoSource;
        for src in &sources {
            let upstream = ctx
                .upstreams
                .list()
                .iter()
                .find(|u| u.name() == src.upstream)
                .cloned();
            let started = Instant::now();
            // The upstream's base URL only: a NAR URL's query string may carry a token.
            let span = tracing::info_span!("upstream NAR",
                upstream = %crate::config::redact_userinfo(&src.upstream),
                bytes = tracing::field::Empty,
                otel.kind = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            if crate::metrics::otel_spans() {
                span.record("otel.kind", "client");
            }
            let result = self
                .download(ctx, &spec, src, &staged, tx)
                .instrument(span.clone())
                .await;
            match &result {
                Ok(n) => span.record("bytes", i64::try_from(*n).unwrap_or(i64::MAX)),
                Err(_) => span.record("otel.status_code", "ERROR"),
            };
            let outcome = if result.is_ok() { "ok" } else { "error" };
            crate::upstream::record_upstream(&src.upstream, "nar", outcome, started);
            if let Ok(n) = &result {
                metrics::counter!("nip_upstream_bytes_total").increment(*n);
            }
            match result {
                Ok(written) => {
                    if let Some(u) = &upstream {
                        u.record_success();
                    }
                    let rec = NarRecord {
                        nar_file: spec.nar_file.clone(),
                        size: written as i64,
                        sha256: hex::encode(spec.sha256),
                    };
                    crate::cache::nar::publish(ctx, &staged, &rec).await?;
                    return Ok(written);
                }
                Err(DownloadError {
                    message,
                    bytes_sent,
                }) => {
                    tracing::warn!(url = %nip_core::redact::url_for_log(&src.url), error = %message, "NAR download failed");
                    if let Some(u) = &upstream {
                        u.record_failure(&message);
                    }
                    self.mark_failed(&spec.nar_file, &src.url);
                    last_error = FillError::Download {
                        upstream: src.upstream.clone(),
                        message,
                    };
                    // Clients already got bytes from this source: they cannot be switched over.
                    if bytes_sent {
                        return Err(last_error);
                    }
                }
            }
        }
        Err(last_error)
    }

    async fn download(
        &self,
        ctx: &AppState,
        spec: &FillSpec,
        src: &NarSource,
        staged: &StagedFile,
        tx: &watch::Sender<FillState>,
    ) -> Result<u64, DownloadError> {
        let fail = |message: String, bytes_sent: bool| DownloadError {
            message,
            bytes_sent,
        };
        let url =
            reqwest::Url::parse(&src.url).map_err(|e| fail(format!("bad URL: {e}"), false))?;
        let resp = ctx
            .upstreams
            .get(url)
            .await
            .map_err(|e| fail(e.to_string(), false))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status()), false));
        }
        let mut body = Box::pin(ctx.upstreams.body_stream(resp));
        let mut writer = nip_store::BatchedWriter::new(staged);
        // Whether readers of the staged file (clients) may have been given bytes of this attempt.
        let mut sent = false;
        let received = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                if spec
                    .file_size
                    .is_some_and(|n| writer.received() + chunk.len() as u64 > n)
                {
                    return Err("upstream sent more bytes than FileSize".to_string());
                }
                if let Some(on_disk) = writer.push(chunk).await.map_err(|e| e.to_string())? {
                    sent = true;
                    let _ = tx.send(FillState::Running { written: on_disk });
                }
            }
            writer.finish().await.map_err(|e| e.to_string())
        }
        .await;
        // Checked before readers learn the final length, so a bad source whose bytes nobody saw
        // yet can still be replaced by the next one.
        let checked = received.and_then(|(written, digest)| match spec.file_size {
            Some(n) if written != n => Err(format!("got {written} bytes, FileSize says {n}")),
            _ if digest != spec.sha256 => {
                Err("bytes do not match the narinfo's FileHash".to_string())
            }
            _ => Ok(written),
        });
        match checked {
            Ok(written) => {
                let _ = tx.send(FillState::Running { written });
                Ok(written)
            }
            Err(message) => {
                // Nobody saw these bytes: empty the file so the next source starts clean. If
                // that fails, the fill cannot go on with another source.
                let clean = !sent && writer.discard().await.is_ok();
                Err(fail(message, !clean))
            }
        }
    }
}

struct DownloadError {
    message: String,
    /// Whether clients may have been given bytes of this attempt (or the staged file could not
    /// be emptied): then no other source may take over.
    bytes_sent: bool,
}

impl Fill {
    /// The file's bytes from the start, as they arrive. Ends with an error if the fill fails.
    pub fn stream(self: Arc<Self>) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let rx = self.state.clone();
        futures::stream::unfold(
            (self, rx, 0u64, false),
            |(fill, mut rx, offset, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let state = rx.borrow_and_update().clone();
                    let available = match &state {
                        FillState::Running { written } => match fill.expected_size {
                            Some(n) => (*written).min(n.saturating_sub(1)),
                            None => *written,
                        },
                        FillState::Done { written } => *written,
                        FillState::Failed(_) => offset,
                    };
                    if offset < available {
                        let len = ((available - offset) as usize).min(READ_CHUNK);
                        return match read_at(fill.file.clone(), offset, len).await {
                            Ok(b) if !b.is_empty() => {
                                let next = offset + b.len() as u64;
                                Some((Ok(b), (fill, rx, next, false)))
                            }
                            Ok(_) => Some((
                                Err(std::io::Error::other("staged file shorter than written")),
                                (fill, rx, offset, true),
                            )),
                            Err(e) => Some((Err(e), (fill, rx, offset, true))),
                        };
                    }
                    match state {
                        FillState::Done { .. } => return None,
                        FillState::Failed(why) => {
                            return Some((
                                Err(std::io::Error::other(format!(
                                    "upstream fetch failed: {why}"
                                ))),
                                (fill, rx, offset, true),
                            ));
                        }
                        FillState::Running { .. } => {
                            if rx.changed().await.is_err() {
                                return Some((
                                    Err(std::io::Error::other("fill ended unexpectedly")),
                                    (fill, rx, offset, true),
                                ));
                            }
                        }
                    }
                }
            },
        )
    }
}
