//! SQL (SQLite, PostgreSQL and MySQL) implementation of the artifact index, API keys and audit log.
use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::index::{
    ApiKeyRecord, ArtifactIndex, ArtifactRecord, AuditEntry, AuditLog, CreateKey, KeyStore,
    PutArtifact,
};
use crate::meta::MetaError;
use crate::sql::SqlMeta;

const ARTIFACT_COLUMNS: &str = "key, size, sha256, metadata, created_at";

fn artifact(row: &AnyRow) -> Result<ArtifactRecord, sqlx::Error> {
    Ok(ArtifactRecord {
        key: row.try_get("key")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        metadata: crate::dialect::text(row, "metadata")?,
        created_at: row.try_get("created_at")?,
    })
}

fn api_key(row: &AnyRow) -> Result<ApiKeyRecord, sqlx::Error> {
    Ok(ApiKeyRecord {
        name: row.try_get("name")?,
        scope: row.try_get("scope")?,
        prefix: row.try_get("prefix")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn audit_entry(row: &AnyRow) -> Result<AuditEntry, sqlx::Error> {
    Ok(AuditEntry {
        at: row.try_get("at")?,
        key_name: row.try_get("key_name")?,
        remote_addr: row.try_get("remote_addr")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        result: row.try_get("result")?,
    })
}

/// The artifact stored under `key`, read through `exec` (the pool or a transaction).
async fn artifact_by_key<'e, E>(
    db: &SqlMeta,
    exec: E,
    key: &str,
) -> Result<Option<ArtifactRecord>, MetaError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query(&db.sql(&format!(
        "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE key = $1"
    )))
    .bind(key)
    .fetch_optional(exec)
    .await?;
    Ok(row.as_ref().map(artifact).transpose()?)
}

#[async_trait]
impl ArtifactIndex for SqlMeta {
    async fn get_artifact(&self, key: &str) -> Result<Option<ArtifactRecord>, MetaError> {
        artifact_by_key(self, self.pool(), key).await
    }

    async fn put_artifact(
        &self,
        rec: &ArtifactRecord,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<PutArtifact, MetaError> {
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO artifacts (key, size, sha256, metadata, name, version, created_at, last_accessed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key) DO NOTHING",
        ))
        .bind(&rec.key)
        .bind(rec.size)
        .bind(&rec.sha256)
        .bind(&rec.metadata)
        .bind(name)
        .bind(version)
        .bind(rec.created_at)
        .bind(rec.created_at)
        .execute(self.pool())
        .await;
        if crate::dialect::inserted(inserted)? == 1 {
            return Ok(PutArtifact::Created);
        }
        let existing = self
            .get_artifact(&rec.key)
            .await?
            .ok_or(MetaError::Db(sqlx::Error::RowNotFound))?;
        Ok(
            if existing.sha256 == rec.sha256 && existing.size == rec.size {
                PutArtifact::AlreadyPresent(existing)
            } else {
                PutArtifact::Conflict(existing)
            },
        )
    }

    async fn list_artifacts(
        &self,
        name: Option<&str>,
        version: Option<&str>,
        prefix: Option<&str>,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<ArtifactRecord>, MetaError> {
        // Prefix match with substr (not LIKE): keys may contain `_`, a LIKE wildcard.
        // `after` is a keyset cursor on the sort order, so a page costs the same wherever it is.
        // Each value is bound once per use: MySQL's placeholders are positional.
        let (after_at, after_key) = after.unzip();
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE ($1 IS NULL OR name = $2) \
             AND ($3 IS NULL OR version = $4) \
             AND ($5 IS NULL OR substr(key, 1, length($6)) = $7) \
             AND ($8 IS NULL OR created_at < $9 OR (created_at = $10 AND key < $11)) \
             ORDER BY created_at DESC, key DESC LIMIT $12"
        )))
        .bind(name)
        .bind(name)
        .bind(version)
        .bind(version)
        .bind(prefix)
        .bind(prefix)
        .bind(prefix)
        .bind(after_at)
        .bind(after_at)
        .bind(after_at)
        .bind(after_key)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(artifact).collect::<Result<_, _>>()?)
    }

    async fn delete_artifact(
        &self,
        key: &str,
    ) -> Result<Option<(ArtifactRecord, bool)>, MetaError> {
        let mut tx = self.pool().begin().await?;
        let Some(rec) = artifact_by_key(self, &mut *tx, key).await? else {
            return Ok(None);
        };
        sqlx::query(&self.sql("DELETE FROM artifacts WHERE key = $1"))
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let shared: i64 =
            sqlx::query_scalar(&self.sql("SELECT COUNT(*) FROM artifacts WHERE sha256 = $1"))
                .bind(&rec.sha256)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Some((rec, shared > 0)))
    }

    async fn touch_artifacts(&self, keys: &[String], at: i64) -> Result<(), MetaError> {
        self.touch_batched(
            "UPDATE artifacts SET last_accessed_at = $1 WHERE last_accessed_at < $2 AND key IN ({keys})",
            keys,
            at,
        )
        .await
    }

    async fn artifacts_idle_since(
        &self,
        before: i64,
        limit: i64,
    ) -> Result<Vec<String>, MetaError> {
        let keys = sqlx::query_scalar(&self.sql("SELECT key FROM artifacts WHERE last_accessed_at < $1 ORDER BY last_accessed_at LIMIT $2"))
            .bind(before)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        Ok(keys)
    }
}

#[async_trait]
impl KeyStore for SqlMeta {
    async fn create_key(
        &self,
        rec: &ApiKeyRecord,
        token_hash: &str,
    ) -> Result<CreateKey, MetaError> {
        // Only a taken name is an outcome: a clash of token hashes (or any other constraint)
        // stays an error.
        let inserted = sqlx::query(&self.sql(
            "INSERT INTO api_keys (name, token_hash, scope, prefix, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL) ON CONFLICT (name) DO NOTHING",
        ))
        .bind(&rec.name)
        .bind(token_hash)
        .bind(&rec.scope)
        .bind(&rec.prefix)
        .bind(rec.created_at)
        .bind(rec.expires_at)
        .execute(self.pool())
        .await;
        Ok(if crate::dialect::inserted(inserted)? == 1 {
            CreateKey::Created
        } else {
            CreateKey::NameTaken
        })
    }

    async fn key_by_token_hash(&self, token_hash: &str) -> Result<Option<ApiKeyRecord>, MetaError> {
        let row = sqlx::query(&self.sql(
            "SELECT name, scope, prefix, created_at, expires_at, revoked_at FROM api_keys WHERE token_hash = $1",
        ))
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(api_key).transpose()?)
    }

    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, MetaError> {
        let rows = sqlx::query(
            "SELECT name, scope, prefix, created_at, expires_at, revoked_at FROM api_keys ORDER BY created_at, name",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(api_key).collect::<Result<_, _>>()?)
    }

    async fn revoke_key(&self, name: &str, at: i64) -> Result<bool, MetaError> {
        let n = sqlx::query(
            &self.sql("UPDATE api_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL"),
        )
        .bind(at)
        .bind(name)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn any_active_key(&self, now: i64) -> Result<bool, MetaError> {
        let n: i64 = sqlx::query_scalar(&self.sql(
            "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1)",
        ))
        .bind(now)
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }
}

const INSERT_AUDIT: &str =
    "INSERT INTO audit_log (at, key_name, remote_addr, action, target, size, sha256, result) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// [`INSERT_AUDIT`] (as rewritten for the backend) bound to `e`, for the pool or a transaction.
fn insert_audit<'q>(
    sql: &'q str,
    e: &'q AuditEntry,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    sqlx::query(sql)
        .bind(e.at)
        .bind(&e.key_name)
        .bind(&e.remote_addr)
        .bind(&e.action)
        .bind(&e.target)
        .bind(e.size)
        .bind(&e.sha256)
        .bind(&e.result)
}

#[async_trait]
impl AuditLog for SqlMeta {
    async fn audit(&self, e: &AuditEntry) -> Result<(), MetaError> {
        insert_audit(&self.sql(INSERT_AUDIT), e)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn audit_many(&self, entries: &[AuditEntry]) -> Result<(), MetaError> {
        // One transaction: one sync of the database for the whole batch.
        let mut tx = self.pool().begin().await?;
        for e in entries {
            insert_audit(&self.sql(INSERT_AUDIT), e)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn audit_since(
        &self,
        since: i64,
        key_name: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, MetaError> {
        let rows = sqlx::query(&self.sql(
            "SELECT at, key_name, remote_addr, action, target, size, sha256, result FROM audit_log \
             WHERE at >= $1 AND ($2 IS NULL OR key_name = $3) ORDER BY id DESC LIMIT $4",
        ))
        .bind(since)
        .bind(key_name)
        .bind(key_name)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(audit_entry).collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyStore;

    fn rec(key: &str, sha: &str, at: i64) -> ArtifactRecord {
        ArtifactRecord {
            key: key.into(),
            size: 3,
            sha256: sha.into(),
            metadata: "{}".into(),
            created_at: at,
        }
    }

    /// The keys `list_artifacts` returns, in its order.
    async fn listed(
        db: &SqlMeta,
        name: Option<&str>,
        version: Option<&str>,
        prefix: Option<&str>,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Vec<String> {
        let records = db
            .list_artifacts(name, version, prefix, after, limit)
            .await
            .unwrap();
        records.into_iter().map(|r| r.key).collect()
    }

    #[tokio::test]
    async fn artifacts_are_immutable_and_listed_newest_first() {
        for t in crate::testdb::all().await {
            let db = &t.meta;
            assert_eq!(
                db.put_artifact(&rec("a_1", "s1", 10), Some("pkg"), Some("1"))
                    .await
                    .unwrap(),
                PutArtifact::Created
            );
            assert!(matches!(
                db.put_artifact(&rec("a_1", "s1", 11), None, None)
                    .await
                    .unwrap(),
                PutArtifact::AlreadyPresent(_)
            ));
            assert!(matches!(
                db.put_artifact(&rec("a_1", "s2", 12), None, None)
                    .await
                    .unwrap(),
                PutArtifact::Conflict(_)
            ));
            db.put_artifact(&rec("a_2", "s1", 20), Some("pkg"), Some("1"))
                .await
                .unwrap();
            db.put_artifact(&rec("axb", "s3", 30), Some("other"), Some("1"))
                .await
                .unwrap();
            assert_eq!(
                listed(db, Some("pkg"), Some("1"), None, None, 10).await,
                ["a_2", "a_1"]
            );
            // `_` is literal in prefixes.
            assert_eq!(
                listed(db, None, None, Some("a_"), None, 10).await,
                ["a_2", "a_1"]
            );
            // Pages continue strictly after the cursor, ties on time broken by key.
            assert_eq!(
                listed(db, None, None, None, Some((30, "axb")), 1).await,
                ["a_2"]
            );
            assert_eq!(
                listed(db, None, None, None, Some((20, "a_3")), 10).await,
                ["a_2", "a_1"]
            );
            assert_eq!(
                listed(db, None, None, None, Some((20, "a_2")), 10).await,
                ["a_1"]
            );
            let (gone, shared) = db.delete_artifact("a_1").await.unwrap().unwrap();
            assert_eq!((gone.sha256.as_str(), shared), ("s1", true));
            let (_, shared) = db.delete_artifact("a_2").await.unwrap().unwrap();
            assert!(!shared);
            assert!(db.delete_artifact("a_2").await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn keys_revoke_and_audit() {
        for t in crate::testdb::all().await {
            let db = &t.meta;
            assert!(!db.any_active_key(0).await.unwrap());
            let k = ApiKeyRecord {
                name: "ci".into(),
                scope: "write".into(),
                prefix: None,
                created_at: 1,
                expires_at: None,
                revoked_at: None,
            };
            assert_eq!(db.create_key(&k, "h1").await.unwrap(), CreateKey::Created);
            // A taken name is an outcome, and the first key is left as it was.
            let other = ApiKeyRecord {
                scope: "admin".into(),
                ..k.clone()
            };
            assert_eq!(
                db.create_key(&other, "h2").await.unwrap(),
                CreateKey::NameTaken
            );
            assert!(db.key_by_token_hash("h2").await.unwrap().is_none());
            assert_eq!(db.list_keys().await.unwrap(), std::slice::from_ref(&k));
            // Another name with a token hash already in use: an error, not a taken name.
            let twin = ApiKeyRecord {
                name: "twin".into(),
                ..k.clone()
            };
            assert!(db.create_key(&twin, "h1").await.is_err());
            assert_eq!(
                db.key_by_token_hash("h1").await.unwrap().unwrap().name,
                "ci"
            );
            assert!(db.any_active_key(0).await.unwrap());
            assert!(db.revoke_key("ci", 5).await.unwrap());
            assert!(!db.revoke_key("ci", 6).await.unwrap());
            assert_eq!(
                db.key_by_token_hash("h1")
                    .await
                    .unwrap()
                    .unwrap()
                    .revoked_at,
                Some(5)
            );
            assert!(!db.any_active_key(0).await.unwrap());
            // Revoked keys keep their names.
            assert_eq!(db.create_key(&k, "h3").await.unwrap(), CreateKey::NameTaken);
            db.audit(&AuditEntry {
                at: 7,
                action: "upload".into(),
                result: "201".into(),
                key_name: Some("ci".into()),
                ..Default::default()
            })
            .await
            .unwrap();
            assert_eq!(db.audit_since(0, Some("ci"), 10).await.unwrap().len(), 1);
            assert_eq!(db.audit_since(8, None, 10).await.unwrap().len(), 0);
        }
    }

    #[tokio::test]
    async fn audit_many_writes_a_batch() {
        for t in crate::testdb::all().await {
            let db = &t.meta;
            let batch: Vec<AuditEntry> = (0..3)
                .map(|i| AuditEntry {
                    at: 10 + i,
                    action: "artifact-download".into(),
                    target: Some(format!("k{i}")),
                    result: "200".into(),
                    ..Default::default()
                })
                .collect();
            db.audit_many(&batch).await.unwrap();
            let mut read = db.audit_since(0, None, 10).await.unwrap();
            read.reverse();
            assert_eq!(read, batch);
        }
    }
}
