//! Real Nix (Debian nix-bin 2.8) substitutes through `nip serve` from a signed upstream cache.
use std::process::Command;

use crate::common::*;

/// Nix substitutes every fixture path through nip trusting only nip's key; a wrong key is
/// refused; and once the upstream is gone the paths still come from nip's cache.
#[test]
fn real_nix_substitutes_through_nip_and_from_cache_after_upstream_stops() {
    let Some(tmp) = nix_tempdir("real_nix_substitutes_through_nip") else {
        return;
    };
    let up = tmp.path().join("upstream");
    let (upstream_key, paths) = make_upstream(&up, 4);
    assert_eq!(paths.len(), 3);

    let (mut upstream, upstream_url) = start_static(&up.join("cache"));
    let nip = start_nip_behind(
        &tmp.path().join("nip-data"),
        &upstream_url,
        &upstream_key,
        &["--cache-hostname", "nip-e2e"],
    );
    let (status, body) = http_get(&format!("{}/pubkey", nip.url)).unwrap();
    assert_eq!(status, 200);
    let nip_key = String::from_utf8(body).unwrap().trim().to_string();
    assert!(
        nip_key.starts_with("nip-e2e-1:"),
        "unexpected key {nip_key}"
    );

    let check = |extra: &[&str], key: &str, paths: &[String]| {
        let mut cmd = Command::new(fixture_script("check-substitute.sh"));
        cmd.args(extra)
            .arg(&nip.url)
            .arg(key)
            .args(paths)
            .env("CHECK_TIMEOUT", "120");
        run_ok(&mut cmd)
    };

    // Round 1: through nip, trusting only nip's key.
    check(&[], &nip_key, &paths);

    // A key that signed nothing: the input-addressed path (line 1) is refused for its signature.
    let keys = tmp.path().join("wrong");
    std::fs::create_dir_all(&keys).unwrap();
    run_ok(
        Command::new("nix-store")
            .arg("--generate-binary-cache-key")
            .arg("wrong-1")
            .arg(keys.join("sk"))
            .arg(keys.join("pk")),
    );
    let wrong_key = std::fs::read_to_string(keys.join("pk")).unwrap();
    check(&["--expect-reject"], wrong_key.trim(), &paths[..1]);

    // Round 2: upstream stopped, every path still comes from nip's cache.
    upstream.kill();
    assert!(
        http_get(&format!("{upstream_url}/nix-cache-info")).is_none(),
        "upstream still answers"
    );
    check(&[], &nip_key, &paths);
    // The upstream's own signature is kept, so clients trusting the upstream key work too.
    check(&[], &upstream_key, &paths);
}
