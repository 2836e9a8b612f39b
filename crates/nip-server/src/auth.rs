//! API keys and who may do what. Tokens arrive as `Authorization: Bearer <token>` or as the
//! password of HTTP Basic (what Nix sends from a netrc file). Only a SHA-256 of each token is
//! stored; tokens are never logged. Unknown, expired or revoked tokens are 401; a valid key
//! without the scope or the cache-key prefix is 403.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use base64::Engine;
use nip_store::{ApiKeyRecord, AuditEntry};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

/// Scopes, ordered: each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// An authenticated key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub scope: Scope,
    /// When set, the key may only touch artifact keys starting with it.
    pub prefix: Option<String>,
}

/// Name under which the `NIP_CACHE_API_KEY` token appears in the audit log.
pub const ENV_KEY_NAME: &str = "NIP_CACHE_API_KEY";

/// A new random token: 192 bits, hex, with a recognisable prefix for secret scanners.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("nip_{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    let mut hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(token.as_bytes()), &mut hex).expect("64 = 2 × 32");
    String::from_utf8_lossy(&hex).into_owned()
}

/// Compares without an early exit, so timing does not reveal how much of a secret matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries, if any.
pub fn token_from_headers(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (kind, rest) = value.split_once(' ')?;
    match kind.to_ascii_lowercase().as_str() {
        "bearer" => Some(rest.trim().to_string()),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (_, password) = text.split_once(':')?;
            Some(password.to_string())
        }
        _ => None,
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy. Then `X-Forwarded-For`
/// (all its headers, in order) is read from the right, skipping trusted proxies: the first hop
/// that is not one is the client. Hops further left were written by the client itself and prove
/// nothing. When every hop is trusted the leftmost is used; when a hop does not parse, the last
/// trusted address before it is (the header cannot be believed past that point).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    let peer = peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// The caller of a request: its address and, when it presented a valid token, its key.
/// Extracting it rejects invalid tokens (401, audited) and rate-limited callers (429).
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Option<Principal>,
    /// The client's address (see [`client_ip`]); the port is 0 when it came from a proxy header.
    pub remote: Option<SocketAddr>,
    /// The request carried ncps' `--cache-get-token`: Nix reads only, no API key.
    pub get_token: bool,
}

impl Caller {
    pub fn key_name(&self) -> Option<String> {
        self.principal.as_ref().map(|p| p.name.clone())
    }

    /// Requires a key with `scope`; for artifact operations also the key's prefix.
    pub fn require(
        &self,
        scope: Scope,
        artifact_key: Option<&str>,
    ) -> Result<&Principal, ApiError> {
        let Some(p) = &self.principal else {
            return Err(ApiError::Unauthorized(
                "an API key is required: send Authorization: Bearer <token> (create one with `nip keys create`)".into(),
            ));
        };
        if p.scope < scope {
            return Err(ApiError::Forbidden(format!(
                "key {:?} has scope {}; this needs {}",
                p.name,
                p.scope.as_str(),
                scope.as_str()
            )));
        }
        if let (Some(prefix), Some(key)) = (&p.prefix, artifact_key) {
            if !key.starts_with(prefix.as_str()) {
                return Err(ApiError::Forbidden(format!(
                    "key {:?} may only use cache keys starting with {prefix:?}",
                    p.name
                )));
            }
        }
        Ok(p)
    }

    pub fn audit_entry(&self, action: &str, target: Option<&str>, result: &str) -> AuditEntry {
        AuditEntry {
            at: nip_store::unix_now(),
            key_name: self.key_name(),
            remote_addr: self.remote.map(|a| a.ip().to_string()),
            action: action.to_string(),
            target: target.map(String::from),
            result: result.to_string(),
            ..Default::default()
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let remote = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .map(|peer| {
                let ip = client_ip(peer.ip(), &parts.headers, &state.config.trusted_proxies);
                if ip == peer.ip().to_canonical() {
                    peer
                } else {
                    SocketAddr::new(ip, 0)
                }
            });
        let mut caller = Caller {
            principal: None,
            remote,
            get_token: false,
        };
        if let Some(token) = token_from_headers(&parts.headers) {
            // Hashed once: compared with the configured tokens' hashes, looked up by it.
            let hash = hash_token(&token);
            let is_get_token = state
                .get_token_hash
                .as_deref()
                .is_some_and(|g| constant_time_eq(g.as_bytes(), hash.as_bytes()));
            if is_get_token {
                caller.get_token = true;
            } else {
                match state.authenticate(&hash).await? {
                    Auth::Key(p) => caller.principal = Some(p),
                    Auth::Refused(refusal) => {
                        let why = refusal.as_str();
                        metrics::counter!("nip_auth_failures_total", "reason" => why).increment(1);
                        // A failed token counts against the address's bucket: guessing tokens
                        // is rate-limited like anonymous requests, and past the limit it is a
                        // 429 that writes nothing.
                        rate_limit(state, None, remote)?;
                        let now = nip_store::unix_now();
                        let ip = remote.map(|a| a.ip());
                        let (write, summaries) = state.stats.auth_failures.record(ip, now);
                        if write {
                            state
                                .audit(caller.audit_entry(
                                    "auth",
                                    Some(parts.uri.path()),
                                    &format!("401 {why}"),
                                ))
                                .await;
                        }
                        for summary in summaries {
                            state.audit(summary.entry(now)).await;
                        }
                        if state.stats.auth_failures.needs_flusher() {
                            spawn_failure_flusher(state.clone());
                        }
                        return Err(ApiError::Unauthorized(format!(
                        "API key {why}: check the token, or ask an admin for a new one (`nip keys create`)"
                    )));
                    }
                }
            }
        }
        rate_limit(state, caller.principal.as_ref(), remote)?;
        Ok(caller)
    }
}

/// Charges one request to its bucket: the key's, else the client address's. 429 past it.
fn rate_limit(
    state: &AppState,
    principal: Option<&Principal>,
    remote: Option<SocketAddr>,
) -> Result<(), ApiError> {
    let Some(limiter) = &state.rate_limiter else {
        return Ok(());
    };
    let who = match (principal, remote) {
        (Some(p), _) => format!("key:{}", p.name),
        (None, Some(a)) => format!("ip:{}", a.ip()),
        (None, None) => "anonymous".to_string(),
    };
    limiter.check(&who).map_err(|retry_after| {
        metrics::counter!("nip_rate_limited_total").increment(1);
        ApiError::TooManyRequests(retry_after)
    })
}

/// What a presented token turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    Key(Principal),
    Refused(Refusal),
}

/// Why a token is refused; also the `reason` label of `nip_auth_failures_total` (a closed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Revoked,
    Expired,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown",
            Refusal::Revoked => "revoked",
            Refusal::Expired => "expired",
        }
    }
}

impl AppState {
    /// Looks up the key whose token hashes to `hash` ([`hash_token`]). The error is a database
    /// failure; a refused token is an [`Auth::Refused`].
    pub async fn authenticate(&self, hash: &str) -> Result<Auth, ApiError> {
        if let Some(env_key) = &self.env_key_hash {
            if constant_time_eq(hash.as_bytes(), env_key.as_bytes()) {
                return Ok(Auth::Key(Principal {
                    name: ENV_KEY_NAME.into(),
                    scope: Scope::Write,
                    prefix: None,
                }));
            }
        }
        let rec = match self.key_cache.get(hash) {
            Some(rec) => rec,
            None => {
                let seen = self.key_cache.generation();
                let rec = self.meta.key_by_token_hash(hash).await?;
                self.key_cache.insert(hash, rec.clone(), seen);
                rec
            }
        };
        let Some(rec) = rec else {
            return Ok(Auth::Refused(Refusal::Unknown));
        };
        if rec.revoked_at.is_some() {
            return Ok(Auth::Refused(Refusal::Revoked));
        }
        if rec.expires_at.is_some_and(|t| t <= nip_store::unix_now()) {
            return Ok(Auth::Refused(Refusal::Expired));
        }
        let scope = Scope::parse(&rec.scope)
            .ok_or_else(|| ApiError::internal(format!("bad scope {:?}", rec.scope)))?;
        Ok(Auth::Key(Principal {
            name: rec.name,
            scope,
            prefix: rec.prefix,
        }))
    }

    /// Nix reads (nix-cache-info, narinfo, NAR) are public unless `--cache-require-auth-read` or
    /// ncps' `--cache-get-token` is set; then they need that token or a read key.
    pub fn check_nix_read(&self, caller: &Caller) -> Result<(), ApiError> {
        if caller.get_token {
            return Ok(());
        }
        if self.config.require_auth_read || self.config.get_token.is_some() {
            caller.require(Scope::Read, None)?;
        }
        Ok(())
    }

    /// Whether uploads and deletes need a key: once any key exists, they do.
    pub async fn keys_exist(&self) -> Result<bool, ApiError> {
        Ok(
            self.config.api_key.is_some()
                || self.meta.any_active_key(nip_store::unix_now()).await?,
        )
    }

    /// Writes an audit entry; a failure to do so is logged, not returned. Its target and result
    /// are cut to [`AUDIT_TEXT_MAX`] bytes (a client chooses paths and keys).
    pub async fn audit(&self, mut entry: AuditEntry) {
        entry.target = entry.target.map(|t| cap_audit_text(t, AUDIT_TEXT_MAX));
        entry.result = cap_audit_text(std::mem::take(&mut entry.result), AUDIT_TEXT_MAX);
        if let Err(e) = self.meta.audit(&entry).await {
            tracing::error!(error = %e, action = %entry.action, "could not write the audit log");
        }
    }
}

/// The most bytes of an audit entry's target or result that are stored.
pub const AUDIT_TEXT_MAX: usize = 512;

/// `text` cut to at most `max` bytes (at a character boundary), ending with a marker that says
/// how much was cut.
pub fn cap_audit_text(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker = format!("…[truncated {} bytes]", text.len());
    let mut end = max.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &text[..end])
}

/// Length of an auth-failure aggregation window, in seconds.
pub const AUTH_FAILURE_WINDOW: i64 = 60;
/// Addresses whose failures are counted one by one; past it, new addresses share one count.
pub const AUTH_FAILURE_ADDRESSES: usize = 4096;

/// Failed authentications per client address and minute, so that a flood of bad tokens writes
/// a few audit rows instead of one per request: the first failure of an address in a window is
/// audited, later ones are counted in memory and written as one "N more auth failures" entry
/// when the window has ended (on the address's next failure, or by a flusher task). Memory is
/// bounded by [`AUTH_FAILURE_ADDRESSES`].
#[derive(Default)]
pub struct AuthFailures {
    inner: Mutex<FailureWindows>,
}

#[derive(Default)]
struct FailureWindows {
    /// Window start and failures not yet audited, by address.
    by_addr: HashMap<Option<IpAddr>, (i64, u64)>,
    /// The same for addresses past the cap, together.
    overflow: Option<(i64, u64)>,
    /// A flusher task is running or has been asked for.
    flusher: bool,
}

/// Failures not audited one by one, to be written as one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureSummary {
    /// `None` inside: no address known; `None` outside: addresses past the cap.
    pub addr: Option<Option<IpAddr>>,
    pub since: i64,
    pub count: u64,
}

impl FailureSummary {
    pub fn entry(&self, now: i64) -> AuditEntry {
        let from = match self.addr {
            Some(_) => String::new(),
            None => " from other addresses".to_string(),
        };
        AuditEntry {
            at: now,
            remote_addr: self.addr.flatten().map(|ip| ip.to_string()),
            action: "auth".into(),
            result: format!(
                "401 {} more auth failures{from} since {}",
                self.count,
                nip_core::api::rfc3339(self.since)
            ),
            ..Default::default()
        }
    }
}

impl AuthFailures {
    /// Notes one failure from `addr` at `now`: whether to audit it, and summaries of ended
    /// windows to write.
    pub fn record(&self, addr: Option<IpAddr>, now: i64) -> (bool, Vec<FailureSummary>) {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let summaries = w.take_ended(now);
        let write = if let Some((_, count)) = w.by_addr.get_mut(&addr) {
            *count += 1;
            false
        } else if w.by_addr.len() < AUTH_FAILURE_ADDRESSES {
            w.by_addr.insert(addr, (now, 0));
            true
        } else if let Some((_, count)) = &mut w.overflow {
            *count += 1;
            false
        } else {
            w.overflow = Some((now, 0));
            true
        };
        (write, summaries)
    }

    /// Removes the windows that ended by `now`; summaries of those with uncounted failures.
    pub fn flush(&self, now: i64) -> Vec<FailureSummary> {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        w.take_ended(now)
    }

    /// Whether failures wait to be summarised and no flusher runs; if so, the caller starts one
    /// (this marks it started).
    pub fn needs_flusher(&self) -> bool {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if w.flusher || !w.pending() {
            return false;
        }
        w.flusher = true;
        true
    }

    /// For the flusher: `true` (and the flag cleared) when nothing waits any more.
    fn flusher_done(&self) -> bool {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if w.pending() {
            return false;
        }
        w.flusher = false;
        true
    }

    /// Addresses with an open window (for tests and bounds).
    pub fn tracked(&self) -> usize {
        let w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        w.by_addr.len() + usize::from(w.overflow.is_some())
    }
}

impl FailureWindows {
    fn pending(&self) -> bool {
        self.by_addr.values().any(|(_, c)| *c > 0) || self.overflow.is_some_and(|(_, c)| c > 0)
    }

    /// Removes the windows that ended by `now`; summaries of those with failures not audited.
    fn take_ended(&mut self, now: i64) -> Vec<FailureSummary> {
        let ended = |start: i64| start + AUTH_FAILURE_WINDOW <= now;
        let mut out = Vec::new();
        self.by_addr.retain(|addr, (since, count)| {
            if ended(*since) {
                out.push(FailureSummary {
                    addr: Some(*addr),
                    since: *since,
                    count: *count,
                });
                false
            } else {
                true
            }
        });
        if let Some((since, count)) = self.overflow.filter(|(since, _)| ended(*since)) {
            out.push(FailureSummary {
                addr: None,
                since,
                count,
            });
            self.overflow = None;
        }
        out.retain(|s| s.count > 0);
        out
    }
}

/// Writes the summaries of auth-failure windows as they end, then stops once none waits.
fn spawn_failure_flusher(state: AppState) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = nip_store::unix_now();
            for summary in state.stats.auth_failures.flush(now) {
                state.audit(summary.entry(now)).await;
            }
            if state.stats.auth_failures.flusher_done() {
                return;
            }
        }
    });
}

/// Per-caller token buckets.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `who`, or says how many seconds until one is available.
    pub fn check(&self, who: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            // Forget full buckets: they are indistinguishable from new ones.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(who.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// Keys looked up in the last [`KEY_CACHE_TTL`], by token hash, so a burst of requests with one
/// key costs one database query. The short life keeps revocations (from any instance or from
/// `nip keys revoke`) effective within a second; expiry is still checked on every request.
pub const KEY_CACHE_TTL: Duration = Duration::from_millis(500);
/// Memory for looked-up keys (about 10 000 of them); past it the cache starts over, so random
/// tokens cannot grow it without bound.
pub const KEY_CACHE_MAX_BYTES: usize = 2 * 1024 * 1024;

pub type KeyCache = crate::hot::Hot<Option<ApiKeyRecord>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_bearer_and_basic() {
        let mut h = HeaderMap::new();
        assert_eq!(token_from_headers(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(token_from_headers(&h).as_deref(), Some("abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("nix:s3cret:x");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert_eq!(token_from_headers(&h).as_deref(), Some("s3cret:x"));
        h.insert(header::AUTHORIZATION, "Digest x".parse().unwrap());
        assert_eq!(token_from_headers(&h), None);
    }

    #[test]
    fn scopes_are_ordered_and_prefixes_enforced() {
        let caller = |scope, prefix: Option<&str>| Caller {
            principal: Some(Principal {
                name: "k".into(),
                scope,
                prefix: prefix.map(String::from),
            }),
            remote: None,
            get_token: false,
        };
        assert!(caller(Scope::Write, None)
            .require(Scope::Read, Some("x"))
            .is_ok());
        assert!(matches!(
            caller(Scope::Read, None).require(Scope::Write, None),
            Err(ApiError::Forbidden(_))
        ));
        assert!(caller(Scope::Admin, None)
            .require(Scope::Write, None)
            .is_ok());
        assert!(caller(Scope::Write, Some("proj-"))
            .require(Scope::Write, Some("proj-a"))
            .is_ok());
        assert!(matches!(
            caller(Scope::Write, Some("proj-")).require(Scope::Write, Some("other")),
            Err(ApiError::Forbidden(_))
        ));
        let anon = Caller {
            principal: None,
            remote: None,
            get_token: false,
        };
        assert!(matches!(
            anon.require(Scope::Read, None),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn token_hashes_are_lowercase_hex_sha256_as_stored_by_earlier_versions() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 48);
        assert!(constant_time_eq(
            hash_token(&a).as_bytes(),
            hash_token(&a).as_bytes()
        ));
        assert!(!constant_time_eq(
            hash_token(&a).as_bytes(),
            hash_token(&b).as_bytes()
        ));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = |vals: &[&str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append("x-forwarded-for", v.parse().unwrap());
            }
            h
        };
        // Not from a proxy: the header is the client's word and ignored.
        assert_eq!(
            client_ip(ip("203.0.113.9"), &xff(&["1.1.1.1"]), &trusted),
            ip("203.0.113.9")
        );
        // From a trusted proxy: the rightmost untrusted hop, not the spoofable leftmost one.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &xff(&["6.6.6.6, 198.51.100.7, 10.1.1.1"]),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Several headers count as one list, in order; ports and brackets are allowed.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &xff(&["6.6.6.6", "[2001:db8::1]:443"]),
                &trusted
            ),
            ip("2001:db8::1")
        );
        // Only proxies: the leftmost. No header: the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff(&["10.9.9.9"]), &trusted),
            ip("10.9.9.9")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff(&["1.2.3.4, nonsense"]), &trusted),
            ip("10.0.0.2")
        );
        // IPv4-mapped IPv6 peers (dual-stack listeners) match IPv4 ranges.
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), &xff(&["192.0.2.1"]), &trusted),
            ip("192.0.2.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff(&["192.0.2.1"]), &[]),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn audit_text_is_capped_at_a_char_boundary_with_a_marker() {
        assert_eq!(cap_audit_text("short".into(), 512), "short");
        let long = "é".repeat(20_000);
        let cut = cap_audit_text(long, AUDIT_TEXT_MAX);
        assert!(cut.len() <= AUDIT_TEXT_MAX, "{}", cut.len());
        assert!(cut.starts_with("éé"));
        assert!(cut.ends_with("…[truncated 40000 bytes]"), "{cut}");
    }

    #[test]
    fn auth_failures_are_audited_once_per_address_and_minute_then_summarised() {
        let f = AuthFailures::default();
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        assert_eq!(f.record(a, 1000), (true, vec![]));
        for t in 1001..1050 {
            assert_eq!(f.record(a, t), (false, vec![]));
        }
        assert_eq!(f.record(b, 1010), (true, vec![]), "addresses are separate");
        assert!(f.needs_flusher());
        assert!(!f.needs_flusher(), "one flusher at a time");
        // The next failure after the minute: written, with a summary of the 49 counted ones.
        let (write, summaries) = f.record(a, 1060);
        assert!(write);
        assert_eq!(
            summaries,
            vec![FailureSummary {
                addr: Some(a),
                since: 1000,
                count: 49
            }]
        );
        let entry = summaries[0].entry(1060);
        assert_eq!(entry.remote_addr.as_deref(), Some("192.0.2.1"));
        assert!(
            entry.result.starts_with("401 49 more auth failures"),
            "{entry:?}"
        );
        // b had no further failures: its window ends without a summary.
        assert_eq!(f.flush(1070), vec![]);
        assert_eq!(f.tracked(), 1);
    }

    #[test]
    fn auth_failure_memory_is_bounded() {
        let f = AuthFailures::default();
        let mut written = 0;
        for i in 0..(AUTH_FAILURE_ADDRESSES as u32 + 1000) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if f.record(Some(ip), 5).0 {
                written += 1;
            }
        }
        assert_eq!(f.tracked(), AUTH_FAILURE_ADDRESSES + 1);
        assert_eq!(written, AUTH_FAILURE_ADDRESSES + 1, "past the cap: one row");
        let summaries = f.flush(65);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].addr, None);
        assert_eq!(summaries[0].count, 999);
        assert_eq!(f.tracked(), 0);
    }

    #[test]
    fn rate_limiter_allows_burst_then_refuses() {
        let l = RateLimiter::new(1.0, 3.0);
        for _ in 0..3 {
            assert!(l.check("a").is_ok());
        }
        assert_eq!(l.check("a"), Err(1));
        assert!(l.check("b").is_ok(), "buckets are per caller");
    }
}
