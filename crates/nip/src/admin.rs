//! Commands run on the server machine against the server's database: `nip keys` (create, list,
//! revoke API keys), `nip audit` (read the audit log) and `nip admin` (gc, stats, pins,
//! path-info, verify). They take the same settings as `serve` ([`ServerSettings`]).
use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use nip_server::auth::{generate_token, hash_token, Scope};
use nip_store::CreateKey;
use nip_store::{
    ApiKeyRecord, ArtifactIndex, AuditEntry, AuditLog, GcIndex, KeyStore, MetaStore, SqliteMeta,
};

use crate::config_load::{load_config, ServerSettings};
use crate::path_info::PathInfoArgs;

// `///` comments on the variants and fields are their `--help` text.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints its token once, alone on the last line of stdout
    Create(CreateKeyArgs),
    /// List keys (never their tokens)
    List(ListKeysArgs),
    /// Revoke a key; a running server refuses it from its next request
    Revoke(RevokeKeyArgs),
}

#[derive(Args)]
pub struct CreateKeyArgs {
    /// Key name (unique; shown in the audit log)
    #[arg(long, value_name = "NAME")]
    name: String,
    /// read, write (includes read) or admin (includes both)
    #[arg(long, value_enum, value_names = crate::NO_VALUE_NAME)]
    scope: ScopeArg,
    /// Limit the key to artifact keys starting with P
    #[arg(long, value_name = "P")]
    prefix: Option<String>,
    /// Expire after this long, e.g. 30d or 12h
    // A duration is checked when the command runs: its error is nip's, not a usage error.
    #[arg(long, value_name = "DURATION")]
    expires: Option<String>,
    #[command(flatten)]
    settings: ServerSettings,
}

/// `--scope`: [`Scope`] as a command-line value.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScopeArg {
    Read,
    Write,
    Admin,
}

impl From<ScopeArg> for Scope {
    fn from(s: ScopeArg) -> Scope {
        match s {
            ScopeArg::Read => Scope::Read,
            ScopeArg::Write => Scope::Write,
            ScopeArg::Admin => Scope::Admin,
        }
    }
}

#[derive(Args)]
pub struct ListKeysArgs {
    /// Print JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

#[derive(Args)]
pub struct RevokeKeyArgs {
    #[arg(value_name = "NAME")]
    name: String,
    #[command(flatten)]
    settings: ServerSettings,
}

#[derive(Args)]
pub struct AuditArgs {
    /// How far back, e.g. 1h, 7d
    #[arg(long, value_name = "DURATION", default_value = "1d")]
    since: String,
    /// Only entries of this key
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    #[arg(long, value_name = "N", default_value_t = 1000)]
    limit: i64,
    /// Print JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Clean crash leftovers and evict least recently used entries down to --cache-max-size
    Gc(GcArgs),
    /// Store size and entry counts
    Stats(StatsArgs),
    /// Keep an entry whatever eviction decides (a store path hash: with its closure)
    Pin(EntryArgs),
    /// Let eviction consider an entry again
    Unpin(EntryArgs),
    /// Show where a cached store path came from: upstream and verifying key, or uploader and
    /// vouching key
    PathInfo(PathInfoArgs),
    /// Scrub the store: re-hash every stored NAR and artifact against its recorded SHA-256; exits
    /// 1 when anything is bad
    Verify(VerifyArgs),
}

impl AdminCommand {
    fn settings(&self) -> &ServerSettings {
        match self {
            AdminCommand::Gc(a) => &a.settings,
            AdminCommand::Stats(a) => &a.settings,
            AdminCommand::Pin(a) | AdminCommand::Unpin(a) => &a.settings,
            AdminCommand::PathInfo(a) => &a.settings,
            AdminCommand::Verify(a) => &a.settings,
        }
    }
}

#[derive(Args)]
pub struct GcArgs {
    /// Only say what would be removed
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

#[derive(Args)]
pub struct StatsArgs {
    /// Print JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

#[derive(Args)]
pub struct EntryArgs {
    /// An artifact key or a store path hash
    #[arg(value_name = "KEY")]
    key: String,
    #[command(flatten)]
    settings: ServerSettings,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Remove bad entries with their narinfos (proxied paths are fetched again on their next
    /// request)
    #[arg(long)]
    repair: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn open_db(settings: &ServerSettings) -> anyhow::Result<SqliteMeta> {
    let config = load_config(settings)?;
    SqliteMeta::connect(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot open the database {}",
                nip_core::redact::redact_userinfo(&config.database_url)
            )
        })
}

fn time(t: Option<i64>) -> String {
    t.map(nip_core::api::rfc3339).unwrap_or_else(|| "-".into())
}

fn audit_key_change(action: &str, name: &str, result: &str) -> AuditEntry {
    AuditEntry {
        at: nip_store::unix_now(),
        key_name: Some(name.to_string()),
        remote_addr: Some("local-cli".into()),
        action: action.into(),
        target: Some(name.to_string()),
        result: result.into(),
        ..Default::default()
    }
}

pub fn run_keys(cmd: &KeysCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match cmd {
            KeysCommand::Create(args) => {
                let db = open_db(&args.settings).await?;
                let name = &args.name;
                if name.is_empty() || name.len() > 100 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    bail!("--name must be 1-100 characters without spaces");
                }
                let scope = Scope::from(args.scope);
                let now = nip_store::unix_now();
                let expires_at = match &args.expires {
                    Some(d) => {
                        let d = nip_server::config::parse_duration(d)
                            .filter(|d| !d.is_zero())
                            .with_context(|| format!("--expires {d:?}: expected a duration like 30d or 12h"))?;
                        Some(now + d.as_secs() as i64)
                    }
                    None => None,
                };
                let rec = ApiKeyRecord {
                    name: name.clone(),
                    scope: scope.as_str().into(),
                    prefix: args.prefix.clone(),
                    created_at: now,
                    expires_at,
                    revoked_at: None,
                };
                let token = generate_token();
                match db.create_key(&rec, &hash_token(&token)).await? {
                    CreateKey::Created => {}
                    CreateKey::NameTaken => {
                        bail!("a key named {name:?} already exists (revoked keys keep their names): choose another name")
                    }
                }
                db.audit(&audit_key_change("key-create", name, &format!("created scope={}", scope.as_str()))).await?;
                println!(
                    "Created key {name:?}: scope {}, prefix {}, expires {}. The token is shown only now:",
                    scope.as_str(),
                    rec.prefix.as_deref().unwrap_or("-"),
                    time(expires_at)
                );
                println!("{token}");
                Ok(())
            }
            KeysCommand::List(args) => {
                let keys = open_db(&args.settings).await?.list_keys().await?;
                let now = nip_store::unix_now();
                let status = |k: &ApiKeyRecord| match (k.revoked_at, k.expires_at) {
                    (Some(_), _) => "revoked",
                    (None, Some(e)) if e <= now => "expired",
                    _ => "active",
                };
                if args.json {
                    let v: Vec<_> = keys
                        .iter()
                        .map(|k| {
                            serde_json::json!({"name": k.name, "scope": k.scope, "prefix": k.prefix,
                                "createdAt": time(Some(k.created_at)), "expiresAt": k.expires_at.map(nip_core::api::rfc3339),
                                "revokedAt": k.revoked_at.map(nip_core::api::rfc3339), "status": status(k)})
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{:<24} {:<6} {:<16} {:<21} {:<21} STATUS", "NAME", "SCOPE", "PREFIX", "CREATED", "EXPIRES");
                    for k in &keys {
                        println!(
                            "{:<24} {:<6} {:<16} {:<21} {:<21} {}",
                            k.name,
                            k.scope,
                            k.prefix.as_deref().unwrap_or("-"),
                            time(Some(k.created_at)),
                            time(k.expires_at),
                            status(k)
                        );
                    }
                }
                Ok(())
            }
            KeysCommand::Revoke(args) => {
                let db = open_db(&args.settings).await?;
                let name = &args.name;
                if !db.revoke_key(name, nip_store::unix_now()).await? {
                    bail!("no active key named {name:?} (see `nip keys list`)");
                }
                db.audit(&audit_key_change("key-revoke", name, "revoked")).await?;
                println!("Revoked key {name:?}");
                Ok(())
            }
        }
    })
}

pub fn run_audit(args: &AuditArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let since = &args.since;
        let since = nip_server::config::parse_duration(since).with_context(|| format!("--since {since:?}: expected a duration like 1d"))?;
        let from = nip_store::unix_now() - since.as_secs() as i64;
        let entries = open_db(&args.settings)
            .await?
            .audit_since(from, args.key.as_deref(), args.limit)
            .await?;
        if args.json {
            let v: Vec<_> = entries
                .iter()
                .map(|e| {
                    serde_json::json!({"time": time(Some(e.at)), "key": e.key_name, "remoteAddr": e.remote_addr,
                        "action": e.action, "target": e.target, "size": e.size, "sha256": e.sha256, "result": e.result})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("{:<21} {:<18} {:<16} {:<18} {:<12} TARGET", "TIME", "KEY", "REMOTE", "ACTION", "RESULT");
            for e in &entries {
                println!(
                    "{:<21} {:<18} {:<16} {:<18} {:<12} {}",
                    time(Some(e.at)),
                    e.key_name.as_deref().unwrap_or("-"),
                    e.remote_addr.as_deref().unwrap_or("-"),
                    e.action,
                    e.result,
                    e.target.as_deref().unwrap_or("-")
                );
            }
        }
        Ok(())
    })
}

/// A bar of bytes hashed, on stderr when it is a terminal (hidden otherwise, so logs stay clean).
fn verify_bar() -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "verifying [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// One line of the human report for a finding.
fn finding_line(f: &nip_store::Finding) -> String {
    use nip_store::Problem;
    let detail = match f.problem {
        Problem::Corrupt => format!(
            "sha256 {} recorded, the bytes hash to {}",
            f.expected_sha256.as_deref().unwrap_or("?"),
            f.actual_sha256.as_deref().unwrap_or("?")
        ),
        Problem::SizeMismatch => format!(
            "{} bytes recorded, {} stored",
            f.expected_size.map_or("?".into(), |s| s.to_string()),
            f.actual_size.map_or("?".into(), |s| s.to_string())
        ),
        Problem::Missing => "the row is there, the stored bytes are not".into(),
        Problem::OrphanRow => "uploaded narinfo whose NAR is not stored".into(),
        Problem::Unreadable => format!("cannot read it: {}", f.error.as_deref().unwrap_or("?")),
    };
    let removed = if f.removed { " [removed]" } else { "" };
    format!(
        "{:<13} {:<8} {}: {detail}{removed}",
        f.problem.as_str(),
        f.kind.as_str(),
        f.id
    )
}

/// `nip admin verify`: prints the findings and totals (or JSON), records the run in the audit log,
/// and fails when anything was bad, so scripts and cron jobs notice.
async fn run_verify(
    db: &SqliteMeta,
    config: &nip_server::config::ServeConfig,
    repair: bool,
    json: bool,
) -> anyhow::Result<()> {
    let blobs = nip_server::open_blobs(config)?;
    let bar = verify_bar();
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = nip_store::verify::verify(db, blobs.as_ref(), repair, &progress).await;
    bar.finish_and_clear();
    // Stopped midway: what was repaired so far stays repaired; a new run starts over.
    let report = report.context(
        "the scrub stopped before it finished (check the database and storage settings, then run it again)",
    )?;
    let summary = report.summary();
    db.audit(&AuditEntry {
        at: nip_store::unix_now(),
        remote_addr: Some("local-cli".into()),
        action: "store-verify".into(),
        target: Some(if repair { "repair" } else { "check" }.into()),
        size: i64::try_from(report.bytes).ok(),
        result: summary.clone(),
        ..Default::default()
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for f in &report.findings {
            println!("{}", finding_line(f));
        }
        println!(
            "checked {} NARs, {} artifacts ({} hashed): {}",
            report.nars,
            report.artifacts,
            nip_server::status::human_bytes(i64::try_from(report.bytes).unwrap_or(i64::MAX)),
            report.problems()
        );
    }
    if report.is_clean() {
        return Ok(());
    }
    let unreadable = report.count(nip_store::Problem::Unreadable);
    let hint = if unreadable > 0 {
        format!(
            "; {unreadable} could not be read and were kept: check the storage and run it again"
        )
    } else {
        String::new()
    };
    if repair {
        bail!(
            "found {} bad entries and removed {} ({} narinfos, {} artifacts){hint}; proxied paths are fetched again from the upstream on their next request, uploaded ones must be uploaded again",
            report.findings.len(),
            report.removed(),
            report.removed_narinfos.len(),
            report.removed_artifacts.len()
        );
    }
    bail!(
        "found {} bad entries{hint}; run `nip admin verify --repair` to remove them",
        report.findings.len()
    );
}

pub fn run_admin(cmd: &AdminCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let config = load_config(cmd.settings())?;
        let db = SqliteMeta::connect(&config.database_url)
            .await
            .with_context(|| format!("cannot open the database {}", nip_core::redact::redact_userinfo(&config.database_url)))?;
        match cmd {
            AdminCommand::Gc(args) => {
                let blobs = nip_server::open_blobs(&config)?;
                let dry = args.dry_run;
                let verb = if dry { "would remove" } else { "removed" };
                let r = nip_store::gc::reconcile(&db, blobs.as_ref(), nip_store::gc::GRACE, dry).await?;
                println!(
                    "crash leftovers: {verb} {} rows without bytes, {} stored files without rows, {} half-written files",
                    r.rows_without_bytes, r.bytes_without_rows, r.partial_files
                );
                if r.young_partial_files > 0 {
                    println!(
                        "left {} half-written files changed in the last {} minutes: a running server may be writing them (a later run removes them if not)",
                        r.young_partial_files,
                        nip_store::gc::GRACE.as_secs() / 60
                    );
                }
                match config.max_size {
                    Some(max) => {
                        let s = nip_store::gc::evict(&db, blobs.as_ref(), max, dry).await?;
                        println!(
                            "eviction: {verb} {} NARs ({} narinfos), {} artifacts, {}; store now {} of {}",
                            s.nars,
                            s.narinfos,
                            s.artifacts,
                            nip_server::status::human_bytes(s.bytes),
                            nip_server::status::human_bytes(s.usage_after),
                            nip_server::status::human_bytes(max as i64)
                        );
                    }
                    None => println!("eviction: no --cache-max-size set, nothing to evict"),
                }
            }
            AdminCommand::Stats(args) => {
                let u = db.usage().await?;
                let pins = db.pins().await?.len();
                if args.json {
                    let v = serde_json::json!({"bytes": u.bytes, "maxBytes": config.max_size, "nars": u.nars,
                        "narinfos": u.narinfos, "artifacts": u.artifacts, "pins": pins});
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let limit = config.max_size.map(|m| nip_server::status::human_bytes(m as i64)).unwrap_or_else(|| "no limit".into());
                    println!("store:     {} of {limit}", nip_server::status::human_bytes(u.bytes));
                    println!("NARs:      {}", u.nars);
                    println!("narinfos:  {}", u.narinfos);
                    println!("artifacts: {}", u.artifacts);
                    println!("pinned:    {pins}");
                }
            }
            AdminCommand::Pin(EntryArgs { key, .. }) => {
                let known = db.get_artifact(key).await?.is_some() || db.get_narinfo(key).await?.is_some();
                if !known {
                    bail!("{key:?} is neither an artifact key nor a cached store path hash");
                }
                db.pin(key, nip_store::unix_now()).await?;
                println!("pinned {key}");
            }
            AdminCommand::Unpin(EntryArgs { key, .. }) => {
                if !db.unpin(key).await? {
                    bail!("{key:?} is not pinned");
                }
                println!("unpinned {key}");
            }
            AdminCommand::PathInfo(args) => crate::path_info::run(&db, args).await?,
            AdminCommand::Verify(args) => return run_verify(&db, &config, args.repair, args.json).await,
        }
        Ok(())
    })
}
