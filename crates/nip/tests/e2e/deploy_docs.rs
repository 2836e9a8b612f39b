//! The Kubernetes manifests (deploy/k8s/), the systemd unit (deploy/nip.service) and the
//! Dockerfile (docs/deployment.md): their structure, and every `nip serve` setting they give —
//! Deployment `args` and `env` (with the ConfigMap and example Secret), unit `ExecStart` and
//! `Environment` — run through the real binary with `--print-config`; the image's HEALTHCHECK
//! command against a real server. Linters: kubernetes-validate, systemd-analyze, hadolint
//! (scripts/install-deploy-linters.sh); under CI=true or NIP_REQUIRE_TOOLS a missing one fails.
use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::common::*;
use crate::deploy_files::*;

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
        .rfind(|(op, _)| op == "USER")
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
        nip_core::redact::redact_userinfo(secret["CACHE_DATABASE_URL"].as_str().unwrap()).as_str()
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
            .rfind(|(o, _)| o == op)
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
