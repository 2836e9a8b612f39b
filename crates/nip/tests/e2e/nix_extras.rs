//! The rest of the Nix binary cache protocol with real Nix 2.8: NAR listings (`<hash>.ls`,
//! `nix copy --to '…?write-nar-listing=true'`) and build logs (`nix store copy-log`, `nix log`),
//! uploaded to nip and read back, and proxied from a `file://`-made upstream served over HTTP.
use std::path::Path;
use std::process::Command;

use crate::common::*;

/// The key of an upstream that signs nothing here.
const UNUSED_KEY: &str = "unused-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

fn client() -> reqwest::blocking::Client {
    http_client(30)
}

/// Writes the Nix function `expr` of one string argument to `<dir>/<file>` and builds it with
/// that argument (`arg`: name, value) and `extra` options. Returns (the file, output path).
fn build_expr(
    dir: &Path,
    file: &str,
    expr: &str,
    arg: (&str, &str),
    extra: &[&str],
) -> (String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let nix = dir.join(file).display().to_string();
    std::fs::write(&nix, expr).unwrap();
    let out = run_ok(
        Command::new("nix-build")
            .args([&nix, "--no-out-link", "--argstr", arg.0, arg.1])
            .args(extra),
    );
    (nix, out.trim().to_string())
}

/// Builds a fresh derivation whose builder prints to stdout and stderr (its build log) and
/// makes a tree (a directory, an executable, a symlink). Returns (output path, drv path, salt).
fn build_logged(dir: &Path) -> (String, String, String) {
    let salt = format!("{}-{}", std::process::id(), rand::random::<u64>());
    let (_, out) = build_expr(
        dir,
        "logged.nix",
        r#"{ salt }: builtins.derivation {
  name = "logged"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "echo building ${salt}; echo on-stderr ${salt} >&2; mkdir -p $out/sub; echo hi ${salt} > $out/sub/f; printf '#!/bin/sh\n' > $out/run; chmod +x $out/run; ln -s sub/f $out/l" ];
}"#,
        ("salt", &salt),
        &[],
    );
    let drv = run_ok(Command::new("nix-store").args(["-q", "--deriver", &out]));
    (out, drv.trim().to_string(), salt)
}

/// [`build_logged`] in `<tmp>/build`, its output signed with a new key `key_name` (made in
/// `<tmp>/keys`). Returns (output path, drv path, salt, output hash, public key).
fn build_logged_signed(tmp: &Path, key_name: &str) -> (String, String, String, String, String) {
    let (out, drv, salt) = build_logged(&tmp.join("build"));
    let hash = hash_of(&out).to_string();
    let (sk, pk) = generate_key(&tmp.join("keys"), key_name);
    run_ok(Command::new("nix").args(["store", "sign", "--key-file", sk.to_str().unwrap(), &out]));
    (out, drv, salt, hash, pk)
}

/// The listing (`<hash>.ls`) Nix writes for the store path `out` into a file:// cache in `dir`.
fn nix_listing(dir: &Path, out: &str, hash: &str) -> serde_json::Value {
    run_ok(Command::new("nix").args([
        "copy",
        "--to",
        &format!("file://{}?write-nar-listing=true", dir.display()),
        out,
    ]));
    serde_json::from_slice(&std::fs::read(dir.join(format!("{hash}.ls"))).unwrap()).unwrap()
}

fn hash_of(path: &str) -> &str {
    &path["/nix/store/".len().."/nix/store/".len() + 32]
}

#[test]
fn listings_and_build_logs_upload_and_read_back_with_real_nix() {
    let Some(tmp) = nix_tempdir("listings_and_build_logs_upload_and_read_back_with_real_nix")
    else {
        return;
    };
    let (out, drv, salt) = build_logged(&tmp.path().join("build"));
    let drv_base = drv.trim_start_matches("/nix/store/").to_string();
    let hash = hash_of(&out).to_string();

    let data = tmp.path().join("data");
    let (write, read) = writer_and_reader(&data);
    let (_upstream, server) = start_upload_nip(
        tmp.path(),
        &data,
        UNUSED_KEY,
        &["--cache-hostname", "nip-extras", "--prometheus-enabled"],
    );
    let write_netrc = netrc(tmp.path(), &write);
    let nix_with = |args: &[&str], netrc: &str| {
        let mut cmd = Command::new("timeout");
        cmd.arg("120")
            .args(args)
            .args(["--option", "netrc-file", netrc]);
        run(&mut cmd)
    };

    // nix copy with a listing: Nix PUTs <hash>.ls before the NAR and narinfo.
    let copy = nix_with(
        &[
            "nix",
            "copy",
            "--to",
            &format!("{}?write-nar-listing=true", server.url),
            &out,
        ],
        &write_netrc,
    );
    assert!(
        copy.status.success(),
        "nix copy with write-nar-listing failed: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    // The same listing Nix writes into a file:// cache.
    let expected = nix_listing(&tmp.path().join("reference"), &out, &hash);
    let ls = client()
        .get(format!("{}/{hash}.ls", server.url))
        .send()
        .unwrap();
    assert_eq!(ls.status(), 200);
    assert_eq!(ls.headers()["content-type"], "application/json");
    let served: serde_json::Value = ls.json().unwrap();
    assert_eq!(served, expected);
    assert_eq!(served["root"]["entries"]["run"]["executable"], true);
    // The upload path serves it too; a listing it lacks is a 404 there.
    let up = client()
        .get(format!("{}/upload/{hash}.ls", server.url))
        .send()
        .unwrap();
    assert_eq!(up.status(), 200);
    let missing = client()
        .get(format!("{}/upload/{}.ls", server.url, "0".repeat(32)))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);

    let ls_r =
        run_ok(Command::new("nix").args(["store", "ls", "--store", &server.url, "-R", &out]));
    for entry in ["./l", "./run", "./sub", "./sub/f"] {
        assert!(ls_r.lines().any(|l| l == entry), "{entry} missing: {ls_r}");
    }

    // A build log: a read key is refused with a 4xx (never a hang), a write key uploads.
    let refused = nix_with(
        &["nix", "store", "copy-log", "--to", &server.url, &drv],
        &netrc(tmp.path(), &read),
    );
    assert!(!refused.status.success());
    assert_ne!(refused.status.code(), Some(124), "copy-log hung");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let copied = nix_with(
        &["nix", "store", "copy-log", "--to", &server.url, &drv],
        &write_netrc,
    );
    assert!(
        copied.status.success(),
        "nix store copy-log failed: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    // Again: the same log is accepted (copy-log may be retried).
    let again = nix_with(
        &["nix", "store", "copy-log", "--to", &server.url, &drv],
        &write_netrc,
    );
    assert!(again.status.success());

    // nix log finds the derivation through the narinfo's Deriver, then reads log/<drv>.
    let log = run_ok(Command::new("nix").args(["log", "--store", &server.url, &out]));
    assert!(log.contains(&format!("building {salt}")), "{log}");
    assert!(log.contains(&format!("on-stderr {salt}")), "{log}");

    let url = format!("{}/log/{drv_base}", server.url);
    let head = client().head(&url).send().unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        log.len().to_string()
    );
    let part = client()
        .get(&url)
        .header("Range", "bytes=0-7")
        .send()
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.text().unwrap(), "building");
    // Another log under the same name is refused (stored files are never replaced).
    let other = client()
        .put(&url)
        .basic_auth("nix", Some(&write))
        .body("forged log")
        .send()
        .unwrap();
    assert_eq!(other.status(), 409);
    // A name that is not a derivation is refused.
    let bad = client()
        .put(format!("{}/log/not-a-drv", server.url))
        .basic_auth("nix", Some(&write))
        .body("x")
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    // Without a key, once keys exist: 401.
    let anon = client()
        .put(format!("{}/upload/log/{drv_base}", server.url))
        .body("x")
        .send()
        .unwrap();
    assert_eq!(anon.status(), 401);

    let entries = audit(&data);
    for (action, target, result) in [
        ("ls-upload", hash.as_str(), "200"),
        ("log-upload", drv_base.as_str(), "200"),
        ("log-upload", drv_base.as_str(), "403"),
        ("log-upload-refused", drv_base.as_str(), "409"),
    ] {
        assert!(
            entries
                .iter()
                .any(|e| e["action"] == action && e["target"] == target && e["result"] == result),
            "no {action} {target} {result} in {entries:#?}"
        );
    }
    let metrics = get_text(&client(), &format!("{}/metrics", server.url));
    for kind in ["ls", "log"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("nip_nix_extras_total{")
                    && l.contains(&format!("kind=\"{kind}\""))
                    && l.contains("event=\"stored\"")),
            "no stored {kind} counter in /metrics"
        );
    }
}

#[test]
fn listings_and_build_logs_are_proxied_from_an_upstream() {
    let Some(tmp) = nix_tempdir("listings_and_build_logs_are_proxied_from_an_upstream") else {
        return;
    };
    let (out, drv, salt, hash, pk) = build_logged_signed(tmp.path(), "extras-up-1");
    // A signed file:// cache with the listing and the log, served over HTTP.
    let cache = tmp.path().join("upcache");
    let file_url = format!("file://{}", cache.display());
    run_ok(Command::new("nix").args([
        "copy",
        "--to",
        &format!("{file_url}?write-nar-listing=true&compression=xz"),
        &out,
    ]));
    run_ok(Command::new("nix").args(["store", "copy-log", "--to", &file_url, &drv]));
    write_cache_info(&cache);
    let (mut upstream, upstream_url) = start_static(&cache);

    let data = tmp.path().join("data");
    let server = start_nip_behind(&data, &upstream_url, &pk, &[]);
    let log = run_ok(Command::new("nix").args(["log", "--store", &server.url, &out]));
    assert!(log.contains(&format!("building {salt}")), "{log}");
    let ls_r =
        run_ok(Command::new("nix").args(["store", "ls", "--store", &server.url, "-R", &out]));
    assert!(ls_r.lines().any(|l| l == "./sub/f"), "{ls_r}");
    let expected = std::fs::read(cache.join(format!("{hash}.ls"))).unwrap();
    let (status, body) = http_get(&format!("{}/{hash}.ls", server.url)).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, expected);

    // Stored now: served with the upstream gone.
    upstream.kill();
    let (status, body) = http_get(&format!("{}/{hash}.ls", server.url)).unwrap();
    assert_eq!((status, body), (200, expected));
    let drv_base = drv.trim_start_matches("/nix/store/");
    let (status, body) = http_get(&format!("{}/log/{drv_base}", server.url)).unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(&format!("building {salt}")));
    // What no upstream had is a 404.
    let (status, _) = http_get(&format!("{}/{}.ls", server.url, "1".repeat(32))).unwrap();
    assert_eq!(status, 404);
}

const CA: &str = "nix-command ca-derivations";

/// Builds a fresh content-addressed derivation (ca-derivations), signing its realisation with
/// `secret_key` as Nix does at build time. Returns (nix file, salt, output path).
fn build_ca(dir: &Path, secret_key: &Path) -> (String, String, String) {
    let salt = format!("{}-{}", std::process::id(), rand::random::<u64>());
    let (nix, out) = build_expr(
        dir,
        "ca.nix",
        r#"{ salt }: builtins.derivation {
  name = "ca-thing"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  args = [ "-c" "echo content-addressed ${salt} > $out" ];
}"#,
        ("salt", &salt),
        &[
            "--option",
            "extra-experimental-features",
            CA,
            "--option",
            "secret-key-files",
            secret_key.to_str().unwrap(),
        ],
    );
    (nix, salt, out)
}

fn generate_key(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    std::fs::create_dir_all(dir).unwrap();
    let (sk, pk) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    run_ok(Command::new("nix-store").args([
        "--generate-binary-cache-key",
        name,
        sk.to_str().unwrap(),
        pk.to_str().unwrap(),
    ]));
    (sk, std::fs::read_to_string(pk).unwrap().trim().to_string())
}

/// What Nix signs in a realisation: its JSON without signatures, keys sorted, no spaces.
fn realisation_fingerprint(r: &serde_json::Value) -> String {
    let mut r = r.clone();
    r.as_object_mut().unwrap().remove("signatures");
    serde_json::to_string(&r).unwrap()
}

fn signed_realisation(id: &str, out_path: &str, key: &nip_core::signing::SigningKey) -> String {
    let mut r = serde_json::json!({
        "dependentRealisations": {}, "id": id, "outPath": out_path, "signatures": []
    });
    let sig = key.sign(realisation_fingerprint(&r).as_bytes());
    r["signatures"] = serde_json::json!([sig]);
    r.to_string()
}

/// PUTs a realisation document `body` as `realisations/<id>.doi` to the server at `url`.
fn put_realisation(url: &str, id: &str, body: String) -> reqwest::blocking::Response {
    client()
        .put(format!("{url}/realisations/{id}.doi"))
        .body(body)
        .send()
        .unwrap()
}

/// `nix build` of the CA derivation into a fresh, empty store that may only substitute from
/// `url` (trusting `key`) and may not build anything.
fn substitute_ca(tmp: &Path, nix_file: &str, salt: &str, url: &str, key: &str) -> Output {
    let root = tmp.join(format!("fresh-{}", rand::random::<u32>()));
    let mut cmd = Command::new("timeout");
    cmd.arg("120")
        .arg("nix")
        .args(["build", "--store"])
        .arg(root.join("store"))
        .args(["--file", nix_file, "--argstr", "salt", salt, "--no-link"])
        .args(["--max-jobs", "0", "--json"])
        .args(["--option", "substituters", url])
        .args(["--option", "trusted-public-keys", key])
        .args(["--option", "extra-experimental-features", CA])
        .env("XDG_CACHE_HOME", root.join("xdg"));
    run(&mut cmd)
}

use std::process::Output;

#[test]
fn ca_realisations_upload_substitute_and_forgeries_are_refused() {
    let Some(tmp) = nix_tempdir("ca_realisations_upload_substitute_and_forgeries_are_refused")
    else {
        return;
    };
    let (sk, pk) = generate_key(&tmp.path().join("keys"), "builder-1");
    let (nix_file, salt, out) = build_ca(&tmp.path().join("build"), &sk);

    let data = tmp.path().join("data");
    let (_upstream, server) = start_upload_nip(
        tmp.path(),
        &data,
        UNUSED_KEY,
        &[
            "--cache-trusted-upload-key",
            &pk,
            "--cache-require-trusted-signature",
        ],
    );
    // Copying the derivation (not just its output path) uploads its realisation.
    let copy = run(Command::new("timeout").args([
        "120",
        "nix",
        "copy",
        "--to",
        &server.url,
        "--file",
        &nix_file,
        "--argstr",
        "salt",
        &salt,
        "--option",
        "extra-experimental-features",
        CA,
    ]));
    assert!(
        copy.status.success(),
        "nix copy of a CA derivation failed: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let entries = audit(&data);
    let id = entries
        .iter()
        .find(|e| e["action"] == "realisation-upload" && e["result"] == "200")
        .unwrap_or_else(|| panic!("no realisation upload in {entries:#?}"))["target"]
        .as_str()
        .unwrap()
        .to_string();
    let out_base = out.trim_start_matches("/nix/store/").to_string();

    // Served with the builder's signature and this cache's own, both over Nix's fingerprint.
    let url = format!("{}/realisations/{id}.doi", server.url);
    let (status, body) = http_get(&url).unwrap();
    assert_eq!(status, 200);
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["outPath"], out_base.as_str());
    let (_, nip_key) = http_get(&format!("{}/pubkey", server.url)).unwrap();
    let nip_key = String::from_utf8(nip_key).unwrap().trim().to_string();
    let fp = realisation_fingerprint(&r);
    let sigs: Vec<&str> = r["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for key in [&pk, &nip_key] {
        let key = nip_core::signing::PublicKey::parse(key).unwrap();
        assert!(
            sigs.iter().any(|s| key.verify(fp.as_bytes(), s)),
            "no valid signature by {} in {sigs:?}",
            key.name()
        );
    }
    let head = client().head(&url).send().unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "application/json");

    // A fresh store that may not build gets the output through the realisation.
    let sub = substitute_ca(tmp.path(), &nix_file, &salt, &server.url, &nip_key);
    assert!(
        sub.status.success(),
        "substituting the CA derivation through nip failed: {}",
        String::from_utf8_lossy(&sub.stderr)
    );
    let built: serde_json::Value = serde_json::from_slice(&sub.stdout).unwrap();
    assert_eq!(built[0]["outputs"]["out"], out.as_str());

    // A signature in the name of the trusted key that does not verify: refused, audited.
    let forger = nip_core::signing::SigningKey::generate("builder-1").unwrap();
    let fake_id = format!(
        "sha256:{}!out",
        rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let put = |id: &str, body: String| put_realisation(&server.url, id, body);
    let forged = put(&fake_id, signed_realisation(&fake_id, &out_base, &forger));
    assert_eq!(forged.status(), 403);
    assert!(forged.text().unwrap().contains("does not verify"));
    // Unsigned: this cache requires a trusted signature.
    let unsigned = serde_json::json!({"id": fake_id, "outPath": out_base, "signatures": [], "dependentRealisations": {}});
    assert_eq!(put(&fake_id, unsigned.to_string()).status(), 403);
    // A validly signed realisation that would replace the stored one: refused.
    let builder =
        nip_core::signing::SigningKey::parse(&std::fs::read_to_string(&sk).unwrap()).unwrap();
    let other_out = format!("{}-ca-thing", "1".repeat(32));
    assert_eq!(
        put(&id, signed_realisation(&id, &other_out, &builder)).status(),
        409
    );
    // The id in the body must be the URL's.
    assert_eq!(
        put(&fake_id, signed_realisation(&id, &out_base, &builder)).status(),
        400
    );
    // And a validly signed new one is accepted.
    assert_eq!(
        put(&fake_id, signed_realisation(&fake_id, &out_base, &builder)).status(),
        200
    );
    let (status, _) = http_get(&format!(
        "{}/upload/realisations/sha256:{}!out.doi",
        server.url,
        "0".repeat(64)
    ))
    .unwrap();
    assert_eq!(status, 404);
    let entries = audit(&data);
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "realisation-upload-refused"
                && e["target"] == fake_id.as_str()
                && e["result"] == "403"),
        "{entries:#?}"
    );
}

#[test]
fn ca_realisations_are_proxied_only_when_signed_by_an_upstream_key() {
    let Some(tmp) = nix_tempdir("ca_realisations_are_proxied_only_when_signed_by_an_upstream_key")
    else {
        return;
    };
    let (sk, pk) = generate_key(&tmp.path().join("keys"), "upstream-ca-1");
    let (nix_file, salt, out) = build_ca(&tmp.path().join("build"), &sk);
    let (nix_file2, salt2, _) = build_ca(&tmp.path().join("build2"), &sk);
    let cache = tmp.path().join("upcache");
    for (file, salt) in [(&nix_file, &salt), (&nix_file2, &salt2)] {
        run_ok(Command::new("nix").args([
            "copy",
            "--to",
            &format!("file://{}", cache.display()),
            "--file",
            file,
            "--argstr",
            "salt",
            salt,
            "--option",
            "extra-experimental-features",
            CA,
        ]));
    }
    write_cache_info(&cache);
    // Two realisations upstream: tamper with the second one's outPath, keeping its signature.
    let mut docs: Vec<_> = std::fs::read_dir(cache.join("realisations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    docs.sort();
    assert_eq!(docs.len(), 2);
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let out_base = out.trim_start_matches("/nix/store/");
    let (good, bad) = if read(&docs[0])["outPath"] == out_base {
        (docs[0].clone(), docs[1].clone())
    } else {
        (docs[1].clone(), docs[0].clone())
    };
    let mut tampered = read(&bad);
    tampered["outPath"] = serde_json::json!(format!("{}-ca-thing", "2".repeat(32)));
    std::fs::write(&bad, tampered.to_string()).unwrap();
    let id_of = |p: &Path| {
        p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(".doi")
            .to_string()
    };
    let (_upstream, upstream_url) = start_static(&cache);

    let data = tmp.path().join("data");
    let uploader = nip_core::signing::SigningKey::generate("uploader-1").unwrap();
    let server = start_nip_behind(
        &data,
        &upstream_url,
        &pk,
        &[
            "--cache-allow-put-verb",
            "--cache-trusted-upload-key",
            &uploader.public_key().to_string(),
        ],
    );
    let (_, nip_key) = http_get(&format!("{}/pubkey", server.url)).unwrap();
    let nip_key = String::from_utf8(nip_key).unwrap().trim().to_string();
    // An upload never shadows the upstream's realisation, even before anyone read it here.
    let good_id = id_of(&good);
    let put = |out_path: &str| {
        client()
            .put(format!("{}/realisations/{good_id}.doi", server.url))
            .body(signed_realisation(&good_id, out_path, &uploader))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(put(&format!("{}-ca-thing", "3".repeat(32))), 409);
    assert_eq!(put(out_base), 200);
    let sub = substitute_ca(tmp.path(), &nix_file, &salt, &server.url, &nip_key);
    assert!(
        sub.status.success(),
        "substituting the CA derivation through nip's proxy failed: {}",
        String::from_utf8_lossy(&sub.stderr)
    );
    let (status, body) =
        http_get(&format!("{}/realisations/{}.doi", server.url, id_of(&good))).unwrap();
    assert_eq!(status, 200);
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let fp = realisation_fingerprint(&r);
    let nip_pk = nip_core::signing::PublicKey::parse(&nip_key).unwrap();
    assert!(r["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| nip_pk.verify(fp.as_bytes(), s.as_str().unwrap())));
    // The tampered one no longer verifies: not served, and the fresh store cannot get it.
    let (status, _) =
        http_get(&format!("{}/realisations/{}.doi", server.url, id_of(&bad))).unwrap();
    assert_eq!(status, 404);
    let sub = substitute_ca(tmp.path(), &nix_file2, &salt2, &server.url, &nip_key);
    assert!(!sub.status.success(), "a tampered realisation was used");
}

/// Builds a fresh path holding a debug file under `lib/debug/.build-id/`; returns it and the
/// build id.
fn build_debug(dir: &Path) -> (String, String) {
    let id: String = rand::random::<[u8; 20]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (_, out) = build_expr(
        dir,
        "dbg.nix",
        r#"{ id }: builtins.derivation {
  name = "with-debug"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "d=$out/lib/debug/.build-id/${builtins.substring 0 2 id}; mkdir -p $d; echo debug ${id} > $d/${builtins.substring 2 38 id}.debug" ];
}"#,
        ("id", &id),
        &[],
    );
    (out, id)
}

#[test]
fn debug_info_is_stored_and_proxied() {
    let Some(tmp) = nix_tempdir("debug_info_is_stored_and_proxied") else {
        return;
    };
    let (out, id) = build_debug(&tmp.path().join("build"));
    let (_upstream, server) =
        start_upload_nip(tmp.path(), &tmp.path().join("data"), UNUSED_KEY, &[]);
    run_ok(Command::new("timeout").args([
        "120",
        "nix",
        "copy",
        "--to",
        &format!("{}?index-debug-info=true", server.url),
        &out,
    ]));
    let member = format!("lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
    for name in [id.clone(), format!("{id}.debug")] {
        let (status, body) = http_get(&format!("{}/debuginfo/{name}", server.url)).unwrap();
        assert_eq!(status, 200, "debuginfo/{name}");
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["member"], member.as_str());
        // The archive it names is this cache's NAR of the path.
        let archive = doc["archive"].as_str().unwrap();
        let nar = archive.strip_prefix("../").unwrap();
        let (status, _) = http_get(&format!("{}/{nar}", server.url)).unwrap();
        assert_eq!(status, 200, "{archive}");
    }

    // Proxied from a file:// cache made with index-debug-info.
    let (out2, id2) = build_debug(&tmp.path().join("build2"));
    let cache = tmp.path().join("upcache");
    run_ok(Command::new("nix").args([
        "copy",
        "--to",
        &format!("file://{}?index-debug-info=true", cache.display()),
        &out2,
    ]));
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let (_up2, up2_url) = start_static(&cache);
    let proxy = start_nip(
        &tmp.path().join("proxy"),
        &["--upstream-cache", &format!("{up2_url}?trusted=1")],
    );
    let expected = std::fs::read(cache.join(format!("debuginfo/{id2}.debug"))).unwrap();
    let (status, body) = http_get(&format!("{}/debuginfo/{id2}", proxy.url)).unwrap();
    assert_eq!((status, body), (200, expected));
    let (status, _) = http_get(&format!("{}/debuginfo/{id}", proxy.url)).unwrap();
    assert_eq!(status, 404);
    let (status, _) = http_get(&format!("{}/debuginfo/NOT-HEX", proxy.url)).unwrap();
    assert_eq!(status, 400);
}

#[test]
fn listings_are_made_from_stored_nars_when_the_upstream_has_none() {
    let Some(tmp) = nix_tempdir("listings_are_made_from_stored_nars_when_the_upstream_has_none")
    else {
        return;
    };
    let (out, _, salt, hash, pk) = build_logged_signed(tmp.path(), "plain-up-1");
    // Nix's own listing, kept aside to compare.
    let expected = nix_listing(&tmp.path().join("reference"), &out, &hash);
    // An upstream with no listings, with zstd NARs, then one with xz NARs (cache.nixos.org's, and
    // what `nix copy` writes by default).
    for compression in ["zstd", "xz"] {
        let cache = tmp.path().join(format!("upcache-{compression}"));
        run_ok(Command::new("nix").args([
            "copy",
            "--to",
            &format!("file://{}?compression={compression}", cache.display()),
            &out,
        ]));
        std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        assert!(!cache.join(format!("{hash}.ls")).exists());
        let (_upstream, upstream_url) = start_static(&cache);
        let server = start_nip_behind(
            &tmp.path().join(format!("data-{compression}")),
            &upstream_url,
            &pk,
            &[],
        );
        // Before the NAR is stored there is nothing to list.
        let (status, _) = http_get(&format!("{}/{hash}.ls", server.url)).unwrap();
        assert_eq!(status, 404, "{compression}");
        // Reading a file through nip stores the NAR.
        let cat = run_ok(Command::new("nix").args([
            "store",
            "cat",
            "--store",
            &server.url,
            &format!("{out}/sub/f"),
        ]));
        assert_eq!(cat.trim(), format!("hi {salt}"));
        let (_, narinfo) = http_get(&format!("{}/{hash}.narinfo", server.url)).unwrap();
        let narinfo = String::from_utf8(narinfo).unwrap();
        assert!(
            narinfo.contains(&format!("Compression: {compression}\n")),
            "{narinfo}"
        );
        let mut listing = None;
        for _ in 0..50 {
            let (status, body) = http_get(&format!("{}/{hash}.ls", server.url)).unwrap();
            if status == 200 {
                listing = Some(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(
            listing.unwrap_or_else(|| panic!("no listing made from the stored {compression} NAR")),
            expected
        );
    }
}

/// A build-trace-v2 entry (ncps, newer Nix) signed by `key`, and its fingerprint.
fn build_trace(drv: &str, out: &str, key: &nip_core::signing::SigningKey) -> serde_json::Value {
    let mut t = serde_json::json!({
        "key": {"drvPath": format!("/nix/store/{drv}"), "outputName": "out"},
        "value": {"outPath": format!("/nix/store/{out}")}
    });
    let sig = key.sign(serde_json::to_string(&t).unwrap().as_bytes());
    let (name, sig) = sig.split_once(':').unwrap();
    t["value"]["signatures"] = serde_json::json!([{"keyName": name, "sig": sig}]);
    t
}

#[test]
fn build_trace_entries_are_verified_stored_and_proxied() {
    let tmp = tempfile::tempdir().unwrap();
    let signer = nip_core::signing::SigningKey::generate("tracer-1").unwrap();
    let drv = format!("{}-t.drv", "3".repeat(32));
    let out = format!("{}-t", "4".repeat(32));
    // An upstream holding one signed entry, as Nix writes them (`.doi`).
    let up = tmp.path().join("up");
    let dir = up.join("build-trace-v2").join(&drv);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(up.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    std::fs::write(
        dir.join("out.doi"),
        build_trace(&drv, &out, &signer).to_string(),
    )
    .unwrap();
    let (_up, up_url) = start_static(&up);
    let server = start_nip_behind(
        &tmp.path().join("data"),
        &up_url,
        &signer.public_key().to_string(),
        &[
            "--cache-allow-put-verb",
            "--cache-trusted-upload-key",
            &signer.public_key().to_string(),
        ],
    );
    let (_, nip_key) = http_get(&format!("{}/pubkey", server.url)).unwrap();
    let nip_key =
        nip_core::signing::PublicKey::parse(String::from_utf8(nip_key).unwrap().trim()).unwrap();
    let has_nip_sig = |t: &serde_json::Value| {
        let mut bare = t.clone();
        bare["value"].as_object_mut().unwrap().remove("signatures");
        let fp = serde_json::to_string(&bare).unwrap();
        t["value"]["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| {
                nip_key.verify(
                    fp.as_bytes(),
                    &format!(
                        "{}:{}",
                        s["keyName"].as_str().unwrap(),
                        s["sig"].as_str().unwrap()
                    ),
                )
            })
    };
    // Proxied (and re-signed) from the upstream.
    let (status, body) = http_get(&format!("{}/build-trace-v2/{drv}/out", server.url)).unwrap();
    assert_eq!(status, 200);
    let t: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(t["value"]["outPath"], format!("/nix/store/{out}"));
    assert!(has_nip_sig(&t));

    // Uploaded under /upload/, read back at the root.
    let drv2 = format!("{}-u.drv", "5".repeat(32));
    let put = |drv: &str, body: String| {
        client()
            .put(format!(
                "{}/upload/build-trace-v2/{drv}/out.doi",
                server.url
            ))
            .body(body)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(
        put(&drv2, build_trace(&drv2, &out, &signer).to_string()),
        200
    );
    let (status, body) = http_get(&format!("{}/build-trace-v2/{drv2}/out", server.url)).unwrap();
    assert_eq!(status, 200);
    assert!(has_nip_sig(&serde_json::from_slice(&body).unwrap()));
    // A forged signature in the trusted key's name, a key that does not match the URL.
    let forger = nip_core::signing::SigningKey::generate("tracer-1").unwrap();
    let drv3 = format!("{}-v.drv", "6".repeat(32));
    assert_eq!(
        put(&drv3, build_trace(&drv3, &out, &forger).to_string()),
        403
    );
    assert_eq!(
        put(&drv3, build_trace(&drv2, &out, &signer).to_string()),
        400
    );
    let (status, _) =
        http_get(&format!("{}/upload/build-trace-v2/{drv3}/out", server.url)).unwrap();
    assert_eq!(status, 404);
}

#[test]
fn build_logs_count_in_the_size_budget_and_are_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (_upstream, server) =
        start_upload_nip(tmp.path(), &data, UNUSED_KEY, &["--cache-max-size", "100K"]);
    let url = |i: usize| format!("{}/log/{}-build-{i}.drv", server.url, "7".repeat(32));
    // 12 logs of 16 KiB: 192 KiB, past the 100 KiB budget.
    for i in 0..12 {
        if i == 11 {
            // The last one is strictly newer: least recently used goes first.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        let log = format!("{i:x}").repeat(16 * 1024);
        let status = client().put(url(i)).body(log).send().unwrap().status();
        assert_eq!(status, 200, "log {i}");
    }
    // At most 6 logs of 16 KiB fit in 100 KiB: the eviction job brings the store back under it.
    let held = || {
        (0..12)
            .filter(|&i| http_get(&url(i)).unwrap().0 == 200)
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut left = held();
    while left > 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "build logs were not evicted: {left} of 12 left"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        left = held();
    }
    assert!(left >= 1, "everything was evicted");
    // The newest log was read last and written last: it stays.
    assert_eq!(http_get(&url(11)).unwrap().0, 200);
    let stats = admin_stats(&data);
    let bytes = stats["bytes"].as_i64().unwrap();
    assert_eq!(bytes, left as i64 * 16 * 1024, "{stats}");
}

#[test]
fn compressed_build_logs_keep_their_encoding_and_nix_reads_them() {
    let Some(tmp) = nix_tempdir("compressed_build_logs_keep_their_encoding_and_nix_reads_them")
    else {
        return;
    };
    let (out, drv, salt) = build_logged(&tmp.path().join("build"));
    let drv_base = drv.trim_start_matches("/nix/store/");
    let (_upstream, server) =
        start_upload_nip(tmp.path(), &tmp.path().join("data"), UNUSED_KEY, &[]);
    run_ok(Command::new("nix").args(["copy", "--to", &server.url, &out]));
    // A log compressed as Hydra and newer Nix send them.
    let text = format!("compressed log of {salt}\n");
    let plain = tmp.path().join("log.txt");
    std::fs::write(&plain, &text).unwrap();
    run_ok(Command::new("xz").arg("-k").arg(&plain));
    let xz = std::fs::read(tmp.path().join("log.txt.xz")).unwrap();
    let url = format!("{}/log/{drv_base}", server.url);
    let put = client()
        .put(&url)
        .header("Content-Encoding", "xz")
        .body(xz.clone())
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    let got = client().get(&url).send().unwrap();
    assert_eq!(got.headers()["content-encoding"], "xz");
    assert_eq!(got.bytes().unwrap().to_vec(), xz);
    let log = run_ok(Command::new("nix").args(["log", "--store", &server.url, &out]));
    assert_eq!(log, text);
    // An encoding no Nix writes is refused.
    let odd = client()
        .put(format!("{}/log/{}-other.drv", server.url, "8".repeat(32)))
        .header("Content-Encoding", "compress")
        .body("x")
        .send()
        .unwrap();
    assert_eq!(odd.status(), 400);
    // A listing must be JSON unless compressed.
    let bad = client()
        .put(format!("{}/{}.ls", server.url, "9".repeat(32)))
        .body("not json")
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// While an upstream cannot tell whether it has a realisation, an upload could shadow the one it
/// has: refused with 424 (as for narinfos), unless a trusted upload key signed it.
#[test]
fn realisation_uploads_wait_for_every_upstream_unless_a_trusted_key_signed_them() {
    let tmp = tempfile::tempdir().unwrap();
    let builder = nip_core::signing::SigningKey::generate("builder-1").unwrap();
    let data = tmp.path().join("data");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let server = start_nip_behind(
        &data,
        &dead,
        UNUSED_KEY,
        &[
            "--cache-allow-put-verb",
            "--cache-trusted-upload-key",
            &builder.public_key().to_string(),
        ],
    );
    let id = |n: u8| format!("sha256:{}!out", format!("{n:02x}").repeat(32));
    let out = format!("{}-ca-thing", "1".repeat(32));
    let put = |id: &str, body: String| put_realisation(&server.url, id, body);
    let stranger = nip_core::signing::SigningKey::generate("stranger-1").unwrap();
    let refused = put(&id(1), signed_realisation(&id(1), &out, &stranger));
    assert_eq!(refused.status(), 424);
    assert!(refused.text().unwrap().contains(&dead));
    let (status, _) = http_get(&format!("{}/realisations/{}.doi", server.url, id(1))).unwrap();
    assert_eq!(status, 404, "the refused realisation was stored");
    assert_eq!(
        put(&id(2), signed_realisation(&id(2), &out, &builder)).status(),
        200
    );
    let (status, _) = http_get(&format!("{}/realisations/{}.doi", server.url, id(2))).unwrap();
    assert_eq!(status, 200);
}

/// Listings, logs and debug info no upstream has are remembered as absent for
/// `--cache-negative-ttl`: probing tools ask the upstream once per name, not once per request.
#[test]
fn extras_no_upstream_has_are_asked_for_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("upcache");
    std::fs::create_dir_all(&cache).unwrap();
    write_cache_info(&cache);
    let requests = tmp.path().join("upstream.log");
    let (_upstream, upstream_url) =
        start_static_to(&cache, std::fs::File::create(&requests).unwrap());
    let server = start_nip_behind(&tmp.path().join("data"), &upstream_url, UNUSED_KEY, &[]);
    let drv = format!("{}-x.drv", "2".repeat(32));
    let paths = [
        format!("/{}.ls", "1".repeat(32)),
        format!("/log/{drv}"),
        "/debuginfo/0123456789abcdef".to_string(),
    ];
    for _ in 0..3 {
        for p in &paths {
            let (status, _) = http_get(&format!("{}{p}", server.url)).unwrap();
            assert_eq!(status, 404, "{p}");
        }
    }
    let upstream_log = || std::fs::read_to_string(&requests).unwrap();
    let asked = |log: &str, p: &str| log.matches(&format!("\"GET {p} HTTP")).count();
    let log = upstream_log();
    assert_eq!(asked(&log, &paths[0]), 1, "{log}");
    assert_eq!(asked(&log, &paths[1]), 1, "{log}");
    // Debug info is looked for under two names, each once.
    assert_eq!(asked(&log, &paths[2]), 1, "{log}");
    assert_eq!(asked(&log, &format!("{}.debug", paths[2])), 1, "{log}");

    // With the negative cache off, every request asks again.
    let server = start_nip_behind(
        &tmp.path().join("data2"),
        &upstream_url,
        UNUSED_KEY,
        &["--cache-negative-ttl", "0s"],
    );
    for _ in 0..2 {
        let (status, _) = http_get(&format!("{}{}", server.url, paths[1])).unwrap();
        assert_eq!(status, 404);
    }
    let log = upstream_log();
    assert_eq!(asked(&log, &paths[1]), 3, "{log}");
}
