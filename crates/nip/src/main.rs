//! The `nip` command: `nip serve` runs the cache server; `nip keys` / `nip audit` manage it.
mod admin;
mod client_cmd;
mod client_report;
mod config_load;
mod migrate;
mod path_info;
mod serve;
mod telemetry;
mod tls_cmd;

use clap::{Arg, ArgAction, Command};

fn cli() -> Command {
    config_load::with_root_settings(Command::new("nip"))
        .version(env!("CARGO_PKG_VERSION"))
        .about("nip: a remote binary cache for Nix and build artifacts")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(serve::command())
        .subcommand(admin::keys_command())
        .subcommand(admin::audit_command())
        .subcommand(migrate::command())
        .subcommand(admin::admin_command())
        .subcommand(client_cmd::cache_command())
        .subcommand(client_cmd::build_command())
        .subcommand(client_cmd::completions_command())
        .subcommand(tls_cmd::command())
}

fn main() -> std::process::ExitCode {
    let matches = config_load::root_flags_to_subcommands(cli(), cli().get_matches());
    let result = match matches.subcommand() {
        Some(("serve", m)) => serve::run(m),
        Some(("keys", m)) => admin::run_keys(m),
        Some(("audit", m)) => admin::run_audit(m),
        Some(("migrate", m)) => migrate::run(m),
        Some(("admin", m)) => admin::run_admin(m),
        Some(("cache", m)) => client_cmd::run_cache(m),
        Some(("build", m)) => client_cmd::run_build(m),
        Some(("completions", m)) => client_cmd::run_completions(m, cli()),
        Some(("tls", m)) => tls_cmd::run(m),
        _ => unreachable!("clap enforces a subcommand"),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nip: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Adds the `--config` argument shared by commands that read the server configuration.
pub fn config_arg() -> Arg {
    Arg::new("config")
        .long("config")
        .value_name("FILE")
        .action(ArgAction::Set)
        .help("Config file (YAML, TOML or JSON) [env: NIP_CONFIG_FILE, NCPS_CONFIG_FILE]")
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        super::cli().debug_assert();
    }
}
