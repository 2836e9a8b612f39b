//! Upstreams ncps serves as they are: one that signs nothing (opt-in per upstream with
//! `?trusted=1`), and Attic/niks3-style narinfos without FileHash/FileSize (checked by NarHash).
//! Real nip binary, a real upstream over HTTP, real Nix 2.8 substituting through nip.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Runs `nip serve` with these arguments, expecting it to refuse to start; returns its stderr.
fn serve_refused(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nip"))
        .arg("serve")
        .arg("--server-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nip serve started with {args:?}; it should have refused");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Drops every line starting with one of `prefixes` from the narinfos in `cache`.
fn strip_fields(cache: &std::path::Path, prefixes: &[&str]) {
    for entry in std::fs::read_dir(cache).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "narinfo") {
            let text = std::fs::read_to_string(&path).unwrap();
            let kept: String = text
                .lines()
                .filter(|l| !prefixes.iter().any(|p| l.starts_with(p)))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&path, kept).unwrap();
        }
    }
}

fn hash_of(store_path: &str) -> &str {
    &store_path.trim_start_matches("/nix/store/")[..32]
}

fn get(url: &str) -> (u16, String) {
    let (status, body) = http_get(url).unwrap_or_else(|| panic!("GET {url} failed"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn field<'a>(narinfo: &'a str, name: &str) -> Option<&'a str> {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

fn substitute(nip_url: &str, key: &str, paths: &[String], expect_reject: bool) {
    let mut cmd = Command::new(fixture_script("check-substitute.sh"));
    if expect_reject {
        cmd.arg("--expect-reject");
    }
    cmd.arg(nip_url)
        .arg(key)
        .args(paths)
        .env("CHECK_TIMEOUT", "120");
    run_ok(&mut cmd);
}

fn log_of(data: &std::path::Path) -> String {
    std::fs::read_to_string(data.with_extension("log")).unwrap()
}

/// An upstream that signs nothing (a private nix-serve): refused at start without any key, its
/// narinfos dropped when not marked, and with `?trusted=1` served signed by nip alone, which real
/// Nix substitutes trusting only nip's key.
#[test]
fn an_unsigned_upstream_is_served_only_when_marked_trusted() {
    let Some(tmp) = nix_tempdir("an_unsigned_upstream_is_served_only_when_marked_trusted") else {
        return;
    };
    let up = tmp.path().join("upstream");
    let (upstream_key, paths) = make_upstream(&up, 1);
    let cache = up.join("cache");
    strip_fields(&cache, &["Sig:"]);
    let (_upstream, url) = start_static(&cache);
    let app = hash_of(&paths[0]).to_string();

    // No key and no opt-in: nip would serve nothing, so it refuses to start and says how to opt in.
    let refused = tmp.path().join("refused");
    let err = serve_refused(&[
        "--cache-data-path",
        refused.to_str().unwrap(),
        "--upstream-cache",
        &url,
    ]);
    assert!(err.contains("?trusted=1"), "{err}");

    // A key but no opt-in: the unsigned narinfo is dropped, and the log says how to opt in.
    let strict_data = tmp.path().join("strict");
    let strict = start_nip_behind(&strict_data, &url, &upstream_key, &[]);
    assert_eq!(get(&format!("{}/{app}.narinfo", strict.url)).0, 404);
    let log = log_of(&strict_data);
    assert!(
        log.contains("to serve an upstream that signs nothing (as ncps does), add ?trusted=1"),
        "no start-up line saying how to opt in:\n{log}"
    );
    assert!(
        log.contains("add ?trusted=1 to this upstream's URL"),
        "{log}"
    );

    // Marked `?trusted=1` (with a priority too): served, signed by nip alone.
    let data = tmp.path().join("trusted");
    let nip = start_nip(
        &data,
        &[
            "--upstream-cache",
            &format!("{url}?priority=30&trusted=1"),
            "--cache-hostname",
            "nip-unsigned",
        ],
    );
    let log = log_of(&data);
    assert!(log.contains("upstream marked ?trusted=1"), "{log}");
    let (status, nip_key) = get(&format!("{}/pubkey", nip.url));
    assert_eq!(status, 200);
    let nip_key = nip_key.trim().to_string();
    let (status, narinfo) = get(&format!("{}/{app}.narinfo", nip.url));
    assert_eq!(status, 200, "{narinfo}");
    let sigs: Vec<&str> = narinfo.lines().filter(|l| l.starts_with("Sig:")).collect();
    assert_eq!(sigs.len(), 1, "{narinfo}");
    assert!(sigs[0].starts_with("Sig: nip-unsigned-1:"), "{narinfo}");
    substitute(&nip.url, &nip_key, &paths, false);
    // Nothing vouches for it but nip: a client trusting only the upstream's key refuses it.
    substitute(&nip.url, &upstream_key, &paths[..1], true);

    // Provenance: from that upstream, verified by no key.
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_nip")).args([
        "admin",
        "path-info",
        &paths[0],
        "--json",
        "--cache-data-path",
        data.to_str().unwrap(),
    ]));
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["signedBy"], serde_json::Value::Null, "{info}");
    assert_eq!(info["origin"], "upstream", "{info}");
    assert!(
        info["upstream"].as_str().unwrap().starts_with(&url),
        "{info}"
    );
}

/// Narinfos without FileHash/FileSize (Attic, niks3, nix-serve): served without them, the NAR
/// checked against NarHash/NarSize by decompressing it (zstd or xz) as it streams, so a wrong NAR
/// is never stored nor handed out whole; real Nix substitutes such paths through nip.
#[test]
fn narinfos_without_file_hash_are_checked_by_nar_hash_and_substituted_by_real_nix() {
    let test = "narinfos_without_file_hash_are_checked_by_nar_hash";
    if !nix_available(test) || !tool_available("zstd", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let up = tmp.path().join("upstream");
    let (upstream_key, paths) = make_upstream(&up, 2);
    let (app, big, hello) = (&paths[0], &paths[1], &paths[2]);
    // The same (signed) paths as a niks3-style cache: zstd or xz, and no FileHash/FileSize.
    let cache = tmp.path().join("niks3");
    let copy = |compression: &str, paths: &[&String]| {
        run_ok(
            Command::new("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "copy",
                    "--to",
                ])
                .arg(format!(
                    "file://{}?compression={compression}",
                    cache.display()
                ))
                .args(paths),
        );
    };
    // A new path signed by the upstream's key, holding `bytes`.
    let add_signed = |name: &str, bytes: &[u8]| {
        let src = tmp.path().join(name);
        std::fs::write(&src, bytes).unwrap();
        let path = run_ok(Command::new("nix-store").arg("--add").arg(&src))
            .trim()
            .to_string();
        run_ok(
            Command::new("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "store",
                    "sign",
                ])
                .arg("--key-file")
                .arg(up.join("secret.key"))
                .arg(&path),
        );
        path
    };
    let noise = |n: usize| (0..n).map(|_| rand::random::<u8>()).collect::<Vec<u8>>();
    // One more signed path, whose NAR an upstream pads with junk nothing decompresses to.
    let padded = add_signed(
        "padded.txt",
        format!("padded {}", rand::random::<u64>()).as_bytes(),
    );
    // xz ones: a NAR of several body chunks, and one the upstream corrupts.
    let xz_big = add_signed("xz-big.bin", &noise(1 << 20));
    let xz_bad = add_signed("xz-bad.bin", &noise(256 << 10));
    copy("zstd", &[app, big, &padded]);
    copy("xz", &[hello, &xz_big, &xz_bad]);
    write_cache_info(&cache);
    strip_fields(&cache, &["FileHash:", "FileSize:"]);

    // The big path's NAR is replaced by another valid zstd stream before anyone fetched it.
    let upstream_narinfo =
        std::fs::read_to_string(cache.join(format!("{}.narinfo", hash_of(big)))).unwrap();
    assert_eq!(field(&upstream_narinfo, "FileHash"), None);
    let nar_path = cache.join(field(&upstream_narinfo, "URL").unwrap());
    let original = std::fs::read(&nar_path).unwrap();
    let other = tmp.path().join("other");
    std::fs::write(&other, vec![7u8; 100_000]).unwrap();
    run_ok(
        Command::new("zstd")
            .arg("-qf")
            .arg(&other)
            .arg("-o")
            .arg(&nar_path),
    );

    // A zstd skippable frame of 8 MiB before the real one: the decompressed NAR is right, but the
    // body is far longer than any compressed NAR of its size.
    let padded_narinfo =
        std::fs::read_to_string(cache.join(format!("{}.narinfo", hash_of(&padded)))).unwrap();
    let padded_nar = cache.join(field(&padded_narinfo, "URL").unwrap());
    let mut body = vec![0x50, 0x2A, 0x4D, 0x18];
    body.extend_from_slice(&(8u32 << 20).to_le_bytes());
    body.resize(body.len() + (8 << 20), 0);
    body.extend_from_slice(&std::fs::read(&padded_nar).unwrap());
    std::fs::write(&padded_nar, body).unwrap();

    // A byte of one xz NAR flipped mid-stream.
    let bad_narinfo =
        std::fs::read_to_string(cache.join(format!("{}.narinfo", hash_of(&xz_bad)))).unwrap();
    let bad_nar = cache.join(field(&bad_narinfo, "URL").unwrap());
    let mut bytes = std::fs::read(&bad_nar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&bad_nar, bytes).unwrap();

    let (_upstream, url) = start_static(&cache);
    let data = tmp.path().join("nip");
    let nip = start_nip_behind(
        &data,
        &url,
        &upstream_key,
        &["--cache-hostname", "nip-niks3"],
    );
    let (status, nip_key) = get(&format!("{}/pubkey", nip.url));
    assert_eq!(status, 200);
    let nip_key = nip_key.trim().to_string();

    let (status, narinfo) = get(&format!("{}/{}.narinfo", nip.url, hash_of(big)));
    assert_eq!(status, 200, "{narinfo}");
    assert_eq!(field(&narinfo, "FileHash"), None, "{narinfo}");
    assert_eq!(field(&narinfo, "FileSize"), None, "{narinfo}");
    let served = field(&narinfo, "URL").unwrap().to_string();
    assert!(
        served.starts_with("nar/") && served.ends_with(".nar.zst"),
        "{narinfo}"
    );
    // The wrong NAR: the response is cut short (never a complete 200), nothing is stored.
    let resp = reqwest::blocking::Client::new()
        .get(format!("{}/{served}", nip.url))
        .send()
        .unwrap();
    let complete = resp.status() == 200 && resp.bytes().is_ok();
    assert!(!complete, "a NAR that fails its NarHash was served whole");
    assert_eq!(get(&format!("{}/upload/{served}", nip.url)).0, 404);
    let log = log_of(&data);
    assert!(
        log.contains("does not match the narinfo's NarHash")
            || log.contains("longer than the narinfo's NarSize")
            || log.contains("NarSize says"),
        "{log}"
    );

    // The right NAR back upstream: real Nix substitutes every zstd path, trusting only nip.
    std::fs::write(&nar_path, &original).unwrap();
    substitute(&nip.url, &nip_key, &[app.clone(), big.clone()], false);
    let (status, stored) = http_get(&format!("{}/upload/{served}", nip.url)).expect("stored NAR");
    assert_eq!(status, 200);
    assert!(
        stored == original,
        "the stored NAR is not the upstream's file"
    );

    // The padded NAR: cut off once past what its NarSize allows; nothing stored.
    let (status, narinfo) = get(&format!("{}/{}.narinfo", nip.url, hash_of(&padded)));
    assert_eq!(status, 200, "{narinfo}");
    let served = field(&narinfo, "URL").unwrap().to_string();
    let resp = reqwest::blocking::Client::new()
        .get(format!("{}/{served}", nip.url))
        .send()
        .unwrap();
    assert!(!(resp.status() == 200 && resp.bytes().is_ok()));
    assert_eq!(get(&format!("{}/upload/{served}", nip.url)).0, 404);
    let log = log_of(&data);
    assert!(
        log.contains("more bytes than a NAR of its NarSize takes"),
        "{log}"
    );

    // xz without FileHash: checked the same way. The flipped byte fails the check (xz's own CRC
    // or NarHash): the client's response is cut short, nothing is stored.
    let (status, narinfo) = get(&format!("{}/{}.narinfo", nip.url, hash_of(&xz_bad)));
    assert_eq!(status, 200, "{narinfo}");
    assert_eq!(field(&narinfo, "FileHash"), None, "{narinfo}");
    let served = field(&narinfo, "URL").unwrap().to_string();
    assert!(served.ends_with(".nar.xz"), "{narinfo}");
    let resp = reqwest::blocking::Client::new()
        .get(format!("{}/{served}", nip.url))
        .send()
        .unwrap();
    assert!(
        !(resp.status() == 200 && resp.bytes().is_ok()),
        "a corrupted xz NAR was served whole"
    );
    assert_eq!(get(&format!("{}/upload/{served}", nip.url)).0, 404);
    let log = log_of(&data);
    assert!(
        log.contains("the NAR does not decompress")
            || log.contains("does not match the narinfo's NarHash"),
        "{log}"
    );

    // Good xz NARs: real Nix substitutes them, and nip stores the upstream's file as it is.
    substitute(&nip.url, &nip_key, &[hello.clone(), xz_big.clone()], false);
    let (status, narinfo) = get(&format!("{}/{}.narinfo", nip.url, hash_of(&xz_big)));
    assert_eq!(status, 200, "{narinfo}");
    assert_eq!(field(&narinfo, "FileHash"), None, "{narinfo}");
    let served = field(&narinfo, "URL").unwrap().to_string();
    assert!(served.ends_with(".nar.xz"), "{narinfo}");
    let upstream_narinfo =
        std::fs::read_to_string(cache.join(format!("{}.narinfo", hash_of(&xz_big)))).unwrap();
    let original = std::fs::read(cache.join(field(&upstream_narinfo, "URL").unwrap())).unwrap();
    let (status, stored) = http_get(&format!("{}/upload/{served}", nip.url)).expect("stored NAR");
    assert_eq!(status, 200);
    assert!(
        stored == original,
        "the stored NAR is not the upstream's file"
    );
}
