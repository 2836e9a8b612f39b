//! Loading `nip serve`'s configuration, for `serve` and the commands that work on its data
//! (`keys`, `audit`, `admin`, `migrate`) alike: a flag for every setting of the table (so every
//! flag, environment variable and config key of ncps is accepted under the same name), the config
//! file and the environment, merged as in ncps: flag > config file > environment > default.
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches, Parser};
use nip_server::config::ServeConfig;
use nip_server::settings::{self, Layer, Setting, SETTINGS};

/// The server settings given as flags, and `--config`: flattened (`#[command(flatten)]`) into
/// every command that reads the server's configuration (`serve`, `keys`, `audit`, `migrate`,
/// `admin`), so they find it exactly as `serve` does. Its flags are generated from the settings
/// table, hence the hand-written [`clap::Args`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerSettings {
    /// The settings given as flags, by setting key (with those given before the subcommand, see
    /// [`parse_with_root_flags`]).
    pub flags: Layer,
    /// `--config`.
    pub config: Option<PathBuf>,
}

impl clap::Args for ServerSettings {
    fn augment_args(cmd: Command) -> Command {
        with_settings(cmd)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        with_settings(cmd)
    }
}

impl FromArgMatches for ServerSettings {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(ServerSettings {
            flags: flag_layer(m),
            config: m
                .try_get_one::<String>("config")
                .ok()
                .flatten()
                .map(PathBuf::from),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        let given = ServerSettings::from_arg_matches(m)?;
        self.flags.extend(given.flags);
        if given.config.is_some() {
            self.config = given.config;
        }
        Ok(())
    }
}

/// ncps' global flags (and `--config`), given before the subcommand: ncps takes them there, and
/// its NixOS module runs `ncps --log-level=info --otel-enabled … serve …`. Flattened into the
/// top-level command; [`parse_with_root_flags`] hands them to the subcommand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootSettings(pub ServerSettings);

impl clap::Args for RootSettings {
    fn augment_args(cmd: Command) -> Command {
        with_root_settings(cmd)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        with_root_settings(cmd)
    }
}

impl FromArgMatches for RootSettings {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        ServerSettings::from_arg_matches(m).map(RootSettings)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
}

/// Adds `--config` and every server setting as a flag.
fn with_settings(cmd: Command) -> Command {
    let mut cmd = cmd.arg(config_arg());
    for s in SETTINGS.iter().filter(|s| !s.flags.is_empty()) {
        cmd = cmd.arg(setting_arg(s));
    }
    cmd
}

/// Adds ncps' global flags and `--config` to the top-level command.
fn with_root_settings(cmd: Command) -> Command {
    let mut cmd = cmd.arg(config_arg());
    for s in SETTINGS.iter().filter(|s| s.global) {
        // `--otel-enabled serve`: a boolean before the subcommand takes a value only after `=`
        // (as in ncps), or it would swallow the subcommand's name.
        cmd = cmd.arg(setting_arg(s).require_equals(s.boolean));
    }
    cmd
}

/// The `--config` argument of the commands that read the server configuration.
fn config_arg() -> Arg {
    Arg::new("config")
        .long("config")
        .value_name("FILE")
        .action(ArgAction::Set)
        .help("Config file (YAML, TOML or JSON) [env: NIP_CONFIG_FILE, NCPS_CONFIG_FILE]")
}

/// Parses the command line `args` into `P`, whose [`RootSettings`] `root` returns. When flags
/// were given before the subcommand, the command line is parsed again with their values as the
/// defaults of the same flags of every subcommand, whose own flags still win: the subcommand's
/// [`ServerSettings`] then holds them, and [`load_config`] finds them there; no global state.
pub fn parse_with_root_flags<P: Parser>(
    args: &[OsString],
    root: fn(&P) -> &RootSettings,
) -> Result<P, clap::Error> {
    let parsed = P::try_parse_from(args)?;
    let Some(cmd) = root_flags_to_subcommands(P::command(), root(&parsed)) else {
        return Ok(parsed);
    };
    let m = cmd.try_get_matches_from(args)?;
    P::from_arg_matches(&m).map_err(|e| e.format(&mut P::command()))
}

/// `cli` with the flags given before the subcommand as the defaults of its subcommands' flags;
/// `None` when none was given.
fn root_flags_to_subcommands(cli: Command, root: &RootSettings) -> Option<Command> {
    let mut defaults: Vec<(&str, Vec<String>)> = root.0.flags.clone().into_iter().collect();
    if let Some(config) = &root.0.config {
        defaults.push(("config", vec![config.to_string_lossy().into_owned()]));
    }
    (!defaults.is_empty()).then(|| cli.mut_subcommands(|sub| with_defaults(sub, &defaults)))
}

fn with_defaults(cmd: Command, defaults: &[(&str, Vec<String>)]) -> Command {
    cmd.mut_args(
        |arg| match defaults.iter().find(|(id, _)| arg.get_id() == *id) {
            Some((_, values)) => arg.default_values(values.clone()),
            None => arg,
        },
    )
    .mut_subcommands(|sub| with_defaults(sub, defaults))
}

fn setting_arg(s: &Setting) -> Arg {
    let mut help = s.help_text();
    if !s.envs.is_empty() {
        help.push_str(&format!(" [env: {}]", s.envs.join(", ")));
    }
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
/// the defaults of its flags, see [`parse_with_root_flags`]).
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
fn config_path(settings: &ServerSettings, env: &HashMap<String, String>) -> Option<PathBuf> {
    if let Some(p) = &settings.config {
        return Some(p.clone());
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

/// The configuration of `serve` (or an admin command) from its flags, the config file and the
/// process environment.
pub fn load_config(given: &ServerSettings) -> anyhow::Result<ServeConfig> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let file = match config_path(given, &env) {
        Some(p) => read_config_file(&p)?,
        None => Layer::new(),
    };
    let merged = settings::merge(&[&given.flags, &file, &settings::layer_from_env(&env)]);
    Ok(ServeConfig::from_layer(&merged)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        root: RootSettings,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        Serve {
            #[command(flatten)]
            settings: ServerSettings,
        },
        #[command(subcommand)]
        Keys(Keys),
    }

    #[derive(Subcommand)]
    enum Keys {
        List {
            #[command(flatten)]
            settings: ServerSettings,
        },
    }

    /// As `main` does it, with `args` for the process's command line.
    fn parse(args: &[&str]) -> ServerSettings {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        match parse_with_root_flags::<Cli>(&args, |c| &c.root)
            .unwrap()
            .command
        {
            Cmd::Serve { settings } | Cmd::Keys(Keys::List { settings }) => settings,
        }
    }

    #[test]
    fn flags_before_the_subcommand_reach_it_and_its_own_flags_win() {
        let serve = parse(&[
            "nip",
            "--log-level=debug",
            "--otel-enabled",
            "--config=/etc/nip.yaml",
            "serve",
            "--otel-enabled=false",
            "--cache-hostname",
            "h",
        ]);
        let layer = &serve.flags;
        assert_eq!(layer["log.level"], ["debug"]);
        assert_eq!(layer["opentelemetry.enabled"], ["false"]);
        assert_eq!(layer["cache.hostname"], ["h"]);
        assert_eq!(layer.len(), 3, "{layer:?}");
        let env = HashMap::new();
        assert_eq!(config_path(&serve, &env), Some("/etc/nip.yaml".into()));

        let list = parse(&["nip", "--prometheus-enabled=true", "keys", "list"]);
        assert_eq!(list.flags["prometheus.enabled"], ["true"]);
        let layer = parse(&["nip", "serve", "--log-level", "warn"]).flags;
        assert_eq!(layer.len(), 1, "{layer:?}");
        // The subcommand's `--config` wins too.
        let serve = parse(&["nip", "--config=/a.yaml", "serve", "--config", "/b.yaml"]);
        assert_eq!(serve.config, Some("/b.yaml".into()));
        assert!(serve.flags.is_empty());
    }

    /// As urfave/cli (ncps): one slice flag value holds several, comma-separated.
    #[test]
    fn one_upstream_flag_may_list_several() {
        let serve = parse(&[
            "nip",
            "serve",
            "--cache-upstream-url",
            "https://a.example,https://b.example",
            "--cache-upstream-url=https://c.example",
            "--cache-upstream-public-key",
            "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
        ]);
        let config = ServeConfig::from_layer(&serve.flags).unwrap();
        let urls: Vec<&str> = config.upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://a.example/",
                "https://b.example/",
                "https://c.example/"
            ]
        );
    }

    #[test]
    fn the_test_cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
