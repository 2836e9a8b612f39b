//! `nip migrate up [--dry-run]`: applies the database migrations, for ncps users used to
//! `ncps migrate up` before starting the server. Optional: `nip serve` applies them at every start
//! (safely when several instances start together). Takes the same settings as `serve`.
use anyhow::Context;
use clap::{Arg, ArgAction, ArgMatches, Command};
use nip_store::sql::MigrationInfo;
use nip_store::SqliteMeta;

use crate::config_load::{load_config, with_settings};

pub fn command() -> Command {
    Command::new("migrate")
        .about("Apply database schema migrations (nip serve also applies them at start)")
        .subcommand_required(true)
        .subcommand(with_settings(
            Command::new("up")
                .about("Apply all pending migrations to the configured database")
                .arg(
                    Arg::new("dry-run")
                        .long("dry-run")
                        .action(ArgAction::SetTrue)
                        .help("List the pending migrations without applying them"),
                ),
        ))
}

pub fn run(m: &ArgMatches) -> anyhow::Result<()> {
    match m.subcommand() {
        Some(("up", m)) => up(m),
        _ => unreachable!("clap enforces a subcommand"),
    }
}

fn line(m: &MigrationInfo) -> String {
    format!("  {:04} {}", m.version, m.description)
}

fn up(m: &ArgMatches) -> anyhow::Result<()> {
    let config = load_config(m)?;
    let url = config.database_url.clone();
    // What is printed: never the password.
    let shown = nip_core::redact::redact_userinfo(&url);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pending = SqliteMeta::pending_migrations(&url)
            .await
            .with_context(|| format!("cannot read the migration state of {shown}"))?;
        if m.get_flag("dry-run") {
            if pending.is_empty() {
                println!("{shown}: up to date, nothing to apply");
            } else {
                println!("{shown}: {} pending migration(s):", pending.len());
                for p in &pending {
                    println!("{}", line(p));
                }
            }
            return Ok(());
        }
        SqliteMeta::connect_with(&url, 1)
            .await
            .with_context(|| format!("cannot migrate the database {shown}"))?;
        if pending.is_empty() {
            println!("{shown}: up to date, nothing to apply");
        } else {
            println!("{shown}: applied {} migration(s):", pending.len());
            for p in &pending {
                println!("{}", line(p));
            }
        }
        Ok(())
    })
}
