//! The client as the guide promises it, with the real binary: a dead remote (refused or silent)
//! costs a build about one lookup deadline and is then remembered for a while; push and pull by
//! name and version act on every variant; a closed stdout ends any command quietly; an empty
//! `--api-key` (a fork's pipeline without secrets) is accepted with a warning; failures use the
//! guide's words first.
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::client_env::*;
use crate::common::*;

/// Writes a remote config with the default retry policy (3 attempts, 5 s apart), as a user has it.
fn use_remote_defaults(m: &Machine, url: &str, extra: serde_json::Value) {
    let dir = m.root.join("config/nip");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = serde_json::json!({"url": url, "apiKey": "k", "enabled": true});
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    std::fs::write(dir.join("remote-cache.json"), cfg.to_string()).unwrap();
}

/// `nip build --json` and how long it took.
fn timed_build(m: &Machine, args: &[&str]) -> (serde_json::Value, String, Duration) {
    let started = Instant::now();
    let (r, stderr) = m.build(args);
    (r, stderr, started.elapsed())
}

#[test]
fn a_refused_remote_costs_a_build_no_retries_and_is_remembered() {
    let (tmp, recipes) = with_recipes();
    let m = Machine::new(tmp.path(), "dev", &recipes);
    let dead = format!("http://127.0.0.1:{}", free_port());
    use_remote_defaults(&m, &dead, serde_json::json!({}));

    // Loosely here (a debug binary on a shared machine); tightly in the benchmark.
    let (r, stderr, took) = timed_build(&m, &["hello"]);
    assert_eq!(r["source"], "built");
    assert!(took < Duration::from_secs(4), "{took:?}: {stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("❌ Remote cache lookup failed: not reachable")),
        "{stderr}"
    );

    // The next build skips it with one warning, without asking.
    let (r, stderr, took) = timed_build(&m, &["hello", "+ruby"]);
    assert_eq!(r["source"], "built");
    assert!(took < Duration::from_secs(4), "{took:?}: {stderr}");
    assert!(
        stderr.contains(&format!("⚠️ Remote cache {dead} skipped: unreachable")),
        "{stderr}"
    );
    assert!(!stderr.contains("lookup failed"), "{stderr}");
    let remembered = m.root.join("cache/nip/unreachable.json");
    assert!(remembered.is_file());

    // `status` asks now, whatever was remembered.
    let out = m.nip(&["cache", "remote", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("not reachable"), "{text}");
    // A remote that answers again is forgotten: a real server on that URL is not skipped once
    // `status` has seen it.
    let data = tmp.path().join("server-data");
    let key = create_key(&data, "w", "write", &[]);
    let port = dead.rsplit(':').next().unwrap().to_string();
    let log = data.with_extension("log");
    let data_arg = data.display().to_string();
    let mut args: Vec<&str> = vec!["--cache-data-path", &data_arg];
    args.extend(DUMMY_UPSTREAM);
    let _server = spawn_nip_on(&log, &port, &args);
    use_remote_defaults(&m, &dead, serde_json::json!({"apiKey": key}));
    let out = m.nip(&["cache", "remote", "status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!remembered.exists());
    let (r, stderr) = m.build(&["hello", "+python"]);
    assert_eq!(r["uploaded"], true, "{stderr}");
}

/// `nip serve` on a given port (the port a test used as a dead remote).
fn spawn_nip_on(log: &std::path::Path, port: &str, args: &[&str]) -> KillOnDrop {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_nip"))
        .arg("serve")
        .arg("--server-addr")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start nip serve");
    let child = KillOnDrop(child);
    wait_http_ok(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(30),
    );
    child
}

#[test]
fn a_silent_remote_costs_one_lookup_deadline() {
    let (tmp, recipes) = with_recipes();
    let m = Machine::new(tmp.path(), "dev", &recipes);
    // Connections complete in the kernel's backlog; nothing ever answers.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hole.local_addr().unwrap());
    use_remote_defaults(&m, &url, serde_json::json!({}));
    let set = m.nip(&["cache", "remote", "config", "--lookup-timeout", "1.5"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );

    let (r, stderr, took) = timed_build(&m, &["hello"]);
    assert_eq!(r["source"], "built");
    assert!(took >= Duration::from_millis(1500), "{took:?}: {stderr}");
    assert!(took < Duration::from_secs(5), "{took:?}: {stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("❌ Remote cache lookup failed: timeout")),
        "{stderr}"
    );
    // No upload attempt to a server that did not answer a lookup.
    assert!(!stderr.contains("upload failed"), "{stderr}");

    let (_, stderr, took) = timed_build(&m, &["hello", "+ruby"]);
    assert!(took < Duration::from_millis(1500), "{took:?}: {stderr}");
    assert!(stderr.contains("skipped: unreachable"), "{stderr}");
    drop(hole);
}

#[test]
fn push_and_pull_by_name_and_version_take_every_variant() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());
    let a = remote.machine(tmp.path(), "machine-a", &recipes, &remote.write_key);
    let mut keys: Vec<String> = [&[][..], &["+python"][..], &["+ruby", "+python"][..]]
        .iter()
        .map(|v| {
            let mut args = vec!["hello", "--no-remote-cache"];
            args.extend_from_slice(v);
            a.build(&args).0["key"].as_str().unwrap().to_string()
        })
        .collect();
    keys.sort();

    // The recipe is found, and still every local variant is pushed, not just the plain one.
    let out = a.nip(&["cache", "remote", "push", "hello", "2.12"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    for k in &keys {
        assert!(stderr.contains(&format!("✅ Pushed {k} to")), "{stderr}");
    }
    // Again: the server already has these bytes; nothing is sent.
    let out = a.nip(&["cache", "remote", "push", "hello", "2.12"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("is already on").count(), 3, "{stderr}");

    let b = remote.machine(tmp.path(), "machine-b", &recipes, &remote.read_key);
    let out = b.nip(&["cache", "remote", "pull", "hello", "2.12"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(b.cached_keys(), keys);
    // One variant asked for: that one only.
    let c = remote.machine(tmp.path(), "machine-c", &recipes, &remote.read_key);
    let out = c.nip(&["cache", "remote", "pull", "hello", "2.12", "+python"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.cached_keys().len(), 1);
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let (tmp, recipes) = with_recipes();
    let m = Machine::new(tmp.path(), "dev", &recipes);
    m.build(&["hello", "--no-remote-cache"]);
    let commands: [&[&str]; 7] = [
        &["completions", "bash"],
        &["cache", "list", "--format=json"],
        &["cache", "list"],
        &["cache", "list", "--recent"],
        &["cache", "stats"],
        &["cache", "remote", "status"],
        &["build", "hello", "--json"],
    ];
    for args in commands {
        // The reader is gone before the first write, as `| head` is after its lines.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = m
            .cmd(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
    // Through a real `head`, as the issue typed it.
    let out = bash(
        &m,
        "\"$NIP\" completions bash | head -1 >/dev/null; echo \"${PIPESTATUS[0]}\"",
    )
    .env("NIP", env!("CARGO_BIN_EXE_nip"))
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A bash script run with a machine's environment (that of its `nip` commands).
fn bash(m: &Machine, script: &str) -> std::process::Command {
    let nip = m.cmd(&[]);
    let mut sh = std::process::Command::new("bash");
    sh.arg("-c").arg(script);
    for (k, v) in nip.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    if let Some(dir) = nip.get_current_dir() {
        sh.current_dir(dir);
    }
    sh
}

#[test]
fn an_empty_api_key_is_accepted_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Machine::new(tmp.path(), "fork-ci", tmp.path());
    let file = m.root.join("config/nip/remote-cache.json");
    // A key saved earlier must not linger once the pipeline has none.
    m.configure_remote("http://127.0.0.1:1", "old-key", &[]);
    assert!(std::fs::read_to_string(&file).unwrap().contains("old-key"));
    // `--api-key $NIP_CACHE_API_KEY` with the secret empty: the flag without a value.
    for args in [
        &[
            "cache",
            "remote",
            "config",
            "--url",
            "http://127.0.0.1:1",
            "--api-key",
        ][..],
        &["cache", "remote", "config", "--api-key", "--enable"][..],
        &["cache", "remote", "config", "--api-key", ""][..],
    ] {
        let out = m.nip(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains("⚠️ --api-key is empty"),
            "{args:?}: {stderr}"
        );
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert!(saved.get("apiKey").is_none(), "{saved}");
        assert_eq!(saved["enabled"], true, "{saved}");
    }
}

#[test]
fn failures_print_the_guides_words_first() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());
    let m = remote.machine(tmp.path(), "dev", &recipes, "nip_wrong_key_0000000000");
    let (r, stderr) = m.build(&["hello"]);
    assert_eq!(r["source"], "built");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("❌ Remote cache lookup failed: 401 Unauthorized")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("⚠️ Remote upload failed (local cache still available): 401")),
        "{stderr}"
    );
    // A missing recipe: where it was looked for, and how to write one.
    let out = m.nip(&["build", "vim"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no recipe \"vim\" (searched "), "{err}");
    assert!(
        err.contains("vim.toml") && err.contains("examples/recipes/hello.toml"),
        "{err}"
    );
}
