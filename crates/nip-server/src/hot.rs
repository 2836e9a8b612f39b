//! Recently served narinfos kept in memory, so a hit costs no database round trip (narinfo hits
//! are the bulk of a Nix cache's traffic). Bounded in bytes; entries live at most [`HOT_TTL`],
//! which bounds how long another instance's delete or eviction can go unnoticed here. This
//! instance's own writes and evictions drop entries at once.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a narinfo is served from memory before the database is asked again.
pub const HOT_TTL: Duration = Duration::from_secs(30);
/// Memory for narinfo texts (a narinfo is about 0.5–2 KiB: tens of thousands fit).
const HOT_MAX_BYTES: usize = 32 * 1024 * 1024;

#[derive(Default)]
pub struct HotNarinfos {
    inner: Mutex<Hot>,
}

#[derive(Default)]
struct Hot {
    map: HashMap<String, (Arc<str>, Instant)>,
    bytes: usize,
}

impl HotNarinfos {
    pub fn get(&self, hash: &str) -> Option<Arc<str>> {
        let mut hot = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match hot.map.get(hash) {
            Some((text, at)) if at.elapsed() < HOT_TTL => Some(text.clone()),
            Some(_) => {
                hot.remove(hash);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, hash: &str, text: Arc<str>) {
        let cost = hash.len() + text.len();
        let mut hot = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        hot.remove(hash);
        if hot.bytes + cost > HOT_MAX_BYTES {
            // Full: start over rather than track recency on every hit; refilling is cheap.
            hot.map.clear();
            hot.bytes = 0;
        }
        hot.bytes += cost;
        hot.map.insert(hash.to_string(), (text, Instant::now()));
    }

    pub fn forget(&self, hash: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hash);
    }

    pub fn clear(&self) {
        let mut hot = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        hot.map.clear();
        hot.bytes = 0;
    }
}

impl Hot {
    fn remove(&mut self, hash: &str) {
        if let Some((text, _)) = self.map.remove(hash) {
            self.bytes -= hash.len() + text.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_until_forgotten_and_stays_bounded() {
        let hot = HotNarinfos::default();
        assert!(hot.get("a").is_none());
        hot.insert("a", Arc::from("text a"));
        assert_eq!(hot.get("a").as_deref(), Some("text a"));
        hot.insert("a", Arc::from("text a2"));
        assert_eq!(hot.get("a").as_deref(), Some("text a2"));
        hot.forget("a");
        assert!(hot.get("a").is_none());
        let big: Arc<str> = Arc::from("x".repeat(1 << 20));
        for i in 0..100 {
            hot.insert(&format!("h{i}"), big.clone());
        }
        let hot_bytes = hot.inner.lock().unwrap().bytes;
        assert!(hot_bytes <= HOT_MAX_BYTES, "{hot_bytes}");
        assert!(hot.get("h99").is_some(), "the newest entry is kept");
        hot.clear();
        assert!(hot.get("h99").is_none());
    }
}
