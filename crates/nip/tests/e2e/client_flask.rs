//! The client against the guide's own reference server (bench/flask_reference.py, Flask under
//! gunicorn): its lookup answers only `{"downloadUrl": <absolute URL>}`, it has no listing and
//! wants the token on downloads too. Status, two machines sharing builds, verification through
//! the uploaded metadata's SHA-256, and pull/push of every variant of a version.
use crate::client_env::*;
use crate::common::*;

const TOKEN: &str = "flask-reference-token-0123456789";

#[test]
fn the_guides_flask_server_works_as_a_remote() {
    let test = "the_guides_flask_server_works_as_a_remote";
    let tmp = tempfile::tempdir().unwrap();
    let Some(flask) = start_flask_reference(tmp.path(), TOKEN, test) else {
        return;
    };
    let recipes = write_recipes(tmp.path());
    let a = Machine::new(tmp.path(), "machine-a", &recipes);
    let b = Machine::new(tmp.path(), "machine-b", &recipes);

    // Status: health, then the key checked by an authenticated lookup.
    a.configure_remote(&flask.url, TOKEN, &[]);
    let out = a.nip(&["cache", "remote", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.ends_with("✅ Remote cache is available\n"), "{text}");
    b.configure_remote(&flask.url, "wrong-token", &[]);
    let out = b.nip(&["cache", "remote", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("❌ Remote cache is not available: 401 Unauthorized"),
        "{text}"
    );

    // Machine A builds and uploads; machine B downloads instead of building.
    a.use_remote(&flask.url, TOKEN);
    b.use_remote(&flask.url, TOKEN);
    let (ra, stderr) = a.build(&["hello", "+python"]);
    assert_eq!(ra["source"], "built", "{stderr}");
    assert_eq!(ra["uploaded"], true, "{stderr}");
    let key = ra["key"].as_str().unwrap().to_string();
    assert!(flask.data.join(format!("{key}.tar.zst")).is_file());
    let (rb, stderr) = b.build(&["hello", "+python"]);
    assert_eq!(rb["source"], "remote", "{stderr}");
    assert_eq!(b.builds_run(), 0, "machine B must not build: {stderr}");
    assert_eq!(rb["sha256"], ra["sha256"]);
    let pkg = std::path::Path::new(rb["path"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(pkg.join("share/greeting.txt")).unwrap(),
        "hello, world\n"
    );
    assert_eq!(
        std::fs::read_to_string(pkg.join("share/variants")).unwrap(),
        "python py=1\n"
    );

    // The lookup gives no SHA-256, the uploaded metadata does: bytes changed on the server are
    // rejected, and the package built.
    let stored = flask.data.join(format!("{key}.tar.zst"));
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&stored, &bytes).unwrap();
    let c = Machine::new(tmp.path(), "machine-c", &recipes);
    c.use_remote(&flask.url, TOKEN);
    let (rc, stderr) = c.build(&["hello", "+python"]);
    assert!(stderr.contains("⚠️ Remote download rejected"), "{stderr}");
    assert!(stderr.contains("sha256"), "{stderr}");
    assert_eq!(rc["source"], "built");
    assert_eq!(rc["sha256"], ra["sha256"]);

    // Push by name and version: every local variant of it (the damaged one is replaced).
    let (r_plain, _) = a.build(&["hello", "--no-remote-cache"]);
    let (r_ruby, _) = a.build(&["hello", "+ruby", "--no-remote-cache"]);
    let out = a.nip(&["cache", "remote", "push", "hello", "2.12"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let mut expected: Vec<String> = [&ra, &r_plain, &r_ruby]
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    expected.sort();
    for k in &expected {
        assert!(stderr.contains(&format!("✅ Pushed {k} to")), "{stderr}");
        assert!(flask.data.join(format!("{k}.tar.zst")).is_file(), "{k}");
    }

    // Pull by name and version from a server that cannot list: every variant the recipe
    // allows is looked up; the three present are pulled, the fourth (+python+ruby) is absent.
    let d = Machine::new(tmp.path(), "machine-d", &recipes);
    d.use_remote(&flask.url, TOKEN);
    let out = d.nip(&["cache", "remote", "pull", "hello", "2.12"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(d.cached_keys(), expected, "{stderr}");
    // Pulled bytes are verified against the metadata and usable offline.
    let (rd, _) = d.build(&["hello", "+python", "--no-remote-cache"]);
    assert_eq!(rd["source"], "local");
    assert_eq!(d.builds_run(), 0);
}
