//! Test databases: every metadata test runs against each backend with the same code — a fresh
//! SQLite file always, and a fresh PostgreSQL database when `NIP_TEST_POSTGRES_URL` names a
//! server (`./scripts/test.sh` starts one; with `NIP_REQUIRE_TOOLS` set it must be there).
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
        Ok(admin) => {
            let name = format!("nip_t_{}", rand_suffix());
            let mut conn = sqlx::postgres::PgConnection::connect(&admin)
                .await
                .expect("connect to NIP_TEST_POSTGRES_URL");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
            let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
            let url = format!("{base}/{name}");
            dbs.push(TestDb {
                meta: SqlMeta::connect(&url).await.unwrap(),
                url,
                _dir: None,
            });
        }
        Err(_) => {
            assert!(
                std::env::var("NIP_REQUIRE_TOOLS").is_err(),
                "NIP_TEST_POSTGRES_URL is not set: ./scripts/test.sh starts PostgreSQL"
            );
            eprintln!("PostgreSQL backend not tested: NIP_TEST_POSTGRES_URL is not set");
        }
    }
    dbs
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
