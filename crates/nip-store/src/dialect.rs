//! MySQL/MariaDB spelling of the queries written once for SQLite and PostgreSQL.
//!
//! The shared text uses `$N` placeholders, `ON CONFLICT (pk) DO NOTHING / DO UPDATE SET
//! a = excluded.a`, `CAST(x AS TEXT | BIGINT)` and `length()`. [`mysql`] rewrites those: `?`
//! placeholders (so each `$N` must appear once, in bind order), `ON DUPLICATE KEY UPDATE
//! a = VALUES(a)`, `CAST(x AS CHAR | SIGNED)`, `CHAR_LENGTH()`, and backquotes the column names
//! MySQL reserves. `ON CONFLICT … DO NOTHING` is dropped: a duplicate primary key then fails the
//! statement alone (the transaction goes on), and [`inserted`] counts it as no row. A conditional
//! upsert (`DO UPDATE … WHERE`) and `RETURNING` have no MySQL form and get a hand-written query.
use std::borrow::Cow;

use sqlx::any::{AnyQueryResult, AnyRow};
use sqlx::Row;

/// Column names that are reserved words in MySQL 8 or MariaDB (written lower case in queries).
const RESERVED: &[&str] = &["key", "rank", "system"];

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Space(String),
    Word(String),
    Quoted(String),
    Param(u32),
    Punct(char),
}

fn tokenize(sql: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            let mut s = String::from(c);
            while let Some(&n) = chars.peek().filter(|n| n.is_whitespace()) {
                s.push(n);
                chars.next();
            }
            out.push(Tok::Space(s));
        } else if c == '\'' || c == '`' || c == '"' {
            // A literal or quoted name, with its doubled-quote escapes, kept as written.
            let mut s = String::from(c);
            while let Some(n) = chars.next() {
                s.push(n);
                if n == c {
                    if chars.peek() == Some(&c) {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
            }
            out.push(Tok::Quoted(s));
        } else if c == '$' && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            let mut n = 0u32;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n * 10 + d;
                chars.next();
            }
            out.push(Tok::Param(n));
        } else if c.is_alphanumeric() || c == '_' {
            let mut s = String::from(c);
            while let Some(&n) = chars.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                s.push(n);
                chars.next();
            }
            out.push(Tok::Word(s));
        } else {
            out.push(Tok::Punct(c));
        }
    }
    out
}

/// The index of the next token after `i` that is not white space.
fn next_solid(toks: &[Tok], i: usize) -> Option<usize> {
    (i + 1..toks.len()).find(|&j| !matches!(toks[j], Tok::Space(_)))
}

fn is_word(t: Option<&Tok>, w: &str) -> bool {
    matches!(t, Some(Tok::Word(s)) if s.eq_ignore_ascii_case(w))
}

/// The MySQL/MariaDB text of a shared query. Panics (in debug builds) on what it cannot
/// translate: a placeholder used twice or out of bind order, a conditional upsert, `RETURNING`.
pub fn mysql(sql: &str) -> String {
    let toks = tokenize(sql);
    let mut out = String::with_capacity(sql.len() + 16);
    let mut next_param = 1;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Param(n) => {
                debug_assert_eq!(
                    *n, next_param,
                    "MySQL binds in order: each $N once, ascending, in {sql}"
                );
                next_param += 1;
                out.push('?');
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("RETURNING") => {
                debug_assert!(
                    false,
                    "MySQL has no RETURNING: write its own query for {sql}"
                );
                out.push_str(w);
            }
            Tok::Word(w)
                if w == "ON" && is_word(next_solid(&toks, i).map(|j| &toks[j]), "CONFLICT") =>
            {
                // Skip `CONFLICT (cols)` up to DO.
                let mut j = next_solid(&toks, i).unwrap();
                while j < toks.len() && !is_word(Some(&toks[j]), "DO") {
                    j += 1;
                }
                let action = next_solid(&toks, j);
                if is_word(action.map(|a| &toks[a]), "NOTHING") {
                    // Dropped: see [`inserted`]. Trailing white space before it goes too.
                    while out.ends_with(char::is_whitespace) {
                        out.pop();
                    }
                    i = action.unwrap() + 1;
                    continue;
                }
                let set = action.and_then(|a| next_solid(&toks, a));
                debug_assert!(
                    is_word(action.map(|a| &toks[a]), "UPDATE")
                        && is_word(set.map(|s| &toks[s]), "SET"),
                    "unknown ON CONFLICT action in {sql}"
                );
                debug_assert!(
                    !toks[i..].iter().any(|t| is_word(Some(t), "WHERE")),
                    "a conditional upsert has no MySQL form: write its own query for {sql}"
                );
                out.push_str("ON DUPLICATE KEY UPDATE");
                i = set.map_or(toks.len(), |s| s + 1);
                continue;
            }
            Tok::Word(w)
                if w == "excluded"
                    && toks.get(i + 1) == Some(&Tok::Punct('.'))
                    && matches!(toks.get(i + 2), Some(Tok::Word(_))) =>
            {
                let Some(Tok::Word(col)) = toks.get(i + 2) else {
                    unreachable!()
                };
                out.push_str("VALUES(");
                push_name(&mut out, col);
                out.push(')');
                i += 3;
                continue;
            }
            Tok::Word(w)
                if w.eq_ignore_ascii_case("length")
                    && next_solid(&toks, i).map(|j| &toks[j]) == Some(&Tok::Punct('(')) =>
            {
                // Characters, as on the other backends; MySQL's length() counts bytes.
                out.push_str("CHAR_LENGTH");
            }
            Tok::Word(w)
                if (w == "TEXT" || w == "BIGINT")
                    && prev_solid_is(&toks, i, "AS")
                    && next_solid(&toks, i).map(|j| &toks[j]) == Some(&Tok::Punct(')')) =>
            {
                out.push_str(if w == "TEXT" { "CHAR" } else { "SIGNED" });
            }
            Tok::Word(w) => push_name(&mut out, w),
            Tok::Space(s) | Tok::Quoted(s) => out.push_str(s),
            Tok::Punct(c) => out.push(*c),
        }
        i += 1;
    }
    out
}

fn prev_solid_is(toks: &[Tok], i: usize, w: &str) -> bool {
    (0..i)
        .rev()
        .find(|&j| !matches!(toks[j], Tok::Space(_)))
        .is_some_and(|j| is_word(Some(&toks[j]), w))
}

fn push_name(out: &mut String, w: &str) {
    if RESERVED.contains(&w) {
        out.push('`');
        out.push_str(w);
        out.push('`');
    } else {
        out.push_str(w);
    }
}

/// The text of `sql` for `backend`: unchanged but on MySQL.
pub fn for_backend(backend: crate::sql::Backend, sql: &str) -> Cow<'_, str> {
    match backend {
        crate::sql::Backend::Mysql => Cow::Owned(mysql(sql)),
        _ => Cow::Borrowed(sql),
    }
}

/// Rows written by an `INSERT … ON CONFLICT (primary key) DO NOTHING`: on MySQL, where the
/// clause is dropped, a duplicate primary key is no row rather than an error. Any other
/// failure, a clash on another unique column included, stays an error.
pub fn inserted(res: Result<AnyQueryResult, sqlx::Error>) -> Result<u64, sqlx::Error> {
    match res {
        Ok(done) => Ok(done.rows_affected()),
        Err(sqlx::Error::Database(e)) if is_duplicate_primary_key(&*e) => Ok(0),
        Err(e) => Err(e),
    }
}

/// MySQL's ER_DUP_ENTRY on the primary key: "Duplicate entry '…' for key '[table.]PRIMARY'".
pub fn is_duplicate_primary_key(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.is_unique_violation()
        && e.code().as_deref() == Some("23000")
        && e.message().ends_with("PRIMARY'")
}

/// A text column: MySQL's TEXT types reach the `Any` driver as bytes, so those are accepted too.
pub fn text(row: &AnyRow, column: &str) -> Result<String, sqlx::Error> {
    match row.try_get::<String, _>(column) {
        Ok(s) => Ok(s),
        Err(e) => match row.try_get::<Vec<u8>, _>(column) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|u| sqlx::Error::ColumnDecode {
                index: column.to_string(),
                source: Box::new(u),
            }),
            Err(_) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_question_marks_and_literals_stay() {
        assert_eq!(
            mysql("SELECT key FROM t WHERE a = $1 AND b = '$2 key' AND c = $2"),
            "SELECT `key` FROM t WHERE a = ? AND b = '$2 key' AND c = ?"
        );
        assert_eq!(
            mysql("SELECT 'it''s', p.key, key_name, rank FROM pins p"),
            "SELECT 'it''s', p.`key`, key_name, `rank` FROM pins p"
        );
    }

    #[test]
    #[should_panic(expected = "each $N once")]
    #[cfg(debug_assertions)]
    fn a_reused_placeholder_is_refused() {
        mysql("UPDATE t SET a = $1 WHERE a < $1");
    }

    #[test]
    #[should_panic(expected = "each $N once")]
    #[cfg(debug_assertions)]
    fn placeholders_out_of_order_are_refused() {
        mysql("UPDATE t SET a = $2 WHERE b = $1");
    }

    #[test]
    fn do_nothing_is_dropped() {
        assert_eq!(
            mysql(
                "INSERT INTO pins (key, created_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
            ),
            "INSERT INTO pins (`key`, created_at) VALUES (?, ?)"
        );
        assert_eq!(
            mysql("INSERT INTO x (a, b) VALUES ($1, $2)\n ON CONFLICT (a, b) DO NOTHING\n"),
            "INSERT INTO x (a, b) VALUES (?, ?)\n"
        );
    }

    #[test]
    fn do_update_becomes_on_duplicate_key_update() {
        assert_eq!(
            mysql(
                "INSERT INTO nar_sources (nar_file, url, upstream, rank) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (nar_file, url) DO UPDATE SET upstream = excluded.upstream, \
                 rank = excluded.rank"
            ),
            "INSERT INTO nar_sources (nar_file, url, upstream, `rank`) VALUES (?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE upstream = VALUES(upstream), `rank` = VALUES(`rank`)"
        );
    }

    #[test]
    #[should_panic(expected = "conditional upsert")]
    #[cfg(debug_assertions)]
    fn a_conditional_upsert_is_refused() {
        mysql(
            "INSERT INTO l (a, b) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET b = excluded.b \
             WHERE l.b < $3",
        );
    }

    #[test]
    #[should_panic(expected = "RETURNING")]
    #[cfg(debug_assertions)]
    fn returning_is_refused() {
        mysql("DELETE FROM t WHERE a = $1 RETURNING b");
    }

    #[test]
    fn casts_and_functions() {
        assert_eq!(
            mysql("SELECT CAST(SUM(size) AS BIGINT), CAST(NULL AS TEXT), substr(key, 1, length($1)) FROM t"),
            "SELECT CAST(SUM(size) AS SIGNED), CAST(NULL AS CHAR), substr(`key`, 1, CHAR_LENGTH(?)) FROM t"
        );
        // Only the type of a CAST: a column named text is left alone.
        assert_eq!(
            mysql("SELECT text, bigint FROM t"),
            "SELECT text, bigint FROM t"
        );
    }

    #[test]
    fn ncps_mysql_url_forms_become_sqlx_ones() {
        use crate::sql::mysql_url;
        assert_eq!(
            mysql_url("mysql://u:p@db:3306/ncps").unwrap(),
            "mysql://u:p@db:3306/ncps"
        );
        assert_eq!(
            mysql_url("mysql+unix:///var/run/mysqld/mysqld.sock/ncps").unwrap(),
            "mysql://localhost/ncps?socket=/var/run/mysqld/mysqld.sock"
        );
        assert_eq!(
            mysql_url("mysql+unix:////run/mysqld//mysqld.sock//ncps").unwrap(),
            "mysql://localhost/ncps?socket=/run/mysqld/mysqld.sock"
        );
        assert_eq!(
            mysql_url("mysql://u:p@/ncps?parseTime=true&unix_socket=/run/m.sock").unwrap(),
            "mysql://u:p@localhost/ncps?parseTime=true&socket=/run/m.sock"
        );
        assert_eq!(
            mysql_url("mysql://u@/ncps?host=/run/m.sock").unwrap(),
            "mysql://u@localhost/ncps?socket=/run/m.sock"
        );
        assert!(mysql_url("mysql+unix:///").is_err());
        assert_eq!(
            crate::sql::Backend::of_url("mysql+unix:///s/db").unwrap(),
            crate::sql::Backend::Mysql
        );
    }

    /// What MySQL does differently by default, kept the same on every backend: long text (TEXT
    /// types), case-sensitive keys (collation), characters outside ASCII.
    #[tokio::test]
    async fn long_text_and_case_sensitive_keys_on_every_backend() {
        use crate::index::{ArtifactIndex, ArtifactRecord, PutArtifact};
        use crate::meta::{MetaStore, NarInfoRecord, PutNarInfo};
        for t in crate::testdb::all().await {
            let db = &t.meta;
            let narinfo = format!(
                "StorePath: /nix/store/x-ü\nReferences: {}\n",
                "r".repeat(300_000)
            );
            let rec = NarInfoRecord {
                hash: "h".repeat(32),
                store_path: "/nix/store/x-ü".into(),
                nar_file: "f.nar".into(),
                file_size: None,
                file_hash: None,
                nar_hash: "sha256:x".into(),
                narinfo: narinfo.clone(),
                origin: "upload".into(),
                signed_by: None,
                uploaded_by: None,
            };
            assert_eq!(
                db.put_narinfo(&rec, &[]).await.unwrap(),
                PutNarInfo::Inserted
            );
            assert_eq!(
                db.get_narinfo(&rec.hash).await.unwrap().unwrap().narinfo,
                narinfo,
                "{}",
                t.url
            );
            assert!(db.get_narinfo(&"H".repeat(32)).await.unwrap().is_none());
            let art = |key: &str, metadata: &str| ArtifactRecord {
                key: key.into(),
                size: 1,
                sha256: "s".into(),
                metadata: metadata.into(),
                created_at: 1,
            };
            let big = format!("{{\"n\": \"{}\"}}", "é".repeat(100_000));
            assert_eq!(
                db.put_artifact(&art("Key", &big), None, None)
                    .await
                    .unwrap(),
                PutArtifact::Created
            );
            assert_eq!(
                db.put_artifact(&art("key", "{}"), None, None)
                    .await
                    .unwrap(),
                PutArtifact::Created
            );
            assert_eq!(db.get_artifact("Key").await.unwrap().unwrap().metadata, big);
            assert_eq!(
                db.get_artifact("key").await.unwrap().unwrap().metadata,
                "{}"
            );
            let listed = db
                .list_artifacts(None, None, Some("K"), None, 10)
                .await
                .unwrap();
            assert_eq!(listed.len(), 1, "{}", t.url);
        }
    }

    /// Instances starting together on a fresh MySQL database all start (one migrates).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_connects_on_a_fresh_mysql_database_all_succeed() {
        let Ok(admin) = std::env::var("NIP_TEST_MYSQL_URL") else {
            return;
        };
        let url = crate::testdb::fresh_mysql(&admin).await;
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { crate::sql::SqlMeta::connect_with(&url, 2).await })
            })
            .collect();
        for t in tasks {
            use crate::meta::MetaStore;
            let meta = t.await.unwrap().expect("every concurrent connect succeeds");
            meta.ping().await.unwrap();
        }
    }

    /// MariaDB ignores sqlx's own migration lock (`GET_LOCK(…, -1)` is NULL there), so nip holds
    /// one of its own: while another session holds it, an instance waits instead of running
    /// migrations over a half-applied one (CI once failed with `Dirty(3)`).
    #[tokio::test]
    async fn mysql_migrations_wait_for_the_migration_lock() {
        use sqlx::Connection;
        let Ok(admin) = std::env::var("NIP_TEST_MYSQL_URL") else {
            return;
        };
        let url = crate::testdb::fresh_mysql(&admin).await;
        let mut holder = sqlx::mysql::MySqlConnection::connect(&url).await.unwrap();
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(GET_LOCK(CONCAT('nip-migrate:', SHA1(DATABASE())), 5) AS SIGNED)",
        )
        .fetch_one(&mut holder)
        .await
        .unwrap();
        assert_eq!(held, Some(1));
        let opening = tokio::spawn({
            let url = url.clone();
            async move { crate::sql::SqlMeta::connect_with(&url, 2).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(
            !opening.is_finished(),
            "migrations ran while the lock was held"
        );
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = 'narinfos'",
        )
        .fetch_one(&mut holder)
        .await
        .unwrap();
        assert_eq!(tables, 0, "no migration ran while the lock was held");
        holder.close().await.unwrap();
        let meta = opening.await.unwrap().expect("opens once the lock is free");
        use crate::meta::MetaStore;
        meta.ping().await.unwrap();
    }

    /// A migration added for one backend is added for all of them.
    #[test]
    fn every_backend_has_every_migration() {
        let of = |url| crate::sql::SqlMeta::migrations_for(url).unwrap();
        let sqlite = of("sqlite:x");
        assert_eq!(of("postgres://h/d"), sqlite);
        assert_eq!(of("mysql://h/d"), sqlite);
    }

    /// `nip migrate --dry-run` on MySQL: every migration pending on an empty database, none
    /// once nip has opened it.
    #[tokio::test]
    async fn pending_migrations_on_mysql() {
        let Ok(admin) = std::env::var("NIP_TEST_MYSQL_URL") else {
            return;
        };
        let url = crate::testdb::fresh_mysql(&admin).await;
        let all = crate::sql::SqlMeta::migrations_for(&url).unwrap();
        assert_eq!(all, crate::sql::SqlMeta::migrations());
        assert_eq!(
            crate::sql::SqlMeta::pending_migrations(&url).await.unwrap(),
            all
        );
        crate::sql::SqlMeta::connect(&url).await.unwrap();
        assert!(crate::sql::SqlMeta::pending_migrations(&url)
            .await
            .unwrap()
            .is_empty());
    }

    #[test]
    fn other_backends_are_unchanged() {
        let q = "SELECT key FROM pins WHERE key = $1 ON CONFLICT (key) DO NOTHING";
        assert_eq!(for_backend(crate::sql::Backend::Sqlite, q), q);
        assert_eq!(for_backend(crate::sql::Backend::Postgres, q), q);
    }
}
