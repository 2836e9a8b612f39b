//! Reading the deployment files in deploy/ as their tools do — Docker Compose's `${VAR}`
//! interpolation, YAML merge keys, env files, Dockerfile instructions — and checking what they
//! give `nip serve`: every flag and environment variable must be a setting nip implements, and
//! `nip serve … --print-config` must show the value given. Used by deploy_compose and deploy_docs.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use nip_server::settings::{Setting, SETTINGS};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::common::*;

pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

pub fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn parse_yaml(rel: &str, text: &str) -> Yaml {
    let mut v: Yaml = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"));
    // Compose's `<<: *anchor` merge keys, as Docker Compose applies them.
    v.apply_merge().unwrap();
    v
}

pub fn s(v: &Yaml) -> String {
    match v {
        Yaml::String(x) => x.clone(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

pub fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|seq| seq.iter().map(s).collect())
        .unwrap_or_default()
}

/// `KEY=value` lines of an env file, as Docker Compose and systemd read them (no quoting used).
pub fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Docker Compose's interpolation: `$$` is a literal `$`; `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`, `${VAR:?error}` and `${VAR?error}` take `vars`. Returns the text and the
/// variables it uses, each with whether it must be set (no default).
pub fn interpolate(
    text: &str,
    vars: &BTreeMap<String, String>,
) -> (String, BTreeMap<String, bool>) {
    let mut out = String::new();
    let mut used = BTreeMap::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let body = rest
            .strip_prefix('{')
            .and_then(|r| r.find('}').map(|end| &r[..end]))
            .unwrap_or_else(|| panic!("unsupported `$` at {:?}", &rest[..rest.len().min(30)]));
        rest = &rest[body.len() + 2..];
        let name_end = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let (name, op) = body.split_at(name_end);
        let value = vars
            .get(name)
            .filter(|v| !v.is_empty() || !op.starts_with(':'));
        let (required, v) = if let Some(default) = op.strip_prefix(":-").or(op.strip_prefix('-')) {
            (false, value.cloned().unwrap_or_else(|| default.to_string()))
        } else if op.is_empty() || op.starts_with(":?") || op.starts_with('?') {
            let v = value.unwrap_or_else(|| panic!("${{{name}}} is required and not set"));
            (true, v.clone())
        } else {
            panic!("unsupported interpolation ${{{body}}}")
        };
        used.insert(name.to_string(), required);
        out.push_str(&v);
    }
    out.push_str(rest);
    (out, used)
}

/// `nip serve ARGS --print-config` with exactly `env` (nothing inherited but PATH): the raw
/// output and its JSON.
pub fn print_config(args: &[String], env: &BTreeMap<String, String>) -> (String, Json) {
    let home = tempfile::tempdir().unwrap();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_nip"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path())
            .envs(env)
            .args(args)
            .arg("--print-config"),
    );
    let cfg = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (out, cfg)
}

/// The setting a flag (without `--`) or environment variable names.
pub fn setting_by(name: &str, flag: bool) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| {
            if flag {
                s.flags.contains(&name)
            } else {
                s.envs.contains(&name)
            }
        })
        .unwrap_or_else(|| {
            let kind = if flag {
                "flag --"
            } else {
                "environment variable "
            };
            panic!("{kind}{name} is no `nip serve` setting")
        })
}

/// The settings that `args` (after `serve`) and `env` give, as (setting, value) pairs.
pub fn given_settings(
    args: &[String],
    env: &BTreeMap<String, String>,
) -> Vec<(&'static Setting, String)> {
    let mut given = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i]
            .strip_prefix("--")
            .unwrap_or_else(|| panic!("not a flag: {:?}", args[i]));
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg, None),
        };
        let setting = setting_by(name, true);
        let value = match inline {
            Some(v) => v,
            None if setting.boolean => "true".into(),
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .unwrap_or_else(|| panic!("--{name} has no value"))
            }
        };
        given.push((setting, value));
        i += 1;
    }
    for (k, v) in env {
        given.push((setting_by(k, false), v.clone()));
    }
    given
}

/// Each given setting is implemented (not accepted-and-ignored) and `--print-config` shows the
/// given value (secrets masked, and absent from the output).
pub fn assert_given_values_took_effect(
    what: &str,
    given: &[(&'static Setting, String)],
    raw: &str,
    cfg: &Json,
) {
    assert_eq!(
        cfg["ignored"],
        serde_json::json!([]),
        "{what}: ignored settings\n{raw}"
    );
    for (setting, value) in given {
        assert!(
            setting.not_implemented.is_none(),
            "{what}: {} is not implemented",
            setting.key
        );
        let shown = match setting.key.strip_prefix("cache.storage.s3.") {
            Some(field) => &cfg["cache.storage.s3"][field],
            None => &cfg[setting.key],
        };
        let ok = match shown {
            Json::String(m) if m == "***" => !raw.contains(value.as_str()),
            // A database URL is shown with its password masked.
            Json::String(x) if x.contains("***@") => {
                x == &nip_core::redact::redact_userinfo(value) && !raw.contains(value.as_str())
            }
            Json::String(x) => x == value,
            Json::Bool(b) => value.parse::<bool>().ok() == Some(*b),
            Json::Number(n) => &n.to_string() == value,
            Json::Array(items) => value.split(',').all(|v| {
                // Upstream URLs are shown normalised, with a trailing slash.
                let norm = |x: &str| x.trim().trim_end_matches('/').to_string();
                items.iter().any(|i| i.as_str().map(norm) == Some(norm(v)))
            }),
            Json::Null | Json::Object(_) => false,
        };
        assert!(
            ok,
            "{what}: {} = {value:?} shows as {shown}\n{raw}",
            setting.key
        );
    }
}

/// Runs `nip ARGS --print-config` (ARGS start with `serve`) with `env` and checks that every
/// setting given took effect; returns the raw output and its JSON.
pub fn check_serve(what: &str, args: &[String], env: &BTreeMap<String, String>) -> (String, Json) {
    assert_eq!(args[0], "serve", "{what}: {args:?}");
    let given = given_settings(&args[1..], env);
    let (raw, cfg) = print_config(args, env);
    assert_given_values_took_effect(what, &given, &raw, &cfg);
    (raw, cfg)
}

/// The image's entrypoint after the program (`serve`), then `extra` (compose `command`,
/// Kubernetes `args`).
pub fn image_args(extra: &Yaml) -> Vec<String> {
    entrypoint()[1..]
        .iter()
        .cloned()
        .chain(strings(extra))
        .collect()
}

/// The Dockerfile's instructions, continuation lines joined and comments dropped.
pub fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(t);
                let (op, rest) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
                out.push((op.to_uppercase(), rest.trim().to_string()));
                cur.clear();
            }
        }
    }
    out
}

/// The image's `ENTRYPOINT` (exec form).
pub fn entrypoint() -> Vec<String> {
    let ep = dockerfile()
        .into_iter()
        .rfind(|(op, _)| op == "ENTRYPOINT")
        .expect("ENTRYPOINT")
        .1;
    serde_json::from_str(&ep).expect("ENTRYPOINT in exec form")
}

/// Runs `tool ARGS` from scripts/install-deploy-linters.sh's directory or PATH; false when the
/// tool is missing and not required.
pub fn lint(tool: &str, args: &[&str], test: &str) -> bool {
    let installed = Path::new(
        &std::env::var("NIP_DEPLOY_LINTERS").unwrap_or_else(|_| "/tmp/nip-deploy-linters".into()),
    )
    .join("bin")
    .join(tool);
    let exe = if installed.exists() {
        installed
    } else if Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success())
    {
        PathBuf::from(tool)
    } else {
        tool_missing(tool, test, "scripts/install-deploy-linters.sh");
        return false;
    };
    let out = run_ok(Command::new(exe).args(args).current_dir(deploy_dir()));
    eprintln!(
        "{test}: {tool} passed{}",
        if out.trim().is_empty() {
            String::new()
        } else {
            format!(":\n{out}")
        }
    );
    true
}
