//! The rest of the Nix binary cache protocol: NAR listings, build logs, realisations and debug
//! info. One small kind of stored file for all four: bytes in blob storage under a prefix per
//! kind, one row per file, counted in the size budget and evicted least recently used first.
use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::blob::{
    BlobKey, StoreError, BUILD_TRACE_PREFIX, DEBUGINFO_PREFIX, LOG_PREFIX, LS_PREFIX,
    REALISATION_PREFIX,
};
use crate::meta::MetaError;
use crate::sql::SqlMeta;
use crate::unix_now;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtraKind {
    /// `<hash>.ls`: a NAR listing (JSON).
    Listing,
    /// `log/<drv basename>`: a build log.
    Log,
    /// `realisations/<drv hash>!<output>.doi`: a content-addressed derivation's output (JSON).
    Realisation,
    /// `debuginfo/<build id>`: where an ELF build id's debug file is (JSON).
    DebugInfo,
    /// `build-trace-v2/<drv>/<output>` (ncps, newer Nix): a realisation in another shape (JSON).
    BuildTrace,
}

/// Longest escaped name kept as it is in a blob name (with the content hash it stays well under
/// the 255-byte file name limit).
const MAX_ESCAPED_NAME: usize = 180;

impl ExtraKind {
    pub const ALL: [ExtraKind; 5] = [
        ExtraKind::Listing,
        ExtraKind::Log,
        ExtraKind::Realisation,
        ExtraKind::DebugInfo,
        ExtraKind::BuildTrace,
    ];

    /// The name stored in the index and used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtraKind::Listing => "ls",
            ExtraKind::Log => "log",
            ExtraKind::Realisation => "realisation",
            ExtraKind::DebugInfo => "debuginfo",
            ExtraKind::BuildTrace => "build-trace",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Where its bytes live in blob storage.
    pub fn blob_prefix(self) -> &'static str {
        match self {
            ExtraKind::Listing => LS_PREFIX,
            ExtraKind::Log => LOG_PREFIX,
            ExtraKind::Realisation => REALISATION_PREFIX,
            ExtraKind::DebugInfo => DEBUGINFO_PREFIX,
            ExtraKind::BuildTrace => BUILD_TRACE_PREFIX,
        }
    }

    /// The blob name of a file: its escaped name and the start of its SHA-256, so a racing
    /// upload of other bytes under the same name never overwrites the stored ones.
    /// A name too long for a file name once escaped (escaping triples some bytes; file names
    /// end at 255 bytes) keeps its start and adds the SHA-256 of the whole name.
    pub fn blob_name(self, name: &str, sha256_hex: &str) -> String {
        use sha2::Digest;
        let sha = sha256_hex.get(..16).unwrap_or(sha256_hex);
        let mut escaped = crate::blob::escape_blob_name(name);
        if escaped.len() > MAX_ESCAPED_NAME {
            let digest = sha2::Sha256::digest(name.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            escaped.truncate(100);
            escaped = format!("{escaped}.n{hex}");
        }
        format!("{escaped}.{sha}")
    }

    pub fn blob_key(self, name: &str, sha256_hex: &str) -> Result<BlobKey, StoreError> {
        BlobKey::new(format!(
            "{}/{}",
            self.blob_prefix(),
            self.blob_name(name, sha256_hex)
        ))
    }
}

/// A stored extra file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraRecord {
    pub kind: ExtraKind,
    pub name: String,
    pub size: i64,
    /// Hex SHA-256 of the stored bytes.
    pub sha256: String,
    pub content_type: String,
    /// How the stored bytes are compressed (sent as `Content-Encoding`), as uploaded or fetched.
    pub content_encoding: Option<String>,
    /// Upstream base URL, `upload` or `generated`.
    pub origin: String,
    pub uploaded_by: Option<String>,
    /// When it was last read (set by the index; ignored by [`ExtraIndex::put_extra`]).
    pub last_accessed_at: i64,
}

impl ExtraRecord {
    pub fn blob_key(&self) -> Result<BlobKey, StoreError> {
        self.kind.blob_key(&self.name, &self.sha256)
    }
}

/// What [`ExtraIndex::put_extra`] did: a stored file is never replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutExtra {
    Inserted,
    Exists(Box<ExtraRecord>),
}

#[async_trait]
pub trait ExtraIndex: Send + Sync + 'static {
    async fn get_extra(
        &self,
        kind: ExtraKind,
        name: &str,
    ) -> Result<Option<ExtraRecord>, MetaError>;
    /// Records a file whose bytes are already published, unless one is stored under that name.
    async fn put_extra(&self, rec: &ExtraRecord) -> Result<PutExtra, MetaError>;
    /// Removes the row (its bytes are the caller's to delete); the row when it existed.
    async fn delete_extra(
        &self,
        kind: ExtraKind,
        name: &str,
    ) -> Result<Option<ExtraRecord>, MetaError>;
    /// Marks a file as read at `at`.
    async fn touch_extra(&self, kind: ExtraKind, name: &str, at: i64) -> Result<(), MetaError>;
    /// Every stored file's kind, name and SHA-256, for reconciliation.
    async fn all_extras(&self) -> Result<Vec<(ExtraKind, String, String)>, MetaError>;
}

const COLUMNS: &str = "kind, name, size, sha256, content_type, content_encoding, origin, \
     uploaded_by, last_accessed_at";

fn record(row: &AnyRow) -> Result<ExtraRecord, sqlx::Error> {
    let kind: String = row.try_get("kind")?;
    Ok(ExtraRecord {
        kind: ExtraKind::parse(&kind)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown extra kind {kind:?}").into()))?,
        name: row.try_get("name")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        content_type: row.try_get("content_type")?,
        content_encoding: row.try_get("content_encoding")?,
        origin: row.try_get("origin")?,
        uploaded_by: row.try_get("uploaded_by")?,
        last_accessed_at: row.try_get("last_accessed_at")?,
    })
}

impl SqlMeta {
    /// The row `sql` returns for `kind` ($1) and `name` ($2), if any.
    async fn extra_row(
        &self,
        sql: &str,
        kind: ExtraKind,
        name: &str,
    ) -> Result<Option<ExtraRecord>, MetaError> {
        let row = sqlx::query(sql)
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }
}

#[async_trait]
impl ExtraIndex for SqlMeta {
    async fn get_extra(
        &self,
        kind: ExtraKind,
        name: &str,
    ) -> Result<Option<ExtraRecord>, MetaError> {
        let sql = format!("SELECT {COLUMNS} FROM nix_extras WHERE kind = $1 AND name = $2");
        self.extra_row(&self.sql(&sql), kind, name).await
    }

    async fn put_extra(&self, rec: &ExtraRecord) -> Result<PutExtra, MetaError> {
        let now = unix_now();
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO nix_extras (kind, name, size, sha256, content_type, content_encoding, \
             origin, uploaded_by, created_at, last_accessed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (kind, name) DO NOTHING",
        ))
        .bind(rec.kind.as_str())
        .bind(&rec.name)
        .bind(rec.size)
        .bind(&rec.sha256)
        .bind(&rec.content_type)
        .bind(&rec.content_encoding)
        .bind(&rec.origin)
        .bind(&rec.uploaded_by)
        .bind(now)
        .bind(now)
        .execute(self.pool())
        .await;
        if crate::dialect::inserted(inserted)? > 0 {
            return Ok(PutExtra::Inserted);
        }
        match self.get_extra(rec.kind, &rec.name).await? {
            Some(existing) => Ok(PutExtra::Exists(Box::new(existing))),
            // Deleted in between: try once more.
            None => self.put_extra(rec).await,
        }
    }

    async fn delete_extra(
        &self,
        kind: ExtraKind,
        name: &str,
    ) -> Result<Option<ExtraRecord>, MetaError> {
        if self.backend() == crate::sql::Backend::Mysql {
            // No DELETE … RETURNING on MySQL: the row is locked, read, then deleted.
            let mut tx = self.pool().begin().await?;
            let row = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM nix_extras WHERE kind = ? AND name = ? FOR UPDATE"
            ))
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM nix_extras WHERE kind = ? AND name = ?")
                .bind(kind.as_str())
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(row.as_ref().map(record).transpose()?);
        }
        let sql =
            format!("DELETE FROM nix_extras WHERE kind = $1 AND name = $2 RETURNING {COLUMNS}");
        self.extra_row(&sql, kind, name).await
    }

    async fn touch_extra(&self, kind: ExtraKind, name: &str, at: i64) -> Result<(), MetaError> {
        sqlx::query(&self.sql(
            "UPDATE nix_extras SET last_accessed_at = $1 \
             WHERE kind = $2 AND name = $3 AND last_accessed_at < $4",
        ))
        .bind(at)
        .bind(kind.as_str())
        .bind(name)
        .bind(at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn all_extras(&self) -> Result<Vec<(ExtraKind, String, String)>, MetaError> {
        let rows = sqlx::query("SELECT kind, name, sha256 FROM nix_extras")
            .fetch_all(self.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let kind: String = r.try_get("kind")?;
            // A kind this build does not know is left alone.
            if let Some(kind) = ExtraKind::parse(&kind) {
                out.push((kind, r.try_get("name")?, r.try_get("sha256")?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gc::GcIndex;

    #[test]
    fn long_names_still_fit_a_file_name_and_stay_distinct() {
        let sha = "ab".repeat(32);
        let long = |c: &str| format!("{}-{}", "x".repeat(60), c.repeat(150));
        let a = ExtraKind::BuildTrace.blob_name(&long("+"), &sha);
        let b = ExtraKind::BuildTrace.blob_name(&long("_"), &sha);
        assert!(a.len() < 255 && b.len() < 255, "{} {}", a.len(), b.len());
        assert_ne!(a, b);
        BlobKey::new(format!("build-trace-v2/{a}")).unwrap();
        // Short names keep their readable form.
        assert_eq!(
            ExtraKind::Log.blob_name("abc-hello.drv", &sha),
            "abc-hello.drv.abababababababab"
        );
    }

    fn rec(kind: ExtraKind, name: &str, size: i64) -> ExtraRecord {
        ExtraRecord {
            kind,
            name: name.into(),
            size,
            sha256: "00".into(),
            content_type: "text/plain; charset=utf-8".into(),
            content_encoding: None,
            origin: "upload".into(),
            uploaded_by: Some("ci".into()),
            last_accessed_at: 0,
        }
    }

    /// The record as stored, without its access time.
    fn bare(r: Option<ExtraRecord>) -> Option<ExtraRecord> {
        r.map(|r| ExtraRecord {
            last_accessed_at: 0,
            ..r
        })
    }

    #[tokio::test]
    async fn extras_round_trip_are_immutable_and_count_in_usage() {
        for t in crate::testdb::all().await {
            let db = t.meta.clone();
            let before = db.usage().await.unwrap().bytes;
            let log = rec(ExtraKind::Log, "abc-x.drv", 10);
            assert!(db
                .get_extra(ExtraKind::Log, "abc-x.drv")
                .await
                .unwrap()
                .is_none());
            assert_eq!(db.put_extra(&log).await.unwrap(), PutExtra::Inserted);
            // Same name, other kind: a separate file.
            let ls = rec(ExtraKind::Listing, "abc-x.drv", 5);
            assert_eq!(db.put_extra(&ls).await.unwrap(), PutExtra::Inserted);
            let mut other = log.clone();
            other.sha256 = "11".into();
            let PutExtra::Exists(existing) = db.put_extra(&other).await.unwrap() else {
                panic!("a stored file was replaced");
            };
            assert_eq!(bare(Some(*existing)), Some(log.clone()));
            let got = db.get_extra(ExtraKind::Log, "abc-x.drv").await.unwrap();
            assert!(got.as_ref().unwrap().last_accessed_at >= unix_now() - 5);
            assert_eq!(bare(got), Some(log.clone()));
            assert_eq!(db.usage().await.unwrap().bytes, before + 15);
            db.touch_extra(ExtraKind::Log, "abc-x.drv", unix_now() + 3600)
                .await
                .unwrap();
            let got = db.get_extra(ExtraKind::Log, "abc-x.drv").await.unwrap();
            assert!(got.unwrap().last_accessed_at >= unix_now() + 3000);
            let mut all = db.all_extras().await.unwrap();
            all.sort_by_key(|(k, _, _)| k.as_str());
            assert_eq!(
                all,
                [
                    (ExtraKind::Log, "abc-x.drv".to_string(), "00".to_string()),
                    (
                        ExtraKind::Listing,
                        "abc-x.drv".to_string(),
                        "00".to_string()
                    )
                ]
            );
            assert_eq!(
                bare(db.delete_extra(ExtraKind::Log, "abc-x.drv").await.unwrap()),
                Some(log)
            );
            assert!(db
                .delete_extra(ExtraKind::Log, "abc-x.drv")
                .await
                .unwrap()
                .is_none());
        }
    }

    /// Extras are evicted least recently used first along with NARs, bytes and row together,
    /// and reconciliation removes rows without bytes and bytes without rows.
    #[tokio::test]
    async fn extras_are_evicted_and_reconciled() {
        use crate::blob::BlobStore;
        for t in crate::testdb::all().await {
            let (db, _keep) = t.into_parts();
            let dir = tempfile::tempdir().unwrap();
            let blobs = crate::LocalBlobStore::new(dir.path().join("store")).unwrap();
            let staging = crate::Staging::new(dir.path().join("tmp")).unwrap();
            for (kind, name, at) in [
                (ExtraKind::Log, "old+1.drv", 1),
                (ExtraKind::Listing, "new", 2),
                (ExtraKind::Realisation, "sha256:ab!out", 3),
            ] {
                let staged = staging.create().await.unwrap();
                staged
                    .append(bytes::Bytes::from(vec![7u8; 100]))
                    .await
                    .unwrap();
                blobs
                    .put_file(&kind.blob_key(name, "00").unwrap(), staged.path())
                    .await
                    .unwrap();
                db.put_extra(&rec(kind, name, 100)).await.unwrap();
                sqlx::query(&db.sql("UPDATE nix_extras SET last_accessed_at = $1 WHERE name = $2"))
                    .bind(at)
                    .bind(name)
                    .execute(db.pool())
                    .await
                    .unwrap();
            }
            let s = crate::gc::evict(&db, &blobs, 200, false).await.unwrap();
            assert_eq!((s.extras, s.usage_after), (1, 200));
            assert!(db
                .get_extra(ExtraKind::Log, "old+1.drv")
                .await
                .unwrap()
                .is_none());
            let old_key = ExtraKind::Log.blob_key("old+1.drv", "00").unwrap();
            assert!(blobs.stat(&old_key).await.unwrap().is_none());
            // A lost blob: its row goes.
            std::fs::remove_file(blobs.root().join("ls/new.00")).unwrap();
            let s = crate::gc::reconcile(&db, &blobs, std::time::Duration::ZERO, false)
                .await
                .unwrap();
            assert_eq!(s.rows_without_bytes, 1);
            assert!(db
                .get_extra(ExtraKind::Listing, "new")
                .await
                .unwrap()
                .is_none());
            assert!(db
                .get_extra(ExtraKind::Realisation, "sha256:ab!out")
                .await
                .unwrap()
                .is_some());
            assert_eq!(
                crate::gc::reconcile(&db, &blobs, std::time::Duration::ZERO, false)
                    .await
                    .unwrap()
                    .total(),
                0
            );
        }
    }
}
