//! SQL (SQLite, PostgreSQL and MySQL) implementation of the eviction and reconciliation queries.
use async_trait::async_trait;
use sqlx::Row;

use crate::gc::{ArtifactRow, Candidate, CandidateKind, GcIndex, Usage};
use crate::meta::{MetaError, NarRecord};
use crate::sql::SqlMeta;

#[async_trait]
impl GcIndex for SqlMeta {
    async fn usage(&self) -> Result<Usage, MetaError> {
        let row = sqlx::query(&self.sql(
            // CAST: PostgreSQL and MySQL sum BIGINTs into NUMERIC / DECIMAL.
            "SELECT CAST((SELECT COALESCE(SUM(size), 0) FROM nars) \
                  + (SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT sha256, size FROM artifacts) AS d) \
                  + (SELECT COALESCE(SUM(size), 0) FROM nix_extras) AS BIGINT) AS bytes, \
                    (SELECT COUNT(*) FROM nars) AS nars, (SELECT COUNT(*) FROM narinfos) AS narinfos, \
                    (SELECT COUNT(*) FROM artifacts) AS artifacts",
        ))
        .fetch_one(self.pool())
        .await?;
        Ok(Usage {
            bytes: row.try_get("bytes")?,
            nars: row.try_get("nars")?,
            narinfos: row.try_get("narinfos")?,
            artifacts: row.try_get("artifacts")?,
        })
    }

    async fn eviction_candidates(&self, limit: i64) -> Result<Vec<Candidate>, MetaError> {
        let rows = sqlx::query(&self.sql(
            "SELECT 'nar' AS kind, n.nar_file AS id, n.size AS size, n.last_accessed_at AS at FROM nars n \
             WHERE NOT EXISTS (SELECT 1 FROM narinfos i JOIN pins p ON p.key = i.hash WHERE i.nar_file = n.nar_file) \
             UNION ALL \
             SELECT 'artifact', a.key, a.size, a.last_accessed_at FROM artifacts a \
             WHERE NOT EXISTS (SELECT 1 FROM pins p WHERE p.key = a.key) \
             UNION ALL \
             SELECT 'extra', x.kind || '/' || x.name, x.size, x.last_accessed_at FROM nix_extras x \
             ORDER BY at ASC, id ASC LIMIT $1",
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(Candidate {
                    kind: match kind.as_str() {
                        "nar" => CandidateKind::Nar,
                        "extra" => CandidateKind::Extra,
                        _ => CandidateKind::Artifact,
                    },
                    id: r.try_get("id")?,
                    size: r.try_get("size")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn evict_nar(&self, nar_file: &str) -> Result<Vec<String>, MetaError> {
        let mut tx = self.pool().begin().await?;
        let narinfos: Vec<String> = if self.backend() == crate::sql::Backend::Mysql {
            // No DELETE … RETURNING on MySQL: the rows are locked, read, then deleted.
            let hashes =
                sqlx::query_scalar("SELECT hash FROM narinfos WHERE nar_file = ? FOR UPDATE")
                    .bind(nar_file)
                    .fetch_all(&mut *tx)
                    .await?;
            sqlx::query("DELETE FROM narinfos WHERE nar_file = ?")
                .bind(nar_file)
                .execute(&mut *tx)
                .await?;
            hashes
        } else {
            sqlx::query_scalar("DELETE FROM narinfos WHERE nar_file = $1 RETURNING hash")
                .bind(nar_file)
                .fetch_all(&mut *tx)
                .await?
        };
        sqlx::query(&self.sql("DELETE FROM nar_sources WHERE nar_file = $1"))
            .bind(nar_file)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql("DELETE FROM nars WHERE nar_file = $1"))
            .bind(nar_file)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(narinfos)
    }

    async fn touch_nix(
        &self,
        nar_files: &[String],
        narinfo_hashes: &[String],
        at: i64,
    ) -> Result<(), MetaError> {
        self.touch_batched(
            "UPDATE nars SET last_accessed_at = $1 WHERE last_accessed_at < $2 AND nar_file IN ({keys})",
            nar_files,
            at,
        )
        .await?;
        // A narinfo read counts for its NAR too: Nix reads the narinfo before the NAR, and a
        // client whose store already has the NAR's contents may read only the narinfo.
        self.touch_batched(
            "UPDATE nars SET last_accessed_at = $1 WHERE last_accessed_at < $2 \
             AND nar_file IN (SELECT nar_file FROM narinfos WHERE hash IN ({keys}))",
            narinfo_hashes,
            at,
        )
        .await?;
        self.touch_batched(
            "UPDATE narinfos SET last_accessed_at = $1 WHERE last_accessed_at < $2 AND hash IN ({keys})",
            narinfo_hashes,
            at,
        )
        .await
    }

    async fn pin(&self, key: &str, at: i64) -> Result<(), MetaError> {
        let done = sqlx::query(&self.sql(
            "INSERT INTO pins (key, created_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        ))
        .bind(key)
        .bind(at)
        .execute(self.pool())
        .await;
        crate::dialect::inserted(done)?;
        Ok(())
    }

    async fn unpin(&self, key: &str) -> Result<bool, MetaError> {
        let n = sqlx::query(&self.sql("DELETE FROM pins WHERE key = $1"))
            .bind(key)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn pins(&self) -> Result<Vec<String>, MetaError> {
        Ok(
            sqlx::query_scalar(&self.sql("SELECT key FROM pins ORDER BY key"))
                .fetch_all(self.pool())
                .await?,
        )
    }

    async fn all_nar_files(&self) -> Result<Vec<String>, MetaError> {
        Ok(sqlx::query_scalar("SELECT nar_file FROM nars")
            .fetch_all(self.pool())
            .await?)
    }

    async fn all_artifacts(&self) -> Result<Vec<(String, String)>, MetaError> {
        let rows = sqlx::query(&self.sql("SELECT key, sha256 FROM artifacts"))
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("key")?, r.try_get("sha256")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn all_nars(&self) -> Result<Vec<NarRecord>, MetaError> {
        let rows = sqlx::query("SELECT nar_file, size, sha256 FROM nars ORDER BY nar_file")
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .iter()
            .map(crate::sql::nar_record)
            .collect::<Result<_, _>>()?)
    }

    async fn all_artifact_rows(&self) -> Result<Vec<ArtifactRow>, MetaError> {
        let rows =
            sqlx::query(&self.sql("SELECT key, size, sha256 FROM artifacts ORDER BY sha256, key"))
                .fetch_all(self.pool())
                .await?;
        rows.iter()
            .map(|r| {
                Ok(ArtifactRow {
                    key: r.try_get("key")?,
                    size: r.try_get("size")?,
                    sha256: r.try_get("sha256")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn artifact_keys_with_sha256(&self, sha256: &str) -> Result<Vec<String>, MetaError> {
        Ok(sqlx::query_scalar(
            &self.sql("SELECT key FROM artifacts WHERE sha256 = $1 ORDER BY key"),
        )
        .bind(sha256)
        .fetch_all(self.pool())
        .await?)
    }

    async fn orphan_uploaded_narinfos(&self) -> Result<Vec<String>, MetaError> {
        Ok(sqlx::query_scalar(
            "SELECT hash FROM narinfos i WHERE origin = 'upload' \
             AND NOT EXISTS (SELECT 1 FROM nars n WHERE n.nar_file = i.nar_file)",
        )
        .fetch_all(self.pool())
        .await?)
    }
}
