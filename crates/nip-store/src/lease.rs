//! Leases: at most one instance at a time runs a cluster-wide job (eviction, retention) when
//! several `nip serve` processes share one database. A lease is a row (name, holder, expiry);
//! taking it succeeds when it is free, expired, or already ours, in one atomic statement, so two
//! instances can never both hold it. Times are Unix seconds.
use async_trait::async_trait;

use crate::meta::MetaError;
use crate::sql::SqlMeta;

#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Takes or renews the lease `name` for `holder` until `until`; false when another holder has
    /// it and its term has not passed `now`.
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, MetaError>;

    /// Shortens our own lease to end at `until` (e.g. now, to free it); no effect on another's.
    async fn end_lease(&self, name: &str, holder: &str, until: i64) -> Result<(), MetaError>;

    /// Deletes our own lease row (short-lived leases, one per miss, must not pile up).
    async fn drop_lease(&self, name: &str, holder: &str) -> Result<(), MetaError>;

    /// Whether a holder other than `holder` has a lease whose name starts with `prefix` and whose
    /// term has not passed `now`.
    async fn others_hold(&self, prefix: &str, holder: &str, now: i64) -> Result<bool, MetaError>;
}

#[async_trait]
impl Leases for SqlMeta {
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, MetaError> {
        if self.backend() == crate::sql::Backend::Mysql {
            return take_lease_mysql(self, name, holder, now, until).await;
        }
        // The conditional upsert is one statement on both backends: no read-then-write race.
        let _turn = self.write_turn().await;
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(self.relaxed_pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn end_lease(&self, name: &str, holder: &str, until: i64) -> Result<(), MetaError> {
        let _turn = self.write_turn().await;
        sqlx::query(&self.sql("UPDATE leases SET expires_at = $1 WHERE name = $2 AND holder = $3"))
            .bind(until)
            .bind(name)
            .bind(holder)
            .execute(self.relaxed_pool())
            .await?;
        Ok(())
    }

    async fn drop_lease(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        let _turn = self.write_turn().await;
        sqlx::query(&self.sql("DELETE FROM leases WHERE name = $1 AND holder = $2"))
            .bind(name)
            .bind(holder)
            .execute(self.relaxed_pool())
            .await?;
        Ok(())
    }

    async fn others_hold(&self, prefix: &str, holder: &str, now: i64) -> Result<bool, MetaError> {
        let n: i64 = sqlx::query_scalar(&self.sql(
            "SELECT COUNT(*) FROM leases WHERE name LIKE $1 ESCAPE '!' AND holder <> $2 \
             AND expires_at > $3",
        ))
        .bind(like_prefix(prefix))
        .bind(holder)
        .bind(now)
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }
}

/// `LIKE` with the prefix's own `%`, `_` and `!` taken literally (`!` escapes: MySQL reads a
/// backslash inside a string literal as an escape of its own).
fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '!') {
            p.push('!');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// MySQL has no conditional upsert, and counts matched rather than changed rows: a conditional
/// UPDATE (atomic on the row) takes a lease that exists; when none matched, an INSERT creates it,
/// and a duplicate key means another holder has it.
async fn take_lease_mysql(
    db: &SqlMeta,
    name: &str,
    holder: &str,
    now: i64,
    until: i64,
) -> Result<bool, MetaError> {
    let taken = sqlx::query(
        "UPDATE leases SET holder = ?, expires_at = ? WHERE name = ? AND (holder = ? OR expires_at <= ?)",
    )
    .bind(holder)
    .bind(until)
    .bind(name)
    .bind(holder)
    .bind(now)
    .execute(db.pool())
    .await?
    .rows_affected();
    if taken == 1 {
        return Ok(true);
    }
    let done = sqlx::query("INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)")
        .bind(name)
        .bind(holder)
        .bind(until)
        .execute(db.pool())
        .await;
    Ok(crate::dialect::inserted(done)? == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdb;

    #[tokio::test]
    async fn others_hold_sees_live_leases_of_other_holders_only() {
        for db in testdb::all().await {
            let m = &db.meta;
            assert!(!m.others_hold("instance:", "a", 100).await.unwrap());
            m.take_lease("instance:a", "a", 100, 115).await.unwrap();
            assert!(
                !m.others_hold("instance:", "a", 100).await.unwrap(),
                "own row"
            );
            assert!(m.others_hold("instance:", "b", 100).await.unwrap());
            assert!(
                !m.others_hold("instance:", "b", 115).await.unwrap(),
                "expired"
            );
            m.take_lease("instancex", "c", 100, 200).await.unwrap();
            m.take_lease("instance_b", "d", 100, 200).await.unwrap();
            assert!(
                !m.others_hold("instance:", "a", 120).await.unwrap(),
                "prefix is literal: {}",
                db.url
            );
        }
    }

    #[tokio::test]
    async fn one_holder_at_a_time_until_the_term_ends() {
        for db in testdb::all().await {
            let m = &db.meta;
            assert!(
                m.take_lease("evict", "a", 100, 160).await.unwrap(),
                "{}",
                db.url
            );
            assert!(
                !m.take_lease("evict", "b", 120, 180).await.unwrap(),
                "b took a's lease"
            );
            assert!(
                m.take_lease("evict", "a", 150, 210).await.unwrap(),
                "a cannot renew"
            );
            assert!(!m.take_lease("evict", "b", 209, 260).await.unwrap());
            // Other names are independent.
            assert!(m.take_lease("retention", "b", 150, 210).await.unwrap());
            // Expired: anyone may take it.
            assert!(
                m.take_lease("evict", "b", 210, 270).await.unwrap(),
                "expired lease kept"
            );
            assert!(!m.take_lease("evict", "a", 211, 270).await.unwrap());
            // Ending someone else's lease does nothing; ending one's own frees it.
            m.end_lease("evict", "a", 0).await.unwrap();
            assert!(!m.take_lease("evict", "a", 212, 270).await.unwrap());
            m.end_lease("evict", "b", 212).await.unwrap();
            assert!(m.take_lease("evict", "a", 212, 270).await.unwrap());
            // Dropping someone else's lease does nothing; dropping one's own frees it at once.
            m.drop_lease("evict", "b").await.unwrap();
            assert!(!m.take_lease("evict", "b", 213, 270).await.unwrap());
            m.drop_lease("evict", "a").await.unwrap();
            assert!(m.take_lease("evict", "b", 213, 270).await.unwrap());
        }
    }

    #[tokio::test]
    async fn concurrent_takers_get_exactly_one_lease() {
        for db in testdb::all().await {
            let meta = std::sync::Arc::new(db.meta.clone());
            let tasks: Vec<_> = (0..16)
                .map(|i| {
                    let meta = meta.clone();
                    tokio::spawn(async move {
                        meta.take_lease("evict", &format!("h{i}"), 1000, 1060)
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut won = 0;
            for t in tasks {
                won += t.await.unwrap() as usize;
            }
            assert_eq!(won, 1, "{}", db.url);
        }
    }
}
