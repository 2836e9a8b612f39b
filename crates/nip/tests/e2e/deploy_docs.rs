//! The deployment files in deploy/ (explained in docs/deployment.md) hold together, and every
//! `nip serve` setting they give — the compose file's `command` and `environment`, the Kubernetes
//! Deployment's `args` and `env` (with its ConfigMap and example Secret), the systemd unit's
//! `ExecStart` and `Environment` — is run through the real binary with `--print-config`, which must
//! accept each one and show the value the file means. `${VAR}` placeholders take the values of
//! deploy/.env.example. The Dockerfile's HEALTHCHECK command is run against a real server.
//! Linters run on the files: hadolint, kubernetes-validate, dclint (scripts/install-deploy-linters.sh)
//! and systemd-analyze; under CI=true or NIP_REQUIRE_TOOLS a missing one is a failure.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use nip_server::settings::{Setting, SETTINGS};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::common::*;

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse_yaml(rel: &str, text: &str) -> Yaml {
    let mut v: Yaml = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"));
    // Compose's `<<: *anchor` merge keys, as Docker Compose applies them.
    v.apply_merge().unwrap();
    v
}

fn s(v: &Yaml) -> String {
    match v {
        Yaml::String(x) => x.clone(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|seq| seq.iter().map(s).collect())
        .unwrap_or_default()
}

/// `KEY=value` lines of an env file, as Docker Compose and systemd read them (no quoting used).
fn env_file(text: &str) -> BTreeMap<String, String> {
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
fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> (String, BTreeMap<String, bool>) {
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
fn print_config(args: &[String], env: &BTreeMap<String, String>) -> (String, Json) {
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
fn setting_by(name: &str, flag: bool) -> &'static Setting {
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
fn given_settings(
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
fn assert_given_values_took_effect(
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
fn check_serve(what: &str, args: &[String], env: &BTreeMap<String, String>) -> (String, Json) {
    assert_eq!(args[0], "serve", "{what}: {args:?}");
    let given = given_settings(&args[1..], env);
    let (raw, cfg) = print_config(args, env);
    assert_given_values_took_effect(what, &given, &raw, &cfg);
    (raw, cfg)
}

/// The image's entrypoint after the program (`serve`), then `extra` (compose `command`,
/// Kubernetes `args`).
fn image_args(extra: &Yaml) -> Vec<String> {
    entrypoint()[1..]
        .iter()
        .cloned()
        .chain(strings(extra))
        .collect()
}

/// The Dockerfile's instructions, continuation lines joined and comments dropped.
fn dockerfile() -> Vec<(String, String)> {
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
fn entrypoint() -> Vec<String> {
    let ep = dockerfile()
        .into_iter()
        .filter(|(op, _)| op == "ENTRYPOINT")
        .last()
        .expect("ENTRYPOINT")
        .1;
    serde_json::from_str(&ep).expect("ENTRYPOINT in exec form")
}

/// Runs `tool ARGS` from scripts/install-deploy-linters.sh's directory or PATH; false when the
/// tool is missing and not required.
fn lint(tool: &str, args: &[&str], test: &str) -> bool {
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

#[test]
fn deploy_compose_two_instances_share_database_bucket_and_key_and_nip_accepts_their_settings() {
    let test = "deploy compose";
    let vars = env_file(&read(".env.example"));
    let (text, used) = interpolate(&read("docker-compose.yml"), &vars);
    // .env.example sets every variable that must be set, and nothing the compose file ignores.
    for (name, required) in &used {
        assert!(
            !required || vars.contains_key(name),
            "{name} is required but not in .env.example"
        );
    }
    for name in vars.keys() {
        assert!(
            used.contains_key(name),
            ".env.example sets {name}, which docker-compose.yml never uses"
        );
    }
    let doc = parse_yaml("docker-compose.yml", &text);
    let services = doc["services"].as_mapping().expect("services");
    let svc = &doc["services"];
    let names: Vec<String> = services.keys().map(s).collect();
    for want in ["postgres", "minio", "create-bucket", "lb"] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} service in {names:?}"
        );
    }
    let nips: Vec<(String, &Yaml)> = services
        .iter()
        .filter(|(_, svc)| svc["build"]["dockerfile"].as_str() == Some("deploy/Dockerfile"))
        .map(|(n, svc)| (s(n), svc))
        .collect();
    assert_eq!(
        nips.len(),
        2,
        "two nip instances built from deploy/Dockerfile"
    );

    let mut configs = Vec::new();
    for (name, svc) in &nips {
        let what = format!("{test}: {name}");
        let env: BTreeMap<String, String> = svc["environment"]
            .as_mapping()
            .expect("environment as a mapping")
            .iter()
            .map(|(k, v)| (s(k), s(v)))
            .collect();
        let (raw, cfg) = check_serve(&what, &image_args(&svc["command"]), &env);
        // Not POSTGRES_PASSWORD: --print-config shows the database URL with its password.
        assert!(
            !raw.contains(&vars["NIP_S3_SECRET_ACCESS_KEY"]),
            "{what}: S3 secret printed\n{raw}"
        );
        // Only nginx is reached from outside; the instances' port is not published.
        assert!(svc.get("ports").is_none(), "{what}: publishes a port");
        // The signing key's directory is the shared named volume.
        let key_dir = Path::new(cfg["cache.secret-key-path"].as_str().unwrap())
            .parent()
            .unwrap()
            .to_owned();
        let volumes = strings(&svc["volumes"]);
        let key_volume = volumes
            .iter()
            .find_map(|v| v.strip_suffix(&format!(":{}", key_dir.display())))
            .unwrap_or_else(|| panic!("{what}: no volume at {}: {volumes:?}", key_dir.display()));
        assert!(
            doc["volumes"].get(key_volume).is_some(),
            "{what}: {key_volume} is not a named volume"
        );
        configs.push((key_volume.to_string(), cfg));
    }
    let (a, b) = (&configs[0], &configs[1]);
    for key in [
        "cache.database-url",
        "cache.storage.s3",
        "cache.secret-key-path",
        "cache.hostname",
    ] {
        assert_eq!(a.1[key], b.1[key], "{test}: the instances differ in {key}");
    }
    assert_eq!(a.0, b.0, "{test}: the instances use different key volumes");
    let cfg = &a.1;

    // The database URL names the postgres service with its user, password and database.
    let pg = &svc["postgres"]["environment"];
    let url = format!(
        "postgres://{}:{}@postgres:5432/{}",
        s(&pg["POSTGRES_USER"]),
        s(&pg["POSTGRES_PASSWORD"]),
        s(&pg["POSTGRES_DB"])
    );
    assert_eq!(cfg["cache.database-url"], url.as_str());
    assert_eq!(s(&pg["POSTGRES_PASSWORD"]), vars["POSTGRES_PASSWORD"]);
    // The bucket and access key are the ones create-bucket makes, on the minio service.
    let s3 = &cfg["cache.storage.s3"];
    assert_eq!(s3["bucket"], vars["NIP_S3_BUCKET"].as_str());
    assert_eq!(s3["endpoint"], "http://minio:9000");
    assert_eq!(s3["force-path-style"], true);
    assert_eq!(s3["access-key-id"], vars["NIP_S3_ACCESS_KEY_ID"].as_str());
    assert_eq!(cfg["server.addr"], ":8501");

    // create-bucket's script, run with a stand-in `mc` that records its arguments: the `$$`
    // escapes reach the shell as `$`, and it makes that bucket and that key.
    let job = &svc["create-bucket"];
    assert_eq!(strings(&job["entrypoint"]), ["/bin/sh", "-ec"]);
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("nip-policy.json");
    let script = strings(&job["command"])
        .concat()
        .replace("/tmp/nip-policy.json", policy.to_str().unwrap());
    let log = tmp.path().join("mc.log");
    let mc = tmp.path().join("mc");
    std::fs::write(
        &mc,
        format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&mc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let job_env: BTreeMap<String, String> = job["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (s(k), s(v)))
        .collect();
    run_ok(
        Command::new("/bin/sh")
            .args(["-ec", script.as_str()])
            .env("PATH", format!("{}:/usr/bin:/bin", tmp.path().display()))
            .envs(&job_env)
            .current_dir(tmp.path()),
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    let bucket = &vars["NIP_S3_BUCKET"];
    let key_id = &vars["NIP_S3_ACCESS_KEY_ID"];
    assert!(
        calls.contains(&format!(
            "alias set store http://minio:9000 {} {}",
            vars["MINIO_ROOT_USER"], vars["MINIO_ROOT_PASSWORD"]
        )),
        "{calls}"
    );
    assert!(
        calls.contains(&format!("mb --ignore-existing store/{bucket}")),
        "{calls}"
    );
    assert!(
        calls.contains(&format!(
            "admin user add store {key_id} {}",
            vars["NIP_S3_SECRET_ACCESS_KEY"]
        )),
        "{calls}"
    );
    assert!(
        calls.contains(&format!(
            "admin policy attach store nip-bucket --user {key_id}"
        )),
        "{calls}"
    );
    // The key's policy: the bucket and its objects, nothing else.
    let policy: Json = serde_json::from_str(&std::fs::read_to_string(&policy).unwrap()).unwrap();
    assert_eq!(
        policy["Statement"][0]["Resource"],
        serde_json::json!([
            format!("arn:aws:s3:::{bucket}"),
            format!("arn:aws:s3:::{bucket}/*")
        ])
    );

    // nginx balances over exactly the nip services, on the port they listen on.
    let nginx = read("nginx.conf");
    let upstreams: Vec<&str> = nginx
        .lines()
        .filter(|l| !l.trim_end().ends_with('{'))
        .filter_map(|l| l.trim().strip_prefix("server "))
        .map(|l| l.split_whitespace().next().unwrap().trim_end_matches(';'))
        .collect();
    let want: Vec<String> = nips.iter().map(|(n, _)| format!("{n}:8501")).collect();
    assert_eq!(upstreams, want, "nginx.conf upstreams");
    let lb = &svc["lb"];
    let port = strings(&lb["ports"]).concat();
    let listen = nginx
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen "))
        .expect("listen")
        .trim_end_matches(';');
    assert!(
        port.ends_with(&format!(":{listen}")),
        "lb publishes {port}, nginx listens on {listen}"
    );
    assert!(strings(&lb["volumes"])
        .iter()
        .any(|v| v.starts_with("./nginx.conf:")));
    assert!(
        nginx.contains("proxy_request_buffering off;") && nginx.contains("proxy_buffering off;")
    );

    // The Compose schema and its checks. `no-unbound-port-interfaces` cannot see that the
    // interface is given, as ${NIP_LISTEN}, with 127.0.0.1 as the default.
    lint(
        "dclint",
        // The file first: --disable-rule takes every word after it.
        &[
            "docker-compose.yml",
            "-q",
            "--disable-rule",
            "no-unbound-port-interfaces",
        ],
        test,
    );
}

#[test]
fn deploy_k8s_deployment_runs_two_replicas_with_probes_and_nip_accepts_its_settings() {
    let test = "deploy k8s";
    let dir = deploy_dir().join("k8s");
    let mut docs: BTreeMap<String, Yaml> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = format!("k8s/{}", path.file_name().unwrap().to_str().unwrap());
        let doc = parse_yaml(&rel, &read(&rel));
        assert_eq!(doc["metadata"]["name"], "nip", "{rel}");
        docs.insert(s(&doc["kind"]), doc);
    }
    let kinds: Vec<&str> = docs.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Secret",
            "Service"
        ]
    );
    let deploy = &docs["Deployment"];
    assert_eq!(deploy["spec"]["replicas"], 2);
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for selector in [
        &deploy["spec"]["selector"]["matchLabels"],
        &docs["Service"]["spec"]["selector"],
        &docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ] {
        assert_eq!(
            selector, labels,
            "a selector does not match the pods' labels"
        );
    }
    let pod = &deploy["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    // Ready only when the database and the bucket answer; alive while the process serves HTTP.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/v1/health");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/healthz");
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"], c["ports"][0]["name"],
            "{probe} port"
        );
    }
    assert_eq!(
        docs["Service"]["spec"]["ports"][0]["targetPort"],
        c["ports"][0]["name"]
    );
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    // The image's user (USER in the Dockerfile) is the pod's.
    let user = dockerfile()
        .into_iter()
        .filter(|(op, _)| op == "USER")
        .last()
        .unwrap()
        .1;
    assert_eq!(
        user,
        format!(
            "{}:{}",
            s(&pod["securityContext"]["runAsUser"]),
            s(&pod["securityContext"]["runAsGroup"])
        )
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);

    // The container's environment: the ConfigMap (envFrom) and the Secret's keys (env).
    let secret = &docs["Secret"]["stringData"];
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for from in c["envFrom"].as_sequence().unwrap() {
        assert_eq!(from["configMapRef"]["name"], "nip");
        for (k, v) in docs["ConfigMap"]["data"].as_mapping().unwrap() {
            env.insert(s(k), s(v));
        }
    }
    for e in c["env"].as_sequence().unwrap() {
        let value = match (&e["value"], &e["valueFrom"]["secretKeyRef"]) {
            (Yaml::String(v), _) => v.clone(),
            (_, r) if r.is_mapping() => {
                assert_eq!(r["name"], "nip");
                s(&secret[s(&r["key"]).as_str()])
            }
            other => panic!("unsupported env entry {other:?}"),
        };
        env.insert(s(&e["name"]), value);
    }
    assert!(
        c["command"].is_null(),
        "the image's entrypoint (nip serve) runs"
    );
    let (_, cfg) = check_serve(test, &image_args(&c["args"]), &env);
    assert_eq!(
        cfg["cache.database-url"],
        secret["CACHE_DATABASE_URL"].as_str().unwrap()
    );
    assert_eq!(
        cfg["cache.storage.s3"]["bucket"],
        docs["ConfigMap"]["data"]["CACHE_STORAGE_S3_BUCKET"]
            .as_str()
            .unwrap()
    );
    // The port it listens on is the container port.
    assert_eq!(
        cfg["server.addr"],
        format!(":{}", s(&c["ports"][0]["containerPort"])).as_str()
    );

    // The signing key and temp path are mounted where the flags say.
    let mounts: BTreeMap<String, String> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (s(&m["name"]), s(&m["mountPath"])))
        .collect();
    let volumes: BTreeMap<String, &Yaml> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (s(&v["name"]), v))
        .collect();
    assert_eq!(cfg["cache.temp-path"], mounts["tmp"].as_str());
    assert!(volumes["tmp"]["emptyDir"].is_mapping());
    let key_volume = &volumes["signing-key"]["secret"];
    assert_eq!(key_volume["secretName"], "nip");
    let item = &key_volume["items"][0];
    assert!(
        secret.get(s(&item["key"]).as_str()).is_some(),
        "the Secret has no {:?}",
        item["key"]
    );
    assert_eq!(
        cfg["cache.secret-key-path"],
        format!("{}/{}", mounts["signing-key"], s(&item["path"])).as_str()
    );

    // The manifests against the Kubernetes API schemas, unknown fields rejected.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| format!("k8s/{}", e.unwrap().file_name().to_str().unwrap()))
        .collect();
    names.sort();
    let mut args = vec!["--strict", "--quiet"];
    args.extend(names.iter().map(String::as_str));
    lint("kubernetes-validate", &args, test);
}

#[test]
fn deploy_systemd_unit_runs_the_embedded_defaults_hardened_and_nip_accepts_its_settings() {
    let test = "deploy systemd";
    let unit = read("nip.service");
    let mut service: Vec<(String, String)> = Vec::new();
    let mut section = String::new();
    for line in unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == "[Service]" {
            let (k, v) = line.split_once('=').unwrap();
            service.push((k.to_string(), v.to_string()));
        }
    }
    let get = |key: &str| -> Vec<String> {
        service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1);
    assert!(
        !exec[0].contains(['"', '\'', '$']),
        "ExecStart is split on spaces here"
    );
    let words: Vec<String> = exec[0].split_whitespace().map(String::from).collect();
    assert_eq!(words[0], "/usr/local/bin/nip");
    assert_eq!(words[1], "serve");
    let env: BTreeMap<String, String> = get("Environment")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|a| {
            let (k, v) = a.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let (_, cfg) = check_serve(test, &words[1..], &env);
    // The embedded defaults, in the state directory systemd makes for the service.
    let state = format!("/var/lib/{}", get("StateDirectory")[0]);
    assert_eq!(cfg["cache.storage.local"], state.as_str());
    assert_eq!(
        cfg["cache.database-url"],
        format!("sqlite:{state}/db/db.sqlite").as_str()
    );
    assert_eq!(
        cfg["cache.secret-key-path"],
        format!("{state}/secret-key").as_str()
    );
    assert_eq!(cfg["cache.storage.s3"], Json::Null);
    assert_eq!(get("WorkingDirectory"), [state.as_str()]);
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(get(key), [want], "{key}");
    }
    // nip reads the host name there: the unit must not hide it.
    assert!(get("ProcSubset").is_empty());

    if tool_available("systemd-analyze", test) {
        // verify checks that ExecStart's program exists: point it at the binary under test.
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("nip.service");
        std::fs::write(
            &copy,
            unit.replace("/usr/local/bin/nip", env!("CARGO_BIN_EXE_nip")),
        )
        .unwrap();
        let copy = copy.to_str().unwrap();
        let out = run(Command::new("systemd-analyze").args(["verify", copy]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify:\n{stderr}"
        );
        // The exposure score of `systemd-analyze security` (0 = locked down, 10 = none): at
        // most 2.0, "OK" on its scale.
        let out = run(Command::new("systemd-analyze").args([
            "security",
            "--offline=yes",
            "--threshold=20",
            copy,
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "systemd-analyze security:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{test}: {}", text.lines().last().unwrap_or(""));
    }
}

#[test]
fn deploy_dockerfile_builds_nip_in_two_stages_runs_as_non_root_and_its_healthcheck_works() {
    let test = "deploy Dockerfile";
    let ins = dockerfile();
    let froms: Vec<&str> = ins
        .iter()
        .filter(|(op, _)| op == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with(" AS build"),
        "{froms:?}"
    );
    assert!(
        froms[1].starts_with("debian:") && froms[1].contains("-slim"),
        "{froms:?}"
    );
    let runs: String = ins
        .iter()
        .filter(|(op, _)| op == "RUN")
        .map(|(_, r)| r.as_str())
        .collect();
    assert!(
        runs.contains("cargo build --release --locked -p nip"),
        "{runs}"
    );
    let last = |op: &str| {
        ins.iter()
            .filter(|(o, _)| o == op)
            .last()
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    let user = last("USER");
    assert!(
        !user.is_empty() && !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
    assert_eq!(last("EXPOSE"), "8501");
    let ep = entrypoint();
    assert_eq!(ep, ["/usr/local/bin/nip", "serve"]);
    assert!(
        last("COPY").starts_with("--from=build ") && last("COPY").ends_with(&ep[0]),
        "{}",
        last("COPY")
    );
    let ignore = read("Dockerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "the build context leaves out target/"
    );

    // HEALTHCHECK: the command Docker runs, against a real server, then against a closed port.
    let hc = last("HEALTHCHECK");
    let cmd: Vec<String> =
        serde_json::from_str(&hc[hc.find("CMD ").expect("HEALTHCHECK CMD") + 4..]).unwrap();
    assert_eq!(cmd[..2], ["bash", "-c"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = start_nip(&data, &[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let check = |server_addr: &str| {
        run(Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("SERVER_ADDR", server_addr))
        .status
        .success()
    };
    assert!(
        check(&addr),
        "HEALTHCHECK fails against a healthy server at {addr}"
    );
    let closed = format!("127.0.0.1:{}", free_port());
    assert!(!check(&closed), "HEALTHCHECK passes with nothing listening");

    lint("hadolint", &["Dockerfile"], test);
}

/// deploy/nginx.conf, as the compose file mounts it, in front of two real nip servers (their
/// compose names replaced by loopback addresses): requests reach both, and with one stopped they
/// still succeed on the other.
#[test]
fn deploy_nginx_conf_balances_over_two_nip_servers_and_skips_a_stopped_one() {
    let test = "deploy nginx";
    let nginx = if Path::new("/usr/sbin/nginx").exists() {
        PathBuf::from("/usr/sbin/nginx")
    } else if tool_available("nginx", test) {
        PathBuf::from("nginx")
    } else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut a = start_nip(&tmp.path().join("a"), &[]);
    let b = start_nip(&tmp.path().join("b"), &[]);
    let port = free_port();
    let conf = read("nginx.conf");
    let mut site = conf.clone();
    for (from, to) in [
        (
            "nip-a:8501",
            a.url.trim_start_matches("http://").to_string(),
        ),
        (
            "nip-b:8501",
            b.url.trim_start_matches("http://").to_string(),
        ),
        ("listen 8080;", format!("listen 127.0.0.1:{port};")),
    ] {
        assert!(conf.contains(from), "nginx.conf has no {from:?}");
        site = site.replace(from, &to);
    }
    // The official image's nginx.conf includes conf.d/ inside `http`; here the same, with every
    // path nginx writes under the temp directory.
    let d = tmp.path().display();
    std::fs::write(tmp.path().join("site.conf"), site).unwrap();
    let main = format!(
        "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n\
         access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
         include {d}/site.conf;\n}}\n"
    );
    std::fs::write(tmp.path().join("nginx.conf"), main).unwrap();
    let conf_path = tmp.path().join("nginx.conf");
    let error_log = tmp.path().join("error.log");
    run_ok(
        Command::new(&nginx)
            .arg("-t")
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(&error_log),
    );
    let _lb = KillOnDrop(
        Command::new(&nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(&error_log)
            .spawn()
            .expect("start nginx"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_http_ok(
        &format!("{url}/healthz"),
        std::time::Duration::from_secs(10),
    );
    // Each server generated its own signing key, so /pubkey tells which one answered.
    let keys: std::collections::HashSet<Vec<u8>> = (0..6)
        .map(|_| {
            let (status, body) = http_get(&format!("{url}/pubkey")).expect("GET /pubkey");
            assert_eq!(status, 200);
            body
        })
        .collect();
    assert_eq!(keys.len(), 2, "requests did not reach both servers");
    a.child.kill();
    for _ in 0..4 {
        let got = http_get(&format!("{url}/nix-cache-info")).map(|(s, _)| s);
        assert_eq!(got, Some(200), "a GET failed with one server stopped");
    }
}
