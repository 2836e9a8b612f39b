//! `/v1` artifacts through the real binary: round trips, immutability, listing, range
//! downloads, every kind of bad upload (each a 4xx that stores nothing), memory during a 1 GiB
//! upload, and an audit log without secrets.
use std::io::{Read, Write};
use std::time::Duration;

use reqwest::blocking::{multipart, Client};
use sha2::{Digest, Sha256};

use crate::common::*;

const DUMMY_UPSTREAM: [&str; 4] = [
    "--upstream-cache",
    "http://127.0.0.1:9",
    "--upstream-public-key",
    "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
];

struct Env {
    server: NipServer,
    admin: String,
    data: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

fn env(extra: &[&str]) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let admin = create_key(&data, "admin", "admin", &[]);
    let mut args = DUMMY_UPSTREAM.to_vec();
    args.extend_from_slice(extra);
    let server = start_nip(&data, &args);
    Env {
        server,
        admin,
        data,
        _tmp: tmp,
    }
}

fn client() -> Client {
    http_client(300)
}

fn upload(e: &Env, key: &str, bytes: Vec<u8>, metadata: &str) -> (u16, serde_json::Value) {
    let form = multipart::Form::new()
        .part("metadata", multipart::Part::text(metadata.to_string()))
        .part("file", multipart::Part::bytes(bytes));
    let resp = post_artifact(&client(), &e.server.url, &e.admin, key, form);
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(serde_json::Value::Null))
}

fn get(e: &Env, path: &str) -> reqwest::blocking::Response {
    get_as(&client(), &format!("{}{path}", e.server.url), &e.admin)
}

fn sha_hex(b: &[u8]) -> String {
    hex_string(&Sha256::digest(b))
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Files left in the staging directory (must be none after any upload, good or bad).
fn staged(e: &Env) -> usize {
    std::fs::read_dir(e.data.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn artifact_files(e: &Env) -> usize {
    std::fs::read_dir(e.data.join("store/artifacts"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn round_trips_at_0_1_and_100_mib_bytes() {
    let e = env(&[]);
    for (key, size) in [("empty", 0usize), ("one", 1), ("big", 100 << 20)] {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 3) as u8).collect();
        let meta = format!(r#"{{"name":"rt","version":"1","size":{size}}}"#);
        let (status, body) = upload(&e, key, bytes.clone(), &meta);
        assert_eq!(status, 201, "{key}: {body}");
        assert_eq!(body["sha256"], sha_hex(&bytes));
        let info: serde_json::Value = get(&e, &format!("/v1/artifacts/{key}")).json().unwrap();
        assert_eq!(info["size"], size);
        assert_eq!(info["downloadUrl"], format!("/v1/download/{key}"));
        assert!(info["createdAt"].as_str().unwrap().ends_with('Z'));
        let dl = get(&e, &format!("/v1/download/{key}"));
        assert_eq!(dl.status(), 200);
        assert_eq!(dl.headers()["content-length"], size.to_string().as_str());
        assert_eq!(
            dl.headers()["etag"],
            format!("\"{}\"", sha_hex(&bytes)).as_str()
        );
        assert!(
            dl.bytes().unwrap() == bytes,
            "{key}: downloaded bytes differ"
        );
        let meta_back: serde_json::Value = get(&e, &format!("/v1/artifacts/{key}/metadata"))
            .json()
            .unwrap();
        assert_eq!(
            meta_back,
            serde_json::from_str::<serde_json::Value>(&meta).unwrap()
        );
    }
    let part = client()
        .get(format!("{}/v1/download/big", e.server.url))
        .bearer_auth(&e.admin)
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 10-19/{}", 100 << 20).as_str()
    );
    let expect: Vec<u8> = (10..20usize).map(|i| (i * 7 + i / 3) as u8).collect();
    assert_eq!(part.bytes().unwrap().to_vec(), expect);
    assert_eq!(staged(&e), 0);
}

#[test]
fn keys_are_immutable_and_listing_is_newest_first() {
    let e = env(&[]);
    assert_eq!(
        upload(
            &e,
            "pkg-1.0-a",
            b"aaa".to_vec(),
            r#"{"name":"pkg","version":"1.0"}"#
        )
        .0,
        201
    );
    let (status, body) = upload(
        &e,
        "pkg-1.0-a",
        b"aaa".to_vec(),
        r#"{"name":"pkg","version":"1.0"}"#,
    );
    assert_eq!(
        (status, body["created"].as_bool()),
        (200, Some(false)),
        "same bytes again is idempotent"
    );
    let (status, body) = upload(&e, "pkg-1.0-a", b"bbb".to_vec(), "{}");
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("immutable"));
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        upload(
            &e,
            "pkg-1.0-b",
            b"ccc".to_vec(),
            r#"{"name":"pkg","version":"1.0"}"#
        )
        .0,
        201
    );
    assert_eq!(
        upload(
            &e,
            "pkg-2.0-a",
            b"ddd".to_vec(),
            r#"{"name":"pkg","version":"2.0"}"#
        )
        .0,
        201
    );
    let list: serde_json::Value = get(&e, "/v1/artifacts?name=pkg&version=1.0")
        .json()
        .unwrap();
    let keys: Vec<&str> = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["pkg-1.0-b", "pkg-1.0-a"]);
    assert_eq!(list["artifacts"][0]["metadata"]["version"], "1.0");
    let list: serde_json::Value = get(&e, "/v1/artifacts?name=pkg&limit=1").json().unwrap();
    assert_eq!(list["artifacts"].as_array().unwrap().len(), 1);
    assert_eq!(get(&e, "/v1/artifacts?limit=0").status(), 400);
    // Delete, then the key is free for new bytes.
    let del = client()
        .delete(format!("{}/v1/artifacts/pkg-1.0-a", e.server.url))
        .bearer_auth(&e.admin)
        .send()
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(get(&e, "/v1/artifacts/pkg-1.0-a").status(), 404);
    assert_eq!(upload(&e, "pkg-1.0-a", b"bbb".to_vec(), "{}").0, 201);
    let missing = get(&e, "/v1/artifacts/nope");
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<serde_json::Value>().unwrap()["error"],
        "not found"
    );
}

/// Sends a raw HTTP request and returns the status (0 when the server closed without one).
fn raw(e: &Env, head: &str, body: &[u8], close_early: bool) -> u16 {
    let addr = e.server.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    if close_early {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn bad_uploads_get_their_4xx_and_store_nothing() {
    let e = env(&["--artifact-max-size", "1M"]);
    let url = |k: &str| format!("{}/v1/artifacts/{k}", e.server.url);
    let post = |k: &str, form: multipart::Form| {
        let r = client()
            .post(url(k))
            .bearer_auth(&e.admin)
            .multipart(form)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().unwrap();
        assert!(body["error"].is_string(), "{k}: error body {body}");
        status
    };
    let file = |b: &[u8]| multipart::Part::bytes(b.to_vec());
    // Missing file part.
    assert_eq!(
        post(
            "k1",
            multipart::Form::new().part("metadata", multipart::Part::text("{}"))
        ),
        400
    );
    // Metadata that is not a JSON object.
    for bad in ["[1,2]", "\"x\"", "{not json"] {
        assert_eq!(
            post(
                "k2",
                multipart::Form::new()
                    .part("file", file(b"x"))
                    .part("metadata", multipart::Part::text(bad))
            ),
            400,
            "{bad}"
        );
    }
    // Wrong digest, in the header and in metadata.
    let r = client()
        .post(url("k3"))
        .bearer_auth(&e.admin)
        .header("X-Nip-Sha256", "00".repeat(32))
        .multipart(multipart::Form::new().part("file", file(b"x")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 422);
    let meta = format!(r#"{{"sha256":"{}"}}"#, "11".repeat(32));
    assert_eq!(
        post(
            "k3",
            multipart::Form::new()
                .part("file", file(b"x"))
                .part("metadata", multipart::Part::text(meta))
        ),
        422
    );
    // The right digest is accepted.
    let r = client()
        .post(url("k3"))
        .bearer_auth(&e.admin)
        .header("X-Nip-Sha256", sha_hex(b"x"))
        .multipart(multipart::Form::new().part("file", file(b"x")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    // Announced as too large: refused before the body is read.
    let head = format!(
        "POST /v1/artifacts/k4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        e.admin, 10 << 20
    );
    assert_eq!(raw(&e, &head, b"", false), 413);
    // Too large without saying so: cut off once past the limit (the server may close the
    // connection before the client has sent everything, so a send error is a refusal too).
    let form = multipart::Form::new().part("file", file(&vec![0u8; 2 << 20]));
    if let Ok(r) = client()
        .post(url("k4"))
        .bearer_auth(&e.admin)
        .multipart(form)
        .send()
    {
        assert_eq!(r.status(), 413);
    }
    // Not multipart at all, and multipart with a broken body.
    let r = client()
        .post(url("k5"))
        .bearer_auth(&e.admin)
        .body("plain")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc";
    let head = format!(
        "POST /v1/artifacts/k6 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        e.admin, body.len()
    );
    assert_eq!(raw(&e, &head, body, false), 400);
    // Client disconnects mid-upload.
    let head = format!(
        "POST /v1/artifacts/k7 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 500000\r\n\r\n",
        e.admin
    );
    let mut partial = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n".to_vec();
    partial.extend(vec![7u8; 100_000]);
    raw(&e, &head, &partial, true);
    // Invalid keys: every kind.
    // Sent raw: HTTP clients would resolve the dot segment themselves.
    for key in ["..", "%2e%2e", "%2E."] {
        let head = format!("GET /v1/download/{key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", e.admin);
        assert_eq!(raw(&e, &head, b"", false), 400, "{key}");
    }
    for key in [
        ".hidden",
        "-dash",
        "a%2Fb",
        "a%00b",
        "a%20b",
        &"k".repeat(256),
    ] {
        assert_eq!(
            post(key, multipart::Form::new().part("file", file(b"x"))),
            400,
            "key {key:?}"
        );
        assert_eq!(
            get(&e, &format!("/v1/download/{key}")).status(),
            400,
            "download key {key:?}"
        );
    }
    // The server learns of k7's dropped connection on its own time (later on a busy machine):
    // wait until its temp file is gone, then nothing of it may be stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while staged(&e) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for k in ["k1", "k2", "k4", "k5", "k6", "k7"] {
        assert_eq!(
            get(&e, &format!("/v1/artifacts/{k}")).status(),
            404,
            "{k} was stored"
        );
    }
    assert_eq!(artifact_files(&e), 1, "only k3's bytes may be stored");
    assert_eq!(staged(&e), 0, "temp files left behind");
}

/// Peak RSS of the server while a 1 GiB artifact streams in stays under 100 MiB.
#[test]
fn one_gib_upload_keeps_server_memory_flat() {
    let e = env(&[]);
    const SIZE: u64 = 1 << 30;
    struct Gen(u64, Sha256);
    impl Read for Gen {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = (buf.len() as u64).min(self.0) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = (self.0 as usize + i) as u8;
            }
            self.1.update(&buf[..n]);
            self.0 -= n as u64;
            Ok(n)
        }
    }
    let form = multipart::Form::new().part(
        "file",
        multipart::Part::reader_with_length(Gen(SIZE, Sha256::new()), SIZE),
    );
    let resp = post_artifact(&client(), &e.server.url, &e.admin, "huge", form);
    assert_eq!(resp.status(), 201);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["size"], SIZE);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", e.server.child.0.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "server peak RSS during a 1 GiB upload: {} MiB",
        hwm_kib / 1024
    );
    assert!(
        hwm_kib < 100 * 1024,
        "server peak RSS {} MiB",
        hwm_kib / 1024
    );
}

#[test]
fn audit_log_records_writes_deletes_and_failures_without_tokens() {
    let e = env(&[]);
    assert_eq!(upload(&e, "audited", b"abc".to_vec(), "{}").0, 201);
    let del = client()
        .delete(format!("{}/v1/artifacts/audited", e.server.url))
        .bearer_auth(&e.admin)
        .send()
        .unwrap();
    assert_eq!(del.status(), 204);
    let bad_token = "nip_ffffffffffffffffffffffffffffffffffffffffffffffff";
    let r = get_as(
        &client(),
        &format!("{}/v1/artifacts/x", e.server.url),
        bad_token,
    );
    assert_eq!(r.status(), 401);
    let out = nip(&[
        "audit",
        "--json",
        "--cache-data-path",
        e.data.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|x| (x["action"].as_str().unwrap(), x["result"].as_str().unwrap()))
        .collect();
    assert!(actions.contains(&("artifact-upload", "201")), "{actions:?}");
    assert!(actions.contains(&("artifact-delete", "204")), "{actions:?}");
    assert!(
        actions
            .iter()
            .any(|(a, r)| *a == "auth" && r.starts_with("401")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("key-create", "created scope=admin")),
        "{actions:?}"
    );
    let upload_entry = entries
        .iter()
        .find(|x| x["action"] == "artifact-upload")
        .unwrap();
    assert_eq!(upload_entry["key"], "admin");
    assert_eq!(upload_entry["remoteAddr"], "127.0.0.1");
    assert_eq!(upload_entry["sha256"], sha_hex(b"abc"));
    // No token anywhere: not in the database, the audit output, or the server log.
    let log = std::fs::read_to_string(e.data.with_extension("log")).unwrap();
    let db_files: Vec<Vec<u8>> = std::fs::read_dir(e.data.join("db"))
        .unwrap()
        .map(|f| std::fs::read(f.unwrap().path()).unwrap())
        .collect();
    for token in [e.admin.as_str(), bad_token] {
        assert!(!log.contains(token), "token in the server log");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(token),
            "token in the audit output"
        );
        for f in &db_files {
            assert!(
                !f.windows(token.len()).any(|w| w == token.as_bytes()),
                "token in the database"
            );
        }
    }
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let e = env(&["--rate-limit-rps", "0.5", "--rate-limit-burst", "2"]);
    let statuses: Vec<u16> = (0..3)
        .map(|_| get(&e, "/v1/artifacts?limit=1").status().as_u16())
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
    let limited = get(&e, "/v1/artifacts?limit=1");
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Another key has its own bucket.
    let other = create_key(&e.data, "other", "read", &[]);
    let r = get_as(
        &client(),
        &format!("{}/v1/artifacts?limit=1", e.server.url),
        &other,
    );
    assert_eq!(r.status(), 200);
}

#[test]
fn retention_deletes_artifacts_not_downloaded_recently() {
    let e = env(&["--artifact-retention", "2s"]);
    assert_eq!(upload(&e, "idle", b"idle bytes".to_vec(), "{}").0, 201);
    assert_eq!(upload(&e, "busy", b"busy bytes".to_vec(), "{}").0, 201);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(get(&e, "/v1/download/busy").status(), 200);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(
        get(&e, "/v1/artifacts/idle").status(),
        404,
        "idle artifact survived retention"
    );
    assert_eq!(
        get(&e, "/v1/artifacts/busy").status(),
        200,
        "downloaded artifact was deleted"
    );
    assert_eq!(
        artifact_files(&e),
        1,
        "the idle artifact's bytes are still stored"
    );
    let entries = audit(&e.data);
    assert!(entries
        .iter()
        .any(|x| x["action"] == "retention-delete" && x["target"] == "idle"));
}
