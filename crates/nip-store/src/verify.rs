//! The scrub of the store (ncps calls it `fsck`): every stored NAR and artifact blob is read back
//! and hashed against the size and SHA-256 its row recorded, so bit rot, truncated files and blobs
//! lost behind the index's back are found before a client is served bad bytes. With `repair` the
//! bad entries go, with the narinfos that point at them: a proxied path is fetched again from its
//! upstream on the next request, an uploaded one has to be uploaded again.
//! Used by `nip admin verify` and by the server's scheduled scrub alike.
use std::collections::BTreeMap;

use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::blob::{BlobKey, BlobStore};
use crate::gc::GcError;
use crate::index::Index;

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    Nar,
    Artifact,
    Narinfo,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Nar => "nar",
            EntryKind::Artifact => "artifact",
            EntryKind::Narinfo => "narinfo",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    /// The row is there, its blob is not.
    Missing,
    /// The bytes do not hash to the recorded SHA-256.
    Corrupt,
    /// The blob's size is not the recorded size (truncated or grown).
    SizeMismatch,
    /// A row that points at nothing: an uploaded narinfo whose NAR is not stored.
    OrphanRow,
    /// Reading the blob failed (I/O or network error). Reported but never removed: the bytes may
    /// well be fine once the storage answers again.
    Unreadable,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Missing => "missing",
            Problem::Corrupt => "corrupt",
            Problem::SizeMismatch => "size-mismatch",
            Problem::OrphanRow => "orphan-row",
            Problem::Unreadable => "unreadable",
        }
    }
}

/// One bad entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub kind: EntryKind,
    /// NAR file name, artifact key or narinfo hash.
    pub id: String,
    pub problem: Problem,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_size: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// The read error of an unreadable blob.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the repair removed the entry.
    pub removed: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// NAR rows checked.
    pub nars: u64,
    /// Artifact rows checked (keys sharing bytes are each counted; their blob is read once).
    pub artifacts: u64,
    /// Bytes read and hashed.
    pub bytes: u64,
    pub repair: bool,
    pub findings: Vec<Finding>,
    /// Hashes of the narinfos the repair removed (a server drops them from memory).
    pub removed_narinfos: Vec<String>,
    /// Keys of the artifacts the repair removed.
    pub removed_artifacts: Vec<String>,
    /// Why the repair kept the entries found missing (they are still reported): so many blobs
    /// were missing that the storage itself is more likely unavailable (an unmounted network
    /// filesystem, missing S3 settings against a shared database) than the blobs gone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair_skipped: Option<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    pub fn count(&self, problem: Problem) -> usize {
        self.findings
            .iter()
            .filter(|f| f.problem == problem)
            .count()
    }

    /// Findings the repair removed.
    pub fn removed(&self) -> usize {
        self.findings.iter().filter(|f| f.removed).count()
    }

    /// One line for logs and the audit log: what was checked, then [`VerifyReport::problems`].
    pub fn summary(&self) -> String {
        format!(
            "{} NARs, {} artifacts, {} bytes checked: {}",
            self.nars,
            self.artifacts,
            self.bytes,
            self.problems()
        )
    }

    /// Counts per problem and what the repair removed, e.g. `1 corrupt, 2 missing; removed 3
    /// entries (2 narinfos, 1 artifacts)`, or `no problems`; then why missing entries were kept,
    /// if they were ([`VerifyReport::repair_skipped`]).
    pub fn problems(&self) -> String {
        if self.is_clean() {
            return "no problems".into();
        }
        let counts: Vec<String> = [
            Problem::Corrupt,
            Problem::SizeMismatch,
            Problem::Missing,
            Problem::OrphanRow,
            Problem::Unreadable,
        ]
        .iter()
        .filter(|p| self.count(**p) > 0)
        .map(|p| format!("{} {}", self.count(*p), p.as_str()))
        .collect();
        let mut s = counts.join(", ");
        if self.repair {
            s.push_str(&format!(
                "; removed {} entries ({} narinfos, {} artifacts)",
                self.removed(),
                self.removed_narinfos.len(),
                self.removed_artifacts.len()
            ));
        }
        if let Some(why) = &self.repair_skipped {
            s.push_str("; ");
            s.push_str(why);
        }
        s
    }
}

/// The outcome of reading one blob back.
enum Checked {
    Good,
    Missing,
    SizeMismatch(u64),
    Corrupt(String),
    Unreadable(String),
}

/// Streams the blob through SHA-256 (never more than one chunk in memory), calling `on_bytes`
/// with the bytes hashed so far.
async fn check_blob(
    blobs: &dyn BlobStore,
    key: &BlobKey,
    size: i64,
    sha256: &str,
    on_bytes: &mut (dyn FnMut(u64) + Send),
) -> Checked {
    let read = match blobs.read(key, None).await {
        Ok(Some(r)) => r,
        Ok(None) => return Checked::Missing,
        Err(e) => return Checked::Unreadable(e.to_string()),
    };
    // A blob of the wrong size cannot hash right: no need to read it.
    if i64::try_from(read.size).ok() != Some(size) {
        return Checked::SizeMismatch(read.size);
    }
    let mut hasher = Sha256::new();
    let mut body = read.body;
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                hasher.update(&c);
                n += c.len() as u64;
                on_bytes(n);
            }
            Err(e) => return Checked::Unreadable(e.to_string()),
        }
    }
    if i64::try_from(n).ok() != Some(size) {
        return Checked::SizeMismatch(n);
    }
    let actual = hex(&hasher.finalize());
    if actual.eq_ignore_ascii_case(sha256) {
        Checked::Good
    } else {
        Checked::Corrupt(actual)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl Finding {
    /// A finding with nothing measured yet.
    fn new(kind: EntryKind, id: &str, problem: Problem) -> Self {
        Finding {
            kind,
            id: id.to_string(),
            problem,
            expected_sha256: None,
            actual_sha256: None,
            expected_size: None,
            actual_size: None,
            error: None,
            removed: false,
        }
    }
}

/// A finding for a blob whose check failed; `None` when it is good.
fn finding(kind: EntryKind, id: &str, size: i64, sha256: &str, c: &Checked) -> Option<Finding> {
    let mut f = Finding::new(kind, id, Problem::Missing);
    match c {
        Checked::Good => return None,
        Checked::Missing => {}
        Checked::SizeMismatch(actual) => {
            f.problem = Problem::SizeMismatch;
            f.expected_size = Some(size);
            f.actual_size = Some(*actual);
        }
        Checked::Corrupt(actual) => {
            f.problem = Problem::Corrupt;
            f.expected_sha256 = Some(sha256.to_string());
            f.actual_sha256 = Some(actual.clone());
        }
        Checked::Unreadable(e) => {
            f.problem = Problem::Unreadable;
            f.error = Some(e.clone());
        }
    }
    Some(f)
}

/// Whether a failed check is one the repair removes: an unreadable blob is kept.
fn removable(c: &Checked) -> bool {
    matches!(
        c,
        Checked::Missing | Checked::SizeMismatch(_) | Checked::Corrupt(_)
    )
}

/// Progress of the scrub: bytes done of the bytes to check (the recorded sizes).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// Hashes blobs one after another and keeps the progress callback told: each blob moves it by
/// the size its row expects, whatever the blob turned out to be.
struct Meter<'a> {
    progress: Progress<'a>,
    total: u64,
    /// Expected bytes of the blobs already checked.
    base: u64,
    /// Bytes actually read and hashed.
    hashed: u64,
}

impl Meter<'_> {
    async fn check(
        &mut self,
        blobs: &dyn BlobStore,
        key: &BlobKey,
        size: i64,
        sha256: &str,
    ) -> Checked {
        let expected = size.max(0) as u64;
        let (base, total, progress) = (self.base, self.total, self.progress);
        let mut hashed = 0;
        let checked = check_blob(blobs, key, size, sha256, &mut |n| {
            hashed = n;
            progress(base + n.min(expected), total)
        })
        .await;
        self.hashed += hashed;
        self.base += expected;
        progress(self.base, total);
        checked
    }
}

/// Missing blobs past which the repair keeps every entry found missing: more than 10 of them and
/// more than a tenth of the blobs checked.
fn missing_limit(checked: u64) -> u64 {
    (checked / 10).max(10)
}

/// Checks every NAR and artifact blob against its row, and the uploaded narinfos whose NAR is not
/// stored. With `repair`, removes what is bad: a NAR with every narinfo that points at it, an
/// artifact's bytes with the keys that named them when the scrub listed them, orphan narinfos.
/// Unreadable blobs are only reported. Safe while servers run on the same store: an entry removed
/// by them meanwhile is not reported missing, and each blob is checked again right before it is
/// removed, so one refilled or uploaded again meanwhile stays (and is no longer reported).
/// When more blobs are missing than [`missing_limit`] allows, the storage is taken to be
/// unavailable rather than emptied: the missing entries are reported but kept, and
/// [`VerifyReport::repair_skipped`] says so.
pub async fn verify<I: Index + ?Sized>(
    index: &I,
    blobs: &dyn BlobStore,
    repair: bool,
    progress: Progress<'_>,
) -> Result<VerifyReport, GcError> {
    let mut report = VerifyReport {
        repair,
        ..Default::default()
    };
    let nars = index.all_nars().await?;
    // Keys sharing bytes share one blob: read each blob once.
    let mut by_sha: ArtifactBlobs = BTreeMap::new();
    for row in index.all_artifact_rows().await? {
        by_sha
            .entry(row.sha256)
            .or_insert((row.size, Vec::new()))
            .1
            .push(row.key);
    }
    let total: u64 = nars.iter().map(|n| n.size.max(0) as u64).sum::<u64>()
        + by_sha
            .values()
            .map(|(s, _)| (*s).max(0) as u64)
            .sum::<u64>();
    let mut meter = Meter {
        progress,
        total,
        base: 0,
        hashed: 0,
    };
    progress(0, total);
    let mut scrub = Scrub {
        index,
        blobs,
        repair,
        report: &mut report,
        bad: Vec::new(),
        resolved: Vec::new(),
    };
    scrub.nars(&nars, &mut meter).await?;
    scrub.artifacts(&by_sha, &mut meter).await?;
    if repair {
        let checked = (nars.len() + by_sha.len()) as u64;
        scrub.repair(checked).await?;
    }
    scrub.orphan_narinfos().await?;
    scrub.drop_resolved();
    report.bytes = meter.hashed;
    progress(total, total);
    Ok(report)
}

/// Artifact blobs by SHA-256: their size and the keys that name them.
type ArtifactBlobs = BTreeMap<String, (i64, Vec<String>)>;

/// A blob the check found bad, waiting for the repair.
struct Bad<'l> {
    what: BadBlob<'l>,
    /// Whether the check found it missing (the problem the repair may skip).
    missing: bool,
    /// Its findings in the report (one per artifact key).
    findings: Vec<usize>,
}

enum BadBlob<'l> {
    Nar(&'l crate::meta::NarRecord),
    /// SHA-256, size, and the keys that named the bytes when the scrub listed them.
    Artifact(&'l str, i64, &'l [String]),
}

/// One pass of [`verify`]: what it reads, whether it repairs, and what it found so far.
struct Scrub<'a, 'l, I: ?Sized> {
    index: &'a I,
    blobs: &'a dyn BlobStore,
    repair: bool,
    report: &'a mut VerifyReport,
    /// Removable findings' blobs, for the repair once every blob was checked.
    bad: Vec<Bad<'l>>,
    /// Findings the repair found fixed meanwhile (the blob good again, the entry gone): dropped.
    resolved: Vec<usize>,
}

impl<'l, I: Index + ?Sized> Scrub<'_, 'l, I> {
    async fn nars(
        &mut self,
        nars: &'l [crate::meta::NarRecord],
        meter: &mut Meter<'_>,
    ) -> Result<(), GcError> {
        self.report.nars = nars.len() as u64;
        for nar in nars {
            let key = BlobKey::nar(&nar.nar_file)?;
            let checked = meter.check(self.blobs, &key, nar.size, &nar.sha256).await;
            // Removed by eviction or a delete since the listing: not a finding.
            if let Checked::Missing = checked {
                if self.index.get_nar(&nar.nar_file).await?.is_none() {
                    continue;
                }
            }
            let Some(f) = finding(
                EntryKind::Nar,
                &nar.nar_file,
                nar.size,
                &nar.sha256,
                &checked,
            ) else {
                continue;
            };
            if self.repair && removable(&checked) {
                self.bad.push(Bad {
                    what: BadBlob::Nar(nar),
                    missing: matches!(checked, Checked::Missing),
                    findings: vec![self.report.findings.len()],
                });
            }
            self.report.findings.push(f);
        }
        Ok(())
    }

    async fn artifacts(
        &mut self,
        by_sha: &'l ArtifactBlobs,
        meter: &mut Meter<'_>,
    ) -> Result<(), GcError> {
        for (sha256, (size, keys)) in by_sha {
            self.report.artifacts += keys.len() as u64;
            let key = BlobKey::artifact(sha256)?;
            let checked = meter.check(self.blobs, &key, *size, sha256).await;
            if let Checked::Good = checked {
                continue;
            }
            // Keys deleted since the listing are not findings when the bytes are missing.
            let affected: Vec<&String> = if matches!(checked, Checked::Missing) {
                let current = self.index.artifact_keys_with_sha256(sha256).await?;
                keys.iter().filter(|k| current.contains(k)).collect()
            } else {
                keys.iter().collect()
            };
            if affected.is_empty() {
                continue;
            }
            let mut findings = Vec::new();
            for k in affected {
                if let Some(f) = finding(EntryKind::Artifact, k, *size, sha256, &checked) {
                    findings.push(self.report.findings.len());
                    self.report.findings.push(f);
                }
            }
            if self.repair && removable(&checked) {
                self.bad.push(Bad {
                    what: BadBlob::Artifact(sha256, *size, keys),
                    missing: matches!(checked, Checked::Missing),
                    findings,
                });
            }
        }
        Ok(())
    }

    /// Removes the bad blobs found, each checked again first: only what is still bad goes.
    /// Entries found missing are all kept when more than [`missing_limit`] blobs were.
    async fn repair(&mut self, checked: u64) -> Result<(), GcError> {
        let missing = self.bad.iter().filter(|b| b.missing).count() as u64;
        let limit = missing_limit(checked);
        let keep_missing = missing > limit;
        if keep_missing {
            self.report.repair_skipped = Some(format!(
                "missing entries kept: {missing} of {checked} blobs are missing (more than \
                 {limit}), the storage looks unavailable rather than emptied; check the storage \
                 settings and mounts, then run the repair again"
            ));
        }
        for bad in std::mem::take(&mut self.bad) {
            if bad.missing && keep_missing {
                continue;
            }
            match bad.what {
                BadBlob::Nar(nar) => self.repair_nar(nar, &bad.findings).await?,
                BadBlob::Artifact(sha256, size, keys) => {
                    self.repair_artifact(sha256, size, keys, &bad.findings)
                        .await?
                }
            }
        }
        Ok(())
    }

    async fn repair_nar(
        &mut self,
        nar: &crate::meta::NarRecord,
        findings: &[usize],
    ) -> Result<(), GcError> {
        let key = BlobKey::nar(&nar.nar_file)?;
        // Against the row as it is now: a NAR fetched or uploaded again meanwhile has a new one.
        let row = self.index.get_nar(&nar.nar_file).await?;
        let (size, sha256) = row.as_ref().map_or((nar.size, nar.sha256.as_str()), |r| {
            (r.size, r.sha256.as_str())
        });
        match check_blob(self.blobs, &key, size, sha256, &mut |_| {}).await {
            // Refilled or re-uploaded since the check, or its bytes and row removed meanwhile.
            Checked::Good => self.resolved.extend(findings),
            Checked::Missing if row.is_none() => self.resolved.extend(findings),
            again if removable(&again) => {
                // Rows first, as eviction does: nothing is served from the bytes once they go.
                self.report
                    .removed_narinfos
                    .extend(self.index.evict_nar(&nar.nar_file).await?);
                self.blobs.delete(&key).await?;
                self.mark_removed(findings);
            }
            // Unreadable now: kept, as any unreadable blob.
            _ => {}
        }
        Ok(())
    }

    async fn repair_artifact(
        &mut self,
        sha256: &str,
        size: i64,
        keys: &[String],
        findings: &[usize],
    ) -> Result<(), GcError> {
        let key = BlobKey::artifact(sha256)?;
        let again = check_blob(self.blobs, &key, size, sha256, &mut |_| {}).await;
        if let Checked::Good = again {
            // Uploaded again since the check: the upload rewrote the bytes.
            self.resolved.extend(findings);
            return Ok(());
        }
        if !removable(&again) {
            return Ok(());
        }
        // Only keys the scrub listed that still name these bytes: a key uploaded since, or
        // uploaded again with other bytes, is not ours to delete.
        let current = self.index.artifact_keys_with_sha256(sha256).await?;
        let mut deleted = Vec::new();
        for k in keys.iter().filter(|k| current.contains(k)) {
            if self.index.delete_artifact(k).await?.is_some() {
                deleted.push(k.clone());
            }
        }
        // Keys added since name the bytes: the blob stays for them (the next scrub checks it
        // again); with none left it goes.
        if self
            .index
            .artifact_keys_with_sha256(sha256)
            .await?
            .is_empty()
        {
            self.blobs.delete(&key).await?;
        }
        for &i in findings {
            let f = &mut self.report.findings[i];
            if deleted.contains(&f.id) {
                f.removed = true;
            } else if !current.contains(&f.id) {
                // Deleted meanwhile by someone else.
                self.resolved.push(i);
            }
        }
        self.report.removed_artifacts.extend(deleted);
        Ok(())
    }

    fn mark_removed(&mut self, findings: &[usize]) {
        for &i in findings {
            self.report.findings[i].removed = true;
        }
    }

    /// Drops the findings the repair found fixed meanwhile.
    fn drop_resolved(&mut self) {
        if self.resolved.is_empty() {
            return;
        }
        let resolved: std::collections::BTreeSet<usize> = self.resolved.drain(..).collect();
        let mut i = 0;
        self.report.findings.retain(|_| {
            let keep = !resolved.contains(&i);
            i += 1;
            keep
        });
    }

    /// Uploaded narinfos whose NAR is not stored: nothing can fetch it again.
    async fn orphan_narinfos(&mut self) -> Result<(), GcError> {
        for hash in self.index.orphan_uploaded_narinfos().await? {
            let mut f = Finding::new(EntryKind::Narinfo, &hash, Problem::OrphanRow);
            if self.repair && self.index.delete_narinfo(&hash).await? {
                self.report.removed_narinfos.push(hash);
                f.removed = true;
            }
            self.report.findings.push(f);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::blob_suite::collect;
    use crate::index::{ArtifactIndex, ArtifactRecord};
    use crate::meta::{MetaStore, NarInfoRecord, NarRecord};
    use crate::{SqlMeta, Staging};

    /// One database with one blob backend: every combination of SQLite/PostgreSQL and
    /// local/S3 that the environment offers.
    struct Fx {
        name: String,
        _dir: tempfile::TempDir,
        _t: Option<tempfile::TempDir>,
        db: SqlMeta,
        blobs: Box<dyn BlobStore>,
        staging: Staging,
    }

    async fn fx_all() -> Vec<Fx> {
        let probe = tempfile::tempdir().unwrap();
        let n = crate::blob_suite::backends(probe.path()).await.len();
        let mut out = Vec::new();
        for i in 0..n {
            for t in crate::testdb::all().await {
                let dir = tempfile::tempdir().unwrap();
                let (blob_name, blobs) =
                    crate::blob_suite::backends(dir.path()).await.swap_remove(i);
                let staging = Staging::new(dir.path().join("tmp")).unwrap();
                let name = format!("{} + {blob_name}", t.url.split(':').next().unwrap_or("?"));
                let (db, keep) = t.into_parts();
                out.push(Fx {
                    name,
                    _dir: dir,
                    _t: keep,
                    db,
                    blobs,
                    staging,
                });
            }
        }
        out
    }

    fn sha(b: &[u8]) -> String {
        hex(&Sha256::digest(b))
    }

    fn bytes_of(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    async fn put_blob(f: &Fx, key: &str, data: &[u8]) {
        let staged = f.staging.create().await.unwrap();
        staged
            .append(bytes::Bytes::copy_from_slice(data))
            .await
            .unwrap();
        staged.sync().await.unwrap();
        f.blobs
            .put_file(&BlobKey::new(key).unwrap(), staged.path())
            .await
            .unwrap();
    }

    async fn read_blob(f: &Fx, key: &str) -> Vec<u8> {
        let read = f.blobs.read(&BlobKey::new(key).unwrap(), None).await;
        collect(read.unwrap().expect("blob exists")).await
    }

    /// Rewrites a stored blob with one byte flipped (same size), as bit rot would.
    async fn flip_byte(f: &Fx, key: &str) {
        let mut data = read_blob(f, key).await;
        let mid = data.len() / 2;
        data[mid] ^= 0x01;
        put_blob(f, key, &data).await;
    }

    async fn narinfo(f: &Fx, hash: &str, nar_file: &str, origin: &str) {
        let rec = NarInfoRecord {
            hash: hash.into(),
            store_path: format!("/nix/store/{hash}-x"),
            nar_file: nar_file.into(),
            file_size: None,
            file_hash: None,
            nar_hash: "sha256:x".into(),
            narinfo: "x".into(),
            origin: origin.into(),
            signed_by: None,
            uploaded_by: None,
        };
        f.db.put_narinfo(&rec, &[]).await.unwrap();
    }

    /// A stored NAR with a narinfo for each of `hashes`; returns its file name.
    async fn nar(f: &Fx, file: &str, hashes: &[&str], data: &[u8]) -> String {
        put_blob(f, &format!("nar/{file}"), data).await;
        f.db.put_nar(&NarRecord {
            nar_file: file.into(),
            size: data.len() as i64,
            sha256: sha(data),
        })
        .await
        .unwrap();
        for h in hashes {
            narinfo(f, h, file, "https://cache.example.org").await;
        }
        file.into()
    }

    async fn artifact(f: &Fx, key: &str, data: &[u8]) {
        put_blob(f, &format!("artifacts/{}", sha(data)), data).await;
        let rec = ArtifactRecord {
            key: key.into(),
            size: data.len() as i64,
            sha256: sha(data),
            metadata: "{}".into(),
            created_at: 1,
        };
        f.db.put_artifact(&rec, None, None).await.unwrap();
    }

    fn no_progress() -> impl Fn(u64, u64) + Send + Sync {
        |_, _| {}
    }

    /// (kind, id, problem, removed) of every finding, sorted.
    fn outline(r: &VerifyReport) -> Vec<(EntryKind, String, Problem, bool)> {
        let mut v: Vec<_> = r
            .findings
            .iter()
            .map(|f| (f.kind, f.id.clone(), f.problem, f.removed))
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_clean_store_reports_nothing_and_progress_reaches_the_total() {
        for f in fx_all().await {
            nar(&f, "aaa.nar", &["a1"], &bytes_of(1, 3000)).await;
            nar(&f, "bbb.nar.xz", &["b1", "b2"], &bytes_of(2, 700)).await;
            artifact(&f, "one", &bytes_of(3, 500)).await;
            artifact(&f, "same-bytes", &bytes_of(3, 500)).await;
            // A proxied narinfo whose NAR was not fetched yet is normal, not an orphan.
            narinfo(&f, "lazy", "lazy.nar", "https://cache.example.org").await;
            let seen = Mutex::new(Vec::new());
            let record = |done: u64, total: u64| seen.lock().unwrap().push((done, total));
            let r = verify(&f.db, f.blobs.as_ref(), false, &record)
                .await
                .unwrap();
            assert!(r.is_clean(), "{}: {:?}", f.name, r.findings);
            assert_eq!((r.nars, r.artifacts, r.bytes), (2, 2, 4200), "{}", f.name);
            assert_eq!(
                r.summary(),
                "2 NARs, 2 artifacts, 4200 bytes checked: no problems"
            );
            let seen = seen.into_inner().unwrap();
            assert_eq!(seen.last(), Some(&(4200, 4200)), "{}", f.name);
            assert!(
                seen.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 == 4200),
                "{}: progress went backwards: {seen:?}",
                f.name
            );
        }
    }

    #[tokio::test]
    async fn corrupt_missing_truncated_and_orphan_entries_are_found_then_repaired() {
        for f in fx_all().await {
            let good = bytes_of(1, 4000);
            let bad = bytes_of(2, 4000);
            nar(&f, "good.nar", &["good"], &good).await;
            nar(&f, "bad.nar.zst", &["bad1", "bad2"], &bad).await;
            nar(&f, "gone.nar", &["gone"], &bytes_of(3, 100)).await;
            nar(&f, "short.nar", &["short"], &bytes_of(4, 1000)).await;
            artifact(&f, "art-good", &bytes_of(5, 2000)).await;
            let art_bad = bytes_of(6, 2000);
            artifact(&f, "art-bad", &art_bad).await;
            artifact(&f, "art-bad-twin", &art_bad).await;
            artifact(&f, "art-gone", &bytes_of(7, 10)).await;
            narinfo(&f, "orphan", "never-stored.nar", "upload").await;
            narinfo(&f, "lazy", "lazy.nar", "https://cache.example.org").await;

            flip_byte(&f, "nar/bad.nar.zst").await;
            flip_byte(&f, &format!("artifacts/{}", sha(&art_bad))).await;
            f.blobs
                .delete(&BlobKey::nar("gone.nar").unwrap())
                .await
                .unwrap();
            f.blobs
                .delete(&BlobKey::artifact(&sha(&bytes_of(7, 10))).unwrap())
                .await
                .unwrap();
            let short = read_blob(&f, "nar/short.nar").await;
            put_blob(&f, "nar/short.nar", &short[..500]).await;

            let expected = |removed: bool| {
                use EntryKind::*;
                use Problem::*;
                let mut v = vec![
                    (Nar, "bad.nar.zst".to_string(), Corrupt, removed),
                    (Nar, "gone.nar".into(), Missing, removed),
                    (Nar, "short.nar".into(), SizeMismatch, removed),
                    (Artifact, "art-bad".into(), Corrupt, removed),
                    (Artifact, "art-bad-twin".into(), Corrupt, removed),
                    (Artifact, "art-gone".into(), Missing, removed),
                    (Narinfo, "orphan".into(), OrphanRow, removed),
                ];
                v.sort();
                v
            };

            let r = verify(&f.db, f.blobs.as_ref(), false, &no_progress())
                .await
                .unwrap();
            assert_eq!(outline(&r), expected(false), "{}", f.name);
            let corrupt = r.findings.iter().find(|x| x.id == "bad.nar.zst").unwrap();
            assert_eq!(corrupt.expected_sha256.as_deref(), Some(sha(&bad).as_str()));
            let mut flipped = bad.clone();
            flipped[2000] ^= 0x01;
            assert_eq!(
                corrupt.actual_sha256.as_deref(),
                Some(sha(&flipped).as_str()),
                "{}",
                f.name
            );
            let truncated = r.findings.iter().find(|x| x.id == "short.nar").unwrap();
            assert_eq!(
                (truncated.expected_size, truncated.actual_size),
                (Some(1000), Some(500))
            );
            let art = r.findings.iter().find(|x| x.id == "art-bad").unwrap();
            assert_eq!(art.expected_sha256.as_deref(), Some(sha(&art_bad).as_str()));
            // Hashed: good and bad NARs, the good artifact and the bad one (once for two keys).
            assert_eq!(r.bytes, 4000 + 4000 + 2000 + 2000, "{}", f.name);
            assert_eq!(
                r.summary(),
                "4 NARs, 4 artifacts, 12000 bytes checked: 3 corrupt, 1 size-mismatch, 2 missing, 1 orphan-row"
            );
            // Without --repair nothing changed.
            assert!(f.db.get_narinfo("bad1").await.unwrap().is_some());
            assert!(f.db.get_artifact("art-bad").await.unwrap().is_some());
            assert!(f.db.get_narinfo("orphan").await.unwrap().is_some());

            let r = verify(&f.db, f.blobs.as_ref(), true, &no_progress())
                .await
                .unwrap();
            assert_eq!(outline(&r), expected(true), "{}", f.name);
            let mut removed = r.removed_narinfos.clone();
            removed.sort();
            assert_eq!(
                removed,
                ["bad1", "bad2", "gone", "orphan", "short"],
                "{}",
                f.name
            );
            let mut keys = r.removed_artifacts.clone();
            keys.sort();
            assert_eq!(keys, ["art-bad", "art-bad-twin", "art-gone"], "{}", f.name);
            for h in ["bad1", "bad2", "gone", "short", "orphan"] {
                assert!(
                    f.db.get_narinfo(h).await.unwrap().is_none(),
                    "{}: {h}",
                    f.name
                );
            }
            for file in ["bad.nar.zst", "gone.nar", "short.nar"] {
                assert!(f.db.get_nar(file).await.unwrap().is_none(), "{}", f.name);
                let key = BlobKey::nar(file).unwrap();
                assert!(
                    f.blobs.stat(&key).await.unwrap().is_none(),
                    "{}: {file}",
                    f.name
                );
            }
            for k in ["art-bad", "art-bad-twin", "art-gone"] {
                assert!(f.db.get_artifact(k).await.unwrap().is_none(), "{}", f.name);
            }
            let art_blob = BlobKey::artifact(&sha(&art_bad)).unwrap();
            assert!(
                f.blobs.stat(&art_blob).await.unwrap().is_none(),
                "{}",
                f.name
            );
            // The good entries, and the proxied narinfo waiting for its NAR, stay.
            assert!(f.db.get_narinfo("good").await.unwrap().is_some());
            assert!(f.db.get_narinfo("lazy").await.unwrap().is_some());
            assert_eq!(read_blob(&f, "nar/good.nar").await, good);
            assert!(f.db.get_artifact("art-good").await.unwrap().is_some());

            let again = verify(&f.db, f.blobs.as_ref(), false, &no_progress())
                .await
                .unwrap();
            assert!(again.is_clean(), "{}: {:?}", f.name, again.findings);
            assert_eq!((again.nars, again.artifacts), (1, 1), "{}", f.name);
        }
    }

    /// What another server does between the scrub's check of a blob and its repair.
    struct Meanwhile {
        /// Bytes written to the blob.
        refill: Option<Vec<u8>>,
        /// Then this (a database write).
        then: Option<futures::future::BoxFuture<'static, ()>>,
    }

    /// Hands everything to the store it wraps; right before the second read of `key` (the
    /// repair's check again), does what [`Meanwhile`] says, once.
    struct Racing {
        inner: Box<dyn BlobStore>,
        staging: Staging,
        key: BlobKey,
        reads: Mutex<u32>,
        meanwhile: tokio::sync::Mutex<Option<Meanwhile>>,
    }

    impl Racing {
        /// The wrapped store, the database, and the directories to keep until the end.
        fn new(f: Fx, key: &str, meanwhile: Meanwhile) -> (Racing, SqlMeta, impl Sized) {
            let Fx {
                _dir,
                _t,
                db,
                blobs,
                ..
            } = f;
            let racing = Racing {
                inner: blobs,
                staging: Staging::new(_dir.path().join("racing")).unwrap(),
                key: BlobKey::new(key).unwrap(),
                reads: Mutex::new(0),
                meanwhile: tokio::sync::Mutex::new(Some(meanwhile)),
            };
            (racing, db, (_dir, _t))
        }
    }

    #[async_trait::async_trait]
    impl BlobStore for Racing {
        async fn stat(&self, key: &BlobKey) -> Result<Option<u64>, crate::StoreError> {
            self.inner.stat(key).await
        }

        async fn read(
            &self,
            key: &BlobKey,
            range: Option<crate::blob::BlobRange>,
        ) -> Result<Option<crate::blob::BlobRead>, crate::StoreError> {
            let second = key == &self.key && {
                let mut n = self.reads.lock().unwrap();
                *n += 1;
                *n == 2
            };
            if second {
                if let Some(m) = self.meanwhile.lock().await.take() {
                    if let Some(data) = m.refill {
                        let staged = self.staging.create().await.unwrap();
                        staged.append(bytes::Bytes::from(data)).await.unwrap();
                        staged.sync().await.unwrap();
                        self.inner.put_file(key, staged.path()).await.unwrap();
                    }
                    if let Some(then) = m.then {
                        then.await;
                    }
                }
            }
            self.inner.read(key, range).await
        }

        async fn put_file(
            &self,
            key: &BlobKey,
            staged: &std::path::Path,
        ) -> Result<(), crate::StoreError> {
            self.inner.put_file(key, staged).await
        }

        async fn put_bytes(
            &self,
            key: &BlobKey,
            bytes: bytes::Bytes,
        ) -> Result<(), crate::StoreError> {
            self.inner.put_bytes(key, bytes).await
        }

        async fn delete(&self, key: &BlobKey) -> Result<(), crate::StoreError> {
            self.inner.delete(key).await
        }

        async fn list(
            &self,
            prefix: &str,
        ) -> Result<Vec<crate::blob::BlobEntry>, crate::StoreError> {
            self.inner.list(prefix).await
        }
    }

    fn art_record(key: &str, data: &[u8]) -> ArtifactRecord {
        ArtifactRecord {
            key: key.into(),
            size: data.len() as i64,
            sha256: sha(data),
            metadata: "{}".into(),
            created_at: 1,
        }
    }

    #[tokio::test]
    async fn a_nar_refilled_between_the_check_and_the_repair_is_kept() {
        for f in fx_all().await {
            let data = bytes_of(1, 3000);
            nar(&f, "refilled.nar", &["r1", "r2"], &data).await;
            nar(&f, "still-gone.nar", &["g1"], &bytes_of(2, 100)).await;
            for file in ["refilled.nar", "still-gone.nar"] {
                f.blobs.delete(&BlobKey::nar(file).unwrap()).await.unwrap();
            }
            let name = f.name.clone();
            let meanwhile = Meanwhile {
                refill: Some(data.clone()),
                then: None,
            };
            let (blobs, db, _dir) = Racing::new(f, "nar/refilled.nar", meanwhile);
            let r = verify(&db, &blobs, true, &no_progress()).await.unwrap();
            // The refilled NAR is good again: neither removed nor reported.
            assert_eq!(
                outline(&r),
                [(
                    EntryKind::Nar,
                    "still-gone.nar".to_string(),
                    Problem::Missing,
                    true
                )],
                "{name}"
            );
            assert_eq!(r.removed_narinfos, ["g1"], "{name}");
            assert_eq!(r.repair_skipped, None, "{name}");
            for h in ["r1", "r2"] {
                assert!(db.get_narinfo(h).await.unwrap().is_some(), "{name}: {h}");
            }
            assert!(
                db.get_nar("refilled.nar").await.unwrap().is_some(),
                "{name}"
            );
            let read = blobs
                .inner
                .read(&BlobKey::nar("refilled.nar").unwrap(), None)
                .await;
            assert_eq!(collect(read.unwrap().unwrap()).await, data, "{name}");
            assert!(
                db.get_nar("still-gone.nar").await.unwrap().is_none(),
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn an_artifact_uploaded_again_between_the_check_and_the_repair_is_kept() {
        for f in fx_all().await {
            let data = bytes_of(6, 2000);
            artifact(&f, "art", &data).await;
            flip_byte(&f, &format!("artifacts/{}", sha(&data))).await;
            let name = f.name.clone();
            // An upload of the same bytes under a new key rewrites the blob and adds a row.
            let db2 = f.db.clone();
            let rec = art_record("art-new", &data);
            let meanwhile = Meanwhile {
                refill: Some(data.clone()),
                then: Some(Box::pin(async move {
                    db2.put_artifact(&rec, None, None).await.unwrap();
                })),
            };
            let key = format!("artifacts/{}", sha(&data));
            let (blobs, db, _dir) = Racing::new(f, &key, meanwhile);
            let r = verify(&db, &blobs, true, &no_progress()).await.unwrap();
            assert!(r.is_clean(), "{name}: {:?}", r.findings);
            assert!(r.removed_artifacts.is_empty(), "{name}");
            for k in ["art", "art-new"] {
                assert!(db.get_artifact(k).await.unwrap().is_some(), "{name}: {k}");
            }
            let read = blobs.inner.read(&BlobKey::new(&key).unwrap(), None).await;
            assert_eq!(collect(read.unwrap().unwrap()).await, data, "{name}");
        }
    }

    #[tokio::test]
    async fn the_repair_deletes_only_the_listed_keys_of_still_bad_bytes() {
        for f in fx_all().await {
            let data = bytes_of(6, 2000);
            artifact(&f, "art", &data).await;
            artifact(&f, "twin", &data).await;
            flip_byte(&f, &format!("artifacts/{}", sha(&data))).await;
            let name = f.name.clone();
            // Meanwhile: `twin` is deleted and uploaded again with other bytes, and `late` names
            // the bad ones.
            let db2 = f.db.clone();
            let other = bytes_of(7, 50);
            let (twin, late) = (art_record("twin", &other), art_record("late", &data));
            let meanwhile = Meanwhile {
                refill: None,
                then: Some(Box::pin(async move {
                    db2.delete_artifact("twin").await.unwrap();
                    db2.put_artifact(&twin, None, None).await.unwrap();
                    db2.put_artifact(&late, None, None).await.unwrap();
                })),
            };
            let key = format!("artifacts/{}", sha(&data));
            let (blobs, db, _dir) = Racing::new(f, &key, meanwhile);
            let r = verify(&db, &blobs, true, &no_progress()).await.unwrap();
            assert_eq!(r.removed_artifacts, ["art"], "{name}");
            assert_eq!(
                outline(&r),
                [(
                    EntryKind::Artifact,
                    "art".to_string(),
                    Problem::Corrupt,
                    true
                )],
                "{name}"
            );
            assert!(db.get_artifact("art").await.unwrap().is_none(), "{name}");
            let twin = db.get_artifact("twin").await.unwrap().expect("twin kept");
            assert_eq!(twin.sha256, sha(&other), "{name}");
            assert!(db.get_artifact("late").await.unwrap().is_some(), "{name}");
            // `late` still names the bytes: they stay for it (the next scrub finds them again).
            let blob = BlobKey::new(&key).unwrap();
            assert!(blobs.inner.stat(&blob).await.unwrap().is_some(), "{name}");
        }
    }

    #[tokio::test]
    async fn storage_with_every_blob_gone_is_reported_but_not_emptied() {
        for f in fx_all().await {
            let names: Vec<String> = (0..11).map(|i| format!("n{i:02}.nar")).collect();
            for (i, file) in names.iter().enumerate() {
                let hash = format!("h{i:02}");
                nar(&f, file, &[hash.as_str()], &bytes_of(i as u8, 100)).await;
                f.blobs.delete(&BlobKey::nar(file).unwrap()).await.unwrap();
            }
            let art = bytes_of(40, 100);
            artifact(&f, "art", &art).await;
            f.blobs
                .delete(&BlobKey::artifact(&sha(&art)).unwrap())
                .await
                .unwrap();
            // A corrupt blob is no sign of unavailable storage: it still goes.
            nar(&f, "bad.nar", &["bad"], &bytes_of(50, 100)).await;
            flip_byte(&f, "nar/bad.nar").await;

            let r = verify(&f.db, f.blobs.as_ref(), true, &no_progress())
                .await
                .unwrap();
            assert_eq!(r.count(Problem::Missing), 12, "{}", f.name);
            assert!(
                r.findings
                    .iter()
                    .all(|x| x.removed == (x.problem == Problem::Corrupt)),
                "{}: {:?}",
                f.name,
                r.findings
            );
            assert_eq!(r.removed_narinfos, ["bad"], "{}", f.name);
            assert!(r.removed_artifacts.is_empty(), "{}", f.name);
            let why = r.repair_skipped.clone().expect("repair skipped");
            assert!(why.contains("12 of 13 blobs are missing"), "{why}");
            assert_eq!(
                r.problems(),
                format!(
                    "1 corrupt, 12 missing; removed 1 entries (1 narinfos, 0 artifacts); {why}"
                )
            );
            let v = serde_json::to_value(&r).unwrap();
            assert_eq!(v["repairSkipped"], serde_json::json!(why));
            for (i, file) in names.iter().enumerate() {
                assert!(f.db.get_nar(file).await.unwrap().is_some(), "{}", f.name);
                let hash = format!("h{i:02}");
                assert!(
                    f.db.get_narinfo(&hash).await.unwrap().is_some(),
                    "{}",
                    f.name
                );
            }
            assert!(
                f.db.get_artifact("art").await.unwrap().is_some(),
                "{}",
                f.name
            );
            assert!(
                f.db.get_nar("bad.nar").await.unwrap().is_none(),
                "{}",
                f.name
            );

            // Without --repair nothing is said about a skipped repair.
            let check = verify(&f.db, f.blobs.as_ref(), false, &no_progress())
                .await
                .unwrap();
            assert_eq!(check.repair_skipped, None, "{}", f.name);
            assert_eq!(check.count(Problem::Missing), 12, "{}", f.name);
        }
    }

    #[test]
    fn the_missing_limit_is_ten_or_a_tenth_of_the_blobs() {
        assert_eq!(missing_limit(0), 10);
        assert_eq!(missing_limit(13), 10);
        assert_eq!(missing_limit(109), 10);
        assert_eq!(missing_limit(250), 25);
        assert_eq!(missing_limit(10_000), 1000);
    }

    #[tokio::test]
    async fn the_report_serializes_to_json_with_kebab_case_values() {
        let r = VerifyReport {
            nars: 1,
            findings: vec![Finding {
                kind: EntryKind::Nar,
                id: "x.nar".into(),
                problem: Problem::SizeMismatch,
                expected_sha256: None,
                actual_sha256: None,
                expected_size: Some(3),
                actual_size: Some(2),
                error: None,
                removed: true,
            }],
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["findings"][0],
            serde_json::json!({"kind": "nar", "id": "x.nar", "problem": "size-mismatch",
                "expectedSize": 3, "actualSize": 2, "removed": true})
        );
        assert_eq!(v["removedNarinfos"], serde_json::json!([]));
        assert!(v.get("repairSkipped").is_none(), "{v}");
    }
}
