//! The `/v1` HTTP client for one server: health, lookup, streamed download (hashed and verified),
//! streamed multipart upload and listing, with the retry policy applied to every request. It
//! speaks the guide's API, which any server may implement: a lookup needs only `downloadUrl`.
use crate::config::{Policies, Server};
use crate::progress;
use crate::worker::{drain, Chunk, StreamWorker};
use nip_core::api::{ArtifactList, ErrorBody, HEADER_SHA256};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why a remote operation failed; `Display` is one line fit for a warning.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("not reachable at {url} ({reason})")]
    Unreachable { url: String, reason: String },
    /// No answer within the deadline (a lookup) or the allowed silence (a transfer).
    #[error("timeout: no answer from {url} within {secs} s")]
    Timeout { url: String, secs: f64 },
    /// The TLS handshake failed; `reason` says why in one line (unknown CA, expired, wrong host).
    #[error("TLS failure with {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("401 Unauthorized (API key missing, wrong, expired or revoked): {message}")]
    Unauthorized { message: String },
    #[error("403 Forbidden (API key lacks the scope for this): {message}")]
    Forbidden { message: String },
    #[error("{status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("corrupt download of {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid answer from {url}: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("local file: {0}")]
    Local(String),
}

impl RemoteError {
    /// The server could not be talked to at all (refused, unresolvable, silent, TLS broken):
    /// asking again in this run, or within a short while, would only cost time.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            RemoteError::Unreachable { .. } | RemoteError::Timeout { .. } | RemoteError::Tls { .. }
        )
    }
}

/// A lookup's answer (`GET /v1/artifacts/{key}`). Only `downloadUrl` is required, as in the
/// guide's API; size and SHA-256 are verified when the server (or its metadata) gives them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Found {
    /// The key looked up (the answer's own `key`, when any, is not needed).
    #[serde(skip)]
    pub key: String,
    /// Relative to the server's base URL (`/v1/download/{key}`), or absolute.
    pub download_url: String,
    #[serde(default)]
    pub size: Option<u64>,
    /// Hex SHA-256 of the bytes.
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
}

/// What an upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadOutcome {
    Created,
    /// The server already held these exact bytes (200).
    AlreadyPresent,
}

/// A downloaded artifact whose size and SHA-256 matched what was known of them, still in a temp
/// file.
pub struct Verified {
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub sha256: String,
}

pub struct RemoteClient {
    http: Client,
    pub server: Server,
    policies: Policies,
    /// The longest silence a transfer may have.
    transfer_timeout: Duration,
}

const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The slowest upload rate allowed for before an upload is given up, on top of the transfer
/// timeout: an upload's deadline covers the whole request, so it grows with the file.
const MIN_UPLOAD_RATE: u64 = 256 * 1024;

/// A key no artifact has: `status` looks it up to check the API key on servers without listing.
const PROBE_KEY: &str = "nip-status-probe";

/// Bytes read from the response at a time and handed to the hashing and unpacking workers.
const CHUNK: usize = 256 * 1024;

impl RemoteClient {
    /// A client for `server`. Certificates are checked against the system's roots (and the
    /// bundled Mozilla roots), plus the CA certificates in `ca_cert` when given.
    /// `timeout` is the transfer timeout (silence); lookups get `policies.lookup_timeout`.
    pub fn new(
        server: Server,
        timeout: Duration,
        policies: Policies,
        ca_cert: Option<&Path>,
    ) -> Result<Self, RemoteError> {
        // Each request sets its own deadline (see `send`); connecting is part of every one, so
        // it never takes longer than a lookup may.
        let mut builder = Client::builder()
            .timeout(None)
            .connect_timeout(policies.lookup_timeout.min(timeout))
            .tcp_user_timeout(timeout)
            .user_agent(concat!("nip/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_cert {
            for cert in load_ca_certs(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| RemoteError::Local(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            server,
            policies,
            transfer_timeout: timeout,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.server.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// Sends with retries: 408, 429, 5xx and broken connections are retried up to
    /// `retry_attempts` attempts with exponential backoff (or `Retry-After`); other answers are
    /// returned as they are for the caller to interpret. A server that refuses the connection,
    /// cannot be resolved, fails TLS or stays silent past `timeout` is not asked again: that
    /// would not change soon, and a dead remote must cost a build no more than one deadline.
    /// `timeout` bounds the request until its answer's headers, then each read of its body.
    fn send(
        &self,
        timeout: Duration,
        make: &dyn Fn() -> Result<RequestBuilder, RemoteError>,
    ) -> Result<Response, RemoteError> {
        let attempts = self.policies.retry_attempts.max(1);
        let mut delay = self.policies.retry_delay;
        for attempt in 1..=attempts {
            let last = attempt == attempts;
            let wait = match make()?.timeout(timeout).send() {
                Ok(resp) => {
                    let s = resp.status();
                    let retryable = s.is_server_error()
                        || s == StatusCode::REQUEST_TIMEOUT
                        || s == StatusCode::TOO_MANY_REQUESTS;
                    // 507 means the server's disk is full: retrying soon will not help.
                    if !retryable || last || s == StatusCode::INSUFFICIENT_STORAGE {
                        return Ok(resp);
                    }
                    retry_after(&resp).unwrap_or(delay)
                }
                Err(e) => {
                    let final_ = last || e.is_connect() || e.is_timeout();
                    let err = self.transport_error(e, timeout);
                    if final_ || matches!(err, RemoteError::Tls { .. }) {
                        return Err(err);
                    }
                    delay
                }
            };
            std::thread::sleep(wait);
            delay = delay.saturating_mul(2);
        }
        unreachable!("the last attempt returns")
    }

    fn transport_error(&self, e: reqwest::Error, timeout: Duration) -> RemoteError {
        if e.is_timeout() {
            RemoteError::Timeout {
                url: self.server.url.clone(),
                secs: timeout.as_secs_f64(),
            }
        } else if let Some(tls) = find_rustls_error(&e) {
            RemoteError::Tls {
                url: self.server.url.clone(),
                reason: tls_reason(tls, &self.server.url),
            }
        } else {
            // The innermost cause ("Connection refused") is the useful part.
            let mut reason = e.to_string();
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(s) = src {
                reason = s.to_string();
                src = s.source();
            }
            RemoteError::Unreachable {
                url: self.server.url.clone(),
                reason,
            }
        }
    }

    /// The deadline of lookups, health checks and listings: never longer than a transfer may be
    /// silent.
    fn lookup_timeout(&self) -> Duration {
        self.policies.lookup_timeout.min(self.transfer_timeout)
    }

    /// `GET /v1/health`: is the server up (no auth)?
    pub fn health(&self) -> Result<(), RemoteError> {
        let resp = self.send(self.lookup_timeout(), &|| {
            Ok(self.http.get(self.url("/v1/health")))
        })?;
        expect_success(resp).map(drop)
    }

    /// Checks that the key is accepted, with the cheapest authenticated read: the listing, or on
    /// a server without one (the guide's API has none) a lookup whose miss proves the key.
    pub fn check_auth(&self) -> Result<(), RemoteError> {
        match self.list(None, None, 1) {
            Ok(_) => Ok(()),
            Err(e) if no_such_endpoint(&e) => self.lookup(PROBE_KEY).map(drop),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/artifacts/{key}`: `None` on 404.
    pub fn lookup(&self, key: &str) -> Result<Option<Found>, RemoteError> {
        let url = self.url(&format!("/v1/artifacts/{key}"));
        let resp = self.send(self.lookup_timeout(), &|| {
            Ok(self.authed(self.http.get(&url)))
        })?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let mut found: Found = json(expect_success(resp)?, &url)?;
        found.key = key.to_string();
        // An empty digest says nothing, as an absent one.
        found.sha256 = found.sha256.filter(|s| !s.is_empty());
        Ok(Some(found))
    }

    /// `GET /v1/artifacts/{key}/metadata`.
    pub fn metadata(&self, key: &str) -> Result<serde_json::Value, RemoteError> {
        let url = self.url(&format!("/v1/artifacts/{key}/metadata"));
        let resp = self.send(self.lookup_timeout(), &|| {
            Ok(self.authed(self.http.get(&url)))
        })?;
        json(expect_success(resp)?, &url)
    }

    /// `GET /v1/artifacts?name=&version=&limit=`.
    pub fn list(
        &self,
        name: Option<&str>,
        version: Option<&str>,
        limit: u32,
    ) -> Result<ArtifactList, RemoteError> {
        let url = self.url("/v1/artifacts");
        let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        q.extend(name.map(|n| ("name", n.to_string())));
        q.extend(version.map(|v| ("version", v.to_string())));
        let resp = self.send(self.lookup_timeout(), &|| {
            Ok(self.authed(self.http.get(&url).query(&q)))
        })?;
        json(expect_success(resp)?, &url)
    }

    /// Where to download `download_url` from, and whether the API key may go with it: only to
    /// this server's own origin, never to a third party (e.g. a presigned URL). A path is
    /// relative to the server's base URL.
    fn resolve_download(&self, download_url: &str) -> Result<(String, bool), RemoteError> {
        let bad = |reason: String| RemoteError::BadResponse {
            url: self.server.url.clone(),
            reason,
        };
        let lower = download_url.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            let sep = if download_url.starts_with('/') {
                ""
            } else {
                "/"
            };
            return Ok((format!("{}{sep}{download_url}", self.server.url), true));
        }
        let target = reqwest::Url::parse(download_url)
            .map_err(|e| bad(format!("downloadUrl {download_url:?}: {e}")))?;
        let base =
            reqwest::Url::parse(&self.server.url).map_err(|e| bad(format!("server URL: {e}")))?;
        let same_origin = target.scheme() == base.scheme()
            && target.host_str() == base.host_str()
            && target.port_or_known_default() == base.port_or_known_default();
        Ok((download_url.to_string(), same_origin))
    }

    /// Streams the artifact into a temp file in `dir` while a worker thread hashes it, and hands
    /// every chunk to `tap` too (e.g. an unpacker) as it arrives; the file is returned only when
    /// its size and SHA-256 match `info` (each when known; the size the answer's Content-Length
    /// otherwise), so nothing that contradicts what the server said is ever used.
    pub fn download(
        &self,
        info: &Found,
        dir: &Path,
        mut tap: Option<&mut dyn FnMut(&Chunk)>,
    ) -> Result<Verified, RemoteError> {
        let (url, same_origin) = self.resolve_download(&info.download_url)?;
        let mut resp = self.send(self.transfer_timeout, &|| {
            let rb = self.http.get(&url);
            Ok(if same_origin { self.authed(rb) } else { rb })
        })?;
        if !resp.status().is_success() {
            return Err(status_error(resp));
        }
        let expected_size = info.size.or(resp.content_length());
        let local = |e: std::io::Error| RemoteError::Local(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(local)?;
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(local)?;
        let bar = progress::bar(expected_size.unwrap_or(0), &format!("⬇️  {}", info.key));
        let mut hasher = StreamWorker::spawn("nip-sha256", |r| {
            let mut h = Sha256::new();
            drain(r, |buf| h.update(buf)).map(|_| hex::encode(h.finalize()))
        })
        .map_err(local)?;
        let corrupt = |reason: String| RemoteError::Corrupt {
            key: info.key.clone(),
            reason,
        };
        let mut size = 0u64;
        loop {
            // Never past one byte beyond the announced size: a server sending more is refused at
            // once, before the extra bytes reach the disk or the unpacker.
            let allowed =
                expected_size.map_or(CHUNK as u64, |n| (n - size.min(n) + 1).min(CHUNK as u64));
            let mut buf = Vec::with_capacity(allowed as usize);
            match (&mut resp).take(allowed).read_to_end(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    return Err(RemoteError::Timeout {
                        url: self.server.url.clone(),
                        secs: self.transfer_timeout.as_secs_f64(),
                    })
                }
                Err(e) => {
                    return Err(RemoteError::Unreachable {
                        url: self.server.url.clone(),
                        reason: format!("download interrupted: {e}"),
                    })
                }
            }
            if let Some(n) = expected_size.filter(|&n| size + buf.len() as u64 > n) {
                return Err(corrupt(format!("more than the announced {n} bytes")));
            }
            let chunk: Chunk = Arc::new(buf);
            hasher.feed(&chunk);
            if let Some(tap) = tap.as_mut() {
                tap(&chunk);
            }
            file.write_all(&chunk).map_err(local)?;
            size += chunk.len() as u64;
            if let Some(b) = &bar {
                b.inc(chunk.len() as u64);
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        file.flush().map_err(local)?;
        let sha256 = hasher.finish().map_err(local)?;
        if let Some(n) = expected_size.filter(|&n| n != size) {
            return Err(corrupt(format!("{size} bytes, expected {n}")));
        }
        if let Some(want) = info
            .sha256
            .as_deref()
            .filter(|w| !sha256.eq_ignore_ascii_case(w))
        {
            return Err(corrupt(format!("sha256 {sha256}, expected {want}")));
        }
        Ok(Verified { file, size, sha256 })
    }

    /// `POST /v1/artifacts/{key}`: streams `path` as the `file` part (never read whole into
    /// memory) with the metadata part and the digest header.
    pub fn upload(
        &self,
        key: &str,
        path: &Path,
        sha256: &str,
        metadata: &serde_json::Value,
    ) -> Result<UploadOutcome, RemoteError> {
        let url = self.url(&format!("/v1/artifacts/{key}"));
        let meta = metadata.to_string();
        let len = std::fs::metadata(path)
            .map_err(|e| RemoteError::Local(format!("{}: {e}", path.display())))?
            .len();
        // The request's deadline covers the whole upload: the transfer timeout plus the time
        // the file takes at a slow rate.
        let deadline = self.transfer_timeout + Duration::from_secs(len / MIN_UPLOAD_RATE);
        let resp = self.send(deadline, &|| {
            let file = std::fs::File::open(path)
                .map_err(|e| RemoteError::Local(format!("{}: {e}", path.display())))?;
            let len = file
                .metadata()
                .map_err(|e| RemoteError::Local(format!("{}: {e}", path.display())))?
                .len();
            let bar = progress::bar(len, &format!("⬆️  {key}"));
            let reader = progress::Reader { inner: file, bar };
            let file_part = reqwest::blocking::multipart::Part::reader_with_length(reader, len)
                .file_name(format!("{key}.tar.zst"))
                .mime_str("application/octet-stream")
                .expect("static mime");
            let meta_part = reqwest::blocking::multipart::Part::text(meta.clone())
                .mime_str("application/json")
                .expect("static mime");
            // Metadata first, so a server can validate it before it stores any bytes.
            let form = reqwest::blocking::multipart::Form::new()
                .part("metadata", meta_part)
                .part("file", file_part);
            Ok(self
                .authed(self.http.post(&url))
                .header(HEADER_SHA256, sha256)
                .multipart(form))
        })?;
        match resp.status() {
            StatusCode::CREATED => Ok(UploadOutcome::Created),
            StatusCode::OK => Ok(UploadOutcome::AlreadyPresent),
            _ => Err(status_error(resp)),
        }
    }
}

/// Reads a PEM bundle of CA certificates (`--ca-cert`, `caCert`, `SSL_CERT_FILE`).
fn load_ca_certs(path: &Path) -> Result<Vec<reqwest::Certificate>, RemoteError> {
    let bad = |why: String| RemoteError::Local(format!("CA certificate {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The rustls error behind a reqwest error, if any. It sits inside nested `io::Error`s
/// (reqwest 0.12: Other wrapping InvalidData wrapping it), whose `source()` skips the wrapped
/// error, so each `io::Error` is opened with `get_ref`.
fn find_rustls_error(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// One line saying what failed in a TLS handshake, and what to do about it.
pub fn tls_reason(e: &rustls::Error, url: &str) -> String {
    use rustls::CertificateError as C;
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(String::from))
        .unwrap_or_default();
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "certificate signed by an unknown CA (trust a private CA with \
                 `nip cache remote config --ca-cert FILE` or SSL_CERT_FILE)"
                .into(),
            C::Expired | C::ExpiredContext { .. } => "the server's certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (check the clocks)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for host {host:?} (wrong host name)")
            }
            C::Revoked => "the server's certificate has been revoked".into(),
            C::BadSignature => {
                "the server's certificate has a bad signature".into()
            }
            other => format!("invalid server certificate: {other:?}"),
        },
        rustls::Error::InvalidMessage(_) => {
            "handshake failed: the server did not answer in TLS (is it serving plain HTTP? then use http://)".into()
        }
        other => format!("handshake failed: {other}"),
    }
}

/// Seconds from a `Retry-After` header (the HTTP-date form is rare for APIs and ignored), capped.
fn retry_after(resp: &Response) -> Option<Duration> {
    let secs: u64 = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Whether an error answer says the server has no such endpoint (a server of the guide's API
/// without the optional listing).
pub(crate) fn no_such_endpoint(e: &RemoteError) -> bool {
    matches!(
        e,
        RemoteError::Status { status, .. } if matches!(
            *status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
        )
    )
}

/// Whether a body read failed on the request's deadline (reqwest's timeout inside an io::Error).
fn is_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<reqwest::Error>())
            .is_some_and(reqwest::Error::is_timeout)
}

fn expect_success(resp: Response) -> Result<Response, RemoteError> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(status_error(resp))
    }
}

/// Turns an error answer into a `RemoteError`, using the shared `{"error": …}` body when present.
pub(crate) fn status_error(resp: Response) -> RemoteError {
    let status = resp.status();
    let mut body = Vec::new();
    // An error body is small; read at most 64 KiB of it.
    let _ = resp.take(64 * 1024).read_to_end(&mut body);
    let message = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| b.error)
        .unwrap_or_else(|_| status.canonical_reason().unwrap_or("error").to_string());
    match status {
        StatusCode::UNAUTHORIZED => RemoteError::Unauthorized { message },
        StatusCode::FORBIDDEN => RemoteError::Forbidden { message },
        _ => RemoteError::Status { status, message },
    }
}

fn json<T: serde::de::DeserializeOwned>(resp: Response, url: &str) -> Result<T, RemoteError> {
    serde_json::from_reader(resp).map_err(|e| RemoteError::BadResponse {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A one-shot-per-connection HTTP server answering `responses` in turn (the last repeats),
    /// counting the requests it saw.
    fn fake(responses: Vec<&'static str>) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().take(20) {
                let Ok(mut c) = conn else { return };
                let i = count.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let r = responses[i.min(responses.len() - 1)];
                let _ = c.write_all(r.as_bytes());
            }
        });
        (url, seen)
    }

    fn client(url: &str, attempts: u32) -> RemoteClient {
        let server = Server {
            url: url.to_string(),
            priority: 0,
            api_key: Some("k".into()),
        };
        let policies = Policies {
            upload_on_build: true,
            download_before_build: true,
            fallback_to_local: true,
            retry_attempts: attempts,
            retry_delay: Duration::from_millis(10),
            ..crate::config::effective(&Default::default(), &Default::default())
                .unwrap()
                .policies
        };
        RemoteClient::new(server, Duration::from_secs(5), policies, None).unwrap()
    }

    const UNAVAILABLE: &str = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    const NOT_FOUND: &str = "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 23\r\nConnection: close\r\n\r\n{\"error\":\"not found\"}\r\n";
    const FORBIDDEN: &str = "HTTP/1.1 403 Forbidden\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{\"error\":\"no scope\"}";

    #[test]
    fn a_download_longer_than_announced_is_refused_before_the_extra_bytes_are_used() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = c.read(&mut [0u8; 4096]);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            // Far more than announced, and bounded so the test ends either way.
            for _ in 0..256 {
                if c.write_all(&[7u8; 64 * 1024]).is_err() {
                    return;
                }
            }
        });
        let info = Found {
            key: "k".into(),
            download_url: "/v1/download/k".into(),
            size: Some(1000),
            sha256: Some("00".into()),
            created_at: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut tapped = 0usize;
        let mut tap = |c: &Chunk| tapped += c.len();
        let err = match client(&url, 1).download(&info, dir.path(), Some(&mut tap)) {
            Err(e) => e,
            Ok(_) => panic!("accepted a download longer than announced"),
        };
        assert!(
            err.to_string()
                .contains("more than the announced 1000 bytes"),
            "{err}"
        );
        assert_eq!(
            tapped, 0,
            "bytes past the announced size reached the unpacker"
        );
        // The temp file went with the error.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn server_errors_are_retried_then_the_answer_is_used() {
        let (url, seen) = fake(vec![UNAVAILABLE, UNAVAILABLE, NOT_FOUND]);
        assert!(client(&url, 3).lookup("k").unwrap().is_none());
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn retries_stop_at_the_attempt_limit() {
        let (url, seen) = fake(vec![UNAVAILABLE]);
        let err = client(&url, 2).lookup("k").unwrap_err();
        assert!(err.to_string().starts_with("503"), "{err}");
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn client_errors_are_not_retried_and_keep_the_server_message() {
        let (url, seen) = fake(vec![FORBIDDEN]);
        let err = client(&url, 3).lookup("k").unwrap_err();
        assert!(
            matches!(&err, RemoteError::Forbidden { message } if message == "no scope"),
            "{err}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn tls_failures_say_what_failed() {
        use rustls::CertificateError as C;
        let reason = |c| {
            tls_reason(
                &rustls::Error::InvalidCertificate(c),
                "https://cache.test:8501",
            )
        };
        assert!(reason(C::UnknownIssuer).contains("unknown CA"));
        assert!(reason(C::Expired).contains("expired"));
        assert!(reason(C::NotValidForName).contains("not valid for host \"cache.test\""));
        assert!(reason(C::NotValidYet).contains("not valid yet"));
    }

    /// A loopback port that nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn assert_took_under(started: std::time::Instant, limit: Duration) {
        let took = started.elapsed();
        assert!(took < limit, "{took:?}");
    }

    fn client_timeouts(url: &str, lookup: Duration, transfer: Duration) -> RemoteClient {
        let mut c = client(url, 3);
        c.policies.retry_delay = Duration::from_secs(5);
        c.policies.lookup_timeout = lookup;
        RemoteClient::new(c.server, transfer, c.policies, None).unwrap()
    }

    #[test]
    fn a_refused_connection_is_not_retried() {
        let port = closed_port();
        let rc = client_timeouts(
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(5),
            Duration::from_secs(300),
        );
        let started = std::time::Instant::now();
        let err = rc.lookup("k").unwrap_err();
        assert!(matches!(err, RemoteError::Unreachable { .. }), "{err}");
        // Three attempts 5 s apart would take 15 s.
        assert_took_under(started, Duration::from_secs(2));
    }

    #[test]
    fn a_silent_server_costs_a_lookup_one_deadline() {
        // Connections complete in the kernel's backlog; nothing ever answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let rc = client_timeouts(&url, Duration::from_millis(500), Duration::from_secs(300));
        let started = std::time::Instant::now();
        let err = rc.lookup("k").unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, RemoteError::Timeout { .. }), "{err}");
        assert!(err.to_string().starts_with("timeout: "), "{err}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        drop(l);
    }

    /// A server answering one request per connection with `answer(request head)`.
    fn serve(answer: fn(&str, &str) -> Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let base = url.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().take(20) {
                let Ok(mut c) = conn else { return };
                let mut buf = [0u8; 8192];
                let n = c.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let _ = c.write_all(&answer(&head, &base));
            }
        });
        url
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn a_lookup_with_only_a_download_url_is_enough_and_the_key_goes_to_the_same_origin() {
        let url = serve(|head, base| {
            let authed = head.contains("authorization: Bearer k");
            if head.starts_with("GET /v1/artifacts/k ") {
                ok(format!(r#"{{"downloadUrl":"{base}/v1/download/k"}}"#).as_bytes())
            } else if head.starts_with("GET /v1/download/k ") && authed {
                ok(b"bytes")
            } else {
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec()
            }
        });
        let rc = client(&url, 1);
        let found = rc.lookup("k").unwrap().unwrap();
        assert_eq!(
            (found.key.as_str(), found.size, found.sha256.as_deref()),
            ("k", None, None)
        );
        let dir = tempfile::tempdir().unwrap();
        let v = rc.download(&found, dir.path(), None).unwrap();
        assert_eq!(std::fs::read(v.file.path()).unwrap(), b"bytes");
        assert_eq!(v.size, 5);
        // What is known is checked: a SHA-256 from elsewhere (the metadata) that does not match.
        let wrong = Found {
            sha256: Some("00".into()),
            ..found.clone()
        };
        let err = rc.download(&wrong, dir.path(), None).map(drop).unwrap_err();
        assert!(matches!(err, RemoteError::Corrupt { .. }), "{err}");
        // A path without a leading slash is relative to the server too.
        let rel = Found {
            download_url: "v1/download/k".into(),
            ..found
        };
        assert_eq!(rc.download(&rel, dir.path(), None).unwrap().size, 5);
    }

    #[test]
    fn the_key_never_goes_to_another_origin() {
        let rc = client("http://127.0.0.1:8501", 1);
        let resolve = |u: &str| rc.resolve_download(u).unwrap();
        assert_eq!(
            resolve("/v1/download/k"),
            ("http://127.0.0.1:8501/v1/download/k".into(), true)
        );
        assert!(resolve("http://127.0.0.1:8501/other/k").1);
        assert!(!resolve("http://127.0.0.1:9000/v1/download/k").1);
        assert!(!resolve("https://127.0.0.1:8501/v1/download/k").1);
        assert!(!resolve("http://s3.example/bucket/k?sig=1").1);
    }

    #[test]
    fn a_download_that_goes_silent_fails_after_the_transfer_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = c.read(&mut [0u8; 4096]);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf");
            std::thread::sleep(Duration::from_secs(10));
        });
        let rc = client_timeouts(&url, Duration::from_secs(5), Duration::from_secs(1));
        let info = Found {
            key: "k".into(),
            download_url: "/v1/download/k".into(),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let err = rc.download(&info, dir.path(), None).map(drop).unwrap_err();
        assert!(matches!(err, RemoteError::Timeout { .. }), "{err}");
        assert_took_under(started, Duration::from_secs(4));
    }

    #[test]
    fn unreachable_server_is_a_one_line_error() {
        let port = closed_port();
        let err = client(&format!("http://127.0.0.1:{port}"), 2)
            .health()
            .unwrap_err();
        assert!(matches!(err, RemoteError::Unreachable { .. }), "{err}");
        assert!(!err.to_string().contains('\n'));
    }
}
