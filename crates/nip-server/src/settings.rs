//! Every `nip serve` setting, declared once in [`SETTINGS`]: its flag names, environment variables
//! and config-file keys side by side (ncps' names first, so ncps deployments work unchanged), the
//! kind of value it takes (which gives its parser and how `--print-config` shows it), its default,
//! its help and whether it is secret. The flags and their help (`nip` crate), the typed
//! configuration and `--print-config` ([`crate::config`]) are all generated from it. Also the pure
//! merge of the layers. Precedence, as in ncps: flag > config file > environment > default.
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::config::{Values, DEFAULT_UPSTREAM, DEFAULT_UPSTREAM_KEY};

/// One setting. `key` is the canonical dotted config key.
#[derive(Debug)]
pub struct Setting {
    pub key: &'static str,
    /// Long flag names without `--`; the first is the documented one, the rest are aliases.
    pub flags: &'static [&'static str],
    pub envs: &'static [&'static str],
    /// Config-file keys (dotted paths into the nested document); the first is canonical.
    pub file_keys: &'static [&'static str],
    /// What the value is: how it is parsed and checked, and how `--print-config` shows it.
    pub kind: Kind,
    /// The value when no layer gives one.
    pub default: Fallback,
    /// Repeatable: a list (from `kind`).
    pub multi: bool,
    /// A boolean: `--flag` alone means true (from `kind`).
    pub boolean: bool,
    /// Never printed: `--print-config` shows `***`.
    pub secret: bool,
    /// A list whose flag and file values may be comma-separated too (environment values always
    /// may).
    pub split_commas: bool,
    /// Read only when this setting (earlier in the table) has a value: an option of a feature
    /// that is otherwise off.
    pub requires: Option<&'static str>,
    /// An empty value (as an environment template leaves it) means "not set"; for a schedule or
    /// URL, a blank one too.
    pub empty_unset: bool,
    /// One of ncps' global flags: also accepted before the subcommand (`nip --log-level=info serve`).
    pub global: bool,
    /// The help, without the default (added from `default` by [`Setting::help_text`]).
    pub help: &'static str,
    /// `Some(reason)` when the setting is accepted but has no effect yet.
    pub not_implemented: Option<&'static str>,
    /// ncps' default of a setting nip does without: given with this value (as the NixOS module
    /// writes every default), it changes nothing in ncps either, so it is not warned about.
    pub ncps_default: Option<&'static str>,
}

/// The kind of a setting's value: its parser and checks (in [`crate::config`]), the type it gives
/// and how `--print-config` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`); a bare flag means true.
    Bool,
    /// Any text.
    Text,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A host name: not empty, no `:`, `/` or space.
    HostName,
    /// A file or directory.
    Path,
    /// An `http://` or `https://` URL (an example for errors); shown with credentials masked.
    Url(Option<&'static str>),
    /// `sqlite:PATH`, `postgres://…` or `mysql://…`; shown with credentials masked.
    DatabaseUrl,
    /// A duration as ncps takes them (`500ms`, `3s`, `5m`, `2h`, `1d`); shown in milliseconds.
    Duration,
    /// A duration above zero; shown in milliseconds.
    PositiveDuration,
    /// A duration above zero, typically days (`30d`); shown in seconds.
    Age,
    /// A size above zero (`512`, `10K`, `100M`, `10G`, `1T`: powers of 1024); shown in bytes.
    Size,
    /// A size as [`Kind::Size`], where 0 turns the feature off.
    SizeOrZero,
    /// A number above zero (requests per second).
    Rate,
    /// A number of at least 1 (requests in a burst).
    Burst,
    /// A whole number above zero.
    Count,
    /// A number of connections, 0 meaning the default.
    PoolSize,
    /// A cron schedule as ncps takes them (robfig/cron): 5 fields, `@daily`-style descriptors,
    /// `@every <duration>`, an optional `CRON_TZ=<zone>` prefix.
    Cron,
    /// A time zone: an IANA name (`Europe/Paris`), `UTC` or `Local` (the machine's).
    TimeZone,
    /// Upstream cache URLs, each with an optional `?priority=N` and `?trusted=1`; shown with
    /// credentials masked.
    Upstreams,
    /// Public keys (`name:base64`).
    PublicKeys,
    /// Addresses or CIDR ranges.
    Cidrs,
    /// Words (a list ncps takes, such as Redis addresses).
    Words,
}

impl Kind {
    pub const fn is_list(self) -> bool {
        matches!(
            self,
            Kind::Upstreams | Kind::PublicKeys | Kind::Cidrs | Kind::Words
        )
    }
}

/// What a setting is when no layer gives it.
#[derive(Clone, Copy, Debug)]
pub enum Fallback {
    /// Nothing (an empty list, a boolean false), and the help says nothing about it.
    Unset,
    /// Nothing; the help says what that means (e.g. "keep forever").
    Off(&'static str),
    /// This value, written as a user writes it (and parsed the same way).
    Value(&'static str),
    /// Computed from the settings before it in [`SETTINGS`] (`None`: nothing); the text
    /// describes it in the help.
    Derived(&'static str, fn(&Values) -> Option<String>),
}

impl Setting {
    /// The help as `--help` shows it: with the default.
    pub fn help_text(&self) -> String {
        match self.default {
            Fallback::Unset => self.help.to_string(),
            Fallback::Off(text) | Fallback::Value(text) | Fallback::Derived(text, _) => {
                format!("{}. Default: {text}", self.help)
            }
        }
    }

    const fn default(mut self, value: &'static str) -> Self {
        self.default = Fallback::Value(value);
        self
    }

    const fn off(mut self, meaning: &'static str) -> Self {
        self.default = Fallback::Off(meaning);
        self
    }

    const fn derived(mut self, text: &'static str, f: fn(&Values) -> Option<String>) -> Self {
        self.default = Fallback::Derived(text, f);
        self
    }

    const fn secret(mut self) -> Self {
        self.secret = true;
        self
    }

    const fn split_commas(mut self) -> Self {
        self.split_commas = true;
        self
    }

    const fn empty_unset(mut self) -> Self {
        self.empty_unset = true;
        self
    }

    const fn requires(mut self, key: &'static str) -> Self {
        self.requires = Some(key);
        self
    }

    const fn global(mut self) -> Self {
        self.global = true;
        self
    }

    const fn later(mut self, reason: &'static str) -> Self {
        self.not_implemented = Some(reason);
        self
    }

    const fn quiet_at(mut self, ncps_default: &'static str) -> Self {
        self.ncps_default = Some(ncps_default);
        self
    }
}

const fn s(
    key: &'static str,
    flags: &'static [&'static str],
    envs: &'static [&'static str],
    file_keys: &'static [&'static str],
    kind: Kind,
    help: &'static str,
) -> Setting {
    Setting {
        key,
        flags,
        envs,
        file_keys,
        kind,
        default: Fallback::Unset,
        multi: kind.is_list(),
        boolean: matches!(kind, Kind::Bool),
        secret: false,
        split_commas: false,
        requires: None,
        empty_unset: false,
        global: false,
        help,
        not_implemented: None,
        ncps_default: None,
    }
}

/// `<data path>/<name>`, the default of the files kept with the data.
fn under_data_path(v: &Values, name: &str) -> Option<String> {
    let data: PathBuf = v.get("cache.storage.local")?;
    Some(data.join(name).display().to_string())
}

const S3: &str = "cache.storage.s3.bucket";

/// `$HOME/.netrc` when it exists: ncps' default `--netrc-file` (a missing one is no error).
fn home_netrc() -> Option<String> {
    let path = PathBuf::from(std::env::var_os("HOME")?).join(".netrc");
    path.is_file().then(|| path.display().to_string())
}

/// An ncps setting that nip accepts under ncps' flag, variable and config key, and ignores for
/// `$why` (a warning at start).
macro_rules! ncps {
    ($key:literal, $flag:literal, $env:literal, $kind:expr, $help:literal, $why:expr) => {
        s($key, &[$flag], &[$env], &[$key], $kind, $help).later($why)
    };
}

#[rustfmt::skip]
pub const SETTINGS: &[Setting] = &[
    s("cache.hostname", &["cache-hostname"], &["CACHE_HOSTNAME"], &["cache.hostname"], Kind::HostName,
      "Host name of this cache; names the generated signing key (<hostname>-1)")
      .derived("the machine's host name", |_| Some(crate::config::default_hostname())),
    s("cache.storage.local", &["cache-data-path", "cache-storage-local"],
      &["CACHE_DATA_PATH", "CACHE_STORAGE_LOCAL"], &["cache.storage.local", "cache.data-path"], Kind::Path,
      "Directory for the cache's files (NARs, database, signing key)").default("nip-data"),
    s("cache.database-url", &["cache-database-url"], &["CACHE_DATABASE_URL"], &["cache.database-url"], Kind::DatabaseUrl,
      "Metadata database URL (sqlite:PATH, postgres://USER@HOST/DB or mysql://USER:PASSWORD@HOST/DB)")
      .derived("sqlite:<data path>/db/db.sqlite", |v| Some(format!("sqlite:{}", under_data_path(v, "db/db.sqlite")?))),
    s("cache.temp-path", &["cache-temp-path"], &["CACHE_TEMP_PATH"], &["cache.temp-path"], Kind::Path,
      "Directory for downloads and uploads in progress").derived("<data path>/tmp", |v| under_data_path(v, "tmp"))
      .empty_unset(),
    s("cache.upstream.urls", &["upstream-cache", "cache-upstream-url"],
      &["UPSTREAM_CACHES", "CACHE_UPSTREAM_URLS"], &["cache.upstream.urls", "cache.upstream.caches", "upstream.caches"], Kind::Upstreams,
      "Upstream binary cache URL; repeat for several (or separate them with commas). `?priority=N` sets its priority until its /nix-cache-info answers; `?trusted=1` serves its narinfos without an upstream signature (re-signed by this cache; only for an upstream you control, such as a private nix-serve)")
      .default(DEFAULT_UPSTREAM).split_commas(),
    s("cache.upstream.public-keys", &["upstream-public-key", "cache-upstream-public-key"],
      &["UPSTREAM_PUBLIC_KEYS", "CACHE_UPSTREAM_PUBLIC_KEYS"],
      &["cache.upstream.public-keys", "upstream.public-keys"], Kind::PublicKeys,
      "Public key (name:base64) trusted to sign upstream narinfo; repeat for several (or separate them with commas)")
      .split_commas()
      .derived("cache.nixos.org-1's key when no --upstream-cache is given",
               |v| (!v.given("cache.upstream.urls")).then(|| DEFAULT_UPSTREAM_KEY.to_string())),
    s("cache.sign-narinfo", &["cache-sign-narinfo"], &["CACHE_SIGN_NARINFO"], &["cache.sign-narinfo"], Kind::Bool,
      "Add this cache's signature to every narinfo it serves").default("true"),
    s("cache.secret-key-path", &["cache-secret-key-path"], &["CACHE_SECRET_KEY_PATH"], &["cache.secret-key-path"], Kind::Path,
      "Signing key file (Nix format)").derived("generated once as <data path>/secret-key", |v| under_data_path(v, "secret-key"))
      .empty_unset(),
    s("cache.netrc-file", &["netrc-file", "cache-netrc-file"], &["NETRC_FILE", "CACHE_NETRC_FILE"],
      &["cache.netrc-file", "netrc-file"], Kind::Path, "netrc file with credentials for upstream caches")
      .derived("~/.netrc when it exists", |_| home_netrc()).empty_unset(),
    s("cache.upstream.dialer-timeout", &["upstream-dialer-timeout", "cache-upstream-dialer-timeout"],
      &["UPSTREAM_DIALER_TIMEOUT", "CACHE_UPSTREAM_DIALER_TIMEOUT"],
      &["cache.upstream.dialer-timeout", "upstream.dialer-timeout"], Kind::Duration,
      "Timeout to connect to an upstream (e.g. 3s)").default("3s"),
    s("cache.upstream.response-header-timeout",
      &["upstream-response-header-timeout", "cache-upstream-response-header-timeout"],
      &["UPSTREAM_RESPONSE_HEADER_TIMEOUT", "CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT"],
      &["cache.upstream.response-header-timeout", "upstream.response-header-timeout"], Kind::Duration,
      "Timeout for an upstream's response headers (e.g. 3s)").default("3s"),
    s("cache.upstream.body-idle-timeout", &["cache-upstream-body-idle-timeout"],
      &["CACHE_UPSTREAM_BODY_IDLE_TIMEOUT"], &["cache.upstream.body-idle-timeout"], Kind::Duration,
      "An upstream body that sends nothing for this long is abandoned").default("30s"),
    s("cache.negative-ttl", &["cache-negative-ttl"], &["CACHE_NEGATIVE_TTL"], &["cache.negative-ttl"], Kind::Duration,
      "How long a narinfo (or a listing, build log, realisation or debug info file) that no upstream has is remembered as absent").default("30s"),
    s("cache.prefetch-nar-max-size", &["cache-prefetch-nar-max-size"], &["NIP_CACHE_PREFETCH_NAR_MAX_SIZE"],
      &["cache.prefetch-nar-max-size"], Kind::SizeOrZero,
      "When a narinfo is fetched from an upstream, fetch its NAR right away in the background if its file is at most this big (Nix asks for it next); 0 turns it off")
      .default("1M"),
    s("server.addr", &["server-addr"], &["SERVER_ADDR"], &["server.addr"], Kind::Text,
      "Address to listen on ([host]:port)").default(":8501"),
    s("log.level", &["log-level"], &["LOG_LEVEL"], &["log.level"], Kind::Text,
      "Log level: error, warn, info, debug, trace").default("info").global(),
    s("cache.allow-put-verb", &["cache-allow-put-verb"], &["CACHE_ALLOW_PUT_VERB"], &["cache.allow-put-verb"], Kind::Bool,
      "Accept Nix uploads: PUT /<hash>.narinfo and PUT /nar/<file> (nix copy --to); they need a write key once any key exists")
      .default("false"),
    // Trust rules of Nix uploads (docs/security.md): ncps' signature gate, fail-closed.
    s("cache.require-trusted-signature", &["cache-require-trusted-signature"],
      &["CACHE_REQUIRE_TRUSTED_SIGNATURE"], &["cache.require-trusted-signature"], Kind::Bool,
      "Refuse a narinfo upload unless it carries a valid signature from a --cache-trusted-upload-key (needs at least one)")
      .default("false"),
    s("cache.trusted-upload-keys", &["cache-trusted-upload-key"], &["CACHE_TRUSTED_UPLOAD_KEYS"],
      &["cache.trusted-upload-keys"], Kind::PublicKeys,
      "Public key (name:base64) whose signature vouches for an uploaded narinfo; repeat for several. The signature is kept in the served narinfo")
      .split_commas(),
    s("cache.allow-delete-verb", &["cache-allow-delete-verb"], &["CACHE_ALLOW_DELETE_VERB"], &["cache.allow-delete-verb"], Kind::Bool,
      "Accept DELETE of narinfo and NAR files (admin key once any key exists)").default("false"),
    s("cache.require-auth-read", &["cache-require-auth-read"], &["CACHE_REQUIRE_AUTH_READ"], &["cache.require-auth-read"], Kind::Bool,
      "Nix reads need a read key too (Bearer, or HTTP Basic password as Nix sends from netrc)").default("false"),
    s("cache.api-key", &[], &["NIP_CACHE_API_KEY"], &[], Kind::Text,
      "A token accepted as a read-write key, besides the keys made with `nip keys create`").secret().empty_unset(),
    s("artifact.max-size", &["artifact-max-size"], &["NIP_ARTIFACT_MAX_SIZE"], &["artifact.max-size"], Kind::Size,
      "Largest accepted upload (artifact or NAR), e.g. 10G").default("10G"),
    s("artifact.retention", &["artifact-retention"], &["NIP_ARTIFACT_RETENTION"], &["artifact.retention"], Kind::Age,
      "Delete /v1 artifacts not downloaded for this long (e.g. 30d)").off("keep forever"),
    s("rate-limit.rps", &["rate-limit-rps"], &["NIP_RATE_LIMIT_RPS"], &["rate-limit.rps"], Kind::Rate,
      "Requests per second allowed per API key (per client address without a key)").off("off"),
    s("rate-limit.burst", &["rate-limit-burst"], &["NIP_RATE_LIMIT_BURST"], &["rate-limit.burst"], Kind::Burst,
      "Requests allowed in a burst above the rate").requires("rate-limit.rps")
      .derived("twice the rate", |v| v.get::<f64>("rate-limit.rps").map(|rps| (rps * 2.0).max(1.0).to_string())),
    s("audit.reads", &["audit-reads"], &["NIP_AUDIT_READS"], &["audit.reads"], Kind::Bool,
      "Also record reads in the audit log: /v1 artifact lookups and downloads, Nix narinfo and NAR reads (kept in memory and written in batches every few seconds, so a hit costs no database write)")
      .default("false"),
    s("cache.max-size", &["cache-max-size"], &["CACHE_MAX_SIZE"], &["cache.max-size"], Kind::Size,
      "Maximum store size (e.g. 10G): least recently used entries are evicted to stay under it").off("unlimited"),
    s("cache.lru.schedule", &["cache-lru-schedule"], &["CACHE_LRU_SCHEDULE"], &["cache.lru.schedule"], Kind::Cron,
      "Cron schedule of the eviction job, in --cache-lru-schedule-timezone: 5 fields (e.g. \"0 2 * * *\"), @daily, @every 1h, or with a CRON_TZ=<zone> prefix")
      .off("every 5 minutes when --cache-max-size is set").empty_unset(),
    s("cache.lru.timezone", &["cache-lru-schedule-timezone"], &["CACHE_LRU_SCHEDULE_TZ"], &["cache.lru.timezone"], Kind::TimeZone,
      "Time zone of --cache-lru-schedule: an IANA name (e.g. Europe/Paris), UTC, or Local (the machine's zone, as ncps)")
      .default("Local"),
    s("cache.verify-schedule", &["cache-verify-schedule"], &["CACHE_VERIFY_SCHEDULE"], &["cache.verify-schedule"], Kind::Cron,
      "Cron schedule (as --cache-lru-schedule, in UTC unless it starts with CRON_TZ=<zone>) of a scrub that re-hashes every stored NAR and artifact and removes bad ones (as `nip admin verify --repair`)")
      .off("off").empty_unset(),
    s("prometheus.enabled", &["prometheus-enabled"], &["PROMETHEUS_ENABLED"], &["prometheus.enabled"], Kind::Bool,
      "Serve Prometheus metrics on /metrics").default("false").global(),
    s("prometheus.public", &["prometheus-public"], &["NIP_PROMETHEUS_PUBLIC"], &["prometheus.public"], Kind::Bool,
      "Keep /metrics public for scrapers when reads need a token (--cache-require-auth-read, --cache-get-token); otherwise /metrics then needs a read key or the get token").default("false"),
    s("prometheus.ncps-metrics", &["prometheus-ncps-metrics"], &["NIP_PROMETHEUS_NCPS_METRICS"], &["prometheus.ncps-metrics"], Kind::Bool,
      "Also show ncps' metrics (ncps_*) on /metrics, computed from nip's own, so dashboards built for ncps keep working (the mapping is in the README under ncps users)").default("true"),
    s("log.format", &["log-format"], &["LOG_FORMAT"], &["log.format"], Kind::Choice(&["text", "json"]),
      "Log format: text or json").default("text"),
    s("opentelemetry.enabled", &["otel-enabled"], &["OTEL_ENABLED"], &["opentelemetry.enabled"], Kind::Bool,
      "Export traces (a span per request and upstream fetch) and logs via OpenTelemetry: OTLP over gRPC to --otel-grpc-url, else to stdout. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply")
      .default("false").global(),
    s("opentelemetry.grpc-url", &["otel-grpc-url"], &["OTEL_GRPC_URL"], &["opentelemetry.grpc-url"], Kind::Url(Some("http://127.0.0.1:4317")),
      "OTLP gRPC endpoint of the collector, e.g. http://127.0.0.1:4317 (https:// for TLS)").off("stdout").global().empty_unset(),
    // HTTPS and reverse proxies (issue 10).
    s("tls.cert", &["tls-cert"], &["NIP_TLS_CERT"], &["tls.cert"], Kind::Path,
      "PEM certificate chain: serve HTTPS (with --tls-key). Reloaded on SIGHUP and when the file changes").off("plain HTTP"),
    s("tls.key", &["tls-key"], &["NIP_TLS_KEY"], &["tls.key"], Kind::Path, "PEM private key of --tls-cert"),
    s("server.trusted-proxies", &["trusted-proxies"], &["NIP_TRUSTED_PROXIES"], &["server.trusted-proxies"], Kind::Cidrs,
      "Reverse proxies (addresses or CIDR ranges, comma-separated) whose X-Forwarded-For names the client in audit logs and rate limits")
      .off("none").split_commas(),
    s("server.read-timeout", &["server-read-timeout"], &["NIP_SERVER_READ_TIMEOUT"], &["server.read-timeout"], Kind::PositiveDuration,
      "Longest a client may stay silent while sending a request head or body (slowloris defence), e.g. 30s").default("30s"),
    s("server.max-connections", &["server-max-connections"], &["NIP_SERVER_MAX_CONNECTIONS"], &["server.max-connections"], Kind::Count,
      "Open client connections at most; new ones past it are closed at once").default("10000"),
    // ncps compatibility (issue 11): the rest of what ncps deployments pass. Implemented where
    // it means something for nip; otherwise accepted with the reason it is ignored.
    s("cache.get-token", &["cache-get-token"], &["CACHE_GET_TOKEN"], &["cache.get-token"], Kind::Text,
      "Bearer token required for Nix GET/HEAD requests, as in ncps (a read API key works too); /healthz and /pubkey stay public")
      .secret().empty_unset(),
    s("cache.database.pool.max-open-conns", &["cache-database-pool-max-open-conns"],
      &["CACHE_DATABASE_POOL_MAX_OPEN_CONNS"], &["cache.database.pool.max-open-conns"], Kind::PoolSize,
      "Size of the SQLite connection pool (0: the default)").default("8"),
    s("cache.database.pool.max-idle-conns", &["cache-database-pool-max-idle-conns"],
      &["CACHE_DATABASE_POOL_MAX_IDLE_CONNS"], &["cache.database.pool.max-idle-conns"], Kind::Text,
      "Idle connections kept in the database pool (ncps)").later(IDLE),
    s("pprof.addr", &["pprof-addr"], &["PPROF_ADDR"], &["pprof.addr"], Kind::Text,
      "Listen address of Go's pprof endpoints (ncps)").later(PPROF),
    s("analytics.reporting.enabled", &["analytics-reporting-enabled"], &["ANALYTICS_REPORTING_ENABLED"],
      &["analytics.reporting.enabled"], Kind::Bool, "ncps' anonymous usage reporting").default("false").global()
      .later(ANALYTICS),
    s(S3, &["cache-storage-s3-bucket"], &["CACHE_STORAGE_S3_BUCKET"],
      &["cache.storage.s3.bucket"], Kind::Text, "S3 bucket for NARs (instead of --cache-storage-local)").empty_unset(),
    s("cache.storage.s3.endpoint", &["cache-storage-s3-endpoint"], &["CACHE_STORAGE_S3_ENDPOINT"],
      &["cache.storage.s3.endpoint"], Kind::Url(None), "S3-compatible endpoint URL").requires(S3),
    s("cache.storage.s3.region", &["cache-storage-s3-region"], &["CACHE_STORAGE_S3_REGION"],
      &["cache.storage.s3.region"], Kind::Text, "S3 region").requires(S3),
    s("cache.storage.s3.access-key-id", &["cache-storage-s3-access-key-id"], &["CACHE_STORAGE_S3_ACCESS_KEY_ID"],
      &["cache.storage.s3.access-key-id"], Kind::Text, "S3 access key id").requires(S3),
    s("cache.storage.s3.secret-access-key", &["cache-storage-s3-secret-access-key"],
      &["CACHE_STORAGE_S3_SECRET_ACCESS_KEY"], &["cache.storage.s3.secret-access-key"], Kind::Text, "S3 secret access key")
      .requires(S3).secret(),
    s("cache.storage.s3.force-path-style", &["cache-storage-s3-force-path-style"],
      &["CACHE_STORAGE_S3_FORCE_PATH_STYLE"], &["cache.storage.s3.force-path-style"], Kind::Bool,
      "Path-style S3 addressing (MinIO and most self-hosted servers)").default("false").requires(S3),
    s("cache.storage.s3.prefix", &["cache-storage-s3-prefix"], &["CACHE_STORAGE_S3_PREFIX"],
      &["cache.storage.s3.prefix"], Kind::Text, "Key prefix inside the bucket").requires(S3),
    s("cache.storage.s3.presign-downloads", &["s3-presign-downloads", "cache-storage-s3-presign-downloads"],
      &["NIP_S3_PRESIGN_DOWNLOADS", "CACHE_STORAGE_S3_PRESIGN_DOWNLOADS"], &["cache.storage.s3.presign-downloads"], Kind::Bool,
      "Serve /v1 artifact downloads from S3 directly: the lookup's downloadUrl is a presigned URL (valid 15 minutes) and /v1/download redirects to one")
      .default("false"),
    // ncps' content-defined chunking: nip stores whole NARs. Off (as NixOS writes it) is fine; on
    // is refused at start (`validate`), since nip cannot serve a chunked store.
    s("cache.cdc.enabled", &["cache-cdc-enabled"], &["CACHE_CDC_ENABLED"], &["cache.cdc.enabled"], Kind::Bool,
      "ncps' content-defined chunking: nip stores whole NARs, so only false is accepted").default("false"),
    ncps!("cache.cdc.min", "cache-cdc-min", "CACHE_CDC_MIN", Kind::Text, "CDC minimum chunk size (ncps)", CDC).quiet_at("16384"),
    ncps!("cache.cdc.avg", "cache-cdc-avg", "CACHE_CDC_AVG", Kind::Text, "CDC average chunk size (ncps)", CDC).quiet_at("65536"),
    ncps!("cache.cdc.max", "cache-cdc-max", "CACHE_CDC_MAX", Kind::Text, "CDC maximum chunk size (ncps)", CDC).quiet_at("262144"),
    ncps!("cache.cdc.lazy-chunking-enabled", "cache-cdc-lazy-chunking-enabled", "CACHE_CDC_LAZY_CHUNKING_ENABLED", Kind::Bool,
         "CDC lazy chunking (ncps)", CDC),
    ncps!("cache.cdc.background-workers", "cache-cdc-background-workers", "CACHE_CDC_BACKGROUND_WORKERS", Kind::Text,
         "CDC background workers (ncps)", CDC),
    ncps!("cache.cdc.delete-delay", "cache-cdc-delete-delay", "CACHE_CDC_DELETE_DELAY", Kind::Text, "CDC delete delay (ncps)", CDC).quiet_at("24h"),
    ncps!("cache.cdc.lazy-recovery-schedule", "cache-cdc-lazy-recovery-schedule", "CACHE_CDC_LAZY_RECOVERY_SCHEDULE", Kind::Text,
         "CDC lazy recovery schedule (ncps)", CDC).quiet_at("@every 5m"),
    ncps!("cache.cdc.lazy-recovery-batch-size", "cache-cdc-lazy-recovery-batch-size", "CACHE_CDC_LAZY_RECOVERY_BATCH_SIZE", Kind::Text,
         "CDC lazy recovery batch size (ncps)", CDC).quiet_at("100"),
    ncps!("cache.cdc.lazy-cleanup-schedule", "cache-cdc-lazy-cleanup-schedule", "CACHE_CDC_LAZY_CLEANUP_SCHEDULE", Kind::Text,
         "CDC lazy cleanup schedule (ncps)", CDC).quiet_at("@every 1h"),
    ncps!("cache.cdc.chunk-wait-timeout", "cache-cdc-chunk-wait-timeout", "CACHE_CDC_CHUNK_WAIT_TIMEOUT", Kind::Text,
         "CDC chunk wait timeout (ncps)", CDC).quiet_at("30s"),
    ncps!("cache.fsck.dechunk-residue-grace", "cache-fsck-dechunk-residue-grace", "CACHE_FSCK_DECHUNK_RESIDUE_GRACE", Kind::Text,
         "Grace period of ncps fsck for chunked residue (ncps)", CDC).quiet_at("24h"),
    // ncps' download coordination between replicas.
    ncps!("cache.download.poll-timeout", "cache-download-poll-timeout", "CACHE_DOWNLOAD_POLL_TIMEOUT", Kind::Text,
         "How long a replica polls for a download another one runs (ncps)", STAGING).quiet_at("30s"),
    ncps!("cache.inflight-staging.enabled", "cache-inflight-staging-enabled", "CACHE_INFLIGHT_STAGING_ENABLED", Kind::Bool,
         "In-flight NAR staging between replicas (ncps)", STAGING),
    ncps!("cache.inflight-staging.retention", "cache-inflight-staging-retention", "CACHE_INFLIGHT_STAGING_RETENTION", Kind::Text,
         "In-flight staging retention (ncps)", STAGING).quiet_at("5m"),
    ncps!("cache.inflight-staging.part-size", "cache-inflight-staging-part-size", "CACHE_INFLIGHT_STAGING_PART_SIZE", Kind::Text,
         "In-flight staging part size (ncps)", STAGING).quiet_at("8388608"),
    // ncps' Redis and distributed locks.
    ncps!("cache.redis.addrs", "cache-redis-addrs", "CACHE_REDIS_ADDRS", Kind::Words, "Redis addresses (ncps)", LOCKS).split_commas(),
    ncps!("cache.redis.username", "cache-redis-username", "CACHE_REDIS_USERNAME", Kind::Text, "Redis user name (ncps)", LOCKS),
    ncps!("cache.redis.password", "cache-redis-password", "CACHE_REDIS_PASSWORD", Kind::Text, "Redis password (ncps)", LOCKS).secret(),
    ncps!("cache.redis.db", "cache-redis-db", "CACHE_REDIS_DB", Kind::Text, "Redis database number (ncps)", LOCKS).quiet_at("0"),
    ncps!("cache.redis.use-tls", "cache-redis-use-tls", "CACHE_REDIS_USE_TLS", Kind::Bool, "TLS to Redis (ncps)", LOCKS),
    ncps!("cache.redis.pool-size", "cache-redis-pool-size", "CACHE_REDIS_POOL_SIZE", Kind::Text, "Redis pool size (ncps)", LOCKS).quiet_at("10"),
    ncps!("cache.lock.backend", "cache-lock-backend", "CACHE_LOCK_BACKEND", Kind::Text, "Lock backend, local or redis (ncps)", LOCKS).quiet_at("local"),
    ncps!("cache.lock.redis.key-prefix", "cache-lock-redis-key-prefix", "CACHE_LOCK_REDIS_KEY_PREFIX", Kind::Text,
         "Redis lock key prefix (ncps)", LOCKS).quiet_at("ncps:lock:"),
    s("cache.lock.download-lock-ttl", &["cache-lock-download-ttl"], &["CACHE_LOCK_DOWNLOAD_TTL"], &["cache.lock.download-lock-ttl"], Kind::Duration,
      "Longest an instance waits for another instance's fetch of the same miss before fetching itself (ncps' download lock TTL)").default("5m"),
    ncps!("cache.lock.lru-lock-ttl", "cache-lock-lru-ttl", "CACHE_LOCK_LRU_TTL", Kind::Text, "LRU lock TTL (ncps)", LOCKS).quiet_at("30m"),
    ncps!("cache.lock.retry.max-attempts", "cache-lock-retry-max-attempts", "CACHE_LOCK_RETRY_MAX_ATTEMPTS", Kind::Text,
         "Lock retry attempts (ncps)", LOCKS).quiet_at("3"),
    ncps!("cache.lock.retry.initial-delay", "cache-lock-retry-initial-delay", "CACHE_LOCK_RETRY_INITIAL_DELAY", Kind::Text,
         "Lock retry initial delay (ncps)", LOCKS).quiet_at("100ms"),
    ncps!("cache.lock.retry.max-delay", "cache-lock-retry-max-delay", "CACHE_LOCK_RETRY_MAX_DELAY", Kind::Text,
         "Lock retry maximum delay (ncps)", LOCKS).quiet_at("2s"),
    ncps!("cache.lock.retry.jitter", "cache-lock-retry-jitter", "CACHE_LOCK_RETRY_JITTER", Kind::Bool, "Lock retry jitter (ncps)", LOCKS).quiet_at("true"),
    ncps!("cache.lock.allow-degraded-mode", "cache-lock-allow-degraded-mode", "CACHE_LOCK_ALLOW_DEGRADED_MODE", Kind::Bool,
         "Fall back to local locks without Redis (ncps)", LOCKS),
    // ncps' root command.
    s("analytics.reporting.samples", &["analytics-reporting-samples"], &[], &["analytics.reporting.samples"], Kind::Bool,
      "Print ncps' analytics samples (ncps)").global().later(ANALYTICS),
    s("log.console-writer-enabled", &["log-console-writer-enabled"], &[], &[], Kind::Bool,
      "ncps' human-readable console log writer").global().later(CONSOLE),
    s("log.console-writer-prefix", &["log-console-writer-prefix"], &[], &[], Kind::Text,
      "Prefix of ncps' console log lines").global().later(CONSOLE),
    ncps!("xz-binary-path", "xz-binary-path", "XZ_BINARY_PATH", Kind::Text, "Path of the xz binary (ncps)", XZ).global(),
    ncps!("use-xz-binary", "use-xz-binary", "USE_XZ_BINARY", Kind::Bool, "Use the xz binary (ncps)", XZ).global().quiet_at("true"),
];

// Why nip does without an ncps setting it accepts (`Setting::not_implemented`): each given one is
// named in a warning at start and under "ignored" in `--print-config`, so none vanishes silently.
// ncps' security settings (the upload signature gate, the GET token, authenticated reads) are all
// implemented, so none here weakens security by being ignored; one that would must be
// implemented or refused (as `--cache-cdc-enabled=true` is), never listed here.
const CDC: &str =
    "nip stores whole NARs and does not chunk them (only --cache-cdc-enabled=false is accepted)";
const STAGING: &str =
    "nip streams a NAR still downloading to every waiting client, and instances coordinate through the shared database";
const LOCKS: &str = "instances coordinate through the shared database; Redis is not needed";
const XZ: &str = "nip compresses and decompresses in-process and runs no xz binary";
const ANALYTICS: &str = "nip never reports usage";
const IDLE: &str = "the database pool keeps up to --cache-database-pool-max-open-conns connections and has no separate idle limit";
const PPROF: &str =
    "pprof is the Go runtime's profiler and nip is not a Go program (profile it with perf)";
const CONSOLE: &str = "nip's log format is --log-format (text or json)";

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
                if child.is_null() {
                    // An empty table (`pool:` with its entries commented out): nothing.
                    continue;
                } else if child.is_object()
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
        let (mut keys, mut flags, mut envs, mut file_keys) = Default::default();
        let insert = |set: &mut std::collections::HashSet<&str>, name| set.insert(name);
        for s in SETTINGS {
            assert!(insert(&mut keys, s.key), "duplicate key {}", s.key);
            for f in s.flags {
                assert!(insert(&mut flags, f), "duplicate flag {f}");
            }
            for e in s.envs {
                assert!(insert(&mut envs, e), "duplicate env {e}");
            }
            for k in s.file_keys {
                assert!(insert(&mut file_keys, k), "duplicate config key {k}");
            }
        }
    }

    #[test]
    fn settings_read_only_settings_before_them() {
        for (i, s) in SETTINGS.iter().enumerate() {
            if let Some(required) = s.requires {
                let before = SETTINGS[..i].iter().any(|r| r.key == required);
                assert!(
                    before,
                    "{} requires {required}, not declared before it",
                    s.key
                );
            }
            assert!(
                !s.global || !s.flags.is_empty(),
                "{}: a global flag needs a flag",
                s.key
            );
            assert_eq!(s.multi, s.kind.is_list(), "{}", s.key);
        }
    }

    #[test]
    fn help_shows_the_declared_default() {
        let help = |key| find(key).unwrap().help_text();
        assert_eq!(
            help("cache.negative-ttl"),
            "How long a narinfo (or a listing, build log, realisation or debug info file) that no upstream has is remembered as absent. Default: 30s"
        );
        assert_eq!(
            help("artifact.retention"),
            "Delete /v1 artifacts not downloaded for this long (e.g. 30d). Default: keep forever"
        );
        assert_eq!(
            help("cache.temp-path"),
            "Directory for downloads and uploads in progress. Default: <data path>/tmp"
        );
        assert_eq!(
            help("cache.netrc-file"),
            "netrc file with credentials for upstream caches. Default: ~/.netrc when it exists"
        );
        assert!(!help("cache.storage.s3.bucket").contains("Default"));
    }

    /// Every flag, environment variable and config key of ncps' `serve` and root commands
    /// (pkg/ncps/serve.go and root.go at ncps main, 2026-12; `analytics.reporting.samples` as the
    /// NixOS module writes it) is a nip setting: implemented, or accepted with a reason.
    #[rustfmt::skip]
    const NCPS: &[(&str, &str, &str)] = &[
        ("analytics-reporting-enabled", "ANALYTICS_REPORTING_ENABLED", "analytics.reporting.enabled"),
        ("analytics-reporting-samples", "", "analytics.reporting.samples"),
        ("log-level", "LOG_LEVEL", "log.level"),
        ("log-console-writer-enabled", "", ""),
        ("log-console-writer-prefix", "", ""),
        ("otel-enabled", "OTEL_ENABLED", "opentelemetry.enabled"),
        ("otel-grpc-url", "OTEL_GRPC_URL", "opentelemetry.grpc-url"),
        ("prometheus-enabled", "PROMETHEUS_ENABLED", "prometheus.enabled"),
        ("xz-binary-path", "XZ_BINARY_PATH", "xz-binary-path"),
        ("use-xz-binary", "USE_XZ_BINARY", "use-xz-binary"),
        ("cache-hostname", "CACHE_HOSTNAME", "cache.hostname"),
        ("server-addr", "SERVER_ADDR", "server.addr"),
        ("pprof-addr", "PPROF_ADDR", "pprof.addr"),
        ("cache-allow-delete-verb", "CACHE_ALLOW_DELETE_VERB", "cache.allow-delete-verb"),
        ("cache-allow-put-verb", "CACHE_ALLOW_PUT_VERB", "cache.allow-put-verb"),
        ("cache-get-token", "CACHE_GET_TOKEN", "cache.get-token"),
        ("netrc-file", "NETRC_FILE", "cache.netrc-file"),
        ("cache-temp-path", "CACHE_TEMP_PATH", "cache.temp-path"),
        ("cache-secret-key-path", "CACHE_SECRET_KEY_PATH", "cache.secret-key-path"),
        ("cache-sign-narinfo", "CACHE_SIGN_NARINFO", "cache.sign-narinfo"),
        ("cache-require-trusted-signature", "CACHE_REQUIRE_TRUSTED_SIGNATURE", "cache.require-trusted-signature"),
        ("cache-trusted-upload-key", "CACHE_TRUSTED_UPLOAD_KEYS", "cache.trusted-upload-keys"),
        ("cache-storage-local", "CACHE_STORAGE_LOCAL", "cache.storage.local"),
        ("cache-storage-s3-bucket", "CACHE_STORAGE_S3_BUCKET", "cache.storage.s3.bucket"),
        ("cache-storage-s3-endpoint", "CACHE_STORAGE_S3_ENDPOINT", "cache.storage.s3.endpoint"),
        ("cache-storage-s3-region", "CACHE_STORAGE_S3_REGION", "cache.storage.s3.region"),
        ("cache-storage-s3-access-key-id", "CACHE_STORAGE_S3_ACCESS_KEY_ID", "cache.storage.s3.access-key-id"),
        ("cache-storage-s3-secret-access-key", "CACHE_STORAGE_S3_SECRET_ACCESS_KEY", "cache.storage.s3.secret-access-key"),
        ("cache-storage-s3-force-path-style", "CACHE_STORAGE_S3_FORCE_PATH_STYLE", "cache.storage.s3.force-path-style"),
        ("cache-database-url", "CACHE_DATABASE_URL", "cache.database-url"),
        ("cache-database-pool-max-open-conns", "CACHE_DATABASE_POOL_MAX_OPEN_CONNS", "cache.database.pool.max-open-conns"),
        ("cache-database-pool-max-idle-conns", "CACHE_DATABASE_POOL_MAX_IDLE_CONNS", "cache.database.pool.max-idle-conns"),
        ("cache-max-size", "CACHE_MAX_SIZE", "cache.max-size"),
        ("cache-lru-schedule", "CACHE_LRU_SCHEDULE", "cache.lru.schedule"),
        ("cache-lru-schedule-timezone", "CACHE_LRU_SCHEDULE_TZ", "cache.lru.timezone"),
        ("cache-upstream-url", "CACHE_UPSTREAM_URLS", "cache.upstream.urls"),
        ("cache-upstream-public-key", "CACHE_UPSTREAM_PUBLIC_KEYS", "cache.upstream.public-keys"),
        ("cache-upstream-dialer-timeout", "CACHE_UPSTREAM_DIALER_TIMEOUT", "cache.upstream.dialer-timeout"),
        ("cache-upstream-response-header-timeout", "CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT", "cache.upstream.response-header-timeout"),
        ("cache-cdc-enabled", "CACHE_CDC_ENABLED", "cache.cdc.enabled"),
        ("cache-cdc-min", "CACHE_CDC_MIN", "cache.cdc.min"),
        ("cache-cdc-avg", "CACHE_CDC_AVG", "cache.cdc.avg"),
        ("cache-cdc-max", "CACHE_CDC_MAX", "cache.cdc.max"),
        ("cache-cdc-lazy-chunking-enabled", "CACHE_CDC_LAZY_CHUNKING_ENABLED", "cache.cdc.lazy-chunking-enabled"),
        ("cache-cdc-background-workers", "CACHE_CDC_BACKGROUND_WORKERS", "cache.cdc.background-workers"),
        ("cache-cdc-delete-delay", "CACHE_CDC_DELETE_DELAY", "cache.cdc.delete-delay"),
        ("cache-cdc-lazy-recovery-schedule", "CACHE_CDC_LAZY_RECOVERY_SCHEDULE", "cache.cdc.lazy-recovery-schedule"),
        ("cache-cdc-lazy-recovery-batch-size", "CACHE_CDC_LAZY_RECOVERY_BATCH_SIZE", "cache.cdc.lazy-recovery-batch-size"),
        ("cache-cdc-lazy-cleanup-schedule", "CACHE_CDC_LAZY_CLEANUP_SCHEDULE", "cache.cdc.lazy-cleanup-schedule"),
        ("cache-cdc-chunk-wait-timeout", "CACHE_CDC_CHUNK_WAIT_TIMEOUT", "cache.cdc.chunk-wait-timeout"),
        ("", "CACHE_FSCK_DECHUNK_RESIDUE_GRACE", "cache.fsck.dechunk-residue-grace"),
        ("cache-download-poll-timeout", "CACHE_DOWNLOAD_POLL_TIMEOUT", "cache.download.poll-timeout"),
        ("cache-inflight-staging-enabled", "CACHE_INFLIGHT_STAGING_ENABLED", "cache.inflight-staging.enabled"),
        ("cache-inflight-staging-retention", "CACHE_INFLIGHT_STAGING_RETENTION", "cache.inflight-staging.retention"),
        ("cache-inflight-staging-part-size", "CACHE_INFLIGHT_STAGING_PART_SIZE", "cache.inflight-staging.part-size"),
        ("cache-redis-addrs", "CACHE_REDIS_ADDRS", "cache.redis.addrs"),
        ("cache-redis-username", "CACHE_REDIS_USERNAME", "cache.redis.username"),
        ("cache-redis-password", "CACHE_REDIS_PASSWORD", "cache.redis.password"),
        ("cache-redis-db", "CACHE_REDIS_DB", "cache.redis.db"),
        ("cache-redis-use-tls", "CACHE_REDIS_USE_TLS", "cache.redis.use-tls"),
        ("cache-redis-pool-size", "CACHE_REDIS_POOL_SIZE", "cache.redis.pool-size"),
        ("cache-lock-backend", "CACHE_LOCK_BACKEND", "cache.lock.backend"),
        ("cache-lock-redis-key-prefix", "CACHE_LOCK_REDIS_KEY_PREFIX", "cache.lock.redis.key-prefix"),
        ("cache-lock-download-ttl", "CACHE_LOCK_DOWNLOAD_TTL", "cache.lock.download-lock-ttl"),
        ("cache-lock-lru-ttl", "CACHE_LOCK_LRU_TTL", "cache.lock.lru-lock-ttl"),
        ("cache-lock-retry-max-attempts", "CACHE_LOCK_RETRY_MAX_ATTEMPTS", "cache.lock.retry.max-attempts"),
        ("cache-lock-retry-initial-delay", "CACHE_LOCK_RETRY_INITIAL_DELAY", "cache.lock.retry.initial-delay"),
        ("cache-lock-retry-max-delay", "CACHE_LOCK_RETRY_MAX_DELAY", "cache.lock.retry.max-delay"),
        ("cache-lock-retry-jitter", "CACHE_LOCK_RETRY_JITTER", "cache.lock.retry.jitter"),
        ("cache-lock-allow-degraded-mode", "CACHE_LOCK_ALLOW_DEGRADED_MODE", "cache.lock.allow-degraded-mode"),
        ("cache-data-path", "CACHE_DATA_PATH", "cache.data-path"),
        ("upstream-cache", "UPSTREAM_CACHES", "cache.upstream.caches"),
        ("upstream-public-key", "UPSTREAM_PUBLIC_KEYS", ""),
        ("upstream-dialer-timeout", "UPSTREAM_DIALER_TIMEOUT", ""),
        ("upstream-response-header-timeout", "UPSTREAM_RESPONSE_HEADER_TIMEOUT", ""),
    ];

    #[test]
    fn every_ncps_flag_env_var_and_key_is_a_setting() {
        for (flag, env, key) in NCPS {
            let by_flag = SETTINGS.iter().find(|s| s.flags.contains(flag));
            assert!(
                flag.is_empty() || by_flag.is_some(),
                "--{flag} is not accepted"
            );
            let by_env = SETTINGS.iter().find(|s| s.envs.contains(env));
            assert!(env.is_empty() || by_env.is_some(), "{env} is not accepted");
            let by_key = SETTINGS.iter().find(|s| s.file_keys.contains(key));
            assert!(key.is_empty() || by_key.is_some(), "{key} is not accepted");
            // The three names of one ncps setting are one nip setting.
            let keys: std::collections::HashSet<_> = [by_flag, by_env, by_key]
                .into_iter()
                .flatten()
                .map(|s| s.key)
                .collect();
            assert_eq!(keys.len(), 1, "{flag} {env} {key}: {keys:?}");
        }
        // Every setting nip ignores says why; the ncps-only ones have ncps' three names.
        let redis = find("cache.redis.addrs").unwrap();
        assert_eq!(redis.flags, ["cache-redis-addrs"]);
        assert_eq!(redis.envs, ["CACHE_REDIS_ADDRS"]);
        assert_eq!(
            redis.not_implemented,
            Some("instances coordinate through the shared database; Redis is not needed")
        );
        assert_eq!(
            find("analytics.reporting.enabled").unwrap().not_implemented,
            Some("nip never reports usage")
        );
        assert!(find("cache.redis.password").unwrap().secret);
    }

    #[test]
    fn an_empty_yaml_table_is_no_setting() {
        // config.example.yaml's `database: pool:` with every entry commented out.
        let doc: serde_json::Value =
            serde_yaml::from_str("cache:\n  database:\n    pool:\n  hostname: h\n").unwrap();
        let layer = layer_from_document(&doc).unwrap();
        assert_eq!(layer["cache.hostname"], vec!["h"]);
        assert_eq!(layer.len(), 1);
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
