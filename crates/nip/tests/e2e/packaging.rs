//! Packaging for NixOS users (issue 18, item 6): `flake.nix`, `nix/package.nix`, the NixOS
//! module `services.nip` (`nix/module.nix`, `nix/settings.nix`) and the ncps shims
//! (`nix/shims/ncps`, `nix/shims/dbmate-ncps`).
//!
//! nixpkgs is not reachable here, so nothing is built with Nix and the module is never evaluated
//! by the NixOS module system. What is checked: every .nix file parses (`nix-instantiate
//! --parse`); the module evaluates with a stand-in `lib` (`nix/tests/eval.nix`) to the options of
//! nixpkgs' `services.ncps` (names, types, defaults: `nix/tests/ncps-options.txt`), to the JSON
//! that module writes, and to the same hardening; that JSON and the service's start script start
//! the real `nip`; the package's install step, run outside Nix, gives shims that drive the real
//! binary; and, under strace, nip's run time needs no system call the hardening forbids.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
/// What the stand-in `pkgs.callPackage` returns for the module's default package.
const STUB_PACKAGE: &str = "/stub/nip";

/// Whether `nix-instantiate` is present: a failure, not a skip, when the test command requires
/// Nix (NIP_REQUIRE_NIX=1 or CI=true), as [`nix_available`].
fn nix_instantiate_available(test: &str) -> bool {
    nix_tool_available("nix-instantiate", test)
}

fn nip_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nip")
}

fn shim(name: &str) -> PathBuf {
    repo_root().join("nix/shims").join(name)
}

/// A command with nothing from the test's environment but a PATH without nip.
fn clean(program: impl AsRef<std::ffi::OsStr>, home: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home)
        .current_dir(home);
    cmd
}

/// Runs a shim with `sh` (so that the test does not depend on the file's mode bits), nip given
/// by NIP_BIN.
fn run_shim(name: &str, args: &[&str], envs: &[(&str, &str)], home: &Path) -> (i32, String) {
    let out = run(clean("sh", home)
        .arg(shim(name))
        .args(args)
        .env("NIP_BIN", nip_bin())
        .envs(envs.iter().copied()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// flake.nix and every .nix file under nix/.
fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "nix") {
                out.push(path);
            }
        }
    }
    let root = repo_root();
    let mut files = vec![root.join("flake.nix")];
    walk(&root.join("nix"), &mut files);
    files.sort();
    files
}

/// `nix/tests/eval.nix` with these `services.nip` values: see that file for what it returns.
fn eval_module(user: &Value) -> Value {
    let out = run_ok(
        Command::new("nix-instantiate")
            .args(["--readonly-mode", "--eval", "--strict", "--json"])
            .arg(repo_root().join("nix/tests/eval.nix"))
            .args(["--argstr", "userConfigJSON"])
            .arg(user.to_string()),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `nix-instantiate --eval --strict --json` of the expression `expr`, from the repository root.
fn eval_expr(expr: &str) -> String {
    run_ok(
        Command::new("nix-instantiate")
            .current_dir(repo_root())
            .args([
                "--readonly-mode",
                "--eval",
                "--strict",
                "--json",
                "-E",
                expr,
            ]),
    )
}

fn service_config(eval: &Value) -> &Value {
    &eval["config"]["systemd"]["services"]["nip"]["serviceConfig"]
}

/// The service's start script (the module's wrapper): ExecStart is `<wrapper> serve`, and the
/// stand-in writer puts the script's text where its store path would be.
fn wrapper_script(eval: &Value) -> String {
    let exec = service_config(eval)["ExecStart"].as_str().unwrap();
    let body = exec
        .strip_prefix("#nip-wrapper\n")
        .and_then(|s| s.strip_suffix("\n#end nip-wrapper serve"))
        .unwrap_or_else(|| panic!("ExecStart is not `<nip-wrapper> serve`: {exec}"));
    body.to_string()
}

/// The fixture's lines that are not comments.
fn fixture_lines(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_nix_file_parses() {
    if !nix_instantiate_available("every_nix_file_parses") {
        return;
    }
    let files = nix_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(repo_root()).unwrap().display().to_string())
        .collect();
    for expected in [
        "flake.nix",
        "nix/module.nix",
        "nix/package.nix",
        "nix/settings.nix",
        "nix/tests/eval.nix",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    for file in &files {
        run_ok(
            Command::new("nix-instantiate")
                .arg("--parse")
                .arg(file)
                .stdout(Stdio::null()),
        );
    }
}

/// Every option of nixpkgs' services.ncps, with its type and default, and its old names: a
/// configuration switches by renaming services.ncps to services.nip.
#[test]
fn module_has_the_options_of_services_ncps() {
    if !nix_instantiate_available("module_has_the_options_of_services_ncps") {
        return;
    }
    // Only the options without a default set (the defaults are what is compared).
    let eval = eval_module(&json!({ "cache": { "hostName": "h", "upstream": { "urls": [] } } }));
    let fixture = std::fs::read_to_string(repo_root().join("nix/tests/ncps-options.txt")).unwrap();
    let expected = fixture_lines(&fixture);
    let got: BTreeSet<String> = strings(&eval["options"])
        .into_iter()
        .chain(strings(&eval["imports"]))
        .collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    let extra: Vec<_> = got.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "services.nip differs from services.ncps:\n  ncps has, nip not: {missing:#?}\n  nip has, ncps not: {extra:#?}"
    );
    assert!(expected.len() > 55, "{}", expected.len());
    // Not enabled: the module defines nothing.
    assert_eq!(eval["config"], json!({}));
}

/// The ncps settings that nixpkgs' module turns into ncps-nixos.json (that fixture is what
/// services.ncps writes for them).
fn ncps_fixture_settings() -> Value {
    json!({
        "enable": true,
        "prometheus": { "enable": true },
        "cache": {
            "hostName": "cache.example.internal",
            "allowPutVerb": true,
            "maxSize": "50G",
            "lru": { "schedule": "0 2 * * *", "scheduleTimeZone": "Europe/Paris" },
            "upstream": {
                "urls": ["https://cache.nixos.org", "https://nix-community.cachix.org"],
                "publicKeys": [
                    NIXOS_KEY,
                    "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs="
                ],
                "dialerTimeout": "5s",
                "responseHeaderTimeout": "1m30s"
            }
        }
    })
}

/// The same settings give, byte for byte, the JSON services.ncps writes; ExecStart starts nip
/// with that file.
#[test]
fn module_writes_the_json_of_services_ncps() {
    if !nix_instantiate_available("module_writes_the_json_of_services_ncps") {
        return;
    }
    let eval = eval_module(&ncps_fixture_settings());
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/fixtures/ncps-nixos.json"),
    )
    .unwrap();
    let written = eval["json"].as_str().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(written).unwrap(),
        serde_json::from_str::<Value>(&fixture).unwrap()
    );
    assert_eq!(written, fixture.trim_end());
    let script = wrapper_script(&eval);
    let config_file = eval["configFile"].as_str().unwrap();
    assert!(config_file.ends_with("-nip-config.json"), "{config_file}");
    assert!(
        script.contains(&format!(
            "exec {STUB_PACKAGE}/bin/nip --config {config_file} \"$@\""
        )),
        "{script}"
    );
    // No secrets, S3, Redis or database URL file: nothing exported.
    assert!(!script.contains("export"), "{script}");
}

/// The service as systemd would start it: the module's start script (nip from this build, the
/// JSON the module writes for this machine's paths), the signing key given as a systemd
/// credential, the working directory `/`.
#[test]
fn module_service_script_starts_nip() {
    if !nix_instantiate_available("module_service_script_starts_nip") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_upstream, upstream_url) = start_empty_upstream(&tmp.path().join("upstream"));
    let state = tmp.path().join("state");
    let temp = tmp.path().join("tmp");
    std::fs::create_dir_all(&temp).unwrap();
    let port = free_port();
    let mut settings = ncps_fixture_settings();
    settings["server"] = json!({ "addr": format!("127.0.0.1:{port}") });
    settings["cache"]["storage"] = json!({ "local": state });
    settings["cache"]["tempPath"] = json!(temp);
    settings["cache"]["secretKeyPath"] = json!("/run/keys/nip-secret-key");
    settings["cache"]["upstream"]["urls"] = json!([upstream_url]);
    settings["cache"]["upstream"]["publicKeys"] = json!([NIXOS_KEY]);
    let eval = eval_module(&settings);
    let service = service_config(&eval);
    assert_eq!(
        service["LoadCredential"],
        json!(["secretKey:/run/keys/nip-secret-key"])
    );

    // The credential systemd would copy to $CREDENTIALS_DIRECTORY/secretKey.
    let creds = tmp.path().join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    let public = creds.join("public");
    run_ok(
        Command::new("nix-store")
            .args(["--generate-binary-cache-key", "nixos-test-1"])
            .arg(creds.join("secretKey"))
            .arg(&public),
    );
    let config = tmp.path().join("nip-config.json");
    std::fs::write(&config, eval["json"].as_str().unwrap()).unwrap();
    let script = wrapper_script(&eval)
        .replace(&format!("{STUB_PACKAGE}/bin/nip"), nip_bin())
        .replace(
            eval["configFile"].as_str().unwrap(),
            &config.display().to_string(),
        );
    assert!(script.contains("CACHE_SECRET_KEY_PATH"), "{script}");
    let log = tmp.path().join("nip.log");
    let (_server, url) = spawn_server(
        clean("sh", tmp.path())
            .current_dir("/")
            .env("CREDENTIALS_DIRECTORY", &creds)
            .args(["-c", &script, "nip-wrapper", "serve"]),
        &log,
        port,
    );
    assert!(nix_cache_info(&url).contains("StoreDir: /nix/store"));
    let (status, body) = http_get(&format!("{url}/pubkey")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap().trim(),
        std::fs::read_to_string(&public).unwrap().trim(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(state.join("db/db.sqlite").exists());
}

/// The hardening of services.ncps, and where the service may write, for local storage in
/// /var/lib (a state directory), elsewhere, and S3.
#[test]
fn module_service_has_the_hardening_of_services_ncps() {
    if !nix_instantiate_available("module_service_has_the_hardening_of_services_ncps") {
        return;
    }
    let base = json!({
        "enable": true,
        "cache": { "hostName": "h", "upstream": { "urls": ["https://cache.nixos.org"], "publicKeys": [NIXOS_KEY] } }
    });
    let eval = eval_module(&base);
    let service = service_config(&eval);
    let expected = json!({
        "SystemCallFilter": ["@system-service", "~@privileged", "~@resources"],
        "SystemCallArchitectures": "native",
        "MemoryDenyWriteExecute": true,
        "ProtectSystem": "strict",
        "ProtectHome": true,
        "PrivateTmp": true,
        "PrivateUsers": true,
        "PrivateDevices": true,
        "ProcSubset": "pid",
        "ProtectProc": "invisible",
        "CapabilityBoundingSet": "",
        "NoNewPrivileges": true,
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": true,
        "LimitNOFILE": 65536,
        "UMask": "0066",
        "User": "nip",
        "Group": "nip",
        "StateDirectory": ["ncps"],
        "StateDirectoryMode": "0700",
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&service[k], v, "{k} in {service:#}");
    }
    assert!(service.get("ReadWritePaths").is_none(), "{service:#}");
    let unit = &eval["config"]["systemd"]["services"]["nip"];
    assert_eq!(unit["wantedBy"], json!(["multi-user.target"]));
    assert_eq!(
        unit["unitConfig"]["RequiresMountsFor"],
        "/var/lib/ncps /var/lib/ncps/db"
    );
    assert_eq!(
        eval["config"]["users"]["users"]["nip"],
        json!({ "isSystemUser": true, "group": "nip" })
    );
    let assertions = eval["config"]["assertions"].as_array().unwrap();
    assert_eq!(assertions.len(), 5);
    assert!(
        assertions.iter().all(|a| a["assertion"] == true),
        "{assertions:#?}"
    );

    // Elsewhere than /var/lib: writable paths, created by tmpfiles for the nip user.
    let mut other = base.clone();
    other["cache"]["storage"] = json!({ "local": "/srv/cache" });
    other["cache"]["tempPath"] = json!("/srv/tmp");
    let eval = eval_module(&other);
    let service = service_config(&eval);
    assert_eq!(service["ReadWritePaths"], json!(["/srv/cache", "/srv/tmp"]));
    assert!(service.get("StateDirectory").is_none(), "{service:#}");
    let tmpfiles = &eval["config"]["systemd"]["tmpfiles"]["settings"]["nip"];
    for dir in ["/srv/cache", "/srv/cache/db", "/srv/tmp"] {
        assert_eq!(
            tmpfiles[dir]["d"],
            json!({ "user": "nip", "group": "nip", "mode": "0700" }),
            "{tmpfiles:#}"
        );
    }
    assert!(eval["json"]
        .as_str()
        .unwrap()
        .contains("\"sqlite:/srv/cache/db/db.sqlite\""));

    // Path literals (`/run/keys/nip` rather than "/run/keys/nip") are used as names, never
    // copied into the world-readable store: evaluating in read-only mode would fail on these
    // files, which do not exist, if they were.
    let mut literal = base.clone();
    literal["netrcFile"] = json!("<path>/nonexistent/netrc");
    literal["cache"]["secretKeyPath"] = json!("<path>/nonexistent/key");
    literal["cache"]["storage"] = json!({ "local": "<path>/nonexistent/store" });
    literal["cache"]["tempPath"] = json!("<path>/nonexistent/tmp");
    let eval = eval_module(&literal);
    let service = service_config(&eval);
    assert_eq!(
        service["LoadCredential"],
        json!(["secretKey:/nonexistent/key"])
    );
    assert_eq!(
        service["ReadWritePaths"],
        json!(["/nonexistent/store", "/nonexistent/tmp"])
    );
    let written: Value = serde_json::from_str(eval["json"].as_str().unwrap()).unwrap();
    assert_eq!(written["cache"]["storage"]["local"], "/nonexistent/store");
    assert_eq!(written["cache"]["temp-path"], "/nonexistent/tmp");
    assert_eq!(written["cache"]["netrc-file"], "/nonexistent/netrc");
    assert_eq!(
        written["cache"]["database-url"],
        "sqlite:/nonexistent/store/db/db.sqlite"
    );

    // S3: credentials, and nip's own signing key kept in /var/lib/nip.
    let mut s3 = base.clone();
    s3["cache"]["storage"] = json!({ "s3": {
        "bucket": "b", "endpoint": "http://127.0.0.1:9000",
        "accessKeyIdPath": "/run/keys/id", "secretAccessKeyPath": "/run/keys/secret"
    } });
    let eval = eval_module(&s3);
    let service = service_config(&eval);
    assert_eq!(
        service["LoadCredential"],
        json!([
            "s3AccessKeyId:/run/keys/id",
            "s3SecretAccessKey:/run/keys/secret"
        ])
    );
    assert_eq!(service["StateDirectory"], json!(["nip", "ncps/db"]));
    let script = wrapper_script(&eval);
    for line in [
        "export CACHE_SECRET_KEY_PATH=/var/lib/nip/secret-key",
        "export CACHE_STORAGE_S3_ACCESS_KEY_ID=\"$(cat \"$CREDENTIALS_DIRECTORY/s3AccessKeyId\")\"",
        "export CACHE_STORAGE_S3_SECRET_ACCESS_KEY=\"$(cat \"$CREDENTIALS_DIRECTORY/s3SecretAccessKey\")\"",
    ] {
        assert!(script.contains(line), "{line} in\n{script}");
    }

    // The database URL from a file: exported from its credential; databaseURL must be null.
    let mut file = base.clone();
    file["cache"]["databaseURLFile"] = json!("/run/keys/db-url");
    let eval = eval_module(&file);
    let failed: Vec<_> = eval["config"]["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] == false)
        .map(|a| a["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        failed,
        ["services.nip: set exactly one of cache.databaseURL and cache.databaseURLFile"]
    );
    file["cache"]["databaseURL"] = Value::Null;
    let eval = eval_module(&file);
    assert!(eval["config"]["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["assertion"] == true));
    assert!(wrapper_script(&eval)
        .contains("export CACHE_DATABASE_URL=\"$(cat \"$CREDENTIALS_DIRECTORY/databaseURL\")\""));
    assert_eq!(
        service_config(&eval)["LoadCredential"],
        json!(["databaseURL:/run/keys/db-url"])
    );
}

/// Every setting the module can write (S3, Redis, OpenTelemetry, netrc, locks) is accepted by
/// nip as the module writes it; the Redis ones are named as unused.
#[test]
fn module_json_with_every_setting_is_accepted() {
    if !nix_instantiate_available("module_json_with_every_setting_is_accepted") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let eval = eval_module(&json!({
        "enable": true,
        "logLevel": "debug",
        "netrcFile": "/etc/nix/netrc",
        "openTelemetry": { "enable": true, "grpcURL": "http://127.0.0.1:4317" },
        "analytics": { "reporting": { "enable": false, "samples": true } },
        "cache": {
            "hostName": "h",
            "allowDeleteVerb": true,
            "signNarinfo": false,
            "maxSize": "10G",
            "lru": { "schedule": "@every 1h", "scheduleTimeZone": "UTC" },
            "database": { "pool": { "maxOpenConns": 4, "maxIdleConns": 2 } },
            "lock": { "backend": "redis", "downloadTTL": "1m30s" },
            "redis": { "addresses": ["redis0:6379"], "username": "u", "passwordFile": "/run/keys/redis" },
            "storage": { "s3": {
                "bucket": "nip", "endpoint": "http://127.0.0.1:9000", "region": "eu-west-1",
                "forcePathStyle": true,
                "accessKeyIdPath": "/run/keys/id", "secretAccessKeyPath": "/run/keys/secret"
            } },
            "upstream": { "urls": ["https://cache.nixos.org"], "publicKeys": [NIXOS_KEY] }
        }
    }));
    let written: Value = serde_json::from_str(eval["json"].as_str().unwrap()).unwrap();
    assert_eq!(
        written["cache"]["redis"],
        json!({ "addrs": ["redis0:6379"], "db": 0, "username": "u", "use-tls": false, "pool-size": 10 })
    );
    assert_eq!(
        written["opentelemetry"],
        json!({ "enabled": true, "grpc-url": "http://127.0.0.1:4317" })
    );
    assert!(wrapper_script(&eval).contains(
        "export CACHE_REDIS_PASSWORD=\"$(cat \"$CREDENTIALS_DIRECTORY/redisPassword\")\""
    ));
    let config = tmp.path().join("nip-config.json");
    std::fs::write(&config, eval["json"].as_str().unwrap()).unwrap();
    let out = run(clean(nip_bin(), tmp.path())
        .env("CACHE_STORAGE_S3_ACCESS_KEY_ID", "id")
        .env("CACHE_STORAGE_S3_SECRET_ACCESS_KEY", "secret")
        .env("CACHE_REDIS_PASSWORD", "pw")
        .arg("--config")
        .arg(&config)
        .args(["serve", "--print-config"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(cfg["cache.storage.s3"]["bucket"], "nip");
    assert_eq!(cfg["cache.storage.s3"]["region"], "eu-west-1");
    assert_eq!(cfg["cache.storage.s3"]["force-path-style"], true);
    assert_eq!(cfg["cache.netrc-file"], "/etc/nix/netrc");
    assert_eq!(cfg["opentelemetry.grpc-url"], "http://127.0.0.1:4317");
    assert_eq!(cfg["cache.allow-delete-verb"], true);
    assert_eq!(cfg["cache.sign-narinfo"], false);
    assert_eq!(cfg["cache.lru.timezone"], "UTC");
    assert_eq!(cfg["log.level"], "debug");
    let ignored = cfg["ignored"].to_string();
    assert!(ignored.contains("--cache-redis-addrs"), "{ignored}");
}

/// flake.nix's outputs, with a stand-in nixpkgs: the package per system (and as `default` and
/// in the overlay) is nix/package.nix; the NixOS module is nix/module.nix.
#[test]
fn flake_outputs_are_the_package_and_the_module() {
    if !nix_instantiate_available("flake_outputs_are_the_package_and_the_module") {
        return;
    }
    let expr = r#"
      let
        flake = import ./flake.nix;
        stubPkgs = system: { callPackage = file: args: { inherit system; file = toString file; }; };
        nixpkgs = {
          lib.genAttrs = names: f:
            builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
          legacyPackages = {
            x86_64-linux = stubPkgs "x86_64-linux";
            aarch64-linux = stubPkgs "aarch64-linux";
          };
        };
        self = flake.outputs { inherit self nixpkgs; };
      in {
        inherit (flake) inputs;
        inherit (self) packages;
        overlay = (self.overlays.default (stubPkgs "final") { }).nip;
        modules = builtins.mapAttrs (_: m: toString m) self.nixosModules;
      }
    "#;
    let out = eval_expr(expr);
    let flake: Value = serde_json::from_str(&out).unwrap();
    let root = repo_root();
    let package = root.join("nix/package.nix").display().to_string();
    let module = root.join("nix/module.nix").display().to_string();
    assert_eq!(
        flake["inputs"],
        json!({ "nixpkgs": { "url": "github:NixOS/nixpkgs/nixos-unstable" } })
    );
    for system in ["x86_64-linux", "aarch64-linux"] {
        for name in ["nip", "default"] {
            assert_eq!(
                flake["packages"][system][name],
                json!({ "file": package, "system": system })
            );
        }
    }
    assert_eq!(
        flake["overlay"],
        json!({ "file": package, "system": "final" })
    );
    assert_eq!(
        flake["modules"],
        json!({ "nip": module, "default": module })
    );
}

/// nix/package.nix, evaluated with a stand-in rustPlatform: the workspace's version, its
/// Cargo.lock, only the nip binary. Its install step, run here on this build's binary, gives
/// bin/ncps and bin/dbmate-ncps that find nip without any environment.
#[test]
fn package_installs_nip_and_the_ncps_shims() {
    if !nix_instantiate_available("package_installs_nip_and_the_ncps_shims") {
        return;
    }
    let expr = r#"
      let
        p = import ./nix/package.nix {
          lib = {
            fileset = { toSource = { root, fileset }: "src"; unions = x: x; };
            licenses.asl20 = "asl20";
            platforms.linux = [ ];
          };
          rustPlatform.buildRustPackage = args: args;
        };
      in p // {
        cargoLock.lockFile = toString p.cargoLock.lockFile;
        lockFileExists = builtins.pathExists p.cargoLock.lockFile;
      }
    "#;
    let out = eval_expr(expr);
    let pkg: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pkg["pname"], "nip");
    assert_eq!(pkg["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        pkg["cargoLock"]["lockFile"],
        repo_root().join("Cargo.lock").display().to_string()
    );
    assert_eq!(pkg["lockFileExists"], true);
    assert_eq!(
        pkg["cargoBuildFlags"],
        json!(["--package", "nip", "--bin", "nip"])
    );
    assert_eq!(pkg["meta"]["mainProgram"], "nip");

    // The install step, outside Nix: the shims' store paths stand for the repository's files,
    // and substituteInPlace is stdenv's (only --replace-fail is used).
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(out_dir.join("bin")).unwrap();
    std::os::unix::fs::symlink(nip_bin(), out_dir.join("bin/nip")).unwrap();
    let mut install = pkg["postInstall"].as_str().unwrap().to_string();
    for name in ["ncps", "dbmate-ncps"] {
        let store = install
            .split_whitespace()
            .find(|w| w.starts_with("/nix/store/") && w.ends_with(&format!("-{name}")))
            .unwrap_or_else(|| panic!("no store path of {name} in {install}"))
            .to_string();
        install = install.replace(&store, &shim(name).display().to_string());
    }
    let substitute = r#"
substituteInPlace() {
  files=
  while [ $# -gt 0 ]; do
    case $1 in
    --replace-fail) from=$2; to=$3; shift 3 ;;
    *) files="$files $1"; shift ;;
    esac
  done
  for f in $files; do
    grep -qF -- "$from" "$f" || { echo "substituteInPlace: $from not in $f" >&2; exit 1; }
    python3 -c 'import sys; p, a, b = sys.argv[1:]; s = open(p).read(); open(p, "w").write(s.replace(a, b))' "$f" "$from" "$to"
  done
}
"#;
    run_ok(
        Command::new("sh")
            .arg("-ec")
            .arg(format!("{substitute}\n{install}"))
            .env("out", &out_dir),
    );
    let bin = out_dir.join("bin");
    let ncps = std::fs::read_to_string(bin.join("ncps")).unwrap();
    assert!(!ncps.contains("@nip@"), "{ncps}");
    assert!(
        ncps.contains(&format!("nip='{}'", bin.join("nip").display())),
        "{ncps}"
    );

    // Run from elsewhere, with no NIP_BIN and no nip on PATH.
    let version = run_ok(Command::new(nip_bin()).arg("--version"));
    assert_eq!(
        run_ok(clean(bin.join("ncps"), tmp.path()).arg("--version")),
        version
    );
    let db = tmp.path().join("db/db.sqlite");
    let out = run_ok(
        clean(bin.join("dbmate-ncps"), tmp.path())
            .env("DATABASE_URL", format!("sqlite:{}", db.display()))
            .arg("up"),
    );
    assert!(out.contains("applied"), "{out}");
    assert!(db.exists());
}

/// `ncps ARGS` runs `nip ARGS`: nip given by NIP_BIN, or the nip beside the script.
#[test]
fn ncps_shim_runs_nip() {
    let tmp = tempfile::tempdir().unwrap();
    let version = run_ok(Command::new(nip_bin()).arg("--version"));
    let (code, out) = run_shim("ncps", &["--version"], &[], tmp.path());
    assert_eq!((code, out.as_str()), (0, version.as_str()));
    let (code, out) = run_shim("ncps", &["serve", "--help"], &[], tmp.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Usage: nip serve"), "{out}");
    assert!(out.contains("--cache-upstream-url"), "{out}");
    let (code, out) = run_shim("ncps", &["no-such-command"], &[], tmp.path());
    assert_ne!(code, 0, "{out}");

    // Installed beside nip (as in the package, before the path is substituted).
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(shim("ncps"), bin.join("ncps")).unwrap();
    std::os::unix::fs::symlink(nip_bin(), bin.join("nip")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("ncps"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert_eq!(
        run_ok(clean(bin.join("ncps"), tmp.path()).arg("--version")),
        version
    );
}

/// `dbmate-ncps up` (what services.ncps runs before starting) applies nip's migrations to
/// DATABASE_URL; the other dbmate commands say nip has no equivalent.
#[test]
fn dbmate_ncps_up_migrates_database_url() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let db = home.join("x/db.sqlite");
    let url = format!("sqlite:{}", db.display());
    let (code, out) = run_shim("dbmate-ncps", &["up"], &[("DATABASE_URL", &url)], home);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("applied") && out.contains("migration"),
        "{out}"
    );
    assert!(db.exists());
    // Nothing else written: no nip-data in the working directory.
    assert!(!home.join("nip-data").exists());
    let (code, out) = run_shim("dbmate-ncps", &["up"], &[("DATABASE_URL", &url)], home);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("up to date"), "{out}");
    let (code, out) = run_shim("dbmate-ncps", &["status"], &[("DATABASE_URL", &url)], home);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("up to date"), "{out}");
    // The database is nip's: `nip migrate up --dry-run` finds nothing to apply.
    let out = run_ok(
        Command::new(nip_bin())
            .args(["migrate", "up", "--dry-run", "--cache-database-url"])
            .arg(&url),
    );
    assert!(out.contains("up to date"), "{out}");

    // dbmate's --url and --env, its sqlite3: scheme, its options about migration files, and
    // nip's own CACHE_DATABASE_URL.
    for (i, (args, envs)) in [
        (vec!["--url", "sqlite:{db}"], vec![]),
        (
            vec![
                "--url=sqlite3:{db}",
                "--no-dump-schema",
                "-d",
                "./db/migrations",
            ],
            vec![],
        ),
        (
            vec!["--env", "NCPS_DB", "up"],
            vec![("NCPS_DB", "sqlite:{db}")],
        ),
        (vec![], vec![("CACHE_DATABASE_URL", "sqlite:{db}")]),
    ]
    .into_iter()
    .enumerate()
    {
        let other = home.join(format!("db{i}/db.sqlite"));
        let fill = |s: &str| s.replace("{db}", &other.display().to_string());
        let mut args: Vec<String> = args.iter().map(|a| fill(a)).collect();
        if !args.iter().any(|a| a == "up") {
            args.push("up".into());
        }
        let envs: Vec<(String, String)> =
            envs.iter().map(|(k, v)| (k.to_string(), fill(v))).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, out) = run_shim("dbmate-ncps", &args, &envs, home);
        assert_eq!(code, 0, "{args:?} {envs:?}: {out}");
        assert!(other.exists(), "{args:?} {envs:?}: {out}");
    }

    // What nip cannot do: a clear message, exit status 2, nothing run.
    for cmd in [
        "rollback", "down", "new", "drop", "dump", "load", "create", "wait",
    ] {
        let (code, out) = run_shim("dbmate-ncps", &[cmd], &[("DATABASE_URL", &url)], home);
        assert_eq!(code, 2, "{cmd}: {out}");
        assert!(
            out.contains(&format!(
                "'{cmd}' is a dbmate command nip has no equivalent for"
            )),
            "{cmd}: {out}"
        );
    }
    let (code, out) = run_shim("dbmate-ncps", &["up"], &[], home);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no database URL: set DATABASE_URL"), "{out}");
    let (code, out) = run_shim(
        "dbmate-ncps",
        &["--bogus", "up"],
        &[("DATABASE_URL", &url)],
        home,
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown option --bogus"), "{out}");
    let (code, out) = run_shim("dbmate-ncps", &[], &[("DATABASE_URL", &url)], home);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("usage: dbmate-ncps"), "{out}");
    let (code, out) = run_shim(
        "dbmate-ncps",
        &["--env", "X;touch /tmp/pwned", "up"],
        &[("DATABASE_URL", &url)],
        home,
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a variable name"), "{out}");
}

/// nixpkgs' services.ncps with `package = nip`: its preStart (`dbmate-ncps up` with
/// DATABASE_URL), then its ExecStart (`ncps --config <its JSON> serve`), through the shims.
#[test]
fn services_ncps_with_package_nip_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let (_upstream, upstream_url) = start_empty_upstream(&tmp.path().join("upstream"));
    let data = tmp.path().join("ncps");
    let port = free_port();
    let config = write_ncps_nixos_config(tmp.path(), &data, port, &upstream_url);

    let url = format!("sqlite:{}/db/db.sqlite", data.display());
    let (code, out) = run_shim(
        "dbmate-ncps",
        &["up"],
        &[("DATABASE_URL", &url)],
        tmp.path(),
    );
    assert_eq!(code, 0, "{out}");
    let log = tmp.path().join("nip.log");
    let (_server, base) = spawn_server(
        clean("sh", tmp.path())
            .current_dir("/")
            .arg(shim("ncps"))
            .env("NIP_BIN", nip_bin())
            .arg("--config")
            .arg(&config)
            .arg("serve"),
        &log,
        port,
    );
    assert!(nix_cache_info(&base).contains("StoreDir: /nix/store"));
    let log = std::fs::read_to_string(&log).unwrap();
    // The migrations were applied by the preStart: the server found nothing to do.
    assert!(!log.to_lowercase().contains("error"), "{log}");
}

/// The system calls in a systemd syscall-filter group, nested groups expanded.
fn syscall_group(group: &str) -> BTreeSet<String> {
    let out = run_ok(Command::new("systemd-analyze").args(["syscall-filter", group]));
    let mut set = BTreeSet::new();
    for line in out.lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.starts_with('@') {
            set.extend(syscall_group(name));
        } else {
            set.insert(name.to_string());
        }
    }
    set
}

fn tool_present(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// nip as the services run it (non-root, working directory `/`, the module's JSON) under
/// strace, through start (migrations, key generation), Nix reads, an upstream miss, /metrics,
/// an upload, LRU passes and a SIGTERM shutdown: every system call is one that
/// `SystemCallFilter=@system-service ~@privileged ~@resources` allows; no writable executable
/// memory (MemoryDenyWriteExecute); only AF_UNIX/AF_INET/AF_INET6 sockets
/// (RestrictAddressFamilies); no /proc files outside the process's own (ProcSubset=pid) but
/// one harmless read; files written only in the state and temp directories (ProtectSystem=strict).
#[test]
fn nip_runtime_needs_nothing_the_hardening_forbids() {
    const TEST: &str = "nip_runtime_needs_nothing_the_hardening_forbids";
    // scripts/test.sh installs both (systemd-analyze comes with Debian's systemd package).
    for (tool, package) in [("strace", "strace"), ("systemd-analyze", "systemd")] {
        if !tool_present(tool) {
            tool_missing(tool, TEST, &format!("apt-get install {package}"));
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_upstream, upstream_url) = start_empty_upstream(&tmp.path().join("upstream"));
    // By name, so that the trace includes a host name lookup.
    let upstream_url = upstream_url.replace("127.0.0.1", "localhost");
    let root = tmp.path().join("svc");
    let state = root.join("state");
    let temp = root.join("tmp");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&temp).unwrap();
    // As root, the service's non-root user is `nobody` (SQLite, for one, behaves differently as
    // root: it chowns its journal files, which ~@privileged forbids and a service never does).
    let as_root = run_ok(Command::new("id").arg("-u")).trim() == "0";
    if as_root {
        use std::os::unix::fs::PermissionsExt;
        for dir in [tmp.path(), root.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for dir in [&state, &temp] {
            std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        }
    }
    let port = free_port();
    let text = ncps_nixos_json(&state, &temp, port, &upstream_url)
        .replace("\"0 2 * * *\"", "\"@every 1s\"");
    let config = root.join("nip-config.json");
    std::fs::write(&config, text).unwrap();
    let trace = tmp.path().join("trace");
    let log = tmp.path().join("nip.log");
    let mut strace = Command::new("strace");
    strace.args(["-f", "-qq", "-o"]).arg(&trace);
    if as_root {
        strace.args(["-u", "nobody"]);
    }
    let child = strace
        .arg(nip_bin())
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/var/empty")
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = KillOnDrop(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(60));
    for path in [
        "/nix-cache-info",
        "/pubkey",
        "/metrics",
        "/0000000000000000000000000000000a.narinfo",
    ] {
        assert!(http_get(&format!("{base}{path}")).is_some(), "{path}");
    }
    // An upload: staging in the temp directory, fsync, rename into the store.
    let nar = vec![7u8; 3 << 20];
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(&nar)
    };
    let name = format!("{}.nar", nip_core::base32::encode(&digest));
    let status = reqwest::blocking::Client::new()
        .put(format!("{base}/nar/{name}"))
        .body(nar)
        .send()
        .unwrap()
        .status();
    assert!(status.is_success(), "PUT /nar/{name}: {status}");
    std::thread::sleep(Duration::from_millis(2500));
    // systemd stops a service with SIGTERM: to nip (the trace's first process), not strace.
    let pid = std::fs::read_to_string(&trace)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server.0.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "nip did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("stopped"), "{log}");
    let trace = std::fs::read_to_string(&trace).unwrap();

    let allowed: BTreeSet<String> = {
        let forbidden: BTreeSet<String> = syscall_group("@privileged")
            .union(&syscall_group("@resources"))
            .cloned()
            .collect();
        syscall_group("@system-service")
            .difference(&forbidden)
            .cloned()
            .collect()
    };
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    let state_s = state.display().to_string();
    let temp_s = temp.display().to_string();
    for line in trace.lines() {
        // "<pid> <name>(<args>) = <result>", or "<pid> <... name resumed>..."
        let Some((_, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("<...") || rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        used.insert(name.to_string());
        let exec_mem = match name {
            "mmap" => args.contains("PROT_WRITE") && args.contains("PROT_EXEC"),
            "mprotect" | "pkey_mprotect" => args.contains("PROT_EXEC"),
            _ => false,
        };
        if exec_mem {
            problems.push(format!("writable executable memory: {line}"));
        }
        if name == "socket"
            && !["AF_UNIX", "AF_INET,", "AF_INET6"]
                .iter()
                .any(|f| args.starts_with(f))
        {
            problems.push(format!("socket family: {line}"));
        }
        let path = args.split('"').nth(1).unwrap_or("");
        if path.starts_with("/proc/")
            && !path.starts_with("/proc/self/")
            && !path.starts_with("/proc/thread-self/")
            // Hidden there, and harmless: the machine's host name (read even when
            // cache.hostname is set; nip then falls back to a default it does not use) and
            // glibc malloc's look at the overcommit policy (it assumes the default).
            && path != "/proc/sys/kernel/hostname"
            && path != "/proc/sys/vm/overcommit_memory"
        {
            problems.push(format!(
                "/proc outside the process (ProcSubset=pid): {line}"
            ));
        }
        let writes = match name {
            "open" | "openat" | "creat" => {
                args.contains("O_WRONLY") || args.contains("O_RDWR") || args.contains("O_CREAT")
            }
            "mkdir" | "mkdirat" | "rename" | "renameat" | "renameat2" | "unlink" | "unlinkat"
            | "rmdir" | "link" | "linkat" | "symlink" | "symlinkat" | "truncate" => true,
            _ => false,
        };
        if writes
            && !path.is_empty()
            && path != "/dev/null"
            && !path.starts_with(&state_s)
            && !path.starts_with(&temp_s)
            && !line.contains("= -1 ENOENT")
        {
            problems.push(format!(
                "write outside the state and temp directories: {line}"
            ));
        }
    }
    let forbidden: Vec<_> = used.difference(&allowed).collect();
    assert!(
        forbidden.is_empty(),
        "system calls the service's SystemCallFilter forbids: {forbidden:?}"
    );
    assert!(problems.is_empty(), "{problems:#?}");
    // The trace did see the work.
    for call in ["fsync", "renameat2", "accept4", "execve"] {
        assert!(
            used.iter()
                .any(|u| u.starts_with(call.trim_end_matches('2'))),
            "{call} not in {used:?}"
        );
    }
}
