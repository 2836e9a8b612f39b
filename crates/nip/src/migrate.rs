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
    /// Take over the ncps installation the configured database and storage belong to: its
    /// signing key, narinfos, NAR files and pins (`nip serve` does the same at its first start).
    /// ncps' tables and files are only read, so switching back to ncps keeps working.
    FromNcps(UpArgs),
}

#[derive(Args)]
pub struct UpArgs {
    /// Only report: list pending migrations / count what an ncps takeover would import. nip's
    /// own (empty) tables may be created; nothing of ncps' is changed
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

pub fn run(cmd: &MigrateCommand) -> anyhow::Result<()> {
    match cmd {
        MigrateCommand::Up(args) => up(args),
        MigrateCommand::FromNcps(args) => from_ncps(args),
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

fn from_ncps(args: &UpArgs) -> anyhow::Result<()> {
    use nip_server::takeover::{KeySource, Outcome};
    let config = load_config(&args.settings)?;
    let shown = nip_core::redact::redact_userinfo(&config.database_url);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let meta = SqliteMeta::connect_with(&config.database_url, 2)
            .await
            .with_context(|| format!("cannot open the database {shown}"))?;
        let blobs = nip_server::open_blobs(&config)?;
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} narinfos ({eta} left)",
            )?
            .progress_chars("=> "),
        );
        bar.set_message("importing");
        let progress = |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        };
        let outcome =
            nip_server::takeover::ncps(&config, &meta, blobs.as_ref(), args.dry_run, &progress)
                .await;
        bar.finish_and_clear();
        match outcome? {
            Outcome::NotNcps => anyhow::bail!(
                "{shown} is not an ncps database (it has no goose_db_version table): nothing to take over"
            ),
            Outcome::AlreadyImported { at } => {
                println!("{shown}: ncps' data was taken over already (at {at}, seconds since the epoch); nothing to do");
            }
            Outcome::Imported(s) => {
                let verb = if args.dry_run { "would import" } else { "imported" };
                println!("{shown}: {verb} from ncps:");
                println!("  narinfos:                  {}", s.narinfos);
                println!("  NAR files:                 {}", s.nars);
                println!("  pins:                      {}", s.pins);
                println!("  skipped, no NAR file:      {}", s.missing_nars);
                println!("  skipped, unreadable:       {}", s.invalid);
                println!("  placeholder rows (none):   {}", s.stubs);
                let key = match s.key {
                    Some(KeySource::File) => "the existing --cache-secret-key-path file",
                    Some(KeySource::Database) => "ncps' key from its database",
                    Some(KeySource::LegacyFile) => "ncps' key from its storage (config/cache.key)",
                    Some(KeySource::None) | None => "none in ncps: nip generates one at start",
                };
                println!("  signing key:               {key}");
                if let Some(pk) = s.public_key {
                    println!("  public key:                {pk}");
                }
            }
        }
        Ok(())
    })
}
