//! HTTPS end to end against the real binary: `nip serve --tls-cert/--tls-key` with a test CA made
//! by rcgen; the client with and without `--ca-cert` (a clear TLS error, and the build still
//! succeeds by building); HTTP/2 by ALPN and TLS 1.2; certificate reload on SIGHUP and on file
//! change without dropping an open connection; real Nix substituting over HTTPS; and
//! `--trusted-proxies` in the audit log.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};

use crate::client_env::*;
use crate::common::*;

/// A test CA and the files of one server certificate it signed.
pub struct TestPki {
    pub ca_pem: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

impl TestPki {
    pub fn new(dir: &Path) -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nip test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        TestPki {
            ca_pem,
            ca,
            dir: dir.to_path_buf(),
        }
    }

    /// Issues a certificate for `hosts` and writes `<name>.crt` / `<name>.key`; returns the paths
    /// and the certificate's DER.
    pub fn issue(&self, name: &str, hosts: &[&str]) -> (PathBuf, PathBuf, Vec<u8>) {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(hosts).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert.der().to_vec())
    }
}

/// A blocking reqwest client that trusts the test CA.
fn https_client(ca_pem: &Path) -> reqwest::blocking::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_pem).unwrap()).unwrap();
    reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Starts `nip serve` over HTTPS on a free loopback port; waits for `/healthz` over TLS.
pub fn start_https(
    data: &Path,
    ca_pem: &Path,
    cert: &Path,
    key: &Path,
    args: &[&str],
) -> NipServer {
    let port = free_port();
    let log = std::fs::File::create(data.with_extension("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nip"))
        .arg("serve")
        .arg("--cache-data-path")
        .arg(data)
        .arg("--server-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(args)
        .env("LOG_LEVEL", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start nip serve");
    let server = NipServer {
        child: KillOnDrop(child),
        url: format!("https://127.0.0.1:{port}"),
    };
    let client = https_client(ca_pem);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = client
            .get(format!("{}/healthz", server.url))
            .send()
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer over HTTPS; log: {}",
            server.url,
            std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A rustls client config trusting `ca_pem`, limited to `versions`.
fn rustls_config(
    ca_pem: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

type TlsConn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Opens a TLS connection to `url` (https://127.0.0.1:PORT) and finishes the handshake.
fn tls_connect(url: &str, config: Arc<rustls::ClientConfig>) -> TlsConn {
    let addr = url.trim_start_matches("https://");
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// SHA-256 of the certificate a new connection is served.
fn served_fingerprint(url: &str, ca_pem: &Path) -> String {
    let tls = tls_connect(url, rustls_config(ca_pem, rustls::DEFAULT_VERSIONS));
    let der = tls.conn.peer_certificates().unwrap()[0].to_vec();
    format!("{:x}", Sha256::digest(der))
}

/// Sends `GET /healthz` (keep-alive) on an open connection and returns the status line.
fn healthz_on(tls: &mut TlsConn) -> String {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    tls.flush().unwrap();
    let mut buf = [0u8; 4096];
    let n = tls.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.lines().next().unwrap_or_default().to_string()
}

fn fingerprint(der: &[u8]) -> String {
    format!("{:x}", Sha256::digest(der))
}

/// A client that trusts the server's private CA works over HTTPS end to end; one that does not
/// gets a one-line TLS error naming the unknown CA, and its build still succeeds by building.
#[test]
fn https_round_trip_with_private_ca_and_build_falls_back_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::new(tmp.path());
    let (cert, key, _) = pki.issue("server", &["127.0.0.1"]);
    let data = tmp.path().join("server-data");
    let write_key = create_key(&data, "ci-writer", "write", &[]);
    let server = start_https(&data, &pki.ca_pem, &cert, &key, &DUMMY_UPSTREAM);
    let recipes = write_recipes(tmp.path());
    let ca = pki.ca_pem.to_str().unwrap();

    // HTTP/2 is negotiated by ALPN; TLS 1.2 clients are served too.
    let resp = https_client(&pki.ca_pem)
        .get(format!("{}/v1/health", server.url))
        .send()
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut tls12 = tls_connect(
        &server.url,
        rustls_config(&pki.ca_pem, &[&rustls::version::TLS12]),
    );
    assert_eq!(
        tls12.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(healthz_on(&mut tls12), "HTTP/1.1 200 OK");

    // Machine A trusts the CA: status is fine, it builds and uploads over HTTPS.
    let a = Machine::new(tmp.path(), "machine-a", &recipes);
    a.configure_remote(&server.url, &write_key, &["--ca-cert", ca]);
    run_ok(
        a.cmd(&["cache", "remote", "status"])
            .env_remove("SSL_CERT_FILE"),
    );
    let (ra, _) = a.build(&["hello", "+python"]);
    assert_eq!(
        (ra["source"].as_str(), ra["uploaded"].as_bool()),
        (Some("built"), Some(true))
    );

    // Machine B does not trust it: a clear reason, no hang, and the build builds.
    let b = Machine::new(tmp.path(), "machine-b", &recipes);
    b.configure_remote(&server.url, &write_key, &[]);
    let status = b
        .cmd(&["cache", "remote", "status", "--json"])
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    assert!(!status.status.success());
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let reason = report["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("TLS") && reason.contains("unknown CA"),
        "{report}"
    );
    assert!(!reason.contains('\n'));
    let started = Instant::now();
    let out = b
        .cmd(&["build", "hello", "+python", "--ci"])
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a TLS failure must not be retried for long"
    );
    assert!(
        stderr.contains("certificate signed by an unknown CA"),
        "{stderr}"
    );
    assert!(stderr.contains("source=built hits=0 misses=1"), "{stderr}");
    assert_eq!(b.builds_run(), 1);

    // The wrong host name is named as such (the certificate is for 127.0.0.1 only).
    let port = server.url.rsplit(':').next().unwrap();
    let c = Machine::new(tmp.path(), "machine-c", &recipes);
    let localhost = format!("https://localhost:{port}");
    c.configure_remote(&localhost, &write_key, &["--ca-cert", ca]);
    let status = c
        .cmd(&["cache", "remote", "status", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not valid for host \"localhost\""),
        "{report}"
    );

    // SSL_CERT_FILE works as well as --ca-cert: B now downloads instead of building, and the
    // --ci summary line reports the hit and the time it saved.
    let ci_build = |m: &Machine| {
        let out = m
            .cmd(&["build", "hello", "+python", "--ci"])
            .env("SSL_CERT_FILE", ca)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    ci_build(&b);
    // B's local cache already has its own build: drop it so the remote must answer.
    let d = Machine::new(tmp.path(), "machine-d", &recipes);
    d.configure_remote(&server.url, &write_key, &[]);
    let stderr = ci_build(&d);
    assert!(
        stderr.contains("source=remote hits=1 misses=0 saved="),
        "{stderr}"
    );
    assert_eq!(d.builds_run(), 0);
}

/// Replacing the certificate files and sending SIGHUP (or only changing the files) makes new
/// connections get the new certificate, while a connection opened before keeps working.
#[test]
fn certificate_reloads_on_sighup_and_file_change_without_dropping_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::new(tmp.path());
    let (cert, key, der1) = pki.issue("first", &["127.0.0.1"]);
    let server = start_https(
        &tmp.path().join("data"),
        &pki.ca_pem,
        &cert,
        &key,
        &DUMMY_UPSTREAM,
    );
    assert_eq!(
        served_fingerprint(&server.url, &pki.ca_pem),
        fingerprint(&der1)
    );
    let mut open = tls_connect(
        &server.url,
        rustls_config(&pki.ca_pem, rustls::DEFAULT_VERSIONS),
    );
    assert_eq!(healthz_on(&mut open), "HTTP/1.1 200 OK");

    let replace = |name: &str| {
        let (c, k, der) = pki.issue(name, &["127.0.0.1"]);
        // Rename over the served paths, as cert tooling does (each file appears whole).
        std::fs::rename(&k, &key).unwrap();
        std::fs::rename(&c, &cert).unwrap();
        der
    };
    let wait_for = |der: &[u8], what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while served_fingerprint(&server.url, &pki.ca_pem) != fingerprint(der) {
            assert!(
                Instant::now() < deadline,
                "{what}: the new certificate was not served"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let der2 = replace("second");
    let pid = server.child.0.id().to_string();
    run_ok(Command::new("kill").args(["-HUP", &pid]));
    wait_for(&der2, "SIGHUP");
    assert_eq!(
        healthz_on(&mut open),
        "HTTP/1.1 200 OK",
        "the old connection survives"
    );

    // No signal: the file watcher notices the change.
    std::thread::sleep(Duration::from_millis(1100)); // a new mtime even on coarse clocks
    let der3 = replace("third");
    wait_for(&der3, "file change");
    assert_eq!(healthz_on(&mut open), "HTTP/1.1 200 OK");
    assert_eq!(
        open.conn.peer_certificates().unwrap()[0].as_ref(),
        der1.as_slice(),
        "an open connection keeps the certificate it was handshaken with"
    );
}

/// Real Nix (2.8) substitutes from `nip serve` over HTTPS, trusting the test CA through
/// NIX_SSL_CERT_FILE (what `ssl-cert-file` in nix.conf sets).
#[test]
fn real_nix_substitutes_over_https() {
    let Some(tmp) = nix_tempdir("real_nix_substitutes_over_https") else {
        return;
    };
    let ((upstream_key, paths), (_upstream, upstream_url)) =
        serve_upstream(&tmp.path().join("upstream"), 2);
    let pki = TestPki::new(tmp.path());
    let (cert, key, _) = pki.issue("server", &["127.0.0.1"]);
    let nip = start_https(
        &tmp.path().join("nip-data"),
        &pki.ca_pem,
        &cert,
        &key,
        &[
            "--upstream-cache",
            &upstream_url,
            "--upstream-public-key",
            &upstream_key,
            "--cache-hostname",
            "nip-tls",
        ],
    );
    let nip_key = https_client(&pki.ca_pem)
        .get(format!("{}/pubkey", nip.url))
        .send()
        .unwrap()
        .text()
        .unwrap()
        .trim()
        .to_string();
    assert!(nip_key.starts_with("nip-tls-1:"), "{nip_key}");
    run_ok(
        Command::new(fixture_script("check-substitute.sh"))
            .arg(&nip.url)
            .arg(&nip_key)
            .args(&paths)
            .env("NIX_SSL_CERT_FILE", &pki.ca_pem)
            .env("CHECK_TIMEOUT", "120"),
    );
}

/// Audit entries name the client from X-Forwarded-For only when the peer is a trusted proxy.
#[test]
fn trusted_proxies_decide_whose_address_is_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let audited_ip = |trusted: &[&str], name: &str| {
        let data = tmp.path().join(name);
        create_key(&data, "k", "read", &[]);
        let mut args = DUMMY_UPSTREAM.to_vec();
        args.extend_from_slice(trusted);
        let server = start_nip(&data, &args);
        let resp = reqwest::blocking::Client::new()
            .get(format!("{}/v1/artifacts/x", server.url))
            .bearer_auth("nip_not_a_real_token")
            .header("X-Forwarded-For", "203.0.113.50, 198.51.100.7")
            .send()
            .unwrap();
        assert_eq!(resp.status(), 401);
        let text = serde_json::Value::from(audit(&data)).to_string();
        if text.contains("198.51.100.7") {
            "198.51.100.7"
        } else if text.contains("127.0.0.1") {
            "127.0.0.1"
        } else {
            panic!("no address in the audit log: {text}")
        }
    };
    assert_eq!(
        audited_ip(&[], "direct"),
        "127.0.0.1",
        "untrusted peers' headers are ignored"
    );
    assert_eq!(
        audited_ip(&["--trusted-proxies", "127.0.0.0/8"], "proxied"),
        "198.51.100.7",
        "the rightmost untrusted hop, not the client-written leftmost one"
    );
}
