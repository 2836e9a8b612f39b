//! The `/v1` HTTP client for one server: health, lookup, streamed download (hashed and verified),
//! streamed multipart upload and listing, with the retry policy applied to every request.
use crate::config::{Policies, Server};
use crate::progress;
use crate::worker::{drain, Chunk, StreamWorker};
use nip_core::api::{ArtifactInfo, ArtifactList, ErrorBody, HEADER_SHA256};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::StatusCode;
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
    #[error("timed out talking to {url}")]
    Timeout { url: String },
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

/// What an upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadOutcome {
    Created,
    /// The server already held these exact bytes (200).
    AlreadyPresent,
}

/// A downloaded artifact whose size and SHA-256 matched the lookup, still in a temp file.
pub struct Verified {
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub sha256: String,
}

pub struct RemoteClient {
    http: Client,
    pub server: Server,
    policies: Policies,
}

const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Bytes read from the response at a time and handed to the hashing and unpacking workers.
const CHUNK: usize = 256 * 1024;

impl RemoteClient {
    /// A client for `server`. Certificates are checked against the system's roots (and the
    /// bundled Mozilla roots), plus the CA certificates in `ca_cert` when given.
    pub fn new(
        server: Server,
        timeout: Duration,
        policies: Policies,
        ca_cert: Option<&Path>,
    ) -> Result<Self, RemoteError> {
        let mut builder = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
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

    /// Sends with retries: connection errors, timeouts, 408, 429 and 5xx are retried up to
    /// `retry_attempts` attempts with exponential backoff (or `Retry-After`); other answers are
    /// returned as they are for the caller to interpret.
    fn send(
        &self,
        make: &dyn Fn() -> Result<RequestBuilder, RemoteError>,
    ) -> Result<Response, RemoteError> {
        let attempts = self.policies.retry_attempts.max(1);
        let mut delay = self.policies.retry_delay;
        for attempt in 1..=attempts {
            let last = attempt == attempts;
            let wait = match make()?.send() {
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
                    let err = self.transport_error(e);
                    // A certificate problem does not go away by asking again.
                    if last || matches!(err, RemoteError::Tls { .. }) {
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

    fn transport_error(&self, e: reqwest::Error) -> RemoteError {
        if e.is_timeout() {
            RemoteError::Timeout {
                url: self.server.url.clone(),
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

    /// `GET /v1/health`: is the server up (no auth)?
    pub fn health(&self) -> Result<(), RemoteError> {
        let resp = self.send(&|| Ok(self.http.get(self.url("/v1/health"))))?;
        expect_success(resp).map(drop)
    }

    /// Checks that the key is accepted, with the cheapest authenticated read.
    pub fn check_auth(&self) -> Result<(), RemoteError> {
        self.list(None, None, 1).map(drop)
    }

    /// `GET /v1/artifacts/{key}`: `None` on 404.
    pub fn lookup(&self, key: &str) -> Result<Option<ArtifactInfo>, RemoteError> {
        let url = self.url(&format!("/v1/artifacts/{key}"));
        let resp = self.send(&|| Ok(self.authed(self.http.get(&url))))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        json(expect_success(resp)?, &url).map(Some)
    }

    /// `GET /v1/artifacts/{key}/metadata`.
    pub fn metadata(&self, key: &str) -> Result<serde_json::Value, RemoteError> {
        let url = self.url(&format!("/v1/artifacts/{key}/metadata"));
        let resp = self.send(&|| Ok(self.authed(self.http.get(&url))))?;
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
        let resp = self.send(&|| Ok(self.authed(self.http.get(&url).query(&q))))?;
        json(expect_success(resp)?, &url)
    }

    /// Streams the artifact into a temp file in `dir` while a worker thread hashes it, and hands
    /// every chunk to `tap` too (e.g. an unpacker) as it arrives; the file is returned only when
    /// its size and SHA-256 match `info`, so nothing unverified is ever used.
    pub fn download(
        &self,
        info: &ArtifactInfo,
        dir: &Path,
        mut tap: Option<&mut dyn FnMut(&Chunk)>,
    ) -> Result<Verified, RemoteError> {
        let url = if info.download_url.starts_with('/') {
            self.url(&info.download_url)
        } else {
            info.download_url.clone()
        };
        // The token goes only to our own server, never to a third-party (e.g. presigned) URL.
        let same_origin = url.starts_with(&format!("{}/", self.server.url));
        let mut resp = self.send(&|| {
            let rb = self.http.get(&url);
            Ok(if same_origin { self.authed(rb) } else { rb })
        })?;
        if !resp.status().is_success() {
            return Err(status_error(resp));
        }
        let local = |e: std::io::Error| RemoteError::Local(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(local)?;
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(local)?;
        let bar = progress::bar(info.size, &format!("⬇️  {}", info.key));
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
            let allowed = (info.size - size + 1).min(CHUNK as u64);
            let mut buf = Vec::with_capacity(allowed as usize);
            match (&mut resp).take(allowed).read_to_end(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(RemoteError::Unreachable {
                        url: self.server.url.clone(),
                        reason: format!("download interrupted: {e}"),
                    })
                }
            }
            if size + buf.len() as u64 > info.size {
                return Err(corrupt(format!(
                    "more than the announced {} bytes",
                    info.size
                )));
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
        if size != info.size {
            return Err(corrupt(format!("{size} bytes, expected {}", info.size)));
        }
        if !sha256.eq_ignore_ascii_case(&info.sha256) {
            return Err(corrupt(format!(
                "sha256 {sha256}, expected {}",
                info.sha256
            )));
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
        let resp = self.send(&|| {
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
        let info = ArtifactInfo {
            key: "k".into(),
            download_url: "/v1/download/k".into(),
            size: 1000,
            sha256: "00".into(),
            created_at: String::new(),
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

    #[test]
    fn unreachable_server_is_a_one_line_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = client(&format!("http://127.0.0.1:{port}"), 2)
            .health()
            .unwrap_err();
        assert!(matches!(err, RemoteError::Unreachable { .. }), "{err}");
        assert!(!err.to_string().contains('\n'));
    }
}
