//! Upstream binary caches: priorities, health tracking, and narinfo lookups across all of them.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use nip_core::narinfo::{NarInfo, MAX_NARINFO_SIZE};
use nip_core::signing::{verify_narinfo, PublicKey};
use nip_core::store_path::StorePathHash;
use reqwest::Url;
use tracing::Instrument;

use crate::config::{ServeConfig, DEFAULT_PRIORITY};
use crate::netrc::Netrc;

/// Consecutive failures after which an upstream is skipped for [`SKIP_FOR`].
const FAILURE_THRESHOLD: u32 = 3;
const SKIP_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    skip_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Upstream {
    pub url: Url,
    /// The URL with any credentials masked: what logs, metrics and the index show.
    name: String,
    configured_priority: Option<u32>,
    /// `?trusted=1`: narinfos no configured key signed are served anyway.
    trusted: bool,
    announced_priority: Mutex<Option<u32>>,
    health: Mutex<Health>,
}

impl Upstream {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marked `?trusted=1`: its narinfos need no upstream signature.
    pub fn trusted(&self) -> bool {
        self.trusted
    }

    /// Priority as Nix uses it: lower is preferred.
    pub fn priority(&self) -> u32 {
        let announced = *self
            .announced_priority
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        announced
            .or(self.configured_priority)
            .unwrap_or(DEFAULT_PRIORITY)
    }

    pub fn is_healthy(&self) -> bool {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.skip_until.is_none_or(|t| Instant::now() >= t)
    }

    pub fn record_success(&self) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = Health::default();
    }

    pub fn record_failure(&self, why: &str) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.consecutive_failures += 1;
        if h.consecutive_failures >= FAILURE_THRESHOLD {
            h.skip_until = Some(Instant::now() + SKIP_FOR);
            tracing::warn!(upstream = %self.name, failures = h.consecutive_failures, %why,
                "upstream keeps failing; skipping it for {}s", SKIP_FOR.as_secs());
        }
    }
}

/// Outcome of asking one upstream for a narinfo.
#[derive(Debug)]
pub enum NarInfoAnswer {
    /// Signed by a trusted key (named), or, `None`, from an upstream marked `?trusted=1` that no
    /// configured key signed.
    Verified {
        info: Box<NarInfo>,
        key: Option<String>,
    },
    /// 404 or 410: the upstream says it does not have it.
    Missing,
    /// A well-formed narinfo for the path that no trusted key signed: as good as absent.
    Untrusted(String),
    /// An answer that says neither "here it is" nor "not here" (403, an error page, an
    /// unparsable or oversized body): absent for readers, but not a certain absence, so an upload
    /// must not shadow what the upstream may have (docs/security.md).
    Unclear(String),
    Failed(String),
}

/// Result of asking all upstreams.
#[derive(Debug)]
pub enum Lookup {
    Found(Box<Found>),
    /// Every upstream that answered says it does not have it (or had nothing trustworthy).
    /// `unknown` names the upstreams that were skipped, failed, or answered unclearly (a 403, a
    /// body that is no narinfo for the path): empty when the absence is certain, which is what an
    /// upload of a new path needs (docs/security.md).
    Missing {
        unknown: Vec<String>,
    },
    /// No upstream gave a usable answer: an outage, not an absence, so it is not remembered.
    Failed {
        unknown: Vec<String>,
    },
}

/// A narinfo chosen among the upstreams' answers.
#[derive(Debug)]
pub struct Found {
    pub info: NarInfo,
    pub upstream: Arc<Upstream>,
    /// The upstream key that verified it; `None` for an unsigned narinfo of a `?trusted=1`
    /// upstream.
    pub key: Option<String>,
    /// Other upstreams whose verified narinfo has the same file hash: fallbacks for the NAR.
    pub alternates: Vec<(Arc<Upstream>, NarInfo)>,
}

pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    client: reqwest::Client,
    keys: Vec<PublicKey>,
    netrc: Netrc,
    header_timeout: Duration,
    pub body_idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Http(String),
    #[error("upstream answered {0}")]
    Status(reqwest::StatusCode),
    #[error("upstream timed out")]
    Timeout,
}

impl Upstreams {
    pub fn new(config: &ServeConfig) -> anyhow::Result<Self> {
        let netrc =
            match &config.netrc_file {
                Some(p) => Netrc::parse(&std::fs::read_to_string(p).map_err(|e| {
                    anyhow::anyhow!("cannot read --netrc-file {}: {e}", p.display())
                })?),
                None => Netrc::default(),
            };
        let client = reqwest::Client::builder()
            .connect_timeout(config.dialer_timeout)
            .user_agent(concat!("nip/", env!("CARGO_PKG_VERSION")))
            // Bytes must arrive exactly as stored upstream: FileHash covers them.
            .no_gzip()
            .build()?;
        let list = config
            .upstreams
            .iter()
            .map(|u| {
                let url = Url::parse(&u.url)?;
                let name = crate::config::redact_userinfo(url.as_str());
                if u.trusted {
                    tracing::warn!(upstream = %name,
                        "upstream marked ?trusted=1: its narinfos are served without an upstream signature, signed by this cache; use this only for an upstream you control");
                }
                Ok(Arc::new(Upstream {
                    name,
                    url,
                    configured_priority: u.priority,
                    trusted: u.trusted,
                    announced_priority: Mutex::new(None),
                    health: Mutex::default(),
                }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if list.iter().any(|u| !u.trusted) {
            let keys: Vec<&str> = config
                .upstream_public_keys
                .iter()
                .map(|k| k.name())
                .collect();
            tracing::info!(keys = %keys.join(","),
                "upstream narinfos are cached only when signed by one of these keys; to serve an upstream that signs nothing (as ncps does), add ?trusted=1 to its URL");
        }
        Ok(Upstreams {
            list,
            client,
            keys: config.upstream_public_keys.clone(),
            netrc,
            header_timeout: config.response_header_timeout,
            body_idle_timeout: config.body_idle_timeout,
        })
    }

    pub fn list(&self) -> &[Arc<Upstream>] {
        &self.list
    }

    fn request(&self, url: Url) -> reqwest::RequestBuilder {
        let creds = url.host_str().and_then(|h| self.netrc.credentials(h));
        let req = self.client.get(url);
        match creds {
            Some((login, password)) => req.basic_auth(login, Some(password)),
            None => req,
        }
    }

    /// Sends a GET and waits for the response headers, within the header timeout.
    pub async fn get(&self, url: Url) -> Result<reqwest::Response, UpstreamError> {
        let resp = tokio::time::timeout(self.header_timeout, self.request(url).send())
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Http(e.without_url().to_string()))?;
        Ok(resp)
    }

    /// Streams a response body, failing when no bytes arrive for the idle timeout.
    pub fn body_stream(
        &self,
        resp: reqwest::Response,
    ) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let idle = self.body_idle_timeout;
        futures::stream::unfold(Some(resp.bytes_stream().boxed()), move |state| async move {
            let mut body = state?;
            match tokio::time::timeout(idle, body.next()).await {
                Err(_) => Some((Err(UpstreamError::Timeout), None)),
                Ok(None) => None,
                Ok(Some(Ok(b))) => Some((Ok(b), Some(body))),
                Ok(Some(Err(e))) => {
                    Some((Err(UpstreamError::Http(e.without_url().to_string())), None))
                }
            }
        })
    }

    /// Learns each upstream's priority from its `/nix-cache-info` (in the background at start).
    pub async fn refresh_priorities(&self) {
        let jobs = self.list.iter().map(|u| async move {
            let Ok(url) = u.url.join("nix-cache-info") else { return };
            match self.get(url).await {
                Ok(resp) if resp.status().is_success() => {
                    let text = tokio::time::timeout(self.header_timeout, resp.text()).await;
                    if let Ok(Ok(text)) = text {
                        let prio = text.lines().find_map(|l| {
                            l.strip_prefix("Priority:").and_then(|p| p.trim().parse::<u32>().ok())
                        });
                        if let Some(p) = prio {
                            *u.announced_priority.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                        }
                        tracing::info!(upstream = %u.name(), priority = u.priority(), "upstream ready");
                    }
                }
                Ok(resp) => tracing::warn!(upstream = %u.name(), status = %resp.status(), "upstream /nix-cache-info failed"),
                Err(e) => tracing::warn!(upstream = %u.name(), error = %e, "upstream /nix-cache-info unreachable"),
            }
        });
        futures::future::join_all(jobs).await;
    }

    /// Asks one upstream for a narinfo and checks it.
    async fn ask(&self, upstream: &Upstream, hash: &StorePathHash) -> NarInfoAnswer {
        let Ok(url) = upstream.url.join(&format!("{hash}.narinfo")) else {
            return NarInfoAnswer::Failed("bad URL".into());
        };
        let started = Instant::now();
        let resp = match self.get(url).await {
            Ok(r) => r,
            Err(e) => return NarInfoAnswer::Failed(e.to_string()),
        };
        let status = resp.status();
        if matches!(status.as_u16(), 404 | 410) {
            return NarInfoAnswer::Missing;
        }
        if status.as_u16() == 403 {
            return NarInfoAnswer::Unclear("HTTP 403".into());
        }
        if !status.is_success() {
            return NarInfoAnswer::Failed(format!("HTTP {status}"));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_NARINFO_SIZE as u64)
        {
            return NarInfoAnswer::Unclear("narinfo too large".into());
        }
        let mut body = Box::pin(self.body_stream(resp));
        let mut text = Vec::new();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(b) => {
                    if text.len() + b.len() > MAX_NARINFO_SIZE {
                        return NarInfoAnswer::Unclear("narinfo too large".into());
                    }
                    text.extend_from_slice(&b);
                }
                Err(e) => return NarInfoAnswer::Failed(e.to_string()),
            }
        }
        tracing::debug!(upstream = %upstream.name(), %hash, bytes = text.len(),
            ms = started.elapsed().as_millis() as u64, "fetched narinfo");
        let Ok(text) = String::from_utf8(text) else {
            return NarInfoAnswer::Unclear("narinfo is not UTF-8".into());
        };
        let info = match NarInfo::parse(&text) {
            Ok(i) => i,
            Err(e) => return NarInfoAnswer::Unclear(format!("unparsable narinfo: {e}")),
        };
        if info.store_path.hash() != hash {
            return NarInfoAnswer::Unclear(format!(
                "narinfo is for another path ({})",
                info.store_path.full()
            ));
        }
        match verify_narinfo(&info, &self.keys) {
            Some(key) => {
                let key = key.name().to_string();
                NarInfoAnswer::Verified {
                    info: Box::new(info),
                    key: Some(key),
                }
            }
            None if upstream.trusted => {
                // No signature verified: none is passed on as if vouched for.
                let mut info = info;
                info.sigs.clear();
                NarInfoAnswer::Verified {
                    info: Box::new(info),
                    key: None,
                }
            }
            None => NarInfoAnswer::Untrusted(
                "not signed by any configured upstream public key (add ?trusted=1 to this upstream's URL to serve it unsigned)".into(),
            ),
        }
    }

    /// Asks every healthy upstream at once and picks the verified narinfo of the best priority.
    pub async fn lookup(&self, hash: &StorePathHash) -> Lookup {
        let (candidates, skipped): (Vec<_>, Vec<_>) =
            self.list.iter().cloned().partition(|u| u.is_healthy());
        let mut unknown: Vec<String> = skipped.iter().map(|u| u.name().to_string()).collect();
        let answers = futures::future::join_all(candidates.iter().map(|u| {
            // One span per upstream asked (an OTel client span with --otel-enabled).
            let span = tracing::info_span!("upstream narinfo",
                upstream = %u.name(),
                %hash,
                result = tracing::field::Empty,
                otel.kind = tracing::field::Empty,
            );
            if crate::metrics::otel_spans() {
                span.record("otel.kind", "client");
            }
            async move {
                let started = Instant::now();
                let answer = self.ask(u, hash).await;
                let result = match &answer {
                    NarInfoAnswer::Verified { .. } => "found",
                    NarInfoAnswer::Missing => "missing",
                    NarInfoAnswer::Untrusted(_) | NarInfoAnswer::Unclear(_) => "rejected",
                    NarInfoAnswer::Failed(_) => "error",
                };
                tracing::Span::current().record("result", result);
                record_upstream(u.name(), "narinfo", result, started);
                answer
            }
            .instrument(span)
        }))
        .await;
        let mut verified = Vec::new();
        let mut answered = false;
        for (u, answer) in candidates.into_iter().zip(answers) {
            match answer {
                NarInfoAnswer::Verified { info, key } => {
                    u.record_success();
                    verified.push((u, *info, key));
                }
                NarInfoAnswer::Missing => {
                    answered = true;
                    u.record_success();
                }
                NarInfoAnswer::Untrusted(why) => {
                    answered = true;
                    u.record_success();
                    tracing::warn!(upstream = %u.name(), %hash, %why, "ignoring upstream narinfo");
                }
                NarInfoAnswer::Unclear(why) => {
                    answered = true;
                    u.record_success();
                    unknown.push(u.name().to_string());
                    tracing::warn!(upstream = %u.name(), %hash, %why, "ignoring upstream narinfo");
                }
                NarInfoAnswer::Failed(why) => {
                    tracing::warn!(upstream = %u.name(), %hash, %why, "upstream narinfo request failed");
                    u.record_failure(&why);
                    unknown.push(u.name().to_string());
                }
            }
        }
        // Stable sort: equal priorities keep configuration order.
        verified.sort_by_key(|(u, _, _)| u.priority());
        let mut iter = verified.into_iter();
        let Some((upstream, info, key)) = iter.next() else {
            return if answered || unknown.is_empty() {
                Lookup::Missing { unknown }
            } else {
                Lookup::Failed { unknown }
            };
        };
        let alternates = iter
            .filter(|(_, other, _)| match (&info.file_hash, &other.file_hash) {
                (Some(a), Some(b)) => a == b,
                // Checked by NarHash: any upstream's bytes that decompress to the same NAR do.
                (None, None) => {
                    other.nar_hash == info.nar_hash && other.compression == info.compression
                }
                _ => false,
            })
            .map(|(u, i, _)| (u, i))
            .collect();
        tracing::debug!(upstream = %upstream.name(), %hash, key = key.as_deref().unwrap_or("none (?trusted=1)"), "narinfo verified");
        Lookup::Found(Box::new(Found {
            info,
            upstream,
            key,
            alternates,
        }))
    }
}

/// Counts one upstream request and its duration.
pub fn record_upstream(upstream: &str, kind: &'static str, result: &'static str, started: Instant) {
    let upstream = upstream.to_string();
    metrics::histogram!("nip_upstream_request_duration_seconds", "upstream" => upstream.clone(), "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("nip_upstream_requests_total", "upstream" => upstream, "kind" => kind, "result" => result)
        .increment(1);
}
