//! A fake upstream binary cache with fault injection, signed fixtures, and an in-process nip.
#![allow(dead_code)]
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use nip_core::hash::NixHash;
use nip_core::nar_file::{Compression, NarFileName};
use nip_core::narinfo::NarInfo;
use nip_core::signing::{PublicKey, SigningKey};
use nip_core::store_path::StorePath;
use nip_server::settings::Layer;
use nip_server::AppState;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// How the fake upstream answers one path.
#[derive(Clone)]
pub enum Behavior {
    Serve(Bytes),
    Status(u16),
    /// Never answers.
    Hang,
    /// Announces the full length, sends `keep` bytes, then drops the connection.
    Truncate {
        body: Bytes,
        keep: usize,
    },
    /// Sends the body in chunks with a pause before each.
    Slow {
        body: Bytes,
        chunk: usize,
        delay: Duration,
    },
    /// Sends part of the body, then stalls forever.
    Stall {
        body: Bytes,
        keep: usize,
    },
    /// Writes these bytes (status line, headers, body) to the socket verbatim, then closes it:
    /// for what an HTTP library would refuse to send (a Content-Length that lies).
    Raw(Bytes),
    /// Writes these bytes verbatim, then resets the connection (TCP RST, not a clean close).
    RawReset(Bytes),
}

/// A raw HTTP/1.1 200 answer announcing `content_length` and carrying `body`.
pub fn raw_response(content_length: usize, body: &[u8]) -> Bytes {
    let mut v =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {content_length}\r\nconnection: close\r\n\r\n")
            .into_bytes();
    v.extend_from_slice(body);
    Bytes::from(v)
}

#[derive(Default)]
struct FakeState {
    routes: Mutex<HashMap<String, Behavior>>,
    hits: Mutex<HashMap<String, usize>>,
    priority: Mutex<u32>,
}

pub struct FakeUpstream {
    pub url: String,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_handler(State(state): State<Arc<FakeState>>, uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/').to_string();
    *state.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let behavior = state.routes.lock().unwrap().get(&path).cloned();
    let behavior = match (behavior, path.as_str()) {
        (Some(b), _) => b,
        (None, "nix-cache-info") => {
            let p = *state.priority.lock().unwrap();
            Behavior::Serve(Bytes::from(format!(
                "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {p}\n"
            )))
        }
        (None, _) => Behavior::Status(404),
    };
    match behavior {
        Behavior::Serve(body) => body.into_response(),
        Behavior::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Behavior::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Behavior::Truncate { body, keep } => {
            let len = body.len();
            let part = body.slice(..keep);
            // The pause lets headers and the first bytes go out before the cut.
            let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(part) }).chain(
                futures::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err(std::io::Error::other("connection cut by the fake upstream"))
                }),
            );
            Response::builder()
                .header("content-length", len)
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Behavior::Slow { body, chunk, delay } => {
            let len = body.len();
            let chunks: Vec<Bytes> = (0..len)
                .step_by(chunk)
                .map(|i| body.slice(i..(i + chunk).min(len)))
                .collect();
            let stream = futures::stream::unfold(chunks.into_iter(), move |mut it| async move {
                let next = it.next()?;
                tokio::time::sleep(delay).await;
                Some((Ok::<_, std::io::Error>(next), it))
            });
            Response::builder()
                .header("content-length", len)
                .body(Body::from_stream(stream))
                .unwrap()
        }
        // Answered on the socket by `serve_raw` before hyper sees the request.
        Behavior::Raw(_) | Behavior::RawReset(_) => StatusCode::IM_A_TEAPOT.into_response(),
        Behavior::Stall { body, keep } => {
            let len = body.len();
            let part = body.slice(..keep);
            let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(part) }).chain(
                futures::stream::once(async {
                    std::future::pending::<()>().await;
                    Ok(Bytes::new())
                }),
            );
            Response::builder()
                .header("content-length", len)
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

use futures::StreamExt;

/// One connection to the fake upstream. Keep-alive is off, so every request arrives on a fresh
/// connection whose request line can be peeked at: raw behaviours answer on the socket itself.
async fn serve_fake_connection(
    stream: tokio::net::TcpStream,
    app: axum::Router,
    state: Arc<FakeState>,
) {
    if let Some(path) = peek_path(&stream).await {
        let raw = match state.routes.lock().unwrap().get(&path) {
            Some(Behavior::Raw(b)) => Some((b.clone(), false)),
            Some(Behavior::RawReset(b)) => Some((b.clone(), true)),
            _ => None,
        };
        if let Some((bytes, reset)) = raw {
            *state.hits.lock().unwrap().entry(path).or_default() += 1;
            serve_raw(stream, &bytes, reset).await;
            return;
        }
    }
    use tower::ServiceExt;
    let service = hyper_util::service::TowerToHyperService::new(
        app.map_request(|req: axum::http::Request<hyper::body::Incoming>| req.map(Body::new)),
    );
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().keep_alive(false);
    let _ = builder
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// The path of the request line (without `/` and query), once it has arrived.
async fn peek_path(stream: &tokio::net::TcpStream) -> Option<String> {
    let mut buf = [0u8; 4096];
    for _ in 0..200 {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].windows(2).position(|w| w == b"\r\n") {
            let line = std::str::from_utf8(&buf[..end]).ok()?;
            let target = line.split(' ').nth(1)?;
            let path = target.split('?').next()?.trim_start_matches('/');
            return Some(path.to_string());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Reads the request head, writes `bytes` as they are, then closes or resets the connection.
async fn serve_raw(mut stream: tokio::net::TcpStream, bytes: &[u8], reset: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if stream.write_all(bytes).await.is_err() {
        return;
    }
    let _ = stream.flush().await;
    if reset {
        // Let the bytes reach the client before the RST discards what is still in flight.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.set_zero_linger();
    } else {
        let _ = stream.shutdown().await;
    }
}

impl FakeUpstream {
    pub async fn start(priority: u32) -> Self {
        let state = Arc::new(FakeState::default());
        *state.priority.lock().unwrap() = priority;
        let app = axum::Router::new()
            .fallback(fake_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (app, state) = (app.clone(), shared.clone());
                tokio::spawn(serve_fake_connection(stream, app, state));
            }
        });
        FakeUpstream { url, state, task }
    }

    pub fn set(&self, path: &str, b: Behavior) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.trim_start_matches('/').to_string(), b);
    }

    /// Serves the entry's narinfo and NAR correctly.
    pub fn publish(&self, e: &Entry) {
        self.set(
            &e.narinfo_path(),
            Behavior::Serve(Bytes::from(e.narinfo.to_text())),
        );
        self.set(&e.nar_path, Behavior::Serve(e.nar.clone()));
    }

    /// Requests for anything but `/nix-cache-info` (which nip polls on its own).
    pub fn total_hits(&self) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "nix-cache-info")
            .map(|(_, v)| v)
            .sum()
    }

    pub fn hits(&self, path: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path.trim_start_matches('/'))
            .copied()
            .unwrap_or(0)
    }
}

/// A store path with its (fake) NAR bytes and a narinfo signed by an upstream key.
#[derive(Clone)]
pub struct Entry {
    pub hash: String,
    pub narinfo: NarInfo,
    pub nar: Bytes,
    /// Where the upstream serves the NAR, relative to its base URL.
    pub nar_path: String,
}

impl Entry {
    pub fn narinfo_path(&self) -> String {
        format!("{}.narinfo", self.hash)
    }
}

pub fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    Bytes::from(v)
}

pub fn random_hash() -> String {
    let mut b = [0u8; 20];
    rand::thread_rng().fill_bytes(&mut b);
    nip_core::base32::encode(&b)
}

/// Makes an entry of `size` random bytes, its NAR stored with `compression`, signed by `key`.
pub fn make_entry(name: &str, size: usize, compression: Compression, key: &SigningKey) -> Entry {
    let hash = random_hash();
    let nar = random_bytes(size);
    let file_hash = NixHash::sha256(Sha256::digest(&nar).into());
    let nar_hash = NixHash::sha256(Sha256::digest(random_bytes(32)).into());
    let file = NarFileName::new(&file_hash, compression);
    let store_path = StorePath::parse_base_name(&format!("{hash}-{name}")).unwrap();
    let dep = StorePath::parse_base_name(&format!("{}-dep", random_hash())).unwrap();
    let mut narinfo = NarInfo {
        store_path,
        url: format!("nar/{file}"),
        compression: Some(compression.narinfo_name().to_string()),
        file_hash: Some(file_hash),
        file_size: Some(size as u64),
        nar_hash,
        nar_size: size as u64 * 2,
        references: vec![dep],
        deriver: None,
        system: Some("x86_64-linux".into()),
        sigs: vec![],
        ca: None,
        extra: vec![],
    };
    narinfo.sign(key);
    Entry {
        hash,
        nar_path: format!("nar/{file}"),
        narinfo,
        nar,
    }
}

pub fn upstream_key() -> SigningKey {
    SigningKey::generate("upstream-test-1").unwrap()
}

/// A nip server running in this process on a loopback port.
pub struct Nip {
    pub url: String,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Nip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn layer_with(pairs: Vec<(&'static str, Vec<String>)>) -> Layer {
    pairs.into_iter().collect()
}

/// Starts nip in front of `upstreams` trusting `keys`, with short timeouts; `extra` settings win.
pub async fn start_nip(
    upstreams: &[&FakeUpstream],
    keys: &[PublicKey],
    extra: Vec<(&'static str, Vec<String>)>,
) -> Nip {
    // Logs show in failing tests' output (RUST_LOG=debug for more).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nip_server=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut layer = layer_with(vec![
        ("cache.hostname", vec!["nip-test".into()]),
        (
            "cache.storage.local",
            vec![dir.path().join("data").display().to_string()],
        ),
        (
            "cache.upstream.urls",
            upstreams.iter().map(|u| u.url.clone()).collect(),
        ),
        (
            "cache.upstream.public-keys",
            keys.iter().map(|k| k.to_string()).collect(),
        ),
        ("cache.upstream.response-header-timeout", vec!["1s".into()]),
        ("cache.upstream.body-idle-timeout", vec!["1s".into()]),
        // These tests drive fills by their requests (and change what the upstream serves
        // between the narinfo and the NAR); prefetch.rs turns prefetching on.
        ("cache.prefetch-nar-max-size", vec!["0".into()]),
    ]);
    layer.extend(extra);
    let config = nip_server::config::ServeConfig::from_layer(&layer).unwrap();
    let state = AppState::open(config).await.unwrap();
    // Priorities are learned before tests look at them.
    state.upstreams().refresh_priorities().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let s = state.clone();
    let task = tokio::spawn(async move {
        nip_server::serve(listener, s, std::future::pending())
            .await
            .unwrap();
    });
    Nip {
        url,
        state,
        dir,
        task,
    }
}

impl Nip {
    pub fn staging_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("data/tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits (5 s at most) until no staged file is left: a fill removes its own once the NAR is
    /// published, which may be just after its clients got the last byte.
    pub async fn staging_files_settled(&self) -> usize {
        for _ in 0..250 {
            if self.staging_files() == 0 {
                return 0;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.staging_files()
    }

    /// The index's narinfo record for a store path hash.
    pub async fn narinfo_record(&self, hash: &str) -> Option<nip_store::NarInfoRecord> {
        self.state.index().get_narinfo(hash).await.unwrap()
    }

    pub fn stored_nar(&self, file: &str) -> bool {
        self.dir.path().join("data/store/nar").join(file).exists()
    }

    /// Waits (5 s at most) until a filled NAR is stored and recorded: clients get the last byte
    /// once it is checked, and the fsync, rename and row follow just after.
    pub async fn wait_cached(&self, file: &str) -> bool {
        for _ in 0..250 {
            if self.stored_nar(file) && self.state.index().get_nar(file).await.unwrap().is_some() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        false
    }
}

/// Nothing of the NAR is stored: no file, no row, no staged leftovers (the fill task cleans up
/// right after the client sees the error). `what` names the case in the failure.
pub async fn assert_nar_not_cached(nip: &Nip, nar_file: &str, what: &str) {
    for _ in 0..100 {
        if nip.staging_files() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(nip.staging_files(), 0, "{what}: staged file left behind");
    assert!(!nip.stored_nar(nar_file), "{what}: bad NAR was stored");
    assert!(
        nip.state.index().get_nar(nar_file).await.unwrap().is_none(),
        "{what}: bad NAR was recorded"
    );
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// GET and read the whole body; `Err` when the body was cut short.
pub async fn get(url: &str) -> (u16, Result<Bytes, String>) {
    let resp = client().get(url).send().await.expect("request failed");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.map_err(|e| e.to_string()))
}

/// The NAR file name the proxy serves an entry's NAR under.
pub fn served_nar_path(narinfo_text: &str) -> String {
    NarInfo::parse(narinfo_text).unwrap().url
}

/// The NAR path (`nar/…`) of `e` in the narinfo `nip` serves for it.
pub async fn served_nar_path_of(nip: &Nip, e: &Entry) -> String {
    let (_, text) = get(&format!("{}/{}.narinfo", nip.url, e.hash)).await;
    served_nar_path(std::str::from_utf8(&text.unwrap()).unwrap())
}

/// The URL of `e`'s NAR as `nip` serves it (the NAR path its narinfo names).
pub async fn served_nar_url(nip: &Nip, e: &Entry) -> String {
    format!("{}/{}", nip.url, served_nar_path_of(nip, e).await)
}

/// A bad upstream (priority 10) that answers `fault` at `path` and a good one (priority 50), both
/// publishing `e`, and nip in front of both trusting `key`.
pub async fn bad_before_good(
    e: &Entry,
    key: &SigningKey,
    path: &str,
    fault: Behavior,
) -> (FakeUpstream, FakeUpstream, Nip) {
    let bad = FakeUpstream::start(10).await;
    let good = FakeUpstream::start(50).await;
    bad.publish(e);
    good.publish(e);
    bad.set(path, fault);
    let nip = start_nip(&[&bad, &good], &[key.public_key()], vec![]).await;
    (bad, good, nip)
}

/// One upstream (priority 40) publishing `entries`, and nip in front of it trusting `key`.
pub async fn nip_over(key: &SigningKey, entries: &[&Entry]) -> (FakeUpstream, Nip) {
    let up = FakeUpstream::start(40).await;
    for e in entries {
        up.publish(e);
    }
    let nip = start_nip(&[&up], &[key.public_key()], vec![]).await;
    (up, nip)
}

/// nip in front of an upstream with nothing, `/v1` open to `token`.
pub async fn start_nip_with_api_key(token: &str) -> (FakeUpstream, Nip) {
    let up = FakeUpstream::start(40).await;
    let key = upstream_key();
    let nip = start_nip(
        &[&up],
        &[key.public_key()],
        vec![("cache.api-key", vec![token.into()])],
    )
    .await;
    (up, nip)
}

/// After a failed fill, the next GET of `nar_url` gets the whole NAR, fetched once from `good`,
/// and the NAR is stored.
pub async fn assert_refetched_from(
    nip: &Nip,
    good: &FakeUpstream,
    e: &Entry,
    nar_url: &str,
    nar_file: &str,
    what: &str,
) {
    let (status, body) = get(nar_url).await;
    assert_eq!(status, 200, "{what}");
    assert_eq!(body.unwrap(), e.nar, "{what}");
    assert_eq!(good.hits(&e.nar_path), 1, "{what}");
    assert!(nip.wait_cached(nar_file).await, "{what}");
}
