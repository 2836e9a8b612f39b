//! The full authorization matrix against the real binary: every kind of credential against every
//! `/v1` route and the Nix GET, PUT and DELETE endpoints, each with its exact status.
use std::time::Duration;

use reqwest::blocking::{multipart, Client};
use reqwest::Method;

use crate::common::*;
use crate::nix_fixture;

const CREDS: [&str; 8] = [
    "none", "bad", "expired", "revoked", "read", "write", "admin", "prefix",
];

struct Setup {
    server: NipServer,
    _upstream: KillOnDrop,
    tokens: std::collections::HashMap<&'static str, String>,
    data: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

fn setup(extra_args: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut tokens = std::collections::HashMap::new();
    for (cred, scope, extra) in [
        ("read", "read", &[][..]),
        ("write", "write", &[][..]),
        ("admin", "admin", &[][..]),
        ("prefix", "write", &["--prefix", "proj-"][..]),
        ("expired", "admin", &["--expires", "1s"][..]),
        ("revoked", "admin", &[][..]),
    ] {
        tokens.insert(cred, create_key(&data, cred, scope, extra));
    }
    let out = nip(&[
        "keys",
        "revoke",
        "revoked",
        "--cache-data-path",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    tokens.insert(
        "bad",
        "nip_0000000000000000000000000000000000000000000000000".into(),
    );
    // Nix uploads need an upstream that answers "not found" (a dead one makes them 424).
    let (upstream, upstream_url) = start_empty_upstream(&tmp.path().join("upstream"));
    let mut args = vec![
        "--upstream-cache",
        &upstream_url,
        "--upstream-public-key",
        "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
        "--cache-allow-put-verb",
        "--cache-allow-delete-verb",
    ];
    args.extend_from_slice(extra_args);
    let server = start_nip(&data, &args);
    // The expiring key was made before the server started; make sure it is past its time.
    std::thread::sleep(Duration::from_millis(1100));
    Setup {
        server,
        _upstream: upstream,
        tokens,
        data,
        _tmp: tmp,
    }
}

fn client() -> Client {
    http_client(20)
}

fn send(s: &Setup, cred: &str, method: Method, path: &str, body: Option<Body>) -> u16 {
    let mut req = client().request(method, format!("{}{path}", s.server.url));
    if let Some(t) = s.tokens.get(cred) {
        req = req.bearer_auth(t);
    }
    req = match body {
        Some(Body::Artifact(bytes)) => req.multipart(
            multipart::Form::new()
                .part("file", multipart::Part::bytes(bytes))
                .part(
                    "metadata",
                    multipart::Part::text(r#"{"name":"m","version":"1"}"#),
                ),
        ),
        Some(Body::Raw(bytes)) => req.body(bytes),
        None => req,
    };
    req.send().unwrap().status().as_u16()
}

enum Body {
    Artifact(Vec<u8>),
    Raw(Vec<u8>),
}

/// Uploads an artifact as admin, for the read and delete rows.
fn seed_artifact(s: &Setup, key: &str) {
    assert_eq!(
        send(
            s,
            "admin",
            Method::POST,
            &format!("/v1/artifacts/{key}"),
            Some(Body::Artifact(b"seed".to_vec()))
        ),
        201
    );
}

fn seed_nix(s: &Setup) -> nix_fixture::Upload {
    let u = nix_fixture::upload("seed");
    assert_eq!(
        send(
            s,
            "admin",
            Method::PUT,
            &format!("/nar/{}", u.nar_file),
            Some(Body::Raw(u.nar.clone()))
        ),
        200
    );
    assert_eq!(
        send(
            s,
            "admin",
            Method::PUT,
            &format!("/{}.narinfo", u.hash),
            Some(Body::Raw(u.narinfo.clone().into_bytes()))
        ),
        200
    );
    u
}

#[test]
fn every_credential_against_every_route_gives_the_exact_status() {
    let s = setup(&[]);
    seed_artifact(&s, "base-x");
    seed_artifact(&s, "proj-x");
    let nix = seed_nix(&s);
    let mut failures = Vec::new();

    // Expected status per credential, in CREDS order.
    type Row = (&'static str, [u16; 8]);
    let read_row: [u16; 8] = [401, 401, 401, 401, 200, 200, 200, 403];
    let rows: Vec<(Method, String, Row)> = vec![
        (Method::GET, "/v1/health".into(), ("health", [200; 8])),
        (
            Method::GET,
            "/v1/artifacts/base-x".into(),
            ("lookup", read_row),
        ),
        (
            Method::GET,
            "/v1/artifacts/proj-x".into(),
            ("lookup in prefix", [401, 401, 401, 401, 200, 200, 200, 200]),
        ),
        (
            Method::GET,
            "/v1/artifacts/base-x/metadata".into(),
            ("metadata", read_row),
        ),
        (
            Method::GET,
            "/v1/download/base-x".into(),
            ("download", read_row),
        ),
        (
            Method::HEAD,
            "/v1/download/base-x".into(),
            ("download HEAD", read_row),
        ),
        (
            Method::GET,
            "/v1/artifacts?name=m".into(),
            ("list", [401, 401, 401, 401, 200, 200, 200, 200]),
        ),
        (
            Method::GET,
            "/nix-cache-info".into(),
            ("nix-cache-info", [200, 401, 401, 401, 200, 200, 200, 200]),
        ),
        (
            Method::GET,
            format!("/{}.narinfo", nix.hash),
            ("narinfo GET", [200, 401, 401, 401, 200, 200, 200, 200]),
        ),
        (
            Method::GET,
            format!("/nar/{}", nix.nar_file),
            ("NAR GET", [200, 401, 401, 401, 200, 200, 200, 200]),
        ),
        (
            Method::PUT,
            format!("/nar/{}", nix.nar_file),
            ("NAR PUT", [401, 401, 401, 401, 403, 200, 200, 403]),
        ),
    ];
    for (method, path, (what, want)) in &rows {
        for (i, cred) in CREDS.iter().enumerate() {
            let body = (*method == Method::PUT).then(|| Body::Raw(nix.nar.clone()));
            let got = send(&s, cred, method.clone(), path, body);
            if got != want[i] {
                failures.push(format!(
                    "{what} {method} {path} as {cred}: got {got}, want {}",
                    want[i]
                ));
            }
        }
    }
    // Writes and deletes: each credential acts on its own key so earlier rows do not interfere.
    for (i, cred) in CREDS.iter().enumerate() {
        let checks: [(&str, Method, String, Option<Body>, u16); 5] = [
            (
                "upload",
                Method::POST,
                format!("/v1/artifacts/new-{cred}"),
                Some(Body::Artifact(cred.as_bytes().to_vec())),
                [401, 401, 401, 401, 403, 201, 201, 403][i],
            ),
            (
                "upload in prefix",
                Method::POST,
                format!("/v1/artifacts/proj-new-{cred}"),
                Some(Body::Artifact(cred.as_bytes().to_vec())),
                [401, 401, 401, 401, 403, 201, 201, 201][i],
            ),
            (
                "artifact DELETE",
                Method::DELETE,
                format!("/v1/artifacts/del-{cred}"),
                None,
                [401, 401, 401, 401, 403, 403, 204, 403][i],
            ),
            (
                "narinfo DELETE",
                Method::DELETE,
                format!("/{}.narinfo", nix_fixture_for(&s, cred).hash),
                None,
                [401, 401, 401, 401, 403, 403, 204, 403][i],
            ),
            (
                "narinfo PUT",
                Method::PUT,
                format!("/{}.narinfo", nix.hash),
                Some(Body::Raw(nix.narinfo.clone().into_bytes())),
                [401, 401, 401, 401, 403, 200, 200, 403][i],
            ),
        ];
        seed_artifact(&s, &format!("del-{cred}"));
        for (what, method, path, body, want) in checks {
            let got = send(&s, cred, method.clone(), &path, body);
            if got != want {
                failures.push(format!(
                    "{what} {method} {path} as {cred}: got {got}, want {want}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn nix_fixture_for(s: &Setup, _cred: &str) -> nix_fixture::Upload {
    seed_nix(s)
}

#[test]
fn nix_reads_need_a_read_key_when_required_and_accept_basic_auth() {
    let s = setup(&["--cache-require-auth-read"]);
    let nix = seed_nix(&s);
    let path = format!("/{}.narinfo", nix.hash);
    assert_eq!(send(&s, "none", Method::GET, &path, None), 401);
    assert_eq!(send(&s, "read", Method::GET, &path, None), 200);
    assert_eq!(
        send(
            &s,
            "none",
            Method::GET,
            &format!("/nar/{}", nix.nar_file),
            None
        ),
        401
    );
    // What Nix sends from a netrc file: Basic with the token as password.
    let resp = client()
        .get(format!("{}{path}", s.server.url))
        .basic_auth("nix", Some(&s.tokens["read"]))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .get(format!("{}{path}", s.server.url))
        .basic_auth("nix", Some("wrong"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
}

#[test]
fn a_revoked_key_is_refused_within_a_second_without_restart() {
    let s = setup(&[]);
    let token = create_key(&s.data, "short-lived", "read", &[]);
    let url = format!("{}/v1/artifacts?limit=1", s.server.url);
    revoke_and_wait_refused(&url, &token, "short-lived", &s.data, &[]);
}

#[test]
fn env_api_key_is_a_read_write_key() {
    let tmp = tempfile::tempdir().unwrap();
    let token = "env-token-0123456789abcdef";
    let server = start_nip_env(
        &tmp.path().join("data"),
        &[
            "--upstream-cache",
            "http://127.0.0.1:9",
            "--upstream-public-key",
            "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
        ],
        &[("NIP_CACHE_API_KEY", token)],
    );
    let up = post_artifact(
        &client(),
        &server.url,
        token,
        "env-k",
        file_form(b"x".to_vec()),
    );
    assert_eq!(up.status(), 201);
    let del = client()
        .delete(format!("{}/v1/artifacts/env-k", server.url))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert_eq!(del.status(), 403, "the env key must not be admin");
    let anon = client()
        .get(format!("{}/v1/artifacts/env-k", server.url))
        .send()
        .unwrap();
    assert_eq!(anon.status(), 401);
}
