//! SQLite metadata backend (the embedded default). Migrations are embedded and run at start.
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::meta::{MetaError, MetaStore, NarInfoRecord, NarRecord, NarSource};
use crate::unix_now;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone, Debug)]
pub struct SqliteMeta {
    pool: SqlitePool,
}

impl SqliteMeta {
    /// Opens (creating when missing) the database at a `sqlite:` URL and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, MetaError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| MetaError::BadUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed row survives power loss, so "recorded" implies "durable".
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        if let Some(parent) = opts.get_filename().parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| MetaError::BadUrl {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteMeta { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn narinfo_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<NarInfoRecord, sqlx::Error> {
    Ok(NarInfoRecord {
        hash: row.try_get("hash")?,
        store_path: row.try_get("store_path")?,
        nar_file: row.try_get("nar_file")?,
        file_size: row.try_get("file_size")?,
        file_hash: row.try_get("file_hash")?,
        nar_hash: row.try_get("nar_hash")?,
        narinfo: row.try_get("narinfo")?,
        origin: row.try_get("origin")?,
    })
}

const NARINFO_COLUMNS: &str =
    "hash, store_path, nar_file, file_size, file_hash, nar_hash, narinfo, origin";

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn get_narinfo(&self, hash: &str) -> Result<Option<NarInfoRecord>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE hash = ?"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(narinfo_from_row).transpose()?)
    }

    async fn put_narinfo(
        &self,
        rec: &NarInfoRecord,
        sources: &[NarSource],
    ) -> Result<(), MetaError> {
        let now = unix_now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO narinfos (hash, store_path, nar_file, file_size, file_hash, nar_hash, \
             narinfo, origin, created_at, last_accessed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (hash) DO UPDATE SET store_path = excluded.store_path, \
             nar_file = excluded.nar_file, file_size = excluded.file_size, \
             file_hash = excluded.file_hash, nar_hash = excluded.nar_hash, \
             narinfo = excluded.narinfo, origin = excluded.origin, \
             last_accessed_at = excluded.last_accessed_at",
        )
        .bind(&rec.hash)
        .bind(&rec.store_path)
        .bind(&rec.nar_file)
        .bind(rec.file_size)
        .bind(&rec.file_hash)
        .bind(&rec.nar_hash)
        .bind(&rec.narinfo)
        .bind(&rec.origin)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for (rank, src) in sources.iter().enumerate() {
            sqlx::query(
                "INSERT INTO nar_sources (nar_file, url, upstream, rank) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (nar_file, url) DO UPDATE SET upstream = excluded.upstream, \
                 rank = excluded.rank",
            )
            .bind(&rec.nar_file)
            .bind(&src.url)
            .bind(&src.upstream)
            .bind(rank as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn narinfo_for_nar(&self, nar_file: &str) -> Result<Option<NarInfoRecord>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE nar_file = ? LIMIT 1"
        ))
        .bind(nar_file)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(narinfo_from_row).transpose()?)
    }

    async fn nar_sources(&self, nar_file: &str) -> Result<Vec<NarSource>, MetaError> {
        let rows =
            sqlx::query("SELECT url, upstream FROM nar_sources WHERE nar_file = ? ORDER BY rank")
                .bind(nar_file)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(NarSource {
                    url: r.try_get("url")?,
                    upstream: r.try_get("upstream")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn get_nar(&self, nar_file: &str) -> Result<Option<NarRecord>, MetaError> {
        let row = sqlx::query("SELECT nar_file, size, sha256 FROM nars WHERE nar_file = ?")
            .bind(nar_file)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(NarRecord {
                nar_file: r.try_get("nar_file")?,
                size: r.try_get("size")?,
                sha256: r.try_get("sha256")?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| e.into())
    }

    async fn put_nar(&self, rec: &NarRecord) -> Result<(), MetaError> {
        let now = unix_now();
        sqlx::query(
            "INSERT INTO nars (nar_file, size, sha256, created_at, last_accessed_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (nar_file) DO UPDATE SET size = excluded.size, \
             sha256 = excluded.sha256",
        )
        .bind(&rec.nar_file)
        .bind(rec.size)
        .bind(&rec.sha256)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_narinfo(&self, hash: &str) -> Result<bool, MetaError> {
        let n = sqlx::query("DELETE FROM narinfos WHERE hash = ?")
            .bind(hash)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn delete_nar(&self, nar_file: &str) -> Result<bool, MetaError> {
        let n = sqlx::query("DELETE FROM nars WHERE nar_file = ?")
            .bind(nar_file)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn ping(&self) -> Result<(), MetaError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(hash: &str, nar_file: &str) -> NarInfoRecord {
        NarInfoRecord {
            hash: hash.into(),
            store_path: format!("/nix/store/{hash}-x"),
            nar_file: nar_file.into(),
            file_size: Some(3),
            file_hash: Some("sha256:abc".into()),
            nar_hash: "sha256:def".into(),
            narinfo: "StorePath: ...\n".into(),
            origin: "http://up".into(),
        }
    }

    #[tokio::test]
    async fn narinfo_and_nar_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("db/db.sqlite").display());
        let meta = SqliteMeta::connect(&url).await.unwrap();
        assert!(meta.get_narinfo("h1").await.unwrap().is_none());
        let sources = vec![
            NarSource {
                url: "http://a/nar/f.nar".into(),
                upstream: "http://a".into(),
            },
            NarSource {
                url: "http://b/nar/f.nar".into(),
                upstream: "http://b".into(),
            },
        ];
        meta.put_narinfo(&rec("h1", "f.nar"), &sources)
            .await
            .unwrap();
        assert_eq!(
            meta.get_narinfo("h1").await.unwrap(),
            Some(rec("h1", "f.nar"))
        );
        assert_eq!(
            meta.narinfo_for_nar("f.nar").await.unwrap().unwrap().hash,
            "h1"
        );
        assert_eq!(meta.nar_sources("f.nar").await.unwrap(), sources);
        assert!(meta.get_nar("f.nar").await.unwrap().is_none());
        let nar = NarRecord {
            nar_file: "f.nar".into(),
            size: 3,
            sha256: "00".into(),
        };
        meta.put_nar(&nar).await.unwrap();
        assert_eq!(meta.get_nar("f.nar").await.unwrap(), Some(nar));
        drop(meta);
        // Reopening runs migrations again without error.
        let meta = SqliteMeta::connect(&url).await.unwrap();
        assert!(meta.get_narinfo("h1").await.unwrap().is_some());
    }
}
