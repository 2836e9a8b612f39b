//! Three instances on one PostgreSQL database and one S3 bucket act as one cache: concurrent
//! misses for one narinfo or NAR spread over them cost one upstream fetch; when the instance
//! fetching is killed mid-fill, another takes over within seconds, its clients get the whole
//! verified bytes, and the killed one's clients never get a complete-looking body.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use sha2::Digest;

use crate::common::*;

/// A static upstream that logs every request and sends bodies at `rate` bytes/s, so a fill
/// lasts long enough to be interrupted.
const SLOW_UPSTREAM: &str = r#"
import http.server, sys, time
port, root, rate = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def copyfile(self, src, dst):
        while True:
            b = src.read(256 * 1024)
            if not b:
                break
            dst.write(b)
            time.sleep(len(b) / rate)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

fn client() -> Client {
    http_client(120)
}

fn start_slow_upstream(dir: &Path, log: &Path, rate: u64) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new("python3")
        .args(["-c", SLOW_UPSTREAM, &port.to_string()])
        .arg(dir)
        .arg(rate.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{url}/nix-cache-info"), Duration::from_secs(30));
    (KillOnDrop(child), url)
}

fn upstream_gets(log: &Path, path: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("\"GET /{path} ")))
        .count()
}

fn hash_of(store_path: &str) -> String {
    store_path.trim_start_matches("/nix/store/")[..32].to_string()
}

/// The body of a GET of `url`, which must be a success.
fn get_body(url: String) -> reqwest::Result<Vec<u8>> {
    client()
        .get(url)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .map(|b| b.to_vec())
}

/// Concurrent GETs of `path`, request i going to `urls[i % urls.len()]`: each body, or the error.
fn fetch_all(urls: &[String], path: &str, n: usize) -> Vec<Result<Vec<u8>, String>> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("{}/{path}", urls[i % urls.len()]);
            std::thread::spawn(move || get_body(url).map_err(|e| e.to_string()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn narinfo_field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .to_string()
}

fn sha256_nix32(bytes: &[u8]) -> String {
    let digest: [u8; 32] = sha2::Sha256::digest(bytes).into();
    format!(
        "sha256:{}",
        nip_core::hash::NixHash::sha256(digest).to_nix32_digest()
    )
}

struct Cluster {
    tmp: tempfile::TempDir,
    nodes: Vec<NipServer>,
    urls: Vec<String>,
    paths: Vec<String>,
    log: std::path::PathBuf,
    _upstream: KillOnDrop,
}

/// What the instances of a cluster share: a fresh database and S3 prefix, and a slow upstream
/// (25 MiB/s, its log in `log`) holding a `big_mib` MiB NAR (`paths[1]`).
struct Backing {
    tmp: tempfile::TempDir,
    paths: Vec<String>,
    log: std::path::PathBuf,
    upstream: KillOnDrop,
    /// `nip serve` arguments for an instance, but its temp path.
    args: Vec<String>,
}

/// `None` when PostgreSQL, S3 or Nix is missing (a failure under the test command).
fn backing(test: &str, big_mib: u32, hostname: &str) -> Option<Backing> {
    let db = fresh_database(test)?;
    if !nix_available(test) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s3 = fresh_s3_args(test, &tmp.path().join("keys"))?;
    let up = tmp.path().join("upstream");
    let (upstream_key, paths) = make_upstream(&up, big_mib);
    let log = tmp.path().join("upstream.log");
    let (upstream, upstream_url) = start_slow_upstream(&up.join("cache"), &log, 25 << 20);
    let mut args: Vec<String> = [
        "--cache-database-url",
        &db,
        "--cache-upstream-url",
        &upstream_url,
        "--cache-upstream-public-key",
        &upstream_key,
        "--cache-hostname",
        hostname,
    ]
    .map(String::from)
    .to_vec();
    args.extend(s3);
    Some(Backing {
        tmp,
        paths,
        log,
        upstream,
        args,
    })
}

impl Backing {
    /// The arguments of instance `name`: the shared ones and its own temp path.
    fn node_args(&self, name: &str) -> Vec<String> {
        let mut a = self.args.clone();
        a.push("--cache-temp-path".into());
        a.push(
            self.tmp
                .path()
                .join(format!("tmp-{name}"))
                .display()
                .to_string(),
        );
        a
    }
}

/// Three instances on a fresh database and S3 prefix in front of a slow upstream holding a
/// 50 MiB NAR (`paths[1]`); `None` when PostgreSQL, S3 or Nix is missing (a failure under the
/// test command).
fn cluster(test: &str) -> Option<Cluster> {
    // 25 MiB/s: the 50 MiB NAR takes about two seconds to fill.
    let b = backing(test, 50, "nip-cluster")?;
    let nodes: Vec<NipServer> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let a = b.node_args(name);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            spawn_nip(&b.tmp.path().join(format!("{name}.log")), &a, &[])
        })
        .collect();
    let urls = nodes.iter().map(|n| n.url.clone()).collect();
    Some(Cluster {
        tmp: b.tmp,
        nodes,
        urls,
        paths: b.paths,
        log: b.log,
        _upstream: b.upstream,
    })
}

#[test]
fn three_instances_fetch_each_miss_once() {
    let Some(c) = cluster("three_instances_fetch_each_miss_once") else {
        return;
    };
    // 30 concurrent misses for one narinfo over the three: one upstream lookup.
    let big = hash_of(&c.paths[1]);
    let answers = fetch_all(&c.urls, &format!("{big}.narinfo"), 30);
    let first = answers[0].clone().expect("narinfo");
    for a in &answers {
        assert_eq!(
            a.as_ref().expect("narinfo"),
            &first,
            "instances served different narinfos"
        );
    }
    assert_eq!(
        upstream_gets(&c.log, &format!("{big}.narinfo")),
        1,
        "narinfo lookups upstream"
    );

    // 30 concurrent misses for its 50 MiB NAR: one upstream fetch, 30 identical verified bodies.
    let text = String::from_utf8(first).unwrap();
    let nar_path = narinfo_field(&text, "URL");
    let file_hash = narinfo_field(&text, "FileHash");
    let started = Instant::now();
    let bodies = fetch_all(&c.urls, &nar_path, 30);
    eprintln!(
        "30 NAR requests over 3 instances took {:?}",
        started.elapsed()
    );
    for b in &bodies {
        let b = b.as_ref().expect("NAR download");
        assert_eq!(sha256_nix32(b), file_hash, "a client got other bytes");
    }
    assert_eq!(upstream_gets(&c.log, &nar_path), 1, "NAR fetches upstream");
}

#[test]
fn a_killed_filler_is_taken_over_without_a_bad_body() {
    let Some(mut c) = cluster("a_killed_filler_is_taken_over_without_a_bad_body") else {
        return;
    };
    let big = hash_of(&c.paths[1]);
    let text = get_text(&client(), &format!("{}/{big}.narinfo", c.urls[0]));
    let nar_path = narinfo_field(&text, "URL");
    let file_hash = narinfo_field(&text, "FileHash");
    let size: usize = narinfo_field(&text, "FileSize").parse().unwrap();

    // A starts the fill; B and C wait for it.
    let a_client = {
        let url = format!("{}/{nar_path}", c.urls[0]);
        std::thread::spawn(move || get_body(url))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while upstream_gets(&c.log, &nar_path) == 0 {
        assert!(Instant::now() < deadline, "A never fetched the NAR");
        std::thread::sleep(Duration::from_millis(20));
    }
    let followers: Vec<_> = (1..3)
        .map(|i| {
            let url = format!("{}/{nar_path}", c.urls[i]);
            std::thread::spawn(move || get_body(url))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    c.nodes[0].child.kill();
    let killed = Instant::now();

    // A's client: an error, never a complete-looking body.
    if let Ok(body) = a_client.join().unwrap() {
        panic!(
            "A's client got a complete-looking body of {} of {size} bytes although A was killed mid-fill",
            body.len()
        );
    }
    for f in followers {
        let body = f.join().unwrap().expect("a follower's download");
        assert_eq!(sha256_nix32(&body), file_hash, "a follower got other bytes");
    }
    let took = killed.elapsed();
    eprintln!("followers had the NAR {took:?} after the kill");
    assert!(took < Duration::from_secs(30), "takeover took {took:?}");
    // The first fetch and the takeover's; nothing more.
    assert_eq!(upstream_gets(&c.log, &nar_path), 2, "NAR fetches upstream");
    let _ = &c.tmp;
}

/// `nip serve` on a given port (a balancer's configuration names it), logging to `log`.
fn serve_on(port: u16, log: &Path, args: &[String]) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_nip"))
        .arg("serve")
        .arg("--server-addr")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .expect("start nip serve");
    wait_http_ok(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(30),
    );
    KillOnDrop(child)
}

/// deploy/nginx.conf in front of `ports` (its two compose servers replaced by these).
fn start_balancer(dir: &Path, ports: &[u16]) -> Option<(KillOnDrop, String)> {
    let nginx = if Path::new("/usr/sbin/nginx").exists() {
        std::path::PathBuf::from("/usr/sbin/nginx")
    } else if tool_available("nginx", "rolling restart") {
        std::path::PathBuf::from("nginx")
    } else {
        return None;
    };
    let conf = std::fs::read_to_string(repo_root().join("deploy/nginx.conf")).unwrap();
    let servers: String = ports
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;\n"))
        .collect();
    let port = free_port();
    let site = conf
        .replace(
            "    server nip-a:8501 max_fails=3 fail_timeout=10s;\n",
            &servers,
        )
        .replace("    server nip-b:8501 max_fails=3 fail_timeout=10s;\n", "")
        .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
    assert!(
        site.contains(&servers),
        "deploy/nginx.conf changed its upstream lines"
    );
    let d = dir.display();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("site.conf"), site).unwrap();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             include {d}/site.conf;\n}}\n"
        ),
    )
    .unwrap();
    let lb = KillOnDrop(
        Command::new(&nginx)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{url}/healthz"), Duration::from_secs(10));
    Some((lb, url))
}

/// Each of three instances behind nginx is stopped (SIGTERM: it drains) and started again, one
/// after the other, while real Nix substitutes a closure through the balancer again and again:
/// no substitution fails.
#[test]
fn rolling_restart_behind_nginx_fails_no_substitution() {
    let test = "rolling_restart_behind_nginx_fails_no_substitution";
    let Some(b) = backing(test, 20, "nip-rolling") else {
        return;
    };
    let (tmp, paths) = (&b.tmp, &b.paths);
    let ports = [free_port(), free_port(), free_port()];
    let node_args = |i: usize| b.node_args(&i.to_string());
    let logs: Vec<_> = (0..3)
        .map(|i| tmp.path().join(format!("nip-{i}.log")))
        .collect();
    let mut nodes: Vec<KillOnDrop> = (0..3)
        .map(|i| serve_on(ports[i], &logs[i], &node_args(i)))
        .collect();
    let Some((_lb, url)) = start_balancer(&tmp.path().join("nginx"), &ports) else {
        return;
    };
    let pubkey = get_text(&client(), &format!("{url}/pubkey"));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let substitutions = {
        let (stop, url, pubkey, paths) = (stop.clone(), url.clone(), pubkey.clone(), paths.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            // At least three substitutions, and on until every instance was restarted.
            while runs < 3 || !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = Command::new(fixture_script("check-substitute.sh"))
                    .arg(&url)
                    .arg(pubkey.trim())
                    .args(&paths)
                    .env("CHECK_TIMEOUT", "120")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "substitution {runs} through the balancer failed during the rolling restart: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        let pid = nodes[i].0.id().to_string();
        run_ok(Command::new("kill").args(["-TERM", &pid]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while nodes[i].0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "instance {i} did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nodes[i] = serve_on(ports[i], &logs[i], &node_args(i));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = substitutions.join().expect("a substitution failed");
    eprintln!("{runs} substitutions through the balancer during the rolling restart");
}
