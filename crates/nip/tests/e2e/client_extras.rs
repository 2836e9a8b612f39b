//! The rest of the guide's promises, with the real binary: `nip recipe new` starts a recipe that
//! builds as it is; `--audit-reads` puts lookups, downloads and Nix reads in the audit log (written
//! in batches, so only after a flush); the database's directory and file and the signing key are
//! private to the server's user.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::client_env::*;
use crate::common::*;

#[test]
fn recipe_new_writes_a_template_that_builds_and_is_never_overwritten() {
    let (tmp, recipes) = with_recipes();
    let m = Machine::new(tmp.path(), "dev", &recipes);

    // The missing recipe's error names the command.
    let out = m.nip(&["build", "mytool"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`nip recipe new mytool`"), "{err}");

    let out = m.nip(&["recipe", "new", "mytool"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("./recipes/mytool.toml"), "{stdout}");
    let file = m.root.join("recipes/mytool.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("name = \"mytool\""), "{text}");
    assert!(
        text.lines().filter(|l| l.starts_with('#')).count() >= 10,
        "{text}"
    );

    // It builds as written: ./recipes is searched first.
    let (r, stderr) = m.build(&["mytool"]);
    assert_eq!(r["source"], "built", "{stderr}");
    assert!(
        r["key"].as_str().unwrap().starts_with("mytool-0.1.0-"),
        "{r}"
    );

    // A second `new` refuses and leaves the edited file as it is.
    std::fs::write(&file, format!("{text}\n# edited\n")).unwrap();
    let out = m.nip(&["recipe", "new", "mytool"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .ends_with("# edited\n"));

    // A name that is no package name writes nothing.
    let out = m.nip(&["recipe", "new", "../evil"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!m.root.join("evil.toml").exists());
}

fn actions(entries: &[serde_json::Value], action: &str) -> Vec<serde_json::Value> {
    entries
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

/// A CI machine uploads `hello`, a developer machine builds it (a lookup and a download) and a
/// Nix client asks for a narinfo; returns the server's data directory and the artifact key.
fn reads_against(tmp: &Path, audit_reads: bool) -> (NipServer, std::path::PathBuf, String) {
    let recipes = write_recipes(tmp);
    let data = tmp.join("server-data");
    let write_key = create_key(&data, "ci-writer", "write", &[]);
    let read_key = create_key(&data, "dev-reader", "read", &[]);
    let mut args = DUMMY_UPSTREAM.to_vec();
    if audit_reads {
        args.push("--audit-reads");
    }
    let server = start_nip(&data, &args);
    let ci = Machine::new(tmp, "ci", &recipes);
    ci.use_remote(&server.url, &write_key);
    let (r, _) = ci.build(&["hello"]);
    let key = r["key"].as_str().unwrap().to_string();
    let dev = Machine::new(tmp, "dev", &recipes);
    dev.use_remote(&server.url, &read_key);
    let (r, stderr) = dev.build(&["hello"]);
    assert_eq!(r["source"], "remote", "{stderr}");
    let hash = "0".repeat(32);
    let (status, _) = http_get(&format!("{}/upload/{hash}.narinfo", server.url)).unwrap();
    assert_eq!(status, 404);
    (server, data, key)
}

#[test]
fn audit_reads_records_lookups_downloads_and_nix_reads_after_a_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, data, key) = reads_against(tmp.path(), true);
    // Written by the background job within a few seconds, not by the request.
    let deadline = Instant::now() + Duration::from_secs(15);
    let entries = loop {
        let entries = audit(&data);
        let done = ["artifact-lookup", "artifact-download", "narinfo-read"]
            .iter()
            .all(|a| !actions(&entries, a).is_empty());
        if done || Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let lookup = actions(&entries, "artifact-lookup");
    assert_eq!(
        lookup.len(),
        2,
        "the CI's miss and the developer's hit: {entries:#?}"
    );
    let hit = lookup.iter().find(|e| e["result"] == "200").expect("a hit");
    assert_eq!(hit["key"], "dev-reader");
    assert_eq!(hit["target"], key.as_str());
    assert_eq!(hit["remoteAddr"], "127.0.0.1");
    let miss = lookup
        .iter()
        .find(|e| e["result"] == "404")
        .expect("a miss");
    assert_eq!(miss["key"], "ci-writer");
    let download = actions(&entries, "artifact-download");
    assert_eq!(download.len(), 1, "{entries:#?}");
    assert_eq!(download[0]["key"], "dev-reader");
    assert_eq!(download[0]["result"], "200");
    assert_eq!(download[0]["target"], key.as_str());
    assert!(download[0]["size"].as_i64().unwrap() > 0);
    assert_eq!(download[0]["sha256"].as_str().unwrap().len(), 64);
    let narinfo = actions(&entries, "narinfo-read");
    assert_eq!(narinfo[0]["result"], "404", "{entries:#?}");
    assert_eq!(narinfo[0]["target"], format!("{}.narinfo", "0".repeat(32)));
}

#[test]
fn audit_reads_records_nix_narinfo_and_nar_reads() {
    let test = "audit_reads_records_nix_narinfo_and_nar_reads";
    if !nix_available(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ((upstream_key, paths), (_upstream, upstream_url)) =
        serve_upstream(&tmp.path().join("upstream"), 1);
    let data = tmp.path().join("data");
    // No prefetch: the first NAR read must be the one that fills it from the upstream.
    let args = ["--audit-reads", "--cache-prefetch-nar-max-size", "0"];
    let server = start_nip_behind(&data, &upstream_url, &upstream_key, &args);
    let hash = store_hash(&paths[0]);
    let (status, narinfo) = http_get(&format!("{}/{hash}.narinfo", server.url)).unwrap();
    assert_eq!(status, 200);
    let narinfo = String::from_utf8(narinfo).unwrap();
    let nar = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    // The first read fills from the upstream, the second is a hit.
    for _ in 0..2 {
        let (status, _) = http_get(&format!("{}/{nar}", server.url)).unwrap();
        assert_eq!(status, 200);
        // Time for the fill to be stored, so the second read is a hit.
        std::thread::sleep(Duration::from_secs(1));
    }
    let file = nar.trim_start_matches("nar/").to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let entries = audit(&data);
        let narinfos = actions(&entries, "narinfo-read");
        let mut nars: Vec<String> = actions(&entries, "nar-read")
            .iter()
            .filter(|e| e["target"] == file.as_str())
            .map(|e| e["result"].as_str().unwrap().to_string())
            .collect();
        nars.sort();
        let done = narinfos.len() == 1 && nars.len() == 2;
        if done {
            assert_eq!(narinfos[0]["target"], format!("{hash}.narinfo"));
            assert_eq!(narinfos[0]["result"], "200");
            assert_eq!(narinfos[0]["remoteAddr"], "127.0.0.1");
            assert_eq!(nars, ["200", "200 upstream"]);
            return;
        }
        assert!(Instant::now() < deadline, "{entries:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn without_audit_reads_only_writes_are_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, data, _key) = reads_against(tmp.path(), false);
    // Longer than the flush period of --audit-reads.
    std::thread::sleep(Duration::from_secs(4));
    let entries = audit(&data);
    assert_eq!(
        actions(&entries, "artifact-upload").len(),
        1,
        "{entries:#?}"
    );
    for read in [
        "artifact-lookup",
        "artifact-download",
        "narinfo-read",
        "nar-read",
    ] {
        assert!(actions(&entries, read).is_empty(), "{read}: {entries:#?}");
    }
}

#[test]
fn the_database_and_the_signing_key_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("data");
    let _server = start_nip(&data, &DUMMY_UPSTREAM);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data.join("db")), 0o700);
    assert_eq!(mode(&data.join("db/db.sqlite")), 0o600);
    let wal = data.join("db/db.sqlite-wal");
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600);
    }
    assert_eq!(mode(&data.join("secret-key")), 0o600);
    // Its parent directory is the user's to choose: left as it was.
    assert_eq!(mode(tmp.path()), 0o755);
}

const CONFIGURATION_DOC: &str = "docs/configuration.md";
const BEGIN: &str = "<!-- BEGIN server settings: generated from crates/nip-server/src/settings.rs by the test configuration_doc_lists_every_setting; NIP_UPDATE_DOCS=1 rewrites it -->";
const END: &str = "<!-- END server settings -->";

/// The server settings section of docs/configuration.md, from the one settings table.
fn server_settings_markdown() -> String {
    use nip_server::settings::{find, Fallback, SETTINGS};
    // Table-safe text: `|` escaped, and `<…>` outside code spans shown rather than taken as HTML.
    let cell = |s: &str| {
        s.replace('|', "\\|")
            .split('`')
            .enumerate()
            .map(|(i, part)| match i % 2 {
                0 => part.replace('<', "&lt;").replace('>', "&gt;"),
                _ => part.to_string(),
            })
            .collect::<Vec<_>>()
            .join("`")
    };
    let codes = |xs: &[&str], prefix: &str| {
        if xs.is_empty() {
            "—".to_string()
        } else {
            xs.iter()
                .map(|x| format!("`{prefix}{x}`"))
                .collect::<Vec<_>>()
                .join("<br>")
        }
    };
    let mut used = String::from(
        "| flag | environment | config key | default | meaning |\n|---|---|---|---|---|\n",
    );
    let mut ignored = String::from(
        "| flag | environment | config key | in ncps | why nip ignores it |\n|---|---|---|---|---|\n",
    );
    for s in SETTINGS {
        let flags = if s.boolean {
            let mut f = codes(s.flags, "--");
            if !s.flags.is_empty() {
                f.push_str(" `[=BOOL]`");
            }
            f
        } else {
            codes(s.flags, "--")
        };
        let (envs, keys) = (codes(s.envs, ""), codes(s.file_keys, ""));
        if let Some(why) = s.not_implemented {
            ignored.push_str(&format!(
                "| {flags} | {envs} | {keys} | {} | {} |\n",
                cell(s.help),
                cell(why)
            ));
            continue;
        }
        let default = match s.default {
            Fallback::Unset => "—".to_string(),
            Fallback::Value(v) => format!("`{}`", cell(v)),
            Fallback::Off(t) | Fallback::Derived(t, _) => cell(t),
        };
        let mut meaning = cell(s.help);
        if s.multi && !s.help.contains("repeat") {
            meaning.push_str(". Repeatable; comma-separated in the environment");
        }
        if let Some(r) = s.requires.and_then(find) {
            meaning.push_str(&format!(". Read only with `--{}`", r.flags[0]));
        }
        if s.secret {
            meaning.push_str(". Secret: `--print-config` shows `***`");
        }
        if s.global {
            meaning.push_str(". Also accepted before the subcommand");
        }
        used.push_str(&format!(
            "| {flags} | {envs} | {keys} | {default} | {meaning} |\n"
        ));
    }
    format!(
        "{BEGIN}\n\n{used}\nAccepted for ncps compatibility and ignored (a warning at start names each \
         one given, unless it is off, empty or ncps' own default):\n\n{ignored}\n{END}"
    )
}

/// Every server setting is in docs/configuration.md as the table declares it (and the real binary
/// accepts each flag and variable listed); every client key, variable and flag is documented.
#[test]
fn configuration_doc_lists_every_setting() {
    let path = repo_root().join(CONFIGURATION_DOC);
    let doc = std::fs::read_to_string(&path).unwrap();
    let (Some(start), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("{CONFIGURATION_DOC}: no generated section ({BEGIN} … {END})");
    };
    let generated = server_settings_markdown();
    let current = &doc[start..end + END.len()];
    if current != generated {
        if std::env::var_os("NIP_UPDATE_DOCS").is_some() {
            let updated = format!("{}{generated}{}", &doc[..start], &doc[end + END.len()..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            panic!(
                "{CONFIGURATION_DOC} is out of date with the settings table: run \
                 NIP_UPDATE_DOCS=1 cargo test -p nip --test e2e configuration_doc"
            );
        }
    }

    // The binary takes what the table declares.
    let help = String::from_utf8(nip(&["serve", "--help"]).stdout).unwrap();
    for s in nip_server::settings::SETTINGS {
        for flag in s.flags {
            assert!(help.contains(&format!("--{flag}")), "--{flag}");
        }
        // A setting without a flag (a token only given in the environment) is not in --help.
        for env in s.envs.iter().filter(|_| !s.flags.is_empty()) {
            assert!(help.contains(env), "{env}");
        }
    }

    // Client: every remote-cache.json key. Built field by field (no `..Default`), so a new key
    // does not compile here until it is documented.
    use nip_client::config::{ConfigFile, PoliciesFile, ServerEntry};
    let all = ConfigFile {
        url: Some("http://a".into()),
        api_key: Some("k".into()),
        timeout: Some(1),
        lookup_timeout: Some(1.5),
        enabled: Some(true),
        servers: vec![ServerEntry {
            url: "http://b".into(),
            priority: 1,
            api_key: Some("k".into()),
        }],
        policies: Some(PoliciesFile {
            upload_on_build: Some(true),
            download_before_build: Some(true),
            fallback_to_local: Some(true),
            retry_attempts: Some(1),
            retry_delay: Some(1.5),
            max_unpack_bytes: Some(1),
            max_unpack_ratio: Some(1),
            max_unpack_entries: Some(1),
        }),
        ca_cert: Some("c".into()),
    };
    let file = serde_json::to_value(&all).unwrap();
    let policies = file["policies"].as_object().unwrap().clone();
    let servers = file["servers"][0].as_object().unwrap().clone();
    for key in file.as_object().unwrap().keys() {
        assert!(
            doc.contains(&format!("`{key}`")),
            "remote-cache.json key {key}"
        );
    }
    for key in policies.keys() {
        assert!(doc.contains(&format!("`policies.{key}`")), "policies.{key}");
    }
    for key in servers.keys() {
        assert!(
            doc.contains(&format!("`servers[].{key}`")),
            "servers[].{key}"
        );
    }
    for var in [
        "NIP_REMOTE_CACHE_URL",
        "NIP_REMOTE_CACHE_API_KEY",
        "NIP_REMOTE_CACHE_ENABLED",
        "NIP_REMOTE_CACHE_CA_CERT",
        "SSL_CERT_FILE",
        "NIP_RECIPES_PATH",
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "NIP_CONFIG_FILE",
        "NCPS_CONFIG_FILE",
    ] {
        assert!(doc.contains(&format!("`{var}`")), "{var}");
    }
    // Every flag of the client commands, as their help lists them.
    for cmd in [
        &["build"][..],
        &["cache", "remote", "config"],
        &["cache", "remote", "status"],
        &["cache", "list"],
        &["cache", "stats"],
        &["recipe", "new"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = String::from_utf8(nip(&args).stdout).unwrap();
        for flag in help
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .flat_map(|l| l.split([' ', ',', '=', '[', '<']))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .filter(|w| *w != "--help")
        {
            assert!(
                doc.contains(&format!("`{flag}")),
                "`nip {}` {flag} is not in {CONFIGURATION_DOC}",
                cmd.join(" ")
            );
        }
    }
}
