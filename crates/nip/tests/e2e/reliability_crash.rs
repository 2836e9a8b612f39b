//! Crash safety of the real binary: `kill -9` at a random moment during parallel `/v1` uploads,
//! Nix PUTs and upstream NAR fills, then restart on the same data and check the store.
//! Short by default (5 rounds × 30 operations); `NIP_CRASH_ROUNDS=20 NIP_CRASH_OPS=100` is the long
//! mode, `NIP_CRASH_SEED` replays a run (the seed is printed).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nip_core::base32;
use nip_core::hash::NixHash;
use nip_core::nar_file::{Compression, NarFileName};
use nip_core::narinfo::NarInfo;
use nip_core::signing::SigningKey;
use nip_core::store_path::StorePath;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use reqwest::blocking::{multipart, Client};
use sha2::{Digest, Sha256};

use crate::common::*;
use crate::nix_fixture;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sha_hex(b: &[u8]) -> String {
    hex_encode(&Sha256::digest(b))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn client(timeout: Duration) -> Client {
    Client::builder().timeout(timeout).build().unwrap()
}

/// One signed store path of a static upstream: its hash and NAR bytes.
pub struct UpstreamEntry {
    pub hash: String,
    pub nar: Vec<u8>,
}

/// Writes a static binary cache (nix-cache-info, signed narinfo, NARs) into `dir` with `count`
/// entries of random sizes up to `max_size`; returns the entries and the public key to trust.
pub fn write_upstream(
    dir: &Path,
    count: usize,
    max_size: usize,
    rng: &mut StdRng,
) -> (Vec<UpstreamEntry>, String) {
    let key = SigningKey::generate("reliability-upstream-1").unwrap();
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .unwrap();
    let mut entries = Vec::new();
    for i in 0..count {
        let mut nar = vec![0u8; rng.gen_range(1..max_size)];
        rng.fill_bytes(&mut nar);
        let mut h = [0u8; 20];
        rng.fill_bytes(&mut h);
        let hash = base32::encode(&h);
        let file_hash = NixHash::sha256(Sha256::digest(&nar).into());
        let file = NarFileName::new(&file_hash, Compression::None);
        let mut info = NarInfo {
            store_path: StorePath::parse_base_name(&format!("{hash}-entry{i}")).unwrap(),
            url: format!("nar/{file}"),
            compression: Some("none".into()),
            file_hash: Some(file_hash.clone()),
            file_size: Some(nar.len() as u64),
            nar_hash: file_hash,
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            system: Some("x86_64-linux".into()),
            sigs: vec![],
            ca: None,
            extra: vec![],
        };
        info.sign(&key);
        std::fs::write(dir.join(format!("nar/{file}")), &nar).unwrap();
        std::fs::write(dir.join(format!("{hash}.narinfo")), info.to_text()).unwrap();
        entries.push(UpstreamEntry { hash, nar });
    }
    (entries, key.public_key().to_string())
}

/// What the clients were told before the crash: these must survive it.
#[derive(Default)]
struct Acked {
    /// Artifact key → sha256 hex of the bytes uploaded.
    artifacts: HashMap<String, String>,
    /// Store path hash → NAR file name, for Nix uploads whose narinfo PUT succeeded.
    narinfos: HashMap<String, String>,
}

/// Everything attempted in a round, acknowledged or not: visible means complete and correct.
#[derive(Default)]
struct Attempted {
    artifacts: HashMap<String, String>,
    narinfos: Vec<String>,
}

enum Op {
    Artifact { key: String, bytes: Vec<u8> },
    NixPut(nix_fixture::Upload),
    Fill { hash: String },
}

fn run_op(url: &str, token: &str, op: Op, acked: &Mutex<Acked>) {
    let c = client(Duration::from_secs(20));
    match op {
        Op::Artifact { key, bytes } => {
            let sha = sha_hex(&bytes);
            let form = multipart::Form::new()
                .text("metadata", r#"{"name":"crash"}"#)
                .part("file", multipart::Part::bytes(bytes));
            let resp = c
                .post(format!("{url}/v1/artifacts/{key}"))
                .bearer_auth(token)
                .multipart(form)
                .send();
            if let Ok(r) = resp {
                if matches!(r.status().as_u16(), 200 | 201) {
                    acked.lock().unwrap().artifacts.insert(key, sha);
                }
            }
        }
        Op::NixPut(up) => {
            let nar = c
                .put(format!("{url}/nar/{}", up.nar_file))
                .bearer_auth(token)
                .body(up.nar)
                .send();
            if !nar.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            let info = c
                .put(format!("{url}/{}.narinfo", up.hash))
                .bearer_auth(token)
                .body(up.narinfo)
                .send();
            if info.is_ok_and(|r| r.status().is_success()) {
                acked.lock().unwrap().narinfos.insert(up.hash, up.nar_file);
            }
        }
        Op::Fill { hash } => {
            // Reads race the kill; only the store afterwards matters.
            if let Ok(r) = c.get(format!("{url}/{hash}.narinfo")).send() {
                if let Ok(text) = r.text() {
                    if let Ok(info) = NarInfo::parse(&text) {
                        let _ = c
                            .get(format!("{url}/{}", info.url))
                            .send()
                            .and_then(|r| r.bytes());
                    }
                }
            }
        }
    }
}

/// Every blob on disk is complete: its name is the digest of its bytes; no half-published file.
fn check_store_files(data: &Path) -> usize {
    let mut n = 0;
    for (dir, nix) in [("store/artifacts", false), ("store/nar", true)] {
        let Ok(rd) = std::fs::read_dir(data.join(dir)) else {
            continue;
        };
        for f in rd {
            let f = f.unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with('.'),
                "half-published file {dir}/{name} after restart"
            );
            let bytes = std::fs::read(f.path()).unwrap();
            let digest = Sha256::digest(&bytes);
            let expect = if nix {
                format!("{}.nar", base32::encode(&digest))
            } else {
                hex_encode(&digest)
            };
            assert!(
                name == expect || (nix && name.starts_with(&format!("{expect}."))),
                "{dir}/{name}: bytes do not match the name (partial or corrupt)"
            );
            n += 1;
        }
    }
    n
}

fn temp_files(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("tmp"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Checks, on a freshly restarted server, what the round left behind.
fn verify(url: &str, token: &str, data: &Path, acked: &Acked, attempted: &Attempted) {
    let c = client(Duration::from_secs(30));
    assert!(
        temp_files(data).is_empty(),
        "temp leftovers after restart: {:?}",
        temp_files(data)
    );
    check_store_files(data);
    // Durability: an acknowledged upload is there, with its bytes.
    for (key, sha) in &acked.artifacts {
        let r = c
            .get(format!("{url}/v1/download/{key}"))
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged artifact {key} lost");
        assert_eq!(&sha_hex(&r.bytes().unwrap()), sha, "artifact {key}: bytes");
    }
    for (hash, nar_file) in &acked.narinfos {
        let r = c.get(format!("{url}/{hash}.narinfo")).send().unwrap();
        assert_eq!(r.status(), 200, "acknowledged narinfo {hash} lost");
        let r = c.get(format!("{url}/nar/{nar_file}")).send().unwrap();
        assert_eq!(r.status(), 200, "acknowledged NAR {nar_file} lost");
    }
    // No visible entry is partial: whatever is visible has exactly its recorded digest.
    for (key, sha) in &attempted.artifacts {
        let r = c
            .get(format!("{url}/v1/artifacts/{key}"))
            .bearer_auth(token)
            .send()
            .unwrap();
        match r.status().as_u16() {
            404 => continue,
            200 => {}
            s => panic!("artifact {key}: status {s}"),
        }
        let meta: serde_json::Value = r.json().unwrap();
        assert_eq!(meta["sha256"].as_str().unwrap(), sha, "artifact {key}: row");
        let bytes = c
            .get(format!("{url}/v1/download/{key}"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(
            &sha_hex(&bytes),
            sha,
            "artifact {key}: visible but bytes differ"
        );
    }
    for hash in &attempted.narinfos {
        let r = c.get(format!("{url}/{hash}.narinfo")).send().unwrap();
        match r.status().as_u16() {
            404 => continue,
            200 => {}
            s => panic!("narinfo {hash}: status {s}"),
        }
        let info = NarInfo::parse(&r.text().unwrap()).unwrap();
        let r = c.get(format!("{url}/{}", info.url)).send().unwrap();
        assert_eq!(r.status(), 200, "narinfo {hash} visible without its NAR");
        let nar = r.bytes().unwrap();
        let fh = info.file_hash.expect("FileHash");
        assert_eq!(
            NixHash::sha256(Sha256::digest(&nar).into()).to_nix32_string(),
            fh.to_nix32_string(),
            "{hash}: NAR bytes do not match FileHash"
        );
        assert_eq!(Some(nar.len() as u64), info.file_size, "{hash}: FileSize");
    }
}

/// Kill -9 during parallel uploads, Nix PUTs and fills, restart, repeat with new seeds: every
/// acknowledged upload survives, nothing visible is partial or corrupt, temp files are reclaimed.
#[test]
fn kill_dash_nine_during_writes_loses_nothing_acknowledged_and_shows_nothing_partial() {
    let rounds = env_num("NIP_CRASH_ROUNDS", 5);
    let ops = env_num("NIP_CRASH_OPS", 30) as usize;
    let seed = env_num("NIP_CRASH_SEED", rand::random::<u32>() as u64);
    eprintln!("crash test: seed {seed}, {rounds} rounds × {ops} operations (NIP_CRASH_SEED={seed} replays)");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (entries, pubkey) = write_upstream(
        &tmp.path().join("upstream"),
        rounds as usize * ops / 3 + 1,
        256 * 1024,
        &mut rng,
    );
    let (_upstream, upstream_url) = start_static(&tmp.path().join("upstream"));
    let token = create_key(&data, "crash-admin", "admin", &[]);
    let args = [
        "--upstream-cache",
        upstream_url.as_str(),
        "--upstream-public-key",
        pubkey.as_str(),
        "--cache-allow-put-verb",
    ];
    let mut server = start_nip(&data, &args);
    let mut next_entry = 0;
    let mut total_acked = 0;
    for round in 0..rounds {
        let acked = Arc::new(Mutex::new(Acked::default()));
        let mut attempted = Attempted::default();
        let mut threads = Vec::new();
        for i in 0..ops {
            let op = match rng.gen_range(0..3) {
                0 => {
                    let mut bytes = vec![0u8; rng.gen_range(0..2 << 20)];
                    rng.fill_bytes(&mut bytes);
                    let key = format!("crash-{seed}-{round}-{i}");
                    attempted.artifacts.insert(key.clone(), sha_hex(&bytes));
                    Op::Artifact { key, bytes }
                }
                1 => {
                    let up = nix_fixture::upload_sized("crash", rng.gen_range(1..1 << 20));
                    attempted.narinfos.push(up.hash.clone());
                    Op::NixPut(up)
                }
                _ if next_entry < entries.len() => {
                    let hash = entries[next_entry].hash.clone();
                    next_entry += 1;
                    attempted.narinfos.push(hash.clone());
                    Op::Fill { hash }
                }
                _ => continue,
            };
            let (url, token, acked) = (server.url.clone(), token.clone(), acked.clone());
            threads.push(std::thread::spawn(move || run_op(&url, &token, op, &acked)));
        }
        // A random moment: sometimes before anything finished, sometimes after most did.
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..1500)));
        server.child.kill(); // SIGKILL: no shutdown, no flush
        for t in threads {
            t.join().unwrap();
        }
        let acked = Arc::try_unwrap(acked).ok().unwrap().into_inner().unwrap();
        total_acked += acked.artifacts.len() + acked.narinfos.len();
        server = start_nip(&data, &args);
        verify(&server.url, &token, &data, &acked, &attempted);
        eprintln!(
            "round {round}: {} artifacts and {} narinfos acknowledged before the kill, all present",
            acked.artifacts.len(),
            acked.narinfos.len()
        );
    }
    let files = check_store_files(&data);
    eprintln!("crash test: {total_acked} acknowledged uploads survived; {files} blobs verified");
    // The upstream entries were real fills: the test did exercise them.
    assert!(next_entry > 0);
}
