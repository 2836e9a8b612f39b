//! The `nip` command: `nip serve` runs the cache server; `nip keys` / `nip audit` manage it.
mod admin;
mod client_cmd;
mod client_report;
mod config_load;
mod migrate;
mod path_info;
mod recipe_cmd;
mod serve;
mod telemetry;
mod tls_cmd;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config_load::RootSettings;

#[derive(Parser)]
#[command(
    name = "nip",
    version,
    about = "nip: a remote binary cache for Nix and build artifacts"
)]
struct Cli {
    // ncps' global flags and `--config`, accepted before the subcommand.
    #[command(flatten)]
    root: RootSettings,
    #[command(subcommand)]
    command: Command,
}

// `///` comments on the variants are their `--help` text. A command of commands given alone
// (`nip keys`) is a usage error that names them, not the help: `arg_required_else_help = false`.
#[derive(Subcommand)]
enum Command {
    /// Run the cache server (Nix binary cache proxy and artifact cache)
    // `s`: ncps' alias of `serve`.
    #[command(alias = "s")]
    Serve(serve::ServeArgs),
    /// Manage API keys of the server's database
    #[command(subcommand, arg_required_else_help = false)]
    Keys(admin::KeysCommand),
    /// Read the audit log: writes, deletes, key changes and authentication failures, newest first
    Audit(admin::AuditArgs),
    /// Apply database schema migrations (nip serve also applies them at start)
    #[command(subcommand, arg_required_else_help = false)]
    Migrate(migrate::MigrateCommand),
    /// Maintain the server's store: garbage collection, statistics, pins, scrubbing, provenance
    #[command(subcommand, arg_required_else_help = false)]
    Admin(admin::AdminCommand),
    /// Local and remote binary cache of `nip build` results
    #[command(subcommand, arg_required_else_help = false)]
    Cache(client_cmd::CacheCommand),
    /// Build a recipe: local cache, then remote cache, then build and upload
    Build(client_cmd::BuildArgs),
    /// Start a recipe for `nip build`
    #[command(subcommand, arg_required_else_help = false)]
    Recipe(recipe_cmd::RecipeCommand),
    /// Print a shell completion script
    Completions(client_cmd::CompletionsArgs),
    /// TLS helpers for `nip serve --tls-cert/--tls-key`
    #[command(subcommand, arg_required_else_help = false)]
    Tls(tls_cmd::TlsCommand),
}

/// For `value_names`: none, so the help shows the argument's id as its value (`--scope <scope>`)
/// and zsh completions describe no value.
const NO_VALUE_NAME: [&str; 0] = [];

impl Cli {
    /// Parses `args` (the process's command line); ncps' global flags given before the
    /// subcommand reach it (see [`config_load::parse_with_root_flags`]).
    fn try_parse_args(args: &[std::ffi::OsString]) -> Result<Cli, clap::Error> {
        config_load::parse_with_root_flags(args, |cli: &Cli| &cli.root)
    }
}

/// A reader that stops early (`nip cache list | head`) ends a command quietly with status 0, as
/// it would a tool killed by SIGPIPE: printing to a closed stdout or stderr is no error to report.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Whether an error is a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> std::process::ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let cli = Cli::try_parse_args(&args).unwrap_or_else(|e| e.exit());
    // The server writes to sockets and its log, never to a reader of its output.
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_broken_pipe();
    }
    let result = match &cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Keys(cmd) => admin::run_keys(cmd),
        Command::Audit(args) => admin::run_audit(args),
        Command::Migrate(cmd) => migrate::run(cmd),
        Command::Admin(cmd) => admin::run_admin(cmd),
        Command::Cache(cmd) => client_cmd::run_cache(cmd),
        Command::Build(args) => client_cmd::run_build(args),
        Command::Recipe(cmd) => recipe_cmd::run(cmd),
        Command::Completions(args) => client_cmd::run_completions(args, Cli::command()),
        Command::Tls(cmd) => tls_cmd::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nip: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        Cli::try_parse_args(&args)
    }

    #[test]
    fn command_lines_become_commands() {
        use clap::error::ErrorKind;
        let cli = parse(&["nip", "--log-level=info", "--otel-enabled", "serve"]).unwrap();
        assert!(matches!(cli.command, Command::Serve(_)));
        // ncps' alias of `serve`.
        let cli = parse(&["nip", "--log-level=info", "s", "--cache-hostname", "h"]).unwrap();
        assert!(matches!(cli.command, Command::Serve(_)));
        let cli = parse(&["nip", "keys", "create", "--name", "k", "--scope", "write"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys(admin::KeysCommand::Create(_))
        ));
        let cli = parse(&["nip", "--config=/c.yaml", "admin", "path-info", "x"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Admin(admin::AdminCommand::PathInfo(_))
        ));
        let cli = parse(&["nip", "cache", "remote", "pull", "pkg", "1.0"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cache(client_cmd::CacheCommand::Remote(
                client_cmd::RemoteCommand::Pull(_)
            ))
        ));
        // `nip` alone prints the help; a command of commands alone is a usage error.
        let kind = |args: &[&str]| parse(args).err().map(|e| e.kind());
        assert_eq!(
            kind(&["nip"]),
            Some(ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand)
        );
        assert_eq!(kind(&["nip", "keys"]), Some(ErrorKind::MissingSubcommand));
        assert_eq!(
            kind(&["nip", "keys", "create", "--name", "k", "--scope", "root"]),
            Some(ErrorKind::InvalidValue)
        );
        assert_eq!(
            kind(&["nip", "completions", "powershell"]),
            Some(ErrorKind::InvalidValue)
        );
    }
}
