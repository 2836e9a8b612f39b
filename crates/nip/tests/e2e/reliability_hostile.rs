//! Hostile connections against the real binary: many idle sockets, slowloris heads, oversized
//! heads, chunked bodies without Content-Length that stream or stall. The server bounds each
//! (`NIP_SERVER_READ_TIMEOUT`, 64 KiB heads, body idle timeout) and keeps serving everyone else.
//! Short mode opens 2000 idle connections; `NIP_IDLE_CONNECTIONS=10000` is the long mode (mind
//! `ulimit -n`).
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::common::*;
use crate::reliability_load::rss_kib;

const DUMMY_UPSTREAM: [&str; 4] = [
    "--upstream-cache",
    "http://127.0.0.1:9",
    "--upstream-public-key",
    "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
];

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Whether the server has closed this connection (EOF, reset, or an error answer then EOF).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a 408 before the close
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Plain requests still work, quickly enough to be called "served".
fn assert_serving(url: &str, what: &str) {
    let c = http_client(10);
    for _ in 0..20 {
        let r = c
            .get(format!("{url}/nix-cache-info"))
            .send()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.status(), 200, "{what}");
    }
}

fn start(data: &std::path::Path, idle: usize) -> NipServer {
    start_nip_env(
        data,
        &DUMMY_UPSTREAM,
        &[
            ("NIP_SERVER_READ_TIMEOUT", "2s"),
            ("NIP_SERVER_MAX_CONNECTIONS", &(idle + 1000).to_string()),
        ],
    )
}

/// Thousands of connections that send nothing and slowloris clients that send a header byte at a
/// time: others are served meanwhile, memory stays bounded, and the server closes them all
/// after the read timeout instead of keeping them forever.
#[test]
fn idle_and_slowloris_connections_are_closed_while_others_are_served() {
    let idle = env_num("NIP_IDLE_CONNECTIONS", 2000) as usize;
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp.path().join("data"), idle);
    let pid = server.child.0.id();
    let rss_before = rss_kib(pid);
    let address = addr(&server.url);

    let slow: Vec<_> = (0..10)
        .map(|_| {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&address).unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .unwrap();
                let started = Instant::now();
                // One byte every 300 ms, for at most 60 s.
                while started.elapsed() < Duration::from_secs(60) {
                    if s.write_all(b"a").is_err() || closed_by_server(&mut s) {
                        return Some(started.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                None
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(idle);
    for i in 0..idle {
        let s = TcpStream::connect(&address).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(tmp.path().join("data.log")).unwrap_or_default();
            panic!(
                "idle connection {i}: {e}\n{}",
                &log[log.len().saturating_sub(3000)..]
            )
        });
        sockets.push(s);
    }
    assert_serving(&server.url, "with idle and slowloris connections open");
    let rss_open = rss_kib(pid);

    for t in slow {
        let took = t
            .join()
            .unwrap()
            .expect("slowloris connection was never closed");
        // Generous: the timeout is 2 s.
        assert!(
            took < Duration::from_secs(30),
            "slowloris kept for {took:?}"
        );
    }
    // The idle ones went past the read timeout too.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open: Vec<TcpStream> = sockets;
    while !open.is_empty() && Instant::now() < deadline {
        open.retain_mut(|s| !closed_by_server(s));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        open.is_empty(),
        "{} of {idle} idle connections still open",
        open.len()
    );
    assert_serving(&server.url, "after the idle connections were closed");
    eprintln!(
        "hostile: {idle} idle + 10 slowloris connections; RSS {} MiB before, {} MiB with them open",
        rss_before / 1024,
        rss_open / 1024
    );
    // Generous: a few KiB per connection, far from hyper's default 400 KiB head buffer each.
    assert!(
        rss_open < rss_before + (idle as u64 * 64) + 256 * 1024,
        "RSS {rss_before} → {rss_open} KiB"
    );
}

/// Sends `head` on a new connection to the server at `url`: what it answered before closing.
/// The server may close before reading it all: a write error is a refusal too.
fn send_raw(url: &str, head: &[u8]) -> String {
    let mut s = TcpStream::connect(addr(url)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(head);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request head over 64 KiB is refused (431 or a close), with no effect on other clients.
#[test]
fn oversized_request_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp.path().join("data"), 0);
    for size in [100 * 1024, 4 << 20] {
        let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        head.resize(head.len() + size, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        let answer = send_raw(&server.url, &head);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{size}-byte head: {answer}"
        );
        // Many small headers: also bounded.
        let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..5000 {
            head.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let answer = send_raw(&server.url, &head);
        assert!(
            !answer.starts_with("HTTP/1.1 200"),
            "5000 headers: {answer}"
        );
        assert!(!answer.starts_with("HTTP/1.1 5"), "5000 headers: {answer}");
    }
    assert_serving(&server.url, "after oversized heads");
}

/// Bodies without Content-Length (chunked): a 20 MiB upload streams in and is stored exactly; one
/// that stalls is cut after the read timeout, leaves no temp file and no artifact, and other
/// clients are served while it hangs.
#[test]
fn chunked_bodies_stream_and_stalled_ones_time_out() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let token = create_key(&data, "chunked", "write", &[]);
    let server = start(&data, 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = server.url.clone();
    rt.block_on(async move {
        let client = reqwest::Client::new();
        let chunk = bytes_of(64 * 1024);
        let total = 320;
        let mut sha = Sha256::new();
        for _ in 0..total {
            sha.update(&chunk);
        }
        let expect: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let c2 = chunk.clone();
        let stream = futures_stream(total, c2, false);
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(stream)),
        );
        let r = client
            .post(format!("{url}/v1/artifacts/chunked-ok"))
            .bearer_auth(&token)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        let meta: serde_json::Value = client
            .get(format!("{url}/v1/artifacts/chunked-ok"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(meta["sha256"], expect.as_str());
        assert_eq!(meta["size"], total as u64 * 64 * 1024);

        // Stalls after 1 MiB: the server gives up after the read timeout.
        let stream = futures_stream(16, chunk.clone(), true);
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(stream)),
        );
        let (u, t) = (url.clone(), token.clone());
        let stalled = tokio::spawn(async move {
            let started = Instant::now();
            let r = reqwest::Client::new()
                .post(format!("{u}/v1/artifacts/chunked-stalled"))
                .bearer_auth(&t)
                .multipart(form)
                .send()
                .await;
            (started.elapsed(), r.map(|r| r.status().as_u16()))
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..20 {
            let r = client.get(format!("{url}/healthz")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
        let (took, result) = tokio::time::timeout(Duration::from_secs(60), stalled)
            .await
            .expect("stalled upload never ended")
            .unwrap();
        assert!(
            !matches!(result, Ok(200 | 201)),
            "stalled upload was accepted"
        );
        assert!(
            took < Duration::from_secs(45),
            "stalled upload held {took:?}"
        );
        let r = client
            .get(format!("{url}/v1/artifacts/chunked-stalled"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    });
    // The staged file of the stalled upload is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = std::fs::read_dir(data.join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} temp files left");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_serving(&server.url, "after the stalled upload");
}

fn bytes_of(n: usize) -> bytes::Bytes {
    let v: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
    bytes::Bytes::from(v)
}

/// A chunked request body: `n` chunks, then the end, or (when `stall`) nothing ever again.
fn futures_stream(
    n: usize,
    chunk: bytes::Bytes,
    stall: bool,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    use futures::StreamExt;
    let body = futures::stream::iter((0..n).map(move |_| Ok(chunk.clone())));
    let tail = futures::stream::once(async move {
        if stall {
            std::future::pending::<()>().await;
        }
        Ok(bytes::Bytes::new())
    });
    body.chain(tail)
}
