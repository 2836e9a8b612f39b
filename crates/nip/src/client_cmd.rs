//! The client commands: `nip cache …` (remote config/status/pull/push, list, stats), `nip build`
//! and `nip completions`. Argument parsing and printing only; the work is in `nip-client`.
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use nip_client::build::{BuildOptions, Source};
use nip_client::config::{self, mask_key};
use nip_client::dirs::Dirs;
use nip_client::remote::UploadOutcome;
use nip_client::{ops, Client};

use crate::client_report::ListFormat;

// `///` comments on the variants and fields are their `--help` text.
#[derive(Subcommand)]
pub enum CacheCommand {
    /// Configure and use the remote cache
    #[command(subcommand, arg_required_else_help = false)]
    Remote(RemoteCommand),
    /// List local artifacts, or recent cache operations
    List(ListArgs),
    /// Hit rate, transfer success rates, cache size, time saved
    Stats(JsonArgs),
}

#[derive(Subcommand)]
pub enum RemoteCommand {
    /// Set remote cache options (stored in $XDG_CONFIG_HOME/nip/remote-cache.json, mode 0600)
    Config(RemoteConfigArgs),
    /// Test the connection and the API key; exit 1 when unavailable
    Status(JsonArgs),
    /// Download an artifact into the local cache
    Pull(PullArgs),
    /// Upload local artifacts
    Push(PushArgs),
}

#[derive(Args)]
pub struct JsonArgs {
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RemoteConfigArgs {
    /// Server URL
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// API key (Bearer token). Empty (as `--api-key $SECRET` with the secret unset, e.g. a
    /// fork's pipeline): no key, anonymous/read-only use, with a warning
    #[arg(long, value_name = "KEY", num_args = 0..=1, default_missing_value = "")]
    api_key: Option<String>,
    /// Use the remote in builds
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    /// Do not use the remote in builds
    #[arg(long)]
    disable: bool,
    /// Transfer timeout in seconds: the longest a download or upload may stay silent
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Deadline of a lookup in seconds (connect and answer; fractions allowed): what a dead
    /// remote costs a build
    #[arg(long, value_name = "SECS")]
    lookup_timeout: Option<f64>,
    /// PEM file of CA certificates to trust for https:// (a private CA), besides the system's; ""
    /// removes it
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<String>,
    /// For pipelines: save NIP_REMOTE_CACHE_URL, NIP_REMOTE_CACHE_API_KEY (and
    /// NIP_REMOTE_CACHE_CA_CERT when set) and enable the remote
    #[arg(long)]
    from_env: bool,
    /// Print the effective configuration (key masked)
    #[arg(long)]
    show: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// A cache key, or a package and version (all its remote variants) and variants
    #[arg(value_name = KEYS, num_args = 1.., required = true, allow_hyphen_values = false)]
    args: Vec<String>,
}

#[derive(Args)]
pub struct PushArgs {
    /// A cache key, or a package and version (all its local variants)
    #[arg(value_name = KEYS, num_args = 1.., required = true, allow_hyphen_values = false)]
    args: Vec<String>,
}

/// What `pull` and `push` take.
const KEYS: &str = "KEY | PKG VERSION [+VARIANT…]";

#[derive(Args)]
pub struct ListArgs {
    /// simple: one cache key per line
    #[arg(long, value_enum, value_names = crate::NO_VALUE_NAME, default_value_t = ListFormat::Table)]
    format: ListFormat,
    /// Recent cache operations, newest first
    #[arg(long)]
    recent: bool,
    /// How many operations --recent shows
    #[arg(long, value_names = crate::NO_VALUE_NAME, default_value_t = 20)]
    limit: usize,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Recipe name (<pkg>.toml)
    #[arg(value_name = "pkg")]
    pkg: String,
    /// Variants, e.g. +python+ruby or +ruby +python
    #[arg(num_args = 0.., value_name = "+VARIANT")]
    variants: Vec<String>,
    /// Print JSON
    #[arg(long)]
    json: bool,
    /// CI output: no progress bars, one `nip-build:` summary line (hits, misses, time saved) on
    /// stderr
    #[arg(long, conflicts_with = "json")]
    ci: bool,
    /// Neither download from nor upload to the remote
    #[arg(long)]
    no_remote_cache: bool,
}

#[derive(Args)]
pub struct CompletionsArgs {
    #[arg(value_enum, value_name = "shell")]
    shell: CompletionShell,
}

/// The shells `nip completions` writes a script for.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

fn client() -> Result<Client> {
    let dirs = Dirs::from_env();
    let config = config::load(&dirs.remote_config_file())?;
    Ok(Client::new(dirs, config))
}

fn recipes_path() -> Option<String> {
    std::env::var("NIP_RECIPES_PATH").ok()
}

pub fn run_cache(cmd: &CacheCommand) -> Result<()> {
    match cmd {
        CacheCommand::Remote(r) => match r {
            RemoteCommand::Config(c) => remote_config(c),
            RemoteCommand::Status(s) => remote_status(s.json),
            RemoteCommand::Pull(p) => pull(&p.args),
            RemoteCommand::Push(p) => push(&p.args),
        },
        CacheCommand::List(l) => {
            crate::client_report::list(&client()?, l.format, l.recent, l.limit)
        }
        CacheCommand::Stats(s) => crate::client_report::stats(&client()?, s.json),
    }
}

fn remote_config(c: &RemoteConfigArgs) -> Result<()> {
    let dirs = Dirs::from_env();
    let path = dirs.remote_config_file();
    let mut file = config::read_file(&path)?;
    let mut changed = false;
    if let Some(u) = &c.url {
        file.url = Some(config::normalize_url(u)?);
        changed = true;
    }
    if let Some(k) = &c.api_key {
        file.api_key = Some(k.trim().to_string()).filter(|k| !k.is_empty());
        if file.api_key.is_none() {
            nip_client::client::warn(
                "--api-key is empty: no API key is saved; the remote cache is used anonymously \
                 (reads only, where the server allows them)",
            );
        }
        changed = true;
    }
    if c.enable || c.disable {
        file.enabled = Some(c.enable);
        changed = true;
    }
    if let Some(t) = c.timeout {
        file.timeout = Some(t);
        changed = true;
    }
    if let Some(t) = c.lookup_timeout {
        file.lookup_timeout = Some(t);
        // Checked now, not at the next build.
        config::effective(&file, &Default::default())?;
        changed = true;
    }
    if let Some(ca) = &c.ca_cert {
        file.ca_cert = if ca.is_empty() {
            None
        } else {
            Some(absolute(ca)?)
        };
        changed = true;
    }
    if c.from_env && from_env(&mut file, &config::env_snapshot())? {
        changed = true;
    }
    if changed {
        config::write_file(&path, &file)?;
        // A fixed URL, key or CA is worth asking again at once.
        nip_client::unreachable::Unreachable::new(dirs.unreachable_file()).clear();
        eprintln!("✅ Saved {}", path.display());
    }
    if changed && !c.show {
        return Ok(());
    }
    let eff = config::effective(&file, &config::env_snapshot())?;
    let p = &eff.policies;
    let show = serde_json::json!({
        "file": path,
        "url": eff.url,
        "apiKey": eff.api_key.as_deref().map(mask_key),
        "timeout": eff.timeout.as_secs(),
        "lookupTimeout": p.lookup_timeout.as_secs_f64(),
        "enabled": eff.enabled,
        "caCert": eff.ca_cert,
        "servers": eff.servers.iter().map(|s| serde_json::json!({
            "url": s.url, "priority": s.priority, "apiKey": s.api_key.as_deref().map(mask_key),
        })).collect::<Vec<_>>(),
        "policies": {
            "uploadOnBuild": p.upload_on_build,
            "downloadBeforeBuild": p.download_before_build,
            "fallbackToLocal": p.fallback_to_local,
            "retryAttempts": p.retry_attempts,
            "retryDelay": p.retry_delay.as_secs_f64(),
            "maxUnpackBytes": p.max_unpack_bytes,
            "maxUnpackRatio": p.max_unpack_ratio,
            "maxUnpackEntries": p.max_unpack_entries,
        },
    });
    println!("{}", serde_json::to_string_pretty(&show)?);
    Ok(())
}

/// The CA file as an absolute path: the config file is read from other directories later.
fn absolute(path: &str) -> Result<String> {
    let p = std::path::Path::new(path);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("current directory")?
            .join(p)
    };
    Ok(abs.to_string_lossy().into_owned())
}

/// `--from-env`: one line in a pipeline configures the client from its secrets. Without
/// `NIP_REMOTE_CACHE_URL` (a fork's pipeline gets no secrets) it warns and changes nothing:
/// the pipeline goes on and builds without the cache. Returns whether the file changed.
fn from_env(
    file: &mut config::ConfigFile,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<bool> {
    let get = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let Some(url) = get("NIP_REMOTE_CACHE_URL") else {
        nip_client::client::warn(
            "NIP_REMOTE_CACHE_URL is not set: the remote cache stays off and builds run without it",
        );
        return Ok(false);
    };
    file.url = Some(config::normalize_url(url.trim())?);
    // A pipeline without a key (e.g. a fork's pull request) reads anonymously or not at all;
    // a key saved earlier must not linger.
    file.api_key = get("NIP_REMOTE_CACHE_API_KEY");
    if let Some(ca) = get("NIP_REMOTE_CACHE_CA_CERT") {
        file.ca_cert = Some(absolute(&ca)?);
    }
    file.enabled = Some(true);
    Ok(true)
}

fn remote_status(json: bool) -> Result<()> {
    let report = ops::status(&client()?);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let yes = |b: bool| if b { "Yes" } else { "No" };
        println!("Remote Cache Status");
        println!("===================");
        println!("Enabled: {}", yes(report.enabled));
        println!(
            "URL: {}",
            report.url.as_deref().unwrap_or("(not configured)")
        );
        println!(
            "API Key: {}",
            if report.api_key_configured {
                "***configured***"
            } else {
                "not configured"
            }
        );
        println!("Timeout: {} seconds", report.timeout_secs);
        println!();
        println!("Testing connection...");
        if report.servers.len() > 1 {
            for s in &report.servers {
                match &s.reason {
                    None => println!("  ✅ {} (priority {}): available", s.url, s.priority),
                    Some(r) => println!("  ❌ {} (priority {}): {r}", s.url, s.priority),
                }
            }
        }
        if report.available {
            println!("✅ Remote cache is available");
        } else {
            println!(
                "❌ Remote cache is not available: {}",
                report.reason.as_deref().unwrap_or("unknown")
            );
        }
    }
    if !report.available {
        // Exit status is the answer here; this is not an error to print twice.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
    Ok(())
}

fn pull(args: &[String]) -> Result<()> {
    let c = client()?;
    let cwd = std::env::current_dir().context("current directory")?;
    let candidates = |name: &str, version: &str| ops::remote_candidates(&c, name, version);
    // `pkg version` without variants: every variant of that version the remote has.
    let (keys, exact) =
        match ops::resolve_keys(&c, args, &cwd, recipes_path().as_deref(), &candidates)? {
            ops::Keys::Exact(k) => (k, true),
            ops::Keys::Possible(k) => (k, false),
        };
    let (mut pulled, mut failed) = (0, 0);
    for key in &keys {
        match ops::pull_found(&c, key) {
            Ok(Some(meta)) => {
                eprintln!("✅ Pulled {} ({} bytes)", meta.key, meta.size);
                println!("{}", c.local.artifact_path(&meta.key).display());
                pulled += 1;
            }
            // A variant combination the remote does not have.
            Ok(None) if !exact => {}
            Ok(None) => {
                eprintln!("❌ {key} is not in the remote cache");
                failed += 1;
            }
            Err(e) => {
                eprintln!("❌ {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} pulls failed", keys.len());
    }
    if pulled == 0 {
        bail!("no artifact for {} in the remote cache", args.join(" "));
    }
    Ok(())
}

fn push(args: &[String]) -> Result<()> {
    let c = client()?;
    let cwd = std::env::current_dir().context("current directory")?;
    let local = |name: &str, version: &str| {
        Ok(Some(
            c.local
                .list()
                .into_iter()
                .filter(|m| m.name == name && m.version == version)
                .collect(),
        ))
    };
    // `pkg version` without variants: every local variant of that version.
    let keys = match ops::resolve_keys(&c, args, &cwd, recipes_path().as_deref(), &local)? {
        ops::Keys::Exact(k) | ops::Keys::Possible(k) => k,
    };
    let mut failed = 0;
    for key in &keys {
        match ops::push(&c, key) {
            Ok((url, UploadOutcome::Created)) => eprintln!("✅ Pushed {key} to {url}"),
            Ok((url, UploadOutcome::AlreadyPresent)) => eprintln!("✅ {key} is already on {url}"),
            Err(e) => {
                eprintln!("❌ {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} pushes failed", keys.len());
    }
    Ok(())
}

pub fn run_build(args: &BuildArgs) -> Result<()> {
    let ci = args.ci;
    if ci {
        nip_client::progress::set_quiet();
    }
    let c = client()?;
    let opts = BuildOptions {
        pkg: args.pkg.clone(),
        variant_args: args.variants.clone(),
        no_remote: args.no_remote_cache,
        cwd: std::env::current_dir().context("current directory")?,
        recipes_path: recipes_path(),
    };
    let r = nip_client::build::build(&c, &opts)?;
    if ci {
        // One line a CI log can grep: what happened, and what the cache saved.
        let (hits, misses) = match r.source {
            Source::Local | Source::Remote => (1, 0),
            Source::Built => (0, 1),
        };
        let source = match r.source {
            Source::Local => "local",
            Source::Remote => "remote",
            Source::Built => "built",
        };
        eprintln!(
            "nip-build: {} source={source} hits={hits} misses={misses} saved={:.1}s elapsed={:.1}s uploaded={}",
            r.key, r.saved_secs, r.elapsed_secs, r.uploaded
        );
        println!("{}", r.path.display());
    } else if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let how = match r.source {
            Source::Local => "from the local cache",
            Source::Remote => "downloaded from the remote cache",
            Source::Built if r.uploaded => "built and uploaded",
            Source::Built => "built",
        };
        eprintln!("✅ {} {how} ({:.1}s)", r.key, r.elapsed_secs);
        println!("{}", r.path.display());
    }
    Ok(())
}

/// Writes the completion script of `cli` (the whole `nip` command) to stdout.
pub fn run_completions(args: &CompletionsArgs, mut cli: clap::Command) -> Result<()> {
    use clap_complete::Shell;
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    // Written by us, not by the generator (which panics on a write error): a reader that
    // stops early (`| head`) ends the command quietly.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cli, "nip", &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
    Ok(())
}
