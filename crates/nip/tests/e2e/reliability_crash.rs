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

fn temp_files(temp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(temp)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// What a check can look at besides the HTTP API.
struct Disk<'a> {
    /// The temp directory of the server that crashed and was restarted: it must be empty.
    temp: Option<&'a Path>,
    /// The local store's data directory (not with S3): every file must be complete.
    store: Option<&'a Path>,
}

/// Checks, through a running server, what the round left behind.
fn verify(url: &str, token: &str, disk: Disk, acked: &Acked, attempted: &Attempted) {
    let c = client(Duration::from_secs(30));
    if let Some(temp) = disk.temp {
        assert!(
            temp_files(temp).is_empty(),
            "temp leftovers after restart: {:?}",
            temp_files(temp)
        );
    }
    if let Some(data) = disk.store {
        check_store_files(data);
    }
    // Durability: an acknowledged upload is there, with its bytes.
    for (key, sha) in &acked.artifacts {
        let r = get_as(&c, &format!("{url}/v1/download/{key}"), token);
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
        let r = get_as(&c, &format!("{url}/v1/artifacts/{key}"), token);
        match r.status().as_u16() {
            404 => continue,
            200 => {}
            s => panic!("artifact {key}: status {s}"),
        }
        let meta: serde_json::Value = r.json().unwrap();
        assert_eq!(meta["sha256"].as_str().unwrap(), sha, "artifact {key}: row");
        let bytes = get_as(&c, &format!("{url}/v1/download/{key}"), token)
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

/// The upstream the fills come from, and the state of a run of crash rounds.
struct CrashRun {
    rng: StdRng,
    seed: u64,
    ops: usize,
    entries: Vec<UpstreamEntry>,
    next_entry: usize,
    total_acked: usize,
    _upstream: KillOnDrop,
    upstream_args: Vec<String>,
}

impl CrashRun {
    fn new(tmp: &Path, rounds: u64) -> Self {
        let ops = env_num("NIP_CRASH_OPS", 30) as usize;
        let seed = env_num("NIP_CRASH_SEED", rand::random::<u32>() as u64);
        eprintln!("crash test: seed {seed}, {rounds} rounds × {ops} operations (NIP_CRASH_SEED={seed} replays)");
        let mut rng = StdRng::seed_from_u64(seed);
        let (entries, pubkey) = write_upstream(
            &tmp.join("upstream"),
            rounds as usize * ops / 3 + 1,
            256 * 1024,
            &mut rng,
        );
        let (upstream, upstream_url) = start_static(&tmp.join("upstream"));
        CrashRun {
            rng,
            seed,
            ops,
            entries,
            next_entry: 0,
            total_acked: 0,
            _upstream: upstream,
            upstream_args: vec![
                "--upstream-cache".into(),
                upstream_url,
                "--upstream-public-key".into(),
                pubkey,
                "--cache-allow-put-verb".into(),
            ],
        }
    }

    /// Starts parallel uploads, Nix PUTs and fills against `server`, kills it with SIGKILL at a
    /// random moment, and returns what was acknowledged and what was attempted.
    fn round(&mut self, round: u64, server: &mut NipServer, token: &str) -> (Acked, Attempted) {
        let rng = &mut self.rng;
        let acked = Arc::new(Mutex::new(Acked::default()));
        let mut attempted = Attempted::default();
        let mut threads = Vec::new();
        for i in 0..self.ops {
            let op = match rng.gen_range(0..3) {
                0 => {
                    let mut bytes = vec![0u8; rng.gen_range(0..2 << 20)];
                    rng.fill_bytes(&mut bytes);
                    let key = format!("crash-{}-{round}-{i}", self.seed);
                    attempted.artifacts.insert(key.clone(), sha_hex(&bytes));
                    Op::Artifact { key, bytes }
                }
                1 => {
                    let up = nix_fixture::upload_sized("crash", rng.gen_range(1..1 << 20));
                    attempted.narinfos.push(up.hash.clone());
                    Op::NixPut(up)
                }
                _ if self.next_entry < self.entries.len() => {
                    let hash = self.entries[self.next_entry].hash.clone();
                    self.next_entry += 1;
                    attempted.narinfos.push(hash.clone());
                    Op::Fill { hash }
                }
                _ => continue,
            };
            let (url, token, acked) = (server.url.clone(), token.to_string(), acked.clone());
            threads.push(std::thread::spawn(move || run_op(&url, &token, op, &acked)));
        }
        // A random moment: sometimes before anything finished, sometimes after most did.
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..1500)));
        server.child.kill(); // SIGKILL: no shutdown, no flush
        for t in threads {
            t.join().unwrap();
        }
        let acked = Arc::try_unwrap(acked).ok().unwrap().into_inner().unwrap();
        self.total_acked += acked.artifacts.len() + acked.narinfos.len();
        eprintln!(
            "round {round}: {} artifacts and {} narinfos acknowledged before the kill",
            acked.artifacts.len(),
            acked.narinfos.len()
        );
        (acked, attempted)
    }
}

/// Kill -9 during parallel uploads, Nix PUTs and fills, restart, repeat with new seeds: every
/// acknowledged upload survives, nothing visible is partial or corrupt, temp files are reclaimed.
/// Short by default; `NIP_CRASH_ROUNDS=20 NIP_CRASH_OPS=100` is the long mode.
#[test]
fn kill_dash_nine_during_writes_loses_nothing_acknowledged_and_shows_nothing_partial() {
    let rounds = env_num("NIP_CRASH_ROUNDS", 5);
    let tmp = tempfile::tempdir().unwrap();
    let mut run = CrashRun::new(tmp.path(), rounds);
    let data = tmp.path().join("data");
    let token = create_key(&data, "crash-admin", "admin", &[]);
    let upstream_args = run.upstream_args.clone();
    let args: Vec<&str> = upstream_args.iter().map(String::as_str).collect();
    let mut server = start_nip(&data, &args);
    for round in 0..rounds {
        let (acked, attempted) = run.round(round, &mut server, &token);
        server = start_nip(&data, &args);
        let disk = Disk {
            temp: Some(&data.join("tmp")),
            store: Some(&data),
        };
        verify(&server.url, &token, disk, &acked, &attempted);
    }
    let files = check_store_files(&data);
    eprintln!(
        "crash test: {} acknowledged uploads survived; {files} blobs verified",
        run.total_acked
    );
    // The upstream entries were real fills: the test did exercise them.
    assert!(run.next_entry > 0);
}

/// The same on PostgreSQL + S3 with two instances: A is killed during the writes while B keeps
/// running; B at once, and A after its restart, list and serve every acknowledged upload and
/// nothing partial. `NIP_CRASH_PG_ROUNDS` sets the rounds (default 3).
#[test]
fn kill_dash_nine_on_postgres_and_s3_shows_the_other_instance_nothing_partial() {
    let test = "crash-pg-s3";
    let tmp = tempfile::tempdir().unwrap();
    let (Some(db), Some(s3)) = (fresh_database(test), fresh_s3_args(test, tmp.path())) else {
        return;
    };
    let rounds = env_num("NIP_CRASH_PG_ROUNDS", 3);
    let mut run = CrashRun::new(tmp.path(), rounds);
    let token = create_key(
        &tmp.path().join("keys"),
        "crash-admin",
        "admin",
        &["--cache-database-url", &db],
    );
    let (temp_a, temp_b) = (tmp.path().join("tmp-a"), tmp.path().join("tmp-b"));
    let upstream_args = run.upstream_args.clone();
    let start = |temp: &Path, name: &str| {
        let args: Vec<String> = [
            upstream_args.clone(),
            s3.clone(),
            vec!["--cache-database-url".into(), db.clone()],
            vec!["--cache-temp-path".into(), temp.display().to_string()],
        ]
        .concat();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn_nip(&tmp.path().join(format!("{name}.log")), &args, &[])
    };
    let mut a = start(&temp_a, "a");
    let b = start(&temp_b, "b");
    for round in 0..rounds {
        let (acked, attempted) = run.round(round, &mut a, &token);
        let none = || Disk {
            temp: None,
            store: None,
        };
        verify(&b.url, &token, none(), &acked, &attempted);
        a = start(&temp_a, "a");
        let disk = Disk {
            temp: Some(&temp_a),
            store: None,
        };
        verify(&a.url, &token, disk, &acked, &attempted);
    }
    eprintln!(
        "crash test on PostgreSQL + S3: {} acknowledged uploads survived",
        run.total_acked
    );
    assert!(run.next_entry > 0);
}
