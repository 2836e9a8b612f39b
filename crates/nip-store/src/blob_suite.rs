//! The blob storage contract, checked with the same code against every backend: the local
//! directory always, and an S3-compatible server when `NIP_TEST_S3_ENDPOINT` names one
//! (`./scripts/test.sh` starts one; with `NIP_REQUIRE_TOOLS` set it must be there).
use futures::StreamExt;

use crate::blob::{BlobKey, BlobRange, BlobRead, BlobStore};
use crate::{LocalBlobStore, S3BlobStore, S3Config, Staging};

pub(crate) async fn backends(dir: &std::path::Path) -> Vec<(&'static str, Box<dyn BlobStore>)> {
    let mut out: Vec<(&'static str, Box<dyn BlobStore>)> = vec![(
        "local",
        Box::new(LocalBlobStore::new(dir.join("store")).unwrap()),
    )];
    match std::env::var("NIP_TEST_S3_ENDPOINT") {
        Ok(endpoint) => {
            let config = S3Config {
                bucket: std::env::var("NIP_TEST_S3_BUCKET").unwrap_or_else(|_| "nip-test".into()),
                endpoint: Some(endpoint),
                region: Some("us-east-1".into()),
                force_path_style: true,
                // A fresh prefix per run keeps runs apart in one bucket.
                prefix: Some(format!("suite-{}-{}", std::process::id(), rand_u32())),
                ..Default::default()
            };
            out.push(("s3", Box::new(S3BlobStore::new(&config).unwrap())));
        }
        Err(_) => {
            assert!(
                std::env::var("NIP_REQUIRE_TOOLS").is_err(),
                "NIP_TEST_S3_ENDPOINT is not set: ./scripts/test.sh starts an S3 server"
            );
            eprintln!("S3 backend not tested: NIP_TEST_S3_ENDPOINT is not set");
        }
    }
    out
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// A blob's whole body (for tests).
pub(crate) async fn collect(read: BlobRead) -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = read.body;
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[tokio::test]
async fn every_backend_keeps_the_blob_contract() {
    let dir = tempfile::tempdir().unwrap();
    let staging = Staging::new(dir.path().join("tmp")).unwrap();
    // Larger than one multipart part, so S3 uploads really are multipart.
    let big: Vec<u8> = (0..(9 * 1024 * 1024 + 123))
        .map(|i| (i % 253) as u8)
        .collect();
    for (name, store) in backends(dir.path()).await {
        let key = BlobKey::new("nar/abc.nar").unwrap();
        assert!(store.stat(&key).await.unwrap().is_none(), "{name}");
        assert!(store.read(&key, None).await.unwrap().is_none(), "{name}");
        let staged = staging.create().await.unwrap();
        staged
            .append(bytes::Bytes::from(big.clone()))
            .await
            .unwrap();
        staged.sync().await.unwrap();
        store.put_file(&key, staged.path()).await.unwrap();
        assert_eq!(
            store.stat(&key).await.unwrap(),
            Some(big.len() as u64),
            "{name}"
        );
        assert!(
            collect(store.read(&key, None).await.unwrap().unwrap()).await == big,
            "{name}: bytes differ"
        );
        let part = store
            .read(&key, Some(BlobRange { start: 5, end: 9 }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(part.size, big.len() as u64, "{name}");
        assert_eq!(collect(part).await, big[5..10].to_vec(), "{name}");
        let listed = store.list("nar").await.unwrap();
        assert_eq!(listed.len(), 1, "{name}: {listed:?}");
        assert_eq!(listed[0].key, "nar/abc.nar", "{name}");
        assert_eq!(listed[0].size, big.len() as u64, "{name}");
        assert!(store.list("artifacts").await.unwrap().is_empty(), "{name}");
        store.delete(&key).await.unwrap();
        store.delete(&key).await.unwrap();
        assert!(store.stat(&key).await.unwrap().is_none(), "{name}");

        // Bytes at hand are published the same way, leaving no half-published file behind.
        let small = bytes::Bytes::from_static(b"a small NAR checked in memory");
        store.put_bytes(&key, small.clone()).await.unwrap();
        assert_eq!(
            store.stat(&key).await.unwrap(),
            Some(small.len() as u64),
            "{name}"
        );
        assert_eq!(
            collect(store.read(&key, None).await.unwrap().unwrap()).await,
            small.to_vec(),
            "{name}"
        );
        let listed: Vec<String> = store
            .list("nar")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(listed, ["nar/abc.nar"], "{name}");
        // Published again over itself (a row whose bytes went missing meanwhile is refetched).
        let again = bytes::Bytes::from_static(b"fetched again");
        store.put_bytes(&key, again.clone()).await.unwrap();
        assert_eq!(
            collect(store.read(&key, None).await.unwrap().unwrap()).await,
            again.to_vec(),
            "{name}"
        );
        assert_eq!(store.list("nar").await.unwrap().len(), 1, "{name}");
        // An empty blob reads as empty, whole or by the read path for small files.
        store.put_bytes(&key, bytes::Bytes::new()).await.unwrap();
        assert_eq!(store.stat(&key).await.unwrap(), Some(0), "{name}");
        let empty = store.read(&key, None).await.unwrap().unwrap();
        assert_eq!(empty.size, 0, "{name}");
        assert!(collect(empty).await.is_empty(), "{name}");
        store.delete(&key).await.unwrap();
    }
}
