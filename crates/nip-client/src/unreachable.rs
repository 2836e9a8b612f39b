//! Servers found unreachable, remembered for a short while across runs in
//! `$XDG_CACHE_HOME/nip/unreachable.json` (`{"<url>": {"at": <unix seconds>, "reason": …}}`), so a loop of builds
//! against a dead remote pays the lookup deadline once, not once per build. Best effort: a file
//! that cannot be read or written only means asking the server again.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a server found unreachable is skipped by `nip build`.
pub const REMEMBER: Duration = Duration::from_secs(60);

pub struct Unreachable {
    path: PathBuf,
}

/// When a server was found unreachable, and why (shown when a later run skips it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Entry {
    Full {
        at: u64,
        reason: String,
    },
    /// Written by earlier versions: a time only.
    At(u64),
}

impl Entry {
    fn at(&self) -> u64 {
        match self {
            Entry::Full { at, .. } | Entry::At(at) => *at,
        }
    }
}

impl Unreachable {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn read(&self) -> BTreeMap<String, Entry> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write(&self, all: &BTreeMap<String, Entry>) {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if all.is_empty() {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        // Renamed into place: concurrent builds never read half a file.
        let _ = std::fs::create_dir_all(dir).and_then(|()| {
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            serde_json::to_writer(&mut tmp, all)?;
            tmp.persist(&self.path).map(drop).map_err(|e| e.error)
        });
    }

    /// Servers found unreachable within `REMEMBER` before `now`, with how long ago and why.
    pub fn recent(&self, now: u64) -> BTreeMap<String, (Duration, String)> {
        self.read()
            .into_iter()
            .filter_map(|(url, e)| {
                let ago = Duration::from_secs(now.checked_sub(e.at())?);
                let reason = match e {
                    Entry::Full { reason, .. } => reason,
                    Entry::At(_) => String::new(),
                };
                (ago < REMEMBER).then_some((url, (ago, reason)))
            })
            .collect()
    }

    /// Remembers `url` as unreachable at `now` for `reason`, dropping entries that have expired.
    pub fn note(&self, url: &str, now: u64, reason: &str) {
        let mut all = self.read();
        all.retain(|_, e| now.saturating_sub(e.at()) < REMEMBER.as_secs());
        all.insert(
            url.to_string(),
            Entry::Full {
                at: now,
                reason: reason.to_string(),
            },
        );
        self.write(&all);
    }

    /// Forgets every server (the configuration changed).
    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Forgets `url` (it answered).
    pub fn forget(&self, url: &str) {
        let mut all = self.read();
        if all.remove(url).is_some() {
            self.write(&all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_for_a_while_then_forgotten() {
        let t = tempfile::tempdir().unwrap();
        let u = Unreachable::new(t.path().join("sub/unreachable.json"));
        assert!(u.recent(1000).is_empty());
        u.note("http://a", 1000, "connection refused");
        u.note("http://b", 1010, "TLS: unknown CA");
        assert_eq!(
            u.recent(1030).into_iter().collect::<Vec<_>>(),
            [
                (
                    "http://a".to_string(),
                    (Duration::from_secs(30), "connection refused".to_string())
                ),
                (
                    "http://b".to_string(),
                    (Duration::from_secs(20), "TLS: unknown CA".to_string())
                )
            ]
        );
        assert_eq!(u.recent(1065).len(), 1, "a expired, b not yet");
        u.forget("http://b");
        assert!(u.recent(1065).is_empty());
        // Nothing left: no file either.
        u.forget("http://a");
        assert!(!t.path().join("sub/unreachable.json").exists());
        // An earlier version's file (times only) still reads.
        std::fs::write(
            t.path().join("sub/unreachable.json"),
            r#"{"http://c": 1000}"#,
        )
        .unwrap();
        assert_eq!(u.recent(1001)["http://c"].0, Duration::from_secs(1));
        // A corrupt file is an empty list.
        std::fs::write(t.path().join("sub/unreachable.json"), "{oops").unwrap();
        assert!(u.recent(1000).is_empty());
    }
}
