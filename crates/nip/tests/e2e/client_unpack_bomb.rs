//! Issue 19: a small `tar.zst` that unpacks to 4 GiB ("zstd bomb"), uploaded with a write key
//! under a recipe's cache key on the real `nip serve`. `nip build` must refuse to unpack it
//! (from the remote, and from the local cache after a pull), warn, leave nothing behind and
//! build locally instead.
use std::path::Path;
use std::time::Duration;

use sha2::Digest;

use crate::client_env::*;

/// A ustar header for a regular file `name` of `size` bytes, written by hand.
fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let mut put = |at: usize, field: &[u8]| h[at..at + field.len()].copy_from_slice(field);
    put(0, name.as_bytes());
    put(100, b"0000644\0");
    put(108, b"0000000\0");
    put(116, b"0000000\0");
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, b"00000000000\0");
    put(148, b"        ");
    put(156, b"0");
    put(257, b"ustar\0");
    put(263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// A zstd frame by hand: the header as a raw block, then the file's zeros and the tar end
/// blocks as 128 KiB RLE blocks of 4 bytes each. 4 GiB in about 131 KB.
fn zstd_bomb(size: u64) -> Vec<u8> {
    // Magic, frame header descriptor (no content size, no checksum), window 128 KiB.
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x38];
    let block = |out: &mut Vec<u8>, last: bool, kind: u32, n: u64| {
        let h = u32::from(last) | (kind << 1) | ((n as u32) << 3);
        out.extend_from_slice(&h.to_le_bytes()[..3]);
    };
    block(&mut out, false, 0, 512);
    out.extend_from_slice(&tar_header("share/bomb", size));
    let mut left = size + 1024;
    while left > 0 {
        let n = left.min(128 << 10);
        left -= n;
        block(&mut out, left == 0, 1, n);
        out.push(0);
    }
    out
}

/// Bytes of regular files under `dir` (not following symlinks) and the names at its top.
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            total += disk_use(&e.path());
        } else {
            total += m.len();
        }
    }
    total
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// After a refused bomb: the build ran, `pkgs/` holds only the real package, and little disk.
fn assert_built_without_the_bomb(m: &Machine, r: &serde_json::Value, stderr: &str) {
    assert_eq!(r["source"], "built", "{stderr}");
    assert_eq!(
        m.builds_run(),
        1,
        "the bomb is discarded and the build runs"
    );
    let path = Path::new(r["path"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(path.join("share/greeting.txt")).unwrap(),
        "hello, world\n"
    );
    assert!(!path.join("share/bomb").exists());
    let pkgs = path.parent().unwrap();
    let key = r["key"].as_str().unwrap();
    assert_eq!(
        names(pkgs),
        [".boot", key],
        "no temp dir left, only the package and its marker"
    );
    let used = disk_use(pkgs);
    assert!(used < 64 << 10, "pkgs/ holds {used} bytes");
}

#[test]
fn a_zstd_bomb_on_the_server_is_refused_and_the_package_built_locally() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());

    // The recipe's cache key, from a machine that builds without the remote.
    let a = Machine::new(tmp.path(), "machine-a", &recipes);
    let (ra, _) = a.build(&["hello", "--no-remote-cache"]);
    let key = ra["key"].as_str().unwrap().to_string();

    // The attacker: a write key and 131 KB that unpack to 4 GiB.
    let bomb = zstd_bomb(4 << 30);
    assert!(bomb.len() < 140_000, "{} bytes", bomb.len());
    let bomb_file = tmp.path().join("bomb.tar.zst");
    std::fs::write(&bomb_file, &bomb).unwrap();
    let sha256 = hex(&sha2::Sha256::digest(&bomb));
    let metadata = serde_json::json!({
        "name": ra["name"], "version": ra["version"], "variants": ra["variants"],
        "key": key, "platform": ra["platform"], "sha256": sha256, "size": bomb.len(),
        "buildDurationSecs": 3600.0, "builderHost": "attacker", "created": "2024-01-01T00:00:00Z",
    });
    let server = nip_client::config::Server {
        url: remote.server.url.clone(),
        priority: 0,
        api_key: Some(remote.write_key.clone()),
    };
    let policies = nip_client::config::effective(&Default::default(), &Default::default())
        .unwrap()
        .policies;
    nip_client::remote::RemoteClient::new(server, Duration::from_secs(20), policies, None)
        .unwrap()
        .upload(&key, &bomb_file, &sha256, &metadata)
        .unwrap();

    // A victim downloading it: unpacked while it streams, refused, built locally.
    let b = remote.machine(tmp.path(), "machine-b", &recipes, &remote.read_key);
    let (rb, stderr) = b.build(&["hello"]);
    assert!(
        stderr.contains(&format!(
            "⚠️ Remote artifact {key} cannot be used, discarded"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("refused: it unpacks to more than 256.0 MiB"),
        "{stderr}"
    );
    assert_eq!(rb["key"], key.as_str());
    assert_built_without_the_bomb(&b, &rb, &stderr);
    let s = b.stats();
    assert_eq!(s["downloadsOk"], 1, "the bomb was served: {s}");

    // A victim who pulled it into the local cache (no unpack there): the local entry is
    // discarded at build time, and the build runs.
    let c = remote.machine(tmp.path(), "machine-c", &recipes, &remote.read_key);
    let pull = c.nip(&["cache", "remote", "pull", "hello", "2.12"]);
    assert!(
        pull.status.success(),
        "{}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let (rc, stderr) = c.build(&["hello", "--no-remote-cache"]);
    assert!(
        stderr.contains(&format!(
            "⚠️ Local cache entry {key} is unusable, discarded"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
    assert_built_without_the_bomb(&c, &rc, &stderr);
}

/// With a configured bound of 0 bytes, ratio 0, any cached artifact is refused: the knobs are
/// read from `policies`. The build still succeeds.
#[test]
fn unpack_limits_come_from_the_config_policies() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());
    let a = remote.machine(tmp.path(), "machine-a", &recipes, &remote.write_key);
    let (ra, _) = a.build(&["hello"]);
    assert_eq!(ra["uploaded"], true);

    let b = Machine::new(tmp.path(), "machine-b", &recipes);
    let cfg = serde_json::json!({
        "url": remote.server.url, "apiKey": remote.read_key, "enabled": true, "timeout": 20,
        "policies": {"retryAttempts": 2, "retryDelay": 0.05,
                     "maxUnpackBytes": 0, "maxUnpackRatio": 0, "maxUnpackEntries": 1},
    });
    std::fs::create_dir_all(b.root.join("config/nip")).unwrap();
    std::fs::write(b.root.join("config/nip/remote-cache.json"), cfg.to_string()).unwrap();
    let (rb, stderr) = b.build(&["hello"]);
    assert!(stderr.contains("refused"), "{stderr}");
    assert_eq!(rb["source"], "built");
    // A fresh build of one's own is never bounded.
    assert_eq!(rb["sha256"], ra["sha256"]);
    assert_eq!(b.builds_run(), 1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
