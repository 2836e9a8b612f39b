//! Two stateless `nip serve` instances on one PostgreSQL database and one S3 bucket (or, without
//! an S3 server, one shared store directory):
//! what one stores the other serves, a key revoked for one is refused by the other within a
//! second, concurrent misses spread over both cost at most one upstream fetch per instance, and
//! real Nix substitutes through B what A fetched.
use std::process::Command;

use reqwest::blocking::Client;

use crate::common::*;

fn client() -> Client {
    http_client(60)
}

#[test]
fn two_instances_share_postgres_and_the_store() {
    let Some(db) = fresh_database("two_instances_share_postgres_and_the_store") else {
        return;
    };
    let Some(tmp) = nix_tempdir("two_instances_share_postgres_and_the_store") else {
        return;
    };
    let up = tmp.path().join("upstream");
    let (upstream_key, paths) = make_upstream(&up, 8);
    // The upstream logs every request: that is how fetches are counted.
    let log_path = tmp.path().join("upstream.log");
    let (mut upstream, upstream_url) =
        start_static_to(&up.join("cache"), std::fs::File::create(&log_path).unwrap());

    let data = tmp.path().join("shared");
    let common = [
        "--cache-database-url",
        db.as_str(),
        "--upstream-cache",
        upstream_url.as_str(),
        "--upstream-public-key",
        upstream_key.as_str(),
        "--cache-hostname",
        "nip-pair",
    ];
    let admin = create_key(&data, "admin", "admin", &["--cache-database-url", &db]);
    let reader = create_key(&data, "reader", "read", &["--cache-database-url", &db]);
    // Each instance stages incoming bytes in its own temp directory.
    let temp = |n: &str| tmp.path().join(n).display().to_string();
    let (ta, tb) = (temp("tmp-a"), temp("tmp-b"));
    let (a, b) = match fresh_s3_args("pair", &data) {
        Some(s3) => {
            let s3: Vec<&str> = s3.iter().map(String::as_str).collect();
            let start = |t: &str, name: &str| {
                spawn_nip(
                    &tmp.path().join(format!("{name}.log")),
                    &[&common[..], &s3[..], &["--cache-temp-path", t]].concat(),
                    &[],
                )
            };
            (start(&ta, "a"), start(&tb, "b"))
        }
        None => (
            start_nip(&data, &[&common[..], &["--cache-temp-path", &ta]].concat()),
            start_nip(&data, &[&common[..], &["--cache-temp-path", &tb]].concat()),
        ),
    };

    // An artifact uploaded through A downloads through B byte-identical.
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let form = file_form(bytes.clone());
    let up_resp = post_artifact(&client(), &a.url, &admin, "shared-1", form);
    assert_eq!(up_resp.status(), 201);
    let down = get_as(
        &client(),
        &format!("{}/v1/download/shared-1", b.url),
        &reader,
    );
    assert_eq!(down.status(), 200);
    assert!(
        down.bytes().unwrap() == bytes,
        "B served other bytes than A stored"
    );

    // Revoked through the shared database: B refuses within a second.
    let url = format!("{}/v1/artifacts/shared-1", b.url);
    revoke_and_wait_refused(
        &url,
        &reader,
        "reader",
        &data,
        &["--cache-database-url", &db],
    );

    // 20 concurrent requests for one uncached NAR over A and B: at most one fetch per instance.
    let big = &paths[1];
    let hash = store_hash(big);
    let narinfo = get_text(&client(), &format!("{}/{hash}.narinfo", a.url));
    let nar_path = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    assert_eq!(
        client()
            .get(format!("{}/{hash}.narinfo", b.url))
            .send()
            .unwrap()
            .status(),
        200
    );
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let url = format!("{}/{nar_path}", if i % 2 == 0 { &a.url } else { &b.url });
            std::thread::spawn(move || {
                client()
                    .get(url)
                    .send()
                    .and_then(|r| r.bytes())
                    .map(|b| b.len())
            })
        })
        .collect();
    let sizes: Vec<usize> = handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("NAR download"))
        .collect();
    assert!(
        sizes.iter().all(|s| *s == sizes[0] && *s > 1_000_000),
        "{sizes:?}"
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let fetches = log
        .lines()
        .filter(|l| l.contains(&format!("GET /{nar_path}")))
        .count();
    assert!(
        (1..=2).contains(&fetches),
        "{fetches} upstream fetches of one NAR for 20 requests over 2 instances"
    );

    // Real Nix: A fetches everything, the upstream goes away, B serves it all.
    let pubkey = get_text(&client(), &format!("{}/pubkey", a.url));
    assert_eq!(
        pubkey,
        get_text(&client(), &format!("{}/pubkey", b.url)),
        "instances sign with different keys"
    );
    let check = |url: &str| {
        let mut cmd = Command::new(fixture_script("check-substitute.sh"));
        cmd.arg(url)
            .arg(pubkey.trim())
            .args(&paths)
            .env("CHECK_TIMEOUT", "120");
        run_ok(&mut cmd);
    };
    check(&a.url);
    upstream.kill();
    check(&b.url);
}

/// `--s3-presign-downloads`: the lookup hands out a presigned S3 URL that works without our token,
/// and `/v1/download` redirects to one (ranges included); the bytes are the uploaded ones.
#[test]
fn presigned_downloads_are_served_by_s3_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(s3) = fresh_s3_args("presign", tmp.path()) else {
        return;
    };
    let endpoint = std::env::var("NIP_TEST_S3_ENDPOINT").unwrap();
    let db = format!("sqlite:{}", tmp.path().join("db.sqlite").display());
    let token = create_key(
        &tmp.path().join("data"),
        "presign",
        "admin",
        &["--cache-database-url", &db],
    );
    let temp = tmp.path().join("tmp").display().to_string();
    let extra = [
        "--cache-database-url",
        &db,
        "--cache-temp-path",
        &temp,
        "--s3-presign-downloads",
        "--upstream-cache",
        "http://127.0.0.1:9",
        "--upstream-public-key",
        "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
    ];
    let args: Vec<&str> = s3.iter().map(String::as_str).chain(extra).collect();
    let server = spawn_nip(&tmp.path().join("nip.log"), &args, &[]);
    let url = &server.url;
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let resp = post_artifact(
        &client(),
        url,
        &token,
        "presigned-1",
        file_form(bytes.clone()),
    );
    assert_eq!(resp.status(), 201);

    let info: serde_json::Value = get_as(
        &client(),
        &format!("{url}/v1/artifacts/presigned-1"),
        &token,
    )
    .json()
    .unwrap();
    let direct = info["downloadUrl"].as_str().unwrap();
    assert!(direct.starts_with(&endpoint), "not an S3 URL: {direct}");
    assert!(
        direct.contains("X-Amz-Signature="),
        "not presigned: {direct}"
    );
    // No token needed, and the bytes are exactly the upload.
    let got = client().get(direct).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(&got.bytes().unwrap()[..], &bytes[..]);

    let no_redirects = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = get_as(
        &no_redirects,
        &format!("{url}/v1/download/presigned-1"),
        &token,
    );
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap();
    assert!(location.starts_with(&endpoint), "{location}");
    // Following the redirect with a Range gets that range from S3.
    let r = client()
        .get(format!("{url}/v1/download/presigned-1"))
        .bearer_auth(&token)
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().unwrap()[..], &bytes[10..20]);
    // HEAD is answered here; without a token nothing (no URL) is handed out.
    let head = client()
        .head(format!("{url}/v1/download/presigned-1"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        bytes.len().to_string()
    );
    let anon = no_redirects
        .get(format!("{url}/v1/download/presigned-1"))
        .send()
        .unwrap();
    assert_eq!(anon.status(), 401);
    assert!(anon.headers().get("location").is_none());
}
