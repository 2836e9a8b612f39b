//! The blob storage contract: immutable, atomically published byte objects addressed by key.
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid blob key {0:?}")]
    InvalidKey(String),
    #[error("storage is full: {0}")]
    Full(std::io::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Maps an I/O error, telling "disk full" apart so callers can answer 507.
    pub fn from_io(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull {
            StoreError::Full(e)
        } else {
            StoreError::Io(e)
        }
    }
}

/// A validated blob key: `/`-separated segments of `[A-Za-z0-9._-]`, none empty, `.` or `..`.
/// Validation here is defence in depth: callers validate their own names first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlobKey(String);

impl BlobKey {
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        let ok = !key.is_empty()
            && key.len() <= 512
            && key.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            });
        if ok {
            Ok(BlobKey(key))
        } else {
            Err(StoreError::InvalidKey(key))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A NAR file (`<filehash>.nar[.ext]`) of the Nix cache: `nar/<file>`.
    pub fn nar(nar_file: &str) -> Result<Self, StoreError> {
        Self::new(format!("{NAR_PREFIX}/{nar_file}"))
    }

    /// Artifact bytes, stored once per content under their SHA-256 (hex): `artifacts/<sha256>`.
    pub fn artifact(sha256_hex: &str) -> Result<Self, StoreError> {
        Self::new(format!("{ARTIFACT_PREFIX}/{sha256_hex}"))
    }

    /// A file of the Nix cache other than narinfos and NARs (listing, build log, realisation,
    /// debug info) under its kind's prefix, its name escaped by [`escape_blob_name`].
    pub fn nix_extra(prefix: &str, name: &str) -> Result<Self, StoreError> {
        Self::new(format!("{prefix}/{}", escape_blob_name(name)))
    }
}

/// A name as one key segment: bytes outside `[A-Za-z0-9.-]` (and a leading `.`, which marks a
/// half-published file) become `_` and two hex digits, so distinct names stay distinct.
pub fn escape_blob_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

/// The blob layout: every NAR under this prefix, named as the Nix cache serves it.
pub const NAR_PREFIX: &str = "nar";
/// Every artifact's bytes under this prefix, named by their SHA-256.
pub const ARTIFACT_PREFIX: &str = "artifacts";
/// NAR listings (`<hash>.ls`), by store path hash.
pub const LS_PREFIX: &str = "ls";
/// Build logs (`log/<drv basename>`).
pub const LOG_PREFIX: &str = "log";
/// Realisations of content-addressed derivations (`realisations/<id>.doi`).
pub const REALISATION_PREFIX: &str = "realisations";
/// Debug info (`debuginfo/<build-id>`).
pub const DEBUGINFO_PREFIX: &str = "debuginfo";
/// ncps' build trace entries (`build-trace-v2/<drv>/<output>`).
pub const BUILD_TRACE_PREFIX: &str = "build-trace-v2";

/// An inclusive byte range `start..=end`, already checked against the blob size by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRange {
    pub start: u64,
    pub end: u64,
}

/// A stored blob as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    pub key: String,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// An open blob: its total size and a stream of the requested bytes.
pub struct BlobRead {
    pub size: u64,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size of the blob, or `None` when it does not exist. Never returns a partial blob.
    async fn stat(&self, key: &BlobKey) -> Result<Option<u64>, StoreError>;

    /// Opens the blob for streaming, restricted to `range` when given. `None` when absent.
    async fn read(
        &self,
        key: &BlobKey,
        range: Option<BlobRange>,
    ) -> Result<Option<BlobRead>, StoreError>;

    /// Publishes a fully written, fsynced staged file under `key`, replacing nothing that readers
    /// could see half-written: after this returns the blob is complete and durable.
    async fn put_file(&self, key: &BlobKey, staged: &Path) -> Result<(), StoreError>;

    /// Publishes `bytes`, all at hand, under `key`, as [`BlobStore::put_file`] does a staged
    /// file: complete and durable when this returns. For a small blob this is one trip to disk
    /// (or one PUT) instead of staging a file first.
    async fn put_bytes(&self, key: &BlobKey, bytes: Bytes) -> Result<(), StoreError>;

    /// Makes `to` hold the bytes of `from`, a blob outside nip's layout (another cache's files),
    /// leaving `from` as it is: a hard link on a local disk, a server-side copy on S3. `to` is
    /// complete and durable when this returns. Ok(false) when `from` does not exist.
    async fn adopt(&self, from: &BlobKey, _to: &BlobKey) -> Result<bool, StoreError> {
        Err(StoreError::Io(std::io::Error::other(format!(
            "this storage cannot adopt {}",
            from.as_str()
        ))))
    }

    /// Removes the blob; absent blobs are not an error. Readers that already opened it may finish.
    async fn delete(&self, key: &BlobKey) -> Result<(), StoreError>;

    /// Every blob directly under `prefix/` (including half-published ones, whose names start
    /// with `.`), for reconciliation after a crash.
    async fn list(&self, prefix: &str) -> Result<Vec<BlobEntry>, StoreError>;

    /// A URL that lets anyone holding it GET the blob directly for `ttl`, when the backend can
    /// make one (S3 presigned URLs); `None` otherwise.
    async fn presigned_get(
        &self,
        _key: &BlobKey,
        _ttl: std::time::Duration,
    ) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_key_rejects_traversal_and_odd_bytes() {
        for bad in [
            "", "..", "nar/../x", "/abs", "a//b", "a/", "x\0y", "a b", "a%2fb", "./a",
        ] {
            assert!(BlobKey::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["nar/0abc.nar.xz", "artifacts/my-pkg_1.0"] {
            assert_eq!(BlobKey::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn extra_names_are_escaped_into_one_segment() {
        let k = |n: &str| BlobKey::nix_extra(LOG_PREFIX, n).unwrap();
        assert_eq!(k("abc-hello.drv").as_str(), "log/abc-hello.drv");
        assert_eq!(k("a+b?c=d_e").as_str(), "log/a_2bb_3fc_3dd_5fe");
        assert_eq!(k("sha256:00!out").as_str(), "log/sha256_3a00_21out");
        assert_eq!(k("../x").as_str(), "log/_2e._2fx");
        assert_eq!(k(".hidden").as_str(), "log/_2ehidden");
        assert_ne!(k("a_2b"), k("a+"));
    }
}
