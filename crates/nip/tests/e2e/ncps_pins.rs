//! ncps' closure pins (`POST|DELETE /pin/<hash>.narinfo`, `GET /pins`) and ncps' metric names,
//! through the real binary: a pinned closure survives LRU eviction while unpinned paths go, and
//! `/metrics` shows the eviction under ncps' names too.
use std::time::{Duration, Instant};

use crate::common::*;

fn hash_of(store_path: &str) -> String {
    store_path.trim_start_matches("/nix/store/")[..32].to_string()
}

fn call(method: reqwest::Method, url: &str, token: Option<&str>) -> reqwest::blocking::Response {
    let mut req = reqwest::blocking::Client::new().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().unwrap()
}

/// Fetches a path's narinfo and NAR through nip (a miss: from the upstream).
fn fetch(nip: &str, store_path: &str) {
    let (status, narinfo) = http_get(&format!("{nip}/{}.narinfo", hash_of(store_path))).unwrap();
    assert_eq!(status, 200, "{store_path}");
    let narinfo = String::from_utf8(narinfo).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    let (status, _) = http_get(&format!("{nip}/{url}")).unwrap();
    assert_eq!(status, 200, "{store_path}: {url}");
}

/// Whether nip still holds a path's narinfo and NAR (`/upload/` reads never go upstream).
fn held(nip: &str, store_path: &str) -> bool {
    let Some((200, narinfo)) = http_get(&format!("{nip}/upload/{}.narinfo", hash_of(store_path)))
    else {
        return false;
    };
    let narinfo = String::from_utf8(narinfo).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    matches!(http_get(&format!("{nip}/upload/{url}")), Some((200, _)))
}

/// The value of a sample line `name` (exactly these labels, or none) in `/metrics`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_pinned_closure_survives_eviction_and_ncps_metrics_follow() {
    let Some(tmp) = nix_tempdir("a_pinned_closure_survives_eviction") else {
        return;
    };
    let up_a = tmp.path().join("upstream-a");
    let up_b = tmp.path().join("upstream-b");
    let (key_a, paths_a) = make_upstream(&up_a, 3);
    let (key_b, paths_b) = make_upstream(&up_b, 3);
    let (app, big_a, hello) = (&paths_a[0], &paths_a[1], &paths_a[2]);
    let big_b = &paths_b[1];
    // The app's dependency: in its closure, not a top-level path.
    let dep = std::fs::read_to_string(up_a.join("closure.txt"))
        .unwrap()
        .lines()
        .find(|p| p.ends_with("-fixture-dep"))
        .unwrap()
        .to_string();
    let (_ua, url_a) = start_static(&up_a.join("cache"));
    let (_ub, url_b) = start_static(&up_b.join("cache"));

    let data = tmp.path().join("data");
    let admin = create_key(&data, "admin", "admin", &[]);
    let write = create_key(&data, "ci", "write", &[]);
    let read = create_key(&data, "reader", "read", &[]);
    let nip = start_nip(
        &data,
        &[
            "--upstream-cache",
            &url_a,
            "--upstream-cache",
            &url_b,
            "--upstream-public-key",
            &key_a,
            "--upstream-public-key",
            &key_b,
            "--cache-max-size",
            "5M",
            "--prometheus-enabled",
            // Every NAR is fetched by its request, so ncps' hit/miss counts below are exact.
            "--cache-prefetch-nar-max-size",
            "0",
        ],
    );
    let u = &nip.url;

    fetch(u, app);
    fetch(u, &dep);
    let pin_url = format!("{u}/pin/{}.narinfo", hash_of(app));
    use reqwest::Method;
    // Once keys exist: pinning needs a write key, unpinning an admin key.
    assert_eq!(call(Method::POST, &pin_url, None).status(), 401);
    assert_eq!(call(Method::POST, &pin_url, Some(&read)).status(), 403);
    assert_eq!(call(Method::POST, &pin_url, Some(&write)).status(), 200);
    assert_eq!(call(Method::POST, &pin_url, Some(&write)).status(), 200);
    assert_eq!(call(Method::DELETE, &pin_url, Some(&write)).status(), 403);
    // A hash this cache does not hold: 404, as ncps.
    let unknown = format!("{u}/pin/{}.narinfo", "0".repeat(32));
    assert_eq!(call(Method::POST, &unknown, Some(&write)).status(), 404);
    assert_eq!(
        call(
            Method::POST,
            &format!("{u}/pin/not-a-hash.narinfo"),
            Some(&write)
        )
        .status(),
        400
    );
    let pins: Vec<String> = call(Method::GET, &format!("{u}/pins"), None)
        .json()
        .unwrap();
    assert_eq!(pins, [hash_of(app)]);

    // Unpinned paths, read after the pinned ones: past the 5M limit once big_b arrives.
    std::thread::sleep(Duration::from_millis(1100));
    fetch(u, hello);
    std::thread::sleep(Duration::from_millis(1100));
    fetch(u, big_a);
    std::thread::sleep(Duration::from_millis(1100));
    fetch(u, big_b);
    // Wait on the metrics, not on `held`: a read touches the access time and would race the
    // eviction's choice of the least recently used entries.
    let evicted = || {
        let text = call(Method::GET, &format!("{u}/metrics"), None)
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("ncps_lru_nar_files_evicted_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while evicted() < 2.0 {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
            panic!("nothing was evicted:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The least recently used entries were the pinned closure's; it stays whole.
    assert!(held(u, app), "the pinned path was evicted");
    assert!(held(u, &dep), "the pinned path's reference was evicted");
    assert!(!held(u, hello), "the older unpinned path stayed");
    assert!(!held(u, big_a), "the older big path stayed");
    assert!(held(u, big_b), "the newest path was evicted");

    let text = call(Method::GET, &format!("{u}/metrics"), None)
        .text()
        .unwrap();
    assert_eq!(metric(&text, "ncps_lru_nar_files_evicted_total"), 2.0);
    assert_eq!(metric(&text, "ncps_lru_narinfos_evicted_total"), 2.0);
    assert!(metric(&text, "ncps_lru_cleanup_runs_total") >= 1.0);
    assert!(metric(&text, "ncps_lru_bytes_freed_total") > 3e6);
    assert_eq!(metric(&text, "ncps_lru_chunks_evicted_total"), 0.0);
    assert_eq!(metric(&text, "ncps_narinfo_count"), 3.0);
    assert_eq!(metric(&text, "ncps_nar_file_count"), 3.0);
    assert_eq!(
        metric(&text, "ncps_cache_max_size_bytes"),
        5.0 * 1024.0 * 1024.0
    );
    let ratio = metric(&text, "ncps_cache_utilization_ratio");
    assert!(ratio > 0.5 && ratio < 1.0, "{ratio}");
    assert_eq!(metric(&text, "ncps_upstream_count_total"), 2.0);
    assert_eq!(metric(&text, "ncps_upstream_count_healthy"), 2.0);
    assert_eq!(
        metric(
            &text,
            "ncps_nar_served_total{result=\"miss\",status=\"success\"}"
        ),
        5.0
    );
    assert!(
        metric(
            &text,
            "ncps_narinfo_served_total{result=\"miss\",status=\"success\"}"
        ) >= 5.0
    );
    assert_eq!(
        metric(&text, "ncps_upstream_nar_fetch_duration_seconds_count"),
        5.0
    );
    assert_eq!(
        metric(
            &text,
            "ncps_upstream_nar_fetch_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        5.0
    );
    assert!(metric(&text, "ncps_lru_cleanup_duration_seconds_count") >= 1.0);
    if let Some(problems) = promtool_problems(&text, "ncps metrics") {
        assert!(problems.is_empty(), "promtool check metrics: {problems:?}");
    }

    // Unpinned (admin; again is still 200, as ncps), the closure is an ordinary entry again.
    assert_eq!(call(Method::DELETE, &pin_url, Some(&admin)).status(), 200);
    assert_eq!(call(Method::DELETE, &pin_url, Some(&admin)).status(), 200);
    let pins: Vec<String> = call(Method::GET, &format!("{u}/pins"), None)
        .json()
        .unwrap();
    assert!(pins.is_empty(), "{pins:?}");
}

/// Without any key, pins are open as in ncps; `--prometheus-ncps-metrics=false` drops ncps'
/// names from `/metrics`.
#[test]
fn pins_are_open_before_any_key_and_ncps_metric_names_can_be_turned_off() {
    let Some(tmp) = nix_tempdir("pins_are_open_before_any_key") else {
        return;
    };
    let ((key, paths), (_up, url)) = serve_upstream(&tmp.path().join("upstream"), 1);
    let nip = start_nip_behind(
        &tmp.path().join("data"),
        &url,
        &key,
        &["--prometheus-enabled", "--prometheus-ncps-metrics=false"],
    );
    fetch(&nip.url, &paths[0]);
    let pin_url = format!("{}/pin/{}.narinfo", nip.url, hash_of(&paths[0]));
    assert_eq!(call(reqwest::Method::POST, &pin_url, None).status(), 200);
    assert_eq!(call(reqwest::Method::DELETE, &pin_url, None).status(), 200);
    let text = call(reqwest::Method::GET, &format!("{}/metrics", nip.url), None)
        .text()
        .unwrap();
    assert!(text.contains("nip_cache_misses_total"), "{text}");
    assert!(!text.contains("ncps_"), "{text}");
    // The narinfo fetch queued its NAR's prefetch (started, or skipped when the NAR request
    // came first); the counter shows once that prefetch has had its turn.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = call(reqwest::Method::GET, &format!("{}/metrics", nip.url), None)
            .text()
            .unwrap();
        if text.contains("nip_nar_prefetches_total{outcome=") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
