//! Test databases: every metadata test runs against each backend with the same code — a fresh
//! SQLite file always, a fresh PostgreSQL database when `NIP_TEST_POSTGRES_URL` names a server,
//! and a fresh MariaDB/MySQL database when `NIP_TEST_MYSQL_URL` does (`./scripts/test.sh` starts
//! both; with `NIP_REQUIRE_TOOLS` set they must be there).
use sqlx::Connection;

use crate::sql::SqlMeta;

pub struct TestDb {
    pub url: String,
    pub meta: SqlMeta,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// The handle and what keeps a SQLite file's directory alive.
    pub fn into_parts(self) -> (SqlMeta, Option<tempfile::TempDir>) {
        (self.meta, self._dir)
    }

    /// The database at `url` on a test server (nothing to keep alive).
    async fn on_server(url: String) -> TestDb {
        TestDb {
            meta: SqlMeta::connect(&url).await.unwrap(),
            url,
            _dir: None,
        }
    }
}

pub async fn all() -> Vec<TestDb> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("db/db.sqlite").display());
    let mut dbs = vec![TestDb {
        meta: SqlMeta::connect(&url).await.unwrap(),
        url,
        _dir: Some(dir),
    }];
    match std::env::var("NIP_TEST_POSTGRES_URL") {
        Ok(admin) => dbs.push(TestDb::on_server(fresh_postgres(&admin).await).await),
        Err(_) => not_tested("NIP_TEST_POSTGRES_URL", "PostgreSQL", "PostgreSQL"),
    }
    match std::env::var("NIP_TEST_MYSQL_URL") {
        Ok(admin) => dbs.push(TestDb::on_server(fresh_mysql(&admin).await).await),
        Err(_) => not_tested("NIP_TEST_MYSQL_URL", "MySQL", "MariaDB"),
    }
    dbs
}

/// A backend whose server `var` does not name: a failure when the test command requires every
/// backend, else a note that `backend` is not tested (`./scripts/test.sh` starts `server`).
fn not_tested(var: &str, backend: &str, server: &str) {
    assert!(
        !required(),
        "{var} is not set: ./scripts/test.sh starts {server}"
    );
    eprintln!("{backend} backend not tested: {var} is not set");
}

/// Creates a new, empty database on the server of `admin` (a URL whose user may create them,
/// read from `var`) and returns its name.
async fn create_database(admin: &str, var: &str) -> String {
    let name = format!("nip_t_{}", rand_suffix());
    // `Any` finds no driver until they are installed; `SqlMeta::connect` may not have run yet.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("connect to {var}: {e:?}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    name
}

/// A new, empty database on the PostgreSQL server of `admin` (a URL whose user may create them).
async fn fresh_postgres(admin: &str) -> String {
    let name = create_database(admin, "NIP_TEST_POSTGRES_URL").await;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    format!("{base}/{name}")
}

/// A new, empty database on the MySQL server of `admin` (a URL whose user may create them).
pub async fn fresh_mysql(admin: &str) -> String {
    let name = create_database(admin, "NIP_TEST_MYSQL_URL").await;
    let (base, query) = admin.split_once('?').unwrap_or((admin, ""));
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    }
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether the test command requires every backend (CI=true or NIP_REQUIRE_TOOLS): a missing
/// one is then a failure, never a skip.
fn required() -> bool {
    std::env::var("CI").as_deref() == Ok("true") || std::env::var("NIP_REQUIRE_TOOLS").is_ok()
}
