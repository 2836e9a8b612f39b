//! Request coalescing: concurrent callers asking for the same key share one piece of work,
//! which runs in its own task so that a caller going away does not cancel it for the others.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use tracing::Instrument;

/// Whether this caller started the work or joined work already under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    Joined,
}

pub struct Coalescer<K, V> {
    inflight: Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            inflight: Arc::default(),
        }
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` for `key` unless the same key is already running, then waits for the result.
    /// `on_panic` is the value callers get if the work panics.
    pub async fn run<F>(&self, key: K, work: F, on_panic: V) -> (V, Role)
    where
        F: FnOnce() -> BoxFuture<'static, V>,
    {
        let (shared, role) = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = map.get(&key) {
                (existing.clone(), Role::Joined)
            } else {
                let fut = work();
                let map_ref = self.inflight.clone();
                let k = key.clone();
                // In the leader's span: the shared work shows up in the trace of the request
                // that started it.
                let handle = tokio::spawn(
                    async move {
                        let v = fut.await;
                        map_ref.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
                        v
                    }
                    .in_current_span(),
                );
                let map_ref = self.inflight.clone();
                let insert_key = key.clone();
                let shared = async move {
                    match handle.await {
                        Ok(v) => v,
                        Err(_) => {
                            map_ref
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&key);
                            on_panic
                        }
                    }
                }
                .boxed()
                .shared();
                map.insert(insert_key, shared.clone());
                (shared, Role::Leader)
            }
        };
        (shared.await, role)
    }

    /// Number of keys with work under way.
    pub fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let c: Arc<Coalescer<&'static str, u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (c, runs) = (c.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                c.run(
                    "k",
                    move || {
                        async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            7
                        }
                        .boxed()
                    },
                    0,
                )
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, role) = t.await.unwrap();
            assert_eq!(v, 7);
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert_eq!(c.in_flight(), 0);
    }
}
