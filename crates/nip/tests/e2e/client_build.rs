//! `nip build` against the real `nip serve`, with two machines (separate HOME/XDG directories):
//! upload then download instead of building, key stability, and every remote failure turning
//! into a warning while the build still succeeds.
use std::time::{Duration, Instant};

use crate::client_env::*;

fn read(path: &serde_json::Value, rel: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(path.as_str().unwrap()).join(rel)).unwrap()
}

#[test]
fn second_machine_downloads_instead_of_building() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());
    let a = remote.machine(tmp.path(), "machine-a", &recipes, &remote.write_key);
    let b = remote.machine(tmp.path(), "machine-b", &recipes, &remote.write_key);

    let (ra, _) = a.build(&["hello", "+python+ruby"]);
    assert_eq!(a.builds_run(), 1, "machine A must run the build");
    assert_eq!(ra["source"], "built");
    assert_eq!(ra["uploaded"], true);
    let key = ra["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("hello-2.12-"), "{key}");

    // Same variants, other order: same key, downloaded, and the build does not run.
    let (rb, _) = b.build(&["hello", "+ruby", "+python"]);
    assert_eq!(rb["key"], key.as_str());
    assert_eq!(rb["source"], "remote");
    assert_eq!(b.builds_run(), 0, "machine B must not run the build");
    assert_eq!(read(&rb["path"], "share/greeting.txt"), "hello, world\n");
    assert_eq!(read(&rb["path"], "share/variants"), "python,ruby py=1\n");

    // Again on B: the local cache answers.
    let (rb2, _) = b.build(&["hello", "+python", "+ruby"]);
    assert_eq!(rb2["source"], "local");
    assert_eq!(b.builds_run(), 0);

    // The human form prints the path as the last line of stdout.
    let out = b.nip(&["build", "hello", "+python+ruby"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().last().unwrap(), rb["path"].as_str().unwrap());

    let sa = a.stats();
    assert_eq!(
        (sa["builds"].as_u64(), sa["built"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (sa["uploads"].as_u64(), sa["uploadsOk"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(sa["hitRate"], 0.0);
    let sb = b.stats();
    assert_eq!(sb["builds"], 3);
    assert_eq!(sb["remoteHits"], 1);
    assert_eq!(sb["localHits"], 2);
    assert_eq!(sb["built"], 0);
    assert_eq!(
        (sb["downloads"].as_u64(), sb["downloadsOk"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(sb["hitRate"], 1.0);
    assert_eq!(sb["uploads"], 0);
    assert_eq!(sb["localArtifacts"], 1);

    // The guide's loop: list keys, push each (idempotent: the server already has it).
    assert_eq!(b.cached_keys(), [key.as_str()]);
    let push = b.nip(&["cache", "remote", "push", &key]);
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    let recent = b.nip(&["cache", "list", "--recent", "--format=json"]);
    let recent: serde_json::Value = serde_json::from_slice(&recent.stdout).unwrap();
    assert_eq!(recent[0]["op"], "upload", "newest first: {recent}");
    assert_eq!(recent[0]["outcome"], "exists");
}

#[test]
fn pull_by_package_and_version_then_build_uses_it() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());
    let a = remote.machine(tmp.path(), "machine-a", &recipes, &remote.write_key);
    let b = remote.machine(tmp.path(), "machine-b", &recipes, &remote.read_key);
    let (ra, _) = a.build(&["hello", "+ruby"]);
    let out = b.nip(&["cache", "remote", "pull", "hello", "2.12", "+ruby"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(b.cached_keys(), [ra["key"].as_str().unwrap()]);
    let (rb, _) = b.build(&["hello", "+ruby", "--no-remote-cache"]);
    assert_eq!(rb["source"], "local");
    assert_eq!(b.builds_run(), 0);
}

#[test]
fn variant_order_keeps_the_key_and_a_source_change_makes_a_new_one() {
    let (tmp, recipes) = with_recipes();
    let a = Machine::new(tmp.path(), "machine-a", &recipes);
    let (r1, _) = a.build(&["hello", "+ruby+python", "--no-remote-cache"]);
    let (r2, _) = a.build(&["hello", "+python", "+ruby", "+python", "--no-remote-cache"]);
    assert_eq!(r1["key"], r2["key"]);
    assert_eq!(a.builds_run(), 1);
    let (r3, _) = a.build(&["hello", "--no-remote-cache"]);
    assert_ne!(r3["key"], r1["key"], "other variants, other key");

    std::fs::write(recipes.join("hello-src/greeting.txt"), "changed\n").unwrap();
    let (r4, _) = a.build(&["hello", "+python+ruby", "--no-remote-cache"]);
    assert_ne!(
        r4["key"], r1["key"],
        "a changed source file must change the key"
    );
    assert_eq!(r4["source"], "built");
    assert_eq!(read(&r4["path"], "share/greeting.txt"), "changed\n");
    assert_eq!(a.builds_run(), 3);
}

#[test]
fn remote_stopped_machine_builds_warns_and_exits_zero() {
    let (tmp, recipes) = with_recipes();
    let mut remote = start_remote(tmp.path());
    let b = remote.machine(tmp.path(), "machine-b", &recipes, &remote.write_key);
    remote.server.child.kill();

    let started = Instant::now();
    let (rb, stderr) = b.build(&["hello", "+python"]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a dead remote must not stall a build"
    );
    assert_eq!(rb["source"], "built");
    assert_eq!(b.builds_run(), 1);
    assert!(stderr.contains("⚠️"), "{stderr}");
    assert!(stderr.contains("not reachable"), "{stderr}");
    // One line per warning, not a stack of errors.
    assert!(
        stderr.lines().filter(|l| l.starts_with("⚠️")).count() <= 2,
        "{stderr}"
    );
    let s = b.stats();
    assert_eq!(
        (s["built"].as_u64(), s["uploadsOk"].as_u64()),
        (Some(1), Some(0))
    );
}

#[test]
fn read_only_key_builds_and_warns_about_the_upload() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());
    let dev = remote.machine(tmp.path(), "dev", &recipes, &remote.read_key);
    let (r, stderr) = dev.build(&["hello"]);
    assert_eq!(r["source"], "built");
    assert_eq!(r["uploaded"], false);
    assert!(
        stderr.contains("⚠️ Remote upload failed (local cache still available)"),
        "{stderr}"
    );
    assert!(stderr.contains("403"), "{stderr}");
    let s = dev.stats();
    assert_eq!(
        (s["uploads"].as_u64(), s["uploadsOk"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(s["uploadSuccessRate"], 0.0);
}

#[test]
fn corrupted_download_is_rejected_and_rebuilt() {
    let (tmp, recipes) = with_recipes();
    let remote = start_remote(tmp.path());
    let a = remote.machine(tmp.path(), "machine-a", &recipes, &remote.write_key);
    let (ra, _) = a.build(&["hello", "+python"]);

    let upstream = remote.server.url.trim_start_matches("http://");
    let proxy = start_flipping_proxy(upstream, Duration::from_secs(60));
    let b = Machine::new(tmp.path(), "machine-b", &recipes);
    b.use_remote(&proxy, &remote.write_key);
    let (rb, stderr) = b.build(&["hello", "+python"]);
    assert!(stderr.contains("⚠️ Remote download rejected"), "{stderr}");
    assert!(stderr.contains("sha256"), "{stderr}");
    assert_eq!(rb["source"], "built");
    assert_eq!(
        b.builds_run(),
        1,
        "the bad download is discarded and the build runs"
    );
    assert_eq!(rb["key"], ra["key"]);
    // The artifact is deterministic: the rebuild has the bytes machine A uploaded.
    assert_eq!(rb["sha256"], ra["sha256"]);
    assert_eq!(read(&rb["path"], "share/greeting.txt"), "hello, world\n");
    // The rejected bytes were unpacked while they downloaded: none of that may remain.
    let pkg = std::path::Path::new(rb["path"].as_str().unwrap());
    let mut left: Vec<String> = std::fs::read_dir(pkg.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let key = rb["key"].as_str().unwrap();
    // The package, and the marker saying it is complete in this boot.
    assert_eq!(left, [".boot", key]);
    let s = b.stats();
    assert_eq!(
        (s["downloads"].as_u64(), s["downloadsOk"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(s["downloadSuccessRate"], 0.0);
}

#[test]
fn after_a_reboot_a_package_damaged_by_the_crash_is_unpacked_again() {
    let (tmp, recipes) = with_recipes();
    let m = Machine::new(tmp.path(), "m", &recipes);
    let (r, _) = m.build(&["hello", "+python", "--no-remote-cache"]);
    assert_eq!(r["source"], "built");
    let path = std::path::Path::new(r["path"].as_str().unwrap());
    let key = r["key"].as_str().unwrap();
    let marker = path.with_file_name(".boot").join(key);
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), this_boot.trim());

    // What a power loss can leave: the unpack's writes lost, the package under its final name,
    // and the machine booted again (another boot id).
    let greeting = path.join("share/greeting.txt");
    std::fs::write(&greeting, "").unwrap();
    std::fs::write(&marker, "00000000-0000-0000-0000-000000000000").unwrap();
    let (again, _) = m.build(&["hello", "+python", "--no-remote-cache"]);
    assert_eq!(again["source"], "local");
    assert_eq!(again["path"], r["path"]);
    assert_eq!(
        m.builds_run(),
        1,
        "the local archive is used, not a rebuild"
    );
    assert_eq!(read(&again["path"], "share/greeting.txt"), "hello, world\n");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), this_boot.trim());

    // The same crash truncated the local archive too: it fails its SHA-256, is discarded, and
    // the package is built again.
    let archive = m.root.join(format!("cache/nip/binary-cache/{key}.tar.zst"));
    let bytes = std::fs::read(&archive).unwrap();
    std::fs::write(&archive, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(&greeting, "").unwrap();
    std::fs::write(&marker, "00000000-0000-0000-0000-000000000000").unwrap();
    let (rebuilt, stderr) = m.build(&["hello", "+python", "--no-remote-cache"]);
    assert!(stderr.contains("is unusable, discarded"), "{stderr}");
    assert!(stderr.contains("sha256"), "{stderr}");
    assert_eq!(rebuilt["source"], "built");
    assert_eq!(m.builds_run(), 2);
    assert_eq!(
        read(&rebuilt["path"], "share/greeting.txt"),
        "hello, world\n"
    );
    assert_eq!(
        std::fs::read(&archive).unwrap(),
        bytes,
        "the archive is whole again"
    );
}

#[test]
fn unknown_variant_and_missing_recipe_say_what_exists() {
    let (tmp, recipes) = with_recipes();
    let m = Machine::new(tmp.path(), "m", &recipes);
    let out = m.nip(&["build", "hello", "+perl"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("python, ruby"), "{err}");
    let out = m.nip(&["build", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("available: hello"), "{err}");
    assert_eq!(m.builds_run(), 0);
}
