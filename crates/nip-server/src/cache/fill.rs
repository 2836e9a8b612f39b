//! Filling the cache with a NAR from upstream while streaming it to every client that asks.
//!
//! One fill per NAR file runs in its own task: it downloads into a staged temp file, hashing as it
//! goes; clients (the first and any that join later) get the bytes received so far from a window
//! of recent chunks in memory, or from the temp file once they fell behind it, so a late joiner
//! still gets the whole body. A small NAR is received whole into memory and reaches the disk
//! after its clients have it. Only after size and hash check out do clients get the last byte,
//! and is the file fsynced, published and recorded (clients do not wait for that). On a failure before the check nothing is cached and every client's stream
//! ends in an error, so no client sees a complete-looking body with bad bytes.
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_compression::tokio::write::{BzDecoder, XzDecoder, ZstdDecoder};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use nip_core::hash::NixHash;
use nip_core::nar_file::{Compression, NarFileName};
use nip_core::narinfo::NarInfo;
use nip_store::staging::read_at;
use nip_store::{NarInfoRecord, NarRecord, NarSource, StagedFile};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::Instrument;

use crate::cache::nar;
use crate::AppState;

/// Most bytes a client reads of a file being filled at once: each read is one trip to the
/// blocking pool, and at 1 MiB rather than 256 KiB a cold miss costs a tenth less CPU and
/// streams 15–20% faster (P8).
const READ_CHUNK: usize = 1024 * 1024;
/// A NAR up to this size is received into memory, checked and handed to its clients from there,
/// and only then written to a staged file: a small miss (most of a closure) waits for no file
/// creation, write or read-back.
const IN_MEMORY_MAX: usize = 256 * 1024;
/// Received chunks kept in memory beyond those not yet on disk: clients keeping up with the
/// download take them from there, and only one that falls behind reads the staged file.
const WINDOW_MAX: usize = 1024 * 1024;
/// How many new bytes wake the clients of a fill (each wake-up is a trip through every client's
/// task).
const ANNOUNCE_EVERY: u64 = 64 * 1024;
/// How long a source that failed to deliver a NAR is tried last for that NAR.
const FAILED_SOURCE_TTL: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub enum FillState {
    Running {
        /// Bytes received so far: in the window, or on disk if they left it.
        received: u64,
    },
    /// Every byte is in and checked; the file is being fsynced, published and recorded.
    /// Clients get the last byte now rather than after the fsync and the database commits (a
    /// small NAR's miss took twice as long). Should storing fail, clients keep the checked
    /// bytes they got.
    Verified {
        written: u64,
        /// The whole file, when it was small enough to be kept in memory (see [`IN_MEMORY_MAX`]).
        memory: Option<Bytes>,
    },
    Done {
        written: u64,
        memory: Option<Bytes>,
    },
    Failed(Arc<str>),
}

/// What must be fetched and what it must look like.
#[derive(Clone, Debug)]
pub struct FillSpec {
    pub nar_file: String,
    pub sources: Vec<NarSource>,
    pub file_size: Option<u64>,
    /// Without a FileSize: the most bytes a compressed NAR of its NarSize can take (any of Nix's
    /// compressions grows incompressible data by well under 1/64), so an upstream cannot fill
    /// the disk with an endless body.
    pub max_size: Option<u64>,
    pub expect: Expect,
}

/// How the fetched bytes are checked before anything is stored or the last byte is released.
#[derive(Clone, Debug)]
pub enum Expect {
    /// The SHA-256 of the file's bytes (FileHash).
    FileHash([u8; 32]),
    /// No FileHash (Attic, niks3, nix-serve): the decompressed bytes must hash to NarHash and
    /// count NarSize, the part of the narinfo its signature covers.
    NarHash {
        sha256: [u8; 32],
        size: u64,
        compression: Compression,
    },
}

/// Whether a NAR compressed this way can be checked against its NarHash while it streams.
pub fn can_check_nar_hash(compression: Compression) -> bool {
    matches!(
        compression,
        Compression::None | Compression::Zstd | Compression::Xz | Compression::Bzip2
    )
}

/// Most memory an xz stream may ask for to be decompressed: `xz -9` needs 65 MiB, and zstd's
/// own default limit is the same 128 MiB, so a hostile stream cannot claim gigabytes.
pub const XZ_MEM_LIMIT: u64 = 128 << 20;

impl FillSpec {
    /// What to fetch for a stored narinfo's NAR: checked by FileHash when it has one, else by
    /// NarHash and NarSize.
    pub fn for_narinfo(info: &NarInfoRecord, sources: Vec<NarSource>) -> Result<Self, String> {
        let digest = |h: &str| {
            NixHash::parse(h)
                .ok()
                .and_then(|h| <[u8; 32]>::try_from(h.digest.as_slice()).ok())
        };
        let nar_size = NarInfo::parse(&info.narinfo)
            .map_err(|e| e.to_string())?
            .nar_size;
        let expect =
            match &info.file_hash {
                Some(h) => Expect::FileHash(digest(h).ok_or_else(|| {
                    format!("narinfo for {} has no usable FileHash", info.nar_file)
                })?),
                None => {
                    let compression = NarFileName::parse(&info.nar_file)
                        .map_err(|e| e.to_string())?
                        .compression();
                    let size = nar_size;
                    let sha256 = digest(&info.nar_hash).ok_or_else(|| {
                        format!("narinfo for {} has no usable NarHash", info.nar_file)
                    })?;
                    if !can_check_nar_hash(compression) {
                        return Err(format!(
                            "{} has no FileHash and cannot be checked by its NarHash",
                            info.nar_file
                        ));
                    }
                    match compression {
                        Compression::None => Expect::FileHash(sha256),
                        _ => Expect::NarHash {
                            sha256,
                            size,
                            compression,
                        },
                    }
                }
            };
        Ok(FillSpec {
            nar_file: info.nar_file.clone(),
            sources,
            file_size: info.file_size.map(|n| n as u64),
            max_size: info
                .file_size
                .is_none()
                .then(|| nar_size + nar_size / 64 + (1 << 20)),
            expect,
        })
    }
}

/// Hashes and counts a decompressed NAR, refusing bytes past NarSize.
struct NarHasher {
    hasher: Sha256,
    len: u64,
    max: u64,
}

impl AsyncWrite for NarHasher {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.len += buf.len() as u64;
        if this.len > this.max {
            return Poll::Ready(Err(std::io::Error::other(
                "the NAR is longer than the narinfo's NarSize",
            )));
        }
        this.hasher.update(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Decompresses a NAR into a [`NarHasher`] as its compressed bytes arrive.
enum NarCheck {
    Zstd(ZstdDecoder<NarHasher>),
    Xz(XzDecoder<NarHasher>),
    Bzip2(BzDecoder<NarHasher>),
}

impl NarCheck {
    fn new(compression: Compression, size: u64) -> Option<Self> {
        let hasher = NarHasher {
            hasher: Sha256::new(),
            len: 0,
            max: size,
        };
        match compression {
            Compression::Zstd => Some(NarCheck::Zstd(ZstdDecoder::new(hasher))),
            Compression::Xz => Some(NarCheck::Xz(XzDecoder::with_mem_limit(
                hasher,
                XZ_MEM_LIMIT,
            ))),
            Compression::Bzip2 => Some(NarCheck::Bzip2(BzDecoder::new(hasher))),
            _ => None,
        }
    }

    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        match self {
            NarCheck::Zstd(d) => d.write_all(chunk).await,
            NarCheck::Xz(d) => d.write_all(chunk).await,
            NarCheck::Bzip2(d) => d.write_all(chunk).await,
        }
    }

    /// Ends the stream (an unfinished one is an error) and gives the NAR's length and SHA-256.
    async fn finish(self) -> std::io::Result<(u64, [u8; 32])> {
        let h = match self {
            NarCheck::Zstd(mut d) => {
                d.shutdown().await?;
                d.into_inner()
            }
            NarCheck::Xz(mut d) => {
                d.shutdown().await?;
                d.into_inner()
            }
            NarCheck::Bzip2(mut d) => {
                d.shutdown().await?;
                d.into_inner()
            }
        };
        Ok((h.len, h.hasher.finalize().into()))
    }
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
    /// Created once bytes go to disk: a small NAR's clients get it from memory before that.
    staged: tokio::sync::OnceCell<StagedFile>,
    window: Mutex<Window>,
    state: watch::Receiver<FillState>,
    /// The announced size: the last byte is held back until the hash is checked, so a client
    /// can never hold a complete-looking body whose bytes turn out wrong.
    expected_size: Option<u64>,
}

impl Fill {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once the fill has stored the NAR or failed.
    pub async fn finished(&self) {
        let mut state = self.state.clone();
        let _ = state
            .wait_for(|s| !matches!(s, FillState::Running { .. } | FillState::Verified { .. }))
            .await;
    }
}

/// The latest received chunks, in order: every chunk not yet on disk, and older ones up to
/// [`WINDOW_MAX`] bytes. Emptied once every byte is on disk and checked.
#[derive(Default)]
struct Window {
    chunks: std::collections::VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Window {
    fn push(&mut self, start: u64, chunk: Bytes) {
        self.bytes += chunk.len();
        self.chunks.push_back((start, chunk));
    }

    /// Lets go of the oldest chunks past the bound, of those already on disk.
    fn trim(&mut self, on_disk: u64) {
        while self.bytes > WINDOW_MAX {
            match self.chunks.front() {
                Some((start, c)) if start + c.len() as u64 <= on_disk => {
                    self.bytes -= c.len();
                    self.chunks.pop_front();
                }
                _ => break,
            }
        }
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
    }

    /// The bytes from `offset` up to `end` (at most one chunk's worth), or where to read them.
    fn read(&self, offset: u64, end: u64) -> WindowRead {
        let Some(first) = self.chunks.front().map(|(s, _)| *s) else {
            return WindowRead::OnDisk { before: None };
        };
        if offset < first {
            return WindowRead::OnDisk {
                before: Some(first),
            };
        }
        let i = self.chunks.partition_point(|(s, _)| *s <= offset) - 1;
        let (start, chunk) = &self.chunks[i];
        let from = (offset - start) as usize;
        let to = chunk.len().min((end - start) as usize);
        if from >= to {
            return WindowRead::Lost;
        }
        WindowRead::Here(chunk.slice(from..to))
    }
}

#[derive(Debug, PartialEq)]
enum WindowRead {
    Here(Bytes),
    /// Before the window (or with the window empty): on disk, up to `before` if given.
    OnDisk {
        before: Option<u64>,
    },
    /// Past the window's end: announced bytes it does not hold (never expected).
    Lost,
}

/// How long a fill's "stored" note outlives it: far longer than a request takes from its look
/// at the index to [`Fills::join_or_start`].
const STORED_NOTE_TTL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Inflight {
    running: HashMap<String, Arc<Fill>>,
    /// NARs fills here stored lately, noted as each leaves `running`.
    stored: HashMap<String, Instant>,
    /// Size of `stored` at which old notes are swept out (twice what stayed, at least 1024).
    sweep_at: usize,
}

impl Inflight {
    fn stored_lately(&self, nar_file: &str) -> bool {
        self.stored
            .get(nar_file)
            .is_some_and(|at| at.elapsed() < STORED_NOTE_TTL)
    }
}

struct LeaveMap {
    fills: Arc<Fills>,
    nar_file: String,
    /// Set once the fill stored the NAR.
    stored: bool,
}

impl Drop for LeaveMap {
    fn drop(&mut self) {
        let mut map = self.fills.inflight();
        map.running.remove(&self.nar_file);
        if self.stored {
            if map.stored.len() >= map.sweep_at {
                map.stored.retain(|_, at| at.elapsed() < STORED_NOTE_TTL);
                map.sweep_at = (2 * map.stored.len()).max(1024);
            }
            map.stored.insert(self.nar_file.clone(), Instant::now());
        }
    }
}

/// Whether a request started a fill or joined one under way (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillRole {
    Started,
    Joined,
}

pub struct Fills {
    /// Never held across an await.
    inflight: Mutex<Inflight>,
    failed_sources: Mutex<HashMap<(String, String), Instant>>,
    started: std::sync::atomic::AtomicU64,
}

impl Default for Fills {
    fn default() -> Self {
        Fills {
            inflight: Mutex::default(),
            failed_sources: Mutex::new(HashMap::new()),
            started: Default::default(),
        }
    }
}

impl Fills {
    /// Whether this instance is filling `nar_file` now (a request then joins it).
    pub fn is_running(&self, nar_file: &str) -> bool {
        self.inflight().running.contains_key(nar_file)
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the note that a fill here stored `nar_file` (its file turned out gone): the next
    /// [`Fills::join_or_start`] starts a fill. False when there was no such note.
    pub fn forget_stored(&self, nar_file: &str) -> bool {
        self.inflight().stored.remove(nar_file).is_some()
    }

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
        let mut map = self.inflight();
        if let Some(fill) = map.running.get(&spec.nar_file) {
            return Ok(Some((fill.clone(), FillRole::Joined)));
        }
        // A fill may have stored it since the caller looked at the index (a NAR another
        // instance stored is found by the caller's lease; an upload meanwhile costs a download).
        if map.stored_lately(&spec.nar_file) {
            return Ok(None);
        }
        let (tx, rx) = watch::channel(FillState::Running { received: 0 });
        let fill = Arc::new(Fill {
            staged: tokio::sync::OnceCell::new(),
            window: Mutex::default(),
            state: rx,
            expected_size: spec.file_size,
        });
        map.running.insert(spec.nar_file.clone(), fill.clone());
        drop(map);
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (fills, ctx, this) = (self.clone(), ctx.clone(), fill.clone());
        // The download outlives the request that started it; its span stays a child of it.
        let span = tracing::info_span!("NAR fill", nar_file = %spec.nar_file);
        tokio::spawn(async move {
            let nar_file = spec.nar_file.clone();
            // Out of the map when the task ends, even by a panic: else every later request for
            // this NAR would join a fill that is gone.
            let mut leave = LeaveMap {
                fills: fills.clone(),
                nar_file: nar_file.clone(),
                stored: false,
            };
            let started = Instant::now();
            let result = fills.run(&ctx, spec, &this, &tx).await;
            drop(this);
            let state = match result {
                Ok(written) => {
                    leave.stored = true;
                    tracing::debug!(%nar_file, bytes = written, ms = started.elapsed().as_millis() as u64, "NAR cached");
                    let memory = match &*tx.borrow() {
                        FillState::Verified { memory, .. } => memory.clone(),
                        _ => None,
                    };
                    FillState::Done { written, memory }
                }
                Err(why) => {
                    tracing::warn!(%nar_file, %why, "NAR fill failed; nothing cached");
                    FillState::Failed(why.to_string().into())
                }
            };
            // Clients that were told the bytes are checked read to the end; `finished` ends
            // when the sender is dropped.
            let verified = matches!(*tx.borrow(), FillState::Verified { .. });
            if !(verified && matches!(state, FillState::Failed(_))) {
                let _ = tx.send(state);
            }
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
        fill: &Fill,
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
                .download(ctx, &spec, src, fill, tx)
                .instrument(span.clone())
                .await;
            match &result {
                Ok((n, ..)) => span.record("bytes", i64::try_from(*n).unwrap_or(i64::MAX)),
                Err(_) => span.record("otel.status_code", "ERROR"),
            };
            let outcome = if result.is_ok() { "ok" } else { "error" };
            crate::upstream::record_upstream(&src.upstream, "nar", outcome, started);
            if let Ok((n, ..)) = &result {
                metrics::counter!("nip_upstream_bytes_total").increment(*n);
            }
            match result {
                Ok((written, sha256, kept)) => {
                    if let Some(u) = &upstream {
                        u.record_success();
                    }
                    let rec = NarRecord {
                        nar_file: spec.nar_file.clone(),
                        size: written as i64,
                        sha256: hex::encode(sha256),
                    };
                    let checked = match (kept, fill.staged.get()) {
                        (Some(bytes), _) => nar::Checked::Memory(bytes),
                        (None, Some(staged)) => nar::Checked::Staged(staged),
                        (None, None) => {
                            let e = std::io::Error::other("the checked bytes were not staged");
                            return Err(FillError::Store(nip_store::StoreError::Io(e).into()));
                        }
                    };
                    // A file named by its FileHash and checked against it cannot differ from
                    // one stored under that name meanwhile.
                    let named_by_content = match &spec.expect {
                        Expect::FileHash(sha) => NarFileName::parse(&spec.nar_file)
                            .is_ok_and(|n| n.hash() == nip_core::base32::encode(sha)),
                        Expect::NarHash { .. } => false,
                    };
                    let origin = nar::Origin::Fetched { named_by_content };
                    nar::publish(ctx, checked, &rec, origin).await?;
                    return Ok(written);
                }
                Err(DownloadError::Local(e)) => return Err(FillError::Store(e.into())),
                Err(DownloadError::Upstream {
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
        fill: &Fill,
        tx: &watch::Sender<FillState>,
    ) -> Result<(u64, [u8; 32], Option<Bytes>), DownloadError> {
        let fail = |message: String, bytes_sent: bool| DownloadError::Upstream {
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
        let nar_check = nar_check_for(spec).map_err(|m| fail(m, false))?;
        let body = Box::pin(ctx.upstreams.body_stream(resp));
        let mut rx = Receiving::new(spec, fill);
        // Checked before readers learn the final length, so a bad source whose bytes nobody saw
        // yet can still be replaced by the next one.
        let checked = rx
            .receive(ctx, body, nar_check, tx)
            .await
            .and_then(|got| check(spec, got));
        match checked {
            Ok(Received {
                written,
                digest,
                kept,
                ..
            }) => {
                let _ = tx.send(FillState::Verified {
                    written,
                    memory: kept.clone(),
                });
                // Every byte is on disk: clients read the rest from there. (Bytes kept in
                // memory are published from there; a staged file an earlier source's attempt
                // left, now empty, goes with the fill.)
                if kept.is_none() {
                    fill.window().clear();
                }
                Ok((written, digest, kept))
            }
            Err(Failure::Local(e)) => Err(DownloadError::Local(e)),
            Err(Failure::Upstream(message)) => {
                // Nobody saw these bytes: empty the file so the next source starts clean. If
                // that fails, the fill cannot go on with another source. (Bytes clients were
                // told of stay readable until the fill's error reaches them.)
                let clean = rx.announced == 0
                    && match rx.writer.as_mut() {
                        Some(w) => w.discard().await.is_ok(),
                        None => true,
                    };
                if clean {
                    fill.window().clear();
                }
                Err(fail(message, !clean))
            }
        }
    }
}

/// The decompressing check a NAR known only by its NarHash needs (`None` for a FileHash).
fn nar_check_for(spec: &FillSpec) -> Result<Option<NarCheck>, String> {
    match &spec.expect {
        Expect::NarHash {
            size, compression, ..
        } => NarCheck::new(*compression, *size).map(Some).ok_or_else(|| {
            let c = compression.narinfo_name();
            format!("cannot check a {c} NAR by its NarHash")
        }),
        Expect::FileHash(_) => Ok(None),
    }
}

/// What one download attempt received: the file's size and SHA-256, the decompressed NAR's size
/// and SHA-256 when it was checked by NarHash, and the bytes when they stayed in memory.
struct Received {
    written: u64,
    digest: [u8; 32],
    nar: Option<(u64, [u8; 32])>,
    kept: Option<Bytes>,
}

/// Whether the received file is the one the narinfo describes.
fn check(spec: &FillSpec, got: Received) -> Result<Received, Failure> {
    let bad = |m: String| Err(Failure::Upstream(m));
    if let Some(n) = spec.file_size.filter(|n| got.written != *n) {
        return bad(format!("got {} bytes, FileSize says {n}", got.written));
    }
    match (&spec.expect, got.nar) {
        (Expect::FileHash(sha), _) if got.digest != *sha => {
            bad("bytes do not match the narinfo's FileHash".to_string())
        }
        (Expect::NarHash { size, .. }, Some((len, _))) if len != *size => {
            bad(format!("the NAR has {len} bytes, NarSize says {size}"))
        }
        (Expect::NarHash { sha256, .. }, Some((_, nar_digest))) if nar_digest != *sha256 => {
            bad("the decompressed NAR does not match the narinfo's NarHash".to_string())
        }
        (Expect::NarHash { .. }, None) => bad("the NAR was not checked".to_string()),
        _ => Ok(got),
    }
}

/// One download attempt's bytes on their way: in memory while the file is small, else in the
/// staged file (and the fill's window for its clients).
struct Receiving<'a> {
    spec: &'a FillSpec,
    fill: &'a Fill,
    writer: Option<nip_store::BatchedWriter<'a>>,
    /// A small file stays in memory until it is checked (None once it turns out too big).
    memory: Option<bytes::BytesMut>,
    received: u64,
    /// What clients were last told they may read: once above 0, they may have bytes of this
    /// attempt, and no other source may take over.
    announced: u64,
}

impl<'a> Receiving<'a> {
    fn new(spec: &'a FillSpec, fill: &'a Fill) -> Self {
        let memory = spec
            .file_size
            .is_none_or(|n| n <= IN_MEMORY_MAX as u64)
            .then(|| bytes::BytesMut::with_capacity(spec.file_size.unwrap_or(0) as usize));
        Receiving {
            spec,
            fill,
            writer: None,
            memory,
            received: 0,
            announced: 0,
        }
    }

    /// Reads the body to its end: bounded by FileSize (or what NarSize allows), decompressed
    /// into `nar_check` as it comes, kept or written, clients told every [`ANNOUNCE_EVERY`].
    async fn receive(
        &mut self,
        ctx: &AppState,
        mut body: Pin<Box<impl Stream<Item = Result<Bytes, crate::upstream::UpstreamError>>>>,
        mut nar_check: Option<NarCheck>,
        tx: &watch::Sender<FillState>,
    ) -> Result<Received, Failure> {
        let spec = self.spec;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Failure::Upstream(e.to_string()))?;
            self.received += chunk.len() as u64;
            if spec.file_size.is_some_and(|n| self.received > n) {
                return Err(Failure::Upstream(
                    "upstream sent more bytes than FileSize".into(),
                ));
            }
            if spec.max_size.is_some_and(|n| self.received > n) {
                return Err(Failure::Upstream(
                    "upstream sent more bytes than a NAR of its NarSize takes".into(),
                ));
            }
            if let Some(dec) = nar_check.as_mut() {
                dec.write(&chunk)
                    .await
                    .map_err(|e| Failure::Upstream(format!("the NAR does not decompress: {e}")))?;
            }
            // Bytes held in memory are announced only once checked (Verified).
            let written = self.keep_or_write(ctx, chunk).await?;
            if written && self.received - self.announced >= ANNOUNCE_EVERY {
                self.announced = self.received;
                let _ = tx.send(FillState::Running {
                    received: self.received,
                });
            }
        }
        let nar = match nar_check {
            Some(dec) => Some(
                dec.finish()
                    .await
                    .map_err(|e| Failure::Upstream(format!("the NAR does not decompress: {e}")))?,
            ),
            None => None,
        };
        let (written, digest, kept) = match (self.memory.take(), self.writer.as_mut()) {
            (Some(held), _) => {
                let held = held.freeze();
                let digest: [u8; 32] = Sha256::digest(&held).into();
                (held.len() as u64, digest, Some(held))
            }
            (None, Some(w)) => {
                let (written, digest) = w.finish().await?;
                (written, digest, None)
            }
            // Nothing arrived of a file too big for memory: the size check refuses it.
            (None, None) => (0, Sha256::digest([]).into(), None),
        };
        Ok(Received {
            written,
            digest,
            nar,
            kept,
        })
    }

    /// Keeps a chunk in memory while the file fits (false), else writes it after what was held
    /// (true).
    async fn keep_or_write(&mut self, ctx: &AppState, chunk: Bytes) -> Result<bool, Failure> {
        if let Some(held) = self.memory.as_mut() {
            if held.len() + chunk.len() <= IN_MEMORY_MAX {
                held.extend_from_slice(&chunk);
                return Ok(false);
            }
        }
        let fill = self.fill;
        let w = match self.writer.as_mut() {
            Some(w) => w,
            None => self
                .writer
                .insert(nip_store::BatchedWriter::new(staged(ctx, fill).await?)),
        };
        // Too big for memory after all: what was held goes first.
        let held = self
            .memory
            .take()
            .filter(|h| !h.is_empty())
            .map(|h| h.freeze());
        for piece in held.into_iter().chain([chunk]) {
            let start = w.received();
            fill.window().push(start, piece.clone());
            if let Some(on_disk) = w.push(piece).await? {
                fill.window().trim(on_disk);
            }
        }
        Ok(true)
    }
}

/// The fill's staged file, created on first use.
async fn staged<'a>(
    ctx: &AppState,
    fill: &'a Fill,
) -> Result<&'a StagedFile, nip_store::StoreError> {
    fill.staged.get_or_try_init(|| ctx.staging.create()).await
}

/// Why a download attempt stopped, inside [`Fills::download`].
enum Failure {
    /// The source's fault: another source may be tried.
    Upstream(String),
    /// This cache's storage failed.
    Local(nip_store::StoreError),
}

impl From<nip_store::StoreError> for Failure {
    fn from(e: nip_store::StoreError) -> Self {
        Failure::Local(e)
    }
}

enum DownloadError {
    Upstream {
        message: String,
        /// Whether clients may have been given bytes of this attempt (or the staged file
        /// could not be emptied): then no other source may take over.
        bytes_sent: bool,
    },
    /// Storage failed: no source would do better.
    Local(nip_store::StoreError),
}

impl From<nip_store::StoreError> for DownloadError {
    fn from(e: nip_store::StoreError) -> Self {
        DownloadError::Local(e)
    }
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
                        // Without a known size the last byte written so far is held back: the
                        // end may come at any moment, and it is released only once checked.
                        FillState::Running { received } => match fill.expected_size {
                            Some(n) => (*received).min(n.saturating_sub(1)),
                            None => received.saturating_sub(1),
                        },
                        FillState::Verified { written, .. } | FillState::Done { written, .. } => {
                            *written
                        }
                        FillState::Failed(_) => offset,
                    };
                    if let FillState::Verified {
                        memory: Some(all), ..
                    }
                    | FillState::Done {
                        memory: Some(all), ..
                    } = &state
                    {
                        let start = (offset as usize).min(all.len());
                        if start < all.len() {
                            let next = all.len() as u64;
                            return Some((Ok(all.slice(start..)), (fill, rx, next, false)));
                        }
                        return None;
                    }
                    if offset < available {
                        let from_window = fill.window().read(offset, available);
                        let window_start = match from_window {
                            WindowRead::Here(b) => {
                                let next = offset + b.len() as u64;
                                return Some((Ok(b), (fill, rx, next, false)));
                            }
                            WindowRead::OnDisk { before } => before,
                            WindowRead::Lost => {
                                return Some((
                                    Err(std::io::Error::other("the fill lost announced bytes")),
                                    (fill, rx, offset, true),
                                ));
                            }
                        };
                        // Behind the window: these bytes are on disk.
                        let len = window_start
                            .map_or(available, |s| s.min(available))
                            .saturating_sub(offset)
                            .min(READ_CHUNK as u64) as usize;
                        let Some(staged) = fill.staged.get() else {
                            return Some((
                                Err(std::io::Error::other("no staged file to read")),
                                (fill, rx, offset, true),
                            ));
                        };
                        return match read_at(staged.file.clone(), offset, len).await {
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
                        FillState::Verified { .. } | FillState::Done { .. } => return None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(nar_file: &str, file_hash: Option<&str>, file_size: Option<i64>) -> NarInfoRecord {
        let nar_hash = format!("sha256:{}", "1".repeat(52));
        NarInfoRecord {
            hash: "0".repeat(32),
            store_path: format!("/nix/store/{}-x", "0".repeat(32)),
            nar_file: nar_file.into(),
            file_size,
            file_hash: file_hash.map(String::from),
            nar_hash: nar_hash.clone(),
            narinfo: format!(
                "StorePath: /nix/store/{}-x\nURL: nar/{nar_file}\nCompression: zstd\nNarHash: {nar_hash}\nNarSize: 6400\n",
                "0".repeat(32)
            ),
            origin: "http://up/".into(),
            signed_by: None,
            uploaded_by: None,
        }
    }

    /// Without a FileHash a zstd, xz or bzip2 NAR is checked by NarHash and NarSize, and its body
    /// is bounded; a brotli one cannot be checked; with a FileHash and FileSize, both are the check.
    #[test]
    fn a_spec_checks_what_the_narinfo_gives() {
        let name = format!("{}.nar.zst", "1".repeat(52));
        let spec = FillSpec::for_narinfo(&record(&name, None, None), vec![]).unwrap();
        assert!(matches!(
            spec.expect,
            Expect::NarHash {
                size: 6400,
                compression: Compression::Zstd,
                ..
            }
        ));
        assert_eq!(spec.max_size, Some(6400 + 100 + (1 << 20)));
        let xz = format!("{}.nar.xz", "1".repeat(52));
        let spec = FillSpec::for_narinfo(&record(&xz, None, None), vec![]).unwrap();
        assert!(matches!(
            spec.expect,
            Expect::NarHash {
                compression: Compression::Xz,
                ..
            }
        ));
        let bz = format!("{}.nar.bz2", "1".repeat(52));
        let spec = FillSpec::for_narinfo(&record(&bz, None, None), vec![]).unwrap();
        assert!(matches!(
            spec.expect,
            Expect::NarHash {
                compression: Compression::Bzip2,
                ..
            }
        ));
        let br = format!("{}.nar.br", "1".repeat(52));
        assert!(FillSpec::for_narinfo(&record(&br, None, None), vec![]).is_err());
        let file_hash = format!("sha256:1{}", "2".repeat(51));
        let spec = FillSpec::for_narinfo(&record(&xz, Some(&file_hash), Some(10)), vec![]).unwrap();
        assert!(matches!(spec.expect, Expect::FileHash(_)));
        assert_eq!((spec.file_size, spec.max_size), (Some(10), None));
    }

    async fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        use async_compression::tokio::bufread::{BzEncoder, XzEncoder, ZstdEncoder};
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        match c {
            Compression::Xz => XzEncoder::new(data).read_to_end(&mut out).await,
            Compression::Bzip2 => BzEncoder::new(data).read_to_end(&mut out).await,
            _ => ZstdEncoder::new(data).read_to_end(&mut out).await,
        }
        .unwrap();
        out
    }

    async fn check(c: Compression, file: &[u8], max: u64) -> std::io::Result<(u64, [u8; 32])> {
        let mut check = NarCheck::new(c, max).unwrap();
        // In pieces, as a body arrives.
        for piece in file.chunks(1000) {
            check.write(piece).await?;
        }
        check.finish().await
    }

    #[test]
    fn the_window_keeps_what_is_not_on_disk_and_hands_out_slices() {
        let mut w = Window::default();
        let chunk = |n: usize, b: u8| Bytes::from(vec![b; n]);
        let here = |r: WindowRead| match r {
            WindowRead::Here(b) => (b.len(), b[0]),
            other => panic!("not in the window: {other:?}"),
        };
        assert_eq!(w.read(0, 10), WindowRead::OnDisk { before: None });
        let big = WINDOW_MAX / 2;
        w.push(0, chunk(big, 1));
        w.push(big as u64, chunk(big, 2));
        w.push(2 * big as u64, chunk(big, 3));
        // Past the bound, but nothing is on disk yet: all stays.
        w.trim(0);
        assert_eq!(w.chunks.len(), 3);
        // The first chunk is on disk: it goes; a reader before the window is told where it starts.
        w.trim(big as u64);
        assert_eq!(w.chunks.len(), 2);
        let before = Some(big as u64);
        assert_eq!(w.read(10, 3 * big as u64), WindowRead::OnDisk { before });
        // A read within a chunk ends at that chunk's end, or at the given end.
        assert_eq!(here(w.read(big as u64 + 5, 3 * big as u64)), (big - 5, 2));
        assert_eq!(here(w.read(2 * big as u64, 2 * big as u64 + 7)), (7, 3));
        // Past what it holds: never handed out as on disk.
        assert_eq!(w.read(3 * big as u64, 4 * big as u64), WindowRead::Lost);
        w.clear();
        assert_eq!((w.chunks.len(), w.bytes), (0, 0));
    }

    /// Each compression decodes to the NAR's length and hash; a cut, corrupted, overlong or
    /// trailing-garbage stream fails.
    #[tokio::test]
    async fn nar_checks_decode_and_refuse_bad_streams() {
        let nar: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let want = (nar.len() as u64, <[u8; 32]>::from(Sha256::digest(&nar)));
        for c in [Compression::Zstd, Compression::Xz, Compression::Bzip2] {
            let file = compress(c, &nar).await;
            assert_eq!(check(c, &file, want.0).await.unwrap(), want, "{c:?}");
            assert!(
                check(c, &file, want.0 - 1).await.is_err(),
                "{c:?} past NarSize"
            );
            let cut = &file[..file.len() - 10];
            assert!(check(c, cut, want.0).await.is_err(), "{c:?} cut");
            let mut bad = file.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0xff;
            // A flipped byte either fails to decode or decodes to other bytes.
            assert_ne!(
                check(c, &bad, want.0).await.ok(),
                Some(want),
                "{c:?} corrupted"
            );
            let mut long = file.clone();
            long.extend_from_slice(b"garbage");
            assert!(
                check(c, &long, want.0).await.is_err(),
                "{c:?} trailing bytes"
            );
        }
    }
}
