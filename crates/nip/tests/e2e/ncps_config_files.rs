//! ncps deployments' own configuration files, unchanged: the JSON that the NixOS module writes
//! (`ncps --config <file>.json serve`, every key it always holds) and ncps' `config.example.yaml`
//! (copied verbatim from ncps 816f6378, `fixtures/`). Both give the expected effective
//! configuration and name each setting nip does without; the NixOS one also really starts and
//! serves. `cache.cdc.enabled: true` is refused with what to do.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::common::*;

const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
const COMMUNITY_KEY: &str =
    "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=";
const LOCKS: &str = "instances coordinate through the shared database; Redis is not needed";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e/fixtures")
        .join(name)
}

/// `nip --config FILE serve --print-config` with nothing from the test's environment but PATH
/// (and `HOME`, which has no `.netrc`): its status, stdout and stderr.
fn print_config(config: &Path, home: &Path) -> (bool, String, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_nip"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home)
        .arg("--config")
        .arg(config)
        .args(["serve", "--print-config"]));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn print_config_ok(config: &Path, home: &Path) -> (String, Value) {
    let (ok, out, err) = print_config(config, home);
    assert!(ok, "{} failed:\n{out}\n{err}", config.display());
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (out, v)
}

/// The flags listed under "ignored", each with its reason.
fn ignored(cfg: &Value) -> Vec<(String, String)> {
    cfg["ignored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let (flag, why) = v.as_str().unwrap().split_once(": ").unwrap();
            (flag.to_string(), why.to_string())
        })
        .collect()
}

/// The upstreams (and their keys) both ncps files name: cache.nixos.org and nix-community.
fn assert_ncps_default_upstreams(cfg: &Value) {
    assert_eq!(
        cfg["cache.upstream.urls"],
        json!([
            "https://cache.nixos.org/",
            "https://nix-community.cachix.org/"
        ])
    );
    assert_eq!(
        cfg["cache.upstream.public-keys"],
        json!([NIXOS_KEY, COMMUNITY_KEY])
    );
}

fn flags(ignored: &[(String, String)]) -> Vec<&str> {
    ignored.iter().map(|(f, _)| f.as_str()).collect()
}

#[test]
fn ncps_nixos_module_json_config_is_accepted_as_is() {
    let home = tempfile::tempdir().unwrap();
    let (raw, cfg) = print_config_ok(&fixture("ncps-nixos.json"), home.path());
    assert_eq!(cfg["cache.hostname"], "cache.example.internal", "{raw}");
    assert_eq!(cfg["cache.storage.local"], "/var/lib/ncps");
    assert_eq!(
        cfg["cache.database-url"],
        "sqlite:/var/lib/ncps/db/db.sqlite"
    );
    assert_eq!(cfg["cache.temp-path"], "/tmp");
    assert_eq!(cfg["cache.allow-put-verb"], true);
    assert_eq!(cfg["cache.allow-delete-verb"], false);
    assert_eq!(cfg["cache.sign-narinfo"], true);
    assert_eq!(cfg["cache.max-size"], json!(50u64 << 30));
    assert_eq!(cfg["cache.lru.schedule"], "0 2 * * *");
    assert_eq!(cfg["cache.lru.timezone"], "Europe/Paris");
    // max-open-conns 0 means the default, as in ncps.
    assert_eq!(cfg["cache.database.pool.max-open-conns"], 8);
    assert_eq!(cfg["cache.cdc.enabled"], false);
    assert_ncps_default_upstreams(&cfg);
    assert_eq!(cfg["cache.upstream.dialer-timeout"], "5000ms");
    // Go's duration form "1m30s".
    assert_eq!(cfg["cache.upstream.response-header-timeout"], "90000ms");
    assert_eq!(cfg["log.level"], "info");
    assert_eq!(cfg["prometheus.enabled"], true);
    assert_eq!(cfg["server.addr"], ":8501");
    // No ~/.netrc in HOME: none, and no error.
    assert_eq!(cfg["cache.netrc-file"], Value::Null);
    let ignored = ignored(&cfg);
    assert_eq!(
        flags(&ignored),
        // The module writes ncps' defaults for the CDC sizes and the locks: the same behaviour
        // as nip's, so no warning; what it sets otherwise is named.
        [
            "--cache-database-pool-max-idle-conns",
            "--analytics-reporting-enabled",
        ],
        "{raw}"
    );
    let why = |flag: &str| ignored.iter().find(|(f, _)| f == flag).unwrap().1.clone();
    assert_eq!(
        why("--analytics-reporting-enabled"),
        "nip never reports usage"
    );
}

/// The same JSON, with the paths, the address and the upstream of this test machine, really
/// starts: ncps' `/nix-cache-info`, and one warning line per ignored setting.
#[test]
fn ncps_nixos_module_json_config_starts_a_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (_upstream, upstream_url) = start_empty_upstream(&tmp.path().join("upstream"));
    let data = tmp.path().join("ncps");
    let port = free_port();
    let config = write_ncps_nixos_config(tmp.path(), &data, port, &upstream_url);
    let log = tmp.path().join("nip.log");
    let (_server, url) = spawn_server(
        Command::new(env!("CARGO_BIN_EXE_nip"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", tmp.path())
            .arg("--config")
            .arg(&config)
            .arg("serve"),
        &log,
        port,
    );
    assert_eq!(
        nix_cache_info(&url),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n"
    );
    assert!(data.join("db/db.sqlite").exists());
    let log = std::fs::read_to_string(&log).unwrap();
    let line = "--analytics-reporting-enabled is ignored because nip never reports usage";
    assert_eq!(log.matches(line).count(), 1, "{line:?} in\n{log}");
    // cdc.enabled false, analytics samples false and ncps' default lock and chunk settings are
    // no news.
    assert!(!log.contains("--cache-cdc-enabled is ignored"), "{log}");
    assert!(!log.contains("--analytics-reporting-samples"), "{log}");
    assert!(!log.contains("--cache-lock-backend is ignored"), "{log}");
    assert!(!log.contains("--cache-cdc-max is ignored"), "{log}");
    assert_eq!(log.matches(" is ignored because ").count(), 2, "{log}");
}

#[test]
fn ncps_config_example_yaml_is_accepted_verbatim() {
    let home = tempfile::tempdir().unwrap();
    let (raw, cfg) = print_config_ok(&fixture("ncps-config.example.yaml"), home.path());
    assert_eq!(cfg["cache.hostname"], "ncps.mycompany.tld", "{raw}");
    assert_eq!(cfg["log.level"], "error");
    assert_eq!(cfg["opentelemetry.enabled"], true);
    assert_eq!(
        cfg["opentelemetry.grpc-url"],
        "http://otelcol-collector.monitoring.svc:4317"
    );
    assert_eq!(cfg["prometheus.enabled"], true);
    assert_eq!(cfg["cache.allow-delete-verb"], true);
    assert_eq!(cfg["cache.allow-put-verb"], true);
    // `get-token: ""` and `secret-key-path: ""`: none given, as in ncps.
    assert_eq!(cfg["cache.get-token"], Value::Null);
    assert_eq!(cfg["cache.secret-key-path"], "/var/lib/ncps/secret-key");
    assert_eq!(
        cfg["cache.database-url"],
        "sqlite:/var/lib/ncps/db/db.sqlite"
    );
    assert_eq!(cfg["cache.max-size"], json!(100u64 << 30));
    assert_eq!(cfg["cache.lru.schedule"], "0 0 * * *");
    assert_eq!(cfg["cache.lru.timezone"], "America/Los_Angeles");
    assert_eq!(cfg["cache.sign-narinfo"], true);
    assert_eq!(cfg["cache.require-trusted-signature"], false);
    assert_eq!(cfg["cache.trusted-upload-keys"], json!([]));
    assert_eq!(cfg["cache.storage.local"], "/var/lib/ncps");
    assert_eq!(cfg["cache.temp-path"], "/tmp");
    assert_eq!(cfg["cache.netrc-file"], "/etc/ncps/netrc");
    assert_ncps_default_upstreams(&cfg);
    assert_eq!(cfg["cache.upstream.dialer-timeout"], "3000ms");
    assert_eq!(cfg["cache.upstream.response-header-timeout"], "3000ms");
    assert_eq!(cfg["server.addr"], ":8501");
    assert_eq!(cfg["cache.cdc.enabled"], false);
    let ignored = ignored(&cfg);
    assert_eq!(
        flags(&ignored),
        // Its Redis addresses are named; every other value it gives is ncps' default.
        ["--analytics-reporting-enabled", "--cache-redis-addrs"],
        "{raw}"
    );
    let why = |flag: &str| ignored.iter().find(|(f, _)| f == flag).unwrap().1.clone();
    assert_eq!(why("--cache-redis-addrs"), LOCKS);
}

/// `cache.cdc.enabled: true` (the example with only that line changed, the variable, the flag)
/// stops the start with what to do; nothing is created.
#[test]
fn ncps_cdc_enabled_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(fixture("ncps-config.example.yaml")).unwrap();
    let line = "    # Enable CDC chunking\n    enabled: false\n";
    assert_eq!(example.matches(line).count(), 1);
    let cdc_on = tmp.path().join("config.yaml");
    std::fs::write(
        &cdc_on,
        example.replace(line, "    # Enable CDC chunking\n    enabled: true\n"),
    )
    .unwrap();
    let (ok, out, err) = print_config(&cdc_on, tmp.path());
    assert!(!ok, "{out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("--cache-cdc-enabled: nip stores whole NARs and cannot honour ncps' content-defined chunking: set cache.cdc.enabled to false"),
        "{err}"
    );
    assert!(err.contains("ncps migrate-chunks-to-nar"), "{err}");

    let data = tmp.path().join("data");
    for (env, args) in [
        (Some(("CACHE_CDC_ENABLED", "true")), vec![]),
        (None, vec!["--cache-cdc-enabled"]),
        (None, vec!["--cache-cdc-enabled=T"]),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nip"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", tmp.path())
            .args(["serve", "--cache-data-path"])
            .arg(&data)
            .args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} {args:?}");
        assert!(err.contains("set cache.cdc.enabled to false"), "{err}");
        assert!(!data.exists(), "a refused start created {}", data.display());
    }
}

/// ncps' parsing forms on the command line: `s`, slice flags split on commas, Go booleans and
/// durations, robfig/cron schedules, and the `~/.netrc` default.
#[test]
fn ncps_command_line_forms() {
    let home = tempfile::tempdir().unwrap();
    let netrc = home.path().join(".netrc");
    std::fs::write(&netrc, "machine cache.example login u password p\n").unwrap();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_nip"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .env("CACHE_LRU_SCHEDULE_TZ", "Asia/Tokyo")
            .args([
                "s",
                "--cache-upstream-url=https://a.example,https://b.example?priority=45",
                &format!("--cache-upstream-public-key={NIXOS_KEY},{COMMUNITY_KEY}"),
                "--cache-allow-put-verb=T",
                "--cache-upstream-dialer-timeout=1m30s",
                "--cache-negative-ttl=1h2m3.5s",
                "--cache-max-size=1G",
                "--cache-lru-schedule=@every 1h",
                "--cache-verify-schedule=CRON_TZ=Europe/Paris 0 2 * * *",
                "--print-config",
            ]),
    );
    let cfg: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        cfg["cache.upstream.urls"],
        json!(["https://a.example/", "https://b.example/?priority=45"])
    );
    assert_eq!(
        cfg["cache.upstream.public-keys"],
        json!([NIXOS_KEY, COMMUNITY_KEY])
    );
    assert_eq!(cfg["cache.allow-put-verb"], true);
    assert_eq!(cfg["cache.upstream.dialer-timeout"], "90000ms");
    assert_eq!(cfg["cache.negative-ttl"], "3723500ms");
    assert_eq!(cfg["cache.lru.schedule"], "@every 1h");
    assert_eq!(cfg["cache.lru.timezone"], "Asia/Tokyo");
    assert_eq!(
        cfg["cache.verify-schedule"],
        "CRON_TZ=Europe/Paris 0 2 * * *"
    );
    assert_eq!(cfg["cache.netrc-file"], netrc.display().to_string());
    assert_eq!(cfg["ignored"], json!([]));
}
