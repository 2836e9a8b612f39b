//! `nip serve`: flags are generated from the settings table, so every flag, environment variable
//! and config key of ncps is accepted under the same name.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use nip_server::config::ServeConfig;
use nip_server::settings::{self, Layer, Setting, SETTINGS};

pub fn command() -> Command {
    let cmd = Command::new("serve")
        .about("Run the cache server (Nix binary cache proxy and artifact cache)")
        .arg(
            Arg::new("print-config")
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help("Print the effective configuration as JSON (secrets masked) and exit"),
        );
    with_settings(cmd)
}

/// Adds `--config` and every server setting as a flag, so commands that work on the server's
/// data (`keys`, `audit`, `migrate`) find it exactly as `serve` does.
pub fn with_settings(cmd: Command) -> Command {
    let mut cmd = cmd.arg(crate::config_arg());
    for s in SETTINGS.iter().filter(|s| !s.flags.is_empty()) {
        cmd = cmd.arg(setting_arg(s));
    }
    cmd
}

/// ncps' global flags, which ncps takes before the subcommand: its NixOS module runs
/// `ncps --log-level=info --otel-enabled … serve …`. `nip` accepts them there too.
const ROOT_SETTINGS: &[&str] = &[
    "log.level",
    "opentelemetry.enabled",
    "opentelemetry.grpc-url",
    "prometheus.enabled",
    "analytics.reporting.enabled",
];

/// Adds ncps' global flags (and `--config`) to the top-level command.
pub fn with_root_settings(cmd: Command) -> Command {
    let mut cmd = cmd.arg(crate::config_arg());
    for s in SETTINGS.iter().filter(|s| ROOT_SETTINGS.contains(&s.key)) {
        // `--otel-enabled serve`: a boolean before the subcommand takes a value only after `=`
        // (as in ncps), or it would swallow the subcommand's name.
        cmd = cmd.arg(setting_arg(s).require_equals(s.boolean));
    }
    cmd
}

/// Flags given before the subcommand; a subcommand's own flag wins over them.
static ROOT_FLAGS: OnceLock<(Layer, Option<String>)> = OnceLock::new();

/// Records the top-level flags for [`load_config`]; called once by `main`.
pub fn remember_root_flags(m: &ArgMatches) {
    let _ = ROOT_FLAGS.set((flag_layer(m), m.get_one::<String>("config").cloned()));
}

fn setting_arg(s: &Setting) -> Arg {
    let mut help = format!("{} [env: {}]", s.help, s.envs.join(", "));
    if let Some(reason) = s.not_implemented {
        help.push_str(&format!(" (accepted, ignored: {reason})"));
    }
    let mut arg = Arg::new(s.key)
        .long(s.flags[0])
        .help(help)
        .value_name("VALUE");
    for alias in &s.flags[1..] {
        arg = arg.visible_alias(*alias);
    }
    if s.multi {
        arg.action(ArgAction::Append)
    } else if s.boolean {
        // `--flag`, `--flag=false` and `--flag false` all work, as with ncps' flag library.
        arg.action(ArgAction::Set)
            .num_args(0..=1)
            .default_missing_value("true")
            .value_name("BOOL")
    } else {
        arg.action(ArgAction::Set)
    }
}

fn flag_layer(m: &ArgMatches) -> Layer {
    let mut layer = Layer::new();
    for s in SETTINGS.iter().filter(|s| !s.flags.is_empty()) {
        // try_: the top-level command defines only some settings.
        if matches!(m.try_get_raw(s.key), Ok(Some(_)))
            && m.value_source(s.key) == Some(ValueSource::CommandLine)
        {
            if let Some(values) = m.get_many::<String>(s.key) {
                layer.insert(s.key, values.cloned().collect());
            }
        }
    }
    layer
}

/// The config file: `--config`, else `NIP_CONFIG_FILE` / `NCPS_CONFIG_FILE`, else
/// `$XDG_CONFIG_HOME/ncps/config.yaml` when it exists.
fn config_path(m: &ArgMatches, env: &HashMap<String, String>) -> Option<PathBuf> {
    let root = ROOT_FLAGS.get().and_then(|(_, c)| c.as_ref());
    if let Some(p) = m.get_one::<String>("config").or(root) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = env
        .get("NIP_CONFIG_FILE")
        .or_else(|| env.get("NCPS_CONFIG_FILE"))
    {
        return Some(PathBuf::from(p));
    }
    let xdg = env
        .get("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|h| Path::new(h).join(".config")))?;
    let ncps = xdg.join("ncps").join("config.yaml");
    ncps.exists().then_some(ncps)
}

pub fn read_config_file(path: &Path) -> anyhow::Result<Layer> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let doc: serde_json::Value = match ext {
        "toml" => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        "json" => {
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        _ => serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
    };
    settings::layer_from_document(&doc).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn load_config(m: &ArgMatches) -> anyhow::Result<ServeConfig> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let file = match config_path(m, &env) {
        Some(p) => read_config_file(&p)?,
        None => Layer::new(),
    };
    let flags = match ROOT_FLAGS.get() {
        Some((root, _)) => settings::merge(&[&flag_layer(m), root]),
        None => flag_layer(m),
    };
    let merged = settings::merge(&[&flags, &file, &settings::layer_from_env(&env)]);
    let mut config = ServeConfig::from_layer(&merged)?;
    config.ignored.extend(settings::ignored_ncps_envs(&env));
    Ok(config)
}

fn print_config(c: &ServeConfig) {
    let json = serde_json::json!({
        "cache.hostname": c.hostname,
        "cache.storage.local": c.data_path,
        "cache.database-url": nip_core::redact::redact_userinfo(&c.database_url),
        "cache.temp-path": c.temp_path,
        "cache.upstream.urls": c.upstreams.iter().map(|u| {
            let url = nip_server::config::redact_userinfo(&u.url);
            match u.priority {
                Some(p) => format!("{url}?priority={p}"),
                None => url,
            }
        }).collect::<Vec<_>>(),
        "cache.upstream.public-keys": c.upstream_public_keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        "cache.sign-narinfo": c.sign_narinfo,
        "cache.secret-key-path": c.secret_key_path,
        "cache.netrc-file": c.netrc_file,
        "cache.upstream.dialer-timeout": format!("{}ms", c.dialer_timeout.as_millis()),
        "cache.upstream.response-header-timeout": format!("{}ms", c.response_header_timeout.as_millis()),
        "cache.upstream.body-idle-timeout": format!("{}ms", c.body_idle_timeout.as_millis()),
        "cache.negative-ttl": format!("{}ms", c.negative_ttl.as_millis()),
        "server.addr": c.server_addr,
        "log.level": c.log_level,
        "cache.allow-put-verb": c.allow_put,
        "cache.allow-delete-verb": c.allow_delete,
        "cache.require-auth-read": c.require_auth_read,
        "cache.api-key": c.api_key.as_ref().map(|_| "***"),
        "artifact.max-size": c.max_upload_size,
        "artifact.retention": c.artifact_retention.map(|d| format!("{}s", d.as_secs())),
        "rate-limit": c.rate_limit.map(|(rps, burst)| format!("{rps}/s burst {burst}")),
        "cache.max-size": c.max_size,
        "cache.lru.schedule": c.lru_schedule,
        "cache.verify-schedule": c.verify_schedule,
        "cache.require-trusted-signature": c.require_trusted_signature,
        "cache.trusted-upload-keys": c.trusted_upload_keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        "prometheus.enabled": c.prometheus_enabled,
        "opentelemetry.enabled": c.otel.is_some(),
        "opentelemetry.grpc-url": c.otel.as_ref().and_then(|o| o.grpc_url.as_deref()).map(nip_server::config::redact_userinfo),
        "log.format": c.log_format,
        "cache.storage.s3": c.s3.as_ref().map(|s3| serde_json::json!({
            "bucket": s3.bucket, "endpoint": s3.endpoint, "region": s3.region,
            "access-key-id": s3.access_key_id, "secret-access-key": s3.secret_access_key.as_ref().map(|_| "***"),
            "force-path-style": s3.force_path_style, "prefix": s3.prefix,
            "presign-downloads": c.s3_presign_downloads,
        })),
        "cache.get-token": c.get_token.as_ref().map(|_| "***"),
        "cache.database.pool.max-open-conns": c.database_max_connections,
        "tls.cert": c.tls.as_ref().map(|t| &t.cert),
        "tls.key": c.tls.as_ref().map(|t| &t.key),
        "server.trusted-proxies": c.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "server.read-timeout": format!("{}ms", c.conn_limits.read_timeout.as_millis()),
        "server.max-connections": c.conn_limits.max_connections,
        "ignored": c.ignored.iter().map(|(f, why)| format!("{f}: {why}")).collect::<Vec<_>>(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&json).unwrap_or_default()
    );
}

pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let config = load_config(m)?;
    if m.get_flag("print-config") {
        print_config(&config);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Inside the runtime: the OTLP exporter's gRPC channel runs on it.
    let telemetry = {
        let _entered = rt.enter();
        crate::telemetry::init(&config.log_level, &config.log_format, config.otel.as_ref())?
    };
    for (flag, reason) in &config.ignored {
        tracing::warn!("{flag} is ignored because {reason}");
    }
    // A bad certificate or key is an error now, before storage is opened or the port bound.
    if let Some(files) = &config.tls {
        nip_server::tls::load(files)?;
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let result = rt.block_on(async move {
        let addr = config.listen_addr();
        let state = nip_server::AppState::open(config).await?;
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--server-addr)"))?;
        tracing::info!(addr = %listener.local_addr()?, scheme, public_key = %state.public_key, "nip serve listening");
        nip_server::serve(listener, state, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok::<_, anyhow::Error>(())
    });
    // main prints the error on stderr; the collector gets it as a log record too.
    if let (Err(e), true) = (&result, telemetry.is_exporting()) {
        tracing::error!("{e:#}");
    }
    // The last spans and log records, exported while the runtime still drives the gRPC channel.
    telemetry.shutdown();
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
