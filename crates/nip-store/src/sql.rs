//! The SQL metadata backend: SQLite (the embedded default) or PostgreSQL (for several instances),
//! chosen by the database URL's scheme, with one set of queries for both through sqlx's `Any`
//! driver. Migrations for each are embedded and run at start, safely when instances start together.
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Connection, Executor, Row};

use crate::meta::{MetaError, MetaStore, NarInfoRecord, NarRecord, NarSource, PutNarInfo};
use crate::unix_now;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Self, MetaError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(MetaError::BadUrl {
                url: nip_core::redact::redact_userinfo(url),
                reason: "use sqlite:PATH or postgres://USER@HOST/DB".into(),
            })
        }
    }

    fn migrator(self) -> &'static sqlx::migrate::Migrator {
        match self {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SqlMeta {
    pool: AnyPool,
    backend: Backend,
    /// The configured URL when it is an ncps database: nip's tables are then elsewhere.
    ncps: Option<String>,
}

/// The embedded default's historical name.
pub type SqliteMeta = SqlMeta;

/// Connections in the pool unless the caller says otherwise.
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// How long a request waits for a database connection before it fails (503).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often migrations are retried when another process migrates the same database at once.
const MIGRATE_ATTEMPTS: u32 = 8;

/// A migration embedded in this build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: String,
}

fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, MetaError> {
    SqliteConnectOptions::from_str(url).map_err(|e| MetaError::BadUrl {
        url: nip_core::redact::redact_userinfo(url),
        reason: e.to_string(),
    })
}

impl SqlMeta {
    /// Opens the database (creating a SQLite file when missing) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, MetaError> {
        Self::connect_with(url, DEFAULT_POOL_SIZE).await
    }

    /// Like [`SqlMeta::connect`] with a pool of `max_connections` (at least 1). Safe when several
    /// processes open a fresh database at the same time: see [`migrate`].
    /// When `url` is an ncps database, nip's tables go beside it (see [`crate::ncps`]).
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Self, MetaError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let located = crate::ncps::locate(url, true).await?;
        if located.ncps.is_some() {
            tracing::info!(
                database = %nip_core::redact::redact_userinfo(url),
                nip_tables = %nip_core::redact::redact_userinfo(&located.url),
                "the database is ncps': nip keeps its own tables apart and only reads ncps' tables"
            );
        }
        let url = located.url.as_str();
        // A short acquire timeout: while the database is down requests fail fast with 503 instead of
        // queueing for sqlx's default 30 s; connections are re-tested on acquire, so service
        // resumes by itself once the database is back.
        let options = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(true);
        let pool = match backend {
            Backend::Sqlite => {
                let file = sqlite_options(url)?.get_filename().to_path_buf();
                if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| MetaError::BadUrl {
                        url: nip_core::redact::redact_userinfo(url),
                        reason: e.to_string(),
                    })?;
                }
                let url = if url.contains("mode=") {
                    url.to_string()
                } else if url.contains('?') {
                    format!("{url}&mode=rwc")
                } else {
                    format!("{url}?mode=rwc")
                };
                options
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL + FULL: a committed row survives power loss, so "recorded"
                            // implies "durable"; readers never wait for the writer.
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            // 512 KiB per connection, not SQLite's 2 MiB: pages are in the OS
                            // cache anyway, hot entries in nip's own, and a full pool of 2 MiB
                            // caches was a third of the server's resident memory.
                            conn.execute("PRAGMA cache_size = -512").await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => options.connect(url).await?,
        };
        migrate(&pool, backend).await?;
        Ok(SqlMeta {
            pool,
            backend,
            ncps: located.ncps,
        })
    }

    /// The configured database URL when it is an ncps database nip takes over.
    pub fn ncps_url(&self) -> Option<&str> {
        self.ncps.as_deref()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Every migration embedded in this build for the URL's backend, oldest first.
    pub fn migrations_for(url: &str) -> Result<Vec<MigrationInfo>, MetaError> {
        Ok(Backend::of_url(url)?
            .migrator()
            .iter()
            .map(|m| MigrationInfo {
                version: m.version,
                description: m.description.to_string(),
            })
            .collect())
    }

    /// Every SQLite migration embedded in this build, oldest first.
    pub fn migrations() -> Vec<MigrationInfo> {
        Self::migrations_for("sqlite:x").unwrap_or_default()
    }

    /// The migrations not yet applied to the database at `url`, without changing anything: a
    /// missing SQLite file has all of them pending.
    pub async fn pending_migrations(url: &str) -> Result<Vec<MigrationInfo>, MetaError> {
        let all = Self::migrations_for(url)?;
        let located = crate::ncps::locate(url, false).await?;
        let url = located.url.as_str();
        let applied: Vec<i64> = match Backend::of_url(url)? {
            Backend::Sqlite => {
                let opts = sqlite_options(url)?;
                if !opts.get_filename().exists() {
                    return Ok(all);
                }
                let mut conn = opts
                    .read_only(true)
                    .busy_timeout(Duration::from_secs(10))
                    .connect()
                    .await?;
                let has_table: Option<i64> = sqlx::query_scalar(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
                )
                .fetch_optional(&mut conn)
                .await?;
                let applied = if has_table.is_some() {
                    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                        .fetch_all(&mut conn)
                        .await?
                } else {
                    Vec::new()
                };
                conn.close().await?;
                applied
            }
            Backend::Postgres => {
                let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
                let has_table: Option<String> =
                    sqlx::query_scalar("SELECT CAST(to_regclass('_sqlx_migrations') AS TEXT)")
                        .fetch_one(&mut conn)
                        .await?;
                let applied = if has_table.is_some() {
                    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                        .fetch_all(&mut conn)
                        .await?
                } else {
                    Vec::new()
                };
                conn.close().await?;
                applied
            }
        };
        Ok(all
            .into_iter()
            .filter(|m| !applied.contains(&m.version))
            .collect())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Runs `update` (with `$1` = `at` and `{keys}` standing for a subquery of the keys) over
    /// `keys` a batch at a time, in one transaction: a few statements per flush instead of one
    /// per key, which on SQLite was one hand-off to its worker thread per key.
    pub(crate) async fn touch_batched(
        &self,
        update: &str,
        keys: &[String],
        at: i64,
    ) -> Result<(), MetaError> {
        if keys.is_empty() {
            return Ok(());
        }
        // The keys travel as one JSON array parameter: no statement has to be built per count.
        let keys_sql = match self.backend {
            Backend::Sqlite => "SELECT value FROM json_each($2)",
            Backend::Postgres => "SELECT jsonb_array_elements_text(CAST($2 AS jsonb))",
        };
        let sql = update.replace("{keys}", keys_sql);
        let mut tx = self.pool.begin().await?;
        for batch in keys.chunks(TOUCH_BATCH) {
            let json = serde_json::to_string(batch).expect("strings serialize");
            sqlx::query(&sql)
                .bind(at)
                .bind(json)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Keys per access-time statement.
const TOUCH_BATCH: usize = 1000;

/// Applies pending migrations. On PostgreSQL sqlx holds an advisory lock while migrating. On
/// SQLite it takes none, so two processes starting on a fresh file both try migration 1; each
/// migration is one transaction, so the loser fails without a trace (table exists, or a busy
/// snapshot) and simply runs again, and then finds the work done.
async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), MetaError> {
    let mut attempt = 1;
    loop {
        match backend.migrator().run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < MIGRATE_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "migration failed, probably racing another process; retrying");
                // Stagger the retries so racing processes do not collide again.
                let salt = u64::from(std::process::id()) ^ (pool as *const AnyPool as u64 >> 4);
                let jitter = salt.wrapping_mul(u64::from(attempt) * 31) % 50;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt) + jitter)).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn narinfo_from_row(row: &AnyRow) -> Result<NarInfoRecord, sqlx::Error> {
    Ok(NarInfoRecord {
        hash: row.try_get("hash")?,
        store_path: row.try_get("store_path")?,
        nar_file: row.try_get("nar_file")?,
        file_size: row.try_get("file_size")?,
        file_hash: row.try_get("file_hash")?,
        nar_hash: row.try_get("nar_hash")?,
        narinfo: row.try_get("narinfo")?,
        origin: row.try_get("origin")?,
        signed_by: row.try_get("signed_by")?,
        uploaded_by: row.try_get("uploaded_by")?,
    })
}

const NARINFO_COLUMNS: &str = "hash, store_path, nar_file, file_size, file_hash, nar_hash, \
     narinfo, origin, signed_by, uploaded_by";

#[async_trait]
impl MetaStore for SqlMeta {
    async fn get_narinfo(&self, hash: &str) -> Result<Option<NarInfoRecord>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE hash = $1"
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
    ) -> Result<PutNarInfo, MetaError> {
        let now = unix_now();
        let mut tx = self.pool.begin().await?;
        // DO NOTHING, never UPDATE: a stored store path is immutable (docs/security.md).
        let inserted = sqlx::query(
            "INSERT INTO narinfos (hash, store_path, nar_file, file_size, file_hash, nar_hash, \
             narinfo, origin, signed_by, uploaded_by, created_at, last_accessed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(&rec.hash)
        .bind(&rec.store_path)
        .bind(&rec.nar_file)
        .bind(rec.file_size)
        .bind(&rec.file_hash)
        .bind(&rec.nar_hash)
        .bind(&rec.narinfo)
        .bind(&rec.origin)
        .bind(&rec.signed_by)
        .bind(&rec.uploaded_by)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if !inserted {
            let row = sqlx::query(&format!(
                "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE hash = $1"
            ))
            .bind(&rec.hash)
            .fetch_one(&mut *tx)
            .await?;
            let existing = narinfo_from_row(&row)?;
            tx.commit().await?;
            return Ok(PutNarInfo::Exists(Box::new(existing)));
        }
        for (rank, src) in sources.iter().enumerate() {
            sqlx::query(
                "INSERT INTO nar_sources (nar_file, url, upstream, rank) VALUES ($1, $2, $3, $4) \
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
        Ok(PutNarInfo::Inserted)
    }

    async fn narinfo_for_nar(&self, nar_file: &str) -> Result<Option<NarInfoRecord>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE nar_file = $1 LIMIT 1"
        ))
        .bind(nar_file)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(narinfo_from_row).transpose()?)
    }

    async fn nar_sources(&self, nar_file: &str) -> Result<Vec<NarSource>, MetaError> {
        let rows =
            sqlx::query("SELECT url, upstream FROM nar_sources WHERE nar_file = $1 ORDER BY rank")
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
        let row = sqlx::query("SELECT nar_file, size, sha256 FROM nars WHERE nar_file = $1")
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
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (nar_file) DO UPDATE SET size = excluded.size, \
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
        let n = sqlx::query("DELETE FROM narinfos WHERE hash = $1")
            .bind(hash)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn delete_nar(&self, nar_file: &str) -> Result<bool, MetaError> {
        let n = sqlx::query("DELETE FROM nars WHERE nar_file = $1")
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
            signed_by: Some("up-1".into()),
            uploaded_by: None,
        }
    }

    #[tokio::test]
    async fn narinfo_and_nar_round_trip() {
        for t in crate::testdb::all().await {
            let url = t.url.clone();
            let meta = t.meta.clone();
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
            assert_eq!(
                meta.put_narinfo(&rec("h1", "f.nar"), &sources)
                    .await
                    .unwrap(),
                PutNarInfo::Inserted
            );
            assert_eq!(
                meta.get_narinfo("h1").await.unwrap(),
                Some(rec("h1", "f.nar"))
            );
            // Immutable: a second narinfo for the hash changes nothing and is told what is there.
            let mut other = rec("h1", "g.nar");
            other.nar_hash = "sha256:other".into();
            other.uploaded_by = Some("ci".into());
            assert_eq!(
                meta.put_narinfo(&other, &[]).await.unwrap(),
                PutNarInfo::Exists(Box::new(rec("h1", "f.nar")))
            );
            assert_eq!(
                meta.get_narinfo("h1").await.unwrap(),
                Some(rec("h1", "f.nar"))
            );
            assert!(meta.nar_sources("g.nar").await.unwrap().is_empty());
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

    /// Regression: sqlx takes no migration lock on SQLite, so instances starting together on a
    /// fresh file raced to create the same tables and all but one failed to start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_connects_on_a_fresh_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("db/db.sqlite").display());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { SqliteMeta::connect_with(&url, 2).await })
            })
            .collect();
        for t in tasks {
            let meta = t.await.unwrap().expect("every concurrent connect succeeds");
            meta.ping().await.unwrap();
        }
        assert!(SqliteMeta::pending_migrations(&url)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn pending_migrations_reads_without_creating() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db.sqlite");
        let url = format!("sqlite:{}", file.display());
        let pending = SqliteMeta::pending_migrations(&url).await.unwrap();
        assert_eq!(pending, SqliteMeta::migrations());
        assert!(!pending.is_empty());
        assert!(!file.exists(), "a dry run must not create the database");
        SqliteMeta::connect(&url).await.unwrap();
        assert!(SqliteMeta::pending_migrations(&url)
            .await
            .unwrap()
            .is_empty());
    }
}
