//! The server's state: storage, index, upstreams, keys, caches and counters, built once at start
//! and shared by every request and background job. Its parts are private to the crate; other
//! crates (the binary, tests) use the accessors.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nip_core::signing::{PublicKey, SigningKey};
use nip_store::staging::{OverLimit, StageReservation, StagingLimits};
use nip_store::{BlobStore, Index, LocalBlobStore, SqliteMeta, StagedFile, Staging};

use crate::cache::fill::Fills;
use crate::coalesce::Coalescer;
use crate::config::ServeConfig;
use crate::error::{ApiError, ApiResult};
use crate::upstream::Upstreams;
use crate::{auth, budget, cache, hot, jobs, keys, metrics, stats};

/// Everything a request handler needs; built once at start.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// Private to the crate: handlers and the service layer reach the parts; other crates use the
/// accessors below.
pub struct Inner {
    pub(crate) config: ServeConfig,
    pub(crate) meta: Arc<dyn Index>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) staging: Staging,
    /// Bytes of client uploads staged at once, in all and per key or address.
    pub(crate) staged: StagingLimits,
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) signer: SigningKey,
    pub(crate) public_key: PublicKey,
    pub(crate) fills: Arc<Fills>,
    /// NARs fetched with their narinfo (`--cache-prefetch-nar-max-size`).
    pub(crate) prefetch: cache::prefetch::Prefetcher,
    pub(crate) narinfo_lookups: Coalescer<String, cache::narinfo::Fetched>,
    /// Narinfos no upstream had: when they were found missing, and whether every upstream
    /// answered (only a certain absence lets an upload skip asking again).
    pub(crate) negative: Mutex<HashMap<String, (Instant, bool)>>,
    /// Whether another instance shares the database, as last asked.
    pub(crate) peers: cache::cluster::PeersSeen,
    pub(crate) started_at: Instant,
    pub(crate) rate_limiter: Option<auth::RateLimiter>,
    /// API keys recently looked up (half a second).
    pub(crate) key_cache: auth::KeyCache,
    /// Hashes of `--cache-api-key` / NIP_CACHE_API_KEY and of ncps' `--cache-get-token`, made
    /// once rather than per request.
    pub(crate) env_key_hash: Option<String>,
    pub(crate) get_token_hash: Option<String>,
    /// Reads since the last flush of access times (batched: no database write per hit).
    pub(crate) accessed: jobs::Accessed,
    /// `--audit-reads`: reads since the last write to the audit log (batched likewise).
    pub(crate) read_audit: crate::read_audit::ReadAudit,
    pub(crate) stats: stats::Stats,
    /// Set when `--prometheus-enabled`.
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub(crate) budget: Arc<budget::Budget>,
    /// Narinfos recently served, so hits skip the database.
    pub(crate) hot_narinfos: hot::HotNarinfos,
    /// NARs recently found in the index, so hits skip the database.
    pub(crate) hot_nars: hot::HotNars,
    /// Artifact records recently looked up, so `/v1` lookups skip the database.
    pub(crate) hot_artifacts: hot::HotArtifacts,
    /// Names this process in cluster-wide leases (host, pid, random: unique across restarts).
    pub(crate) instance_id: String,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The configured blob storage: an S3 bucket, or the local store directory. Tools (`nip admin`)
/// read every piece by copying it; the server maps big reads of a local store unless it serves
/// TLS ([`LocalBlobStore::without_mapped_reads`]).
pub fn open_blobs(config: &ServeConfig) -> anyhow::Result<Arc<dyn BlobStore>> {
    open_blobs_with(config, false)
}

fn open_blobs_with(config: &ServeConfig, map_reads: bool) -> anyhow::Result<Arc<dyn BlobStore>> {
    Ok(match &config.s3 {
        Some(s3) => Arc::new(
            nip_store::S3BlobStore::new(s3)
                .map_err(|e| anyhow::anyhow!("cannot use S3 bucket {}: {e}", s3.bucket))?,
        ),
        None => {
            let local = LocalBlobStore::new(config.data_path.join("store")).map_err(|e| {
                anyhow::anyhow!("cannot use data path {}: {e}", config.data_path.display())
            })?;
            Arc::new(match map_reads {
                true => local,
                false => local.without_mapped_reads(),
            })
        }
    })
}

/// Imports an ncps installation the database belongs to, once, before anything is served.
async fn take_over_ncps(
    config: &ServeConfig,
    sql: &SqliteMeta,
    blobs: &dyn nip_store::BlobStore,
) -> anyhow::Result<()> {
    use crate::takeover::Outcome;
    let log_progress = |done: u64, total: u64| {
        if done % 50_000 < 1_000 {
            tracing::info!(done, total, "importing ncps' narinfos");
        }
    };
    match crate::takeover::ncps(config, sql, blobs, false, &log_progress).await? {
        Outcome::NotNcps | Outcome::AlreadyImported { .. } => {}
        Outcome::Imported(s) => tracing::info!(
            narinfos = s.narinfos,
            nars = s.nars,
            pins = s.pins,
            without_nar_file = s.missing_nars,
            unreadable = s.invalid,
            signing_key = ?s.key,
            public_key = s.public_key.as_deref().unwrap_or("(new)"),
            "took over the ncps installation; its tables and files were left as they are"
        ),
    }
    Ok(())
}

/// Least any one client (API key, or address without one) may stage at once. Constants rather than
/// settings: one client must always be able to send one upload of `--artifact-max-size` (plus
/// multipart framing and metadata), and `nix copy` uploads several NARs in parallel, so smaller
/// uploads get at least 1 GiB together.
const STAGED_PER_CLIENT_MIN: u64 = 1 << 30;
/// Room past `--artifact-max-size` for a `/v1` upload's metadata (≤ 1 MiB) and multipart framing.
const STAGED_UPLOAD_SLACK: u64 = 2 << 20;
/// All clients together may stage this many clients' worth: a few can upload at full size at
/// once, but stalled uploads from many addresses cannot fill the temp path without bound.
const STAGED_GLOBAL_CLIENTS: u64 = 4;
/// Retry-After (seconds) when the staging bound refuses an upload: about the time a stalled
/// upload takes to be cut by `--server-read-timeout` and give its bytes back.
const STAGED_RETRY_AFTER_SECS: u64 = 10;

/// The staging caps for a configured `--artifact-max-size`: (global, per client).
pub(crate) fn staging_caps(max_upload_size: u64) -> (u64, u64) {
    let per_client = max_upload_size
        .saturating_add(STAGED_UPLOAD_SLACK)
        .max(STAGED_PER_CLIENT_MIN);
    (per_client.saturating_mul(STAGED_GLOBAL_CLIENTS), per_client)
}

/// Bound on the negative cache so that scans for random hashes cannot grow it without limit.
const NEGATIVE_CACHE_MAX: usize = 100_000;

impl AppState {
    /// Opens storage and the database (running migrations), loads or generates the signing key.
    pub async fn open(config: ServeConfig) -> anyhow::Result<Self> {
        let staging = Staging::new(&config.temp_path).map_err(|e| {
            anyhow::anyhow!("cannot use temp path {}: {e}", config.temp_path.display())
        })?;
        match staging.clean_leftovers() {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "removed temp files left by an earlier crash"),
            Err(e) => tracing::warn!(error = %e, "could not clean the temp path"),
        }
        let blobs = open_blobs_with(&config, config.tls.is_none())?;
        let sql =
            SqliteMeta::connect_with(&config.database_url, config.database_max_connections).await?;
        take_over_ncps(&config, &sql, blobs.as_ref()).await?;
        let meta: Arc<dyn Index> = Arc::new(sql);
        match nip_store::gc::reconcile(
            meta.as_ref(),
            blobs.as_ref(),
            std::time::Duration::ZERO,
            false,
        )
        .await
        {
            Ok(s) if s.total() == 0 => {}
            Ok(s) => tracing::info!(
                rows_without_bytes = s.rows_without_bytes,
                bytes_without_rows = s.bytes_without_rows,
                partial_files = s.partial_files,
                "cleaned what an earlier crash left in the store"
            ),
            Err(e) => tracing::warn!(error = %e, "could not check the store for crash leftovers"),
        }
        let budget = Arc::new(budget::Budget::new(
            config.max_size,
            meta.usage().await?.bytes,
        ));
        let metrics = if config.prometheus_enabled {
            Some(
                metrics::install()
                    .ok_or_else(|| anyhow::anyhow!("cannot install the metrics recorder"))?,
            )
        } else {
            None
        };
        if config.require_trusted_signature && config.trusted_upload_keys.is_empty() {
            tracing::warn!("--cache-require-trusted-signature is set without any --cache-trusted-upload-key: every narinfo upload will be refused");
        }
        let signer = keys::load_or_generate(&config.secret_key_path, &config.hostname)?;
        let public_key = signer.public_key();
        let upstreams = Arc::new(Upstreams::new(&config)?);
        let rate_limiter = config
            .rate_limit
            .map(|(rate, burst)| auth::RateLimiter::new(rate, burst));
        let env_key_hash = config.api_key.as_deref().map(auth::hash_token);
        let get_token_hash = config.get_token.as_deref().map(auth::hash_token);
        let (global_cap, client_cap) = staging_caps(config.max_upload_size);
        Ok(AppState(Arc::new(Inner {
            staged: StagingLimits::new(global_cap, client_cap),
            read_audit: crate::read_audit::ReadAudit::new(config.audit_reads),
            config,
            rate_limiter,
            accessed: jobs::Accessed::default(),
            stats: stats::Stats::default(),
            metrics,
            budget,
            meta,
            blobs,
            staging,
            upstreams,
            signer,
            public_key,
            fills: Arc::default(),
            prefetch: Default::default(),
            narinfo_lookups: Coalescer::default(),
            negative: Mutex::new(HashMap::new()),
            peers: Default::default(),
            started_at: Instant::now(),
            hot_narinfos: hot::HotNarinfos::new(hot::NARINFO_TTL),
            hot_nars: hot::HotNars::new(hot::NARINFO_TTL),
            hot_artifacts: hot::HotArtifacts::new(hot::ARTIFACT_TTL),
            key_cache: auth::KeyCache::with_max_bytes(
                auth::KEY_CACHE_TTL,
                auth::KEY_CACHE_MAX_BYTES,
            ),
            env_key_hash,
            get_token_hash,
            instance_id: format!(
                "{}-{}-{:08x}",
                crate::config::default_hostname(),
                std::process::id(),
                rand::random::<u32>()
            ),
        })))
    }

    /// Whether `hash` was found missing upstream within `--cache-negative-ttl`; with `certain`,
    /// only when every upstream answered so.
    pub fn is_known_missing(&self, hash: &str, certain: bool) -> bool {
        let ttl = self.config.negative_ttl;
        let mut neg = self.negative.lock().unwrap_or_else(|e| e.into_inner());
        match neg.get(hash) {
            Some((t, _)) if t.elapsed() >= ttl => {
                neg.remove(hash);
                false
            }
            Some((_, complete)) => *complete || !certain,
            None => false,
        }
    }

    /// Reserves `bytes` of staging for an upload by `caller` (grow it as bytes arrive); refused
    /// with 429 + Retry-After past the global or per-client bound. The reservation is given back
    /// when dropped: on success, refusal, error, or a dropped connection alike.
    pub(crate) fn reserve_staging(
        &self,
        caller: &crate::auth::Caller,
        bytes: u64,
    ) -> ApiResult<StageReservation> {
        let client = match (caller.key_name(), caller.remote) {
            (Some(name), _) => format!("key:{name}"),
            (None, Some(addr)) => format!("ip:{}", addr.ip()),
            (None, None) => "anonymous".to_string(),
        };
        self.staged.reserve(&client, bytes).map_err(|e| {
            tracing::warn!(client, bound = ?e, "upload refused: too many bytes staged at once");
            staging_refused(e)
        })
    }

    pub fn remember_missing(&self, hash: &str, certain: bool) {
        let ttl = self.config.negative_ttl;
        if ttl.is_zero() {
            return;
        }
        let mut neg = self.negative.lock().unwrap_or_else(|e| e.into_inner());
        if neg.len() >= NEGATIVE_CACHE_MAX {
            neg.retain(|_, (t, _)| t.elapsed() < ttl);
            if neg.len() >= NEGATIVE_CACHE_MAX {
                neg.clear();
            }
        }
        neg.insert(hash.to_string(), (Instant::now(), certain));
    }
}

/// The refusal for an upload past the staging bounds: 429, a 4xx (Nix 2.8 hangs on a 5xx to a
/// PUT, but fails at once on a 4xx).
pub(crate) fn staging_refused(_: OverLimit) -> ApiError {
    ApiError::TooManyRequests(STAGED_RETRY_AFTER_SECS)
}

/// Grows an upload's reservation to `total` bytes received so far.
pub(crate) fn grow_staging(r: &mut StageReservation, total: u64) -> ApiResult<()> {
    r.grow_to(total).map_err(|e| {
        tracing::warn!(bound = ?e, "upload cut: too many bytes staged at once");
        staging_refused(e)
    })
}

/// Streams `chunks` into a new staged file: more than `max` bytes is refused with `too_large()`,
/// a failed chunk with `bad_chunk(e)`, and `reservation` grows with what arrives. Returns the
/// file, its size and its SHA-256.
pub(crate) async fn stage_stream<S, E>(
    state: &AppState,
    chunks: S,
    max: u64,
    reservation: &mut StageReservation,
    too_large: impl Fn() -> ApiError,
    bad_chunk: impl Fn(E) -> ApiError,
) -> ApiResult<(StagedFile, u64, [u8; 32])>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>>,
{
    use futures::StreamExt;
    let staged = state.staging.create().await?;
    let mut writer = nip_store::BatchedWriter::new(&staged);
    let mut chunks = std::pin::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(&bad_chunk)?;
        let total = writer.received() + chunk.len() as u64;
        if total > max {
            return Err(too_large());
        }
        grow_staging(reservation, total)?;
        writer.push(chunk).await?;
    }
    let (size, digest) = writer.finish().await?;
    Ok((staged, size, digest))
}

/// What other crates may read.
impl AppState {
    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// The metadata index (narinfos, NARs, artifacts, keys, audit log).
    pub fn index(&self) -> &Arc<dyn Index> {
        &self.meta
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// The key clients trust for what this cache signs.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// Upstream NAR downloads started since start.
    pub fn fills_started(&self) -> u64 {
        self.fills.started_count()
    }

    /// Bounds on bytes of client uploads staged at once; tests set small caps with
    /// [`StagingLimits::set_caps`].
    pub fn staging_limits(&self) -> &StagingLimits {
        &self.staged
    }

    /// Names this process in cluster-wide leases.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }
}
