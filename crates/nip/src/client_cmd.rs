//! The client commands: `nip cache …` (remote config/status/pull/push, list, stats), `nip build`
//! and `nip completions`. Argument parsing and printing only; the work is in `nip-client`.
use anyhow::{bail, Context, Result};
use clap::{Arg, ArgAction, ArgMatches, Command};
use nip_client::build::{BuildOptions, Source};
use nip_client::config::{self, mask_key};
use nip_client::dirs::Dirs;
use nip_client::remote::UploadOutcome;
use nip_client::{ops, Client};

fn json_flag() -> Arg {
    Arg::new("json")
        .long("json")
        .action(ArgAction::SetTrue)
        .help("Print JSON")
}

fn keys_arg(what: &'static str) -> Arg {
    Arg::new("args")
        .value_name("KEY | PKG VERSION [+VARIANT…]")
        .num_args(1..)
        .required(true)
        .allow_hyphen_values(false)
        .help(what)
}

pub fn cache_command() -> Command {
    let remote = Command::new("remote")
        .about("Configure and use the remote cache")
        .subcommand_required(true)
        .subcommand(
            Command::new("config")
                .about("Set remote cache options (stored in $XDG_CONFIG_HOME/nip/remote-cache.json, mode 0600)")
                .arg(Arg::new("url").long("url").value_name("URL").help("Server URL"))
                .arg(Arg::new("api-key").long("api-key").value_name("KEY").help("API key (Bearer token)"))
                .arg(Arg::new("enable").long("enable").action(ArgAction::SetTrue).conflicts_with("disable").help("Use the remote in builds"))
                .arg(Arg::new("disable").long("disable").action(ArgAction::SetTrue).help("Do not use the remote in builds"))
                .arg(Arg::new("timeout").long("timeout").value_name("SECS").value_parser(clap::value_parser!(u64).range(1..)).help("Per-request timeout in seconds"))
                .arg(Arg::new("ca-cert").long("ca-cert").value_name("FILE").help("PEM file of CA certificates to trust for https:// (a private CA), besides the system's; \"\" removes it"))
                .arg(Arg::new("from-env").long("from-env").action(ArgAction::SetTrue).help("For pipelines: save NIP_REMOTE_CACHE_URL, NIP_REMOTE_CACHE_API_KEY (and NIP_REMOTE_CACHE_CA_CERT when set) and enable the remote"))
                .arg(Arg::new("show").long("show").action(ArgAction::SetTrue).help("Print the effective configuration (key masked)")),
        )
        .subcommand(Command::new("status").about("Test the connection and the API key; exit 1 when unavailable").arg(json_flag()))
        .subcommand(Command::new("pull").about("Download an artifact into the local cache").arg(keys_arg("A cache key, or a package, version and variants")))
        .subcommand(Command::new("push").about("Upload local artifacts").arg(keys_arg("A cache key, or a package and version (all its local variants)")));
    Command::new("cache")
        .about("Local and remote binary cache of `nip build` results")
        .subcommand_required(true)
        .subcommand(remote)
        .subcommand(
            Command::new("list")
                .about("List local artifacts, or recent cache operations")
                .arg(
                    Arg::new("format")
                        .long("format")
                        .value_parser(["table", "simple", "json"])
                        .default_value("table")
                        .help("simple: one cache key per line"),
                )
                .arg(
                    Arg::new("recent")
                        .long("recent")
                        .action(ArgAction::SetTrue)
                        .help("Recent cache operations, newest first"),
                )
                .arg(
                    Arg::new("limit")
                        .long("limit")
                        .value_parser(clap::value_parser!(usize))
                        .default_value("20")
                        .help("How many operations --recent shows"),
                ),
        )
        .subcommand(
            Command::new("stats")
                .about("Hit rate, transfer success rates, cache size, time saved")
                .arg(json_flag()),
        )
}

pub fn build_command() -> Command {
    Command::new("build")
        .about("Build a recipe: local cache, then remote cache, then build and upload")
        .arg(
            Arg::new("pkg")
                .required(true)
                .help("Recipe name (<pkg>.toml)"),
        )
        .arg(
            Arg::new("variants")
                .num_args(0..)
                .value_name("+VARIANT")
                .help("Variants, e.g. +python+ruby or +ruby +python"),
        )
        .arg(json_flag())
        .arg(
            Arg::new("ci")
                .long("ci")
                .action(ArgAction::SetTrue)
                .conflicts_with("json")
                .help("CI output: no progress bars, one `nip-build:` summary line (hits, misses, time saved) on stderr"),
        )
        .arg(
            Arg::new("no-remote-cache")
                .long("no-remote-cache")
                .action(ArgAction::SetTrue)
                .help("Neither download from nor upload to the remote"),
        )
}

pub fn completions_command() -> Command {
    Command::new("completions")
        .about("Print a shell completion script")
        .arg(
            Arg::new("shell")
                .required(true)
                .value_parser(["bash", "zsh", "fish"]),
        )
}

fn client() -> Result<Client> {
    let dirs = Dirs::from_env();
    let config = config::load(&dirs.remote_config_file())?;
    Ok(Client::new(dirs, config))
}

fn recipes_path() -> Option<String> {
    std::env::var("NIP_RECIPES_PATH").ok()
}

fn strings(m: &ArgMatches, id: &str) -> Vec<String> {
    m.get_many::<String>(id)
        .map(|v| v.cloned().collect())
        .unwrap_or_default()
}

pub fn run_cache(m: &ArgMatches) -> Result<()> {
    match m.subcommand() {
        Some(("remote", r)) => match r.subcommand() {
            Some(("config", c)) => remote_config(c),
            Some(("status", s)) => remote_status(s.get_flag("json")),
            Some(("pull", p)) => pull(&strings(p, "args")),
            Some(("push", p)) => push(&strings(p, "args")),
            _ => unreachable!("clap enforces a subcommand"),
        },
        Some(("list", l)) => crate::client_report::list(&client()?, l),
        Some(("stats", s)) => crate::client_report::stats(&client()?, s.get_flag("json")),
        _ => unreachable!("clap enforces a subcommand"),
    }
}

fn remote_config(c: &ArgMatches) -> Result<()> {
    let dirs = Dirs::from_env();
    let path = dirs.remote_config_file();
    let mut file = config::read_file(&path)?;
    let mut changed = false;
    if let Some(u) = c.get_one::<String>("url") {
        file.url = Some(config::normalize_url(u)?);
        changed = true;
    }
    if let Some(k) = c.get_one::<String>("api-key") {
        file.api_key = Some(k.clone()).filter(|k| !k.is_empty());
        changed = true;
    }
    if c.get_flag("enable") || c.get_flag("disable") {
        file.enabled = Some(c.get_flag("enable"));
        changed = true;
    }
    if let Some(t) = c.get_one::<u64>("timeout") {
        file.timeout = Some(*t);
        changed = true;
    }
    if let Some(ca) = c.get_one::<String>("ca-cert") {
        file.ca_cert = if ca.is_empty() {
            None
        } else {
            Some(absolute(ca)?)
        };
        changed = true;
    }
    if c.get_flag("from-env") && from_env(&mut file, &config::env_snapshot())? {
        changed = true;
    }
    if changed {
        config::write_file(&path, &file)?;
        eprintln!("✅ Saved {}", path.display());
    }
    if changed && !c.get_flag("show") {
        return Ok(());
    }
    let eff = config::effective(&file, &config::env_snapshot())?;
    let p = &eff.policies;
    let show = serde_json::json!({
        "file": path,
        "url": eff.url,
        "apiKey": eff.api_key.as_deref().map(mask_key),
        "timeout": eff.timeout.as_secs(),
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
    let keys = ops::resolve_keys(&c, args, &cwd, recipes_path().as_deref(), &candidates)?;
    // `pkg version` without variants may match several artifacts: the newest one is enough.
    let key = keys.first().context("nothing to pull")?;
    let meta = ops::pull(&c, key)?;
    eprintln!("✅ Pulled {} ({} bytes)", meta.key, meta.size);
    println!("{}", c.local.artifact_path(&meta.key).display());
    Ok(())
}

fn push(args: &[String]) -> Result<()> {
    let c = client()?;
    let cwd = std::env::current_dir().context("current directory")?;
    let local = |name: &str, version: &str| {
        Ok(c.local
            .list()
            .into_iter()
            .filter(|m| m.name == name && m.version == version)
            .collect())
    };
    let keys = ops::resolve_keys(&c, args, &cwd, recipes_path().as_deref(), &local)?;
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

pub fn run_build(m: &ArgMatches) -> Result<()> {
    let ci = m.get_flag("ci");
    if ci {
        nip_client::progress::set_quiet();
    }
    let c = client()?;
    let opts = BuildOptions {
        pkg: m.get_one::<String>("pkg").cloned().unwrap_or_default(),
        variant_args: strings(m, "variants"),
        no_remote: m.get_flag("no-remote-cache"),
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
    } else if m.get_flag("json") {
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

pub fn run_completions(m: &ArgMatches, mut cli: Command) -> Result<()> {
    use clap_complete::Shell;
    let shell = match m.get_one::<String>("shell").map(String::as_str) {
        Some("bash") => Shell::Bash,
        Some("zsh") => Shell::Zsh,
        Some("fish") => Shell::Fish,
        other => bail!("unsupported shell {other:?}"),
    };
    clap_complete::generate(shell, &mut cli, "nip", &mut std::io::stdout());
    Ok(())
}
