//! Commands run on the server machine against the server's database: `nip keys` (create, list,
//! revoke API keys) and `nip audit` (read the audit log). They take the same settings as `serve`.
use anyhow::{bail, Context};
use clap::{Arg, ArgAction, ArgMatches, Command};
use nip_server::auth::{generate_token, hash_token, Scope};
use nip_store::{
    ApiKeyRecord, ArtifactIndex, AuditEntry, AuditLog, GcIndex, KeyStore, MetaStore, SqliteMeta,
};

use crate::config_load::{load_config, with_settings};

pub fn keys_command() -> Command {
    let name = || {
        Arg::new("name")
            .long("name")
            .value_name("NAME")
            .required(true)
            .help("Key name (unique; shown in the audit log)")
    };
    Command::new("keys")
        .about("Manage API keys of the server's database")
        .subcommand_required(true)
        .subcommand(with_settings(
            Command::new("create")
                .about("Create a key; prints its token once, alone on the last line of stdout")
                .arg(name())
                .arg(
                    Arg::new("scope")
                        .long("scope")
                        .required(true)
                        .value_parser(["read", "write", "admin"])
                        .help("read, write (includes read) or admin (includes both)"),
                )
                .arg(
                    Arg::new("prefix")
                        .long("prefix")
                        .value_name("P")
                        .help("Limit the key to artifact keys starting with P"),
                )
                .arg(
                    Arg::new("expires")
                        .long("expires")
                        .value_name("DURATION")
                        .help("Expire after this long, e.g. 30d or 12h"),
                ),
        ))
        .subcommand(with_settings(
            Command::new("list")
                .about("List keys (never their tokens)")
                .arg(json_arg()),
        ))
        .subcommand(with_settings(
            Command::new("revoke")
                .about("Revoke a key; a running server refuses it from its next request")
                .arg(Arg::new("name").required(true).value_name("NAME")),
        ))
}

pub fn audit_command() -> Command {
    with_settings(
        Command::new("audit")
            .about("Read the audit log: writes, deletes, key changes and authentication failures, newest first")
            .arg(Arg::new("since").long("since").value_name("DURATION").default_value("1d").help("How far back, e.g. 1h, 7d"))
            .arg(Arg::new("key").long("key").value_name("NAME").help("Only entries of this key"))
            .arg(Arg::new("limit").long("limit").value_name("N").default_value("1000").value_parser(clap::value_parser!(i64)))
            .arg(json_arg()),
    )
}

fn json_arg() -> Arg {
    Arg::new("json")
        .long("json")
        .action(ArgAction::SetTrue)
        .help("Print JSON")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn open_db(m: &ArgMatches) -> anyhow::Result<SqliteMeta> {
    let config = load_config(m)?;
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

pub fn run_keys(m: &ArgMatches) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match m.subcommand() {
            Some(("create", m)) => {
                let db = open_db(m).await?;
                let name = m.get_one::<String>("name").expect("required");
                if name.is_empty() || name.len() > 100 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    bail!("--name must be 1-100 characters without spaces");
                }
                let scope = Scope::parse(m.get_one::<String>("scope").expect("required")).expect("clap checked");
                let now = nip_store::unix_now();
                let expires_at = match m.get_one::<String>("expires") {
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
                    prefix: m.get_one::<String>("prefix").cloned(),
                    created_at: now,
                    expires_at,
                    revoked_at: None,
                };
                let token = generate_token();
                if let Err(e) = db.create_key(&rec, &hash_token(&token)).await {
                    if db.list_keys().await?.iter().any(|k| &k.name == name) {
                        bail!("a key named {name:?} already exists (revoked keys keep their names): choose another name");
                    }
                    return Err(e.into());
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
            Some(("list", m)) => {
                let keys = open_db(m).await?.list_keys().await?;
                let now = nip_store::unix_now();
                let status = |k: &ApiKeyRecord| match (k.revoked_at, k.expires_at) {
                    (Some(_), _) => "revoked",
                    (None, Some(e)) if e <= now => "expired",
                    _ => "active",
                };
                if m.get_flag("json") {
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
            Some(("revoke", m)) => {
                let db = open_db(m).await?;
                let name = m.get_one::<String>("name").expect("required");
                if !db.revoke_key(name, nip_store::unix_now()).await? {
                    bail!("no active key named {name:?} (see `nip keys list`)");
                }
                db.audit(&audit_key_change("key-revoke", name, "revoked")).await?;
                println!("Revoked key {name:?}");
                Ok(())
            }
            _ => unreachable!("clap enforces a subcommand"),
        }
    })
}

pub fn run_audit(m: &ArgMatches) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let since = m.get_one::<String>("since").expect("has default");
        let since = nip_server::config::parse_duration(since).with_context(|| format!("--since {since:?}: expected a duration like 1d"))?;
        let from = nip_store::unix_now() - since.as_secs() as i64;
        let entries = open_db(m)
            .await?
            .audit_since(from, m.get_one::<String>("key").map(String::as_str), *m.get_one::<i64>("limit").expect("has default"))
            .await?;
        if m.get_flag("json") {
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

pub fn admin_command() -> Command {
    let key = || {
        Arg::new("key")
            .required(true)
            .value_name("KEY")
            .help("An artifact key or a store path hash")
    };
    Command::new("admin")
        .about("Maintain the server's store: garbage collection, statistics, pins, scrubbing, provenance")
        .subcommand_required(true)
        .subcommand(with_settings(
            Command::new("gc")
                .about("Clean crash leftovers and evict least recently used entries down to --cache-max-size")
                .arg(Arg::new("dry-run").long("dry-run").action(ArgAction::SetTrue).help("Only say what would be removed")),
        ))
        .subcommand(with_settings(Command::new("stats").about("Store size and entry counts").arg(json_arg())))
        .subcommand(with_settings(Command::new("pin").about("Keep an entry whatever eviction decides").arg(key())))
        .subcommand(with_settings(Command::new("unpin").about("Let eviction consider an entry again").arg(key())))
        .subcommand(with_settings(crate::path_info::command()))
        .subcommand(with_settings(
            Command::new("verify")
                .about("Scrub the store: re-hash every stored NAR and artifact against its recorded SHA-256; exits 1 when anything is bad")
                .arg(Arg::new("repair").long("repair").action(ArgAction::SetTrue).help(
                    "Remove bad entries with their narinfos (proxied paths are fetched again on their next request)",
                ))
                .arg(json_arg()),
        ))
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

pub fn run_admin(m: &ArgMatches) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (name, m) = m.subcommand().expect("clap enforces a subcommand");
        let config = load_config(m)?;
        let db = SqliteMeta::connect(&config.database_url)
            .await
            .with_context(|| format!("cannot open the database {}", nip_core::redact::redact_userinfo(&config.database_url)))?;
        match name {
            "gc" => {
                let blobs = nip_server::open_blobs(&config)?;
                let dry = m.get_flag("dry-run");
                let verb = if dry { "would remove" } else { "removed" };
                let r = nip_store::gc::reconcile(&db, blobs.as_ref(), dry).await?;
                println!(
                    "crash leftovers: {verb} {} rows without bytes, {} stored files without rows, {} half-written files",
                    r.rows_without_bytes, r.bytes_without_rows, r.partial_files
                );
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
            "stats" => {
                let u = db.usage().await?;
                let pins = db.pins().await?.len();
                if m.get_flag("json") {
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
            "pin" => {
                let key = m.get_one::<String>("key").expect("required");
                let known = db.get_artifact(key).await?.is_some() || db.get_narinfo(key).await?.is_some();
                if !known {
                    bail!("{key:?} is neither an artifact key nor a cached store path hash");
                }
                db.pin(key, nip_store::unix_now()).await?;
                println!("pinned {key}");
            }
            "unpin" => {
                let key = m.get_one::<String>("key").expect("required");
                if !db.unpin(key).await? {
                    bail!("{key:?} is not pinned");
                }
                println!("unpinned {key}");
            }
            "path-info" => crate::path_info::run(&db, m).await?,
            "verify" => return run_verify(&db, &config, m.get_flag("repair"), m.get_flag("json")).await,
            _ => unreachable!("clap enforces a subcommand"),
        }
        Ok(())
    })
}
