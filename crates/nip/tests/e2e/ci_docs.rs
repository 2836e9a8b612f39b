//! The CI examples in docs/ci/ (shown in docs/ci.md) are valid YAML, and every `nip` command in
//! them is run here, as written, by the pipeline roles they describe: main with the read-write
//! key, a pull request with the read-only key, a fork without secrets. Only the install step is
//! skipped. If a command in the docs changes, this test runs the new one.
use std::path::Path;
use std::process::Command;

use crate::client_env::*;
use crate::common::*;
use crate::tls_https::{start_https, TestPki};

fn yaml(name: &str) -> serde_yaml::Value {
    let path = repo_root().join("docs/ci").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Shell steps without the install step (the test uses the binary it built).
fn without_install(steps: Vec<String>) -> Vec<String> {
    steps
        .into_iter()
        .filter(|s| !s.trim_start().starts_with("cargo install"))
        .collect()
}

/// The `nip …` command lines in the steps.
fn nip_lines(steps: &[String]) -> Vec<String> {
    steps
        .iter()
        .flat_map(|s| s.lines())
        .map(str::trim)
        .filter(|l| l.starts_with("nip "))
        .map(String::from)
        .collect()
}

/// Runs `script` with `sh -e` on machine `m`, with the test's `nip` first on PATH.
fn sh(m: &Machine, script: &str, env: &[(&str, &str)]) -> (bool, String) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_nip")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("sh");
    c.arg("-ec")
        .arg(script)
        .current_dir(&m.root)
        .env("PATH", path);
    // The machine's HOME/XDG directories and recipe path, as `Machine::cmd` sets them.
    for (k, v) in m.cmd(&[]).get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    for key in [
        "NIP_CACHE_KEY_RW",
        "NIP_CACHE_KEY_RO",
        "CI_COMMIT_BRANCH",
        "CI_DEFAULT_BRANCH",
    ] {
        c.env_remove(key);
    }
    c.envs(env.iter().copied());
    let out = run(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn ci_examples_parse_and_their_nip_commands_work_for_main_pull_requests_and_forks() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::new(tmp.path());
    let (cert, key, _) = pki.issue("server", &["127.0.0.1"]);
    let data = tmp.path().join("server-data");
    let rw = create_key(&data, "ci-main", "write", &[]);
    let ro = create_key(&data, "ci-pr", "read", &[]);
    let server = start_https(&data, &pki.ca_pem, &cert, &key, &DUMMY_UPSTREAM);
    let recipes = write_recipes(tmp.path());
    let ca = pki.ca_pem.to_str().unwrap();
    let expected = [
        "nip cache remote config --from-env",
        "nip build hello +python --ci",
        "nip cache stats",
    ];

    // GitHub Actions: one job, its steps' `run:` scripts, the key chosen by an expression.
    let gh = yaml("github-actions.yml");
    let job = &gh["jobs"]["build"];
    let key_expr = job["env"]["NIP_REMOTE_CACHE_API_KEY"].as_str().unwrap();
    assert!(
        key_expr.contains("secrets.NIP_CACHE_KEY_RW")
            && key_expr.contains("secrets.NIP_CACHE_KEY_RO")
    );
    let steps = without_install(
        job["steps"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|s| s["run"].as_str().map(String::from))
            .collect(),
    );
    assert_eq!(nip_lines(&steps), expected);
    let gh_run = |m: &Machine, key: Option<&str>| {
        let mut env = vec![
            ("NIP_REMOTE_CACHE_URL", server.url.as_str()),
            ("SSL_CERT_FILE", ca),
        ];
        env.extend(key.map(|k| ("NIP_REMOTE_CACHE_API_KEY", k)));
        let mut log = String::new();
        for step in &steps {
            let (ok, out) = sh(m, step, &env);
            assert!(ok, "step {step:?} failed:\n{out}");
            log.push_str(&out);
        }
        log
    };
    let main = Machine::new(tmp.path(), "gh-main", &recipes);
    let log = gh_run(&main, Some(&rw));
    assert!(
        log.contains("source=built hits=0 misses=1") && log.contains("uploaded=true"),
        "{log}"
    );
    let pr = Machine::new(tmp.path(), "gh-pr", &recipes);
    let log = gh_run(&pr, Some(&ro));
    assert!(log.contains("source=remote hits=1 misses=0"), "{log}");
    assert!(log.contains("Build time saved"), "stats at the end:\n{log}");
    assert_eq!(pr.builds_run(), 0);
    let fork = Machine::new(tmp.path(), "gh-fork", &recipes);
    let log = gh_run(&fork, None);
    assert!(
        log.contains("source=built"),
        "a fork without secrets still builds:\n{log}"
    );

    // GitLab CI: before_script and script share a shell; after_script runs on its own.
    let gl = yaml("gitlab-ci.yml");
    let job = &gl["build"];
    let main_script = without_install(
        strings(&job["before_script"])
            .into_iter()
            .chain(strings(&job["script"]))
            .collect(),
    )
    .join("\n");
    let after = strings(&job["after_script"]).join("\n");
    let all = [main_script.clone(), after.clone()];
    assert_eq!(nip_lines(&all), expected);
    let gl_run = |m: &Machine, env: &[(&str, &str)]| {
        let (ok, out) = sh(m, &main_script, env);
        assert!(ok, "script failed:\n{out}");
        let (ok, stats) = sh(m, &after, env);
        assert!(ok, "after_script failed:\n{stats}");
        out + &stats
    };
    let base = [
        ("NIP_REMOTE_CACHE_URL", server.url.as_str()),
        ("SSL_CERT_FILE", ca),
        ("CI_DEFAULT_BRANCH", "main"),
        ("NIP_CACHE_KEY_RO", ro.as_str()),
    ];
    // A merge request branch sees only the read-only key (the read-write one is protected).
    let mr = Machine::new(tmp.path(), "gl-mr", &recipes);
    let mut env = base.to_vec();
    env.push(("CI_COMMIT_BRANCH", "feature"));
    env.push(("NIP_CACHE_KEY_RW", rw.as_str()));
    let log = gl_run(&mr, &env);
    assert!(log.contains("source=remote"), "{log}");
    // Main with a new variant: built and uploaded with the read-write key.
    let main_gl = Machine::new(tmp.path(), "gl-main", &recipes);
    let mut env = base.to_vec();
    env.push(("CI_COMMIT_BRANCH", "main"));
    env.push(("NIP_CACHE_KEY_RW", rw.as_str()));
    std::fs::write(recipes.join("hello-src/greeting.txt"), "changed on main\n").unwrap();
    let log = gl_run(&main_gl, &env);
    assert!(
        log.contains("source=built") && log.contains("uploaded=true"),
        "{log}"
    );
    // A fork's pipeline has none of the variables: a warning, and the build builds.
    let fork = Machine::new(tmp.path(), "gl-fork", &recipes);
    let log = gl_run(
        &fork,
        &[("CI_COMMIT_BRANCH", "main"), ("CI_DEFAULT_BRANCH", "main")],
    );
    assert!(
        log.contains("NIP_REMOTE_CACHE_URL is not set") && log.contains("source=built"),
        "{log}"
    );
}
