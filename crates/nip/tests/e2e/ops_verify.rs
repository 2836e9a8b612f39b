//! The scrub of the store through the real binary: a NAR fetched from a signed upstream and an
//! artifact uploaded through `/v1` get one byte flipped in storage (a local directory, or an S3
//! bucket); `nip admin verify` reports both as corrupt and fails, `--repair` removes them, and the
//! running server then fetches the NAR again from the upstream with the right bytes. The
//! scheduled scrub (`--cache-verify-schedule`) does the same by itself and drops what it removed
//! from the server's memory at once.
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use reqwest::blocking::Client;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;
use crate::reliability_crash::write_upstream;

fn client() -> Client {
    http_client(60)
}

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// What every flip does to a blob: the middle byte inverted, the size unchanged.
fn flipped(b: &[u8]) -> Vec<u8> {
    let mut b = b.to_vec();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    b
}

/// A path fetched through the server from the upstream, and an artifact uploaded to it.
struct Stored {
    hash: String,
    nar: Vec<u8>,
    nar_file: String,
    art_key: String,
    art: Vec<u8>,
}

/// The NAR file a narinfo names (`URL: nar/<file>`).
fn nar_file_of(narinfo: &str) -> String {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: nar/"))
        .unwrap_or_else(|| panic!("no URL in narinfo:\n{narinfo}"))
        .to_string()
}

/// GETs the narinfo and its NAR through the server; the NAR's status and bytes.
fn get_path(url: &str, hash: &str) -> (u16, Vec<u8>, String) {
    let c = client();
    let info = c.get(format!("{url}/{hash}.narinfo")).send().unwrap();
    assert_eq!(info.status(), 200, "narinfo {hash}");
    let file = nar_file_of(&info.text().unwrap());
    let nar = c.get(format!("{url}/nar/{file}")).send().unwrap();
    let status = nar.status().as_u16();
    (status, nar.bytes().unwrap().to_vec(), file)
}

/// `nip admin <cmd>` (or `nip audit`) on the server's settings; its JSON output.
fn admin_json(cmd: &[&str], settings: &[String]) -> Value {
    let mut args = cmd.to_vec();
    args.push("--json");
    args.extend(settings.iter().map(String::as_str));
    let out = nip(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Fetches the upstream's path through the server (waiting until its NAR is stored) and uploads
/// an artifact.
fn fill_store(
    url: &str,
    token: &str,
    settings: &[String],
    hash: &str,
    upstream_nar: &[u8],
) -> Stored {
    let (status, nar, nar_file) = get_path(url, hash);
    assert_eq!(status, 200);
    assert_eq!(sha_hex(&nar), sha_hex(upstream_nar), "NAR bytes differ");
    let art: Vec<u8> = (0..150_000).map(|_| rand::random::<u8>()).collect();
    let art_key = "verify-artifact-1".to_string();
    let resp = post_artifact(&client(), url, token, &art_key, file_form(art.clone()));
    assert_eq!(resp.status(), 201);
    // The NAR's row is written once its bytes are safe, just after the last byte went out.
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_json(&["admin", "stats"], settings)["nars"] != 1 {
        assert!(Instant::now() < deadline, "the fetched NAR was not stored");
        std::thread::sleep(Duration::from_millis(100));
    }
    Stored {
        hash: hash.into(),
        nar,
        nar_file,
        art_key,
        art,
    }
}

/// A signed upstream with one path, served over HTTP; the `nip serve` arguments to use it.
fn upstream(dir: &Path) -> (KillOnDrop, Vec<String>, String, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let (mut entries, pubkey) = write_upstream(dir, 1, 300_000, &mut rng);
    let entry = entries.remove(0);
    let (child, url) = start_static(dir);
    let args = vec![
        "--upstream-cache".to_string(),
        url,
        "--upstream-public-key".into(),
        pubkey,
    ];
    (child, args, entry.hash, entry.nar)
}

/// `nip admin verify` with these flags against the server's settings.
fn verify(settings: &[String], flags: &[&str]) -> Output {
    let mut args = vec!["admin", "verify"];
    args.extend(flags);
    args.extend(settings.iter().map(String::as_str));
    nip(&args)
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The whole scenario on one storage backend, whose `settings` (storage, database) the server and
/// the admin commands share; `flip` flips a stored blob's middle byte by key.
fn corrupt_then_verify_and_repair(tmp: &Path, settings: &[String], flip: &dyn Fn(&str)) {
    let (_upstream, upstream_args, hash, upstream_nar) = upstream(&tmp.join("upstream"));
    let db = format!("sqlite:{}", tmp.join("db/db.sqlite").display());
    let settings: Vec<String> = settings
        .iter()
        .cloned()
        .chain(["--cache-database-url".to_string(), db.clone()])
        .collect();
    let settings = settings.as_slice();
    let token = create_key(
        &tmp.join("keys"),
        "admin",
        "admin",
        &["--cache-database-url", &db],
    );
    let args: Vec<&str> = upstream_args
        .iter()
        .chain(settings)
        .map(String::as_str)
        .collect();
    let server = spawn_nip(&tmp.join("nip.log"), &args, &[]);
    let s = fill_store(&server.url, &token, settings, &hash, &upstream_nar);

    let out = verify(settings, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "clean store: {}", show(&out));
    let clean: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(clean["findings"], serde_json::json!([]), "{clean}");
    assert_eq!(
        (&clean["nars"], &clean["artifacts"]),
        (&1.into(), &1.into())
    );
    assert_eq!(
        clean["bytes"],
        (s.nar.len() + s.art.len()) as u64,
        "{clean}"
    );

    flip(&format!("nar/{}", s.nar_file));
    flip(&format!("artifacts/{}", sha_hex(&s.art)));

    let out = verify(settings, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["findings"],
        serde_json::json!([
            {"kind": "nar", "id": s.nar_file, "problem": "corrupt",
             "expectedSha256": sha_hex(&s.nar), "actualSha256": sha_hex(&flipped(&s.nar)),
             "removed": false},
            {"kind": "artifact", "id": s.art_key, "problem": "corrupt",
             "expectedSha256": sha_hex(&s.art), "actualSha256": sha_hex(&flipped(&s.art)),
             "removed": false},
        ]),
        "{report}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("found 2 bad entries") && stderr.contains("nip admin verify --repair"),
        "{stderr}"
    );

    let out = verify(settings, &["--repair"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected_lines = [
        format!(
            "corrupt       nar      {}: sha256 {} recorded, the bytes hash to {} [removed]",
            s.nar_file,
            sha_hex(&s.nar),
            sha_hex(&flipped(&s.nar))
        ),
        format!(
            "corrupt       artifact {}: sha256 {} recorded, the bytes hash to {} [removed]",
            s.art_key,
            sha_hex(&s.art),
            sha_hex(&flipped(&s.art))
        ),
    ];
    for line in &expected_lines {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("checked 1 NARs, 1 artifacts")
            && stdout.contains("2 corrupt; removed 2 entries (1 narinfos, 1 artifacts)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("found 2 bad entries and removed 2"),
        "{stderr}"
    );

    // Nothing bad is left to find.
    let out = verify(settings, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let after: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["findings"], serde_json::json!([]), "{after}");
    assert_eq!(
        (&after["nars"], &after["artifacts"]),
        (&0.into(), &0.into())
    );

    // Every run is in the audit log.
    let audit = admin_json(&["audit"], settings);
    let runs: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "store-verify")
        .map(|e| (e["target"].as_str().unwrap(), e["result"].as_str().unwrap()))
        .collect();
    assert_eq!(runs.len(), 4, "{audit}");
    assert!(
        runs.iter().any(|(t, r)| *t == "repair"
            && r.ends_with("2 corrupt; removed 2 entries (1 narinfos, 1 artifacts)")),
        "{runs:?}"
    );

    // The running server: the artifact is gone once its in-memory lookup expires (5 s); the path
    // is fetched again from the upstream once the narinfo's expires (30 s), with the right bytes.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let art = get_as(
            &client(),
            &format!("{}/v1/artifacts/{}", server.url, s.art_key),
            &token,
        )
        .status();
        let (status, nar, _) = get_path(&server.url, &s.hash);
        if art == 404 && status == 200 {
            assert_eq!(
                sha_hex(&nar),
                sha_hex(&upstream_nar),
                "re-fetched NAR differs"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the repair: artifact {art}, NAR {status}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_json(&["admin", "stats"], settings)["nars"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the re-fetched NAR was not stored"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = verify(settings, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let last: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&last["nars"], &last["findings"]),
        (&1.into(), &serde_json::json!([]))
    );
}

fn flip_file(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::write(path, flipped(&bytes)).unwrap();
}

#[test]
fn verify_finds_and_repairs_corrupt_blobs_on_local_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let settings = ["--cache-data-path".to_string(), data.display().to_string()];
    let store = data.join("store");
    corrupt_then_verify_and_repair(tmp.path(), &settings, &|key| flip_file(&store.join(key)));
}

#[test]
fn verify_finds_and_repairs_corrupt_blobs_on_s3() {
    let test = "verify-s3";
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut s3) = fresh_s3_args(test, &tmp.path().join("keys")) else {
        return;
    };
    s3.extend([
        "--cache-temp-path".to_string(),
        tmp.path().join("tmp").display().to_string(),
    ]);
    let arg = |name: &str| {
        let i = s3.iter().position(|a| a == name).unwrap();
        s3[i + 1].clone()
    };
    // The bucket as the server sees it (credentials from the AWS_* environment, as the server's).
    let bucket = nip_store::S3BlobStore::new(&nip_store::S3Config {
        bucket: arg("--cache-storage-s3-bucket"),
        endpoint: Some(arg("--cache-storage-s3-endpoint")),
        region: Some("us-east-1".into()),
        force_path_style: true,
        prefix: Some(arg("--cache-storage-s3-prefix")),
        ..Default::default()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let staged = tmp.path().join("flipped");
    let flip = |key: &str| {
        use futures::StreamExt;
        use nip_store::BlobStore;
        rt.block_on(async {
            let key = nip_store::BlobKey::new(key).unwrap();
            let read = bucket.read(&key, None).await.unwrap();
            let mut body = read
                .unwrap_or_else(|| panic!("{key:?} not in the bucket"))
                .body;
            let mut bytes = Vec::new();
            while let Some(chunk) = body.next().await {
                bytes.extend_from_slice(&chunk.unwrap());
            }
            std::fs::write(&staged, flipped(&bytes)).unwrap();
            bucket.put_file(&key, &staged).await.unwrap();
        });
    };
    corrupt_then_verify_and_repair(tmp.path(), &s3, &flip);
}

/// `--cache-verify-schedule` every minute: the server finds the flipped blobs by itself, removes
/// them, forgets the narinfo it held in memory (so the very next request fetches the path again),
/// logs what it found and records it in the audit log.
#[test]
fn scheduled_scrub_repairs_and_the_server_refetches_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (_upstream, upstream_args, hash, upstream_nar) = upstream(&tmp.path().join("upstream"));
    let data = tmp.path().join("data");
    let settings = ["--cache-data-path".to_string(), data.display().to_string()];
    let token = create_key(&data, "admin", "admin", &[]);
    let mut args: Vec<&str> = upstream_args.iter().map(String::as_str).collect();
    args.extend(["--cache-verify-schedule", "* * * * *"]);
    let server = start_nip(&data, &args);
    let s = fill_store(&server.url, &token, &settings, &hash, &upstream_nar);
    let nar_path = data.join("store/nar").join(&s.nar_file);
    let art_path = data.join("store/artifacts").join(sha_hex(&s.art));
    flip_file(&nar_path);
    flip_file(&art_path);

    // Reading the narinfo all along keeps it in the server's memory until the scrub runs.
    let deadline = Instant::now() + Duration::from_secs(150);
    while nar_path.exists() || art_path.exists() {
        assert!(
            Instant::now() < deadline,
            "no scheduled scrub removed the flipped blobs"
        );
        let info = client()
            .get(format!("{}/{}.narinfo", server.url, s.hash))
            .send()
            .unwrap();
        assert_eq!(info.status(), 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (status, nar, _) = get_path(&server.url, &s.hash);
    assert_eq!(
        status, 200,
        "the repaired path was not fetched again at once"
    );
    assert_eq!(sha_hex(&nar), sha_hex(&upstream_nar));
    let art = get_as(
        &client(),
        &format!("{}/v1/artifacts/{}", server.url, s.art_key),
        &token,
    );
    assert_eq!(art.status(), 404, "the removed artifact is still served");

    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    for needle in [
        "scrub: bad store entry",
        &format!("id={}", s.nar_file),
        &format!("id={}", s.art_key),
        "problem=\"corrupt\"",
    ] {
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }
    let audit = admin_json(&["audit"], &settings);
    let corrupt: usize = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "store-verify" && e["remoteAddr"] == "scheduled")
        .filter_map(|e| e["result"].as_str())
        .filter_map(|r| {
            r.split(": ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(corrupt, 2, "{audit}");
}
