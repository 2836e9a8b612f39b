//! The database goes away and comes back: requests that need it fail fast with 503 (not a hang,
//! not a crash), liveness stays up, and service resumes without restarting `nip serve`.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::blocking::{multipart, Client};

use crate::common::*;

/// A throwaway PostgreSQL cluster of this test's own (restarting the shared one would disturb
/// other tests), stopped on drop.
struct Postgres {
    port: u16,
    dir: PathBuf,
}

impl Postgres {
    /// `scripts/run-postgres.sh PORT DIR cmd` for this cluster.
    fn script(&self, cmd: &str) -> Command {
        let mut c = Command::new(repo_root().join("scripts/run-postgres.sh"));
        c.arg(self.port.to_string())
            .arg(&self.dir)
            .arg(cmd)
            .env("PG_FAST", "1");
        c
    }

    fn ctl(&self, cmd: &str) -> String {
        run_ok(&mut self.script(cmd))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.script("stop").output();
    }
}

fn upload(c: &Client, url: &str, token: &str, key: &str, bytes: &[u8]) -> u16 {
    let form = multipart::Form::new().part("file", multipart::Part::bytes(bytes.to_vec()));
    c.post(format!("{url}/v1/artifacts/{key}"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Status of a GET and how long it took.
fn timed_get(c: &Client, url: &str, token: &str) -> (u16, Duration) {
    let t = Instant::now();
    let status = c
        .get(url)
        .bearer_auth(token)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    (status, t.elapsed())
}

#[test]
fn database_restart_gives_fast_503s_and_service_resumes_without_a_server_restart() {
    let test = "database_restart";
    if test_server("NIP_TEST_POSTGRES_URL", test).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The cluster runs as the postgres user, which must reach its directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pg = Postgres {
        port: free_port(),
        dir: tmp.path().join("pg"),
    };
    let db = pg.ctl("start").trim().lines().last().unwrap().to_string();
    let data: &Path = &tmp.path().join("data");
    let token = create_key(data, "outage", "admin", &["--cache-database-url", &db]);
    // A dead upstream: nothing may leave the machine, and misses must be decided by the database.
    let upstream_key = "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=";
    let server = start_nip(
        data,
        &[
            "--cache-database-url",
            &db,
            "--upstream-cache",
            "http://127.0.0.1:9",
            "--upstream-public-key",
            upstream_key,
        ],
    );
    let url = &server.url;
    let c = http_client(60);
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(upload(&c, url, &token, "before", &bytes), 201);

    pg.ctl("stop");
    // Everything that needs the database: a fast 503, never a hang or a dropped connection.
    let missing = format!("{url}/{}.narinfo", "0".repeat(32));
    for path in [
        format!("{url}/v1/artifacts/before"),
        format!("{url}/v1/download/before"),
        format!("{url}/v1/health"),
        missing,
    ] {
        let (status, took) = timed_get(&c, &path, &token);
        assert_eq!(status, 503, "{path} while the database is down");
        assert!(took < Duration::from_secs(15), "{path}: 503 took {took:?}");
    }
    assert_eq!(upload(&c, url, &token, "during", &bytes), 503);
    // Liveness does not depend on the database: an orchestrator must not restart us for it.
    assert_eq!(http_get(&format!("{url}/healthz")).map(|r| r.0), Some(200));

    pg.ctl("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = timed_get(&c, &format!("{url}/v1/artifacts/before"), &token);
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery 30 s after the database came back: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = get_as(&c, &format!("{url}/v1/download/before"), &token)
        .bytes()
        .unwrap();
    assert_eq!(&got[..], &bytes[..], "bytes stored before the outage");
    assert_eq!(upload(&c, url, &token, "after", &bytes), 201);
    // The refused upload left nothing behind: not listed, no temp file.
    let (status, _) = timed_get(&c, &format!("{url}/v1/artifacts/during"), &token);
    assert_eq!(status, 404);
    assert_eq!(std::fs::read_dir(data.join("tmp")).unwrap().count(), 0);
    let mut child = server.child;
    assert!(child.0.try_wait().unwrap().is_none(), "the server exited");
}
