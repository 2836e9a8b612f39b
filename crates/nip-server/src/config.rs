//! The typed configuration of `nip serve`, built from the merged settings layer (see
//! [`crate::settings`]). Loading never panics: every bad value is an error that names the setting.
use std::path::PathBuf;
use std::time::Duration;

use nip_core::signing::PublicKey;

use crate::settings::{Layer, SETTINGS};

pub const DEFAULT_UPSTREAM: &str = "https://cache.nixos.org";
pub const DEFAULT_UPSTREAM_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
/// SQLite connections when `--cache-database-pool-max-open-conns` is not given.
pub const DEFAULT_DB_CONNECTIONS: u32 = 8;
/// Nix's own default priority for a binary cache that does not announce one.
pub const DEFAULT_PRIORITY: u32 = 50;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Base URL, always ending in `/`, without the `priority` query parameter.
    pub url: String,
    /// Priority from `?priority=N`, used until the upstream's `/nix-cache-info` answers.
    pub priority: Option<u32>,
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
    /// Store size limit in bytes (`--cache-max-size`).
    pub max_size: Option<u64>,
    /// Cron expression of the eviction job (validated).
    pub lru_schedule: Option<String>,
    /// Cron expression of the scrub job (`--cache-verify-schedule`, validated). `None`: off.
    pub verify_schedule: Option<String>,
    /// `--cache-require-trusted-signature`: an uploaded narinfo needs a signature by one of
    /// `trusted_upload_keys`; without any key every upload is refused (fail closed, as ncps).
    pub require_trusted_signature: bool,
    /// `--cache-trusted-upload-key`: keys whose signature vouches for an upload.
    pub trusted_upload_keys: Vec<PublicKey>,
    pub prometheus_enabled: bool,
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
}

#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

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

/// Parses Go-style durations as ncps takes them: `500ms`, `3s`, `5m`, `2h`, `1d`, or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(err(key, format!("expected true or false, got {v:?}"))),
    }
}

/// Splits `?priority=N` off an upstream URL and normalizes it to end in `/`.
pub fn parse_upstream(raw: &str) -> Result<UpstreamConfig, String> {
    let raw = raw.trim();
    if !(raw.starts_with("http://") || raw.starts_with("https://")) {
        return Err(format!(
            "upstream URL {raw:?} must start with http:// or https://"
        ));
    }
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (raw, None),
    };
    let mut priority = None;
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
                        .map_err(|_| format!("bad priority {n:?} in {raw:?}"))?,
                )
            }
            _ => rest.push(pair),
        }
    }
    let mut url = base.trim_end_matches('/').to_string();
    url.push('/');
    if !rest.is_empty() {
        return Err(format!(
            "upstream URL {raw:?}: only the `priority` query parameter is understood"
        ));
    }
    Ok(UpstreamConfig { url, priority })
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

impl ServeConfig {
    /// Builds the typed config from merged settings. Pure apart from reading the host name.
    pub fn from_layer(layer: &Layer) -> Result<Self, ConfigError> {
        let one = |key: &str| layer.get(key).and_then(|v| v.last()).cloned();
        let many = |key: &str| layer.get(key).cloned().unwrap_or_default();
        let duration = |key: &str, default: Duration| -> Result<Duration, ConfigError> {
            match one(key) {
                None => Ok(default),
                Some(v) => parse_duration(&v).ok_or_else(|| {
                    err(key, format!("expected a duration like 3s or 5m, got {v:?}"))
                }),
            }
        };

        let hostname = one("cache.hostname").unwrap_or_else(default_hostname);
        if hostname.is_empty() || hostname.contains([':', ' ', '/']) {
            return Err(err(
                "cache.hostname",
                format!("{hostname:?} is not a host name"),
            ));
        }
        let data_path =
            PathBuf::from(one("cache.storage.local").unwrap_or_else(|| "nip-data".into()));
        let database_url = one("cache.database-url").unwrap_or_else(|| {
            format!(
                "sqlite:{}",
                data_path.join("db").join("db.sqlite").display()
            )
        });
        if nip_store::Backend::of_url(&database_url).is_err() {
            return Err(err("cache.database-url", format!(
                "{:?}: use sqlite:PATH (e.g. sqlite:/var/lib/nip/db.sqlite) or postgres://USER@HOST/DB",
                redact_userinfo(&database_url)
            )));
        }
        let s3 = match one("cache.storage.s3.bucket").filter(|b| !b.is_empty()) {
            Some(bucket) => {
                if layer.contains_key("cache.storage.local") {
                    return Err(err("cache.storage.s3.bucket", "give either local storage (--cache-storage-local / --cache-data-path) or S3 storage (--cache-storage-s3-bucket), not both"));
                }
                let endpoint = one("cache.storage.s3.endpoint");
                if let Some(e) = &endpoint {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(err(
                            "cache.storage.s3.endpoint",
                            format!("{e:?} must be a URL with http:// or https://"),
                        ));
                    }
                }
                let (key_id, secret) = (
                    one("cache.storage.s3.access-key-id"),
                    one("cache.storage.s3.secret-access-key"),
                );
                if key_id.is_some() != secret.is_some() {
                    return Err(err("cache.storage.s3.access-key-id", "give both the S3 access key id and the secret access key, or neither (then AWS_* environment variables are used)"));
                }
                let force_path_style = match one("cache.storage.s3.force-path-style") {
                    Some(v) => parse_bool("cache.storage.s3.force-path-style", &v)?,
                    None => false,
                };
                Some(nip_store::S3Config {
                    bucket,
                    endpoint,
                    region: one("cache.storage.s3.region"),
                    access_key_id: key_id,
                    secret_access_key: secret,
                    force_path_style,
                    prefix: one("cache.storage.s3.prefix"),
                })
            }
            None => None,
        };
        let s3_presign_downloads = match one("cache.storage.s3.presign-downloads") {
            Some(v) => parse_bool("cache.storage.s3.presign-downloads", &v)?,
            None => false,
        };
        if s3_presign_downloads && s3.is_none() {
            return Err(err(
                "cache.storage.s3.presign-downloads",
                "--s3-presign-downloads needs S3 storage (--cache-storage-s3-bucket)",
            ));
        }
        let temp_path = one("cache.temp-path")
            .map(PathBuf::from)
            .unwrap_or_else(|| data_path.join("tmp"));

        let raw_upstreams = many("cache.upstream.urls");
        let user_gave_upstreams = !raw_upstreams.is_empty();
        let upstreams = if user_gave_upstreams {
            raw_upstreams
                .iter()
                .map(|u| parse_upstream(u).map_err(|m| err("cache.upstream.urls", m)))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![parse_upstream(DEFAULT_UPSTREAM).expect("default upstream parses")]
        };
        let mut raw_keys = many("cache.upstream.public-keys");
        if raw_keys.is_empty() {
            if user_gave_upstreams {
                return Err(err("cache.upstream.public-keys", "no upstream public key given: nip only caches narinfo signed by a trusted key; pass each upstream's key, e.g. --upstream-public-key cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="));
            }
            raw_keys.push(DEFAULT_UPSTREAM_KEY.to_string());
        }
        let upstream_public_keys = raw_keys
            .iter()
            .map(|k| {
                PublicKey::parse(k).map_err(|e| {
                    err(
                        "cache.upstream.public-keys",
                        format!("{k:?} is not a name:base64 public key: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let sign_narinfo = match one("cache.sign-narinfo") {
            Some(v) => parse_bool("cache.sign-narinfo", &v)?,
            None => true,
        };
        let secret_key_path = one("cache.secret-key-path")
            .map(PathBuf::from)
            .unwrap_or_else(|| data_path.join("secret-key"));

        let flag = |key: &str| -> Result<bool, ConfigError> {
            one(key).map_or(Ok(false), |v| parse_bool(key, &v))
        };
        let max_upload_size = match one("artifact.max-size") {
            Some(v) => parse_size(&v).filter(|n| *n > 0).ok_or_else(|| {
                err(
                    "artifact.max-size",
                    format!("expected a size like 10G, got {v:?}"),
                )
            })?,
            None => 10 << 30,
        };
        let artifact_retention = match one("artifact.retention") {
            Some(v) => Some(parse_duration(&v).filter(|d| !d.is_zero()).ok_or_else(|| {
                err(
                    "artifact.retention",
                    format!("expected a duration like 30d, got {v:?}"),
                )
            })?),
            None => None,
        };
        let rate_limit = match one("rate-limit.rps") {
            Some(v) => {
                let rps: f64 = v
                    .parse()
                    .ok()
                    .filter(|r: &f64| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| {
                        err(
                            "rate-limit.rps",
                            format!("expected a positive number, got {v:?}"),
                        )
                    })?;
                let burst = match one("rate-limit.burst") {
                    Some(b) => b
                        .parse()
                        .ok()
                        .filter(|b: &f64| b.is_finite() && *b >= 1.0)
                        .ok_or_else(|| {
                            err(
                                "rate-limit.burst",
                                format!("expected a number >= 1, got {b:?}"),
                            )
                        })?,
                    None => (rps * 2.0).max(1.0),
                };
                Some((rps, burst))
            }
            None => None,
        };
        let max_size = match one("cache.max-size") {
            Some(v) => Some(parse_size(&v).filter(|n| *n > 0).ok_or_else(|| {
                err(
                    "cache.max-size",
                    format!("expected a size like 10G, got {v:?}"),
                )
            })?),
            None => None,
        };
        let schedule = |key: &str| -> Result<Option<String>, ConfigError> {
            let cron = one(key).filter(|v| !v.trim().is_empty());
            if let Some(cron) = &cron {
                croner::Cron::new(cron).parse().map_err(|e| {
                    err(
                        key,
                        format!("{cron:?} is not a cron schedule (e.g. \"0 2 * * *\"): {e}"),
                    )
                })?;
            }
            Ok(cron)
        };
        let lru_schedule = schedule("cache.lru.schedule")?;
        let verify_schedule = schedule("cache.verify-schedule")?;
        let trusted_upload_keys = many("cache.trusted-upload-keys")
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|k| {
                PublicKey::parse(k).map_err(|e| {
                    err(
                        "cache.trusted-upload-keys",
                        format!("{k:?} is not a name:base64 public key: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let require_trusted_signature = one("cache.require-trusted-signature")
            .map_or(Ok(false), |v| {
                parse_bool("cache.require-trusted-signature", &v)
            })?;
        let log_format = one("log.format").unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            return Err(err(
                "log.format",
                format!("expected text or json, got {log_format:?}"),
            ));
        }
        let api_key = one("cache.api-key").filter(|k| !k.is_empty());
        if api_key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err(err("cache.api-key", "must be at least 16 characters"));
        }

        let get_token = one("cache.get-token").filter(|t| !t.is_empty());
        let database_max_connections = match one("cache.database.pool.max-open-conns") {
            Some(v) => match v.trim().parse::<u32>() {
                // 0 means "the default" in ncps.
                Ok(0) => DEFAULT_DB_CONNECTIONS,
                Ok(n) => n,
                Err(_) => {
                    return Err(err(
                        "cache.database.pool.max-open-conns",
                        format!("expected a number of connections, got {v:?}"),
                    ))
                }
            },
            None => DEFAULT_DB_CONNECTIONS,
        };

        let tls = match (one("tls.cert"), one("tls.key")) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            (Some(_), None) => return Err(err("tls.key", "--tls-cert needs --tls-key too")),
            (None, Some(_)) => return Err(err("tls.cert", "--tls-key needs --tls-cert too")),
        };
        let mut conn_limits = crate::conn::ConnLimits::default();
        if let Some(v) = one("server.read-timeout") {
            conn_limits.read_timeout =
                parse_duration(&v).filter(|d| !d.is_zero()).ok_or_else(|| {
                    err(
                        "server.read-timeout",
                        format!("expected a duration like 30s, got {v:?}"),
                    )
                })?;
        }
        if let Some(v) = one("server.max-connections") {
            conn_limits.max_connections =
                v.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    err(
                        "server.max-connections",
                        format!("expected a positive number, got {v:?}"),
                    )
                })?;
        }
        let trusted_proxies = many("server.trusted-proxies")
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                parse_cidr(v).ok_or_else(|| {
                    err(
                        "server.trusted-proxies",
                        format!("{v:?} is not an address or CIDR range (e.g. 10.0.0.0/8)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let otel_url = one("opentelemetry.grpc-url").filter(|u| !u.trim().is_empty());
        if let Some(u) = &otel_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(err(
                    "opentelemetry.grpc-url",
                    format!(
                        "{:?} must be a URL with http:// or https://, e.g. http://127.0.0.1:4317",
                        redact_userinfo(u)
                    ),
                ));
            }
        }
        let otel = flag("opentelemetry.enabled")?.then(|| OtelConfig {
            grpc_url: otel_url.clone(),
        });

        let mut ignored = Vec::new();
        if otel.is_none() && otel_url.is_some() {
            ignored.push((
                "--otel-grpc-url".to_string(),
                "OpenTelemetry is off: add --otel-enabled",
            ));
        }
        for setting in SETTINGS {
            if let (Some(reason), Some(v)) = (setting.not_implemented, layer.get(setting.key)) {
                if setting.boolean
                    && v.last()
                        .is_some_and(|v| matches!(parse_bool(setting.key, v), Ok(false)))
                {
                    continue;
                }
                ignored.push((format!("--{}", setting.flags[0]), reason));
            }
        }

        Ok(ServeConfig {
            hostname,
            database_url,
            temp_path,
            upstreams,
            upstream_public_keys,
            sign_narinfo,
            secret_key_path,
            netrc_file: one("cache.netrc-file").map(PathBuf::from),
            dialer_timeout: duration("cache.upstream.dialer-timeout", Duration::from_secs(3))?,
            response_header_timeout: duration(
                "cache.upstream.response-header-timeout",
                Duration::from_secs(3),
            )?,
            body_idle_timeout: duration(
                "cache.upstream.body-idle-timeout",
                Duration::from_secs(30),
            )?,
            negative_ttl: duration("cache.negative-ttl", Duration::from_secs(30))?,
            server_addr: one("server.addr").unwrap_or_else(|| ":8501".into()),
            log_level: one("log.level").unwrap_or_else(|| "info".into()),
            allow_put: flag("cache.allow-put-verb")?,
            allow_delete: flag("cache.allow-delete-verb")?,
            require_auth_read: flag("cache.require-auth-read")?,
            api_key,
            max_upload_size,
            artifact_retention,
            rate_limit,
            max_size,
            lru_schedule,
            verify_schedule,
            require_trusted_signature,
            trusted_upload_keys,
            prometheus_enabled: flag("prometheus.enabled")?,
            otel,
            log_format,
            data_path,
            s3,
            s3_presign_downloads,
            get_token,
            database_max_connections,
            ignored,
            tls,
            trusted_proxies,
            conn_limits,
        })
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
                priority: None
            }]
        );
        assert_eq!(c.upstream_public_keys[0].name(), "cache.nixos.org-1");
        assert_eq!(c.listen_addr(), "[::]:8501");
        assert!(c.sign_narinfo);
        assert_eq!(c.database_url, "sqlite:nip-data/db/db.sqlite");
        assert!(c.ignored.is_empty());
    }

    #[test]
    fn upstream_priority_is_split_off() {
        let u = parse_upstream("http://127.0.0.1:1/cache/?priority=10").unwrap();
        assert_eq!(
            u,
            UpstreamConfig {
                url: "http://127.0.0.1:1/cache/".into(),
                priority: Some(10)
            }
        );
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
    fn durations() {
        assert_eq!(parse_duration("3s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
