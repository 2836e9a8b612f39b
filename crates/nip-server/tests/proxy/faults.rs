//! Each upstream fault: the client gets an error or a miss, nothing is cached, and a second good
//! upstream is used when there is one.
use std::time::{Duration, Instant};

use bytes::Bytes;
use nip_core::nar_file::Compression;

use crate::harness::*;

async fn narinfo_status(nip: &Nip, e: &Entry) -> u16 {
    get(&format!("{}/{}.narinfo", nip.url, e.hash)).await.0
}

#[tokio::test]
async fn narinfo_500_alone_is_a_miss_and_not_remembered() {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let e = make_entry("flaky", 100, Compression::Xz, &key);
    up.set(&e.narinfo_path(), Behavior::Status(500));
    let nip = start_nip(&[&up], &[key.public_key()], vec![]).await;
    assert_eq!(narinfo_status(&nip, &e).await, 404);
    assert!(nip.narinfo_record(&e.hash).await.is_none());
    // A failure is not an absence: once the upstream recovers, the path is found at once.
    up.publish(&e);
    assert_eq!(narinfo_status(&nip, &e).await, 200);
}

#[tokio::test]
async fn narinfo_faults_fall_back_to_the_good_upstream() {
    let key = upstream_key();
    let stranger = nip_core::signing::SigningKey::generate("stranger-1").unwrap();
    for (what, fault) in [
        ("404", Some(Behavior::Status(404))),
        ("500", Some(Behavior::Status(500))),
        ("hang", Some(Behavior::Hang)),
        ("unknown key", None),
        (
            "garbage",
            Some(Behavior::Serve(Bytes::from_static(b"not a narinfo\0\xff"))),
        ),
    ] {
        let bad = FakeUpstream::start(10).await;
        let good = FakeUpstream::start(50).await;
        let e = make_entry("fallback", 1000, Compression::Xz, &key);
        good.publish(&e);
        match fault {
            Some(b) => bad.set(&e.narinfo_path(), b),
            None => bad.publish(&make_entry_like(&e, &stranger)),
        }
        let nip = start_nip(&[&bad, &good], &[key.public_key()], vec![]).await;
        let started = Instant::now();
        let (status, body) = get(&format!("{}/{}.narinfo", nip.url, e.hash)).await;
        assert_eq!(status, 200, "{what}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: took {:?}",
            started.elapsed()
        );
        let nar_url = format!(
            "{}/{}",
            nip.url,
            served_nar_path(std::str::from_utf8(&body.unwrap()).unwrap())
        );
        assert_eq!(get(&nar_url).await.1.unwrap(), e.nar, "{what}");
        assert_eq!(good.hits(&e.nar_path), 1, "{what}");
        assert_eq!(bad.hits(&e.nar_path), 0, "{what}");
    }
}

/// The same store path and NAR, but signed by another key.
fn make_entry_like(e: &Entry, key: &nip_core::signing::SigningKey) -> Entry {
    let mut other = e.clone();
    other.narinfo.sigs.clear();
    other.narinfo.sign(key);
    other
}

#[tokio::test]
async fn narinfo_signed_by_unknown_key_only_is_a_miss() {
    let key = upstream_key();
    let stranger = nip_core::signing::SigningKey::generate("upstream-test-1").unwrap();
    let up = FakeUpstream::start(40).await;
    // Same key name as the trusted one, different key: must still be refused.
    let e = make_entry("forged", 100, Compression::Xz, &stranger);
    up.publish(&e);
    let nip = start_nip(&[&up], &[key.public_key()], vec![]).await;
    assert_eq!(narinfo_status(&nip, &e).await, 404);
    assert!(nip.narinfo_record(&e.hash).await.is_none());
}

#[tokio::test]
async fn narinfo_for_another_path_is_refused() {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let e = make_entry("real", 100, Compression::Xz, &key);
    let other_hash = random_hash();
    up.set(
        &format!("{other_hash}.narinfo"),
        Behavior::Serve(Bytes::from(e.narinfo.to_text())),
    );
    let nip = start_nip(&[&up], &[key.public_key()], vec![]).await;
    assert_eq!(
        get(&format!("{}/{other_hash}.narinfo", nip.url)).await.0,
        404
    );
}

/// A NAR fault after bytes went out: the client's body ends in an error, nothing is cached,
/// and the next request uses the other upstream that has the same file. (The NAR is larger than
/// a staging write batch: a fault before the first batch reached the file fails over within the
/// request instead, as a fault before the first byte does.)
#[tokio::test]
async fn nar_faults_abort_the_client_cache_nothing_and_retry_elsewhere() {
    let key = upstream_key();
    for (what, make_fault) in [
        (
            "truncated",
            Box::new(|nar: Bytes| Behavior::Truncate {
                keep: nar.len() / 2,
                body: nar,
            }) as Box<dyn Fn(Bytes) -> Behavior>,
        ),
        (
            "wrong bytes",
            Box::new(|nar: Bytes| Behavior::Serve(random_bytes(nar.len()))),
        ),
        (
            "stalled",
            Box::new(|nar: Bytes| Behavior::Stall {
                keep: nar.len() / 3,
                body: nar,
            }),
        ),
        (
            "too long",
            Box::new(|nar: Bytes| {
                Behavior::Serve(Bytes::from([nar.to_vec(), b"extra".to_vec()].concat()))
            }),
        ),
    ] {
        let e = make_entry("nar-fault", 2_000_000, Compression::Xz, &key);
        let (_bad, good, nip) =
            bad_before_good(&e, &key, &e.nar_path, make_fault(e.nar.clone())).await;
        let nar_path = served_nar_path_of(&nip, &e).await;
        let nar_file = nar_path.trim_start_matches("nar/").to_string();
        let nar_url = format!("{}/{nar_path}", nip.url);

        let (status, body) = get(&nar_url).await;
        if let Ok(b) = body {
            panic!(
                "{what}: client got a complete body ({status}, {} bytes)",
                b.len()
            );
        }
        assert_nar_not_cached(&nip, &nar_file, what).await;

        assert_refetched_from(&nip, &good, &e, &nar_url, &nar_file, what).await;
    }
}

/// Failing before the first byte (500, cut with no bytes): the same request switches upstream.
#[tokio::test]
async fn nar_failure_before_first_byte_fails_over_within_the_request() {
    let key = upstream_key();
    for (what, fault) in [
        ("500", Behavior::Status(500)),
        ("404", Behavior::Status(404)),
        ("hang", Behavior::Hang),
    ] {
        let e = make_entry("failover", 50_000, Compression::Zstd, &key);
        let (bad, good, nip) = bad_before_good(&e, &key, &e.nar_path, fault).await;
        let nar_url = served_nar_url(&nip, &e).await;
        let (status, body) = get(&nar_url).await;
        assert_eq!(status, 200, "{what}");
        assert_eq!(body.unwrap(), e.nar, "{what}");
        assert_eq!(bad.hits(&e.nar_path), 1, "{what}");
        assert_eq!(good.hits(&e.nar_path), 1, "{what}");
    }
}

/// With a single upstream serving a bad NAR, every attempt fails and nothing is ever cached.
#[tokio::test]
async fn nar_with_wrong_hash_and_no_alternative_is_never_cached() {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let e = make_entry("corrupt", 100_000, Compression::Xz, &key);
    up.publish(&e);
    up.set(&e.nar_path, Behavior::Serve(random_bytes(e.nar.len())));
    let nip = start_nip(&[&up], &[key.public_key()], vec![]).await;
    let nar_path = served_nar_path_of(&nip, &e).await;
    for _ in 0..2 {
        // A small NAR is checked whole before a byte goes out: the client gets a 502.
        let (status, body) = get(&format!("{}/{nar_path}", nip.url)).await;
        assert_eq!(status, 502, "{body:?}");
    }
    assert_nar_not_cached(&nip, nar_path.trim_start_matches("nar/"), "wrong bytes").await;
}
