//! What the server counts: cache hits and misses by kind, coalesced requests and recent activity.
//! Each event updates both the in-process counters (for the status page) and the Prometheus
//! metrics (no-ops unless `--prometheus-enabled`), so the two never disagree.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Narinfo,
    Nar,
    Artifact,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Narinfo => "narinfo",
            Kind::Nar => "nar",
            Kind::Artifact => "artifact",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One line of the status page's recent activity.
#[derive(Clone, Debug)]
pub struct Activity {
    pub at: i64,
    pub action: &'static str,
    pub target: String,
}

const RECENT: usize = 20;

#[derive(Default)]
pub struct Stats {
    hits: [AtomicU64; 3],
    misses: [AtomicU64; 3],
    recent: Mutex<VecDeque<Activity>>,
    /// Failed authentications not yet audited one by one (see [`crate::auth::AuthFailures`]).
    pub(crate) auth_failures: crate::auth::AuthFailures,
}

impl Stats {
    pub fn hit(&self, kind: Kind) {
        self.hits[kind.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("nip_cache_hits_total", "kind" => kind.as_str()).increment(1);
    }

    pub fn miss(&self, kind: Kind) {
        self.misses[kind.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("nip_cache_misses_total", "kind" => kind.as_str()).increment(1);
    }

    pub fn coalesced(&self, kind: Kind) {
        metrics::counter!("nip_coalesced_requests_total", "kind" => kind.as_str()).increment(1);
    }

    pub fn activity(&self, action: &'static str, target: impl Into<String>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_back();
        }
        recent.push_front(Activity {
            at: nip_store::unix_now(),
            action,
            target: target.into(),
        });
    }

    pub fn recent(&self) -> Vec<Activity> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// (hits, misses) over all kinds.
    pub fn totals(&self) -> (u64, u64) {
        let sum = |a: &[AtomicU64; 3]| a.iter().map(|x| x.load(Ordering::Relaxed)).sum();
        (sum(&self.hits), sum(&self.misses))
    }

    pub fn by_kind(&self, kind: Kind) -> (u64, u64) {
        (
            self.hits[kind.index()].load(Ordering::Relaxed),
            self.misses[kind.index()].load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_keeps_the_latest_activity_first() {
        let s = Stats::default();
        s.hit(Kind::Nar);
        s.hit(Kind::Narinfo);
        s.miss(Kind::Nar);
        assert_eq!(s.totals(), (2, 1));
        assert_eq!(s.by_kind(Kind::Nar), (1, 1));
        for i in 0..25 {
            s.activity("upload", format!("k{i}"));
        }
        let recent = s.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].target, "k24");
    }
}
