//! One upstream fetch per miss across every instance that shares the database. Before fetching a
//! narinfo or a NAR from an upstream, an instance takes a short fill lease in the shared database
//! (the `leases` table: one atomic statement, PostgreSQL or SQLite alike) and renews it while it
//! works. The others wait for the result to show up in the shared index and store, and serve it
//! from there; when the lease ends without a result (the holder failed, or was killed and its
//! lease ran out) the next waiter takes it and fetches. No Redis: the database is the lock.
//! Each instance keeps a presence row there too; one that sees no other skips the leases.
//!
//! Why followers wait instead of streaming the leader's bytes through an internal endpoint:
//! it needs no instance-to-instance traffic, addresses or cluster secret, and a follower can never
//! get bytes that were not verified; the cost is the follower's time to first byte (the leader's
//! whole fill). Within one instance, requests still join the running fill and stream as it grows.
use std::future::Future;
use std::time::{Duration, Instant};

use crate::AppState;

/// A lease's term: a dead holder's lease frees this long after its last renewal at most.
const TERM_SECS: i64 = 5;
/// How often a holder renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often a waiter looks for the result, and how often it tries the lease.
const POLL: Duration = Duration::from_millis(100);
const TRY_LEASE_EVERY: Duration = Duration::from_millis(500);

/// An instance's presence row (`instance:<id>` in `leases`): how long it lasts unrenewed, and how
/// often it is renewed.
const PRESENCE_TERM_SECS: i64 = 15;
pub const PRESENCE_EVERY: Duration = Duration::from_secs(5);
const PRESENCE_PREFIX: &str = "instance:";
/// How long "no other instance is alive" is believed before the database is asked again: an
/// instance that starts is seen by the others within this.
const PEERS_FRESH: Duration = Duration::from_millis(200);

/// Writes (or renews) this instance's presence row. Fill leases cost two writes per miss; an
/// instance that sees no other one alive fetches without them (its own requests already share
/// one fill in memory).
pub async fn announce(state: &AppState) {
    let now = nip_store::unix_now();
    let id = state.instance_id();
    let name = format!("{PRESENCE_PREFIX}{id}");
    if let Err(e) = state
        .meta
        .take_lease(&name, id, now, now + PRESENCE_TERM_SECS)
        .await
    {
        tracing::warn!(error = %e, "cannot record this instance's presence; other instances may fetch a miss this one fetches too");
    }
}

/// Deletes this instance's presence row (at shutdown: the others stop taking fill leases for it).
pub async fn withdraw(state: &AppState) {
    let id = state.instance_id();
    let _ = state
        .meta
        .drop_lease(&format!("{PRESENCE_PREFIX}{id}"), id)
        .await;
}

/// Whether another instance shares the database now (a database that cannot say: yes).
async fn others_alive(state: &AppState) -> bool {
    state
        .peers
        .get(async {
            let now = nip_store::unix_now();
            state
                .meta
                .others_hold(PRESENCE_PREFIX, state.instance_id(), now)
                .await
                .unwrap_or(true)
        })
        .await
}

/// The last answer to "is another instance alive?", believed for [`PEERS_FRESH`]. One request at
/// a time asks again; the others meanwhile go by the last answer (a burst of misses would
/// otherwise each ask the database at once).
#[derive(Default)]
pub struct PeersSeen {
    seen: std::sync::Mutex<Option<(Instant, bool)>>,
    asking: tokio::sync::Mutex<()>,
}

impl PeersSeen {
    fn last(&self) -> Option<(Instant, bool)> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn get(&self, ask: impl Future<Output = bool>) -> bool {
        let fresh = |seen: Option<(Instant, bool)>| {
            seen.filter(|(at, _)| at.elapsed() < PEERS_FRESH)
                .map(|(_, alive)| alive)
        };
        let last = self.last();
        if let Some(alive) = fresh(last) {
            return alive;
        }
        let _asking = match (self.asking.try_lock(), last) {
            (Ok(turn), _) => turn,
            (Err(_), Some((_, alive))) => return alive,
            // Nothing seen yet: wait for the answer under way.
            (Err(_), None) => self.asking.lock().await,
        };
        // Answered while this request waited for its turn.
        if let Some(alive) = fresh(self.last()) {
            return alive;
        }
        let alive = ask.await;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), alive));
        alive
    }
}

/// What a caller that wants to fetch `name` does.
pub enum Turn {
    /// Fetch it: this instance holds the lease until the guard is dropped.
    Lead(Lease),
    /// Another instance stored it meanwhile: read it from the shared index and store.
    Stored,
}

/// A held fill lease, renewed in the background; its row is deleted (freed for the others, and
/// one row per miss does not pile up) when dropped.
pub struct Lease {
    /// The renewal task and what to delete when done; `None` when fetching without a lease.
    held: Option<(tokio::task::JoinHandle<()>, AppState, String)>,
}

impl Lease {
    /// Fetching without a lease (the database could not be asked, or the wait ran out).
    fn none() -> Self {
        Lease { held: None }
    }

    /// Stops renewing without deleting the row: for a holder that found this instance's own
    /// fill running under the same name (leases are per instance, so the row is that fill's
    /// too, and it deletes the row when it ends; an unrenewed row runs out by itself).
    pub fn leave_to_running_fill(mut self) {
        if let Some((renew, _, _)) = self.held.take() {
            renew.abort();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some((renew, state, name)) = self.held.take() {
            renew.abort();
            tokio::spawn(async move {
                let holder = state.instance_id().to_string();
                if let Err(e) = state.meta.drop_lease(&name, &holder).await {
                    tracing::debug!(lease = %name, error = %e, "cannot end the fill lease; it runs out by itself");
                }
            });
        }
    }
}

fn lease(state: &AppState, name: &str) -> Lease {
    let (st, n) = (state.clone(), name.to_string());
    let renew = tokio::spawn(async move {
        let holder = st.instance_id().to_string();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            let now = nip_store::unix_now();
            match st.meta.take_lease(&n, &holder, now, now + TERM_SECS).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(lease = %n, "another instance took this fill's lease (this one was too slow to renew); the fetch goes on");
                    return;
                }
                Err(e) => tracing::warn!(lease = %n, error = %e, "cannot renew the fill lease"),
            }
        }
    });
    Lease {
        held: Some((renew, state.clone(), name.to_string())),
    }
}

/// Takes the fill lease `name` if it is free and `stored()` does not find the result (the last
/// holder may have stored it and let go just before); `None` otherwise, without waiting (for
/// work nobody waits on, such as a prefetch).
pub async fn try_lead<F, Fut>(state: &AppState, name: &str, stored: F) -> Option<Lease>
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    if !others_alive(state).await {
        return Some(Lease::none());
    }
    let holder = state.instance_id().to_string();
    let now = nip_store::unix_now();
    match state
        .meta
        .take_lease(name, &holder, now, now + TERM_SECS)
        .await
    {
        Ok(true) if stored().await => {
            let _ = state.meta.drop_lease(name, &holder).await;
            None
        }
        Ok(true) => Some(lease(state, name)),
        Ok(false) | Err(_) => None,
    }
}

/// Takes the fill lease `name`, or, while another instance holds it, waits until `stored()`
/// finds the result in the shared index or store (→ `Stored`), the lease frees (→ `Lead`), or
/// `--cache-lock-download-ttl` passes (→ `Lead`: a second fetch beats failing the client). A
/// database that cannot be asked does not block a fetch: this instance then leads.
pub async fn lead_or_wait<F, Fut>(state: &AppState, name: &str, stored: F) -> Turn
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    if !others_alive(state).await {
        return Turn::Lead(Lease::none());
    }
    let holder = state.instance_id().to_string();
    let started = Instant::now();
    let max_wait = state.config().fill_wait;
    let mut last_try: Option<Instant> = None;
    let mut waited = false;
    loop {
        if last_try.is_none_or(|t| t.elapsed() >= TRY_LEASE_EVERY) {
            last_try = Some(Instant::now());
            let now = nip_store::unix_now();
            match state
                .meta
                .take_lease(name, &holder, now, now + TERM_SECS)
                .await
            {
                Ok(true) => {
                    // The last holder may have stored it and let go between the caller's look
                    // at the index and this lease (more likely after a wait, possible without).
                    if stored().await {
                        let _ = state.meta.drop_lease(name, &holder).await;
                        return Turn::Stored;
                    }
                    return Turn::Lead(lease(state, name));
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %name, error = %e, "cannot take a fill lease; fetching without one");
                    return Turn::Lead(Lease::none());
                }
            }
        }
        if !waited {
            tracing::debug!(lease = %name, "another instance is fetching this; waiting for it");
            waited = true;
        }
        if started.elapsed() >= max_wait {
            tracing::warn!(lease = %name, waited_ms = started.elapsed().as_millis() as u64, "another instance's fetch takes longer than --cache-lock-download-ttl; fetching here too");
            return Turn::Lead(Lease::none());
        }
        tokio::time::sleep(POLL).await;
        if stored().await {
            return Turn::Stored;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_burst_asks_the_database_once() {
        let peers = Arc::new(PeersSeen::default());
        let asked = Arc::new(AtomicUsize::new(0));
        let ask = |alive: bool| {
            let asked = asked.clone();
            async move {
                asked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                alive
            }
        };
        // 20 requests at once, nothing seen yet: one asks, the others wait for its answer.
        let burst: Vec<_> = (0..20)
            .map(|_| {
                let (peers, ask) = (peers.clone(), ask(true));
                tokio::spawn(async move { peers.get(ask).await })
            })
            .collect();
        for r in futures::future::join_all(burst).await {
            assert!(r.unwrap());
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert_eq!(peers.last().map(|(_, alive)| alive), Some(true));
        // Stale: one asks again while the others go by the last answer.
        tokio::time::sleep(PEERS_FRESH).await;
        let (started, asking_now) = tokio::sync::oneshot::channel();
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let slow_ask = {
            let asked = asked.clone();
            async move {
                asked.fetch_add(1, Ordering::SeqCst);
                let _ = started.send(());
                let _ = gate.await;
                false
            }
        };
        let asking = tokio::spawn({
            let peers = peers.clone();
            async move { peers.get(slow_ask).await }
        });
        asking_now.await.unwrap();
        assert!(
            peers.get(ask(false)).await,
            "the last answer, while one asks"
        );
        release.send(()).unwrap();
        assert!(!asking.await.unwrap());
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert_eq!(peers.last().map(|(_, alive)| alive), Some(false));
    }
}
