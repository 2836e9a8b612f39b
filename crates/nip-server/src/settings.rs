//! Every `nip serve` setting in one table: its flag names, environment variables and config-file
//! keys side by side (ncps' names first, so ncps deployments work unchanged), and the pure merge of
//! the layers. Precedence, as in ncps: flag > config file > environment > default.
use std::collections::{BTreeMap, HashMap};

/// One setting. `key` is the canonical dotted config key.
#[derive(Debug)]
pub struct Setting {
    pub key: &'static str,
    /// Long flag names without `--`; the first is the documented one, the rest are aliases.
    pub flags: &'static [&'static str],
    pub envs: &'static [&'static str],
    /// Config-file keys (dotted paths into the nested document); the first is canonical.
    pub file_keys: &'static [&'static str],
    pub multi: bool,
    pub boolean: bool,
    pub help: &'static str,
    /// `Some(reason)` when the setting is accepted but has no effect yet.
    pub not_implemented: Option<&'static str>,
}

const fn s(
    key: &'static str,
    flags: &'static [&'static str],
    envs: &'static [&'static str],
    file_keys: &'static [&'static str],
    help: &'static str,
) -> Setting {
    Setting {
        key,
        flags,
        envs,
        file_keys,
        multi: false,
        boolean: false,
        help,
        not_implemented: None,
    }
}

const fn multi(mut x: Setting) -> Setting {
    x.multi = true;
    x
}

const fn boolean(mut x: Setting) -> Setting {
    x.boolean = true;
    x
}

const fn later(mut x: Setting, reason: &'static str) -> Setting {
    x.not_implemented = Some(reason);
    x
}

pub const SETTINGS: &[Setting] = &[
    s("cache.hostname", &["cache-hostname"], &["CACHE_HOSTNAME"], &["cache.hostname"],
      "Host name of this cache; names the generated signing key (<hostname>-1). Default: the machine's host name"),
    s("cache.storage.local", &["cache-data-path", "cache-storage-local"],
      &["CACHE_DATA_PATH", "CACHE_STORAGE_LOCAL"], &["cache.storage.local", "cache.data-path"],
      "Directory for the cache's files (NARs, database, signing key). Default: ./nip-data"),
    s("cache.database-url", &["cache-database-url"], &["CACHE_DATABASE_URL"], &["cache.database-url"],
      "Metadata database URL (sqlite:PATH). Default: sqlite:<data path>/db/db.sqlite"),
    s("cache.temp-path", &["cache-temp-path"], &["CACHE_TEMP_PATH"], &["cache.temp-path"],
      "Directory for downloads and uploads in progress. Default: <data path>/tmp"),
    multi(s("cache.upstream.urls", &["upstream-cache", "cache-upstream-url"],
      &["UPSTREAM_CACHES", "CACHE_UPSTREAM_URLS"], &["cache.upstream.urls", "cache.upstream.caches", "upstream.caches"],
      "Upstream binary cache URL; repeat for several. `?priority=N` sets its priority until its /nix-cache-info answers. Default: https://cache.nixos.org")),
    multi(s("cache.upstream.public-keys", &["upstream-public-key", "cache-upstream-public-key"],
      &["UPSTREAM_PUBLIC_KEYS", "CACHE_UPSTREAM_PUBLIC_KEYS"],
      &["cache.upstream.public-keys", "upstream.public-keys"],
      "Public key (name:base64) trusted to sign upstream narinfo; repeat for several")),
    boolean(s("cache.sign-narinfo", &["cache-sign-narinfo"], &["CACHE_SIGN_NARINFO"], &["cache.sign-narinfo"],
      "Add this cache's signature to every narinfo it serves. Default: true")),
    s("cache.secret-key-path", &["cache-secret-key-path"], &["CACHE_SECRET_KEY_PATH"], &["cache.secret-key-path"],
      "Signing key file (Nix format). Default: generated once as <data path>/secret-key"),
    s("cache.netrc-file", &["netrc-file", "cache-netrc-file"], &["NETRC_FILE", "CACHE_NETRC_FILE"],
      &["cache.netrc-file", "netrc-file"], "netrc file with credentials for upstream caches"),
    s("cache.upstream.dialer-timeout", &["upstream-dialer-timeout", "cache-upstream-dialer-timeout"],
      &["UPSTREAM_DIALER_TIMEOUT", "CACHE_UPSTREAM_DIALER_TIMEOUT"],
      &["cache.upstream.dialer-timeout", "upstream.dialer-timeout"],
      "Timeout to connect to an upstream (e.g. 3s). Default: 3s"),
    s("cache.upstream.response-header-timeout",
      &["upstream-response-header-timeout", "cache-upstream-response-header-timeout"],
      &["UPSTREAM_RESPONSE_HEADER_TIMEOUT", "CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT"],
      &["cache.upstream.response-header-timeout", "upstream.response-header-timeout"],
      "Timeout for an upstream's response headers (e.g. 3s). Default: 3s"),
    s("cache.upstream.body-idle-timeout", &["cache-upstream-body-idle-timeout"],
      &["CACHE_UPSTREAM_BODY_IDLE_TIMEOUT"], &["cache.upstream.body-idle-timeout"],
      "An upstream body that sends nothing for this long is abandoned. Default: 30s"),
    s("cache.negative-ttl", &["cache-negative-ttl"], &["CACHE_NEGATIVE_TTL"], &["cache.negative-ttl"],
      "How long a narinfo that no upstream has is remembered as absent. Default: 30s"),
    s("server.addr", &["server-addr"], &["SERVER_ADDR"], &["server.addr"],
      "Address to listen on ([host]:port). Default: :8501"),
    s("log.level", &["log-level"], &["LOG_LEVEL"], &["log.level"],
      "Log level: error, warn, info, debug, trace. Default: info"),
    boolean(s("cache.allow-put-verb", &["cache-allow-put-verb"], &["CACHE_ALLOW_PUT_VERB"],
      &["cache.allow-put-verb"], "Accept Nix uploads: PUT /<hash>.narinfo and PUT /nar/<file> (nix copy --to); they need a write key once any key exists")),
    // Trust rules of Nix uploads (docs/security.md): ncps' signature gate, fail-closed.
    boolean(s("cache.require-trusted-signature", &["cache-require-trusted-signature"],
      &["CACHE_REQUIRE_TRUSTED_SIGNATURE"], &["cache.require-trusted-signature"],
      "Refuse a narinfo upload unless it carries a valid signature from a --cache-trusted-upload-key (needs at least one). Default: false")),
    multi(s("cache.trusted-upload-keys", &["cache-trusted-upload-key"], &["CACHE_TRUSTED_UPLOAD_KEYS"],
      &["cache.trusted-upload-keys"],
      "Public key (name:base64) whose signature vouches for an uploaded narinfo; repeat for several. The signature is kept in the served narinfo")),
    boolean(s("cache.allow-delete-verb", &["cache-allow-delete-verb"], &["CACHE_ALLOW_DELETE_VERB"],
      &["cache.allow-delete-verb"], "Accept DELETE of narinfo and NAR files (admin key once any key exists)")),
    boolean(s("cache.require-auth-read", &["cache-require-auth-read"], &["CACHE_REQUIRE_AUTH_READ"],
      &["cache.require-auth-read"], "Nix reads need a read key too (Bearer, or HTTP Basic password as Nix sends from netrc). Default: false")),
    s("cache.api-key", &[], &["NIP_CACHE_API_KEY"], &[],
      "A token accepted as a read-write key, besides the keys made with `nip keys create`"),
    s("artifact.max-size", &["artifact-max-size"], &["NIP_ARTIFACT_MAX_SIZE"], &["artifact.max-size"],
      "Largest accepted upload (artifact or NAR), e.g. 10G. Default: 10G"),
    s("artifact.retention", &["artifact-retention"], &["NIP_ARTIFACT_RETENTION"], &["artifact.retention"],
      "Delete /v1 artifacts not downloaded for this long (e.g. 30d). Default: keep forever"),
    s("rate-limit.rps", &["rate-limit-rps"], &["NIP_RATE_LIMIT_RPS"], &["rate-limit.rps"],
      "Requests per second allowed per API key (per client address without a key). Default: off"),
    s("rate-limit.burst", &["rate-limit-burst"], &["NIP_RATE_LIMIT_BURST"], &["rate-limit.burst"],
      "Requests allowed in a burst above the rate. Default: twice the rate"),
    s("cache.max-size", &["cache-max-size"], &["CACHE_MAX_SIZE"], &["cache.max-size"],
      "Maximum store size (e.g. 10G): least recently used entries are evicted to stay under it. Default: unlimited"),
    s("cache.lru.schedule", &["cache-lru-schedule"], &["CACHE_LRU_SCHEDULE"], &["cache.lru.schedule"],
      "Cron schedule (5 fields, UTC) of the eviction job, e.g. \"0 2 * * *\". Default: every 5 minutes when --cache-max-size is set"),
    s("cache.verify-schedule", &["cache-verify-schedule"], &["CACHE_VERIFY_SCHEDULE"], &["cache.verify-schedule"],
      "Cron schedule (5 fields, UTC) of a scrub that re-hashes every stored NAR and artifact and removes bad ones (as `nip admin verify --repair`). Default: off"),
    boolean(s("prometheus.enabled", &["prometheus-enabled"], &["PROMETHEUS_ENABLED"], &["prometheus.enabled"],
      "Serve Prometheus metrics on /metrics. Default: false")),
    s("log.format", &["log-format"], &["LOG_FORMAT"], &["log.format"],
      "Log format: text or json. Default: text"),
    boolean(s("opentelemetry.enabled", &["otel-enabled"], &["OTEL_ENABLED"], &["opentelemetry.enabled"],
      "Export traces (a span per request and upstream fetch) and logs via OpenTelemetry: OTLP over gRPC to --otel-grpc-url, else to stdout. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply. Default: false")),
    s("opentelemetry.grpc-url", &["otel-grpc-url"], &["OTEL_GRPC_URL"], &["opentelemetry.grpc-url"],
      "OTLP gRPC endpoint of the collector, e.g. http://127.0.0.1:4317 (https:// for TLS). Default: stdout"),
    // HTTPS and reverse proxies (issue 10).
    s("tls.cert", &["tls-cert"], &["NIP_TLS_CERT"], &["tls.cert"],
      "PEM certificate chain: serve HTTPS (with --tls-key). Reloaded on SIGHUP and when the file changes. Default: plain HTTP"),
    s("tls.key", &["tls-key"], &["NIP_TLS_KEY"], &["tls.key"],
      "PEM private key of --tls-cert"),
    multi(s("server.trusted-proxies", &["trusted-proxies"], &["NIP_TRUSTED_PROXIES"], &["server.trusted-proxies"],
      "Reverse proxies (addresses or CIDR ranges, comma-separated) whose X-Forwarded-For names the client in audit logs and rate limits. Default: none")),
    s("server.read-timeout", &["server-read-timeout"], &["NIP_SERVER_READ_TIMEOUT"], &["server.read-timeout"],
      "Longest a client may stay silent while sending a request head or body (slowloris defence), e.g. 30s. Default: 30s"),
    s("server.max-connections", &["server-max-connections"], &["NIP_SERVER_MAX_CONNECTIONS"], &["server.max-connections"],
      "Open client connections at most; new ones past it are closed at once. Default: 10000"),
    // ncps compatibility (issue 11): the rest of what ncps deployments pass. Implemented where
    // it means something for nip; otherwise accepted with the reason it is ignored.
    s("cache.get-token", &["cache-get-token"], &["CACHE_GET_TOKEN"], &["cache.get-token"],
      "Bearer token required for Nix GET/HEAD requests, as in ncps (a read API key works too); /healthz and /pubkey stay public"),
    s("cache.database.pool.max-open-conns", &["cache-database-pool-max-open-conns"],
      &["CACHE_DATABASE_POOL_MAX_OPEN_CONNS"], &["cache.database.pool.max-open-conns"],
      "Size of the SQLite connection pool (0: the default, 8)"),
    later(s("cache.database.pool.max-idle-conns", &["cache-database-pool-max-idle-conns"],
      &["CACHE_DATABASE_POOL_MAX_IDLE_CONNS"], &["cache.database.pool.max-idle-conns"],
      "Idle connections kept in the database pool (ncps)"),
      "the SQLite pool keeps up to --cache-database-pool-max-open-conns connections open and has no separate idle limit"),
    later(s("cache.lru.timezone", &["cache-lru-schedule-timezone"], &["CACHE_LRU_SCHEDULE_TZ"], &["cache.lru.timezone"],
      "Time zone of --cache-lru-schedule (ncps)"),
      "nip evaluates --cache-lru-schedule in UTC: write the schedule in UTC"),
    later(s("pprof.addr", &["pprof-addr"], &["PPROF_ADDR"], &["pprof.addr"],
      "Listen address of Go's pprof endpoints (ncps)"),
      "pprof is the Go runtime's profiler and nip is not a Go program (profile it with perf)"),
    later(boolean(s("analytics.reporting.enabled", &["analytics-reporting-enabled"], &["ANALYTICS_REPORTING_ENABLED"],
      &["analytics.reporting.enabled"], "ncps' anonymous usage reporting")),
      "nip never reports usage or contacts anything but the configured upstreams"),
    s("cache.storage.s3.bucket", &["cache-storage-s3-bucket"], &["CACHE_STORAGE_S3_BUCKET"],
      &["cache.storage.s3.bucket"], "S3 bucket for NARs (instead of --cache-storage-local)"),
    s("cache.storage.s3.endpoint", &["cache-storage-s3-endpoint"], &["CACHE_STORAGE_S3_ENDPOINT"],
      &["cache.storage.s3.endpoint"], "S3-compatible endpoint URL"),
    s("cache.storage.s3.region", &["cache-storage-s3-region"], &["CACHE_STORAGE_S3_REGION"],
      &["cache.storage.s3.region"], "S3 region"),
    s("cache.storage.s3.access-key-id", &["cache-storage-s3-access-key-id"], &["CACHE_STORAGE_S3_ACCESS_KEY_ID"],
      &["cache.storage.s3.access-key-id"], "S3 access key id"),
    s("cache.storage.s3.secret-access-key", &["cache-storage-s3-secret-access-key"],
      &["CACHE_STORAGE_S3_SECRET_ACCESS_KEY"], &["cache.storage.s3.secret-access-key"], "S3 secret access key"),
    boolean(s("cache.storage.s3.force-path-style", &["cache-storage-s3-force-path-style"],
      &["CACHE_STORAGE_S3_FORCE_PATH_STYLE"], &["cache.storage.s3.force-path-style"], "Path-style S3 addressing (MinIO and most self-hosted servers)")),
    s("cache.storage.s3.prefix", &["cache-storage-s3-prefix"], &["CACHE_STORAGE_S3_PREFIX"],
      &["cache.storage.s3.prefix"], "Key prefix inside the bucket"),
    boolean(s("cache.storage.s3.presign-downloads", &["s3-presign-downloads", "cache-storage-s3-presign-downloads"],
      &["NIP_S3_PRESIGN_DOWNLOADS", "CACHE_STORAGE_S3_PRESIGN_DOWNLOADS"], &["cache.storage.s3.presign-downloads"],
      "Serve /v1 artifact downloads from S3 directly: the lookup's downloadUrl is a presigned URL (valid 15 minutes) and /v1/download redirects to one. Default: false")),
];

/// ncps' environment variables that have no nip setting, with why nip can do without them. They
/// are the only way a setting could vanish silently (unknown flags and config keys are errors), so
/// `nip serve` warns about each one set. ncps' security settings (the upload signature gate, the
/// GET token, authenticated reads) are all implemented, so none here weakens security by being
/// ignored; a future one that would must be implemented or refused, never listed here.
pub const NCPS_ONLY_ENVS: &[(&str, &str)] = &[
    ("CACHE_CDC_ENABLED", CDC),
    ("CACHE_CDC_MIN", CDC),
    ("CACHE_CDC_AVG", CDC),
    ("CACHE_CDC_MAX", CDC),
    ("CACHE_CDC_BACKGROUND_WORKERS", CDC),
    ("CACHE_CDC_CHUNK_WAIT_TIMEOUT", CDC),
    ("CACHE_CDC_DELETE_DELAY", CDC),
    ("CACHE_CDC_LAZY_CHUNKING_ENABLED", CDC),
    ("CACHE_CDC_LAZY_CLEANUP_SCHEDULE", CDC),
    ("CACHE_CDC_LAZY_RECOVERY_BATCH_SIZE", CDC),
    ("CACHE_CDC_LAZY_RECOVERY_SCHEDULE", CDC),
    ("CACHE_FSCK_DECHUNK_RESIDUE_GRACE", CDC),
    ("CACHE_DOWNLOAD_POLL_TIMEOUT", STAGING),
    ("CACHE_INFLIGHT_STAGING_ENABLED", STAGING),
    ("CACHE_INFLIGHT_STAGING_PART_SIZE", STAGING),
    ("CACHE_INFLIGHT_STAGING_RETENTION", STAGING),
    ("CACHE_LOCK_BACKEND", LOCKS),
    ("CACHE_LOCK_ALLOW_DEGRADED_MODE", LOCKS),
    ("CACHE_LOCK_DOWNLOAD_TTL", LOCKS),
    ("CACHE_LOCK_LRU_TTL", LOCKS),
    ("CACHE_LOCK_REDIS_KEY_PREFIX", LOCKS),
    ("CACHE_LOCK_RETRY_INITIAL_DELAY", LOCKS),
    ("CACHE_LOCK_RETRY_JITTER", LOCKS),
    ("CACHE_LOCK_RETRY_MAX_ATTEMPTS", LOCKS),
    ("CACHE_LOCK_RETRY_MAX_DELAY", LOCKS),
    ("CACHE_REDIS_ADDRS", LOCKS),
    ("CACHE_REDIS_DB", LOCKS),
    ("CACHE_REDIS_USERNAME", LOCKS),
    ("CACHE_REDIS_PASSWORD", LOCKS),
    ("CACHE_REDIS_USE_TLS", LOCKS),
    ("CACHE_REDIS_POOL_SIZE", LOCKS),
    ("USE_XZ_BINARY", XZ),
    ("XZ_BINARY_PATH", XZ),
];
const CDC: &str = "nip stores whole NARs: ncps' content-defined chunking does not apply";
const STAGING: &str =
    "nip always streams a NAR still downloading to every waiting client from its temp file";
const LOCKS: &str = "nip needs no Redis: instances coordinate through the shared database";
const XZ: &str = "nip runs no external compression tool";

/// The ncps-only environment variables set in `env` (a boolean set to false says nothing).
pub fn ignored_ncps_envs(env: &HashMap<String, String>) -> Vec<(String, &'static str)> {
    NCPS_ONLY_ENVS
        .iter()
        .filter(|(name, _)| {
            env.get(*name).is_some_and(|v| {
                !v.trim().is_empty()
                    && !matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "0" | "f")
            })
        })
        .map(|(name, why)| (name.to_string(), *why))
        .collect()
}

/// Values of settings from one source, by canonical key.
pub type Layer = BTreeMap<&'static str, Vec<String>>;

pub fn find(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Reads settings from an environment snapshot (never from the process directly, for tests).
/// Lists in environment variables are comma-separated, as in ncps.
pub fn layer_from_env(env: &HashMap<String, String>) -> Layer {
    let mut layer = Layer::new();
    for setting in SETTINGS {
        if let Some(v) = setting.envs.iter().find_map(|e| env.get(*e)) {
            let values: Vec<String> = if setting.multi {
                v.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            } else {
                vec![v.clone()]
            };
            layer.insert(setting.key, values);
        }
    }
    layer
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("unknown configuration key {0:?}")]
    UnknownKey(String),
    #[error("configuration key {key:?} must be {expected}")]
    BadValue { key: String, expected: &'static str },
}

/// Reads settings from a parsed config document (YAML, TOML or JSON, as a JSON value). Nested
/// tables and dotted keys are both accepted: `{cache: {hostname: x}}` and `{"cache.hostname": x}`.
pub fn layer_from_document(doc: &serde_json::Value) -> Result<Layer, SettingsError> {
    let mut flat = Vec::new();
    flatten("", doc, &mut flat)?;
    let mut layer = Layer::new();
    for (path, value) in flat {
        let setting = SETTINGS
            .iter()
            .find(|s| s.file_keys.contains(&path.as_str()))
            .ok_or_else(|| SettingsError::UnknownKey(path.clone()))?;
        let values = match value {
            serde_json::Value::Array(items) if setting.multi => items
                .iter()
                .map(|i| scalar(&path, i))
                .collect::<Result<Vec<_>, _>>()?,
            other => vec![scalar(&path, other)?],
        };
        layer.insert(setting.key, values);
    }
    Ok(layer)
}

fn scalar(path: &str, v: &serde_json::Value) -> Result<String, SettingsError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        _ => Err(SettingsError::BadValue {
            key: path.to_string(),
            expected: "a string, number or boolean",
        }),
    }
}

fn flatten<'a>(
    prefix: &str,
    v: &'a serde_json::Value,
    out: &mut Vec<(String, &'a serde_json::Value)>,
) -> Result<(), SettingsError> {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // A table is descended into unless its own path names a setting.
                if child.is_object()
                    && !SETTINGS
                        .iter()
                        .any(|s| s.file_keys.contains(&path.as_str()))
                {
                    flatten(&path, child, out)?;
                } else {
                    out.push((path, child));
                }
            }
            Ok(())
        }
        serde_json::Value::Null if prefix.is_empty() => Ok(()),
        _ if prefix.is_empty() => Err(SettingsError::BadValue {
            key: "<document>".into(),
            expected: "a table of settings",
        }),
        _ => {
            out.push((prefix.to_string(), v));
            Ok(())
        }
    }
}

/// Merges layers: for each key, the first layer that has it wins.
pub fn merge(layers: &[&Layer]) -> Layer {
    let mut out = Layer::new();
    for layer in layers.iter().rev() {
        for (k, v) in layer.iter() {
            out.insert(k, v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_unique_names() {
        let mut seen = std::collections::HashSet::new();
        for s in SETTINGS {
            assert!(seen.insert(s.key), "duplicate key {}", s.key);
            for f in s.flags {
                assert!(seen.insert(f), "duplicate flag {f}");
            }
            for e in s.envs {
                assert!(seen.insert(e), "duplicate env {e}");
            }
        }
    }

    /// Every environment variable ncps' `serve` and root command read (pkg/ncps/serve.go and
    /// root.go at ncps main, 2026-12): each is a nip setting, the config-file variable, or listed
    /// with its reason, so none is dropped without a word.
    #[test]
    fn every_ncps_env_var_is_a_setting_or_warned_about() {
        const NCPS: &[&str] = &[
            "ANALYTICS_REPORTING_ENABLED",
            "CACHE_ALLOW_DELETE_VERB",
            "CACHE_ALLOW_PUT_VERB",
            "CACHE_CDC_AVG",
            "CACHE_CDC_BACKGROUND_WORKERS",
            "CACHE_CDC_CHUNK_WAIT_TIMEOUT",
            "CACHE_CDC_DELETE_DELAY",
            "CACHE_CDC_ENABLED",
            "CACHE_CDC_LAZY_CHUNKING_ENABLED",
            "CACHE_CDC_LAZY_CLEANUP_SCHEDULE",
            "CACHE_CDC_LAZY_RECOVERY_BATCH_SIZE",
            "CACHE_CDC_LAZY_RECOVERY_SCHEDULE",
            "CACHE_CDC_MAX",
            "CACHE_CDC_MIN",
            "CACHE_DATABASE_POOL_MAX_IDLE_CONNS",
            "CACHE_DATABASE_POOL_MAX_OPEN_CONNS",
            "CACHE_DATABASE_URL",
            "CACHE_DATA_PATH",
            "CACHE_DOWNLOAD_POLL_TIMEOUT",
            "CACHE_FSCK_DECHUNK_RESIDUE_GRACE",
            "CACHE_GET_TOKEN",
            "CACHE_HOSTNAME",
            "CACHE_INFLIGHT_STAGING_ENABLED",
            "CACHE_INFLIGHT_STAGING_PART_SIZE",
            "CACHE_INFLIGHT_STAGING_RETENTION",
            "CACHE_LOCK_ALLOW_DEGRADED_MODE",
            "CACHE_LOCK_BACKEND",
            "CACHE_LOCK_DOWNLOAD_TTL",
            "CACHE_LOCK_LRU_TTL",
            "CACHE_LOCK_REDIS_KEY_PREFIX",
            "CACHE_LOCK_RETRY_INITIAL_DELAY",
            "CACHE_LOCK_RETRY_JITTER",
            "CACHE_LOCK_RETRY_MAX_ATTEMPTS",
            "CACHE_LOCK_RETRY_MAX_DELAY",
            "CACHE_LRU_SCHEDULE",
            "CACHE_LRU_SCHEDULE_TZ",
            "CACHE_MAX_SIZE",
            "CACHE_REDIS_ADDRS",
            "CACHE_REDIS_DB",
            "CACHE_REDIS_PASSWORD",
            "CACHE_REDIS_POOL_SIZE",
            "CACHE_REDIS_USERNAME",
            "CACHE_REDIS_USE_TLS",
            "CACHE_REQUIRE_TRUSTED_SIGNATURE",
            "CACHE_SECRET_KEY_PATH",
            "CACHE_SIGN_NARINFO",
            "CACHE_STORAGE_LOCAL",
            "CACHE_STORAGE_S3_ACCESS_KEY_ID",
            "CACHE_STORAGE_S3_BUCKET",
            "CACHE_STORAGE_S3_ENDPOINT",
            "CACHE_STORAGE_S3_FORCE_PATH_STYLE",
            "CACHE_STORAGE_S3_REGION",
            "CACHE_STORAGE_S3_SECRET_ACCESS_KEY",
            "CACHE_TEMP_PATH",
            "CACHE_TRUSTED_UPLOAD_KEYS",
            "CACHE_UPSTREAM_DIALER_TIMEOUT",
            "CACHE_UPSTREAM_PUBLIC_KEYS",
            "CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT",
            "CACHE_UPSTREAM_URLS",
            "LOG_LEVEL",
            "NETRC_FILE",
            "OTEL_ENABLED",
            "OTEL_GRPC_URL",
            "PPROF_ADDR",
            "PROMETHEUS_ENABLED",
            "SERVER_ADDR",
            "UPSTREAM_CACHES",
            "UPSTREAM_DIALER_TIMEOUT",
            "UPSTREAM_PUBLIC_KEYS",
            "UPSTREAM_RESPONSE_HEADER_TIMEOUT",
            "USE_XZ_BINARY",
            "XZ_BINARY_PATH",
        ];
        for var in NCPS {
            let known = SETTINGS.iter().any(|s| s.envs.contains(var))
                || NCPS_ONLY_ENVS.iter().any(|(n, _)| n == var);
            assert!(known, "{var} would be dropped silently");
        }
        let env: HashMap<String, String> = [
            ("CACHE_REDIS_ADDRS", "r:6379"),
            ("CACHE_CDC_ENABLED", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let ignored = ignored_ncps_envs(&env);
        assert_eq!(ignored.len(), 1, "{ignored:?}");
        assert_eq!(ignored[0].0, "CACHE_REDIS_ADDRS");
    }

    #[test]
    fn env_layer_reads_both_ncps_generations_and_splits_lists() {
        let env: HashMap<String, String> = [
            ("CACHE_UPSTREAM_URLS", "http://a, http://b"),
            ("CACHE_HOSTNAME", "h"),
            ("UNRELATED", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let layer = layer_from_env(&env);
        assert_eq!(layer["cache.upstream.urls"], vec!["http://a", "http://b"]);
        assert_eq!(layer["cache.hostname"], vec!["h"]);
        assert_eq!(layer.len(), 2);
    }

    #[test]
    fn document_layer_accepts_nested_and_dotted_keys() {
        let doc: serde_json::Value = serde_yaml::from_str(
            "cache:\n  hostname: h\n  upstream:\n    urls: [http://a]\n    public-keys:\n      - k:1\n\"server.addr\": \":9\"\n",
        )
        .unwrap();
        let layer = layer_from_document(&doc).unwrap();
        assert_eq!(layer["cache.hostname"], vec!["h"]);
        assert_eq!(layer["cache.upstream.urls"], vec!["http://a"]);
        assert_eq!(layer["cache.upstream.public-keys"], vec!["k:1"]);
        assert_eq!(layer["server.addr"], vec![":9"]);
    }

    #[test]
    fn document_layer_rejects_unknown_keys() {
        let doc = serde_json::json!({"cache": {"hostnam": "typo"}});
        assert_eq!(
            layer_from_document(&doc),
            Err(SettingsError::UnknownKey("cache.hostnam".into()))
        );
    }

    #[test]
    fn flag_beats_file_beats_env() {
        let mk = |v: &str| Layer::from([("cache.hostname", vec![v.to_string()])]);
        let (flag, file, env) = (mk("flag"), mk("file"), mk("env"));
        assert_eq!(merge(&[&flag, &file, &env])["cache.hostname"], vec!["flag"]);
        assert_eq!(
            merge(&[&Layer::new(), &file, &env])["cache.hostname"],
            vec!["file"]
        );
        assert_eq!(
            merge(&[&Layer::new(), &Layer::new(), &env])["cache.hostname"],
            vec!["env"]
        );
    }
}
