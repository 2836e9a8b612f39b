//! The SQL metadata backend: SQLite (the embedded default), PostgreSQL or MySQL/MariaDB (for
//! several instances), chosen by the database URL's scheme, with one set of queries through sqlx's
//! `Any` driver (MySQL's spelling of them: [`crate::dialect`]). Migrations for each are embedded
//! and run at start, safely when instances start together.
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
static MYSQL_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Self, MetaError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("mysql://") || url.starts_with("mysql+unix://") {
            Ok(Backend::Mysql)
        } else {
            Err(MetaError::BadUrl {
                url: nip_core::redact::redact_userinfo(url),
                reason: "use sqlite:PATH, postgres://USER@HOST/DB or mysql://USER:PASSWORD@HOST/DB"
                    .into(),
            })
        }
    }

    fn migrator(self) -> &'static sqlx::migrate::Migrator {
        match self {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
            Backend::Mysql => &MYSQL_MIGRATOR,
        }
    }

    /// The query text for this backend (see [`crate::dialect`]).
    pub fn sql(self, sql: &str) -> std::borrow::Cow<'_, str> {
        crate::dialect::for_backend(self, sql)
    }
}

/// The migration versions recorded as applied on `conn` (none when `has_table` is false, the
/// migrations table not yet created), then closes it: one query for every backend.
async fn applied_versions<C>(mut conn: C, has_table: bool) -> Result<Vec<i64>, MetaError>
where
    C: Connection,
    for<'c> &'c mut C: Executor<'c, Database = C::Database>,
    (i64,): for<'r> sqlx::FromRow<'r, <C::Database as sqlx::Database>::Row>,
    for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
{
    let applied = if has_table {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut conn)
            .await?
    } else {
        Vec::new()
    };
    conn.close().await?;
    Ok(applied)
}

/// A `mysql://` URL in the form sqlx reads. ncps' forms are accepted too: `mysql+unix:///SOCKET/DB`
/// and a socket given as `?socket=`, `?unix_socket=` or `?host=/PATH`.
pub fn mysql_url(url: &str) -> Result<String, MetaError> {
    let bad = |reason: &str| MetaError::BadUrl {
        url: nip_core::redact::redact_userinfo(url),
        reason: reason.into(),
    };
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<String> = Vec::new();
    let mut socket: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "socket" | "unix_socket" => socket = Some(v.to_string()),
            "host" if v.starts_with('/') || v.starts_with("%2F") || v.starts_with("%2f") => {
                socket = Some(v.to_string())
            }
            _ => params.push(pair.to_string()),
        }
    }
    let base = if let Some(rest) = base.strip_prefix("mysql+unix://") {
        let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = path.trim_end_matches('/');
        let (dir, db) = path.rsplit_once('/').unwrap_or(("", path));
        if db.is_empty() {
            return Err(bad("mysql+unix:// needs /SOCKET/DATABASE"));
        }
        let dir: Vec<&str> = dir.split('/').filter(|s| !s.is_empty()).collect();
        socket = Some(format!("/{}", dir.join("/")));
        let auth = auth
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        format!("mysql://{auth}localhost/{db}")
    } else {
        // A socket URL may leave the host out (`mysql://u:p@/db`): sqlx needs one.
        let rest = base.trim_start_matches("mysql://");
        let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
        match auth.rsplit_once('@') {
            Some((user, "")) => format!("mysql://{user}@localhost/{path}"),
            None if auth.is_empty() => format!("mysql://localhost/{path}"),
            _ => base.to_string(),
        }
    };
    if let Some(s) = socket {
        params.push(format!("socket={s}"));
    }
    Ok(if params.is_empty() {
        base
    } else {
        format!("{base}?{}", params.join("&"))
    })
}

#[derive(Clone, Debug)]
pub struct SqlMeta {
    pool: AnyPool,
    /// SQLite only: one connection whose commits skip the fsync (`synchronous = NORMAL`: after a
    /// power loss the last of them may be gone, never half-applied; a process crash loses
    /// nothing). For rows nip can do without: leases (a lost lease is free), access times, and
    /// narinfos and new NAR rows fetched from an upstream (fetched again when asked). Uploads,
    /// keys and the audit log stay FULL. Each cold miss made six fsynced commits; now one or two.
    relaxed_pool: Option<AnyPool>,
    /// SQLite only: its one writer at a time is taken in turn here. Two of this process's
    /// connections writing at once made one sleep in SQLite's busy handler (1, 2, 5 … 100 ms);
    /// queued here, a writer waits only as long as the other one writes.
    write_gate: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    /// SQLite only: fetched narinfos and NAR rows are written many per statement (see [`crate::sql_batch`]).
    batcher: Option<crate::sql_batch::Batcher>,
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

/// Creates a missing SQLite database's directory (0700) and file (0600, which its -wal and -shm
/// files inherit): the database holds API key hashes and the audit log. Existing ones are left
/// as they are (the directory may be shared, e.g. the working directory).
fn create_private_sqlite(file: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            if let Some(grand) = parent.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(grand)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(parent) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
    }
    // An empty file is a new database to SQLite; create_new: never truncates a racing creator's.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
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
        let mut sqlite_url = None;
        let pool = match backend {
            Backend::Sqlite => {
                let file = sqlite_options(url)?.get_filename().to_path_buf();
                let creates = !url.contains("mode=") || url.contains("mode=rwc");
                if creates && file.as_os_str() != ":memory:" {
                    create_private_sqlite(&file).map_err(|e| MetaError::BadUrl {
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
                // A local file has no connection to lose: the test is a wasted hop per query.
                let pool = sqlite_pool(options.test_before_acquire(false), &url, true).await?;
                // An in-memory database is one per connection pool: leases stay in the main one.
                // (sqlx renames `:memory:` to a `file:sqlx-in-memory-…` URI, so the URL says it.)
                let shared_file = !url.contains(":memory:") && !url.contains("mode=memory");
                sqlite_url = Some(url).filter(|_| shared_file);
                pool
            }
            Backend::Postgres => options.connect(url).await?,
            Backend::Mysql => {
                options
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // PostgreSQL's isolation, which the shared queries are written for;
                            // InnoDB's default (REPEATABLE READ) adds gap locks and deadlocks.
                            conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(&mysql_url(url)?)
                    .await?
            }
        };
        migrate(&pool, backend).await?;
        let relaxed_pool = match sqlite_url {
            Some(url) => {
                let single = AnyPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .test_before_acquire(false);
                let relaxed = sqlite_pool(single, &url, false).await?;
                // NORMAL is safe against corruption only in WAL mode, which some file systems
                // refuse (SQLite then silently keeps its rollback journal).
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(&relaxed)
                    .await?;
                if mode.eq_ignore_ascii_case("wal") {
                    Some(relaxed)
                } else {
                    tracing::warn!(journal_mode = %mode, "SQLite is not in WAL mode here: every commit is fsynced");
                    relaxed.close().await;
                    None
                }
            }
            None => None,
        };
        let write_gate: Option<std::sync::Arc<tokio::sync::Mutex<()>>> =
            (backend == Backend::Sqlite).then(Default::default);
        let batcher = relaxed_pool
            .as_ref()
            .zip(write_gate.as_ref())
            .map(|(p, g)| crate::sql_batch::Batcher::start(p.clone(), g.clone()));
        Ok(SqlMeta {
            pool,
            relaxed_pool,
            write_gate,
            batcher,
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
                applied_versions(conn, has_table.is_some()).await?
            }
            Backend::Postgres => {
                let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
                let has_table: Option<String> =
                    sqlx::query_scalar("SELECT CAST(to_regclass('_sqlx_migrations') AS TEXT)")
                        .fetch_one(&mut conn)
                        .await?;
                applied_versions(conn, has_table.is_some()).await?
            }
            Backend::Mysql => {
                let mut conn = sqlx::mysql::MySqlConnection::connect(&mysql_url(url)?).await?;
                let has_table: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM information_schema.tables \
                     WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'",
                )
                .fetch_one(&mut conn)
                .await?;
                applied_versions(conn, has_table > 0).await?
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

    /// Where rows that need no durability are written (see `relaxed_pool`).
    pub(crate) fn relaxed_pool(&self) -> &AnyPool {
        self.relaxed_pool.as_ref().unwrap_or(&self.pool)
    }

    /// This process's turn to write (SQLite; no wait on the other backends), held across a write
    /// statement or transaction of the hot path. A writer stuck in SQLite's busy handler (another
    /// process holds the lock) delays the queue by up to its busy timeout; past that, a writer
    /// goes ahead without its turn and lets SQLite's own locking decide, as before the queue.
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        take_turn(self.write_gate.as_ref()).await
    }

    #[cfg(test)]
    pub(crate) fn batcher(&self) -> Option<&crate::sql_batch::Batcher> {
        self.batcher.as_ref()
    }

    /// The query text for this database's backend (see [`crate::dialect`]).
    pub fn sql<'q>(&self, sql: &'q str) -> std::borrow::Cow<'q, str> {
        crate::dialect::for_backend(self.backend, sql)
    }

    /// Runs `update` (with `$1` and `$2` = `at`, and `{keys}` standing for a subquery of the keys) over
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
            Backend::Sqlite => "SELECT value FROM json_each($3)",
            Backend::Postgres => "SELECT jsonb_array_elements_text(CAST($3 AS jsonb))",
            Backend::Mysql => {
                "SELECT value FROM JSON_TABLE($3, '$[*]' COLUMNS (value VARCHAR(1024) PATH '$')) AS k"
            }
        };
        let sql = update.replace("{keys}", keys_sql);
        let sql = self.sql(&sql);
        let _turn = self.write_turn().await;
        let mut tx = self.relaxed_pool().begin().await?;
        for batch in keys.chunks(TOUCH_BATCH) {
            let json = serde_json::to_string(batch).expect("strings serialize");
            sqlx::query(&sql)
                .bind(at)
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

/// A SQLite pool: `durable` commits are fsynced (FULL: a committed row survives power loss, so
/// "recorded" implies "durable"); the others are not (NORMAL), where losing the last commits is
/// harmless.
async fn sqlite_pool(
    options: AnyPoolOptions,
    url: &str,
    durable: bool,
) -> Result<AnyPool, sqlx::Error> {
    options
        .after_connect(move |conn, _| {
            Box::pin(async move {
                // WAL: readers never wait for the writer.
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute(if durable {
                    "PRAGMA synchronous = FULL"
                } else {
                    "PRAGMA synchronous = NORMAL"
                })
                .await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                // 512 KiB per connection, not SQLite's 2 MiB: pages are in the OS cache anyway,
                // hot entries in nip's own, and a full pool of 2 MiB caches was a third of the
                // server's resident memory.
                conn.execute("PRAGMA cache_size = -512").await?;
                Ok(())
            })
        })
        .connect(url)
        .await
}

/// The turn to write at `gate` (see [`SqlMeta::write_turn`]); `None` without a gate or past
/// [`WRITE_TURN_WAIT`].
pub(crate) async fn take_turn(
    gate: Option<&std::sync::Arc<tokio::sync::Mutex<()>>>,
) -> Option<tokio::sync::MutexGuard<'_, ()>> {
    tokio::time::timeout(WRITE_TURN_WAIT, gate?.lock())
        .await
        .ok()
}

/// The longest a SQLite writer waits for its turn in this process (SQLite's busy timeout).
const WRITE_TURN_WAIT: Duration = Duration::from_secs(10);

/// How long a starting instance waits for another one's MySQL migrations.
const MYSQL_MIGRATE_LOCK_SECS: u32 = 300;

/// Applies pending migrations. On PostgreSQL sqlx holds an advisory lock while migrating. On
/// SQLite it takes none, so two processes starting on a fresh file both try migration 1; each
/// migration is one transaction, so the loser fails without a trace (table exists, or a busy
/// snapshot) and simply runs again, and then finds the work done. On MySQL see
/// [`migrate_mysql`].
async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), MetaError> {
    if backend == Backend::Mysql {
        return migrate_mysql(pool).await;
    }
    retry_migrations(backend.migrator(), MigrateOn::Pool(pool)).await
}

/// MySQL DDL is not transactional: a second instance that runs while the first is inside a
/// migration sees it half-applied ("dirty") and fails. sqlx's own lock there is
/// `GET_LOCK(…, -1)`, which MariaDB answers with NULL (no lock) and sqlx does not check. So nip
/// takes a named lock of its own, checks it is held, and migrates on that same session; the
/// session is closed afterwards, which frees the lock even when a migration failed.
async fn migrate_mysql(pool: &AnyPool) -> Result<(), MetaError> {
    let mut conn = pool.acquire().await?.detach();
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT CAST(GET_LOCK(CONCAT('nip-migrate:', SHA1(DATABASE())), ?) AS SIGNED)",
    )
    .bind(i64::from(MYSQL_MIGRATE_LOCK_SECS))
    .fetch_one(&mut conn)
    .await?;
    if held != Some(1) {
        return Err(MetaError::MigrationLocked(format!(
            "another nip instance has been migrating this MySQL database for over \
             {MYSQL_MIGRATE_LOCK_SECS} s; if none is running, check \
             `SELECT IS_USED_LOCK(CONCAT('nip-migrate:', SHA1(DATABASE())))` and restart"
        )));
    }
    let outcome = retry_migrations(&MYSQL_MIGRATOR, MigrateOn::Session(&mut conn)).await;
    let _ = conn.close().await;
    outcome
}

/// Where migrations run: any pooled connection, or the one session that holds the lock.
enum MigrateOn<'a> {
    Pool(&'a AnyPool),
    Session(&'a mut sqlx::AnyConnection),
}

async fn retry_migrations(
    migrator: &sqlx::migrate::Migrator,
    mut on: MigrateOn<'_>,
) -> Result<(), MetaError> {
    let salt = u64::from(std::process::id()) ^ (migrator as *const _ as u64 >> 4);
    let mut attempt = 1;
    loop {
        let outcome = match &mut on {
            MigrateOn::Pool(pool) => migrator.run(*pool).await,
            // `run_direct`: `run` on a bare connection trips a higher-ranked lifetime bound.
            MigrateOn::Session(conn) => migrator.run_direct(&mut **conn).await,
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if attempt < MIGRATE_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "migration failed, probably racing another process; retrying");
                // Stagger the retries so racing processes do not collide again.
                let jitter = salt.wrapping_mul(u64::from(attempt) * 31) % 50;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt) + jitter)).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub(crate) fn narinfo_from_row(row: &AnyRow) -> Result<NarInfoRecord, sqlx::Error> {
    Ok(NarInfoRecord {
        hash: row.try_get("hash")?,
        store_path: row.try_get("store_path")?,
        nar_file: row.try_get("nar_file")?,
        file_size: row.try_get("file_size")?,
        file_hash: row.try_get("file_hash")?,
        nar_hash: row.try_get("nar_hash")?,
        narinfo: crate::dialect::text(row, "narinfo")?,
        origin: row.try_get("origin")?,
        signed_by: row.try_get("signed_by")?,
        uploaded_by: row.try_get("uploaded_by")?,
    })
}

/// A `nars` row selected with `nar_file, size, sha256`.
pub(crate) fn nar_record(row: &AnyRow) -> Result<NarRecord, sqlx::Error> {
    Ok(NarRecord {
        nar_file: row.try_get("nar_file")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
    })
}

/// Inserts a narinfo row unless one is stored for its hash: DO NOTHING, never UPDATE, since a
/// stored store path is immutable (docs/security.md). Returns the rows inserted (0 or 1; MySQL's
/// duplicate-key error counts as 0, see [`crate::dialect::inserted`]).
pub(crate) async fn insert_narinfo<'e, E>(
    exec: E,
    backend: Backend,
    rec: &NarInfoRecord,
    created_at: i64,
    accessed_at: i64,
) -> Result<u64, sqlx::Error>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    let sql = backend
        .sql(&format!(
            "INSERT INTO narinfos ({NARINFO_COLUMNS}, created_at, last_accessed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (hash) DO NOTHING"
        ))
        .into_owned();
    let q = sqlx::query(&sql);
    let done = bind_narinfo(q, rec, created_at, accessed_at)
        .execute(exec)
        .await;
    crate::dialect::inserted(done)
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a narinfo row's twelve columns, in the order of [`NARINFO_COLUMNS`], `created_at`,
/// `last_accessed_at`.
pub(crate) fn bind_narinfo<'q>(
    q: AnyQuery<'q>,
    rec: &'q NarInfoRecord,
    created_at: i64,
    accessed_at: i64,
) -> AnyQuery<'q> {
    q.bind(&rec.hash)
        .bind(&rec.store_path)
        .bind(&rec.nar_file)
        .bind(rec.file_size)
        .bind(&rec.file_hash)
        .bind(&rec.nar_hash)
        .bind(&rec.narinfo)
        .bind(&rec.origin)
        .bind(&rec.signed_by)
        .bind(&rec.uploaded_by)
        .bind(created_at)
        .bind(accessed_at)
}

/// `sources` with their rank (their place in the list), one per URL: two upstreams may name the
/// same one, and PostgreSQL refuses an upsert that touches a row twice.
pub(crate) fn ranked_sources(sources: &[NarSource]) -> Vec<(usize, &NarSource)> {
    let mut seen = std::collections::HashSet::new();
    sources
        .iter()
        .enumerate()
        .filter(|(_, s)| seen.insert(s.url.as_str()))
        .collect()
}

/// The upsert of `rows` NAR sources, binding (nar_file, url, upstream, rank) per row.
pub(crate) fn sources_insert(rows: usize) -> String {
    let values = (0..rows)
        .map(|i| {
            format!(
                "(${}, ${}, ${}, ${})",
                4 * i + 1,
                4 * i + 2,
                4 * i + 3,
                4 * i + 4
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO nar_sources (nar_file, url, upstream, rank) VALUES {values} \
         ON CONFLICT (nar_file, url) DO UPDATE SET upstream = excluded.upstream, \
         rank = excluded.rank"
    )
}

/// Stores one narinfo and its sources on `pool`, the caller holding the turn to write. Two
/// statements, no transaction (each round trip counts on a miss): the sources go first, so a
/// narinfo is never seen without them. Should the narinfo turn out stored meanwhile, the
/// sources stay as alternatives for this NAR file.
pub(crate) async fn put_narinfo_alone(
    pool: &AnyPool,
    backend: Backend,
    rec: &NarInfoRecord,
    sources: &[NarSource],
) -> Result<PutNarInfo, MetaError> {
    let now = unix_now();
    let sources = ranked_sources(sources);
    if !sources.is_empty() {
        let sql = backend.sql(&sources_insert(sources.len())).into_owned();
        let mut q = sqlx::query(&sql);
        for (rank, src) in &sources {
            q = q
                .bind(&rec.nar_file)
                .bind(&src.url)
                .bind(&src.upstream)
                .bind(*rank as i64);
        }
        q.execute(pool).await?;
    }
    if insert_narinfo(pool, backend, rec, now, now).await? > 0 {
        return Ok(PutNarInfo::Inserted);
    }
    let row = sqlx::query(&backend.sql(&format!(
        "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE hash = $1"
    )))
    .bind(&rec.hash)
    .fetch_one(pool)
    .await?;
    Ok(PutNarInfo::Exists(Box::new(narinfo_from_row(&row)?)))
}

/// The upsert of NAR rows, `values` binding (nar_file, size, sha256, created_at,
/// last_accessed_at) per row.
pub(crate) fn nars_insert(values: &str) -> String {
    format!(
        "INSERT INTO nars (nar_file, size, sha256, created_at, last_accessed_at) VALUES {values} \
         ON CONFLICT (nar_file) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256"
    )
}

/// Records one NAR on `pool`, the caller holding the turn to write.
pub(crate) async fn put_nar_alone(
    pool: &AnyPool,
    backend: Backend,
    rec: &NarRecord,
) -> Result<(), MetaError> {
    let now = unix_now();
    sqlx::query(&backend.sql(&nars_insert("($1, $2, $3, $4, $5)")))
        .bind(&rec.nar_file)
        .bind(rec.size)
        .bind(&rec.sha256)
        .bind(now)
        .bind(now)
        .execute(pool)
        .await?;
    Ok(())
}

pub(crate) const NARINFO_COLUMNS: &str =
    "hash, store_path, nar_file, file_size, file_hash, nar_hash, \
     narinfo, origin, signed_by, uploaded_by";

impl SqlMeta {
    /// The first narinfo row matching `filter` (after WHERE; `$1` is `value`).
    async fn narinfo_where(
        &self,
        filter: &str,
        value: &str,
    ) -> Result<Option<NarInfoRecord>, MetaError> {
        let row = sqlx::query(&self.sql(&format!(
            "SELECT {NARINFO_COLUMNS} FROM narinfos WHERE {filter}"
        )))
        .bind(value)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(narinfo_from_row).transpose()?)
    }

    /// Runs the DELETE `sql` with `$1` = `value`: whether it deleted anything.
    async fn delete_where(&self, sql: &str, value: &str) -> Result<bool, MetaError> {
        let n = sqlx::query(&self.sql(sql))
            .bind(value)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }
}

#[async_trait]
impl MetaStore for SqlMeta {
    async fn get_narinfo(&self, hash: &str) -> Result<Option<NarInfoRecord>, MetaError> {
        self.narinfo_where("hash = $1", hash).await
    }

    async fn put_narinfo(
        &self,
        rec: &NarInfoRecord,
        sources: &[NarSource],
    ) -> Result<PutNarInfo, MetaError> {
        if rec.origin == crate::meta::UPLOAD_ORIGIN {
            let _turn = self.write_turn().await;
            return put_narinfo_alone(&self.pool, self.backend, rec, sources).await;
        }
        if let Some(batcher) = &self.batcher {
            if let Some(done) = batcher.put_narinfo(rec, sources).await {
                return done;
            }
        }
        let _turn = self.write_turn().await;
        put_narinfo_alone(self.relaxed_pool(), self.backend, rec, sources).await
    }

    async fn narinfo_for_nar(&self, nar_file: &str) -> Result<Option<NarInfoRecord>, MetaError> {
        self.narinfo_where("nar_file = $1 LIMIT 1", nar_file).await
    }

    async fn nar_sources(&self, nar_file: &str) -> Result<Vec<NarSource>, MetaError> {
        let rows = sqlx::query(
            &self.sql("SELECT url, upstream FROM nar_sources WHERE nar_file = $1 ORDER BY rank"),
        )
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
        let row =
            sqlx::query(&self.sql("SELECT nar_file, size, sha256 FROM nars WHERE nar_file = $1"))
                .bind(nar_file)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(nar_record).transpose()?)
    }

    async fn put_nar(&self, rec: &NarRecord) -> Result<(), MetaError> {
        let _turn = self.write_turn().await;
        put_nar_alone(&self.pool, self.backend, rec).await
    }

    async fn put_fetched_nar(&self, rec: &NarRecord) -> Result<(), MetaError> {
        if let Some(batcher) = &self.batcher {
            if let Some(done) = batcher.put_nar(rec).await {
                return done;
            }
        }
        let _turn = self.write_turn().await;
        put_nar_alone(self.relaxed_pool(), self.backend, rec).await
    }

    async fn delete_narinfo(&self, hash: &str) -> Result<bool, MetaError> {
        self.delete_where("DELETE FROM narinfos WHERE hash = $1", hash)
            .await
    }

    async fn delete_nar(&self, nar_file: &str) -> Result<bool, MetaError> {
        self.delete_where("DELETE FROM nars WHERE nar_file = $1", nar_file)
            .await
    }

    async fn ping(&self) -> Result<(), MetaError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_sqlite_database_is_private_and_an_existing_directory_is_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let db = tmp.path().join("data/db/db.sqlite");
        let meta = SqlMeta::connect(&format!("sqlite:{}", db.display()))
            .await
            .unwrap();
        assert_eq!(mode(db.parent().unwrap()), 0o700);
        assert_eq!(mode(&db), 0o600);
        // SQLite gives its journal the database file's mode.
        assert_eq!(mode(&db.with_extension("sqlite-wal")), 0o600);
        assert_eq!(mode(tmp.path()), 0o755);
        drop(meta);
        // A database file in an existing directory: the directory keeps its mode.
        let beside = tmp.path().join("beside.sqlite");
        SqlMeta::connect(&format!("sqlite:{}", beside.display()))
            .await
            .unwrap();
        assert_eq!(mode(&beside), 0o600);
        assert_eq!(mode(tmp.path()), 0o755);
    }

    /// A fetched narinfo row for tests.
    pub(crate) fn rec(hash: &str, nar_file: &str) -> NarInfoRecord {
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
            // Two upstreams naming the same URL: one row.
            let twice = vec![sources[0].clone(), sources[0].clone()];
            assert_eq!(
                meta.put_narinfo(&rec("h2", "d.nar"), &twice).await.unwrap(),
                PutNarInfo::Inserted
            );
            assert_eq!(meta.nar_sources("d.nar").await.unwrap(), &twice[..1]);
            // Immutable: a second narinfo for the hash leaves the stored one as it is and is told
            // what is there.
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
