//! Index contracts beyond the Nix cache: `/v1` artifacts, API keys and the audit log.
use async_trait::async_trait;

use crate::extras::ExtraIndex;
use crate::gc::GcIndex;
use crate::lease::Leases;
use crate::meta::{MetaError, MetaStore};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub key: String,
    pub size: i64,
    pub sha256: String,
    pub metadata: String,
    pub created_at: i64,
}

/// Outcome of recording an artifact: keys are immutable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutArtifact {
    Created,
    /// The key already held exactly these bytes.
    AlreadyPresent(ArtifactRecord),
    /// The key holds other bytes.
    Conflict(ArtifactRecord),
}

/// Outcome of creating an API key: names are unique for good (revoked keys keep theirs, so the
/// audit log never names two keys alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateKey {
    Created,
    /// A key of that name exists, revoked or not; nothing was written.
    NameTaken,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub name: String,
    pub scope: String,
    pub prefix: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: i64,
    pub key_name: Option<String>,
    pub remote_addr: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub size: Option<i64>,
    pub sha256: Option<String>,
    pub result: String,
}

#[async_trait]
pub trait ArtifactIndex: Send + Sync + 'static {
    async fn get_artifact(&self, key: &str) -> Result<Option<ArtifactRecord>, MetaError>;
    /// Records an artifact whose blob is already published; never replaces another's bytes.
    async fn put_artifact(
        &self,
        rec: &ArtifactRecord,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<PutArtifact, MetaError>;
    /// Newest first (`created_at`, then `key`, both descending); `prefix` restricts to keys
    /// starting with it. `after` (a previous page's last `(created_at, key)`) continues past it,
    /// so callers can read a long listing in small pages rather than all rows at once.
    async fn list_artifacts(
        &self,
        name: Option<&str>,
        version: Option<&str>,
        prefix: Option<&str>,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<ArtifactRecord>, MetaError>;
    /// Deletes the row; returns it, and whether another row still uses the same bytes.
    async fn delete_artifact(&self, key: &str)
        -> Result<Option<(ArtifactRecord, bool)>, MetaError>;
    /// Marks artifacts as read now (batched by the caller).
    async fn touch_artifacts(&self, keys: &[String], at: i64) -> Result<(), MetaError>;
    /// Keys of artifacts not read since `before`.
    async fn artifacts_idle_since(&self, before: i64, limit: i64)
        -> Result<Vec<String>, MetaError>;
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Creates the key unless its name is taken, in one statement (no check-then-insert race).
    async fn create_key(
        &self,
        rec: &ApiKeyRecord,
        token_hash: &str,
    ) -> Result<CreateKey, MetaError>;
    async fn key_by_token_hash(&self, token_hash: &str) -> Result<Option<ApiKeyRecord>, MetaError>;
    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, MetaError>;
    /// True when a key of that name existed and was not yet revoked.
    async fn revoke_key(&self, name: &str, at: i64) -> Result<bool, MetaError>;
    /// Whether any usable key exists (decides if Nix uploads need one).
    async fn any_active_key(&self, now: i64) -> Result<bool, MetaError>;
}

#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    async fn audit(&self, entry: &AuditEntry) -> Result<(), MetaError>;
    /// Writes several entries, in one transaction where the backend can.
    async fn audit_many(&self, entries: &[AuditEntry]) -> Result<(), MetaError> {
        for e in entries {
            self.audit(e).await?;
        }
        Ok(())
    }
    /// Newest first.
    async fn audit_since(
        &self,
        since: i64,
        key_name: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, MetaError>;
}

/// Everything the server keeps in its database.
pub trait Index:
    MetaStore + ArtifactIndex + KeyStore + AuditLog + GcIndex + Leases + ExtraIndex
{
}
impl<T: MetaStore + ArtifactIndex + KeyStore + AuditLog + GcIndex + Leases + ExtraIndex> Index
    for T
{
}
