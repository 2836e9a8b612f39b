//! Recently served index entries kept in memory, so a hit costs no database round trip: narinfos
//! (the bulk of a Nix cache's traffic), `/v1` artifact lookups and API keys. Bounded in bytes; an entry
//! lives at most its cache's time to live, which bounds how long another instance's delete or
//! eviction can go unnoticed here. This instance's own writes and evictions drop entries at once.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nip_store::{ApiKeyRecord, ArtifactRecord};

/// How long a narinfo is served from memory before the database is asked again.
pub const NARINFO_TTL: Duration = Duration::from_secs(30);
/// Artifact lookups: shorter, since a lookup that outlives a delete elsewhere sends the client to
/// a download that then answers 404 (downloads always ask the database).
pub const ARTIFACT_TTL: Duration = Duration::from_secs(5);
/// Memory for each cache's entries (a narinfo is about 0.5–2 KiB: tens of thousands fit).
const HOT_MAX_BYTES: usize = 32 * 1024 * 1024;

/// What an entry costs in memory, roughly.
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Arc<str> {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weigh for () {
    fn weight(&self) -> usize {
        32
    }
}

impl Weigh for ArtifactRecord {
    fn weight(&self) -> usize {
        64 + self.key.len() + self.sha256.len() + self.metadata.len()
    }
}

/// A looked-up API key, or the answer that there is none.
impl Weigh for Option<ApiKeyRecord> {
    fn weight(&self) -> usize {
        64 + self.as_ref().map_or(0, |k| {
            k.name.len() + k.scope.len() + k.prefix.as_ref().map_or(0, String::len)
        })
    }
}

pub struct Hot<V> {
    ttl: Duration,
    max_bytes: usize,
    inner: Mutex<Entries<V>>,
    /// Moves on every forget or clear: a value read from the database before a write must not
    /// be stored after the write dropped the old one.
    generation: AtomicU64,
}

pub type HotNarinfos = Hot<Arc<str>>;
pub type HotArtifacts = Hot<ArtifactRecord>;
/// NAR files known to have a row: a hit skips the database and only opens the file (which
/// tells whether the bytes are still there).
pub type HotNars = Hot<()>;

struct Entries<V> {
    map: HashMap<String, (V, Instant)>,
    bytes: usize,
}

impl<V: Clone + Weigh> Hot<V> {
    pub fn new(ttl: Duration) -> Self {
        Self::with_max_bytes(ttl, HOT_MAX_BYTES)
    }

    pub fn with_max_bytes(ttl: Duration, max_bytes: usize) -> Self {
        Hot {
            ttl,
            max_bytes,
            inner: Mutex::new(Entries {
                map: HashMap::new(),
                bytes: 0,
            }),
            generation: AtomicU64::new(0),
        }
    }

    /// Take this before reading the database; give it back to [`Hot::insert`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<V>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<V> {
        let mut hot = self.lock();
        match hot.map.get(key) {
            Some((v, at)) if at.elapsed() < self.ttl => Some(v.clone()),
            Some(_) => {
                hot.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `v`, read from the database when the generation was `seen`, unless something was
    /// forgotten since (then `v` may be what a concurrent write replaced or deleted).
    pub fn insert(&self, key: &str, v: V, seen: u64) {
        let cost = key.len() + v.weight();
        let mut hot = self.lock();
        if self.generation.load(Ordering::SeqCst) != seen {
            return;
        }
        hot.remove(key);
        if hot.bytes + cost > self.max_bytes {
            // Full: start over rather than track recency on every hit; refilling is cheap.
            hot.map.clear();
            hot.bytes = 0;
        }
        hot.bytes += cost;
        hot.map.insert(key.to_string(), (v, Instant::now()));
    }

    pub fn forget(&self, key: &str) {
        let mut hot = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        hot.remove(key);
    }

    pub fn clear(&self) {
        let mut hot = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        hot.map.clear();
        hot.bytes = 0;
    }
}

impl<V: Weigh> Entries<V> {
    fn remove(&mut self, key: &str) {
        if let Some((v, _)) = self.map.remove(key) {
            self.bytes -= key.len() + v.weight();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_until_forgotten_or_expired_and_stays_bounded() {
        let hot = HotNarinfos::new(NARINFO_TTL);
        assert!(hot.get("a").is_none());
        hot.insert("a", Arc::from("text a"), hot.generation());
        assert_eq!(hot.get("a").as_deref(), Some("text a"));
        hot.insert("a", Arc::from("text a2"), hot.generation());
        assert_eq!(hot.get("a").as_deref(), Some("text a2"));
        hot.forget("a");
        assert!(hot.get("a").is_none());
        let big: Arc<str> = Arc::from("x".repeat(1 << 20));
        for i in 0..100 {
            hot.insert(&format!("h{i}"), big.clone(), hot.generation());
        }
        let hot_bytes = hot.lock().bytes;
        assert!(hot_bytes <= HOT_MAX_BYTES, "{hot_bytes}");
        assert!(hot.get("h99").is_some(), "the newest entry is kept");
        hot.clear();
        assert!(hot.get("h99").is_none());

        let short = HotNarinfos::new(Duration::from_millis(20));
        short.insert("b", Arc::from("text b"), short.generation());
        std::thread::sleep(Duration::from_millis(30));
        assert!(short.get("b").is_none(), "served after its time to live");
        assert_eq!(short.lock().bytes, 0);

        // A value read before a concurrent write's forget is not kept.
        let seen = short.generation();
        short.forget("c");
        short.insert("c", Arc::from("stale"), seen);
        assert!(
            short.get("c").is_none(),
            "stale value stored after a forget"
        );
    }
}
