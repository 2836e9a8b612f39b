//! MariaDB/MySQL as the metadata database: the real `nip serve` on a `mysql://` URL (the test
//! MariaDB server `./scripts/test.sh` starts), real Nix substituting through it, and a /v1
//! artifact round trip.
use sqlx::Connection;

use crate::common::*;

/// A new, empty database on the test MariaDB server, or `None` when there is none (a failure
/// when the test command requires it).
pub fn fresh_mysql_database(test: &str) -> Option<String> {
    let admin = test_server("NIP_TEST_MYSQL_URL", test)?;
    let name = format!("nip_e2e_{}_{}", std::process::id(), rand::random::<u32>());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = sqlx::mysql::MySqlConnection::connect(&admin)
            .await
            .expect("connect to NIP_TEST_MYSQL_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    });
    let base = admin.split('?').next().unwrap();
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    Some(format!("{base}/{name}"))
}

#[test]
fn nix_substitutes_and_artifacts_round_trip_on_mariadb() {
    let test = "nix_substitutes_and_artifacts_round_trip_on_mariadb";
    let Some(db) = fresh_mysql_database(test) else {
        return;
    };
    if !nix_available(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ((upstream_key, paths), (mut upstream, upstream_url)) =
        serve_upstream(&tmp.path().join("upstream"), 2);
    let data = tmp.path().join("nip-data");
    // API keys live in the metadata database too.
    let admin = create_key(&data, "admin", "admin", &["--cache-database-url", &db]);
    let serve = || {
        start_nip(
            &data,
            &[
                "--cache-database-url",
                &db,
                "--upstream-cache",
                &upstream_url,
                "--upstream-public-key",
                &upstream_key,
                "--cache-hostname",
                "nip-mysql",
            ],
        )
    };
    let nip = serve();
    // Nothing went to a SQLite file: the database is MariaDB's.
    assert!(!data.join("db/db.sqlite").exists());
    let (status, body) = http_get(&format!("{}/pubkey", nip.url)).unwrap();
    assert_eq!(status, 200);
    let nip_key = String::from_utf8(body).unwrap().trim().to_string();

    let check = |key: &str| check_substitute(&nip.url, key, &paths);
    // Through nip from the upstream, then with the upstream gone: from nip's cache.
    check(&nip_key);
    upstream.kill();
    check(&nip_key);
    check(&upstream_key);

    // A /v1 artifact: upload, metadata, listing, download, immutability.
    let client = http_client(60);
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let upload = |key: &str, bytes: Vec<u8>| {
        let form = reqwest::blocking::multipart::Form::new()
            .part(
                "metadata",
                reqwest::blocking::multipart::Part::text(
                    r#"{"name": "pkg", "version": "1.0", "note": "ünïcode"}"#,
                ),
            )
            .part("file", reqwest::blocking::multipart::Part::bytes(bytes));
        post_artifact(&client, &nip.url, &admin, key, form)
            .status()
            .as_u16()
    };
    let get = |path: &str| get_as(&client, &format!("{}{path}", nip.url), &admin);
    assert_eq!(upload("Pkg-1.0", bytes.clone()), 201);
    // Keys are case-sensitive: a second artifact, not a clash.
    assert_eq!(upload("pkg-1.0", b"other".to_vec()), 201);
    assert_eq!(upload("Pkg-1.0", b"changed".to_vec()), 409);
    let info: serde_json::Value = get("/v1/artifacts/Pkg-1.0").json().unwrap();
    assert_eq!(info["size"], 300_000, "{info}");
    let meta: serde_json::Value = get("/v1/artifacts/Pkg-1.0/metadata").json().unwrap();
    assert_eq!(meta["note"], "ünïcode", "{meta}");
    let list: serde_json::Value = get("/v1/artifacts?name=pkg&version=1.0").json().unwrap();
    let listed = list.to_string();
    assert!(
        listed.contains("Pkg-1.0") && listed.contains("pkg-1.0"),
        "{listed}"
    );
    let dl = get("/v1/download/Pkg-1.0");
    assert_eq!(dl.status(), 200);
    assert_eq!(dl.bytes().unwrap().to_vec(), bytes);
    assert_eq!(
        get("/v1/download/pkg-1.0").bytes().unwrap().as_ref(),
        b"other"
    );

    // A restart on the same database keeps the signing key and everything recorded.
    drop(nip);
    let nip = serve();
    let (_, body) = http_get(&format!("{}/pubkey", nip.url)).unwrap();
    assert_eq!(String::from_utf8(body).unwrap().trim(), nip_key);
    let hash = store_hash(&paths[0]);
    let (status, _) = http_get(&format!("{}/{hash}.narinfo", nip.url)).unwrap();
    assert_eq!(status, 200);
    let dl = get_as(&client, &format!("{}/v1/download/Pkg-1.0", nip.url), &admin);
    assert_eq!(dl.bytes().unwrap().to_vec(), bytes);
}
