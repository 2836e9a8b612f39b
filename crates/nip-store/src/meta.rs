//! The metadata index contract: which narinfos and NARs the cache holds and where missing NARs
//! come from. Backends: SQLite (embedded default).
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid database URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{0}")]
    MigrationLocked(String),
}

/// The origin of a narinfo that was uploaded (not fetched): it is stored durably.
pub const UPLOAD_ORIGIN: &str = "upload";

/// A narinfo as served by this cache (already rewritten and signed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfoRecord {
    pub hash: String,
    pub store_path: String,
    pub nar_file: String,
    pub file_size: Option<i64>,
    pub file_hash: Option<String>,
    pub nar_hash: String,
    pub narinfo: String,
    /// Upstream base URL it came from, or [`UPLOAD_ORIGIN`].
    pub origin: String,
    /// Name of the key whose signature vouched for it: the upstream key that verified it, or the
    /// trusted upload key that signed an upload. `None`: an upload no trusted key signed, or a
    /// narinfo of an upstream marked `?trusted=1` that no configured key signed.
    pub signed_by: Option<String>,
    /// API key that uploaded it; `None` for fetched entries and uploads without keys.
    pub uploaded_by: Option<String>,
}

/// What [`MetaStore::put_narinfo`] did. Store paths are immutable: a stored narinfo is never
/// replaced, so the caller learns what is there instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutNarInfo {
    Inserted,
    /// Another narinfo for this hash was stored first; nothing was written.
    Exists(Box<NarInfoRecord>),
}

/// A place a NAR can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarSource {
    pub url: String,
    pub upstream: String,
}

/// A stored, verified NAR file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarRecord {
    pub nar_file: String,
    pub size: i64,
    pub sha256: String,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// The narinfo for a store path hash, if the cache holds it.
    async fn get_narinfo(&self, hash: &str) -> Result<Option<NarInfoRecord>, MetaError>;

    /// Inserts a narinfo together with the places its NAR can be fetched from (best first; they
    /// are written first), unless one is stored for the hash already: that one is kept and
    /// returned.
    async fn put_narinfo(
        &self,
        rec: &NarInfoRecord,
        sources: &[NarSource],
    ) -> Result<PutNarInfo, MetaError>;

    /// Any narinfo that refers to `nar_file` (to learn its expected size and hash).
    async fn narinfo_for_nar(&self, nar_file: &str) -> Result<Option<NarInfoRecord>, MetaError>;

    /// Where `nar_file` can be fetched from, best first. Empty when unknown.
    async fn nar_sources(&self, nar_file: &str) -> Result<Vec<NarSource>, MetaError>;

    /// The stored NAR record, if its bytes are stored.
    async fn get_nar(&self, nar_file: &str) -> Result<Option<NarRecord>, MetaError>;

    /// Records that the NAR's bytes are stored and verified. Call only after the blob is published.
    async fn put_nar(&self, rec: &NarRecord) -> Result<(), MetaError>;

    /// [`MetaStore::put_nar`] for a NAR fetched from an upstream, which can be fetched again: its
    /// row may be written without an fsync and with others (SQLite), like fetched narinfos.
    async fn put_fetched_nar(&self, rec: &NarRecord) -> Result<(), MetaError> {
        self.put_nar(rec).await
    }

    /// Removes a narinfo; true when it existed.
    async fn delete_narinfo(&self, hash: &str) -> Result<bool, MetaError>;

    /// Removes a NAR's record (its bytes are the caller's to delete); true when it existed.
    async fn delete_nar(&self, nar_file: &str) -> Result<bool, MetaError>;

    /// A trivial query, for readiness checks.
    async fn ping(&self) -> Result<(), MetaError>;
}
