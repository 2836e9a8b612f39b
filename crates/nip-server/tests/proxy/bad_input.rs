//! Hostile and malformed request paths: 400 or 404, never a file-system access outside the store.
use crate::harness::*;

#[tokio::test]
async fn bad_paths_are_refused_without_touching_the_file_system() {
    let key = upstream_key();
    let (up, nip) = nip_over(&key, &[]).await;
    // A file next to the store that traversal would reach.
    std::fs::write(nip.dir.path().join("data/secret.txt"), "top secret").unwrap();
    let long = "a".repeat(5000);
    let cases: Vec<(String, &[u16])> = vec![
        ("/nar/../../etc/passwd".into(), &[400, 404]),
        ("/nar/..%2f..%2fetc%2fpasswd".into(), &[400]),
        ("/nar/%2e%2e%2f%2e%2e%2fsecret.txt".into(), &[400]),
        ("/nar/..%2Fsecret.txt".into(), &[400]),
        ("/nar/....//....//etc/passwd".into(), &[400, 404]),
        ("/nar/secret.txt".into(), &[400]),
        (
            "/nar/0000000000000000000000000000000000000000000000000000.tar".into(),
            &[400],
        ),
        (
            "/nar/000000000000000000000000000000000000000000000000000.nar".into(),
            &[400],
        ),
        (
            "/nar/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.nar".into(),
            &[400],
        ),
        (format!("/nar/{long}.nar"), &[400]),
        ("/nar/%00.nar".into(), &[400]),
        ("/..%2fsecret.txt.narinfo".into(), &[400]),
        ("/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo".into(), &[400]),
        ("/0000.narinfo".into(), &[400]),
        (format!("/{long}.narinfo"), &[400]),
        ("/secret.txt".into(), &[404]),
        ("/data/secret.txt".into(), &[404]),
        ("/%2e%2e/%2e%2e/etc/passwd".into(), &[404]),
    ];
    let hits_before = up.total_hits();
    for (path, allowed) in cases {
        let url = format!("{}{path}", nip.url);
        let resp = client().get(&url).send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert!(
            allowed.contains(&status),
            "{path}: got {status}, want one of {allowed:?}"
        );
        assert!(
            !body.contains("top secret") && !body.contains("root:"),
            "{path}: leaked a file"
        );
        assert!(
            !body.contains(&nip.dir.path().display().to_string()),
            "{path}: leaked a path"
        );
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}"));
        assert!(json["error"].is_string(), "{path}: {body}");
    }
    // No request reached the upstream: validation happens before any lookup.
    assert_eq!(up.total_hits(), hits_before);
}

#[tokio::test]
async fn nar_unknown_to_the_index_is_404_without_upstream_request() {
    let key = upstream_key();
    let (up, nip) = nip_over(&key, &[]).await;
    let file = format!("{}.nar.xz", nip_core::base32::encode(&[7u8; 32]));
    assert_eq!(get(&format!("{}/nar/{file}", nip.url)).await.0, 404);
    assert_eq!(up.hits(&format!("nar/{file}")), 0);
}
