//! Blob storage in an S3-compatible bucket (AWS S3, MinIO, Garage, Ceph RGW, R2) through
//! `object_store`. Uploads stream the staged file in multipart chunks and downloads stream with
//! ranges: no whole object is held in memory. An object becomes visible only when its upload
//! completes (S3 semantics), and the index row is written after that, so a crashed upload leaves
//! no visible entry; its incomplete multipart parts are for the bucket's lifecycle rules to expire.
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::blob::{BlobEntry, BlobKey, BlobRange, BlobRead, BlobStore, StoreError};

/// Part size of multipart uploads: S3 needs at least 5 MiB per part but the last.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploaded at once.
const PARALLEL_PARTS: usize = 2;

/// Where and how to reach the bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// With scheme, e.g. `http://127.0.0.1:9000`; `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// When unset, the standard AWS environment variables are used.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), as MinIO-like servers want.
    pub force_path_style: bool,
    /// Key prefix inside the bucket, so one bucket can hold several caches.
    pub prefix: Option<String>,
}

pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    prefix: String,
}

fn err(e: object_store::Error) -> StoreError {
    StoreError::Io(std::io::Error::other(e.to_string()))
}

impl S3BlobStore {
    pub fn new(c: &S3Config) -> Result<Self, StoreError> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&c.bucket)
            .with_virtual_hosted_style_request(!c.force_path_style);
        if let Some(e) = &c.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some(r) = &c.region {
            b = b.with_region(r);
        }
        if let Some(k) = &c.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &c.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        let store = b.build().map_err(err)?;
        let prefix = c
            .prefix
            .as_deref()
            .unwrap_or("")
            .trim_matches('/')
            .to_string();
        Ok(S3BlobStore {
            store: Arc::new(store),
            prefix,
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, key: &BlobKey) -> Result<Option<u64>, StoreError> {
        match self.store.head(&self.path(key.as_str())).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    async fn read(
        &self,
        key: &BlobKey,
        range: Option<BlobRange>,
    ) -> Result<Option<BlobRead>, StoreError> {
        let opts = GetOptions {
            range: range.map(|r| GetRange::Bounded(r.start..r.end + 1)),
            ..Default::default()
        };
        match self.store.get_opts(&self.path(key.as_str()), opts).await {
            Ok(res) => {
                let size = res.meta.size;
                let body = res
                    .into_stream()
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .boxed();
                Ok(Some(BlobRead { size, body }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    async fn put_bytes(&self, key: &BlobKey, bytes: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&self.path(key.as_str()), bytes.into())
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn put_file(&self, key: &BlobKey, staged: &Path) -> Result<(), StoreError> {
        let mut file = tokio::fs::File::open(staged)
            .await
            .map_err(StoreError::from_io)?;
        let upload = self
            .store
            .put_multipart(&self.path(key.as_str()))
            .await
            .map_err(err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(StoreError::from_io(e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(PARALLEL_PARTS).await {
                return Err(err(e));
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(err)?;
        Ok(())
    }

    async fn adopt(&self, from: &BlobKey, to: &BlobKey) -> Result<bool, StoreError> {
        match self
            .store
            .copy(&self.path(from.as_str()), &self.path(to.as_str()))
            .await
        {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), StoreError> {
        match self.store.delete(&self.path(key.as_str())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    async fn presigned_get(
        &self,
        key: &BlobKey,
        ttl: std::time::Duration,
    ) -> Result<Option<String>, StoreError> {
        let url = self
            .store
            .signed_url(http::Method::GET, &self.path(key.as_str()), ttl)
            .await
            .map_err(err)?;
        Ok(Some(url.to_string()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobEntry>, StoreError> {
        let root = self.path(prefix);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let metas: Vec<_> = self
            .store
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(err)?;
        Ok(metas
            .into_iter()
            .map(|m| BlobEntry {
                key: m
                    .location
                    .as_ref()
                    .strip_prefix(&strip)
                    .unwrap_or(m.location.as_ref())
                    .to_string(),
                size: m.size,
                modified: Some(m.last_modified.into()),
            })
            .collect())
    }
}
