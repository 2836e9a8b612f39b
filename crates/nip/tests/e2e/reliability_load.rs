//! Load soak of the real binary on 127.0.0.1: many concurrent connections of mixed narinfo, NAR
//! and artifact traffic for a fixed time, with zero errors, p99 latency reported and RSS sampled
//! at start, middle and end. Short by default (200 connections, 10 s); the long mode is
//! `NIP_SOAK_CONNECTIONS=1000 NIP_SOAK_SECONDS=60`.
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::common::*;
use crate::reliability_crash::write_upstream;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

enum Target {
    Narinfo(String),
    Nar(String, usize),
    Artifact(String, usize),
    Metadata(String),
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// N connections of mixed traffic for a fixed time: no request fails, and the server's memory
/// does not keep growing (a leak per request would show between the middle and the end).
#[test]
fn soak_mixed_traffic_has_no_errors_and_flat_memory() {
    let connections = env_num("NIP_SOAK_CONNECTIONS", 200) as usize;
    let seconds = env_num("NIP_SOAK_SECONDS", 10);
    let mut rng = StdRng::seed_from_u64(7);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (entries, pubkey) = write_upstream(&tmp.path().join("upstream"), 40, 200_000, &mut rng);
    let (_upstream, upstream_url) = start_static(&tmp.path().join("upstream"));
    let token = create_key(&data, "soak", "write", &[]);
    let server = start_nip_env(
        &data,
        &[
            "--upstream-cache",
            upstream_url.as_str(),
            "--upstream-public-key",
            pubkey.as_str(),
        ],
        // Room for every soak connection plus the harness's own.
        &[
            ("LOG_LEVEL", "warn"),
            (
                "NIP_SERVER_MAX_CONNECTIONS",
                &(connections + 1000).to_string(),
            ),
        ],
    );
    let pid = server.child.0.id();

    // Warm up: fill every upstream entry once (fills are tested elsewhere; the soak reads) and
    // upload the artifacts.
    let c = reqwest::blocking::Client::new();
    let mut targets = Vec::new();
    for e in &entries {
        let text = get_text(&c, &format!("{}/{}.narinfo", server.url, e.hash));
        let info = nip_core::narinfo::NarInfo::parse(&text).unwrap();
        let nar = c
            .get(format!("{}/{}", server.url, info.url))
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(nar.as_ref(), e.nar.as_slice());
        targets.push(Target::Narinfo(format!("/{}.narinfo", e.hash)));
        targets.push(Target::Nar(format!("/{}", info.url), e.nar.len()));
    }
    for i in 0..20 {
        let mut bytes = vec![0u8; rng.gen_range(1..300_000)];
        rng.fill_bytes(&mut bytes);
        let len = bytes.len();
        let r = post_artifact(
            &c,
            &server.url,
            &token,
            &format!("soak-{i}"),
            file_form(bytes),
        );
        assert_eq!(r.status(), 201);
        targets.push(Target::Artifact(format!("/v1/download/soak-{i}"), len));
        targets.push(Target::Metadata(format!("/v1/artifacts/soak-{i}/metadata")));
    }
    let targets = Arc::new(targets);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = server.url.clone();
    let (latencies, errors, requests, rss) = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let rss_start = rss_kib(pid);
        let sampler = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds) / 2).await;
            let mid = rss_kib(pid);
            (mid, ())
        });
        let mut tasks = Vec::new();
        for n in 0..connections {
            let (targets, url, token) = (targets.clone(), url.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                // One client (one connection) per task: `connections` open sockets.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut rng = StdRng::seed_from_u64(n as u64);
                let (mut lat, mut errors) = (Vec::new(), Vec::new());
                while Instant::now() < deadline {
                    let t = &targets[rng.gen_range(0..targets.len())];
                    let (path, want) = match t {
                        Target::Narinfo(p) | Target::Metadata(p) => (p, None),
                        Target::Nar(p, n) | Target::Artifact(p, n) => (p, Some(*n)),
                    };
                    let started = Instant::now();
                    let r = client
                        .get(format!("{url}{path}"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    let ok = match r {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(b) => want.is_none_or(|n| b.len() == n),
                            Err(_) => false,
                        },
                        _ => false,
                    };
                    lat.push(started.elapsed());
                    if !ok {
                        errors.push(path.clone());
                    }
                }
                (lat, errors)
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = Vec::new();
        for t in tasks {
            let (l, e) = t.await.unwrap();
            latencies.extend(l);
            errors.extend(e);
        }
        let (rss_mid, ()) = sampler.await.unwrap();
        let rss_end = rss_kib(pid);
        let n = latencies.len();
        (latencies, errors, n, (rss_start, rss_mid, rss_end))
    });
    let mut sorted = latencies;
    sorted.sort();
    let (p50, p99, max) = (
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or_default(),
    );
    eprintln!(
        "soak: {connections} connections × {seconds} s: {requests} requests ({:.0}/s), {} errors, \
         p50 {p50:?}, p99 {p99:?}, max {max:?}; RSS start {} MiB, middle {} MiB, end {} MiB",
        requests as f64 / seconds as f64,
        errors.len(),
        rss.0 / 1024,
        rss.1 / 1024,
        rss.2 / 1024
    );
    assert!(
        errors.is_empty(),
        "{} failed requests, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        requests > connections,
        "the soak barely ran: {requests} requests"
    );
    // Generous: buffers grow to their working size in the first half; a per-request leak keeps
    // growing in the second half.
    assert!(
        rss.2 <= rss.1 + rss.1 / 2 + 64 * 1024,
        "RSS kept growing: {} → {} KiB",
        rss.1,
        rss.2
    );
    assert!(rss.2 < 1024 * 1024, "RSS above 1 GiB: {} KiB", rss.2);
}
