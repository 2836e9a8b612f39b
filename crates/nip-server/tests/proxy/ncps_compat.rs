//! ncps behaviours nip keeps: `--cache-get-token` gates Nix reads, and `/upload/…` serves only
//! what the cache holds (a miss never goes upstream) while accepting PUTs.
use nip_core::nar_file::Compression;
use nip_server::auth::hash_token;

use crate::harness::*;

async fn status_with(url: &str, auth: Option<&str>, head: bool) -> u16 {
    let c = client();
    let mut req = if head { c.head(url) } else { c.get(url) };
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    req.send().await.unwrap().status().as_u16()
}

/// With `--cache-get-token`, Nix GET/HEAD need that token (Bearer, or the Basic password Nix
/// sends from netrc) or a read key; /healthz and /pubkey stay public.
#[tokio::test]
async fn get_token_gates_nix_reads_and_a_read_key_works_too() {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let e = make_entry("gated", 1000, Compression::None, &key);
    up.publish(&e);
    let token = "ncps-get-token-0123456789";
    let nip = start_nip(
        &[&up],
        &[key.public_key()],
        vec![("cache.get-token", vec![token.into()])],
    )
    .await;
    let narinfo = format!("{}/{}.narinfo", nip.url, e.hash);
    let info = format!("{}/nix-cache-info", nip.url);
    let bearer = format!("Bearer {token}");

    for url in [&narinfo, &info] {
        for head in [false, true] {
            assert_eq!(status_with(url, None, head).await, 401, "{url} head={head}");
            assert_eq!(
                status_with(url, Some("Bearer wrong-token"), head).await,
                401,
                "{url} head={head}"
            );
        }
    }
    assert_eq!(
        up.hits(&e.narinfo_path()),
        0,
        "refused reads never reach upstream"
    );
    assert_eq!(status_with(&narinfo, Some(&bearer), false).await, 200);
    assert_eq!(status_with(&narinfo, Some(&bearer), true).await, 200);
    assert_eq!(status_with(&info, Some(&bearer), true).await, 200);
    // Nix sends netrc credentials as HTTP Basic: the password is the token.
    let basic = {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("nix:{token}"))
        )
    };
    assert_eq!(status_with(&narinfo, Some(&basic), false).await, 200);

    // A read API key is accepted as well.
    let read_token = "nip_readkeyreadkeyreadkeyreadkey";
    nip.state
        .index()
        .create_key(
            &nip_store::ApiKeyRecord {
                name: "reader".into(),
                scope: "read".into(),
                prefix: None,
                created_at: nip_store::unix_now(),
                expires_at: None,
                revoked_at: None,
            },
            &hash_token(read_token),
        )
        .await
        .unwrap();
    assert_eq!(
        status_with(&narinfo, Some(&format!("Bearer {read_token}")), false).await,
        200
    );

    for path in ["healthz", "pubkey"] {
        assert_eq!(
            status_with(&format!("{}/{path}", nip.url), None, false).await,
            200,
            "{path}"
        );
    }
}

/// `/upload/<hash>.narinfo` and `/upload/nar/<file>` never ask upstream: a path only the
/// upstream has is a 404 there (so `nix copy --to …/upload` uploads it), while the root fetches it.
#[tokio::test]
async fn upload_path_reads_never_go_upstream() {
    let key = upstream_key();
    let e = make_entry("upstream-only", 1000, Compression::Xz, &key);
    let (up, nip) = nip_over(&key, &[&e]).await;

    let upload_narinfo = format!("{}/upload/{}.narinfo", nip.url, e.hash);
    assert_eq!(status_with(&upload_narinfo, None, false).await, 404);
    assert_eq!(status_with(&upload_narinfo, None, true).await, 404);
    assert_eq!(up.hits(&e.narinfo_path()), 0);

    // The root fetches it; then /upload serves the narinfo from the index, but not the NAR
    // that was never downloaded (HEAD at the root answers from the narinfo instead).
    let (status, body) = get(&format!("{}/{}.narinfo", nip.url, e.hash)).await;
    assert_eq!(status, 200);
    let nar_url = served_nar_path(std::str::from_utf8(&body.unwrap()).unwrap());
    assert_eq!(status_with(&upload_narinfo, None, false).await, 200);
    let upload_nar = format!("{}/upload/{nar_url}", nip.url);
    assert_eq!(status_with(&upload_nar, None, true).await, 404);
    assert_eq!(status_with(&upload_nar, None, false).await, 404);
    assert_eq!(up.hits(&e.nar_path), 0);
    assert_eq!(
        status_with(&format!("{}/{nar_url}", nip.url), None, true).await,
        200
    );

    // Once the root has fetched the NAR, /upload serves it from storage.
    let (status, nar) = get(&format!("{}/{nar_url}", nip.url)).await;
    assert_eq!((status, nar.unwrap()), (200, e.nar.clone()));
    assert!(nip.wait_cached(nar_url.trim_start_matches("nar/")).await);
    let (status, nar) = get(&upload_nar).await;
    assert_eq!((status, nar.unwrap()), (200, e.nar.clone()));
    assert_eq!(up.hits(&e.nar_path), 1);

    let (status, info) = get(&format!("{}/upload/nix-cache-info", nip.url)).await;
    assert_eq!(status, 200);
    // ncps' body (pkg/server/server.go `nixCacheInfo`), Priority 10 included.
    assert_eq!(
        std::str::from_utf8(&info.unwrap()).unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n"
    );
}
