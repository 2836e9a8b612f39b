//! ncps drop-in compatibility against the real binary: ncps command lines, env files and
//! config.yaml (both flag generations) give the expected effective configuration; `nip migrate
//! up`; real Nix `nix copy --to …/upload` then substitution from the root; and an upstream with
//! `?priority=`, nix-serve style and query-string NAR URLs and a key named unlike its host.
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::common::*;

/// One setting's names in one ncps generation: flag, environment variable, config key.
type Names = (&'static str, &'static str, &'static str);

/// What `--print-config` must show for a row.
enum Check {
    Eq(&'static str, Value),
    /// Listed under "ignored" with this flag, and never failing the start.
    Ignored(&'static str),
}

struct Row {
    /// [README generation, current generation].
    names: [Names; 2],
    values: &'static [&'static str],
    check: Check,
}

const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
const COMMUNITY_KEY: &str =
    "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=";
const GET_TOKEN: &str = "get-token-must-not-leak";

/// ncps' global flags (before `serve` on an ncps command line, as its NixOS module writes them).
const GLOBAL: &[&str] = &[
    "log.level",
    "opentelemetry.enabled",
    "opentelemetry.grpc-url",
    "prometheus.enabled",
    "analytics.reporting.enabled",
];

fn same(flag: &'static str, env: &'static str, key: &'static str) -> [Names; 2] {
    [(flag, env, key), (flag, env, key)]
}

#[rustfmt::skip]
fn rows() -> Vec<Row> {
    use Check::*;
    vec![
        Row { names: same("cache-hostname", "CACHE_HOSTNAME", "cache.hostname"), values: &["ncps.example.internal"], check: Eq("cache.hostname", json!("ncps.example.internal")) },
        Row { names: [("cache-data-path", "CACHE_DATA_PATH", "cache.data-path"), ("cache-storage-local", "CACHE_STORAGE_LOCAL", "cache.storage.local")],
              values: &["/srv/ncps"], check: Eq("cache.storage.local", json!("/srv/ncps")) },
        Row { names: same("cache-database-url", "CACHE_DATABASE_URL", "cache.database-url"), values: &["sqlite:/srv/ncps/db/db.sqlite"], check: Eq("cache.database-url", json!("sqlite:/srv/ncps/db/db.sqlite")) },
        Row { names: same("cache-temp-path", "CACHE_TEMP_PATH", "cache.temp-path"), values: &["/srv/tmp"], check: Eq("cache.temp-path", json!("/srv/tmp")) },
        Row { names: [("upstream-cache", "UPSTREAM_CACHES", "cache.upstream.caches"), ("cache-upstream-url", "CACHE_UPSTREAM_URLS", "cache.upstream.urls")],
              values: &["https://cache.nixos.org", "https://nix-community.cachix.org?priority=45"],
              check: Eq("cache.upstream.urls", json!(["https://cache.nixos.org/", "https://nix-community.cachix.org/?priority=45"])) },
        Row { names: [("upstream-public-key", "UPSTREAM_PUBLIC_KEYS", "cache.upstream.public-keys"), ("cache-upstream-public-key", "CACHE_UPSTREAM_PUBLIC_KEYS", "cache.upstream.public-keys")],
              values: &[NIXOS_KEY, COMMUNITY_KEY], check: Eq("cache.upstream.public-keys", json!([NIXOS_KEY, COMMUNITY_KEY])) },
        Row { names: [("upstream-dialer-timeout", "UPSTREAM_DIALER_TIMEOUT", "cache.upstream.dialer-timeout"), ("cache-upstream-dialer-timeout", "CACHE_UPSTREAM_DIALER_TIMEOUT", "cache.upstream.dialer-timeout")],
              values: &["5s"], check: Eq("cache.upstream.dialer-timeout", json!("5000ms")) },
        Row { names: [("upstream-response-header-timeout", "UPSTREAM_RESPONSE_HEADER_TIMEOUT", "cache.upstream.response-header-timeout"), ("cache-upstream-response-header-timeout", "CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT", "cache.upstream.response-header-timeout")],
              values: &["7s"], check: Eq("cache.upstream.response-header-timeout", json!("7000ms")) },
        Row { names: same("netrc-file", "NETRC_FILE", "cache.netrc-file"), values: &["/etc/ncps/netrc"], check: Eq("cache.netrc-file", json!("/etc/ncps/netrc")) },
        Row { names: same("cache-secret-key-path", "CACHE_SECRET_KEY_PATH", "cache.secret-key-path"), values: &["/etc/ncps/secret.key"], check: Eq("cache.secret-key-path", json!("/etc/ncps/secret.key")) },
        Row { names: same("cache-sign-narinfo", "CACHE_SIGN_NARINFO", "cache.sign-narinfo"), values: &["false"], check: Eq("cache.sign-narinfo", json!(false)) },
        Row { names: same("cache-allow-put-verb", "CACHE_ALLOW_PUT_VERB", "cache.allow-put-verb"), values: &["true"], check: Eq("cache.allow-put-verb", json!(true)) },
        Row { names: same("cache-allow-delete-verb", "CACHE_ALLOW_DELETE_VERB", "cache.allow-delete-verb"), values: &["true"], check: Eq("cache.allow-delete-verb", json!(true)) },
        Row { names: same("cache-get-token", "CACHE_GET_TOKEN", "cache.get-token"), values: &[GET_TOKEN], check: Eq("cache.get-token", json!("***")) },
        Row { names: same("cache-max-size", "CACHE_MAX_SIZE", "cache.max-size"), values: &["5G"], check: Eq("cache.max-size", json!(5u64 << 30)) },
        Row { names: same("cache-lru-schedule", "CACHE_LRU_SCHEDULE", "cache.lru.schedule"), values: &["0 2 * * *"], check: Eq("cache.lru.schedule", json!("0 2 * * *")) },
        Row { names: same("cache-lru-schedule-timezone", "CACHE_LRU_SCHEDULE_TZ", "cache.lru.timezone"), values: &["America/Los_Angeles"], check: Eq("cache.lru.timezone", json!("America/Los_Angeles")) },
        Row { names: same("cache-database-pool-max-open-conns", "CACHE_DATABASE_POOL_MAX_OPEN_CONNS", "cache.database.pool.max-open-conns"), values: &["4"], check: Eq("cache.database.pool.max-open-conns", json!(4)) },
        Row { names: same("cache-database-pool-max-idle-conns", "CACHE_DATABASE_POOL_MAX_IDLE_CONNS", "cache.database.pool.max-idle-conns"), values: &["2"], check: Ignored("--cache-database-pool-max-idle-conns") },
        Row { names: same("pprof-addr", "PPROF_ADDR", "pprof.addr"), values: &[":6060"], check: Ignored("--pprof-addr") },
        Row { names: same("server-addr", "SERVER_ADDR", "server.addr"), values: &[":8601"], check: Eq("server.addr", json!(":8601")) },
        Row { names: same("log-level", "LOG_LEVEL", "log.level"), values: &["warn"], check: Eq("log.level", json!("warn")) },
        Row { names: same("otel-enabled", "OTEL_ENABLED", "opentelemetry.enabled"), values: &["true"], check: Eq("opentelemetry.enabled", json!(true)) },
        Row { names: same("otel-grpc-url", "OTEL_GRPC_URL", "opentelemetry.grpc-url"), values: &["http://otel:4317"], check: Eq("opentelemetry.grpc-url", json!("http://otel:4317")) },
        Row { names: same("prometheus-enabled", "PROMETHEUS_ENABLED", "prometheus.enabled"), values: &["true"], check: Eq("prometheus.enabled", json!(true)) },
        Row { names: same("analytics-reporting-enabled", "ANALYTICS_REPORTING_ENABLED", "analytics.reporting.enabled"), values: &["true"], check: Ignored("--analytics-reporting-enabled") },
    ]
}

fn is_multi(key: &str) -> bool {
    key.ends_with(".urls") || key.ends_with(".caches") || key.ends_with(".public-keys")
}

/// Inserts `value` at a dotted path of a nested document.
fn insert(doc: &mut Value, key: &str, value: Value) {
    let mut cur = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(p.to_string())
            .or_insert_with(|| json!({}));
    }
    cur.as_object_mut()
        .unwrap()
        .insert(parts[parts.len() - 1].to_string(), value);
}

/// How the settings reach the binary.
#[derive(Clone, Copy, Debug)]
enum Source {
    CommandLine,
    EnvFile,
    /// `$XDG_CONFIG_HOME/ncps/config.yaml`, found without being named.
    DefaultConfigYaml,
    /// `NCPS_CONFIG_FILE`.
    NamedConfigYaml,
}

fn print_config(dir: &Path, generation: usize, source: Source) -> (String, Value) {
    let xdg = dir.join("xdg");
    std::fs::create_dir_all(xdg.join("ncps")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nip"));
    // Nothing from the test runner's environment may leak in.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("XDG_CONFIG_HOME", &xdg);
    let mut global = Vec::new();
    let mut serve = Vec::new();
    let mut env_file = String::from("# ncps env file\n");
    let mut doc = json!({});
    for row in rows() {
        let (flag, env, key) = row.names[generation];
        match source {
            Source::CommandLine => {
                let args = if GLOBAL.contains(&key) {
                    &mut global
                } else {
                    &mut serve
                };
                for v in row.values {
                    args.push(format!("--{flag}={v}"));
                }
            }
            Source::EnvFile => {
                env_file.push_str(&format!("{env}={}\n", row.values.join(",")));
            }
            Source::DefaultConfigYaml | Source::NamedConfigYaml => {
                let v = if is_multi(key) {
                    json!(row.values)
                } else {
                    json!(row.values[0])
                };
                insert(&mut doc, key, v);
            }
        }
    }
    match source {
        Source::CommandLine => {}
        Source::EnvFile => {
            // As systemd's EnvironmentFile= or `docker run --env-file` read it.
            let path = dir.join("ncps.env");
            std::fs::write(&path, &env_file).unwrap();
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
                    cmd.env(k, v);
                }
            }
        }
        Source::DefaultConfigYaml => {
            let yaml = serde_yaml::to_string(&doc).unwrap();
            std::fs::write(xdg.join("ncps/config.yaml"), yaml).unwrap();
        }
        Source::NamedConfigYaml => {
            let path = dir.join("ncps-config.yaml");
            std::fs::write(&path, serde_yaml::to_string(&doc).unwrap()).unwrap();
            cmd.env("NCPS_CONFIG_FILE", &path);
        }
    }
    cmd.args(&global)
        .arg("serve")
        .args(&serve)
        .arg("--print-config");
    let out = run_ok(&mut cmd);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (out, v)
}

/// Every ncps key, in both generations, from each place ncps reads it, ends up in the effective
/// configuration; ignored ones are listed with a reason; secrets never appear.
#[test]
fn ncps_command_line_env_file_and_config_yaml_give_the_same_effective_config() {
    for generation in [0, 1] {
        for source in [
            Source::CommandLine,
            Source::EnvFile,
            Source::DefaultConfigYaml,
            Source::NamedConfigYaml,
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let case = format!("generation {generation}, {source:?}");
            let (raw, cfg) = print_config(tmp.path(), generation, source);
            assert!(!raw.contains(GET_TOKEN), "{case}: get token printed");
            let ignored: Vec<String> = cfg["ignored"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            for row in rows() {
                match &row.check {
                    Check::Eq(key, want) => {
                        assert_eq!(&cfg[*key], want, "{case}: {key}\n{raw}")
                    }
                    Check::Ignored(flag) => assert!(
                        ignored.iter().any(|i| i.starts_with(&format!("{flag}: "))),
                        "{case}: {flag} not listed as ignored\n{raw}"
                    ),
                }
            }
            let expected_ignored = rows()
                .iter()
                .filter(|r| matches!(r.check, Check::Ignored(_)))
                .count();
            assert_eq!(ignored.len(), expected_ignored, "{case}: {ignored:?}");
        }
    }
}

/// Precedence as in ncps: flag > config file > environment.
#[test]
fn ncps_precedence_flag_over_file_over_env() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("config.yaml");
    std::fs::write(&file, "cache:\n  hostname: from-file\n  temp-path: /file\n").unwrap();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_nip"))
            .env("CACHE_HOSTNAME", "from-env")
            .env("CACHE_TEMP_PATH", "/env")
            .env("SERVER_ADDR", ":7000")
            .env("NCPS_CONFIG_FILE", &file)
            .args(["serve", "--cache-hostname", "from-flag", "--print-config"]),
    );
    let cfg: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cfg["cache.hostname"], "from-flag");
    assert_eq!(cfg["cache.temp-path"], "/file");
    assert_eq!(cfg["server.addr"], ":7000");
}

/// `nip migrate up --dry-run` lists pending migrations without creating anything; `up` applies
/// them; the server then starts on that database.
#[test]
fn migrate_up_dry_run_then_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let dry_run = || {
        run_ok(Command::new(env!("CARGO_BIN_EXE_nip")).args([
            "migrate",
            "up",
            "--dry-run",
            "--cache-storage-local",
            d,
        ]))
    };
    let out = dry_run();
    assert!(out.contains("pending migration"), "{out}");
    assert!(out.contains("0001"), "{out}");
    assert!(
        !data.join("db/db.sqlite").exists(),
        "dry run created the db"
    );
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_nip")).args([
        "migrate",
        "up",
        "--cache-storage-local",
        d,
    ]));
    assert!(out.contains("applied"), "{out}");
    let out = dry_run();
    assert!(out.contains("up to date"), "{out}");
    let server = start_nip_behind(&data, "http://127.0.0.1:9", NIXOS_KEY, &[]);
    assert_eq!(http_get(&format!("{}/healthz", server.url)).unwrap().0, 200);
}

/// `nix copy --to http://…/upload` (ncps' upload URL) uploads; a fresh store then substitutes
/// the paths from the root URL, trusting nip's key.
#[test]
fn nix_copy_to_upload_then_substitute_from_root() {
    let Some(tmp) = nix_tempdir("nix_copy_to_upload_then_substitute_from_root") else {
        return;
    };
    let (upstream_key, paths) =
        make_upstream_with(&tmp.path().join("paths"), &["upstream-test-1"], 2);
    // An upstream that answers "not found": with a dead one, nip refuses new paths (424).
    let (_upstream, upstream_url) = start_empty_upstream(&tmp.path().join("upstream"));
    let server = start_nip(
        &tmp.path().join("data"),
        &[
            "--cache-upstream-url",
            &upstream_url,
            "--cache-upstream-public-key",
            &upstream_key,
            "--cache-allow-put-verb",
            "--cache-hostname",
            "nip-upload",
        ],
    );
    let upload = format!("{}/upload", server.url);
    let out = run(Command::new("timeout")
        .args(["120", "nix", "copy", "--to", &upload])
        .args(&paths)
        .args(["--option", "connect-timeout", "5"]));
    assert!(
        out.status.success(),
        "nix copy --to {upload} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_substitute(&server.url, &server_pubkey(&server.url), &paths);
}

/// Rewrites a fixture cache the way other servers lay it out: NARs at nix-serve style URLs
/// (`nar/<narinfohash>-<narhash>.nar`) or opaque paths with a query string. Narinfo signatures
/// do not cover URL, so they stay valid.
fn relayout(cache: &Path) -> usize {
    let mut changed = 0;
    for entry in std::fs::read_dir(cache).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(hash) = name.strip_suffix(".narinfo") else {
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let field = |f: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{f}: ")))
                .unwrap()
                .to_string()
        };
        let old_url = field("URL");
        let nar_hash = field("NarHash");
        let nar_hash = nar_hash.trim_start_matches("sha256:");
        // Alternate: nix-serve style for some, opaque with a query string for the others.
        let (new_file, new_url) = if changed % 2 == 0 {
            let f = format!("nar/{hash}-{nar_hash}.nar");
            (f.clone(), f)
        } else {
            let f = format!("blobs/{hash}.bin");
            (f.clone(), format!("{f}?download=1&token=abc"))
        };
        std::fs::create_dir_all(cache.join(&new_file).parent().unwrap()).unwrap();
        std::fs::rename(cache.join(&old_url), cache.join(&new_file)).unwrap();
        std::fs::write(
            &path,
            text.replace(&format!("URL: {old_url}\n"), &format!("URL: {new_url}\n")),
        )
        .unwrap();
        changed += 1;
    }
    changed
}

/// An upstream given with `?priority=`, whose NARs sit at nix-serve style and query-string URLs
/// and whose key is named unlike its host (ncps ignores such keys), is substituted by real Nix
/// through nip.
#[test]
fn real_nix_through_nip_from_priority_upstream_with_nix_serve_urls_and_any_key_name() {
    let Some(tmp) = nix_tempdir("real_nix_through_nip_from_priority_upstream") else {
        return;
    };
    let up = tmp.path().join("upstream");
    let (upstream_key, paths) = make_upstream_with(&up, &["not-the-host-name-1"], 2);
    assert!(relayout(&up.join("cache")) >= 4);
    let (_upstream, upstream_url) = start_static(&up.join("cache"));
    let server = start_nip(
        &tmp.path().join("data"),
        &[
            "--cache-upstream-url",
            &format!("{upstream_url}?priority=10"),
            "--cache-upstream-public-key",
            &upstream_key,
            "--cache-hostname",
            "nip-compat",
        ],
    );
    check_substitute(&server.url, &server_pubkey(&server.url), &paths);
    // Served narinfo point at this cache's normalized NAR names.
    let hash = store_hash(&paths[0]);
    let (status, body) = http_get(&format!("{}/{hash}.narinfo", server.url)).unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    assert!(
        url.starts_with("nar/") && !url.contains('?') && !url.contains(&hash),
        "{url}"
    );
}
