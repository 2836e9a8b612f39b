//! OpenTelemetry (`--otel-enabled`): a real OTLP/gRPC receiver (otlp_sink.py: grpcio and
//! opentelemetry-proto's TraceService/LogsService) gets a span per request with its route and
//! status, the upstream lookup as a child span, and the log records, including the ones written
//! during a graceful shutdown. Without `--otel-grpc-url` the same goes to stdout.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const UPSTREAM_KEY: &str = "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=";
const SECRET: &str = "otel-secret-token-must-not-leak";
const MISSING: &str = "0123456789abcdfghijklmnpqrsvwxyz";

/// The Python with grpcio and opentelemetry-proto: `NIP_TEST_OTLP_PYTHON` (scripts/test.sh makes
/// a venv), else `python3`. Required under CI=true or NIP_REQUIRE_TOOLS: then never a skip.
fn sink_python(test: &str) -> Option<String> {
    let py = std::env::var("NIP_TEST_OTLP_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args([
            "-c",
            "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !components_required(),
            "{test}: {py} lacks grpcio/opentelemetry-proto; ./scripts/test.sh installs them \
             in a venv and sets NIP_TEST_OTLP_PYTHON"
        );
        eprintln!("{test}: SKIPPED: no Python with grpcio and opentelemetry-proto (run ./scripts/test.sh)");
        return None;
    }
    Some(py)
}

/// Starts the OTLP sink on a free port; returns it, its port and the JSON-lines file it writes.
fn start_sink(py: &str, dir: &Path) -> (KillOnDrop, u16, PathBuf) {
    let port = free_port();
    let out = dir.join("otlp.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/otlp_sink.py");
    let mut child = Command::new(py)
        .arg(script)
        .arg(port.to_string())
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start otlp_sink.py");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "otlp_sink.py did not start");
    (KillOnDrop(child), port, out)
}

/// `nip serve` with its stdout and stderr in files (spawn_nip drops stdout).
fn serve(dir: &Path, args: &[&str]) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_nip"))
        .arg("serve")
        .arg("--server-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cache-data-path")
        .arg(dir.join("data"))
        .args(args)
        .env("LOG_LEVEL", "debug")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES")
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .expect("start nip serve");
    let url = format!("http://127.0.0.1:{port}");
    let server = KillOnDrop(child);
    wait_http_ok(&format!("{url}/healthz"), Duration::from_secs(30));
    (server, url)
}

/// SIGTERM, then waits for a clean exit (the providers flush before it).
fn stop_gracefully(child: &mut Child, dir: &Path) {
    run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
            assert!(status.success(), "nip serve exited with {status}:\n{log}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nip serve did not stop within 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A few requests: the cache info, a narinfo no upstream has (404, asked upstream), the health
/// endpoint, and one carrying a bearer token and a token in the query string.
fn make_requests(url: &str) {
    assert_eq!(http_get(&format!("{url}/nix-cache-info")).unwrap().0, 200);
    assert_eq!(
        http_get(&format!("{url}/{MISSING}.narinfo")).unwrap().0,
        404
    );
    assert_eq!(http_get(&format!("{url}/v1/health")).unwrap().0, 200);
    let resp = get_as(
        &reqwest::blocking::Client::new(),
        &format!("{url}/pubkey?token={SECRET}"),
        SECRET,
    );
    assert_eq!(resp.status().as_u16(), 200);
}

fn upstream(dir: &Path) -> (KillOnDrop, String) {
    start_empty_upstream(&dir.join("upstream"))
}

/// `nip serve` with OpenTelemetry on (and `otel` arguments) in front of `upstream_url` and of a
/// dead second upstream: its failure is logged inside the narinfo request.
fn serve_otel(dir: &Path, upstream_url: &str, otel: &[&str]) -> (KillOnDrop, String) {
    let upstreams = [
        "--upstream-cache",
        upstream_url,
        "--upstream-cache",
        "http://127.0.0.1:1",
        "--upstream-public-key",
        UPSTREAM_KEY,
    ];
    serve(dir, &[&["--otel-enabled"][..], otel, &upstreams].concat())
}

#[test]
fn otel_exports_request_spans_and_logs_over_otlp_grpc() {
    let test = "otel_exports_request_spans_and_logs_over_otlp_grpc";
    let Some(py) = sink_python(test) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut sink, port, out) = start_sink(&py, dir);
    let (_upstream, upstream_url) = upstream(dir);
    let collector = format!("http://127.0.0.1:{port}");
    let (mut server, url) = serve_otel(dir, &upstream_url, &["--otel-grpc-url", &collector]);
    make_requests(&url);
    stop_gracefully(&mut server.0, dir);
    sink.kill();

    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let spans: Vec<&Value> = rows.iter().filter(|r| r["signal"] == "span").collect();
    let logs: Vec<&Value> = rows.iter().filter(|r| r["signal"] == "log").collect();
    assert!(
        !spans.is_empty(),
        "the collector got no span; nip's log:\n{stderr}"
    );
    assert!(
        rows.iter().all(|r| r["service"] == "nip"),
        "service.name must be nip: {text}"
    );
    let request = |route: &str| {
        spans
            .iter()
            .find(|s| s["attributes"]["http.route"] == route)
            .unwrap_or_else(|| panic!("no span for {route} in:\n{text}"))
    };
    let info = request("/nix-cache-info");
    assert_eq!(info["name"], "GET /nix-cache-info");
    assert_eq!(info["kind"], 2, "a server span"); // SPAN_KIND_SERVER
    assert_eq!(info["attributes"]["http.request.method"], "GET");
    assert_eq!(info["attributes"]["http.response.status_code"], 200);
    assert_eq!(
        request("/v1/health")["attributes"]["http.response.status_code"],
        200
    );
    let narinfo = request("/{name}");
    assert_eq!(narinfo["attributes"]["http.response.status_code"], 404);
    // The upstream lookup is a client span in the same trace, below the request's span.
    let lookup = spans
        .iter()
        .find(|s| s["name"] == "upstream narinfo")
        .unwrap_or_else(|| panic!("no upstream narinfo span in:\n{text}"));
    assert_eq!(lookup["kind"], 3, "a client span"); // SPAN_KIND_CLIENT
    assert_eq!(lookup["trace_id"], narinfo["trace_id"]);
    assert!(
        spans.iter().any(|s| s["name"] == "upstream narinfo"
            && s["attributes"]["result"] == "missing"
            && s["trace_id"] == narinfo["trace_id"]),
        "no lookup of the live upstream in:\n{text}"
    );
    assert!(
        spans.iter().any(|s| s["name"] == "upstream narinfo"
            && s["attributes"]["result"] == "error"
            && s["trace_id"] == narinfo["trace_id"]),
        "no failed lookup of the dead upstream in:\n{text}"
    );

    // Log records, from start to the graceful shutdown (flushed before exit).
    let bodies: Vec<String> = logs.iter().map(|l| l["body"].to_string()).collect();
    for wanted in ["nip serve listening", "shutting down", "stopped"] {
        assert!(
            bodies.iter().any(|b| b.contains(wanted)),
            "no log record {wanted:?} in {bodies:#?}"
        );
    }
    assert!(
        !text.contains(SECRET),
        "a token reached the collector:\n{text}"
    );
    assert!(!stderr.contains(SECRET), "a token reached the log");
    // A log record written while serving a request carries that request's trace.
    let failed = logs
        .iter()
        .find(|l| {
            l["body"]
                .to_string()
                .contains("upstream narinfo request failed")
        })
        .unwrap_or_else(|| panic!("no log record of the dead upstream in {bodies:#?}"));
    assert_eq!(failed["severity"], "WARN");
    assert_eq!(failed["trace_id"], narinfo["trace_id"]);
}

#[test]
fn otel_without_url_writes_to_stdout_and_a_dead_collector_costs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // No URL: spans and log records on stdout, as ncps does.
    let dir = tmp.path().join("stdout");
    std::fs::create_dir_all(&dir).unwrap();
    let (_upstream, upstream_url) = upstream(&dir);
    let (mut server, url) = serve_otel(&dir, &upstream_url, &[]);
    make_requests(&url);
    stop_gracefully(&mut server.0, &dir);
    let stdout = std::fs::read_to_string(dir.join("stdout")).unwrap();
    for wanted in [
        "GET /nix-cache-info",
        "http.route",
        "service.name",
        "nip serve listening",
        "stopped",
    ] {
        assert!(
            stdout.contains(wanted),
            "{wanted:?} is not on stdout:\n{stdout}"
        );
    }
    assert!(!stdout.contains(SECRET));

    // A collector that is not there: requests are served as fast as ever and nip still stops
    // promptly; the failed exports are logged.
    let dir = tmp.path().join("dead");
    std::fs::create_dir_all(&dir).unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (mut server, url) = serve(
        &dir,
        &[
            "--otel-enabled",
            "--otel-grpc-url",
            &dead,
            "--upstream-cache",
            &upstream_url,
            "--upstream-public-key",
            UPSTREAM_KEY,
        ],
    );
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(http_get(&format!("{url}/nix-cache-info")).unwrap().0, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests were slowed down"
    );
    let stopping = Instant::now();
    stop_gracefully(&mut server.0, &dir);
    assert!(stopping.elapsed() < Duration::from_secs(12));
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(
        stderr.contains("ExportError") || stderr.contains("not exported"),
        "the failed export is not logged:\n{stderr}"
    );
}
