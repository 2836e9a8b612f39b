//! The typed configuration of `nip serve`, built from the merged settings layer (see
//! [`crate::settings`]) in three steps: every setting is parsed as its kind says, with its
//! declared default ([`Values::resolve`]); the checks that involve several settings run
//! (`validate`); the typed fields are filled (`ServeConfig::build`). Loading never panics:
//! every bad value is an error that names the setting.
use std::path::PathBuf;
use std::time::Duration;

use nip_core::signing::PublicKey;

use crate::settings::{Layer, SETTINGS};

mod schedule;
mod values;
pub use schedule::{Schedule, Zone};
pub use values::{FromValue, Value, Values};

pub const DEFAULT_UPSTREAM: &str = "https://cache.nixos.org";
pub const DEFAULT_UPSTREAM_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
/// SQLite connections when `--cache-database-pool-max-open-conns` is not given (or 0).
pub const DEFAULT_DB_CONNECTIONS: u32 = 8;
/// Nix's own default priority for a binary cache that does not announce one.
pub const DEFAULT_PRIORITY: u32 = 50;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Base URL, always ending in `/`, without the `priority` and `trusted` query parameters.
    pub url: String,
    /// Priority from `?priority=N`, used until the upstream's `/nix-cache-info` answers.
    pub priority: Option<u32>,
    /// `?trusted=1`: its narinfos are served without an upstream signature (re-signed by this
    /// cache), as ncps serves every upstream. Off by default: only signed narinfos are cached.
    pub trusted: bool,
}

/// `--otel-enabled`: traces and logs via OpenTelemetry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtelConfig {
    /// `--otel-grpc-url`: the OTLP gRPC endpoint. `None`: export to stdout, as ncps does.
    pub grpc_url: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// S3 storage instead of the local store directory.
    pub s3: Option<nip_store::S3Config>,
    /// `--s3-presign-downloads`: artifact downloads go to presigned S3 URLs.
    pub s3_presign_downloads: bool,
    pub hostname: String,
    pub data_path: PathBuf,
    pub database_url: String,
    pub temp_path: PathBuf,
    pub upstreams: Vec<UpstreamConfig>,
    pub upstream_public_keys: Vec<PublicKey>,
    pub sign_narinfo: bool,
    pub secret_key_path: PathBuf,
    pub netrc_file: Option<PathBuf>,
    pub dialer_timeout: Duration,
    pub response_header_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub negative_ttl: Duration,
    /// `--cache-prefetch-nar-max-size`: NARs up to this size are fetched with their narinfo
    /// (0: never).
    pub prefetch_nar_max_size: u64,
    /// `--cache-lock-download-ttl`: how long a miss waits for another instance's fetch.
    pub fill_wait: Duration,
    pub server_addr: String,
    pub log_level: String,
    pub allow_put: bool,
    pub allow_delete: bool,
    pub require_auth_read: bool,
    /// Token accepted as a read-write key (`NIP_CACHE_API_KEY`). Never printed.
    pub api_key: Option<String>,
    pub max_upload_size: u64,
    pub artifact_retention: Option<Duration>,
    /// Requests per second and burst per key; `None` when rate limiting is off.
    pub rate_limit: Option<(f64, f64)>,
    /// `--audit-reads`: lookups, downloads and Nix reads go to the audit log too (batched).
    pub audit_reads: bool,
    /// Store size limit in bytes (`--cache-max-size`).
    pub max_size: Option<u64>,
    /// Cron expression of the eviction job (validated, see [`Schedule`]).
    pub lru_schedule: Option<String>,
    /// `--cache-lru-schedule-timezone`: the zone `lru_schedule` is evaluated in.
    pub lru_timezone: Zone,
    /// Cron expression of the scrub job (`--cache-verify-schedule`, validated). `None`: off.
    pub verify_schedule: Option<String>,
    /// `--cache-require-trusted-signature`: an uploaded narinfo needs a signature by one of
    /// `trusted_upload_keys`; without any key every upload is refused (fail closed, as ncps).
    pub require_trusted_signature: bool,
    /// `--cache-trusted-upload-key`: keys whose signature vouches for an upload.
    pub trusted_upload_keys: Vec<PublicKey>,
    pub prometheus_enabled: bool,
    /// `--prometheus-public`: `/metrics` stays public when Nix reads need a token.
    pub prometheus_public: bool,
    /// `--prometheus-ncps-metrics`: `/metrics` also shows ncps' metric names.
    pub prometheus_ncps_metrics: bool,
    /// OpenTelemetry export; `None` when `--otel-enabled` is off.
    pub otel: Option<OtelConfig>,
    /// `text` or `json`.
    pub log_format: String,
    /// ncps' `--cache-get-token`: a bearer token that Nix GET/HEAD requests need. Never printed.
    pub get_token: Option<String>,
    /// SQLite pool size (`--cache-database-pool-max-open-conns`).
    pub database_max_connections: u32,
    /// Settings that were given but have no effect yet, with the reason (logged at start).
    pub ignored: Vec<(String, &'static str)>,
    /// `--tls-cert` and `--tls-key`: serve HTTPS. `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
    /// `--trusted-proxies`: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `--server-read-timeout`, `--server-max-connections`.
    pub conn_limits: crate::conn::ConnLimits,
    /// Every setting's effective value, which the fields above are built from and
    /// `--print-config` shows ([`ServeConfig::print_json`]).
    pub values: Values,
}

#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

/// An error about the setting `key`, named as the user gives it: its flag, else its variable.
fn err(key: &str, message: impl Into<String>) -> ConfigError {
    let setting = match SETTINGS.iter().find(|s| s.key == key) {
        Some(s) if !s.flags.is_empty() => format!("--{}", s.flags[0]),
        Some(s) if !s.envs.is_empty() => s.envs[0].to_string(),
        _ => key.to_string(),
    };
    ConfigError {
        setting,
        message: message.into(),
    }
}

/// Parses sizes as ncps takes them: `512`, `10K`, `100M`, `10G`, `1T` (powers of 1024; a trailing
/// `B` or `iB` is allowed).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s
        .strip_suffix("iB")
        .or_else(|| s.strip_suffix('B'))
        .unwrap_or(s);
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses durations as ncps (Go's `time.ParseDuration`) takes them: one or more numbers, each
/// with a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), such as `300ms`, `5m0s`, `1m30s`,
/// `1h2m3.5s`, `1.5h`; also nip's `d` (days) and a plain number of seconds. Negative durations are
/// none.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        if num.is_empty() || num == "." {
            return None;
        }
        let n: f64 = num.parse().ok()?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    // try_: a number of days too large for a Duration is no duration.
    Duration::try_from_secs_f64(total).ok()
}

/// Parses booleans as ncps (Go's `strconv.ParseBool`: `1`, `t`, `T`, `TRUE`, `true`, `True` and
/// their false forms), and also `yes`/`no`, `on`/`off`.
pub fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "on" => Ok(true),
        "false" | "f" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {v:?}")),
    }
}

/// Splits `?priority=N` and `?trusted=1` off an upstream URL and normalizes it to end in `/`.
pub fn parse_upstream(raw: &str) -> Result<UpstreamConfig, String> {
    let raw = raw.trim();
    // Messages show the URL with its credentials masked: they end up in logs and terminals.
    let shown = redact_userinfo(raw.split('?').next().unwrap_or(raw));
    if !(raw.starts_with("http://") || raw.starts_with("https://")) {
        return Err(format!(
            "upstream URL {shown:?} must start with http:// or https://"
        ));
    }
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (raw, None),
    };
    let mut priority = None;
    let mut trusted = false;
    let mut rest = Vec::new();
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("priority", n)) => {
                priority = Some(
                    n.parse()
                        .map_err(|_| format!("bad priority {n:?} in upstream URL {shown:?}"))?,
                )
            }
            Some(("trusted", b)) => {
                trusted = parse_bool(b).map_err(|_| {
                    format!("bad trusted={b:?} in upstream URL {shown:?}: use trusted=1")
                })?
            }
            // Only the parameter's name: its value may be a token.
            _ => rest.push(pair.split('=').next().unwrap_or(pair)),
        }
    }
    let mut url = base.trim_end_matches('/').to_string();
    url.push('/');
    if !rest.is_empty() {
        return Err(format!(
            "upstream URL {shown:?}: only the `priority` and `trusted` query parameters are understood (got {})",
            rest.join(", ")
        ));
    }
    Ok(UpstreamConfig {
        url,
        priority,
        trusted,
    })
}

pub use nip_core::redact::redact_userinfo;

/// Parses `10.0.0.0/8`, `::1/128` or a single address (a /32 or /128 range).
pub fn parse_cidr(v: &str) -> Option<ipnet::IpNet> {
    v.parse::<ipnet::IpNet>()
        .ok()
        .map(|n| n.trunc())
        .or_else(|| v.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

pub fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "nip".to_string())
}

const S3_BUCKET: &str = "cache.storage.s3.bucket";
const S3_KEY_ID: &str = "cache.storage.s3.access-key-id";
const S3_SECRET: &str = "cache.storage.s3.secret-access-key";
const PRESIGN: &str = "cache.storage.s3.presign-downloads";
const UPSTREAM_KEYS: &str = "cache.upstream.public-keys";
const OTEL_URL: &str = "opentelemetry.grpc-url";
/// Why `--cache-cdc-enabled=true` stops the start, and what to do.
pub const CDC_REFUSED: &str = "nip stores whole NARs and cannot honour ncps' content-defined chunking: set cache.cdc.enabled to false (or remove it; CACHE_CDC_ENABLED=false, --cache-cdc-enabled=false). An ncps store that already holds chunked NARs cannot be served by nip: run `ncps migrate-chunks-to-nar` first, or start nip on an empty store";

/// The checks that involve several settings, once each is parsed. Returns the given settings
/// that have no effect, with the reason (and drops their value, so it is not shown as in effect).
fn validate(layer: &Layer, v: &mut Values) -> Result<Vec<(String, &'static str)>, ConfigError> {
    if v.is_set(S3_BUCKET) && v.given("cache.storage.local") {
        return Err(err(S3_BUCKET, "give either local storage (--cache-storage-local / --cache-data-path) or S3 storage (--cache-storage-s3-bucket), not both"));
    }
    if v.is_set(S3_KEY_ID) != v.is_set(S3_SECRET) {
        return Err(err(S3_KEY_ID, "give both the S3 access key id and the secret access key, or neither (then AWS_* environment variables are used)"));
    }
    if v.flag(PRESIGN) && !v.is_set(S3_BUCKET) {
        return Err(err(
            PRESIGN,
            "--s3-presign-downloads needs S3 storage (--cache-storage-s3-bucket)",
        ));
    }
    // Its default, the default upstream's key, applies only without --upstream-cache.
    // Without a key only upstreams explicitly marked `?trusted=1` could serve anything.
    let all_trusted = v
        .list::<UpstreamConfig>("cache.upstream.urls")
        .iter()
        .all(|u| u.trusted);
    if !v.is_set(UPSTREAM_KEYS) && !all_trusted {
        return Err(err(UPSTREAM_KEYS, format!("no upstream public key given: nip only caches narinfo signed by a trusted key; pass each upstream's key, e.g. --upstream-public-key {DEFAULT_UPSTREAM_KEY}, or, to serve an upstream that signs nothing (as ncps does), add ?trusted=1 to its URL")));
    }
    if v.get::<String>("cache.api-key")
        .is_some_and(|k| k.len() < 16)
    {
        return Err(err("cache.api-key", "must be at least 16 characters"));
    }
    match (v.is_set("tls.cert"), v.is_set("tls.key")) {
        (true, false) => return Err(err("tls.key", "--tls-cert needs --tls-key too")),
        (false, true) => return Err(err("tls.cert", "--tls-key needs --tls-cert too")),
        _ => {}
    }
    if v.flag("cache.cdc.enabled") {
        return Err(err("cache.cdc.enabled", CDC_REFUSED));
    }
    let mut ignored = Vec::new();
    if v.is_set(OTEL_URL) && !v.flag("opentelemetry.enabled") {
        ignored.push((
            "--otel-grpc-url".to_string(),
            "OpenTelemetry is off: add --otel-enabled",
        ));
        v.unset(OTEL_URL);
    }
    for setting in SETTINGS {
        if let (Some(reason), Some(given)) = (setting.not_implemented, layer.get(setting.key)) {
            // A feature that is not implemented, turned off, or an empty value (as ncps' example
            // config gives `username: ""`), is no news.
            let off = |v: &String| matches!(parse_bool(v), Ok(false));
            if (setting.boolean && given.last().is_some_and(off))
                || given.iter().all(|v| v.trim().is_empty())
                || setting
                    .ncps_default
                    .is_some_and(|d| given.iter().all(|v| same_value(v, d)))
            {
                continue;
            }
            ignored.push((format!("--{}", setting.flags[0]), reason));
        }
    }
    Ok(ignored)
}

/// Whether `given` says what `default` says: the same text (any case), the same duration
/// (`5m` and `5m0s`) or the same boolean (`true` and `T`).
fn same_value(given: &str, default: &str) -> bool {
    let given = given.trim();
    given.eq_ignore_ascii_case(default)
        || parse_duration(given).is_some_and(|g| parse_duration(default) == Some(g))
        || parse_bool(given).is_ok_and(|g| parse_bool(default) == Ok(g))
}

impl ServeConfig {
    /// Builds the typed config from merged settings. Pure apart from reading the host name.
    pub fn from_layer(layer: &Layer) -> Result<Self, ConfigError> {
        let mut values = Values::resolve(layer)?;
        let ignored = validate(layer, &mut values)?;
        Ok(Self::build(values, ignored))
    }

    /// The typed fields from validated values.
    fn build(v: Values, ignored: Vec<(String, &'static str)>) -> Self {
        let s3 = v.get(S3_BUCKET).map(|bucket| nip_store::S3Config {
            bucket,
            endpoint: v.get("cache.storage.s3.endpoint"),
            region: v.get("cache.storage.s3.region"),
            access_key_id: v.get(S3_KEY_ID),
            secret_access_key: v.get(S3_SECRET),
            force_path_style: v.flag("cache.storage.s3.force-path-style"),
            prefix: v.get("cache.storage.s3.prefix"),
        });
        let tls = v.get("tls.cert").map(|cert| crate::tls::TlsFiles {
            cert,
            key: v.req("tls.key"),
        });
        ServeConfig {
            s3,
            s3_presign_downloads: v.flag(PRESIGN),
            hostname: v.req("cache.hostname"),
            data_path: v.req("cache.storage.local"),
            database_url: v.req("cache.database-url"),
            temp_path: v.req("cache.temp-path"),
            upstreams: v.list("cache.upstream.urls"),
            upstream_public_keys: v.list(UPSTREAM_KEYS),
            sign_narinfo: v.flag("cache.sign-narinfo"),
            secret_key_path: v.req("cache.secret-key-path"),
            netrc_file: v.get("cache.netrc-file"),
            dialer_timeout: v.req("cache.upstream.dialer-timeout"),
            response_header_timeout: v.req("cache.upstream.response-header-timeout"),
            body_idle_timeout: v.req("cache.upstream.body-idle-timeout"),
            negative_ttl: v.req("cache.negative-ttl"),
            prefetch_nar_max_size: v.req("cache.prefetch-nar-max-size"),
            fill_wait: v.req("cache.lock.download-lock-ttl"),
            server_addr: v.req("server.addr"),
            log_level: v.req("log.level"),
            allow_put: v.flag("cache.allow-put-verb"),
            allow_delete: v.flag("cache.allow-delete-verb"),
            require_auth_read: v.flag("cache.require-auth-read"),
            api_key: v.get("cache.api-key"),
            max_upload_size: v.req("artifact.max-size"),
            artifact_retention: v.get("artifact.retention"),
            rate_limit: (v.get("rate-limit.rps")).map(|rps| (rps, v.req("rate-limit.burst"))),
            audit_reads: v.flag("audit.reads"),
            max_size: v.get("cache.max-size"),
            lru_schedule: v.get("cache.lru.schedule"),
            lru_timezone: Zone::parse(&v.req::<String>("cache.lru.timezone"))
                .unwrap_or(Zone::Local),
            verify_schedule: v.get("cache.verify-schedule"),
            require_trusted_signature: v.flag("cache.require-trusted-signature"),
            trusted_upload_keys: v.list("cache.trusted-upload-keys"),
            prometheus_enabled: v.flag("prometheus.enabled"),
            prometheus_public: v.flag("prometheus.public"),
            prometheus_ncps_metrics: v.flag("prometheus.ncps-metrics"),
            otel: v.flag("opentelemetry.enabled").then(|| OtelConfig {
                grpc_url: v.get(OTEL_URL),
            }),
            log_format: v.req("log.format"),
            get_token: v.get("cache.get-token"),
            database_max_connections: v.req("cache.database.pool.max-open-conns"),
            ignored,
            tls,
            trusted_proxies: v.list("server.trusted-proxies"),
            conn_limits: crate::conn::ConnLimits {
                read_timeout: v.req("server.read-timeout"),
                max_connections: v.req("server.max-connections"),
                ..Default::default()
            },
            values: v,
        }
    }

    /// What `--print-config` prints: every setting's effective value (secrets masked, URLs without
    /// credentials) and the settings ignored, with why.
    pub fn print_json(&self) -> serde_json::Value {
        let mut json = self.values.to_json();
        let ignored = self.ignored.iter().map(|(f, why)| format!("{f}: {why}"));
        json.insert("ignored".into(), ignored.collect::<Vec<_>>().into());
        serde_json::Value::Object(json)
    }

    /// The listen address in a form `tokio::net::TcpListener` takes (`:8501` means all interfaces).
    pub fn listen_addr(&self) -> String {
        match self.server_addr.strip_prefix(':') {
            Some(port) => format!("[::]:{port}"),
            None => self.server_addr.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(pairs: &[(&'static str, &[&str])]) -> Layer {
        pairs
            .iter()
            .map(|(k, v)| (*k, v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn defaults_need_no_settings() {
        let c = ServeConfig::from_layer(&Layer::new()).unwrap();
        assert_eq!(
            c.upstreams,
            vec![UpstreamConfig {
                url: "https://cache.nixos.org/".into(),
                priority: None,
                trusted: false,
            }]
        );
        assert_eq!(c.upstream_public_keys[0].name(), "cache.nixos.org-1");
        assert_eq!(c.listen_addr(), "[::]:8501");
        assert!(c.sign_narinfo);
        assert_eq!(c.database_url, "sqlite:nip-data/db/db.sqlite");
        assert!(c.ignored.is_empty());
    }

    #[test]
    fn upstream_url_errors_never_show_credentials() {
        for raw in [
            "http://alice:s3cretpw@host/?priority=abc",
            "ftp://alice:s3cretpw@host/",
            "http://alice:s3cretpw@host/?token=s3cretpw",
        ] {
            let e = parse_upstream(raw).unwrap_err();
            assert!(!e.contains("s3cretpw"), "{e}");
            assert!(e.contains("host"), "{e}");
        }
    }

    #[test]
    fn upstream_priority_is_split_off() {
        let u = parse_upstream("http://127.0.0.1:1/cache/?priority=10").unwrap();
        assert_eq!(
            u,
            UpstreamConfig {
                url: "http://127.0.0.1:1/cache/".into(),
                priority: Some(10),
                trusted: false,
            }
        );
        let u = parse_upstream("http://lan:5000?priority=3&trusted=1").unwrap();
        assert_eq!(
            (u.url.as_str(), u.priority, u.trusted),
            ("http://lan:5000/", Some(3), true)
        );
        assert!(!parse_upstream("http://lan:5000?trusted=0").unwrap().trusted);
        assert!(parse_upstream("http://lan:5000?trusted=maybe").is_err());
        assert!(parse_upstream("ftp://x").is_err());
        assert!(parse_upstream("http://x?priority=abc").is_err());
    }

    #[test]
    fn upstreams_without_keys_are_refused() {
        let e =
            ServeConfig::from_layer(&layer(&[("cache.upstream.urls", &["http://a"])])).unwrap_err();
        assert_eq!(e.setting, "--upstream-public-key");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = ServeConfig::from_layer(&layer(&[("cache.negative-ttl", &["soon"])])).unwrap_err();
        assert_eq!(e.setting, "--cache-negative-ttl");
        let e = ServeConfig::from_layer(&layer(&[("cache.sign-narinfo", &["maybe"])])).unwrap_err();
        assert_eq!(e.setting, "--cache-sign-narinfo");
    }

    #[test]
    fn unimplemented_settings_are_reported() {
        let c = ServeConfig::from_layer(&layer(&[
            ("pprof.addr", &[":6060"]),
            ("analytics.reporting.enabled", &["false"]),
            ("prometheus.enabled", &["false"]),
        ]))
        .unwrap();
        assert_eq!(c.ignored.len(), 1);
        assert_eq!(c.ignored[0].0, "--pprof-addr");
        // Redis and locks, as ncps' config.example.yaml gives them: each named with the reason.
        let c = ServeConfig::from_layer(&layer(&[
            ("cache.redis.addrs", &["localhost:6379"]),
            ("cache.redis.password", &["redis-secret"]),
            ("cache.lock.retry.max-delay", &["5s"]),
            ("cache.lock.allow-degraded-mode", &["false"]),
            ("analytics.reporting.enabled", &["true"]),
            // ncps' defaults, as its NixOS module writes them: the same behaviour, no warning.
            ("cache.lock.backend", &["local"]),
            ("cache.lock.download-lock-ttl", &["5m0s"]),
            ("cache.lock.retry.max-attempts", &["3"]),
        ]))
        .unwrap();
        let redis = "instances coordinate through the shared database; Redis is not needed";
        assert_eq!(
            c.ignored,
            [
                (
                    "--analytics-reporting-enabled".to_string(),
                    "nip never reports usage"
                ),
                ("--cache-redis-addrs".to_string(), redis),
                ("--cache-redis-password".to_string(), redis),
                ("--cache-lock-retry-max-delay".to_string(), redis),
            ]
        );
        assert!(!c.print_json().to_string().contains("redis-secret"));
    }

    #[test]
    fn opentelemetry_settings() {
        let c = ServeConfig::from_layer(&layer(&[("opentelemetry.enabled", &["true"])])).unwrap();
        assert_eq!(c.otel, Some(OtelConfig { grpc_url: None }));
        assert!(c.ignored.is_empty());
        let c = ServeConfig::from_layer(&layer(&[
            ("opentelemetry.enabled", &["true"]),
            ("opentelemetry.grpc-url", &["http://127.0.0.1:4317"]),
        ]))
        .unwrap();
        assert_eq!(
            c.otel.unwrap().grpc_url.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        // A URL without --otel-enabled exports nothing, and says so.
        let c = ServeConfig::from_layer(&layer(&[("opentelemetry.grpc-url", &["http://c:4317"])]))
            .unwrap();
        assert_eq!(c.otel, None);
        assert_eq!(c.ignored[0].0, "--otel-grpc-url");
        let e = ServeConfig::from_layer(&layer(&[
            ("opentelemetry.enabled", &["true"]),
            ("opentelemetry.grpc-url", &["u:secret@collector:4317"]),
        ]))
        .unwrap_err();
        assert_eq!(e.setting, "--otel-grpc-url");
        assert!(!e.message.contains("secret"), "{}", e.message);
        assert_eq!(
            redact_userinfo("https://u:p@h:1/x@y"),
            "https://***@h:1/x@y"
        );
        assert_eq!(redact_userinfo("http://h:4317"), "http://h:4317");
    }

    #[test]
    fn tls_needs_both_files_and_proxies_parse() {
        let e = ServeConfig::from_layer(&layer(&[("tls.cert", &["c.pem"])])).unwrap_err();
        assert_eq!(e.setting, "--tls-key");
        let c = ServeConfig::from_layer(&layer(&[
            ("tls.cert", &["c.pem"]),
            ("tls.key", &["k.pem"]),
            ("server.trusted-proxies", &["10.0.0.0/8, 127.0.0.1", "::1"]),
        ]))
        .unwrap();
        assert_eq!(c.tls.unwrap().key, PathBuf::from("k.pem"));
        let nets: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
        let e = ServeConfig::from_layer(&layer(&[("server.trusted-proxies", &["10.0.0.0/33"])]))
            .unwrap_err();
        assert_eq!(e.setting, "--trusted-proxies");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("100MiB"), Some(100 << 20));
        assert_eq!(parse_size("5K"), Some(5 << 10));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn s3_storage_excludes_local_storage_and_needs_both_credentials() {
        let s3 = ServeConfig::from_layer(&layer(&[
            ("cache.storage.s3.bucket", &["b"]),
            ("cache.storage.s3.endpoint", &["http://127.0.0.1:9000"]),
            ("cache.storage.s3.force-path-style", &["true"]),
        ]))
        .unwrap()
        .s3
        .unwrap();
        assert_eq!((s3.bucket.as_str(), s3.force_path_style), ("b", true));
        let both = ServeConfig::from_layer(&layer(&[
            ("cache.storage.s3.bucket", &["b"]),
            ("cache.storage.local", &["/x"]),
        ]));
        assert_eq!(both.unwrap_err().setting, "--cache-storage-s3-bucket");
        let half = ServeConfig::from_layer(&layer(&[
            ("cache.storage.s3.bucket", &["b"]),
            ("cache.storage.s3.access-key-id", &["k"]),
        ]));
        assert_eq!(
            half.unwrap_err().setting,
            "--cache-storage-s3-access-key-id"
        );
        let bad = ServeConfig::from_layer(&layer(&[
            ("cache.storage.s3.bucket", &["b"]),
            ("cache.storage.s3.endpoint", &["minio:9000"]),
        ]));
        assert_eq!(bad.unwrap_err().setting, "--cache-storage-s3-endpoint");
    }

    #[test]
    fn declared_defaults_are_the_code_defaults() {
        let c = ServeConfig::from_layer(&Layer::new()).unwrap();
        let limits = crate::conn::ConnLimits::default();
        assert_eq!(c.conn_limits.read_timeout, limits.read_timeout);
        assert_eq!(c.conn_limits.max_connections, limits.max_connections);
        assert_eq!(c.database_max_connections, DEFAULT_DB_CONNECTIONS);
        assert_eq!(c.max_upload_size, 10 << 30);
        assert_eq!(c.temp_path, PathBuf::from("nip-data/tmp"));
        assert_eq!(c.dialer_timeout, Duration::from_secs(3));
        let c = ServeConfig::from_layer(&layer(&[
            ("cache.database.pool.max-open-conns", &["0"]),
            ("rate-limit.rps", &["0.25"]),
        ]))
        .unwrap();
        assert_eq!(c.database_max_connections, DEFAULT_DB_CONNECTIONS);
        assert_eq!(c.rate_limit, Some((0.25, 1.0)));
    }

    /// Options of a feature that is off are not read (so a bad one is no error), and an empty
    /// bucket, token or schedule means none.
    #[test]
    fn options_of_a_feature_that_is_off_are_not_read() {
        let c = ServeConfig::from_layer(&layer(&[
            ("cache.storage.s3.bucket", &[""]),
            ("cache.storage.s3.force-path-style", &["maybe"]),
            ("cache.storage.s3.endpoint", &["minio:9000"]),
            ("rate-limit.burst", &["x"]),
            ("cache.get-token", &[""]),
            ("cache.verify-schedule", &[" "]),
        ]))
        .unwrap();
        assert!(c.s3.is_none() && c.rate_limit.is_none() && c.get_token.is_none());
        assert!(c.verify_schedule.is_none());
        let e = ServeConfig::from_layer(&layer(&[
            ("rate-limit.rps", &["1"]),
            ("rate-limit.burst", &["x"]),
        ]))
        .unwrap_err();
        assert_eq!(e.setting, "--rate-limit-burst");
    }

    /// Without any upstream key only upstreams marked `?trusted=1` can serve: nip starts when
    /// every upstream is, and otherwise says how to opt in.
    #[test]
    fn unsigned_upstreams_need_the_trusted_mark() {
        let c = ServeConfig::from_layer(&layer(&[(
            "cache.upstream.urls",
            &["http://lan:5000?trusted=1&priority=3"],
        )]))
        .unwrap();
        assert!(c.upstreams[0].trusted && c.upstream_public_keys.is_empty());
        assert_eq!(
            c.print_json()["cache.upstream.urls"][0],
            "http://lan:5000/?priority=3&trusted=1"
        );
        let e = ServeConfig::from_layer(&layer(&[(
            "cache.upstream.urls",
            &["http://lan:5000?trusted=1", "http://other:5000"],
        )]))
        .unwrap_err();
        assert!(e.to_string().contains("add ?trusted=1 to its URL"), "{e}");
    }

    #[test]
    fn print_json_masks_secrets_and_credentials() {
        let c = ServeConfig::from_layer(&layer(&[
            ("cache.api-key", &["0123456789abcdef-api-secret"]),
            ("cache.get-token", &["get-token-secret"]),
            ("cache.database-url", &["postgres://nip:db-secret@db/nip"]),
            (
                "cache.upstream.urls",
                &["https://u:up-secret@up.example?priority=3"],
            ),
            ("cache.upstream.public-keys", &[DEFAULT_UPSTREAM_KEY]),
            ("cache.storage.s3.bucket", &["b"]),
            ("cache.storage.s3.access-key-id", &["AKID"]),
            ("cache.storage.s3.secret-access-key", &["s3-secret"]),
            (
                "opentelemetry.grpc-url",
                &["https://o:otel-secret@otel:4317"],
            ),
            ("rate-limit.rps", &["2.5"]),
            ("artifact.retention", &["1d"]),
            ("pprof.addr", &[":6060"]),
        ]))
        .unwrap();
        let json = c.print_json();
        let text = json.to_string();
        for secret in [
            "api-secret",
            "get-token-secret",
            "db-secret",
            "up-secret",
            "s3-secret",
            "otel-secret",
        ] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
        assert_eq!(json["cache.api-key"], "***");
        assert_eq!(json["cache.database-url"], "postgres://***@db/nip");
        assert_eq!(
            json["cache.upstream.urls"][0],
            "https://***@up.example/?priority=3"
        );
        assert_eq!(json["cache.storage.s3"]["access-key-id"], "AKID");
        assert_eq!(json["cache.storage.s3"]["secret-access-key"], "***");
        assert_eq!(json["cache.storage.s3"]["presign-downloads"], false);
        // Without --otel-enabled the URL has no effect: not shown, listed as ignored.
        assert_eq!(json["opentelemetry.grpc-url"], serde_json::Value::Null);
        assert_eq!(json["rate-limit"], "2.5/s burst 5");
        assert_eq!(json["artifact.retention"], "86400s");
        assert_eq!(json["cache.negative-ttl"], "30000ms");
        assert_eq!(json["server.trusted-proxies"], serde_json::json!([]));
        assert_eq!(json["ignored"].as_array().unwrap().len(), 2, "{json}");
        assert!(json.get("pprof.addr").is_none() && json.get("rate-limit.rps").is_none());
        let json = ServeConfig::from_layer(&Layer::new()).unwrap().print_json();
        assert_eq!(json["cache.storage.s3"], serde_json::Value::Null);
        assert_eq!(json["cache.api-key"], serde_json::Value::Null);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
        // Go's time.ParseDuration forms, as ncps (and its NixOS module: "5m0s") writes them.
        assert_eq!(parse_duration("5m0s"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("30m0s"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("2d12h"), Some(Duration::from_secs(216_000)));
        assert_eq!(parse_duration("1500us"), Some(Duration::from_micros(1500)));
        assert_eq!(parse_duration("1500µs"), Some(Duration::from_micros(1500)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "5m0", "1x", "h", "1h-2m", "m5"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn booleans_as_go_parse_bool() {
        for t in ["1", "t", "T", "TRUE", "true", "True", "yes", "on"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False", "no", "off"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        assert!(parse_bool("maybe").is_err());
        let c = ServeConfig::from_layer(&layer(&[("cache.allow-put-verb", &["T"])])).unwrap();
        assert!(c.allow_put);
    }

    /// urfave/cli splits a slice flag's value on commas: one `--cache-upstream-url a,b` is two.
    #[test]
    fn one_list_value_may_hold_several_comma_separated() {
        let other = "other.example-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=";
        let keys = format!("{DEFAULT_UPSTREAM_KEY},{other}");
        let c = ServeConfig::from_layer(&layer(&[
            (
                "cache.upstream.urls",
                &[
                    "https://a.example,https://b.example?priority=45",
                    "https://c.example",
                ],
            ),
            ("cache.upstream.public-keys", &[keys.as_str()]),
        ]))
        .unwrap();
        let urls: Vec<&str> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://a.example/",
                "https://b.example/",
                "https://c.example/"
            ]
        );
        assert_eq!(c.upstreams[1].priority, Some(45));
        let names: Vec<&str> = c.upstream_public_keys.iter().map(|k| k.name()).collect();
        assert_eq!(names, ["cache.nixos.org-1", "other.example-1"]);
    }

    #[test]
    fn cdc_enabled_is_refused_and_off_is_accepted() {
        let e = ServeConfig::from_layer(&layer(&[("cache.cdc.enabled", &["true"])])).unwrap_err();
        assert_eq!(e.setting, "--cache-cdc-enabled");
        assert_eq!(e.message, CDC_REFUSED);
        assert!(e.message.contains("set cache.cdc.enabled to false"), "{e}");
        // Off, with ncps' default chunk sizes as the NixOS module always writes them: starts
        // without a word; a size of its own is named.
        let c = ServeConfig::from_layer(&layer(&[
            ("cache.cdc.enabled", &["false"]),
            ("cache.cdc.min", &["16384"]),
            ("cache.cdc.avg", &["65536"]),
            ("cache.cdc.max", &["262144"]),
        ]))
        .unwrap();
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);
        assert_eq!(c.values.to_json()["cache.cdc.enabled"], false);
        let c = ServeConfig::from_layer(&layer(&[("cache.cdc.min", &["8192"])])).unwrap();
        let flags: Vec<&str> = c.ignored.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(flags, ["--cache-cdc-min"]);
    }

    #[test]
    fn lru_time_zone_and_schedule_forms() {
        let c = ServeConfig::from_layer(&Layer::new()).unwrap();
        assert_eq!(c.lru_timezone, Zone::Local);
        assert_eq!(c.values.to_json()["cache.lru.timezone"], "Local");
        let c = ServeConfig::from_layer(&layer(&[
            ("cache.max-size", &["10G"]),
            ("cache.lru.schedule", &["@every 1h"]),
            ("cache.lru.timezone", &["America/Los_Angeles"]),
            ("cache.verify-schedule", &["CRON_TZ=Europe/Paris 0 2 * * *"]),
        ]))
        .unwrap();
        assert_eq!(
            c.lru_timezone,
            Zone::Named(chrono_tz::Tz::America__Los_Angeles)
        );
        assert_eq!(c.lru_schedule.as_deref(), Some("@every 1h"));
        assert!(c.ignored.is_empty(), "{:?}", c.ignored);
        for schedule in [
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "@midnight",
            "TZ=UTC */5 * * * *",
        ] {
            let c =
                ServeConfig::from_layer(&layer(&[("cache.lru.schedule", &[schedule])])).unwrap();
            assert_eq!(c.lru_schedule.as_deref(), Some(schedule));
        }
        let e = ServeConfig::from_layer(&layer(&[("cache.lru.timezone", &["Mars/Olympus"])]))
            .unwrap_err();
        assert_eq!(e.setting, "--cache-lru-schedule-timezone");
        let e = ServeConfig::from_layer(&layer(&[("cache.lru.schedule", &["@every never"])]))
            .unwrap_err();
        assert_eq!(e.setting, "--cache-lru-schedule");
    }
}
