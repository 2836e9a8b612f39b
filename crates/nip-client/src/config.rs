//! Remote cache configuration: `$XDG_CONFIG_HOME/nip/remote-cache.json` (mode 0600) overridden by
//! `NIP_REMOTE_CACHE_*` environment variables, merged by one pure function.
use crate::artifact::UnpackLimits;
use crate::error::{io_ctx, ClientError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file as stored. Every field is optional so `config --url X` can write a partial file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    /// Primary server (priority 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Bearer token for `url`, and for `servers` entries without their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Transfer timeout in seconds (default 300): the longest silence a download or upload may
    /// have, not a bound on the whole transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Deadline in seconds of a lookup (connect and answer; default 5); fractions allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_timeout: Option<f64>,
    /// Whether builds use the remote at all (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// More servers; lower priority is tried first, the others are fallbacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<PoliciesFile>,
    /// PEM file of extra CA certificates to trust for https:// servers (a private CA), on top of
    /// the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerEntry {
    pub url: String,
    #[serde(default)]
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoliciesFile {
    pub upload_on_build: Option<bool>,
    pub download_before_build: Option<bool>,
    pub fallback_to_local: Option<bool>,
    pub retry_attempts: Option<u32>,
    /// Seconds before the first retry (doubles each time); fractions allowed.
    pub retry_delay: Option<f64>,
    /// Unpacked bytes always allowed per cached artifact (default 256 MiB).
    pub max_unpack_bytes: Option<u64>,
    /// Unpacked bytes allowed per compressed byte, when that is more (default 100).
    pub max_unpack_ratio: Option<u64>,
    /// Entries allowed per cached artifact (default 250000).
    pub max_unpack_entries: Option<u64>,
}

/// One server to talk to, with its effective key.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    pub url: String,
    pub priority: i64,
    #[serde(skip)]
    pub api_key: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policies {
    pub upload_on_build: bool,
    pub download_before_build: bool,
    /// When false, a build whose remote lookup failed is an error instead of a local build.
    pub fallback_to_local: bool,
    /// Attempts per request, the first included.
    pub retry_attempts: u32,
    pub retry_delay: Duration,
    /// A cached artifact (local or remote) may unpack to `max(maxUnpackBytes, maxUnpackRatio ×
    /// its compressed size)` bytes in `maxUnpackEntries` entries (counting the directories their
    /// paths imply); past that it is discarded and the package built instead.
    pub max_unpack_bytes: u64,
    pub max_unpack_ratio: u64,
    pub max_unpack_entries: u64,
    /// Deadline of a lookup, health check or listing (connect and answer), and the connect
    /// timeout of transfers: a dead remote costs at most this per run.
    pub lookup_timeout: Duration,
}

impl Policies {
    /// The bounds on unpacking a cached artifact.
    pub fn unpack_limits(&self) -> UnpackLimits {
        UnpackLimits {
            min_bytes: self.max_unpack_bytes,
            ratio: self.max_unpack_ratio,
            max_entries: self.max_unpack_entries,
        }
    }
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteConfig {
    pub enabled: bool,
    pub url: Option<String>,
    pub api_key: Option<String>,
    pub timeout: Duration,
    /// `url` first (priority 0), then `servers`, ordered by priority.
    pub servers: Vec<Server>,
    pub policies: Policies,
    /// Extra trusted CA certificates: `NIP_REMOTE_CACHE_CA_CERT`, else `caCert`, else
    /// `SSL_CERT_FILE`.
    pub ca_cert: Option<PathBuf>,
}

pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_LOOKUP_TIMEOUT_SECS: f64 = 5.0;

/// Reads the file; a missing file is an empty config. Syntax errors name the file and line.
pub fn read_file(path: &Path) -> Result<ConfigFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(io_ctx(format!("read {}", path.display()))(e)),
    };
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    serde_json::from_str(&text).map_err(|e| ClientError::ConfigSyntax {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

/// Writes the file atomically with mode 0600 (it holds a secret), creating its directory.
pub fn write_file(path: &Path, file: &ConfigFile) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_ctx(format!("create {}", dir.display())))?;
    // tempfile creates files 0600 on Unix, so the key is never readable by others, even briefly.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io_ctx(format!("create a file in {}", dir.display())))?;
    let mut text = serde_json::to_string_pretty(file).expect("config serializes");
    text.push('\n');
    std::io::Write::write_all(&mut tmp, text.as_bytes())
        .map_err(io_ctx(format!("write {}", path.display())))?;
    tmp.persist(path)
        .map_err(|e| io_ctx(format!("write {}", path.display()))(e.error))?;
    Ok(())
}

/// Merges file < environment into the effective config. Pure: `env` is injected.
pub fn effective(file: &ConfigFile, env: &BTreeMap<String, String>) -> Result<RemoteConfig> {
    let nonempty = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let url = nonempty("NIP_REMOTE_CACHE_URL").or_else(|| file.url.clone());
    let api_key = nonempty("NIP_REMOTE_CACHE_API_KEY").or_else(|| file.api_key.clone());
    let ca_cert = nonempty("NIP_REMOTE_CACHE_CA_CERT")
        .or_else(|| file.ca_cert.clone().filter(|c| !c.is_empty()))
        .or_else(|| nonempty("SSL_CERT_FILE"))
        .map(PathBuf::from);
    let enabled = match nonempty("NIP_REMOTE_CACHE_ENABLED") {
        Some(v) => parse_bool(&v).ok_or_else(|| {
            ClientError::ConfigInvalid(format!(
                "NIP_REMOTE_CACHE_ENABLED={v:?}: use true/false, 1/0, yes/no"
            ))
        })?,
        None => file.enabled.unwrap_or(false),
    };
    let mut servers = Vec::new();
    if let Some(u) = &url {
        servers.push(Server {
            url: normalize_url(u)?,
            priority: 0,
            api_key: api_key.clone(),
        });
    }
    for s in &file.servers {
        let u = normalize_url(&s.url)?;
        if servers.iter().any(|x: &Server| x.url == u) {
            continue;
        }
        servers.push(Server {
            url: u,
            priority: s.priority,
            api_key: s.api_key.clone().or_else(|| api_key.clone()),
        });
    }
    // Stable: `url` stays ahead of a server with the same priority.
    servers.sort_by_key(|s| s.priority);
    let p = file.policies.clone().unwrap_or_default();
    let delay = p.retry_delay.unwrap_or(5.0);
    if !(0.0..=3600.0).contains(&delay) {
        return Err(ClientError::ConfigInvalid(format!(
            "policies.retryDelay {delay}: use 0 to 3600 seconds"
        )));
    }
    let lookup = file.lookup_timeout.unwrap_or(DEFAULT_LOOKUP_TIMEOUT_SECS);
    if !(0.1..=600.0).contains(&lookup) {
        return Err(ClientError::ConfigInvalid(format!(
            "lookupTimeout {lookup}: use 0.1 to 600 seconds"
        )));
    }
    Ok(RemoteConfig {
        enabled,
        url,
        api_key,
        timeout: Duration::from_secs(file.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1)),
        servers,
        ca_cert,
        policies: Policies {
            upload_on_build: p.upload_on_build.unwrap_or(true),
            download_before_build: p.download_before_build.unwrap_or(true),
            fallback_to_local: p.fallback_to_local.unwrap_or(true),
            retry_attempts: p.retry_attempts.unwrap_or(3).max(1),
            retry_delay: Duration::from_secs_f64(delay),
            max_unpack_bytes: p
                .max_unpack_bytes
                .unwrap_or(UnpackLimits::DEFAULT_MIN_BYTES),
            max_unpack_ratio: p.max_unpack_ratio.unwrap_or(UnpackLimits::DEFAULT_RATIO),
            max_unpack_entries: p
                .max_unpack_entries
                .unwrap_or(UnpackLimits::DEFAULT_MAX_ENTRIES),
            lookup_timeout: Duration::from_secs_f64(lookup),
        },
    })
}

/// The environment variables the client reads: `NIP_REMOTE_CACHE_*` and `SSL_CERT_FILE`.
pub fn env_snapshot() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("NIP_REMOTE_CACHE_") || k == "SSL_CERT_FILE")
        .collect()
}

/// Loads the effective config from the file at `path` and the process environment.
pub fn load(path: &Path) -> Result<RemoteConfig> {
    effective(&read_file(path)?, &env_snapshot())
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Checks that a server URL is http(s) and drops a trailing slash.
pub fn normalize_url(u: &str) -> Result<String> {
    let parsed = reqwest::Url::parse(u)
        .map_err(|e| ClientError::ConfigInvalid(format!("server URL {u:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ClientError::ConfigInvalid(format!(
            "server URL {u:?}: use http:// or https://"
        )));
    }
    Ok(u.trim_end_matches('/').to_string())
}

/// Masks a key for display: never more than its last 4 characters.
pub fn mask_key(key: &str) -> String {
    let n = key.chars().count();
    if n >= 16 {
        let tail: String = key.chars().skip(n - 4).collect();
        format!("****…{tail}")
    } else {
        "********".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_what_a_user_expects() {
        let c = effective(&ConfigFile::default(), &env(&[])).unwrap();
        assert!(!c.enabled);
        assert!(c.servers.is_empty());
        assert_eq!(c.timeout, Duration::from_secs(300));
        let p = &c.policies;
        assert!(p.upload_on_build && p.download_before_build && p.fallback_to_local);
        assert_eq!(
            (p.retry_attempts, p.retry_delay),
            (3, Duration::from_secs(5))
        );
        assert_eq!(p.unpack_limits(), UnpackLimits::default());
        assert_eq!(p.lookup_timeout, Duration::from_secs(5));
        // The 131 KB zstd bomb of issue 19 (4 GiB unpacked) is stopped well before 1 GiB.
        assert_eq!(p.unpack_limits().max_bytes(131_000), 256 << 20);
        assert_eq!(p.unpack_limits().max_bytes(10 << 20), 1000 << 20);
    }

    #[test]
    fn unpack_limits_are_configurable() {
        let file: ConfigFile = serde_json::from_str(
            r#"{"policies":{"maxUnpackBytes":1048576,"maxUnpackRatio":0,"maxUnpackEntries":10}}"#,
        )
        .unwrap();
        let l = effective(&file, &env(&[]))
            .unwrap()
            .policies
            .unpack_limits();
        assert_eq!(
            l,
            UnpackLimits {
                min_bytes: 1 << 20,
                ratio: 0,
                max_entries: 10
            }
        );
        assert_eq!(l.max_bytes(u64::MAX), 1 << 20);
        let bad: Result<ConfigFile, _> =
            serde_json::from_str(r#"{"policies":{"maxUnpackBytes":-1}}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn env_overrides_file_and_servers_are_ordered_by_priority() {
        let file: ConfigFile = serde_json::from_str(
            r#"{"url":"http://a/","apiKey":"fk","enabled":false,
                "servers":[{"url":"http://c","priority":20},{"url":"http://b","priority":10,"apiKey":"bk"}],
                "policies":{"retryAttempts":5,"retryDelay":0.5}}"#,
        )
        .unwrap();
        let c = effective(
            &file,
            &env(&[
                ("NIP_REMOTE_CACHE_URL", "http://e"),
                ("NIP_REMOTE_CACHE_API_KEY", "ek"),
                ("NIP_REMOTE_CACHE_ENABLED", "yes"),
            ]),
        )
        .unwrap();
        assert!(c.enabled);
        let urls: Vec<_> = c.servers.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(urls, ["http://e", "http://b", "http://c"]);
        let keys: Vec<_> = c.servers.iter().map(|s| s.api_key.as_deref()).collect();
        assert_eq!(keys, [Some("ek"), Some("bk"), Some("ek")]);
        assert_eq!(c.policies.retry_attempts, 5);
        assert_eq!(c.policies.retry_delay, Duration::from_millis(500));
    }

    #[test]
    fn ca_cert_comes_from_env_then_file_then_ssl_cert_file() {
        let file = ConfigFile {
            ca_cert: Some("/file/ca.pem".into()),
            ..Default::default()
        };
        let ssl = env(&[("SSL_CERT_FILE", "/ssl/ca.pem")]);
        assert_eq!(
            effective(&file, &ssl).unwrap().ca_cert,
            Some(PathBuf::from("/file/ca.pem"))
        );
        assert_eq!(
            effective(&ConfigFile::default(), &ssl).unwrap().ca_cert,
            Some(PathBuf::from("/ssl/ca.pem"))
        );
        let both = env(&[
            ("SSL_CERT_FILE", "/ssl/ca.pem"),
            ("NIP_REMOTE_CACHE_CA_CERT", "/env/ca.pem"),
        ]);
        assert_eq!(
            effective(&file, &both).unwrap().ca_cert,
            Some(PathBuf::from("/env/ca.pem"))
        );
        assert_eq!(
            effective(&ConfigFile::default(), &env(&[]))
                .unwrap()
                .ca_cert,
            None
        );
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        let bad = env(&[("NIP_REMOTE_CACHE_ENABLED", "maybe")]);
        assert!(effective(&ConfigFile::default(), &bad).is_err());
        let file = ConfigFile {
            url: Some("ftp://x".into()),
            ..Default::default()
        };
        assert!(effective(&file, &env(&[])).is_err());
    }

    #[test]
    fn corrupt_file_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remote-cache.json");
        std::fs::write(&path, "{\n  \"url\": \"http://x\",\n  oops\n}\n").unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("remote-cache.json: line 3"), "{err}");
        std::fs::write(&path, "{\"url\": \"http://x\", \"urll\": 1}").unwrap();
        let err = read_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn written_file_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/remote-cache.json");
        let file = ConfigFile {
            url: Some("http://x".into()),
            api_key: Some("secret".into()),
            ..Default::default()
        };
        write_file(&path, &file).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_file(&path).unwrap(), file);
    }

    #[test]
    fn masking_never_shows_a_short_key() {
        assert_eq!(mask_key("abc"), "********");
        assert_eq!(mask_key("nip_0123456789abcdef"), "****…cdef");
    }
}
