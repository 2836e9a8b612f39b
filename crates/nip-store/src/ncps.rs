//! Taking over an ncps installation: its database is recognised by goose's version table, nip
//! keeps its own tables apart from ncps' (SQLite: a file beside ncps'; PostgreSQL: schema `nip`;
//! MySQL: database `<ncps' database>_nip`),
//! and ncps' signing key, narinfos and pins are read from it. ncps' data is only ever read, so
//! switching back to ncps keeps working.
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Connection, Row};

use crate::meta::{MetaError, NarInfoRecord, NarRecord};
use crate::sql::{Backend, SqlMeta};

/// The PostgreSQL schema nip's tables live in when the database is ncps'.
pub const NIP_SCHEMA: &str = "nip";

/// The oldest ncps schema nip can read: narinfo fields in columns (ncps moved them out of
/// narinfo files in migration 20260117195000).
const OLDEST_VERSION: i64 = 20_260_117_195_000;
/// From this version on ncps records the upstream a narinfo came from.
const UPSTREAM_URL_VERSION: i64 = 20_260_607_034_027;

/// Where nip keeps its tables for a configured database URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The URL nip connects to for its own tables.
    pub url: String,
    /// The configured URL when it is an ncps database (nip then reads it, never writes it).
    pub ncps: Option<String>,
}

fn bad_url(url: &str, reason: impl ToString) -> MetaError {
    MetaError::BadUrl {
        url: nip_core::redact::redact_userinfo(url),
        reason: reason.to_string(),
    }
}

fn sqlite_file(url: &str) -> Result<std::path::PathBuf, MetaError> {
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(|e| bad_url(url, e))?
        .get_filename()
        .to_path_buf())
}

/// nip's own SQLite file beside ncps' `db.sqlite`: `db.nip.sqlite`.
fn sibling_sqlite_url(url: &str) -> Result<String, MetaError> {
    let file = sqlite_file(url)?;
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    let name = match file.extension() {
        Some(ext) => format!("{stem}.nip.{}", ext.to_string_lossy()),
        None => format!("{stem}.nip"),
    };
    Ok(format!("sqlite:{}", file.with_file_name(name).display()))
}

/// nip's own MySQL database beside ncps' `DB`: `DB_nip`, on the same server.
fn sibling_mysql_url(url: &str) -> Result<(String, String), MetaError> {
    let url = crate::sql::mysql_url(url)?;
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url.as_str(), String::new()),
    };
    let after_scheme = base.len() - base.trim_start_matches("mysql://").len();
    let Some(slash) = base[after_scheme..].find('/').map(|i| i + after_scheme) else {
        return Err(bad_url(&url, "the URL names no database"));
    };
    let db = format!("{}_nip", &base[slash + 1..]);
    Ok((format!("{}/{db}{query}", &base[..slash]), db))
}

fn with_search_path(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options[search_path]={NIP_SCHEMA}")
}

/// Finds where nip's tables are for `url`: the URL itself, unless it is an ncps database.
/// On PostgreSQL the `nip` schema is created when missing and `create` is set.
pub async fn locate(url: &str, create: bool) -> Result<Located, MetaError> {
    let own = |url: &str| Located {
        url: url.to_string(),
        ncps: None,
    };
    match Backend::of_url(url)? {
        Backend::Sqlite => {
            let file = sqlite_file(url)?;
            if !file.exists() {
                return Ok(own(url));
            }
            let mut conn = SqliteConnectOptions::from_str(url)
                .map_err(|e| bad_url(url, e))?
                .read_only(true)
                .busy_timeout(Duration::from_secs(10))
                .connect()
                .await?;
            let goose: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'goose_db_version'",
            )
            .fetch_optional(&mut conn)
            .await?;
            conn.close().await?;
            if goose.is_none() {
                return Ok(own(url));
            }
            Ok(Located {
                url: sibling_sqlite_url(url)?,
                ncps: Some(url.to_string()),
            })
        }
        Backend::Postgres => {
            let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
            let goose: Option<String> =
                sqlx::query_scalar("SELECT CAST(to_regclass('goose_db_version') AS TEXT)")
                    .fetch_one(&mut conn)
                    .await?;
            if goose.is_none() {
                conn.close().await?;
                return Ok(own(url));
            }
            if create {
                // Instances starting together may race on it: a lost race still leaves it there.
                let made = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {NIP_SCHEMA}"))
                    .execute(&mut conn)
                    .await;
                if let Err(e) = made {
                    let exists: Option<String> = sqlx::query_scalar(
                        "SELECT nspname::text FROM pg_namespace WHERE nspname = $1",
                    )
                    .bind(NIP_SCHEMA)
                    .fetch_optional(&mut conn)
                    .await?;
                    if exists.is_none() {
                        return Err(e.into());
                    }
                }
            }
            conn.close().await?;
            Ok(Located {
                url: with_search_path(url),
                ncps: Some(url.to_string()),
            })
        }
        Backend::Mysql => {
            let mut conn =
                sqlx::mysql::MySqlConnection::connect(&crate::sql::mysql_url(url)?).await?;
            let goose: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_name = 'goose_db_version'",
            )
            .fetch_one(&mut conn)
            .await?;
            if goose == 0 {
                conn.close().await?;
                return Ok(own(url));
            }
            let (nip_url, db) = sibling_mysql_url(url)?;
            if create {
                sqlx::query(&format!(
                    "CREATE DATABASE IF NOT EXISTS `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                    db.replace('`', "``")
                ))
                .execute(&mut conn)
                .await?;
            }
            conn.close().await?;
            Ok(Located {
                url: nip_url,
                ncps: Some(url.to_string()),
            })
        }
    }
}

/// One of ncps' narinfos as its database holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NcpsNarInfo {
    pub id: i64,
    pub hash: String,
    pub store_path: String,
    pub url: String,
    pub compression: Option<String>,
    pub file_hash: Option<String>,
    pub file_size: Option<i64>,
    pub nar_hash: String,
    pub nar_size: i64,
    pub deriver: Option<String>,
    pub system: Option<String>,
    pub ca: Option<String>,
    pub upstream_url: Option<String>,
    pub references: Vec<String>,
    pub signatures: Vec<String>,
    /// Seconds since the epoch.
    pub created_at: i64,
    pub last_accessed_at: i64,
}

/// What an ncps database holds, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NcpsCounts {
    pub narinfos: u64,
    /// Stub rows without a NAR URL (ncps' placeholders): not imported.
    pub stubs: u64,
    pub pins: u64,
    pub has_secret_key: bool,
}

/// ncps' database, opened to read.
pub struct NcpsDb {
    pool: AnyPool,
    backend: Backend,
    version: i64,
}

impl NcpsDb {
    /// Opens ncps' database (read-only on SQLite) and checks its schema is one nip reads.
    pub async fn open(url: &str) -> Result<Self, MetaError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let url = match backend {
            Backend::Sqlite => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=ro")
            }
            Backend::Postgres => url.to_string(),
            Backend::Mysql => crate::sql::mysql_url(url)?,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await?;
        let version: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version_id) FROM goose_db_version WHERE is_applied")
                .fetch_one(&pool)
                .await?;
        let version = version.unwrap_or(0);
        if version < OLDEST_VERSION {
            return Err(bad_url(
                &url,
                format!(
                    "this ncps database is at schema version {version}, older than nip reads \
                     ({OLDEST_VERSION}): run a current ncps once (`ncps migrate up`), then start nip"
                ),
            ));
        }
        Ok(NcpsDb {
            pool,
            backend,
            version,
        })
    }

    /// ncps' own signing key (`config` table, key `secret_key`), if it has one.
    pub async fn secret_key(&self) -> Result<Option<String>, MetaError> {
        Ok(sqlx::query_scalar(
            &self
                .backend
                .sql("SELECT value FROM config WHERE key = 'secret_key'"),
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn counts(&self) -> Result<NcpsCounts, MetaError> {
        let narinfos: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM narinfos WHERE url IS NOT NULL AND url <> '' \
             AND store_path IS NOT NULL AND nar_hash IS NOT NULL AND nar_size IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let all: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM narinfos")
            .fetch_one(&self.pool)
            .await?;
        let pins: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pinned_closures")
            .fetch_one(&self.pool)
            .await?;
        Ok(NcpsCounts {
            narinfos: narinfos as u64,
            stubs: (all - narinfos).max(0) as u64,
            pins: pins as u64,
            has_secret_key: self.secret_key().await?.is_some(),
        })
    }

    fn epoch(&self, column: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("COALESCE(CAST(strftime('%s', {column}) AS INTEGER), 0)"),
            Backend::Postgres => {
                format!("COALESCE(CAST(EXTRACT(EPOCH FROM {column}) AS BIGINT), 0)")
            }
            Backend::Mysql => format!("COALESCE(CAST(UNIX_TIMESTAMP({column}) AS SIGNED), 0)"),
        }
    }

    /// Up to `limit` complete narinfos with ids above `after`, in id order, with their
    /// references and signatures.
    pub async fn narinfos_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<NcpsNarInfo>, MetaError> {
        let upstream = if self.version >= UPSTREAM_URL_VERSION {
            "upstream_url"
        } else {
            "CAST(NULL AS TEXT)"
        };
        let sql = format!(
            "SELECT id, hash, store_path, url, compression, file_hash, file_size, nar_hash, \
             nar_size, deriver, system, ca, {upstream}, {}, {} FROM narinfos \
             WHERE id > $1 AND url IS NOT NULL AND url <> '' AND store_path IS NOT NULL \
             AND nar_hash IS NOT NULL AND nar_size IS NOT NULL ORDER BY id LIMIT $2",
            self.epoch("created_at"),
            self.epoch("last_accessed_at"),
        );
        let rows = sqlx::query(&self.backend.sql(&sql))
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<NcpsNarInfo> = rows
            .iter()
            .map(|r| {
                Ok(NcpsNarInfo {
                    id: r.try_get(0)?,
                    hash: r.try_get(1)?,
                    store_path: r.try_get(2)?,
                    url: r.try_get(3)?,
                    compression: r.try_get(4)?,
                    file_hash: r.try_get(5)?,
                    file_size: r.try_get(6)?,
                    nar_hash: r.try_get(7)?,
                    nar_size: r.try_get(8)?,
                    deriver: r.try_get(9)?,
                    system: r.try_get(10)?,
                    ca: r.try_get(11)?,
                    upstream_url: r.try_get(12)?,
                    created_at: r.try_get(13)?,
                    last_accessed_at: r.try_get(14)?,
                    ..Default::default()
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        let (Some(first), Some(last)) = (out.first(), out.last()) else {
            return Ok(out);
        };
        let (lo, hi) = (first.id, last.id);
        let index = |out: &Vec<NcpsNarInfo>, id: i64| out.binary_search_by_key(&id, |n| n.id).ok();
        for (table, column) in [
            ("narinfo_references", "reference"),
            ("narinfo_signatures", "signature"),
        ] {
            let rows = sqlx::query(&self.backend.sql(&format!(
                "SELECT narinfo_id, {column} FROM {table} \
                 WHERE narinfo_id >= $1 AND narinfo_id <= $2 ORDER BY id"
            )))
            .bind(lo)
            .bind(hi)
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                let id: i64 = r.try_get(0)?;
                let value: String = r.try_get(1)?;
                if let Some(i) = index(&out, id) {
                    let n = &mut out[i];
                    if column == "reference" {
                        n.references.push(value);
                    } else {
                        n.signatures.push(value);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The store path hashes whose closures ncps keeps pinned.
    pub async fn pins(&self) -> Result<Vec<String>, MetaError> {
        Ok(
            sqlx::query_scalar("SELECT hash FROM pinned_closures ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// The NAR file of an ncps narinfo URL (`nar/<hash>.nar.xz[?query]`) and where ncps stores it,
/// relative to its storage's `store/` directory: `nar/<h>/<ha>/<file>`.
pub fn ncps_nar_path(url: &str) -> Option<(String, String)> {
    let path = url.split('?').next()?;
    let file = path.rsplit('/').next()?;
    // ASCII only: the shard directories are its first bytes (and Nix names are ASCII).
    if file.len() < 3 || !file.is_ascii() || !file.contains(".nar") {
        return None;
    }
    Some((
        file.to_string(),
        format!("nar/{}/{}/{file}", &file[..1], &file[..2]),
    ))
}

/// What [`ImportTx::finish`] records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportCounts {
    pub narinfos: u64,
    pub nars: u64,
    pub pins: u64,
}

/// A takeover written in one transaction of nip's database: all of it lands, or none.
pub struct ImportTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
}

impl SqlMeta {
    /// When `source` was imported already (seconds since the epoch).
    pub async fn imported_at(&self, source: &str) -> Result<Option<i64>, MetaError> {
        Ok(
            sqlx::query_scalar(&self.sql("SELECT imported_at FROM imports WHERE source = $1"))
                .bind(source)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    pub async fn begin_import(&self) -> Result<ImportTx, MetaError> {
        Ok(ImportTx {
            tx: self.pool().begin().await?,
            backend: self.backend(),
        })
    }
}

impl ImportTx {
    /// Adds a narinfo unless one is stored for its hash (store paths are immutable).
    pub async fn narinfo(
        &mut self,
        rec: &NarInfoRecord,
        created_at: i64,
        accessed_at: i64,
    ) -> Result<bool, MetaError> {
        let n =
            crate::sql::insert_narinfo(&mut *self.tx, self.backend, rec, created_at, accessed_at)
                .await?;
        Ok(n == 1)
    }

    /// Records a NAR whose bytes are already in nip's blob store.
    pub async fn nar(
        &mut self,
        rec: &NarRecord,
        created_at: i64,
        accessed_at: i64,
    ) -> Result<bool, MetaError> {
        let done = sqlx::query(&self.backend.sql(
            "INSERT INTO nars (nar_file, size, sha256, created_at, last_accessed_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (nar_file) DO NOTHING",
        ))
        .bind(&rec.nar_file)
        .bind(rec.size)
        .bind(&rec.sha256)
        .bind(created_at)
        .bind(accessed_at)
        .execute(&mut *self.tx)
        .await;
        Ok(crate::dialect::inserted(done)? == 1)
    }

    pub async fn pin(&mut self, key: &str, at: i64) -> Result<bool, MetaError> {
        let done = sqlx::query(&self.backend.sql(
            "INSERT INTO pins (key, created_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        ))
        .bind(key)
        .bind(at)
        .execute(&mut *self.tx)
        .await;
        Ok(crate::dialect::inserted(done)? == 1)
    }

    /// Records the import of `source` and commits. Fails (and writes nothing) when another
    /// process recorded it first.
    pub async fn finish(mut self, source: &str, counts: ImportCounts) -> Result<(), MetaError> {
        sqlx::query(&self.backend.sql(
            "INSERT INTO imports (source, imported_at, narinfos, nars, pins) \
             VALUES ($1, $2, $3, $4, $5)",
        ))
        .bind(source)
        .bind(crate::unix_now())
        .bind(counts.narinfos as i64)
        .bind(counts.nars as i64)
        .bind(counts.pins as i64)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_paths_follow_ncps_sharding() {
        assert_eq!(
            ncps_nar_path("nar/1abc.nar.xz"),
            Some(("1abc.nar.xz".into(), "nar/1/1a/1abc.nar.xz".into()))
        );
        assert_eq!(
            ncps_nar_path("nar/1abc.nar?hash=x"),
            Some(("1abc.nar".into(), "nar/1/1a/1abc.nar".into()))
        );
        assert_eq!(ncps_nar_path("x"), None);
        assert_eq!(ncps_nar_path("nar/é1abc.nar"), None);
    }

    #[test]
    fn nip_tables_go_beside_ncps() {
        assert_eq!(
            sibling_sqlite_url("sqlite:/var/lib/ncps/db/db.sqlite").unwrap(),
            "sqlite:/var/lib/ncps/db/db.nip.sqlite"
        );
        assert_eq!(
            with_search_path("postgres://u@h/db"),
            "postgres://u@h/db?options[search_path]=nip"
        );
        assert_eq!(
            with_search_path("postgres://u@h/db?sslmode=disable"),
            "postgres://u@h/db?sslmode=disable&options[search_path]=nip"
        );
    }
}
