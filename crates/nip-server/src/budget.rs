//! The store's size budget (`--cache-max-size`): a running estimate of stored bytes, and a wake-up
//! for the eviction job as soon as a write pushes the store past the limit. Eviction then goes
//! down to a low watermark below the limit, so that the next writes do not each trigger a pass.
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

/// Eviction empties the store down to this fraction of the limit.
const LOW_WATERMARK: f64 = 0.9;

pub struct Budget {
    pub max_bytes: Option<u64>,
    bytes: AtomicI64,
    pub evict_now: Notify,
}

impl Budget {
    pub fn new(max_bytes: Option<u64>, current: i64) -> Self {
        Budget {
            max_bytes,
            bytes: AtomicI64::new(current),
            evict_now: Notify::new(),
        }
    }

    pub fn bytes(&self) -> i64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn set(&self, bytes: i64) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Records newly stored bytes; wakes the eviction job once past the limit.
    pub fn stored(&self, n: u64) {
        let now = self.bytes.fetch_add(n as i64, Ordering::Relaxed) + n as i64;
        if self.max_bytes.is_some_and(|max| now > max as i64) {
            self.evict_now.notify_one();
        }
    }

    /// What an eviction pass empties the store down to.
    pub fn eviction_target(max: u64) -> u64 {
        (max as f64 * LOW_WATERMARK) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_eviction_once_past_the_limit() {
        let b = Budget::new(Some(1000), 0);
        b.stored(1000);
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(20), b.evict_now.notified())
                .await;
        assert!(quiet.is_err(), "woke eviction at the limit");
        b.stored(1);
        tokio::time::timeout(
            std::time::Duration::from_millis(200),
            b.evict_now.notified(),
        )
        .await
        .unwrap();
        assert_eq!(b.bytes(), 1001);
        assert_eq!(Budget::eviction_target(1000), 900);
    }
}
