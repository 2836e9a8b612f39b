//! Storage for nip: blobs (NAR files, artifacts) behind [`BlobStore`] and the metadata index
//! behind [`MetaStore`]. Nothing here knows about HTTP.
pub mod blob;
#[cfg(test)]
mod blob_suite;
pub mod dialect;
pub mod extras;
pub mod gc;
pub mod index;
pub mod lease;
pub mod local;
#[cfg(target_os = "linux")]
mod mapped;
pub mod meta;
pub mod ncps;
pub mod s3;
pub mod sql;
mod sql_batch;
mod sql_gc;
mod sql_index;
pub mod staging;
#[cfg(test)]
mod testdb;
pub mod verify;

pub use blob::{
    BlobEntry, BlobKey, BlobRange, BlobRead, BlobStore, StoreError, ARTIFACT_PREFIX, NAR_PREFIX,
};
pub use extras::{ExtraIndex, ExtraKind, ExtraRecord, PutExtra};
pub use gc::{GcIndex, Usage};
pub use index::{
    ApiKeyRecord, ArtifactIndex, ArtifactRecord, AuditEntry, AuditLog, CreateKey, Index, KeyStore,
    PutArtifact,
};
pub use lease::Leases;
pub use local::LocalBlobStore;
pub use meta::{
    MetaError, MetaStore, NarInfoRecord, NarRecord, NarSource, PutNarInfo, UPLOAD_ORIGIN,
};
pub use s3::{S3BlobStore, S3Config};
pub use sql::{Backend, SqlMeta, SqliteMeta};
pub use staging::{BatchedWriter, StagedFile, Staging};
pub use verify::{EntryKind, Finding, Problem, VerifyReport};

/// Seconds since the Unix epoch; the index stores times as integers.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
