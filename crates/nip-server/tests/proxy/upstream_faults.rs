//! Upstream faults that need the socket itself (lying Content-Length, connection resets), narinfo
//! that must be refused (missing signature, bodies over `MAX_NARINFO_SIZE`), and responsiveness
//! while an upstream stalls. For each: the client never gets a complete-looking response with bad
//! bytes, nothing bad is cached, and the next good upstream is used.
use std::time::{Duration, Instant};

use bytes::Bytes;
use nip_core::nar_file::Compression;
use nip_core::narinfo::MAX_NARINFO_SIZE;

use crate::harness::*;

/// A chunked (no Content-Length) raw answer, so the size is only known while reading.
fn raw_chunked(body: &[u8]) -> Bytes {
    let mut v =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for chunk in body.chunks(16 * 1024) {
        v.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        v.extend_from_slice(chunk);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    Bytes::from(v)
}

/// A NAR whose upstream lies about its length or resets the connection mid-body: the client's
/// body ends in an error (never a complete 200), nothing is cached, and the next request is
/// served by the other upstream with the same file.
#[tokio::test]
async fn nar_with_lying_length_or_reset_is_cut_and_never_cached() {
    let key = upstream_key();
    type Fault = Box<dyn Fn(&Bytes) -> Behavior>;
    let cases: Vec<(&str, Fault)> = vec![
        (
            "content-length longer than the body",
            Box::new(|nar: &Bytes| Behavior::Raw(raw_response(nar.len() + 1000, nar))),
        ),
        (
            "content-length shorter than the body",
            Box::new(|nar: &Bytes| Behavior::Raw(raw_response(nar.len() - 1000, nar))),
        ),
        (
            "content-length one byte short",
            Box::new(|nar: &Bytes| Behavior::Raw(raw_response(nar.len() - 1, nar))),
        ),
        (
            "reset mid-body",
            Box::new(|nar: &Bytes| {
                Behavior::RawReset(raw_response(nar.len(), &nar[..nar.len() / 2]))
            }),
        ),
        (
            "chunked with bytes missing",
            Box::new(|nar: &Bytes| Behavior::Raw(raw_chunked(&nar[..nar.len() - 10]))),
        ),
    ];
    for (what, fault) in cases {
        let e = make_entry("lying", 300_000, Compression::Xz, &key);
        let (bad, good, nip) = bad_before_good(&e, &key, &e.nar_path, fault(&e.nar)).await;
        let nar_path = served_nar_path_of(&nip, &e).await;
        let nar_file = nar_path.trim_start_matches("nar/").to_string();
        let nar_url = format!("{}/{nar_path}", nip.url);

        let (status, body) = get(&nar_url).await;
        match body {
            // A failure before the first byte may fail over within the same request.
            Ok(b) if status == 200 => assert_eq!(b, e.nar, "{what}: complete body, bad bytes"),
            Ok(b) => assert!(status >= 400, "{what}: {status} with {} bytes", b.len()),
            Err(_) => assert_nar_not_cached(&nip, &nar_file, what).await,
        }
        assert_eq!(
            bad.hits(&e.nar_path),
            1,
            "{what}: the fault was not exercised"
        );

        assert_refetched_from(&nip, &good, &e, &nar_url, &nar_file, what).await;
    }
}

/// A reset before any answer is like a 500: the same request switches to the other upstream.
#[tokio::test]
async fn nar_reset_before_the_answer_fails_over_within_the_request() {
    let key = upstream_key();
    let e = make_entry("reset", 50_000, Compression::Zstd, &key);
    let (bad, _good, nip) =
        bad_before_good(&e, &key, &e.nar_path, Behavior::RawReset(Bytes::new())).await;
    let nar_path = served_nar_path_of(&nip, &e).await;
    let (status, body) = get(&format!("{}/{nar_path}", nip.url)).await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), e.nar);
    assert_eq!(bad.hits(&e.nar_path), 1);
}

/// Narinfo that must be treated as absent: no signature at all, a body over `MAX_NARINFO_SIZE`
/// (with and without Content-Length), a connection reset, a lying Content-Length. The good,
/// lower-priority upstream's answer is served; alone, the bad one is a 404 and nothing is stored.
#[tokio::test]
async fn bad_narinfo_is_absent_and_the_good_upstream_answers() {
    let key = upstream_key();
    type Fault = Box<dyn Fn(&Entry) -> Behavior>;
    let huge = |e: &Entry| {
        let mut text = e.narinfo.to_text();
        text.push_str(&format!("X-Padding: {}\n", "a".repeat(MAX_NARINFO_SIZE)));
        text
    };
    let cases: Vec<(&str, Fault)> = vec![
        (
            "missing signature",
            Box::new(|e: &Entry| {
                let mut n = e.narinfo.clone();
                n.sigs.clear();
                Behavior::Serve(Bytes::from(n.to_text()))
            }),
        ),
        (
            "huge with content-length",
            Box::new(move |e: &Entry| Behavior::Serve(Bytes::from(huge(e)))),
        ),
        (
            "huge chunked",
            Box::new(move |e: &Entry| Behavior::Raw(raw_chunked(huge(e).as_bytes()))),
        ),
        (
            "endless chunked",
            Box::new(|_: &Entry| {
                // 4 MiB of one header line, far past the limit: read must stop early.
                Behavior::Raw(raw_chunked(&vec![b'a'; 4 << 20]))
            }),
        ),
        (
            "reset mid-body",
            Box::new(|e: &Entry| {
                let text = e.narinfo.to_text();
                Behavior::RawReset(raw_response(text.len(), &text.as_bytes()[..text.len() / 2]))
            }),
        ),
        (
            "content-length shorter than the body",
            Box::new(|e: &Entry| {
                let text = e.narinfo.to_text();
                // Cut inside the signature line: what arrives is a narinfo with a broken sig.
                Behavior::Raw(raw_response(text.len() - 20, text.as_bytes()))
            }),
        ),
    ];
    for (what, fault) in cases {
        let e = make_entry("badinfo", 1000, Compression::Xz, &key);
        let (bad, _good, nip) = bad_before_good(&e, &key, &e.narinfo_path(), fault(&e)).await;
        let (status, body) = get(&format!("{}/{}.narinfo", nip.url, e.hash)).await;
        assert_eq!(status, 200, "{what}");
        assert!(
            body.unwrap().len() < MAX_NARINFO_SIZE,
            "{what}: the bad body was served"
        );
        assert_eq!(
            bad.hits(&e.narinfo_path()),
            1,
            "{what}: fault not exercised"
        );

        let alone = FakeUpstream::start(10).await;
        let e = make_entry("badinfo-alone", 1000, Compression::Xz, &key);
        alone.publish(&e);
        alone.set(&e.narinfo_path(), fault(&e));
        let nip = start_nip(&[&alone], &[key.public_key()], vec![]).await;
        let (status, _) = get(&format!("{}/{}.narinfo", nip.url, e.hash)).await;
        assert_eq!(status, 404, "{what}: alone");
        assert!(
            nip.narinfo_record(&e.hash).await.is_none(),
            "{what}: bad narinfo stored"
        );
    }
}

/// While clients wait on an upstream that stalls mid-NAR and one that never answers a narinfo,
/// other clients keep getting cached narinfo and NARs promptly: stalled fills hold no lock or
/// worker the others need.
#[tokio::test]
async fn stalled_upstream_does_not_slow_other_clients() {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let cached: Vec<Entry> = (0..5)
        .map(|i| make_entry(&format!("cached{i}"), 100_000, Compression::Xz, &key))
        .collect();
    for e in &cached {
        up.publish(e);
    }
    let stalled = make_entry("stalled", 500_000, Compression::Xz, &key);
    up.publish(&stalled);
    up.set(
        &stalled.nar_path,
        Behavior::Stall {
            keep: 100_000,
            body: stalled.nar.clone(),
        },
    );
    let hanging = make_entry("hanging", 1000, Compression::Xz, &key);
    up.set(&hanging.narinfo_path(), Behavior::Hang);
    let nip = start_nip(
        &[&up],
        &[key.public_key()],
        vec![
            ("cache.upstream.response-header-timeout", vec!["60s".into()]),
            ("cache.upstream.body-idle-timeout", vec!["60s".into()]),
        ],
    )
    .await;
    // Warm the cache for the entries the fast clients read.
    let mut nar_urls = Vec::new();
    for e in &cached {
        let url = served_nar_url(&nip, e).await;
        assert_eq!(get(&url).await.1.unwrap(), e.nar);
        nar_urls.push(url);
    }
    let stalled_url = served_nar_url(&nip, &stalled).await;

    let mut slow = Vec::new();
    for _ in 0..10 {
        let url = stalled_url.clone();
        slow.push(tokio::spawn(async move {
            if let Ok(r) = reqwest::Client::new().get(&url).send().await {
                let _ = r.bytes().await;
            }
        }));
        let url = format!("{}/{}.narinfo", nip.url, hanging.hash);
        slow.push(tokio::spawn(async move {
            let _ = reqwest::Client::new().get(&url).send().await;
        }));
    }
    // Let the stalled requests reach the upstream.
    for _ in 0..100 {
        if up.hits(&stalled.nar_path) >= 1 && up.hits(&hanging.narinfo_path()) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let mut fast = Vec::new();
    for round in 0..10 {
        for (i, e) in cached.iter().enumerate() {
            let (nar_url, narinfo_url) = (
                nar_urls[i].clone(),
                format!("{}/{}.narinfo", nip.url, e.hash),
            );
            let expect = e.nar.clone();
            fast.push(tokio::spawn(async move {
                let (s, b) = get(&narinfo_url).await;
                assert_eq!(s, 200, "round {round}");
                assert!(b.is_ok());
                assert_eq!(get(&nar_url).await.1.unwrap(), expect);
            }));
        }
    }
    for f in fast {
        f.await.unwrap();
    }
    let took = started.elapsed();
    // Generous: 100 small loopback requests; a server blocked by the stall would take 60 s.
    assert!(took < Duration::from_secs(20), "fast clients took {took:?}");
    let finished = slow.iter().filter(|t| t.is_finished()).count();
    assert_eq!(
        finished, 0,
        "stalled requests finished early: the test did not overlap them"
    );
    for t in slow {
        t.abort();
    }
    // The stalled NAR is not cached while it stalls.
    let file = stalled_url.rsplit('/').next().unwrap().to_string();
    assert!(!nip.stored_nar(&file));
}
