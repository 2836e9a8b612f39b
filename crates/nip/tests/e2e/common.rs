//! Helpers for black-box tests: free ports, child processes killed on drop, waiting for servers.
#![allow(dead_code)]
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn fixture_script(name: &str) -> PathBuf {
    repo_root().join("scripts/nix-fixture").join(name)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed when dropped, so a failing test leaves no server behind.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether real Nix is present. When the test command requires it (NIP_REQUIRE_NIX=1) or under
/// CI=true, a missing Nix is a failure, never a skip.
pub fn nix_available(test: &str) -> bool {
    nix_tool_available("nix-store", test)
}

/// A fresh temporary directory for a test that needs real Nix, or `None` (a skip, or a failure
/// when the test command requires Nix) when it is missing: see [`nix_available`].
pub fn nix_tempdir(test: &str) -> Option<tempfile::TempDir> {
    nix_available(test).then(|| tempfile::tempdir().unwrap())
}

/// Whether the Nix tool `tool` (`nix-store`, `nix-instantiate`, …) answers `--version`: a failure,
/// not a skip, when the test command requires Nix (NIP_REQUIRE_NIX=1 or CI=true).
pub fn nix_tool_available(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let required = components_required() || std::env::var("NIP_REQUIRE_NIX").is_ok();
        assert!(
            !required,
            "{test}: {tool} is missing; run scripts/nix-fixture/install-nix.sh (as root)"
        );
        eprintln!("{test}: SKIPPED: {tool} is missing (run ./scripts/test.sh to install it)");
    }
    ok
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A blocking HTTP client whose requests time out after `secs` seconds.
pub fn http_client(secs: u64) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(secs))
        .build()
        .unwrap()
}

/// `POST /v1/artifacts/{key}` of `form` to the server at `url`, with `token`.
pub fn post_artifact(
    client: &reqwest::blocking::Client,
    url: &str,
    token: &str,
    key: &str,
    form: reqwest::blocking::multipart::Form,
) -> reqwest::blocking::Response {
    client
        .post(format!("{url}/v1/artifacts/{key}"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .unwrap()
}

/// `GET url` with `token` as the bearer credential.
pub fn get_as(
    client: &reqwest::blocking::Client,
    url: &str,
    token: &str,
) -> reqwest::blocking::Response {
    client.get(url).bearer_auth(token).send().unwrap()
}

/// A multipart form of one part, "file", holding `bytes`: an artifact upload without metadata.
pub fn file_form(bytes: Vec<u8>) -> reqwest::blocking::multipart::Form {
    reqwest::blocking::multipart::Form::new()
        .part("file", reqwest::blocking::multipart::Part::bytes(bytes))
}

/// The body of `GET url` as text, whatever its status.
pub fn get_text(client: &reqwest::blocking::Client, url: &str) -> String {
    client.get(url).send().unwrap().text().unwrap()
}

pub fn http_get(url: &str) -> Option<(u16, Vec<u8>)> {
    let resp = http_client(10).get(url).send().ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.bytes().ok()?.to_vec()))
}

/// Polls `url` until it answers 200, or panics after `timeout`.
pub fn wait_http_ok(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if matches!(http_get(url), Some((200, _))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not answer 200 within {timeout:?}");
}

/// Starts `nip serve` on a free loopback port with the given extra arguments.
pub struct NipServer {
    pub child: KillOnDrop,
    pub url: String,
}

pub fn start_nip(data: &Path, args: &[&str]) -> NipServer {
    start_nip_env(data, args, &[])
}

/// Starts `nip serve` with extra environment variables; its log goes to `<data>.log`.
pub fn start_nip_env(data: &Path, args: &[&str], envs: &[(&str, &str)]) -> NipServer {
    let data_arg = data.display().to_string();
    let all: Vec<&str> = ["--cache-data-path", data_arg.as_str()]
        .iter()
        .copied()
        .chain(args.iter().copied())
        .collect();
    spawn_nip(&data.with_extension("log"), &all, envs)
}

/// Starts `nip serve` on a free loopback port with exactly these arguments; its log goes to `log`.
pub fn spawn_nip(log: &Path, args: &[&str], envs: &[(&str, &str)]) -> NipServer {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_nip"))
        .arg("serve")
        .arg("--server-addr")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .env("LOG_LEVEL", "debug")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start nip serve");
    let server = NipServer {
        child: KillOnDrop(child),
        url: format!("http://127.0.0.1:{port}"),
    };
    wait_http_ok(&format!("{}/healthz", server.url), Duration::from_secs(30));
    server
}

/// Serves a directory over HTTP with Python's http.server (a plain static upstream).
pub fn start_static(dir: &Path) -> (KillOnDrop, String) {
    start_static_to(dir, Stdio::null())
}

/// [`start_static`] with its stderr, where it logs every request, going to `stderr`.
pub fn start_static_to(dir: &Path, stderr: impl Into<Stdio>) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start python3 -m http.server");
    let url = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{url}/nix-cache-info"), Duration::from_secs(30));
    (KillOnDrop(child), url)
}

/// Runs `nip keys create` against a server data directory and returns the new token.
pub fn create_key(data: &Path, name: &str, scope: &str, extra: &[&str]) -> String {
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_nip"))
            .args([
                "keys",
                "create",
                "--name",
                name,
                "--scope",
                scope,
                "--cache-data-path",
            ])
            .arg(data)
            .args(extra),
    );
    out.trim_end()
        .lines()
        .last()
        .expect("token line")
        .to_string()
}

/// Runs the `nip` binary with arguments and returns its output.
pub fn nip(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_nip")).args(args))
}

/// Whether a command-line tool is present. When the test command requires the tools
/// (NIP_REQUIRE_TOOLS=1) or under CI=true, a missing tool is a failure, never a skip.
pub fn tool_available(tool: &str, test: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        tool_missing(tool, test, &format!("apt-get install {tool}"));
    }
    ok
}

/// Reports a missing tool: a failure when the test command requires the tools (NIP_REQUIRE_TOOLS=1
/// or CI=true), else a skip message. `install` says how ./scripts/test.sh installs it.
pub fn tool_missing(tool: &str, test: &str, install: &str) {
    assert!(
        !components_required(),
        "{test}: {tool} is missing; ./scripts/test.sh installs it ({install})"
    );
    eprintln!("{test}: SKIPPED: {tool} is missing (run ./scripts/test.sh to install it)");
}

/// Builds a signed upstream cache in `dir` with the fixture script (`BIG_MIB` for its big path)
/// and returns its public key and the top-level store paths (line 1 is input-addressed).
pub fn make_upstream(dir: &Path, big_mib: u32) -> (String, Vec<String>) {
    make_upstream_with(dir, &[], big_mib)
}

/// [`make_upstream`] with more arguments to the fixture script (its key name first).
pub fn make_upstream_with(dir: &Path, args: &[&str], big_mib: u32) -> (String, Vec<String>) {
    let out = run_ok(
        Command::new(fixture_script("make-upstream.sh"))
            .arg(dir)
            .args(args)
            .env("BIG_MIB", big_mib.to_string()),
    );
    let key = out
        .trim()
        .lines()
        .last()
        .expect("public key line")
        .to_string();
    let paths = std::fs::read_to_string(dir.join("paths.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    (key, paths)
}

/// Whether the test command requires every component (CI=true or NIP_REQUIRE_TOOLS): a missing
/// one is then a failure, never a skip.
pub fn components_required() -> bool {
    std::env::var("CI").as_deref() == Ok("true") || std::env::var("NIP_REQUIRE_TOOLS").is_ok()
}

/// The value of an environment variable naming a test server, or `None` (a failure when the
/// test command requires it).
pub fn test_server(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) => Some(v),
        Err(_) => {
            assert!(
                !components_required(),
                "{test}: {var} is not set; ./scripts/test.sh starts that server"
            );
            eprintln!("{test}: SKIPPED: {var} is not set (run ./scripts/test.sh)");
            None
        }
    }
}

/// A fresh database on the test PostgreSQL server, or `None` when there is none (a failure when
/// the test command requires it).
pub fn fresh_database(test: &str) -> Option<String> {
    let admin = test_server("NIP_TEST_POSTGRES_URL", test)?;
    let name = format!("nip_e2e_{}_{}", std::process::id(), rand::random::<u32>());
    run_ok(
        Command::new("psql")
            .arg(&admin)
            .args(["-q", "-c", &format!("CREATE DATABASE {name}")]),
    );
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin);
    Some(format!("{base}/{name}"))
}

/// `nip serve` arguments for a fresh prefix of the test S3 bucket, with a signing key file in
/// `key_dir` shared by every instance given these arguments; `None` when there is no S3 server
/// (a failure when the test command requires it).
pub fn fresh_s3_args(test: &str, key_dir: &Path) -> Option<Vec<String>> {
    let endpoint = test_server("NIP_TEST_S3_ENDPOINT", test)?;
    std::fs::create_dir_all(key_dir).unwrap();
    let prefix = format!("{test}-{}-{}", std::process::id(), rand::random::<u32>());
    Some(
        [
            "--cache-storage-s3-bucket",
            "nip-test",
            "--cache-storage-s3-endpoint",
            endpoint.as_str(),
            "--cache-storage-s3-force-path-style",
            "--cache-storage-s3-prefix",
            prefix.as_str(),
            "--cache-secret-key-path",
            &key_dir.join("secret-key").display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
    )
}

/// An upstream that answers "not found" for every narinfo: a static server of `dir` holding only
/// `nix-cache-info`. Tests that upload narinfos need one: nip first asks its upstreams whether
/// they have a new path, and refuses it (424) while one cannot answer, as a dead upstream can't.
pub fn start_empty_upstream(dir: &Path) -> (KillOnDrop, String) {
    write_cache_info(dir);
    start_static(dir)
}

/// Writes the `nix-cache-info` of a binary cache (store /nix/store, priority 40) into `dir`,
/// making `dir` if need be.
pub fn write_cache_info(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )
    .unwrap();
}

/// The guide's reference server of the `/v1` API (bench/flask_reference.py under gunicorn, run by
/// bench/run-flask-reference.sh), stopped with SIGTERM on drop so its workers go too.
pub struct FlaskReference {
    pub child: KillOnDrop,
    pub url: String,
    pub data: PathBuf,
}

impl Drop for FlaskReference {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts the Flask reference on a free port with `token`, its files under `dir`; `None` when
/// its venv (`NIP_BENCH_VENV`, default /tmp/nip-bench-venv, with flask and gunicorn) is missing,
/// a failure when the test command requires every component. Never installs anything itself.
pub fn start_flask_reference(dir: &Path, token: &str, test: &str) -> Option<FlaskReference> {
    let venv = PathBuf::from(
        std::env::var("NIP_BENCH_VENV").unwrap_or_else(|_| "/tmp/nip-bench-venv".into()),
    );
    let ok = venv.join("bin/gunicorn").is_file()
        && Command::new(venv.join("bin/python"))
            .args(["-c", "import flask"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        tool_missing(
            &format!("flask and gunicorn in {}", venv.display()),
            test,
            "pip install flask gunicorn in a venv, NIP_BENCH_VENV",
        );
        return None;
    }
    let port = free_port();
    let data = dir.join("flask-data");
    let child = Command::new(repo_root().join("bench/run-flask-reference.sh"))
        .arg(port.to_string())
        .arg(&data)
        .arg(token)
        .env("NIP_BENCH_VENV", &venv)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("flask.log")).unwrap())
        .spawn()
        .expect("start bench/run-flask-reference.sh");
    let server = FlaskReference {
        child: KillOnDrop(child),
        url: format!("http://127.0.0.1:{port}"),
        data,
    };
    wait_http_ok(
        &format!("{}/v1/health", server.url),
        Duration::from_secs(60),
    );
    Some(server)
}

/// What `promtool check metrics` finds in a `/metrics` text, one problem a line, leaving out its
/// naming lints about ncps' own metric names (`ncps_narinfo_count`, …), which nip keeps as ncps
/// spells them so dashboards keep working. `None` when promtool is missing (a skip).
pub fn promtool_problems(text: &str, test: &str) -> Option<Vec<String>> {
    use std::io::Write;
    if !tool_available("promtool", test) {
        return None;
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ncps_lint = |l: &str| {
        l.starts_with("ncps_")
            && (l.contains("should not have \"_count\" suffix")
                || l.contains("should not have \"_total\" suffix"))
    };
    let problems: Vec<String> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !ncps_lint(l))
        .map(String::from)
        .collect();
    assert!(
        out.status.success() || report.lines().any(ncps_lint),
        "promtool failed without saying why: {report}"
    );
    Some(problems)
}

/// ncps' NixOS module JSON (`fixtures/ncps-nixos.json`) made to run on this machine: its storage
/// and temp path under `data`, its address `127.0.0.1:port`, `upstream_url` its only upstream.
/// Written to `<dir>/ncps-config.json`, whose path it returns.
pub fn write_ncps_nixos_config(dir: &Path, data: &Path, port: u16, upstream_url: &str) -> PathBuf {
    let text = ncps_nixos_json(data, &data.join("tmp"), port, upstream_url);
    assert!(text.contains(upstream_url) && text.contains(&format!(":{port}")));
    std::fs::create_dir_all(data.join("tmp")).unwrap();
    let config = dir.join("ncps-config.json");
    std::fs::write(&config, text).unwrap();
    config
}

/// ncps' NixOS module JSON with its state directory `state`, temp path `temp`, address
/// `127.0.0.1:port` and `upstream_url` its only upstream.
pub fn ncps_nixos_json(state: &Path, temp: &Path, port: u16, upstream_url: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/fixtures/ncps-nixos.json"),
    )
    .unwrap()
    .replace("/var/lib/ncps", &state.display().to_string())
    .replace("\"/tmp\"", &format!("\"{}\"", temp.display()))
    .replace("\":8501\"", &format!("\"127.0.0.1:{port}\""))
    .replace(
        "[\"https://cache.nixos.org\",\"https://nix-community.cachix.org\"]",
        &format!("[\"{upstream_url}\"]"),
    )
}

/// Spawns a server with `cmd` (stdout dropped, stderr into `log`) and waits until it answers
/// `/healthz` on `127.0.0.1:port`; returns it, killed on drop, and its URL.
pub fn spawn_server(cmd: &mut Command, log: &Path, port: u16) -> (KillOnDrop, String) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let server = KillOnDrop(child);
    let url = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{url}/healthz"), Duration::from_secs(30));
    (server, url)
}

/// The `/nix-cache-info` a server at `url` answers, which must be a 200.
pub fn nix_cache_info(url: &str) -> String {
    let (status, body) = http_get(&format!("{url}/nix-cache-info")).unwrap();
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

/// The hash part of a store path: `/nix/store/<hash>-<name>` → `<hash>`.
pub fn store_hash(path: &str) -> String {
    path.trim_start_matches("/nix/store/")
        .split('-')
        .next()
        .unwrap()
        .to_string()
}

/// `nip serve` with its data in `data`, in front of the upstream at `upstream_url` trusting
/// `upstream_key`, with `extra` arguments.
pub fn start_nip_behind(
    data: &Path,
    upstream_url: &str,
    upstream_key: &str,
    extra: &[&str],
) -> NipServer {
    let args = [
        "--upstream-cache",
        upstream_url,
        "--upstream-public-key",
        upstream_key,
    ];
    start_nip(data, &[&args[..], extra].concat())
}

/// `nip serve` that takes uploads (`--cache-allow-put-verb`), its data in `data`, in front of an
/// upstream that has nothing (`start_empty_upstream` of `<dir>/upstream`: a dead one makes
/// uploads 424) trusting `upstream_key`, with `extra` arguments. Returns the upstream too.
pub fn start_upload_nip(
    dir: &Path,
    data: &Path,
    upstream_key: &str,
    extra: &[&str],
) -> (KillOnDrop, NipServer) {
    let (upstream, upstream_url) = start_empty_upstream(&dir.join("upstream"));
    let args = [&["--cache-allow-put-verb"][..], extra].concat();
    let server = start_nip_behind(data, &upstream_url, upstream_key, &args);
    (upstream, server)
}

/// Real Nix substitutes `paths` from `url` into a fresh store, trusting only `key`
/// (`check-substitute.sh`); its output.
pub fn check_substitute(url: &str, key: &str, paths: &[impl AsRef<std::ffi::OsStr>]) -> String {
    run_ok(
        Command::new(fixture_script("check-substitute.sh"))
            .arg(url)
            .arg(key)
            .args(paths)
            .env("CHECK_TIMEOUT", "120"),
    )
}

/// The public key a nip server at `url` serves at `/pubkey`, trimmed.
pub fn server_pubkey(url: &str) -> String {
    let (status, body) = http_get(&format!("{url}/pubkey")).unwrap();
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap().trim().to_string()
}

/// `nip admin stats --json` of a server data directory, which must succeed.
pub fn admin_stats(data: &Path) -> serde_json::Value {
    let out = nip(&[
        "admin",
        "stats",
        "--json",
        "--cache-data-path",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `nip audit --json` of a server data directory: its entries.
pub fn audit(data: &Path) -> Vec<serde_json::Value> {
    let out = nip(&[
        "audit",
        "--json",
        "--cache-data-path",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `url` accepts `token` (200); `nip keys revoke name` on the server data `data` (and `extra`
/// arguments) succeeds; within a second `url` refuses the token (401), with no restart.
pub fn revoke_and_wait_refused(url: &str, token: &str, name: &str, data: &Path, extra: &[&str]) {
    let client = http_client(60);
    let status = || client.get(url).bearer_auth(token).send().unwrap().status();
    assert_eq!(status(), 200);
    let args = [
        "keys",
        "revoke",
        name,
        "--cache-data-path",
        data.to_str().unwrap(),
    ];
    let out = nip(&[&args[..], extra].concat());
    assert!(out.status.success());
    let revoked_at = Instant::now();
    loop {
        let status = status();
        if status == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "{url} still answers {status} a second after revocation"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A netrc file in `dir` that gives Nix `token` as the password for 127.0.0.1; its path.
pub fn netrc(dir: &Path, token: &str) -> String {
    let f = dir.join(format!("netrc-{}", &token[..12]));
    std::fs::write(
        &f,
        format!("machine 127.0.0.1 login nix password {token}\n"),
    )
    .unwrap();
    f.display().to_string()
}

/// Two keys for a server data directory: "uploader" (write) and "reader" (read); their tokens.
pub fn writer_and_reader(data: &Path) -> (String, String) {
    (
        create_key(data, "uploader", "write", &[]),
        create_key(data, "reader", "read", &[]),
    )
}

/// [`make_upstream`] in `dir`, its cache served by [`start_static`]: ((public key, store paths),
/// (server, URL)).
pub fn serve_upstream(dir: &Path, big_mib: u32) -> ((String, Vec<String>), (KillOnDrop, String)) {
    let made = make_upstream(dir, big_mib);
    (made, start_static(&dir.join("cache")))
}
