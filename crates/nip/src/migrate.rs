//! `nip migrate up [--dry-run]`: applies the database migrations, for ncps users used to
//! `ncps migrate up` before starting the server. Optional: `nip serve` applies them at every start
//! (safely when several instances start together). Takes the same settings as `serve`.
use anyhow::Context;
use clap::{Args, Subcommand};
use nip_store::sql::MigrationInfo;
use nip_store::SqliteMeta;

use crate::config_load::{load_config, ServerSettings};

// `///` comments on the variants and fields are their `--help` text.
#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Apply all pending migrations to the configured database
    Up(UpArgs),
}

#[derive(Args)]
pub struct UpArgs {
    /// List the pending migrations without applying them
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

pub fn run(cmd: &MigrateCommand) -> anyhow::Result<()> {
    match cmd {
        MigrateCommand::Up(args) => up(args),
    }
}

fn line(m: &MigrationInfo) -> String {
    format!("  {:04} {}", m.version, m.description)
}

fn up(args: &UpArgs) -> anyhow::Result<()> {
    let config = load_config(&args.settings)?;
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
        if args.dry_run {
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
