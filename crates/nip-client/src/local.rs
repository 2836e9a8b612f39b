//! The local binary cache, `$XDG_CACHE_HOME/nip/binary-cache/`: `<key>.tar.zst` plus `<key>.json`
//! (the metadata, written last, so its presence means the artifact is complete).
use crate::error::{io_ctx, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Artifact metadata: stored beside the archive and uploaded as the `metadata` part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    pub version: String,
    pub variants: Vec<String>,
    pub key: String,
    pub platform: String,
    pub sha256: String,
    pub size: u64,
    /// Seconds the build command took: what a cache hit saves.
    pub build_duration_secs: f64,
    pub builder_host: String,
    /// RFC 3339, UTC.
    pub created: String,
}

pub struct LocalCache {
    dir: PathBuf,
}

impl LocalCache {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn artifact_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.tar.zst"))
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The metadata of a complete local artifact, or `None`.
    pub fn get(&self, key: &str) -> Option<Metadata> {
        let text = std::fs::read(self.meta_path(key)).ok()?;
        let meta: Metadata = serde_json::from_slice(&text).ok()?;
        self.artifact_path(key).is_file().then_some(meta)
    }

    /// Moves a verified temp file into place, then writes the metadata (both atomic renames).
    pub fn insert(&self, file: tempfile::NamedTempFile, meta: &Metadata) -> Result<PathBuf> {
        let dest = self.artifact_path(&meta.key);
        file.persist(&dest)
            .map_err(|e| io_ctx(format!("store {}", dest.display()))(e.error))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(io_ctx(format!("create a file in {}", self.dir.display())))?;
        serde_json::to_writer_pretty(&mut tmp, meta)
            .map_err(|e| io_ctx(format!("write metadata for {}", meta.key))(e.into()))?;
        let mp = self.meta_path(&meta.key);
        tmp.persist(&mp)
            .map_err(|e| io_ctx(format!("store {}", mp.display()))(e.error))?;
        Ok(dest)
    }

    /// Removes an artifact (e.g. found corrupt); missing files are fine.
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.meta_path(key));
        let _ = std::fs::remove_file(self.artifact_path(key));
    }

    /// Every complete artifact, newest first.
    pub fn list(&self) -> Vec<Metadata> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut all: Vec<Metadata> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let key = name.strip_suffix(".json")?;
                self.get(key)
            })
            .collect();
        all.sort_by(|a, b| b.created.cmp(&a.created).then(a.key.cmp(&b.key)));
        all
    }

    /// Bytes used by archives and metadata.
    pub fn size(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, created: &str) -> Metadata {
        Metadata {
            name: "hello".into(),
            version: "1.0".into(),
            variants: vec![],
            key: key.into(),
            platform: "linux-x86_64".into(),
            sha256: "00".into(),
            size: 3,
            build_duration_secs: 1.5,
            builder_host: "h".into(),
            created: created.into(),
        }
    }

    #[test]
    fn insert_get_list_remove() {
        let t = tempfile::tempdir().unwrap();
        let c = LocalCache::new(t.path().to_path_buf());
        for (k, at) in [("a", "2020-01-01T00:00:00Z"), ("b", "2021-01-01T00:00:00Z")] {
            let mut f = tempfile::NamedTempFile::new_in(t.path()).unwrap();
            std::io::Write::write_all(&mut f, b"abc").unwrap();
            c.insert(f, &meta(k, at)).unwrap();
        }
        assert_eq!(c.get("a").unwrap(), meta("a", "2020-01-01T00:00:00Z"));
        let keys: Vec<_> = c.list().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["b", "a"]);
        c.remove("a");
        assert!(c.get("a").is_none());
        assert!(c.size() > 3);
    }
}
