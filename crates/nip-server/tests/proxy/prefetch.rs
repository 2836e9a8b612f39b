//! A narinfo fetched from an upstream brings its small NAR along (`--cache-prefetch-nar-max-size`):
//! the NAR request that follows is a hit, or joins the prefetch's fill; never a second download.
use std::time::Duration;

use nip_core::nar_file::Compression;
use nip_core::signing::SigningKey;

use crate::harness::*;

async fn nip_prefetching(key: &SigningKey, max: &str, entries: &[&Entry]) -> (FakeUpstream, Nip) {
    let up = FakeUpstream::start(40).await;
    for e in entries {
        up.publish(e);
    }
    let setting = vec![("cache.prefetch-nar-max-size", vec![max.to_string()])];
    let nip = start_nip(&[&up], &[key.public_key()], setting).await;
    (up, nip)
}

/// The NAR file name nip serves `e` under, from its narinfo (fetching it).
async fn nar_file(nip: &Nip, e: &Entry) -> String {
    let path = served_nar_path_of(nip, e).await;
    path.trim_start_matches("nar/").to_string()
}

#[tokio::test]
async fn a_fetched_narinfo_brings_its_small_nar() {
    let key = upstream_key();
    let e = make_entry("prefetched", 100_000, Compression::Xz, &key);
    let (up, nip) = nip_prefetching(&key, "1M", &[&e]).await;

    let file = nar_file(&nip, &e).await;
    assert!(nip.wait_cached(&file).await, "the NAR was not prefetched");
    assert_eq!(up.hits(&e.nar_path), 1);

    let (status, body) = get(&format!("{}/nar/{file}", nip.url)).await;
    assert_eq!((status, body.unwrap()), (200, e.nar.clone()));
    assert_eq!(up.hits(&e.nar_path), 1, "the NAR was downloaded twice");
    assert_eq!(nip.state.fills_started(), 1);
}

#[tokio::test]
async fn bigger_nars_and_a_zero_limit_are_left_to_their_requests() {
    let key = upstream_key();
    let big = make_entry("too-big", 4_000, Compression::Zstd, &key);
    let (up, nip) = nip_prefetching(&key, "1K", &[&big]).await;
    let file = nar_file(&nip, &big).await;

    let small = make_entry("off", 500, Compression::Zstd, &key);
    let (up_off, nip_off) = nip_prefetching(&key, "0", &[&small]).await;
    let file_off = nar_file(&nip_off, &small).await;

    // A prefetch would have started by now (it starts as the narinfo is stored).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (up, nip, e, file) in [
        (&up, &nip, &big, &file),
        (&up_off, &nip_off, &small, &file_off),
    ] {
        assert_eq!(up.hits(&e.nar_path), 0, "{file} was prefetched");
        assert_eq!(nip.state.fills_started(), 0);
        let (status, body) = get(&format!("{}/nar/{file}", nip.url)).await;
        assert_eq!((status, body.unwrap()), (200, e.nar.clone()));
        assert_eq!(up.hits(&e.nar_path), 1);
    }
}

/// A NAR request that arrives while the prefetch downloads joins it: one upstream download.
#[tokio::test]
async fn a_request_during_the_prefetch_joins_it() {
    let key = upstream_key();
    let e = make_entry("joined", 512 * 1024, Compression::Xz, &key);
    let (up, nip) = nip_prefetching(&key, "1M", &[&e]).await;
    up.set(
        &e.nar_path,
        Behavior::Slow {
            body: e.nar.clone(),
            chunk: 32 * 1024,
            delay: Duration::from_millis(40),
        },
    );

    let file = nar_file(&nip, &e).await;
    // The prefetch is under way (16 chunks of 40 ms) when the request comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(nip.state.fills_started(), 1, "no prefetch started");
    let (status, body) = get(&format!("{}/nar/{file}", nip.url)).await;
    assert_eq!((status, body.unwrap()), (200, e.nar.clone()));
    assert_eq!(
        up.hits(&e.nar_path),
        1,
        "the request did not join the prefetch"
    );
    assert_eq!(nip.state.fills_started(), 1);
    assert!(nip.wait_cached(&file).await);
}
