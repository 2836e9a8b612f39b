//! The happy path: narinfo rewritten and re-signed, NAR streamed and cached, served from cache.
use nip_core::nar_file::Compression;
use nip_core::narinfo::NarInfo;
use nip_core::signing::verify_narinfo;

use crate::harness::*;

#[tokio::test]
async fn miss_then_hit_is_rewritten_resigned_and_served_from_cache() {
    let key = upstream_key();
    let e = make_entry("hello-2.12", 300_000, Compression::Xz, &key);
    let (up, nip) = nip_over(&key, &[&e]).await;

    let (status, body) = get(&format!("{}/{}.narinfo", nip.url, e.hash)).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
    let served = NarInfo::parse(&text).unwrap();
    assert_eq!(served.store_path, e.narinfo.store_path);
    assert_eq!(served.nar_hash, e.narinfo.nar_hash);
    assert_eq!(served.references, e.narinfo.references);
    assert!(
        served.url.starts_with("nar/") && served.url.ends_with(".nar.xz"),
        "{}",
        served.url
    );
    // Both the upstream's signature and ours verify.
    assert_eq!(
        verify_narinfo(&served, &[key.public_key()]).unwrap().name(),
        "upstream-test-1"
    );
    assert_eq!(
        verify_narinfo(&served, std::slice::from_ref(nip.state.public_key()))
            .unwrap()
            .name(),
        "nip-test-1"
    );

    let (status, nar) = get(&format!("{}/{}", nip.url, served.url)).await;
    assert_eq!(status, 200);
    assert_eq!(nar.unwrap(), e.nar);
    assert_eq!(up.hits(&e.nar_path), 1);

    // Upstream now fails everything: both come from the cache.
    up.set(&e.narinfo_path(), Behavior::Status(500));
    up.set(&e.nar_path, Behavior::Status(500));
    let (status, again) = get(&format!("{}/{}.narinfo", nip.url, e.hash)).await;
    assert_eq!((status, again.unwrap()), (200, bytes::Bytes::from(text)));
    let (status, nar) = get(&format!("{}/{}", nip.url, served.url)).await;
    assert_eq!((status, nar.unwrap()), (200, e.nar.clone()));
    assert_eq!(up.hits(&e.narinfo_path()), 1);
    assert_eq!(up.hits(&e.nar_path), 1);
    assert_eq!(nip.staging_files_settled().await, 0);
}

#[tokio::test]
async fn cache_info_pubkey_and_health() {
    let key = upstream_key();
    let (_up, nip) = nip_over(&key, &[]).await;
    let (status, body) = get(&format!("{}/nix-cache-info", nip.url)).await;
    assert_eq!(status, 200);
    let body = String::from_utf8(body.unwrap().to_vec()).unwrap();
    assert!(
        body.contains("StoreDir: /nix/store\n")
            && body.contains("WantMassQuery: 1\n")
            && body.contains("Priority: ")
    );
    let head = client()
        .head(format!("{}/nix-cache-info", nip.url))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let (status, body) = get(&format!("{}/pubkey", nip.url)).await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body.unwrap().to_vec()).unwrap(),
        nip.state.public_key().to_string()
    );
    let (status, body) = get(&format!("{}/v1/health", nip.url)).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body.unwrap()).unwrap()["status"],
        "ok"
    );
    assert_eq!(get(&format!("{}/healthz", nip.url)).await.0, 200);
}

#[tokio::test]
async fn cached_nar_supports_range_and_head_of_uncached_nar_does_not_download() {
    let key = upstream_key();
    let e = make_entry("ranged", 10_000, Compression::Zstd, &key);
    let (up, nip) = nip_over(&key, &[&e]).await;
    let nar_url = served_nar_url(&nip, &e).await;

    let head = client().head(&nar_url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "10000");
    assert_eq!(up.hits(&e.nar_path), 0, "HEAD downloaded the NAR");

    assert_eq!(get(&nar_url).await.1.unwrap(), e.nar);
    assert!(nip.wait_cached(nar_url.rsplit('/').next().unwrap()).await);
    let part = client()
        .get(&nar_url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 100-199/10000");
    assert_eq!(part.bytes().await.unwrap(), e.nar.slice(100..200));
    let bad = client()
        .get(&nar_url)
        .header("range", "bytes=20000-")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 416);
}

#[tokio::test]
async fn best_priority_upstream_wins_among_signed_answers() {
    let key = upstream_key();
    let slow_prio = FakeUpstream::start(60).await;
    let best = FakeUpstream::start(10).await;
    let e = make_entry("both", 1000, Compression::None, &key);
    // Same narinfo on both; only the best one's NAR may be fetched.
    slow_prio.publish(&e);
    best.publish(&e);
    let nip = start_nip(&[&slow_prio, &best], &[key.public_key()], vec![]).await;
    let nar_url = served_nar_url(&nip, &e).await;
    assert_eq!(get(&nar_url).await.1.unwrap(), e.nar);
    assert_eq!(best.hits(&e.nar_path), 1);
    assert_eq!(slow_prio.hits(&e.nar_path), 0);
}

#[tokio::test]
async fn missing_everywhere_is_404_and_remembered() {
    let key = upstream_key();
    let (up, nip) = nip_over(&key, &[]).await;
    let hash = random_hash();
    assert_eq!(get(&format!("{}/{hash}.narinfo", nip.url)).await.0, 404);
    assert_eq!(get(&format!("{}/{hash}.narinfo", nip.url)).await.0, 404);
    assert_eq!(
        up.hits(&format!("{hash}.narinfo")),
        1,
        "negative cache did not hold"
    );
}

/// Uncompressed NARs go out zstd-compressed to clients that accept it; compressed ones never.
#[tokio::test]
async fn uncompressed_nar_is_zstd_encoded_for_clients_that_accept_it() {
    let key = upstream_key();
    let plain = make_entry("plain", 200_000, Compression::None, &key);
    let xz = make_entry("packed", 50_000, Compression::Xz, &key);
    let (_up, nip) = nip_over(&key, &[&plain, &xz]).await;
    for (e, expect_zstd) in [(&plain, true), (&xz, false)] {
        let nar_url = served_nar_url(&nip, e).await;
        assert_eq!(
            get(&nar_url).await.1.unwrap(),
            e.nar,
            "first fetch (fills the cache)"
        );
        assert!(nip.wait_cached(nar_url.rsplit('/').next().unwrap()).await);
        let resp = client()
            .get(&nar_url)
            .header("accept-encoding", "gzip, zstd")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let encoding = resp
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.bytes().await.unwrap();
        if expect_zstd {
            assert_eq!(encoding.as_deref(), Some("zstd"));
            assert!(body.len() < e.nar.len() + 1024);
            assert_eq!(zstd::decode_all(&body[..]).unwrap(), e.nar.to_vec());
        } else {
            assert_eq!(encoding, None);
            assert_eq!(body, e.nar);
        }
    }
}
