//! The trust rules of Nix uploads with real Nix 2.8 (docs/security.md): a write key can neither
//! replace a store path nip serves nor pre-empt one its upstream has; the same `nix copy` twice
//! succeeds; and the signature gate (`--cache-require-trusted-signature`), set by flags, by
//! environment or by a config file, refuses unsigned uploads with a 403 and keeps the uploader's
//! signature. `nip audit` lists every refusal and every upload by store path.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nip_core::hash::NixHash;
use nip_core::nar_file::{Compression, NarFileName};
use nip_core::narinfo::NarInfo;
use sha2::{Digest, Sha256};

use crate::common::*;

/// nip's `--cache-hostname`: its narinfo signatures are `nip-trust-1:…`.
const NIP_HOST: &str = "nip-trust";

/// `nip serve` in front of one upstream, accepting uploads (`--cache-allow-put-verb`), with a
/// write key (so uploads need it) and a netrc file that gives Nix that key.
struct Cache {
    server: NipServer,
    data: PathBuf,
    token: String,
    netrc: PathBuf,
    upstream_url: String,
    _upstream: KillOnDrop,
}

impl Cache {
    /// Starts nip with its data in `dir`, in front of `upstream` (trusting `upstream_key`), with
    /// extra arguments and environment.
    fn start(
        dir: &Path,
        upstream: (KillOnDrop, String),
        upstream_key: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Cache {
        let (guard, upstream_url) = upstream;
        let data = dir.join("nip-data");
        let token = create_key(&data, "uploader", "write", &[]);
        let netrc = dir.join("netrc");
        std::fs::write(
            &netrc,
            format!("machine 127.0.0.1 login nix password {token}\n"),
        )
        .unwrap();
        let mut all = vec![
            "--upstream-cache",
            &upstream_url,
            "--upstream-public-key",
            upstream_key,
            "--cache-allow-put-verb",
            "--cache-hostname",
            NIP_HOST,
        ];
        all.extend_from_slice(args);
        let server = start_nip_env(&data, &all, envs);
        Cache {
            server,
            data,
            token,
            netrc,
            upstream_url,
            _upstream: guard,
        }
    }

    fn url(&self) -> &str {
        &self.server.url
    }

    /// The narinfo nip serves for `store_path` (it must serve one).
    fn narinfo(&self, store_path: &str) -> String {
        let url = format!("{}/{}.narinfo", self.url(), hash_part(store_path));
        let (status, body) = http_get(&url).unwrap();
        assert_eq!(status, 200, "GET {url}");
        String::from_utf8(body).unwrap()
    }

    /// PUT with the write key: status and body.
    fn put(&self, path: &str, body: Vec<u8>) -> (u16, String) {
        let resp = reqwest::blocking::Client::new()
            .put(format!("{}/{path}", self.url()))
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    }

    fn public_key(&self) -> String {
        let (status, body) = http_get(&format!("{}/pubkey", self.url())).unwrap();
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap().trim().to_string()
    }

    /// `nix copy --to` nip with the write key, bounded by `timeout 120` (Nix 2.8 hangs on a 5xx
    /// answer to a PUT). `client` is Nix's cache directory; `extra` are more Nix arguments.
    fn nix_copy(&self, paths: &[String], client: &Path, extra: &[&str]) -> Output {
        run(Command::new("timeout")
            .args(["120", "nix", "copy", "--to", self.url()])
            .args(paths)
            .arg("--option")
            .arg("netrc-file")
            .arg(&self.netrc)
            .args(extra)
            .env("XDG_CACHE_HOME", client))
    }

    /// How many `nip audit` entries have this action, target and result.
    fn audited(&self, action: &str, target: &str, result: &str) -> usize {
        self.audit()
            .iter()
            .filter(|(a, t, r)| a == action && t == target && r == result)
            .count()
    }

    /// `nip admin path-info --json` of a store path: its provenance.
    fn path_info(&self, store_path: &str) -> serde_json::Value {
        let out = run_ok(Command::new(env!("CARGO_BIN_EXE_nip")).args([
            "admin",
            "path-info",
            store_path,
            "--json",
            "--cache-data-path",
            self.data.to_str().unwrap(),
        ]));
        serde_json::from_str(&out).unwrap()
    }

    /// `nip audit --json`: (action, target, result) of every entry.
    fn audit(&self) -> Vec<(String, String, String)> {
        let out = run_ok(Command::new(env!("CARGO_BIN_EXE_nip")).args([
            "audit",
            "--json",
            "--cache-data-path",
            self.data.to_str().unwrap(),
        ]));
        let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let field = |e: &serde_json::Value, f: &str| e[f].as_str().unwrap_or_default().to_string();
        entries
            .iter()
            .map(|e| (field(e, "action"), field(e, "target"), field(e, "result")))
            .collect()
    }
}

/// `/nix/store/<hash>-<name>` → `<hash>`.
fn hash_part(store_path: &str) -> &str {
    let base = store_path.strip_prefix("/nix/store/").unwrap();
    base.split_once('-').unwrap().0
}

fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A signed upstream made by make-upstream.sh (1 MiB big path).
struct Upstream {
    dir: PathBuf,
    key: String,
    /// Top-level paths; line 1 (fixture-app) and 2 (the big file) are input-addressed.
    paths: Vec<String>,
}

impl Upstream {
    fn make(dir: &Path) -> Upstream {
        let (key, paths) = make_upstream(dir, 1);
        Upstream {
            dir: dir.to_path_buf(),
            key,
            paths,
        }
    }

    /// Every store path of the fixture: the top-level paths and their references.
    fn closure(&self) -> Vec<String> {
        lines(&self.dir.join("closure.txt"))
    }

    /// The upstream's own narinfo for `store_path`.
    fn narinfo(&self, store_path: &str) -> String {
        let file = format!("cache/{}.narinfo", hash_part(store_path));
        std::fs::read_to_string(self.dir.join(file)).unwrap()
    }
}

/// nip in front of a fixture upstream served over HTTP.
fn nip_before_a_signed_upstream(tmp: &Path) -> (Cache, Upstream) {
    let up = Upstream::make(&tmp.join("upstream"));
    let served = start_static(&up.dir.join("cache"));
    let cache = Cache::start(tmp, served, &up.key, &[], &[]);
    (cache, up)
}

/// Another build of `genuine`'s store path, as an attacker with a write key would upload it:
/// other NAR bytes (uncompressed) and NarHash, the same references, no signature. Returns the
/// NAR's path (`nar/<file hash>.nar`), its bytes and the narinfo.
fn forge(genuine: &str) -> (String, Vec<u8>, String) {
    let mut info = NarInfo::parse(genuine).unwrap();
    let nar = format!("not the real {}", info.store_path.full()).into_bytes();
    let hash = NixHash::sha256(Sha256::digest(&nar).into());
    info.url = format!("nar/{}", NarFileName::new(&hash, Compression::None));
    info.compression = Some("none".into());
    info.file_hash = Some(hash.clone());
    info.file_size = Some(nar.len() as u64);
    info.nar_hash = hash;
    info.nar_size = nar.len() as u64;
    info.sigs.clear();
    (info.url.clone(), nar, info.to_text())
}

/// Uploads a forgery of the store path of `genuine` (a narinfo) with the write key: its NAR is
/// accepted (any bytes that match their name are), its narinfo is refused with a 409 whose JSON
/// body names the store path. Returns the error message.
fn upload_forgery(cache: &Cache, genuine: &str) -> String {
    let (nar_path, nar, narinfo) = forge(genuine);
    assert_eq!(cache.put(&nar_path, nar).0, 200, "PUT {nar_path}");
    let store_path = NarInfo::parse(genuine).unwrap().store_path.full();
    let (status, body) = cache.put(
        &format!("{}.narinfo", hash_part(&store_path)),
        narinfo.into_bytes(),
    );
    assert_eq!(status, 409, "forged narinfo for {store_path}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let error = json["error"].as_str().unwrap().to_string();
    assert!(error.contains(&store_path), "{error}");
    error
}

fn assert_copied(out: &Output) {
    assert!(
        out.status.success(),
        "nix copy failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The attack: a write key uploads another NAR for a path nip already serves. Refused (409,
/// "immutable"); the served narinfo is unchanged and Nix still gets the genuine path.
#[test]
fn an_upload_cannot_replace_a_path_nip_serves() {
    let Some(tmp) = nix_tempdir("an_upload_cannot_replace_a_path_nip_serves") else {
        return;
    };
    let (cache, up) = nip_before_a_signed_upstream(tmp.path());
    let p = &up.paths[0]; // input-addressed: Nix checks its signature
    let before = cache.narinfo(p); // fetched from the upstream and cached

    let error = upload_forgery(&cache, &up.narinfo(p));
    assert!(error.contains("immutable"), "{error}");
    assert_eq!(cache.narinfo(p), before, "the served narinfo changed");
    check_substitute(cache.url(), &cache.public_key(), &[p]);
    assert_eq!(cache.audited("narinfo-upload-refused", p, "409"), 1);
    // Provenance: the upstream and the key that verified it; the refusal in its history.
    let info = cache.path_info(p);
    assert_eq!(info["storePath"], p.as_str());
    assert_eq!(info["origin"], "upstream");
    let upstream_key_name = up.key.split(':').next().unwrap();
    assert_eq!(info["signedBy"], upstream_key_name, "{info}");
    assert_eq!(info["uploadedBy"], serde_json::Value::Null, "{info}");
    assert!(
        info["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "narinfo-upload-refused" && e["key"] == "uploader"),
        "{info}"
    );
}

/// Pre-poisoning: a forged upload of a path only the upstream has (nip never fetched it) is
/// refused naming the upstream; readers then get the upstream's narinfo, with its signature.
#[test]
fn an_upload_cannot_pre_poison_a_path_only_the_upstream_has() {
    let Some(tmp) = nix_tempdir("an_upload_cannot_pre_poison_a_path_only_the_upstream_has") else {
        return;
    };
    let (cache, up) = nip_before_a_signed_upstream(tmp.path());
    let q = &up.paths[1];
    let genuine = up.narinfo(q);

    let error = upload_forgery(&cache, &genuine);
    assert!(
        error.contains(&cache.upstream_url),
        "names the upstream: {error}"
    );
    let genuine = NarInfo::parse(&genuine).unwrap();
    assert_eq!(genuine.ca, None, "{q} must be input-addressed");
    let served = NarInfo::parse(&cache.narinfo(q)).unwrap();
    assert_eq!(served.nar_hash, genuine.nar_hash);
    assert!(
        genuine.sigs.iter().all(|s| served.sigs.contains(s)),
        "the upstream's signature is not served: {served:?}"
    );
    for key in [cache.public_key(), up.key.clone()] {
        check_substitute(cache.url(), &key, &[q]);
    }
    assert_eq!(cache.audited("narinfo-upload-refused", q, "409"), 1);
}

/// `nix copy` of the same paths twice succeeds both times, the second one uploading every
/// narinfo again (same contents: 200, nothing changes).
#[test]
fn nix_copy_of_the_same_paths_twice_succeeds_both_times() {
    let Some(tmp) = nix_tempdir("nix_copy_of_the_same_paths_twice_succeeds_both_times") else {
        return;
    };
    // Local store paths to upload; the fixture's file:// cache is not served.
    let local = Upstream::make(&tmp.path().join("paths"));
    let empty = start_empty_upstream(&tmp.path().join("empty-upstream"));
    let cache = Cache::start(tmp.path(), empty, &local.key, &[], &[]);
    // Nix skips paths the cache has, unless it remembers them as missing: a client that looked
    // before the first copy (with a 1 h narinfo-cache-negative-ttl, Nix's default) uploads again.
    let closure = local.closure();
    let stale = tmp.path().join("stale-client");
    let remember_missing = ["--option", "narinfo-cache-negative-ttl", "3600"];
    let looked = run(Command::new("nix")
        .args(["path-info", "--store", cache.url()])
        .args(&closure)
        .args(remember_missing)
        .env("XDG_CACHE_HOME", &stale));
    assert!(
        !looked.status.success(),
        "nip has the paths before the copy"
    );

    assert_copied(&cache.nix_copy(&local.paths, &tmp.path().join("client"), &[]));
    let first: Vec<String> = closure.iter().map(|p| cache.narinfo(p)).collect();
    assert_copied(&cache.nix_copy(&local.paths, &stale, &remember_missing));

    let second: Vec<String> = closure.iter().map(|p| cache.narinfo(p)).collect();
    assert_eq!(second, first, "the second copy changed a narinfo");
    for p in &closure {
        assert_eq!(
            cache.audited("narinfo-upload", p, "200"),
            2,
            "{p} was not uploaded twice: {:?}",
            cache.audit()
        );
    }
}

/// Where the signature gate's settings come from.
enum GateSetting {
    Flags,
    Env,
    ConfigFile,
}

/// `nip serve` arguments and environment that require a signature by `key`, set as `how` says;
/// a config file goes into `dir`.
fn gate(how: GateSetting, key: &str, dir: &Path) -> (Vec<String>, Vec<(&'static str, String)>) {
    match how {
        GateSetting::Flags => (
            vec![
                "--cache-require-trusted-signature".into(),
                "--cache-trusted-upload-key".into(),
                key.into(),
            ],
            vec![],
        ),
        GateSetting::Env => (
            vec![],
            vec![
                ("CACHE_REQUIRE_TRUSTED_SIGNATURE", "true".into()),
                ("CACHE_TRUSTED_UPLOAD_KEYS", key.into()),
            ],
        ),
        GateSetting::ConfigFile => {
            let file = dir.join("nip.yaml");
            let yaml = format!(
                "cache:\n  require-trusted-signature: true\n  trusted-upload-keys:\n    - \"{key}\"\n"
            );
            std::fs::write(&file, yaml).unwrap();
            (vec!["--config".into(), file.display().to_string()], vec![])
        }
    }
}

/// A binary cache key pair made by Nix: (secret key file, public key).
fn generate_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sk, pk) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    run_ok(
        Command::new("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&sk)
            .arg(&pk),
    );
    let public = std::fs::read_to_string(&pk).unwrap().trim().to_string();
    (sk, public)
}

/// With the gate on, `nix copy` of paths signed only by another key fails at once with a 403;
/// signed by the trusted upload key they upload, Nix substitutes them trusting nip's key, and
/// each served narinfo carries the uploader's signature beside nip's.
fn signature_gate(how: GateSetting, test: &str) {
    if !nix_available(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = generate_key(tmp.path(), "uploader-1");
    // Fresh local paths: signed only by the fixture's key.
    let local = Upstream::make(&tmp.path().join("paths"));
    let (args, envs) = gate(how, &public, tmp.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let empty = start_empty_upstream(&tmp.path().join("empty-upstream"));
    let cache = Cache::start(tmp.path(), empty, &local.key, &args, &envs);
    let client = tmp.path().join("client");

    let refused = cache.nix_copy(&local.paths, &client, &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "unsigned nix copy succeeded");
    assert_ne!(refused.status.code(), Some(124), "nix copy hung: {stderr}");
    assert!(stderr.contains("403"), "expected an HTTP 403: {stderr}");

    run_ok(
        Command::new("nix")
            .args(["store", "sign", "-r", "--key-file"])
            .arg(&secret)
            .args(&local.paths),
    );
    assert_copied(&cache.nix_copy(&local.paths, &client, &[]));
    check_substitute(cache.url(), &cache.public_key(), &local.paths);

    let closure = local.closure();
    for p in &closure {
        let served = NarInfo::parse(&cache.narinfo(p)).unwrap();
        for signer in ["uploader-1:", &format!("{NIP_HOST}-1:")] {
            assert!(
                served.sigs.iter().any(|s| s.starts_with(signer)),
                "{p}: no {signer} signature in {served:?}"
            );
        }
        assert_eq!(cache.audited("narinfo-upload", p, "200"), 1, "{p}");
        // Provenance: the API key that uploaded it and the upload key that vouched for it.
        let info = cache.path_info(p);
        assert_eq!(info["origin"], "upload", "{info}");
        assert_eq!(info["uploadedBy"], "uploader", "{info}");
        assert_eq!(info["signedBy"], "uploader-1", "{info}");
    }
    let refusals: Vec<_> = cache
        .audit()
        .into_iter()
        .filter(|(action, _, _)| action == "narinfo-upload-refused")
        .collect();
    assert!(!refusals.is_empty(), "no refusal audited");
    for (_, target, result) in &refusals {
        assert!(
            closure.contains(target),
            "{target} is not a store path copied"
        );
        assert_eq!(result, "403", "{target}");
    }
}

#[test]
fn the_signature_gate_set_by_flags_refuses_unsigned_and_accepts_signed_nix_copy() {
    signature_gate(GateSetting::Flags, "signature_gate_set_by_flags");
}

#[test]
fn the_signature_gate_set_by_environment_refuses_unsigned_and_accepts_signed_nix_copy() {
    signature_gate(GateSetting::Env, "signature_gate_set_by_environment");
}

#[test]
fn the_signature_gate_set_by_a_config_file_refuses_unsigned_and_accepts_signed_nix_copy() {
    signature_gate(
        GateSetting::ConfigFile,
        "signature_gate_set_by_a_config_file",
    );
}
