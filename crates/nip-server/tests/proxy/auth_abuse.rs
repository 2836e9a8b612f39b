//! Project issue 19: bad tokens are rate-limited and cannot flood the audit log; the status page
//! and `/metrics` do not leak names or bypass read authentication.
use nip_core::nar_file::Compression;
use nip_server::auth::hash_token;

use crate::harness::*;

async fn add_key(nip: &Nip, name: &str, scope: &str, token: &str) {
    nip.state
        .index()
        .create_key(
            &nip_store::ApiKeyRecord {
                name: name.into(),
                scope: scope.into(),
                prefix: None,
                created_at: nip_store::unix_now(),
                expires_at: None,
                revoked_at: None,
            },
            &hash_token(token),
        )
        .await
        .unwrap();
}

async fn auth_rows(nip: &Nip) -> Vec<nip_store::AuditEntry> {
    nip.state
        .index()
        .audit_since(0, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "auth")
        .collect()
}

async fn get(url: &str, auth: Option<&str>) -> (u16, String) {
    let mut req = client().get(url);
    if let Some(t) = auth {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The probe from the issue: random bearer tokens at 1 request/s get 429s past the burst, and
/// the audit log gets a few rows, not one per request.
#[tokio::test]
async fn random_tokens_are_rate_limited_and_audited_in_aggregate() {
    let nip = start_nip(
        &[],
        &[],
        vec![
            ("rate-limit.rps", vec!["1".into()]),
            ("rate-limit.burst", vec!["5".into()]),
        ],
    )
    .await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..300 {
        let token = format!("nip_{}", random_hash());
        let (status, _) = get(&format!("{}/v1/artifacts/x", nip.url), Some(&token)).await;
        *statuses.entry(status).or_default() += 1;
    }
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 280,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&401).copied().unwrap_or(0) >= 1,
        "{statuses:?}"
    );
    let rows = auth_rows(&nip).await;
    assert!(
        (1..=3).contains(&rows.len()),
        "{} auth audit rows: {rows:?}",
        rows.len()
    );
}

/// Without a rate limit, many failures from one address in a minute still make one audit row
/// (the rest are counted for a summary); a 40 KB path is stored truncated.
#[tokio::test]
async fn failures_are_aggregated_per_address_and_long_paths_truncated() {
    let nip = start_nip(&[], &[], vec![]).await;
    let long = "a".repeat(40_000);
    let (status, _) = get(&format!("{}/v1/artifacts/{long}", nip.url), Some("nip_bad")).await;
    assert_eq!(status, 401);
    for _ in 0..200 {
        let token = format!("nip_{}", random_hash());
        let (status, _) = get(&format!("{}/v1/artifacts/{long}", nip.url), Some(&token)).await;
        assert_eq!(status, 401);
    }
    let rows = auth_rows(&nip).await;
    assert!(rows.len() <= 2, "{} auth audit rows", rows.len());
    let first = rows.last().unwrap();
    let target = first.target.as_deref().unwrap();
    assert!(
        target.len() <= 512,
        "stored target is {} bytes",
        target.len()
    );
    assert!(target.starts_with("/v1/artifacts/aaaa"), "{target}");
    assert!(target.contains("truncated"), "{target}");
    assert!(first.result.starts_with("401"), "{first:?}");
}

/// Once a key exists the status page shows no names in recent activity.
#[tokio::test]
async fn status_page_hides_activity_names_once_a_key_exists() {
    let key = upstream_key();
    let e = make_entry("very-private-name", 1000, Compression::None, &key);
    let (_up, nip) = nip_over(&key, &[&e]).await;
    let (status, _) = get(&format!("{}/{}.narinfo", nip.url, e.hash), None).await;
    assert_eq!(status, 200);
    let (status, page) = get(&nip.url, None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("very-private-name"),
        "open server shows names"
    );

    add_key(&nip, "writer", "write", "nip_writerwriterwriterwriter00").await;
    let (status, page) = get(&nip.url, None).await;
    assert_eq!(status, 200);
    assert!(!page.contains("very-private-name"), "{page}");
    assert!(!page.contains(&e.hash), "{page}");
    assert!(page.contains("narinfo-fetch"), "{page}");
}

/// With read authentication, `/` and `/metrics` need a read key (or the get token);
/// `--prometheus-public` keeps `/metrics` open.
#[tokio::test]
async fn status_and_metrics_need_read_auth_when_reads_do() {
    let read = "nip_readerreaderreaderreader0000";
    for (settings, metrics_public) in [
        (
            vec![
                ("cache.require-auth-read", vec!["true".into()]),
                ("prometheus.enabled", vec!["true".into()]),
            ],
            false,
        ),
        (
            vec![
                ("cache.require-auth-read", vec!["true".into()]),
                ("prometheus.enabled", vec!["true".into()]),
                ("prometheus.public", vec!["true".into()]),
            ],
            true,
        ),
    ] {
        let nip = start_nip(&[], &[], settings).await;
        add_key(&nip, "reader", "read", read).await;
        let page = nip.url.clone();
        let metrics = format!("{}/metrics", nip.url);
        assert_eq!(get(&page, None).await.0, 401);
        assert_eq!(get(&page, Some("nip_wrong")).await.0, 401);
        assert_eq!(get(&page, Some(read)).await.0, 200);
        assert_eq!(get(&metrics, Some(read)).await.0, 200);
        let anonymous = get(&metrics, None).await.0;
        if metrics_public {
            assert_eq!(anonymous, 200);
        } else {
            assert_eq!(anonymous, 401);
        }
    }

    let token = "ncps-get-token-0123456789";
    let nip = start_nip(
        &[],
        &[],
        vec![
            ("cache.get-token", vec![token.into()]),
            ("prometheus.enabled", vec!["true".into()]),
        ],
    )
    .await;
    assert_eq!(get(&nip.url, None).await.0, 401);
    assert_eq!(get(&format!("{}/metrics", nip.url), None).await.0, 401);
    assert_eq!(get(&nip.url, Some(token)).await.0, 200);
    assert_eq!(
        get(&format!("{}/metrics", nip.url), Some(token)).await.0,
        200
    );
}
