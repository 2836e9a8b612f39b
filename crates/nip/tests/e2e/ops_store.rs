//! Operating the store on a fixed disk, through the real binary: size-bounded LRU eviction that
//! keeps pairs together and honours recent reads, crash leftovers cleaned at start, and a full
//! disk answering 507 to writes while reads keep working.
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;

use crate::common::*;
use crate::nix_fixture;

const DUMMY_UPSTREAM: [&str; 4] = [
    "--upstream-cache",
    "http://127.0.0.1:9",
    "--upstream-public-key",
    "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
];

fn client() -> Client {
    http_client(60)
}

fn upload_artifact(url: &str, token: &str, key: &str, bytes: Vec<u8>) -> u16 {
    post_artifact(&client(), url, token, key, file_form(bytes))
        .status()
        .as_u16()
}

fn status(url: &str, token: &str, path: &str) -> u16 {
    get_as(&client(), &format!("{url}{path}"), token)
        .status()
        .as_u16()
}

/// 200 MiB of artifacts and Nix entries into a 50 MiB store while a few entries keep being read:
/// the store ends under its limit, the read entries survive, the oldest unread ones are gone, and
/// every narinfo left has its NAR (and the reverse).
#[test]
fn lru_keeps_the_store_under_its_limit_and_evicts_least_recently_read_first() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let token = create_key(&data, "admin", "admin", &[]);
    // Nix uploads need an upstream that answers "not found" (a dead one makes them 424).
    let (_upstream, server) = start_upload_nip(
        tmp.path(),
        &data,
        DUMMY_UPSTREAM[3],
        &["--cache-max-size", "50M"],
    );
    const MIB: usize = 1 << 20;
    let hot = ["hot-0", "hot-1", "hot-2"];
    for k in hot {
        assert_eq!(
            upload_artifact(&server.url, &token, k, vec![1u8; 2 * MIB]),
            201
        );
    }
    let mut nix_entries = Vec::new();
    for i in 0..38 {
        if i % 2 == 0 {
            assert_eq!(
                upload_artifact(
                    &server.url,
                    &token,
                    &format!("cold-{i}"),
                    vec![i as u8; 5 * MIB]
                ),
                201
            );
        } else {
            let u = nix_fixture::upload_sized(&format!("entry-{i}"), 5 * MIB);
            let put = |path: String, body: Vec<u8>| {
                client()
                    .put(format!("{}{path}", server.url))
                    .bearer_auth(&token)
                    .body(body)
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            };
            assert_eq!(put(format!("/nar/{}", u.nar_file), u.nar.clone()), 200);
            assert_eq!(
                put(
                    format!("/{}.narinfo", u.hash),
                    u.narinfo.clone().into_bytes()
                ),
                200
            );
            nix_entries.push(u);
        }
        for k in hot {
            assert_eq!(
                status(&server.url, &token, &format!("/v1/download/{k}")),
                200
            );
        }
        // At most a few writes per second: access times have one-second resolution.
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bytes = admin_stats(&data)["bytes"].as_i64().unwrap();
        if bytes <= 50 * MIB as i64 {
            break;
        }
        if Instant::now() >= deadline {
            // The server's log says why (eviction passes, failures): flaky runs are diagnosable.
            let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
            let evictions: Vec<&str> = log.lines().filter(|l| l.contains("evict")).collect();
            panic!(
                "store still at {bytes} bytes, over its 50 MiB limit; the server logged:\n{}",
                evictions.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for k in hot {
        assert_eq!(
            status(&server.url, &token, &format!("/v1/artifacts/{k}")),
            200,
            "{k} was read all along but evicted"
        );
    }
    assert_eq!(
        status(&server.url, &token, "/v1/artifacts/cold-0"),
        404,
        "the oldest unread entry survived"
    );
    assert_eq!(
        status(&server.url, &token, "/v1/artifacts/cold-36"),
        200,
        "the newest entry was evicted"
    );
    let (mut kept, mut gone) = (0, 0);
    for u in &nix_entries {
        let narinfo = status(&server.url, &token, &format!("/{}.narinfo", u.hash));
        let nar = status(&server.url, &token, &format!("/nar/{}", u.nar_file));
        assert_eq!(
            narinfo, nar,
            "narinfo and NAR of {} evicted separately",
            u.hash
        );
        if narinfo == 200 {
            kept += 1
        } else {
            gone += 1
        }
    }
    assert!(
        kept > 0 && gone > 0,
        "kept {kept}, evicted {gone} Nix entries"
    );
    let s = admin_stats(&data);
    assert_eq!(s["nars"], s["narinfos"], "{s}");
}

/// Leftovers of a crash, made by hand, are found and removed at start, and the count is logged.
#[test]
fn crash_leftovers_are_cleaned_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let token = create_key(&data, "admin", "admin", &[]);
    let server = start_nip(&data, &DUMMY_UPSTREAM);
    assert_eq!(
        upload_artifact(&server.url, &token, "kept", b"kept".to_vec()),
        201
    );
    assert_eq!(
        upload_artifact(&server.url, &token, "lost", b"lost bytes".to_vec()),
        201
    );
    drop(server);
    // A row whose bytes are gone, bytes without a row, a half-published file, a staged temp file.
    let lost = data.join("store/artifacts").join(sha_hex(b"lost bytes"));
    std::fs::remove_file(&lost).unwrap();
    let stray = data
        .join("store/artifacts/0000000000000000000000000000000000000000000000000000000000000000");
    std::fs::write(&stray, b"stray").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&stray)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let partial = data.join("store/artifacts/.publish-abc123");
    std::fs::write(&partial, b"half").unwrap();
    let staged = data.join("tmp/nip-staged-xyz");
    std::fs::write(&staged, b"temp").unwrap();

    let server = start_nip(&data, &DUMMY_UPSTREAM);
    assert!(
        !stray.exists() && !partial.exists() && !staged.exists(),
        "leftovers still on disk"
    );
    assert_eq!(status(&server.url, &token, "/v1/artifacts/lost"), 404);
    assert_eq!(status(&server.url, &token, "/v1/download/kept"), 200);
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(
        log.contains("removed temp files left by an earlier crash") && log.contains("count=1"),
        "{log}"
    );
    assert!(
        log.contains("rows_without_bytes=1")
            && log.contains("bytes_without_rows=1")
            && log.contains("partial_files=1"),
        "{log}"
    );

    // `nip admin gc` beside the running server: a half-published file written just now may be
    // the server's fill or upload in progress and is kept; one unchanged for an hour goes.
    let writing = data.join("store/artifacts/.publish-live");
    std::fs::write(&writing, b"being written").unwrap();
    let abandoned = data.join("store/artifacts/.publish-old");
    std::fs::write(&abandoned, b"half").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&abandoned)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let out = nip(&["admin", "gc", "--cache-data-path", data.to_str().unwrap()]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(writing.exists() && !abandoned.exists(), "{printed}");
    assert!(
        printed.contains("1 half-written files")
            && printed.contains("left 1 half-written files changed in the last 10 minutes"),
        "{printed}"
    );
    assert_eq!(status(&server.url, &token, "/v1/download/kept"), 200);
}

fn sha_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// On a full disk (a 16 MiB tmpfs) uploads get 507 with a clear message, nothing half-written
/// stays, and reads keep working.
#[test]
fn full_disk_refuses_writes_with_507_and_keeps_serving_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(!components_required(), "cannot mount a tmpfs (needs root)");
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
        return;
    }
    let _mount = Mount(data.clone());
    let token = create_key(&data, "admin", "admin", &[]);
    let server = start_nip(&data, &DUMMY_UPSTREAM);
    assert_eq!(
        upload_artifact(&server.url, &token, "small", vec![3u8; 1 << 20]),
        201
    );
    let form = file_form(vec![4u8; 32 << 20]);
    let resp = post_artifact(&client(), &server.url, &token, "too-big", form);
    assert_eq!(resp.status(), 507);
    let body: serde_json::Value = resp.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("full"), "{body}");
    assert_eq!(status(&server.url, &token, "/v1/artifacts/too-big"), 404);
    assert_eq!(
        std::fs::read_dir(data.join("tmp")).unwrap().count(),
        0,
        "half-written upload left behind"
    );
    let dl = get_as(
        &client(),
        &format!("{}/v1/download/small", server.url),
        &token,
    );
    assert_eq!(dl.status(), 200);
    assert_eq!(dl.bytes().unwrap().len(), 1 << 20);
    assert_eq!(status(&server.url, &token, "/v1/health"), 200);
}
