//! Observability through the real binary: a real Prometheus scrapes `/metrics` and sees a counter
//! move (and `promtool check metrics` accepts the output); the status page renders in headless
//! Chromium with the facts an operator needs and no secret; `/` speaks ncps' JSON to JSON clients.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const DUMMY_UPSTREAM: [&str; 4] = [
    "--upstream-cache",
    "http://127.0.0.1:9",
    "--upstream-public-key",
    "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
];

fn http() -> reqwest::blocking::Client {
    http_client(10)
}

#[test]
fn real_prometheus_scrapes_a_counter_that_moves_and_promtool_accepts_the_metrics() {
    if !tool_available("prometheus", "prometheus test")
        || !tool_available("promtool", "prometheus test")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut args = DUMMY_UPSTREAM.to_vec();
    args.push("--prometheus-enabled");
    let server = start_nip(&tmp.path().join("data"), &args);
    for _ in 0..7 {
        assert_eq!(
            http()
                .get(format!("{}/nix-cache-info", server.url))
                .send()
                .unwrap()
                .status(),
            200
        );
    }
    // A narinfo miss asks the (unreachable) upstream: that moves the upstream counters.
    let miss = http()
        .get(format!("{}/{}.narinfo", server.url, "0".repeat(32)))
        .send()
        .unwrap();
    assert_eq!(miss.status(), 404);
    // Issue 19's probe: made-up HTTP methods must not each become a time series.
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("PROBE{i:04}X").as_bytes()).unwrap();
        let resp = http()
            .request(method, format!("{}/", server.url))
            .send()
            .unwrap();
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }
    let metrics = get_text(&http(), &format!("{}/metrics", server.url));
    assert!(
        !metrics.contains("PROBE"),
        "a made-up method became a label"
    );
    assert!(
        metrics.contains("method=\"other\""),
        "made-up methods are counted as other"
    );
    for name in [
        "nip_http_requests_total",
        "nip_http_request_duration_seconds_bucket",
        "nip_store_size_bytes",
        "nip_upstream_requests_total",
        "nip_cache_misses_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    // ncps' metric names (shown by default) break promtool's naming lints only.
    let problems = promtool_problems(&metrics, "prometheus test").unwrap();
    assert!(problems.is_empty(), "promtool check metrics: {problems:?}");

    let target = server.url.trim_start_matches("http://");
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(&config, format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: nip\n    static_configs:\n      - targets: ['{target}']\n")).unwrap();
    let port = free_port();
    let _prom = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    );
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=nip_http_requests_total%7Broute%3D%22%2Fnix-cache-info%22%2Cstatus%3D%22200%22%7D"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let answer = http()
            .get(&query)
            .send()
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok());
        if let Some(v) = answer
            .as_ref()
            .and_then(|a| a["data"]["result"][0]["value"][1].as_str())
        {
            break v.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never reported the counter: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(value, "7", "Prometheus saw the counter at {value}");
}

#[test]
fn status_page_renders_in_chromium_without_secrets_and_root_speaks_ncps_json() {
    if !tool_available("chromium", "status page test") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let secret = "env-secret-token-0123456789";
    let mut args = DUMMY_UPSTREAM.to_vec();
    args.extend(["--cache-hostname", "status-test", "--cache-max-size", "1G"]);
    let server = start_nip_env(
        &tmp.path().join("data"),
        &args,
        &[("NIP_CACHE_API_KEY", secret)],
    );
    let json: serde_json::Value = http()
        .get(&server.url)
        .header("accept", "application/json")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(json["hostname"], "status-test");
    let pubkey = json["publicKey"].as_str().unwrap().to_string();
    assert!(pubkey.starts_with("status-test-1:"));

    let chromium = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!(
                "--user-data-dir={}",
                tmp.path().join("chromium").display()
            ))
            .args(extra)
            .arg(&server.url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let dom = chromium(&["--dump-dom"]);
    for want in [
        "nip cache",
        "status-test",
        &pubkey,
        "substituters = http://127.0.0.1",
        "of 1.0 GiB",
        "http://127.0.0.1:9/",
        "nip cache remote config",
    ] {
        assert!(dom.contains(want), "rendered page lacks {want:?}:\n{dom}");
    }
    assert!(!dom.contains(secret), "the status page shows a secret");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nip-status.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[
        "--window-size=1200,1400",
        &format!("--screenshot={}", shot.display()),
    ]);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot is not a real PNG ({} bytes)",
        png.len()
    );
}

/// Issue 19's probe as a test: a password in an upstream, database or collector URL never reaches
/// the terminal when the start fails on that URL.
#[test]
fn start_errors_never_show_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    let key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    let sqlite = format!(
        "sqlite:{}/missing/dir/x.db?password=s3cr3tN&mode=ro",
        tmp.path().display()
    );
    let cases: [&[&str]; 5] = [
        &[
            "--upstream-cache",
            "http://alice:s3cr3tU@127.0.0.1:9/?priority=abc",
            "--upstream-public-key",
            key,
        ],
        &[
            "--upstream-cache",
            "http://alice:s3cr3tU@127.0.0.1:9/?token=s3cr3tQ",
            "--upstream-public-key",
            key,
        ],
        &[
            "--upstream-cache",
            "ftp://alice:s3cr3tU@127.0.0.1:9/",
            "--upstream-public-key",
            key,
        ],
        &["--otel-enabled", "--otel-grpc-url", "http://o:s3cr3tP@[bad"],
        &["--cache-database-url", &sqlite],
    ];
    for args in cases {
        let mut all = vec![
            "serve",
            "--cache-data-path",
            data,
            "--server-addr",
            "127.0.0.1:0",
        ];
        all.extend_from_slice(args);
        let out = nip(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
        for secret in ["s3cr3tU", "s3cr3tQ", "s3cr3tP", "s3cr3tN"] {
            assert!(
                !stderr.contains(secret),
                "{args:?} printed {secret}: {stderr}"
            );
        }
    }
}
