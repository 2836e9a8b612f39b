//! Keeping the store inside its budget and consistent: least-recently-used eviction (a narinfo
//! goes with its NAR, an artifact's row with its bytes; pinned entries stay) and reconciliation
//! of what a crash left behind (rows without bytes, bytes without rows, half-published files).
//! Used by the server's background job and by `nip admin gc` alike.
use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::blob::{BlobEntry, BlobKey, BlobStore, StoreError, ARTIFACT_PREFIX, NAR_PREFIX};
use crate::index::Index;
use crate::meta::{MetaError, NarRecord};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of stored NARs plus distinct artifact contents.
    pub bytes: i64,
    pub nars: i64,
    pub narinfos: i64,
    pub artifacts: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    /// A stored NAR (with the narinfos that point at it).
    Nar,
    Artifact,
    /// A listing, build log, realisation or debug info file (`id`: `<kind>/<name>`).
    Extra,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub kind: CandidateKind,
    /// NAR file name or artifact key.
    pub id: String,
    pub size: i64,
}

/// An artifact row as the scrub needs it: which bytes it names, and their recorded size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRow {
    pub key: String,
    pub size: i64,
    pub sha256: String,
}

#[async_trait]
pub trait GcIndex: Send + Sync + 'static {
    async fn usage(&self) -> Result<Usage, MetaError>;
    /// Least recently accessed first; pinned entries are never returned.
    async fn eviction_candidates(&self, limit: i64) -> Result<Vec<Candidate>, MetaError>;
    /// Removes a NAR's row with every narinfo and source that points at it, in one transaction,
    /// so no narinfo is left without its NAR. Returns the hashes of the narinfos removed (callers
    /// drop them from in-memory caches).
    async fn evict_nar(&self, nar_file: &str) -> Result<Vec<String>, MetaError>;
    /// Records reads of NARs and narinfos (batched by the caller).
    async fn touch_nix(
        &self,
        nar_files: &[String],
        narinfo_hashes: &[String],
        at: i64,
    ) -> Result<(), MetaError>;
    async fn pin(&self, key: &str, at: i64) -> Result<(), MetaError>;
    /// True when the key was pinned.
    async fn unpin(&self, key: &str) -> Result<bool, MetaError>;
    async fn pins(&self) -> Result<Vec<String>, MetaError>;
    async fn all_nar_files(&self) -> Result<Vec<String>, MetaError>;
    /// (key, sha256) of every artifact.
    async fn all_artifacts(&self) -> Result<Vec<(String, String)>, MetaError>;
    /// Every stored NAR's row (file, size, SHA-256), ordered by file, for the scrub.
    async fn all_nars(&self) -> Result<Vec<NarRecord>, MetaError>;
    /// Every artifact's key, size and SHA-256, ordered by SHA-256 then key, for the scrub.
    async fn all_artifact_rows(&self) -> Result<Vec<ArtifactRow>, MetaError>;
    /// Keys of the artifacts whose bytes are `sha256` (hex).
    async fn artifact_keys_with_sha256(&self, sha256: &str) -> Result<Vec<String>, MetaError>;
    /// Narinfos uploaded by clients whose NAR is not stored (they cannot be refetched).
    async fn orphan_uploaded_narinfos(&self) -> Result<Vec<String>, MetaError>;
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvictionSummary {
    pub nars: u64,
    pub narinfos: u64,
    pub artifacts: u64,
    /// Listings, build logs, realisations and debug info files.
    pub extras: u64,
    pub bytes: i64,
    pub usage_after: i64,
}

/// The NAR files a pin keeps: a pinned narinfo's and, transitively, those of every path it
/// references (ncps' closure pins), as far as this cache holds their narinfos.
pub async fn pinned_closure_nars<I: Index + ?Sized>(
    index: &I,
) -> Result<HashSet<String>, MetaError> {
    let mut queue = index.pins().await?;
    let mut visited: HashSet<String> = queue.iter().cloned().collect();
    let mut nars = HashSet::new();
    while let Some(hash) = queue.pop() {
        // A pin of an artifact key names no narinfo.
        let Some(rec) = index.get_narinfo(&hash).await? else {
            continue;
        };
        nars.insert(rec.nar_file);
        let Ok(info) = nip_core::narinfo::NarInfo::parse(&rec.narinfo) else {
            continue;
        };
        for r in &info.references {
            let h = r.hash().as_str();
            if !visited.contains(h) {
                visited.insert(h.to_string());
                queue.push(h.to_string());
            }
        }
    }
    Ok(nars)
}

/// Candidates asked for at a time.
const BATCH: i64 = 256;

/// Evicts least recently used entries until usage is at most `max_bytes`; pinned artifacts and
/// pinned closures stay. With `dry_run` nothing is deleted and the summary says what would be.
pub async fn evict<I: Index + ?Sized>(
    index: &I,
    blobs: &dyn BlobStore,
    max_bytes: u64,
    dry_run: bool,
) -> Result<EvictionSummary, GcError> {
    let mut usage = index.usage().await?.bytes;
    let mut summary = EvictionSummary::default();
    let mut seen = HashSet::new();
    if usage <= max_bytes as i64 {
        summary.usage_after = usage;
        return Ok(summary);
    }
    let protected = pinned_closure_nars(index).await?;
    let mut limit = BATCH;
    while usage > max_bytes as i64 {
        let batch = index.eviction_candidates(limit).await?;
        let full = batch.len() as i64 == limit;
        let mut kept = 0;
        let fresh: Vec<_> = batch
            .into_iter()
            .filter(|c| {
                let pinned = c.kind == CandidateKind::Nar && protected.contains(&c.id);
                kept += i64::from(pinned);
                !pinned && seen.insert((c.kind.clone(), c.id.clone()))
            })
            .collect();
        // Pinned closures stay at the front of the LRU order: look past them.
        limit = limit.max(BATCH + kept);
        if fresh.is_empty() {
            if full && kept > 0 && !dry_run {
                limit += BATCH;
                continue;
            }
            break;
        }
        for c in fresh {
            if usage <= max_bytes as i64 {
                break;
            }
            match c.kind {
                CandidateKind::Nar => {
                    if !dry_run {
                        summary.narinfos += index.evict_nar(&c.id).await?.len() as u64;
                        blobs.delete(&BlobKey::nar(&c.id)?).await?;
                    }
                    summary.nars += 1;
                }
                CandidateKind::Artifact => {
                    if !dry_run {
                        if let Some((rec, shared)) = index.delete_artifact(&c.id).await? {
                            if !shared {
                                blobs.delete(&BlobKey::artifact(&rec.sha256)?).await?;
                            }
                        }
                    }
                    summary.artifacts += 1;
                }
                CandidateKind::Extra => {
                    if !dry_run {
                        let parsed = c.id.split_once('/').and_then(|(k, name)| {
                            crate::extras::ExtraKind::parse(k).map(|k| (k, name))
                        });
                        if let Some((kind, name)) = parsed {
                            if let Some(rec) = index.delete_extra(kind, name).await? {
                                blobs.delete(&rec.blob_key()?).await?;
                            }
                        }
                    }
                    summary.extras += 1;
                }
            }
            usage -= c.size;
            summary.bytes += c.size;
        }
        if dry_run {
            // Nothing changes between batches in a dry run: one batch is all we can look at.
            break;
        }
    }
    summary.usage_after = usage;
    Ok(summary)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileSummary {
    pub rows_without_bytes: u64,
    pub bytes_without_rows: u64,
    pub partial_files: u64,
    /// Half-published files changed within the grace asked for: perhaps a live writer's, left.
    pub young_partial_files: u64,
}

impl ReconcileSummary {
    /// What was (or, in a dry run, would be) removed.
    pub fn total(&self) -> u64 {
        self.rows_without_bytes + self.bytes_without_rows + self.partial_files
    }
}

/// Files changed within this are left alone: another instance may be between publishing the bytes
/// and committing the row, and a half-published file may be a running server's fill or upload,
/// which changes it as it writes.
pub const GRACE: Duration = Duration::from_secs(600);

/// Deletes listed blobs that no row references (once unchanged for [`GRACE`]) and half-published
/// files (names starting with `.`; once unchanged for `partial_grace`).
async fn sweep(
    blobs: &dyn BlobStore,
    listed: &[BlobEntry],
    prefix: &str,
    referenced: impl Fn(&str) -> bool,
    partial_grace: Duration,
    dry_run: bool,
    s: &mut ReconcileSummary,
) -> Result<(), GcError> {
    let now = SystemTime::now();
    let unchanged_for = |m: Option<SystemTime>, grace: Duration| {
        m.and_then(|m| now.duration_since(m).ok())
            .is_none_or(|age| age >= grace)
    };
    for b in listed {
        let name = b
            .key
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(&b.key);
        if name.starts_with('.') {
            // A fill or upload of this or another instance may be writing it right now.
            if !unchanged_for(b.modified, partial_grace) {
                s.young_partial_files += 1;
                continue;
            }
            s.partial_files += 1;
        } else if !referenced(name) && unchanged_for(b.modified, GRACE) {
            s.bytes_without_rows += 1;
        } else {
            continue;
        }
        if !dry_run {
            blobs.delete(&BlobKey::new(b.key.clone())?).await?;
        }
    }
    Ok(())
}

/// The names of the blobs listed under `prefix` (the key without `prefix/`).
fn names_under(listed: &[BlobEntry], prefix: &str) -> HashSet<String> {
    listed
        .iter()
        .filter_map(|b| {
            b.key
                .strip_prefix(prefix)?
                .strip_prefix('/')
                .map(String::from)
        })
        .collect()
}

/// Finds and removes what a crash can leave: index rows whose bytes are gone, stored bytes that no
/// row references, and half-published files. `partial_grace`: how long a half-published file must
/// be unchanged to go; zero at a server's start (any is a crash's), [`GRACE`] when a server may be
/// running and writing them (`nip admin gc`).
pub async fn reconcile<I: Index + ?Sized>(
    index: &I,
    blobs: &dyn BlobStore,
    partial_grace: Duration,
    dry_run: bool,
) -> Result<ReconcileSummary, GcError> {
    let mut s = ReconcileSummary::default();

    let nar_rows: HashSet<String> = index.all_nar_files().await?.into_iter().collect();
    let nar_blobs = blobs.list(NAR_PREFIX).await?;
    let stored_nars = names_under(&nar_blobs, NAR_PREFIX);
    for file in nar_rows.difference(&stored_nars) {
        s.rows_without_bytes += 1;
        if !dry_run {
            index.delete_nar(file).await?;
        }
    }
    for hash in index.orphan_uploaded_narinfos().await? {
        s.rows_without_bytes += 1;
        if !dry_run {
            index.delete_narinfo(&hash).await?;
        }
    }
    sweep(
        blobs,
        &nar_blobs,
        NAR_PREFIX,
        |name| nar_rows.contains(name),
        partial_grace,
        dry_run,
        &mut s,
    )
    .await?;

    let artifacts = index.all_artifacts().await?;
    let art_blobs = blobs.list(ARTIFACT_PREFIX).await?;
    let stored = names_under(&art_blobs, ARTIFACT_PREFIX);
    let referenced: HashSet<&str> = artifacts.iter().map(|(_, sha)| sha.as_str()).collect();
    for (key, sha) in &artifacts {
        if !stored.contains(sha) {
            s.rows_without_bytes += 1;
            if !dry_run {
                index.delete_artifact(key).await?;
            }
        }
    }
    sweep(
        blobs,
        &art_blobs,
        ARTIFACT_PREFIX,
        |name| referenced.contains(name),
        partial_grace,
        dry_run,
        &mut s,
    )
    .await?;

    let extras = index.all_extras().await?;
    for kind in crate::extras::ExtraKind::ALL {
        let prefix = kind.blob_prefix();
        let listed = blobs.list(prefix).await?;
        let stored = names_under(&listed, prefix);
        let mut referenced = HashSet::new();
        for (_, name, sha) in extras.iter().filter(|(k, _, _)| *k == kind) {
            let blob = kind.blob_name(name, sha);
            if !stored.contains(&blob) {
                s.rows_without_bytes += 1;
                if !dry_run {
                    index.delete_extra(kind, name).await?;
                }
            }
            referenced.insert(blob);
        }
        sweep(
            blobs,
            &listed,
            prefix,
            |name| referenced.contains(name),
            partial_grace,
            dry_run,
            &mut s,
        )
        .await?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ArtifactIndex, ArtifactRecord};
    use crate::meta::{MetaStore, NarInfoRecord};
    use crate::{LocalBlobStore, SqliteMeta, Staging};

    struct Fx {
        _dir: tempfile::TempDir,
        _t: Option<tempfile::TempDir>,
        db: SqliteMeta,
        blobs: LocalBlobStore,
        staging: Staging,
    }

    async fn fx_all() -> Vec<Fx> {
        let mut out = Vec::new();
        for t in crate::testdb::all().await {
            let dir = tempfile::tempdir().unwrap();
            let blobs = LocalBlobStore::new(dir.path().join("store")).unwrap();
            let staging = Staging::new(dir.path().join("tmp")).unwrap();
            let (db, keep) = t.into_parts();
            out.push(Fx {
                _dir: dir,
                db,
                _t: keep,
                blobs,
                staging,
            });
        }
        out
    }

    async fn put_blob(f: &Fx, key: &str, size: usize) {
        let staged = f.staging.create().await.unwrap();
        staged
            .append(bytes::Bytes::from(vec![1u8; size]))
            .await
            .unwrap();
        f.blobs
            .put_file(&BlobKey::new(key).unwrap(), staged.path())
            .await
            .unwrap();
    }

    /// A narinfo and its stored NAR, last read at `at`.
    async fn nix_entry(f: &Fx, hash: &str, size: usize, at: i64) {
        let file = format!("{hash}.nar");
        put_blob(f, &format!("nar/{file}"), size).await;
        let rec = NarInfoRecord {
            hash: hash.into(),
            store_path: format!("/nix/store/{hash}-x"),
            nar_file: file.clone(),
            file_size: Some(size as i64),
            file_hash: None,
            nar_hash: "sha256:x".into(),
            narinfo: "x".into(),
            origin: "upload".into(),
            signed_by: None,
            uploaded_by: None,
        };
        f.db.put_narinfo(&rec, &[]).await.unwrap();
        f.db.put_nar(&NarRecord {
            nar_file: file.clone(),
            size: size as i64,
            sha256: "00".into(),
        })
        .await
        .unwrap();
        sqlx::query(
            &f.db
                .sql("UPDATE nars SET last_accessed_at = $1 WHERE nar_file = $2"),
        )
        .bind(at)
        .bind(&file)
        .execute(f.db.pool())
        .await
        .unwrap();
    }

    async fn artifact(f: &Fx, key: &str, size: usize, at: i64) {
        let sha = format!("{key}sha");
        put_blob(f, &format!("artifacts/{sha}"), size).await;
        let rec = ArtifactRecord {
            key: key.into(),
            size: size as i64,
            sha256: sha,
            metadata: "{}".into(),
            created_at: at,
        };
        f.db.put_artifact(&rec, None, None).await.unwrap();
    }

    #[tokio::test]
    async fn evicts_least_recently_used_first_keeping_pins_and_pairs() {
        for f in fx_all().await {
            nix_entry(&f, "aaa", 100, 1).await; // oldest, but pinned
            artifact(&f, "old-artifact", 100, 2).await;
            nix_entry(&f, "bbb", 100, 3).await;
            nix_entry(&f, "ccc", 100, 4).await;
            artifact(&f, "new-artifact", 100, 5).await;
            f.db.pin("aaa", 0).await.unwrap();
            assert_eq!(f.db.usage().await.unwrap().bytes, 500);

            let dry = evict(&f.db, &f.blobs, 300, true).await.unwrap();
            assert_eq!((dry.nars, dry.artifacts, dry.usage_after), (1, 1, 300));
            assert_eq!(
                f.db.usage().await.unwrap().bytes,
                500,
                "dry run deleted something"
            );

            let s = evict(&f.db, &f.blobs, 300, false).await.unwrap();
            assert_eq!(
                (s.nars, s.narinfos, s.artifacts, s.usage_after),
                (1, 1, 1, 300)
            );
            assert!(
                f.db.get_narinfo("aaa").await.unwrap().is_some(),
                "pinned entry evicted"
            );
            assert!(f.db.get_artifact("old-artifact").await.unwrap().is_none());
            assert!(
                f.db.get_narinfo("bbb").await.unwrap().is_none(),
                "narinfo left without its NAR"
            );
            assert!(f
                .blobs
                .stat(&BlobKey::new("nar/bbb.nar").unwrap())
                .await
                .unwrap()
                .is_none());
            assert!(f.db.get_narinfo("ccc").await.unwrap().is_some());
            assert!(f.db.get_artifact("new-artifact").await.unwrap().is_some());
            // Everything left is pinned or under the budget: nothing more to do.
            let s = evict(&f.db, &f.blobs, 0, false).await.unwrap();
            assert_eq!(s.usage_after, 100, "only the pinned entry stays");
        }
    }

    /// A store path hash made from a number (nix-base32 digits).
    fn path_hash(n: usize) -> String {
        const DIGITS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let mut out = vec![b'0'; 32];
        let (mut n, mut i) = (n, 31);
        while n > 0 {
            out[i] = DIGITS[n % 32];
            (n, i) = (n / 32, i - 1);
        }
        String::from_utf8(out).unwrap()
    }

    /// Gives a stored narinfo these references.
    async fn set_references(f: &Fx, hash: &str, refs: &[String]) {
        let refs: Vec<String> = refs.iter().map(|h| format!("{h}-dep")).collect();
        let text = format!(
            "StorePath: /nix/store/{hash}-x\nURL: nar/{hash}.nar\nCompression: none\nNarHash: sha256:{}\nNarSize: 1\nReferences: {}\n",
            "0".repeat(52),
            refs.join(" ")
        );
        sqlx::query(&f.db.sql("UPDATE narinfos SET narinfo = $1 WHERE hash = $2"))
            .bind(text)
            .bind(hash)
            .execute(f.db.pool())
            .await
            .unwrap();
    }

    /// A pinned narinfo keeps its whole closure, however far back in the LRU order it is (more
    /// entries than one batch of candidates), and unpinned entries still go.
    #[tokio::test]
    async fn a_pin_keeps_the_whole_closure() {
        for f in fx_all().await {
            let root = path_hash(1);
            let deps: Vec<String> = (2..300).map(path_hash).collect();
            for (i, d) in deps.iter().enumerate() {
                nix_entry(&f, d, 10, i as i64).await;
            }
            let grandchild = path_hash(400);
            nix_entry(&f, &grandchild, 10, 1).await;
            set_references(&f, &deps[5], std::slice::from_ref(&grandchild)).await;
            nix_entry(&f, &root, 10, 1000).await;
            set_references(&f, &root, &deps).await;
            let loose = path_hash(500);
            nix_entry(&f, &loose, 10, 0).await; // the oldest
            let newest = path_hash(501);
            nix_entry(&f, &newest, 10, 2000).await;
            f.db.pin(&root, 0).await.unwrap();
            let kept = 10 * (deps.len() as i64 + 2);
            let s = evict(&f.db, &f.blobs, kept as u64, false).await.unwrap();
            assert_eq!((s.nars, s.usage_after), (2, kept));
            for h in deps.iter().chain([&root, &grandchild]) {
                assert!(f.db.get_narinfo(h).await.unwrap().is_some(), "{h} evicted");
            }
            assert!(f.db.get_narinfo(&loose).await.unwrap().is_none());
            assert!(f.db.get_narinfo(&newest).await.unwrap().is_none());
            // Unpinned, the closure is an ordinary LRU entry again.
            assert!(f.db.unpin(&root).await.unwrap());
            let s = evict(&f.db, &f.blobs, 0, false).await.unwrap();
            assert_eq!(s.usage_after, 0);
        }
    }

    #[tokio::test]
    async fn access_times_are_recorded_in_batches() {
        for f in fx_all().await {
            nix_entry(&f, "aaa", 10, 1).await;
            nix_entry(&f, "bbb", 10, 2).await;
            nix_entry(&f, "ccc", 10, 3).await;
            artifact(&f, "art-old", 10, 4).await;
            artifact(&f, "art-new", 10, 5).await;
            let order = || async {
                let c = f.db.eviction_candidates(10).await.unwrap();
                c.into_iter().map(|c| c.id).collect::<Vec<_>>()
            };
            assert_eq!(
                order().await,
                ["aaa.nar", "bbb.nar", "ccc.nar", "art-old", "art-new"]
            );
            // More keys than one statement takes, most of them unknown.
            let mut keys: Vec<String> = (0..2500).map(|i| format!("nope-{i}")).collect();
            keys.push("art-old".into());
            f.db.touch_artifacts(&keys, 100).await.unwrap();
            // A NAR read directly, and one read only through its narinfo.
            f.db.touch_nix(&["aaa.nar".into()], &["bbb".into(), "zzz".into()], 101)
                .await
                .unwrap();
            assert_eq!(
                order().await,
                ["ccc.nar", "art-new", "art-old", "aaa.nar", "bbb.nar"]
            );
            // An older time never moves an entry back.
            f.db.touch_nix(&["aaa.nar".into()], &[], 50).await.unwrap();
            f.db.touch_artifacts(&[], 50).await.unwrap();
            assert_eq!(
                order().await,
                ["ccc.nar", "art-new", "art-old", "aaa.nar", "bbb.nar"]
            );
        }
    }

    #[tokio::test]
    async fn reconcile_removes_what_a_crash_left() {
        for f in fx_all().await {
            nix_entry(&f, "good", 10, 1).await;
            nix_entry(&f, "lost", 10, 1).await;
            std::fs::remove_file(f.blobs.root().join("nar/lost.nar")).unwrap();
            artifact(&f, "art", 10, 1).await;
            artifact(&f, "gone", 10, 1).await;
            std::fs::remove_file(f.blobs.root().join("artifacts/gonesha")).unwrap();
            // Bytes without rows (old enough to be leftovers) and a half-published file.
            let stray = f.blobs.root().join("nar/stray.nar");
            std::fs::write(&stray, b"x").unwrap();
            let old = std::time::SystemTime::now() - Duration::from_secs(3600);
            std::fs::File::options()
                .write(true)
                .open(&stray)
                .unwrap()
                .set_modified(old)
                .unwrap();
            let partial = f.blobs.root().join("artifacts/.publish-x");
            std::fs::write(&partial, b"x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&partial)
                .unwrap()
                .set_modified(old)
                .unwrap();
            // A young stray file may belong to an upload in progress elsewhere, and a young
            // half-published one to a fill writing it now: both left alone.
            std::fs::write(f.blobs.root().join("artifacts/young"), b"x").unwrap();
            let writing = f.blobs.root().join("nar/.publish-live");
            std::fs::write(&writing, b"x").unwrap();

            // As `nip admin gc` runs it, beside a server that may be writing.
            let s = reconcile(&f.db, &f.blobs, GRACE, false).await.unwrap();
            assert_eq!(
                s,
                ReconcileSummary {
                    rows_without_bytes: 3,
                    bytes_without_rows: 1,
                    partial_files: 1,
                    young_partial_files: 1,
                }
            );
            assert!(!partial.exists());
            assert!(writing.exists());
            assert!(f.db.get_narinfo("lost").await.unwrap().is_none());
            assert!(f.db.get_narinfo("good").await.unwrap().is_some());
            assert!(f.db.get_artifact("gone").await.unwrap().is_none());
            assert!(f.db.get_artifact("art").await.unwrap().is_some());
            assert!(!stray.exists());
            assert!(f.blobs.root().join("artifacts/young").exists());
            assert_eq!(
                reconcile(&f.db, &f.blobs, GRACE, false)
                    .await
                    .unwrap()
                    .total(),
                0
            );
            // At a server's start every half-published file is a crash's.
            let s = reconcile(&f.db, &f.blobs, Duration::ZERO, false)
                .await
                .unwrap();
            assert_eq!(
                (s.partial_files, s.young_partial_files, s.total()),
                (1, 0, 1)
            );
            assert!(!writing.exists());
        }
    }
}
