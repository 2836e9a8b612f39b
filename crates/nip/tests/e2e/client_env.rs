//! Helpers for the client tests: a "machine" (its own HOME and XDG directories running the real
//! `nip` binary), a recipe fixture whose build counts its runs, and a byte-flipping proxy.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::*;

pub const DUMMY_UPSTREAM: [&str; 4] = [
    "--upstream-cache",
    "http://127.0.0.1:1",
    "--upstream-public-key",
    "upstream-test-1:1OKmiPyTgRWbLRn0o6A1BS5hkdKbzvU7/rZ1nzddr/s=",
];

/// A server with a write key and a read-only key.
pub struct Remote {
    pub server: NipServer,
    pub write_key: String,
    pub read_key: String,
}

pub fn start_remote(dir: &Path) -> Remote {
    let data = dir.join("server-data");
    let write_key = create_key(&data, "ci-writer", "write", &[]);
    let read_key = create_key(&data, "dev-reader", "read", &[]);
    Remote {
        server: start_nip(&data, &DUMMY_UPSTREAM),
        write_key,
        read_key,
    }
}

impl Remote {
    /// A new machine `name` whose remote is this server, used with `key`.
    pub fn machine(&self, parent: &Path, name: &str, recipes: &Path, key: &str) -> Machine {
        let m = Machine::new(parent, name, recipes);
        m.use_remote(&self.server.url, key);
        m
    }
}

/// A temporary directory holding the recipe fixture ([`write_recipes`]), and its recipes path.
pub fn with_recipes() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let recipes = write_recipes(tmp.path());
    (tmp, recipes)
}

/// Writes `recipes/hello.toml` (variants python, ruby; a `src/` source dir) under `dir`. Its
/// build appends a line to `$NIP_TEST_COUNTER`, so tests can tell whether it ran.
pub fn write_recipes(dir: &Path) -> PathBuf {
    let recipes = dir.join("recipes");
    std::fs::create_dir_all(recipes.join("hello-src")).unwrap();
    std::fs::write(
        recipes.join("hello.toml"),
        r#"name = "hello"
version = "2.12"
source = "hello-src"
variants = ["python", "ruby"]
build = """
echo run >> "$NIP_TEST_COUNTER"
mkdir -p "$OUT/share"
cp greeting.txt "$OUT/share/"
echo "$NIP_VARIANTS py=${NIP_VARIANT_PYTHON:-0}" > "$OUT/share/variants"
"""
"#,
    )
    .unwrap();
    std::fs::write(recipes.join("hello-src/greeting.txt"), "hello, world\n").unwrap();
    recipes
}

/// One developer machine or CI runner: separate HOME and XDG directories.
pub struct Machine {
    pub root: PathBuf,
    pub recipes: PathBuf,
}

impl Machine {
    pub fn new(parent: &Path, name: &str, recipes: &Path) -> Machine {
        let root = parent.join(name);
        std::fs::create_dir_all(&root).unwrap();
        Machine {
            root,
            recipes: recipes.to_path_buf(),
        }
    }

    /// The keys `nip cache list --format=simple` prints, sorted.
    pub fn cached_keys(&self) -> Vec<String> {
        let listed = self.nip(&["cache", "list", "--format=simple"]);
        let mut keys: Vec<String> = String::from_utf8(listed.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        keys.sort();
        keys
    }

    pub fn counter(&self) -> PathBuf {
        self.root.join("build-count")
    }

    /// How many times this machine ran the build command.
    pub fn builds_run(&self) -> usize {
        std::fs::read_to_string(self.counter())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nip"));
        c.args(args)
            .current_dir(&self.root)
            .env("HOME", &self.root)
            .env("XDG_CONFIG_HOME", self.root.join("config"))
            .env("XDG_CACHE_HOME", self.root.join("cache"))
            .env("XDG_DATA_HOME", self.root.join("data"))
            .env("NIP_RECIPES_PATH", &self.recipes)
            .env("NIP_TEST_COUNTER", self.counter())
            .env_remove("NIP_REMOTE_CACHE_URL")
            .env_remove("NIP_REMOTE_CACHE_API_KEY")
            .env_remove("NIP_REMOTE_CACHE_ENABLED");
        c
    }

    pub fn nip(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    /// `nip cache remote config --url URL --api-key KEY --enable` plus `extra`, as a user types
    /// it; must succeed. Its stdout.
    pub fn configure_remote(&self, url: &str, key: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "cache",
            "remote",
            "config",
            "--url",
            url,
            "--api-key",
            key,
            "--enable",
        ];
        args.extend_from_slice(extra);
        run_ok(&mut self.cmd(&args))
    }

    /// Writes the remote config with a fast retry policy (tests must stay quick).
    pub fn use_remote(&self, url: &str, key: &str) {
        let dir = self.root.join("config/nip");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = serde_json::json!({
            "url": url, "apiKey": key, "enabled": true, "timeout": 20,
            "policies": {"retryAttempts": 2, "retryDelay": 0.05},
        });
        std::fs::write(dir.join("remote-cache.json"), cfg.to_string()).unwrap();
    }

    /// Runs `nip build --json …`, asserts success and returns the JSON result and stderr.
    pub fn build(&self, args: &[&str]) -> (serde_json::Value, String) {
        let mut all = vec!["build", "--json"];
        all.extend_from_slice(args);
        let out = self.nip(&all);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "nip build {args:?} failed:\n{stderr}");
        (serde_json::from_slice(&out.stdout).unwrap(), stderr)
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = self.nip(&["cache", "stats", "--json"]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// A TCP proxy to `upstream` (`127.0.0.1:PORT`) that flips the last byte of every
/// `/v1/download/` response. It forces `Connection: close`, so one request per connection, and
/// stops accepting after `lifetime`.
pub fn start_flipping_proxy(upstream: &str, lifetime: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let upstream = upstream.to_string();
    std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((conn, _)) => {
                    let up = upstream.clone();
                    std::thread::spawn(move || {
                        let _ = proxy_one(conn, &up);
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    url
}

fn proxy_one(mut conn: TcpStream, upstream: &str) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if let Some(p) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&req[..head_end]).to_string();
    let content_length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while req.len() < head_end + content_length {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let mut new_head: Vec<&str> = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    new_head.push("Connection: close");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(format!("{}\r\n\r\n", new_head.join("\r\n")).as_bytes())?;
    up.write_all(&req[head_end..])?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let is_download = head.starts_with("GET /v1/download/");
    if let Some(body_at) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
        if is_download && resp.len() > body_at + 4 {
            let last = resp.len() - 1;
            resp[last] ^= 0x01;
        }
    }
    conn.write_all(&resp)?;
    conn.shutdown(std::net::Shutdown::Both)
}
