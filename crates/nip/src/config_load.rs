//! Loading `nip serve`'s configuration, for `serve` and the commands that work on its data
//! (`keys`, `audit`, `admin`, `migrate`) alike: a flag for every setting of the table (so every
//! flag, environment variable and config key of ncps is accepted under the same name), the config
//! file and the environment, merged as in ncps: flag > config file > environment > default.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use nip_server::config::ServeConfig;
use nip_server::settings::{self, Layer, Setting, SETTINGS};

/// Adds `--config` and every server setting as a flag, so commands that work on the server's
/// data (`keys`, `audit`, `migrate`) find it exactly as `serve` does.
pub fn with_settings(cmd: Command) -> Command {
    let mut cmd = cmd.arg(crate::config_arg());
    for s in SETTINGS.iter().filter(|s| !s.flags.is_empty()) {
        cmd = cmd.arg(setting_arg(s));
    }
    cmd
}

/// Adds ncps' global flags (and `--config`) to the top-level command: ncps takes them before the
/// subcommand, and its NixOS module runs `ncps --log-level=info --otel-enabled … serve …`.
pub fn with_root_settings(cmd: Command) -> Command {
    let mut cmd = cmd.arg(crate::config_arg());
    for s in SETTINGS.iter().filter(|s| s.global) {
        // `--otel-enabled serve`: a boolean before the subcommand takes a value only after `=`
        // (as in ncps), or it would swallow the subcommand's name.
        cmd = cmd.arg(setting_arg(s).require_equals(s.boolean));
    }
    cmd
}

/// Hands the top-level flags (ncps' global flags and `--config`) to the subcommand: when any was
/// given, the command line is parsed again with their values as the defaults of the same flags
/// of every subcommand, whose own flags still win. [`load_config`] then finds them in the
/// subcommand's matches; no global state.
pub fn root_flags_to_subcommands(cli: Command, root: ArgMatches) -> ArgMatches {
    match with_root_defaults(cli, &root) {
        Some(cli) => cli.get_matches(),
        None => root,
    }
}

/// `cli` with the flags given on `root` as the subcommands' defaults; `None` when none was given.
fn with_root_defaults(cli: Command, root: &ArgMatches) -> Option<Command> {
    let defaults = root_flags(root);
    (!defaults.is_empty()).then(|| cli.mut_subcommands(|sub| with_defaults(sub, &defaults)))
}

/// The setting flags and `--config` given on `m`'s command line, by argument id.
fn root_flags(m: &ArgMatches) -> Vec<(&'static str, Vec<String>)> {
    let mut given: Vec<_> = flag_layer(m).into_iter().collect();
    if let Some(config) = m.get_one::<String>("config") {
        given.push(("config", vec![config.clone()]));
    }
    given
}

fn with_defaults(cmd: Command, defaults: &[(&'static str, Vec<String>)]) -> Command {
    cmd.mut_args(
        |arg| match defaults.iter().find(|(id, _)| arg.get_id() == *id) {
            Some((_, values)) => arg.default_values(values.clone()),
            None => arg,
        },
    )
    .mut_subcommands(|sub| with_defaults(sub, defaults))
}

fn setting_arg(s: &Setting) -> Arg {
    let mut help = format!("{} [env: {}]", s.help_text(), s.envs.join(", "));
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

/// The settings given as flags: on the command line, or before the subcommand (then they are
/// the defaults of its flags, see [`root_flags_to_subcommands`]).
fn flag_layer(m: &ArgMatches) -> Layer {
    let mut layer = Layer::new();
    for s in SETTINGS.iter().filter(|s| !s.flags.is_empty()) {
        // try_: the top-level command defines only some settings.
        let given = matches!(m.try_get_raw(s.key), Ok(Some(_)))
            && matches!(
                m.value_source(s.key),
                Some(ValueSource::CommandLine | ValueSource::DefaultValue)
            );
        if let Some(values) = given.then(|| m.get_many::<String>(s.key)).flatten() {
            layer.insert(s.key, values.cloned().collect());
        }
    }
    layer
}

/// The config file: `--config`, else `NIP_CONFIG_FILE` / `NCPS_CONFIG_FILE`, else
/// `$XDG_CONFIG_HOME/ncps/config.yaml` when it exists.
fn config_path(m: &ArgMatches, env: &HashMap<String, String>) -> Option<PathBuf> {
    if let Some(p) = m.get_one::<String>("config") {
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

/// The configuration of `serve` (or an admin command) from its matches, the config file and the
/// process environment.
pub fn load_config(m: &ArgMatches) -> anyhow::Result<ServeConfig> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let file = match config_path(m, &env) {
        Some(p) => read_config_file(&p)?,
        None => Layer::new(),
    };
    let merged = settings::merge(&[&flag_layer(m), &file, &settings::layer_from_env(&env)]);
    let mut config = ServeConfig::from_layer(&merged)?;
    config.ignored.extend(settings::ignored_ncps_envs(&env));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        with_root_settings(Command::new("nip"))
            .subcommand(with_settings(Command::new("serve")))
            .subcommand(Command::new("keys").subcommand(with_settings(Command::new("list"))))
    }

    /// As `main` does it, with `args` for the process's command line.
    fn parse(args: &[&str]) -> ArgMatches {
        let root = cli().get_matches_from(args);
        match with_root_defaults(cli(), &root) {
            Some(cli) => cli.get_matches_from(args),
            None => root,
        }
    }

    #[test]
    fn flags_before_the_subcommand_reach_it_and_its_own_flags_win() {
        let m = parse(&[
            "nip",
            "--log-level=debug",
            "--otel-enabled",
            "--config=/etc/nip.yaml",
            "serve",
            "--otel-enabled=false",
            "--cache-hostname",
            "h",
        ]);
        let serve = m.subcommand_matches("serve").unwrap();
        let layer = flag_layer(serve);
        assert_eq!(layer["log.level"], ["debug"]);
        assert_eq!(layer["opentelemetry.enabled"], ["false"]);
        assert_eq!(layer["cache.hostname"], ["h"]);
        assert_eq!(layer.len(), 3, "{layer:?}");
        let env = HashMap::new();
        assert_eq!(config_path(serve, &env), Some("/etc/nip.yaml".into()));

        let m = parse(&["nip", "--prometheus-enabled=true", "keys", "list"]);
        let list = m
            .subcommand_matches("keys")
            .and_then(|k| k.subcommand_matches("list"))
            .unwrap();
        assert_eq!(flag_layer(list)["prometheus.enabled"], ["true"]);
        let m = parse(&["nip", "serve", "--log-level", "warn"]);
        let layer = flag_layer(m.subcommand_matches("serve").unwrap());
        assert_eq!(layer.len(), 1, "{layer:?}");
    }
}
