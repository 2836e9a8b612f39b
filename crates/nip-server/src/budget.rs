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
    /// Bytes stored since the running eviction pass began: its count of the store may miss them.
    since_pass: AtomicI64,
    pub evict_now: Notify,
}

impl Budget {
    pub fn new(max_bytes: Option<u64>, current: i64) -> Self {
        Budget {
            max_bytes,
            bytes: AtomicI64::new(current),
            since_pass: AtomicI64::new(0),
            evict_now: Notify::new(),
        }
    }

    pub fn bytes(&self) -> i64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn set(&self, bytes: i64) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// An eviction pass begins: bytes stored from now on are added to what it counts.
    pub fn pass_started(&self) {
        self.since_pass.store(0, Ordering::Relaxed);
    }

    /// An eviction pass counted `usage` bytes at its end. Writes during the pass may or may not be
    /// in that count: they are added again, since counting too much only costs one more pass,
    /// while too little would leave the store over its limit until the next scheduled run.
    pub fn pass_finished(&self, usage: i64) {
        let during = self.since_pass.swap(0, Ordering::Relaxed);
        let now = usage + during;
        self.bytes.store(now, Ordering::Relaxed);
        // Only writes the pass may have missed call for another: without them it did what it
        // could (all that is left may be pinned), and waking it again would loop.
        if during > 0 && self.max_bytes.is_some_and(|max| now > max as i64) {
            self.evict_now.notify_one();
        }
    }

    /// Records newly stored bytes; wakes the eviction job once past the limit.
    pub fn stored(&self, n: u64) {
        self.since_pass.fetch_add(n as i64, Ordering::Relaxed);
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
    async fn writes_during_a_pass_are_not_lost() {
        let b = Budget::new(Some(1000), 2000);
        b.pass_started();
        // Stored while the pass counted the store (its count of 800 may not include it).
        b.stored(300);
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(5), b.evict_now.notified()).await;
        b.pass_finished(800);
        assert_eq!(b.bytes(), 1100);
        // Still over the limit: the job is woken for another pass.
        tokio::time::timeout(
            std::time::Duration::from_millis(100),
            b.evict_now.notified(),
        )
        .await
        .expect("no wake-up after a pass that ended over the limit");
        // A pass without writes meanwhile wakes nobody, even over the limit (pinned entries).
        b.pass_started();
        b.pass_finished(1500);
        assert_eq!(b.bytes(), 1500);
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(20), b.evict_now.notified())
                .await;
        assert!(
            quiet.is_err(),
            "woke eviction after a pass that saw no writes"
        );
    }

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
