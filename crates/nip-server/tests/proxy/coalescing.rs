//! Concurrent requests for one missing narinfo or NAR share one upstream fetch.
use std::time::Duration;

use nip_core::nar_file::Compression;

use crate::harness::*;

#[tokio::test]
async fn fifty_concurrent_nar_requests_make_one_upstream_fetch() {
    // Slow enough that all 50 requests arrive while the fill is under way.
    let (up, e, nip) = slow_nar("popular", 2 * 1024 * 1024, 64 * 1024, 30).await;

    let narinfo_requests: Vec<_> = (0..50)
        .map(|_| tokio::spawn(get_owned(format!("{}/{}.narinfo", nip.url, e.hash))))
        .collect();
    let mut nar_path = None;
    for r in narinfo_requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200);
        nar_path = Some(served_nar_path(
            std::str::from_utf8(&body.unwrap()).unwrap(),
        ));
    }
    assert_eq!(up.hits(&e.narinfo_path()), 1);

    let nar_url = format!("{}/{}", nip.url, nar_path.unwrap());
    let mut requests = Vec::new();
    for i in 0..50 {
        let url = nar_url.clone();
        requests.push(tokio::spawn(async move {
            // Stagger: late joiners must still get the body from its first byte.
            tokio::time::sleep(Duration::from_millis(i * 10)).await;
            get_owned(url).await
        }));
    }
    assert_whole_bodies(requests, &e).await;
    assert_eq!(up.hits(&e.nar_path), 1);
    assert_eq!(nip.state.fills_started(), 1);
}

/// A nip in front of an upstream that sends a NAR of `size` random bytes in `chunk`s, each after
/// `delay_ms`.
async fn slow_nar(
    name: &str,
    size: usize,
    chunk: usize,
    delay_ms: u64,
) -> (FakeUpstream, Entry, Nip) {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let e = make_entry(name, size, Compression::Xz, &key);
    up.publish(&e);
    up.set(
        &e.nar_path,
        Behavior::Slow {
            body: e.nar.clone(),
            chunk,
            delay: Duration::from_millis(delay_ms),
        },
    );
    let nip = start_nip(&[&up], &[key.public_key()], vec![]).await;
    (up, e, nip)
}

/// Every request answered 200 with exactly the upstream's bytes.
async fn assert_whole_bodies(
    requests: Vec<tokio::task::JoinHandle<(u16, Result<bytes::Bytes, String>)>>,
    e: &Entry,
) {
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            body.unwrap() == e.nar,
            "a body differs from the upstream's bytes"
        );
    }
}

async fn get_owned(url: String) -> (u16, Result<bytes::Bytes, String>) {
    get(&url).await
}

/// A client that joins a big fill late reads what left the in-memory window from the staged
/// file, then the rest as it arrives: the same bytes as the first client's.
#[tokio::test]
async fn a_late_joiner_of_a_big_fill_gets_every_byte() {
    let (up, e, nip) = slow_nar("big-late", 12 * 1024 * 1024, 256 * 1024, 15).await;
    let (status, body) = get_owned(format!("{}/{}.narinfo", nip.url, e.hash)).await;
    assert_eq!(status, 200);
    let nar_url = format!(
        "{}/{}",
        nip.url,
        served_nar_path(std::str::from_utf8(&body.unwrap()).unwrap())
    );
    let first = tokio::spawn(get_owned(nar_url.clone()));
    // About 8 of the 12 MiB are in by then: more than the window keeps.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !first.is_finished(),
        "the first download is still under way"
    );
    assert_eq!(nip.state.fills_started(), 1);
    let late = tokio::spawn(get_owned(nar_url));
    assert_whole_bodies(vec![first, late], &e).await;
    assert_eq!(up.hits(&e.nar_path), 1);
}
