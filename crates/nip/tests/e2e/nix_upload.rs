//! Real `nix copy --to http://…` into `nip serve` with a netrc key: a write key uploads, a read key
//! is refused with a 4xx (never a hang), and a fresh store then substitutes the uploaded paths.
use std::process::Command;

use crate::common::*;

#[test]
fn nix_copy_with_a_write_key_uploads_and_a_fresh_store_substitutes() {
    let Some(tmp) = nix_tempdir("nix_copy_with_a_write_key_uploads") else {
        return;
    };
    // Local store paths to upload (the fixture also writes a signed file:// cache we ignore).
    let up = tmp.path().join("paths");
    let (upstream_key, paths) = make_upstream(&up, 2);

    let data = tmp.path().join("data");
    let (write, read) = writer_and_reader(&data);
    // An upstream that answers "not found": with a dead one, nip refuses new paths (424).
    let (_upstream, server) = start_upload_nip(
        tmp.path(),
        &data,
        &upstream_key,
        &["--cache-hostname", "nip-up"],
    );
    let copy = |token: &str| {
        let mut cmd = Command::new("timeout");
        cmd.args(["120", "nix", "copy", "--to", &server.url])
            .args(&paths)
            .arg("--option")
            .arg("netrc-file")
            .arg(netrc(tmp.path(), token))
            .args(["--option", "connect-timeout", "5"]);
        run(&mut cmd)
    };

    let refused = copy(&read);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "nix copy with a read key succeeded"
    );
    assert_ne!(
        refused.status.code(),
        Some(124),
        "nix copy with a read key hung: {stderr}"
    );
    assert!(
        stderr.contains("403"),
        "expected an HTTP 403 from nix copy, got: {stderr}"
    );

    let ok = copy(&write);
    assert!(
        ok.status.success(),
        "nix copy with a write key failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let (status, body) = http_get(&format!("{}/pubkey", server.url)).unwrap();
    assert_eq!(status, 200);
    let nip_key = String::from_utf8(body).unwrap();
    let mut check = Command::new(fixture_script("check-substitute.sh"));
    check
        .arg(&server.url)
        .arg(nip_key.trim())
        .args(&paths)
        .env("CHECK_TIMEOUT", "120");
    run_ok(&mut check);

    let audit = nip(&[
        "audit",
        "--json",
        "--key",
        "uploader",
        "--cache-data-path",
        data.to_str().unwrap(),
    ]);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&audit.stdout).unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "nar-upload" && e["result"] == "200"),
        "{entries:?}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "narinfo-upload" && e["result"] == "200"),
        "{entries:?}"
    );
}
