//! deploy/docker-compose.yml, deploy/nginx.conf and deploy/.env.example (docs/deployment.md):
//! two nip instances on one database, bucket and signing key, with their settings run through the
//! real binary (`${VAR}` placeholders take the values of .env.example); the bucket job's script
//! run with a stand-in `mc`; nginx.conf run in front of two real servers; dclint on the file.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::common::*;
use crate::deploy_files::*;

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
        for secret in ["NIP_S3_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD"] {
            assert!(
                !raw.contains(&vars[secret]),
                "{what}: {secret} printed\n{raw}"
            );
        }
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
    // Shown with the password masked (which assert_given_values_took_effect checks is the given one).
    assert_eq!(
        cfg["cache.database-url"],
        nip_core::redact::redact_userinfo(&url).as_str()
    );
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
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n\
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
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
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
