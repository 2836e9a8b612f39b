//! `nip cache remote config` and `status` against the real server: the printed shape when the
//! cache is available, unreachable or refuses the key, exit codes, and config file handling.
use crate::client_env::*;
use crate::common::run;

fn expected(url: &str, key_line: &str, last: &str) -> String {
    format!(
        "Remote Cache Status\n===================\nEnabled: Yes\nURL: {url}\nAPI Key: {key_line}\n\
         Timeout: 300 seconds\n\nTesting connection...\n{last}\n"
    )
}

#[test]
fn status_shape_when_available_and_when_not() {
    let (tmp, recipes) = with_recipes();
    let mut remote = start_remote(tmp.path());
    let m = Machine::new(tmp.path(), "dev", &recipes);
    let url = remote.server.url.clone();
    m.configure_remote(&url, &remote.read_key, &[]);
    let file = m.root.join("config/nip/remote-cache.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let out = m.nip(&["cache", "remote", "status"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        expected(&url, "***configured***", "✅ Remote cache is available")
    );

    // --show masks the key.
    let out = m.nip(&["cache", "remote", "config", "--show"]);
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(!shown.contains(&remote.read_key), "{shown}");
    assert!(shown.contains("\"enabled\": true"), "{shown}");

    // A wrong key: 401.
    m.nip(&[
        "cache",
        "remote",
        "config",
        "--api-key",
        "nip_wrong_key_0000000000",
    ]);
    let out = m.nip(&["cache", "remote", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("❌ Remote cache is not available"),
        "{text}"
    );
    assert!(last.contains("401 Unauthorized"), "{text}");

    // The environment overrides the file.
    let out = run(m
        .cmd(&["cache", "remote", "status", "--json"])
        .env("NIP_REMOTE_CACHE_API_KEY", &remote.read_key));
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["available"], true);

    // Server stopped: not reachable, with the URL.
    remote.server.child.kill();
    let out = m.nip(&["cache", "remote", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("Remote Cache Status\n===================\nEnabled: Yes\n"),
        "{text}"
    );
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("❌ Remote cache is not available: not reachable"),
        "{text}"
    );
    assert!(last.contains(&url), "{text}");
    let out = m.nip(&["cache", "remote", "status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["available"], false);
    assert_eq!(v["servers"][0]["url"], url.as_str());
}

#[test]
fn corrupt_config_file_is_an_error_naming_file_and_line() {
    let (tmp, recipes) = with_recipes();
    let m = Machine::new(tmp.path(), "dev", &recipes);
    let dir = m.root.join("config/nip");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("remote-cache.json"),
        "{\n  \"url\": \"http://127.0.0.1:1\",\n  enabled: true\n}\n",
    )
    .unwrap();
    for args in [&["cache", "remote", "status"][..], &["build", "hello"][..]] {
        let out = m.nip(args);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("remote-cache.json: line 3"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn completions_for_each_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Machine::new(tmp.path(), "dev", tmp.path());
    for shell in ["bash", "zsh", "fish"] {
        let out = m.nip(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("build") && text.contains("remote"), "{shell}");
    }
}
