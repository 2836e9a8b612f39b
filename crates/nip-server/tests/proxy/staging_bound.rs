//! Project issue 19: bytes staged at once are bounded (per client and in all), refusals are a
//! 429 with Retry-After (a 409 that says when to retry for Nix PUTs: Nix 2.8 retries a 429
//! without its body and hangs), and every reservation is given back; artifact
//! listings stay under their size cap however large the metadata.
use std::time::Duration;

use nip_core::api::ArtifactList;
use nip_core::nar_file::Compression;
use nip_store::ArtifactRecord;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;

/// Opens a connection that sends `head` (a request declaring a body) and a few body bytes, then
/// stalls: the server holds its staging reservation until the connection goes.
async fn stalled(nip: &Nip, head: String) -> TcpStream {
    let addr = nip.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[0u8; 10]).await.unwrap();
    s.flush().await.unwrap();
    s
}

async fn wait_reserved(nip: &Nip, total: u64) {
    for _ in 0..200 {
        if nip.state.staging_limits().reserved("").0 == total {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "staged bytes stayed at {}, expected {total}",
        nip.state.staging_limits().reserved("").0
    );
}

#[tokio::test]
async fn nix_puts_past_the_per_client_bound_get_a_4xx_and_reservations_are_released() {
    let up = FakeUpstream::start(40).await;
    let key = upstream_key();
    let nip = start_nip(
        &[&up],
        &[key.public_key()],
        vec![("cache.allow-put-verb", vec!["true".into()])],
    )
    .await;
    nip.state.staging_limits().set_caps(1 << 20, 3000);
    let e = make_entry("bound", 100, Compression::None, &key);
    let other = make_entry("other", 100, Compression::None, &key);
    let head = |n: usize| {
        format!(
            "PUT /{} HTTP/1.1\r\nhost: x\r\ncontent-length: {n}\r\n\r\n",
            other.nar_path
        )
    };
    let put = |path: &str, body: Vec<u8>| {
        client()
            .put(format!("{}/{path}", nip.url))
            .body(body)
            .send()
    };
    let s1 = stalled(&nip, head(1500)).await;
    let s2 = stalled(&nip, head(1500)).await;
    wait_reserved(&nip, 3000).await;

    let resp = put(&e.nar_path, e.nar.to_vec()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 409, "past the per-client bound");
    let body = resp.text().await.unwrap();
    assert!(body.contains("retry in"), "{body}");
    wait_reserved(&nip, 3000).await;

    // Dropped connections give their bytes back.
    drop((s1, s2));
    wait_reserved(&nip, 0).await;
    let resp = put(&e.nar_path, e.nar.to_vec()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(nip.stored_nar(e.nar_path.trim_start_matches("nar/")));
    wait_reserved(&nip, 0).await;

    // So do refused uploads (bytes not matching the name).
    let resp = put(&other.nar_path, vec![1u8; 500]).await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    wait_reserved(&nip, 0).await;
}

#[tokio::test]
async fn v1_uploads_past_the_global_bound_get_429_and_reservations_are_released() {
    let token = "staging-token-0123456789abcdef";
    let (_up, nip) = start_nip_with_api_key(token).await;
    // Per client is larger than global here, so the global bound is what refuses.
    nip.state.staging_limits().set_caps(4000, 1 << 20);
    let head = |n: usize, k: &str| {
        format!(
            "POST /v1/artifacts/{k} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
             content-type: multipart/form-data; boundary=XyZ\r\ncontent-length: {n}\r\n\r\n"
        )
    };
    let s1 = stalled(&nip, head(2000, "stalled-1")).await;
    let s2 = stalled(&nip, head(2000, "stalled-2")).await;
    wait_reserved(&nip, 4000).await;

    let body = "--XyZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nhello\r\n--XyZ--\r\n";
    let upload = || async {
        client()
            .post(format!("{}/v1/artifacts/ok-1", nip.url))
            .bearer_auth(token)
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .send()
            .await
            .unwrap()
    };
    let resp = upload().await;
    assert_eq!(resp.status().as_u16(), 429, "past the global bound");
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("10")
    );
    drop((s1, s2));
    wait_reserved(&nip, 0).await;
    let resp = upload().await;
    assert_eq!(resp.status().as_u16(), 201);
    wait_reserved(&nip, 0).await;
}

#[tokio::test]
async fn listings_of_large_metadata_stay_under_the_cap_and_say_they_were_cut() {
    let token = "list-token-0123456789abcdef";
    let (_up, nip) = start_nip_with_api_key(token).await;
    // 20 artifacts of ~1 MiB metadata each: ~20 MiB if listed whole.
    let big = "m".repeat(1_000_000);
    for i in 0..20 {
        let rec = ArtifactRecord {
            key: format!("big-{i:02}"),
            size: 1,
            sha256: format!("{:064x}", i),
            metadata: serde_json::json!({ "name": "big", "blob": big }).to_string(),
            created_at: 1_700_000_000 + i,
        };
        nip.state
            .index()
            .put_artifact(&rec, Some("big"), None)
            .await
            .unwrap();
    }
    let url = nip.url.as_str();
    let list = |q: &'static str| async move {
        let resp = client()
            .get(format!("{url}/v1/artifacts?{q}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.bytes().await.unwrap()
    };
    let bytes = list("name=big&limit=1000").await;
    assert!(bytes.len() <= 8 * 1024 * 1024, "{} bytes", bytes.len());
    let cut: ArtifactList = serde_json::from_slice(&bytes).unwrap();
    assert!(cut.truncated);
    assert!(
        (5..20).contains(&cut.artifacts.len()),
        "{}",
        cut.artifacts.len()
    );
    // Newest first, without gaps.
    let keys: Vec<_> = cut.artifacts.iter().map(|a| a.key.clone()).collect();
    let want: Vec<_> = (0..20)
        .rev()
        .take(keys.len())
        .map(|i| format!("big-{i:02}"))
        .collect();
    assert_eq!(keys, want);

    // Under the cap: complete, and no `truncated` field at all.
    let bytes = list("name=big&limit=3").await;
    assert!(!String::from_utf8_lossy(&bytes).contains("truncated"));
    let whole: ArtifactList = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(whole.artifacts.len(), 3);
    assert!(!whole.truncated);
    assert_eq!(whole.artifacts[2].key, "big-17");
    assert_eq!(
        whole.artifacts[0].metadata["blob"].as_str().unwrap().len(),
        1_000_000
    );
}
