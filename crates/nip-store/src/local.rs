//! Blob storage in a local directory: one file per blob, published by rename after fsync.
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::blob::{BlobEntry, BlobKey, BlobRange, BlobRead, BlobStore, StoreError};

/// Read buffer for streaming blobs out; large reads keep syscalls per byte low.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct LocalBlobStore {
    root: PathBuf,
    /// Big reads hand out mappings of the page cache instead of copies ([`crate::mapped`]).
    map_reads: bool,
}

impl LocalBlobStore {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(StoreError::from_io)?;
        Ok(LocalBlobStore {
            root,
            map_reads: cfg!(target_os = "linux"),
        })
    }

    /// Reads copy every piece instead of mapping it: where the bytes are copied in user space
    /// anyway (TLS), and for tools that read every stored byte (`nip admin verify`), which would
    /// gain nothing and are what runs on a failing disk.
    pub fn without_mapped_reads(mut self) -> Self {
        self.map_reads = false;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &BlobKey) -> PathBuf {
        self.root.join(key.as_str())
    }
}

/// The bytes `[start, start + len)` of `file` as a stream of `READ_CHUNK` pieces, the next piece
/// read (on the blocking pool) while the current one is sent: reading and sending overlap, which
/// a reader that only reads when polled does not do. At most two pieces per stream in memory.
/// With `map`, a piece is a mapping of the page cache when its pages can be read in.
fn read_ahead(
    file: std::fs::File,
    size: u64,
    start: u64,
    len: u64,
    map: bool,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    type Next = tokio::task::JoinHandle<std::io::Result<(std::fs::File, bytes::Bytes)>>;
    // The file travels with each read; `read_to_end` fills the fresh buffer without zeroing it.
    fn read(mut file: std::fs::File, size: u64, offset: u64, left: u64, map: bool) -> Next {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek};
            let n = left.min(READ_CHUNK as u64);
            #[cfg(target_os = "linux")]
            if map {
                if let Some(piece) = crate::mapped::map(&file, size, offset, n as usize) {
                    return Ok((file, piece));
                }
            }
            file.seek(std::io::SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(n as usize);
            (&mut file).take(n).read_to_end(&mut buf)?;
            Ok((file, bytes::Bytes::from(buf)))
        })
    }
    let first: Option<Next> = (len > 0).then(|| read(file, size, start, len, map));
    futures::stream::unfold(
        (first, start, len),
        move |(next, offset, left)| async move {
            let (file, chunk) = match next?.await {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => return Some((Err(e), (None, offset, 0))),
                Err(e) => return Some((Err(std::io::Error::other(e)), (None, offset, 0))),
            };
            if chunk.is_empty() {
                let e = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file is shorter than it was",
                );
                return Some((Err(e), (None, offset, 0)));
            }
            let (offset, left) = (offset + chunk.len() as u64, left - chunk.len() as u64);
            let next = (left > 0).then(|| read(file, size, offset, left, map));
            Some((Ok(chunk), (next, offset, left)))
        },
    )
}

fn not_found_is_none<T>(r: std::io::Result<T>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::from_io(e)),
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn stat(&self, key: &BlobKey) -> Result<Option<u64>, StoreError> {
        Ok(not_found_is_none(tokio::fs::metadata(self.path(key)).await)?.map(|m| m.len()))
    }

    async fn read(
        &self,
        key: &BlobKey,
        range: Option<BlobRange>,
    ) -> Result<Option<BlobRead>, StoreError> {
        let path = self.path(key);
        let opened = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::File::open(path)?;
            let size = file.metadata()?.len();
            // A whole small file is read in the same trip to the blocking pool (most NARs).
            let whole = match range {
                None if size <= READ_CHUNK as u64 => {
                    use std::io::Read;
                    let mut buf = Vec::with_capacity(size as usize);
                    (&mut file).take(size).read_to_end(&mut buf)?;
                    Some(bytes::Bytes::from(buf))
                }
                _ => None,
            };
            Ok::<_, std::io::Error>((file, size, whole))
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let Some((file, size, whole)) = not_found_is_none(opened)? else {
            return Ok(None);
        };
        if let Some(all) = whole {
            if all.len() as u64 != size {
                let e = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file is shorter than it was",
                );
                return Err(StoreError::Io(e));
            }
            let body = futures::stream::iter((!all.is_empty()).then_some(Ok(all))).boxed();
            return Ok(Some(BlobRead { size, body }));
        }
        let (start, len) = match range {
            Some(r) => (
                r.start,
                (r.end.saturating_sub(r.start) + 1).min(size.saturating_sub(r.start)),
            ),
            None => (0, size),
        };
        let body = read_ahead(file, size, start, len, self.map_reads).boxed();
        Ok(Some(BlobRead { size, body }))
    }

    async fn put_file(&self, key: &BlobKey, staged: &Path) -> Result<(), StoreError> {
        let dest = self.path(key);
        let staged = staged.to_path_buf();
        on_blocking_pool(move || publish(&staged, &dest)).await
    }

    async fn put_bytes(&self, key: &BlobKey, bytes: Bytes) -> Result<(), StoreError> {
        let dest = self.path(key);
        on_blocking_pool(move || {
            publish_with(&dest, |p| {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                // 0600 as staged files are: blobs are served by nip, not read by others.
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(p)?;
                file.write_all(&bytes)?;
                file.sync_all()
            })
        })
        .await
    }

    async fn adopt(&self, from: &BlobKey, to: &BlobKey) -> Result<bool, StoreError> {
        let (from, dest) = (self.path(from), self.path(to));
        if !from.is_file() {
            return Ok(false);
        }
        on_blocking_pool(move || publish(&from, &dest)).await?;
        Ok(true)
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), StoreError> {
        not_found_is_none(tokio::fs::remove_file(self.path(key)).await)?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobEntry>, StoreError> {
        let dir = self.path(&BlobKey::new(prefix)?);
        let Some(mut entries) = not_found_is_none(tokio::fs::read_dir(&dir).await)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry().await.map_err(StoreError::from_io)? {
            let Ok(meta) = e.metadata().await else {
                continue;
            };
            if meta.is_file() {
                out.push(BlobEntry {
                    key: format!("{prefix}/{}", e.file_name().to_string_lossy()),
                    size: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
        }
        Ok(out)
    }
}

/// Runs file system work on tokio's blocking pool, its I/O error mapped as [`StoreError::from_io`]
/// does (a full disk told apart).
pub(crate) async fn on_blocking_pool(
    work: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<(), StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
        .map_err(StoreError::from_io)
}

/// Hard-links (or, across file systems, copies) the staged file next to `dest`, then publishes
/// it there (see [`publish_with`]). The staged file itself stays where it is: its owner deletes it.
fn publish(staged: &Path, dest: &Path) -> std::io::Result<()> {
    publish_with(dest, |p| match std::fs::hard_link(staged, p) {
        Ok(()) => Ok(()),
        // EXDEV: the temp path is on another file system.
        Err(e) if e.raw_os_error() == Some(18) => {
            std::fs::copy(staged, p)?;
            std::fs::File::open(p)?.sync_all()
        }
        Err(e) => Err(e),
    })
}

/// Has `make` create a complete, fsynced file at a fresh hidden name next to `dest`, then renames
/// it into place and fsyncs the directory, so `dest` is either absent or complete, even after a
/// crash. A crash in between leaves a `.publish-` file, which reconciliation lists.
fn publish_with(
    dest: &Path,
    mut make: impl FnMut(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    // A file `make` left half-made is removed here: nothing else would before reconciliation.
    // Not on a name collision: that file is another publisher's, and tempfile tries a new name.
    let tmp = tempfile::Builder::new()
        .prefix(".publish-")
        .make_in(dir, |p| {
            make(p).inspect_err(|e| {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    let _ = std::fs::remove_file(p);
                }
            })
        })?;
    tmp.persist(dest).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob_suite::collect;
    use crate::staging::Staging;

    #[test]
    fn a_file_left_half_made_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("nar/x.nar");
        let failed = publish_with(&dest, |p| {
            std::fs::write(p, b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("nar")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // A name taken by another publisher is left to it; the next name is tried.
        let mut names = Vec::new();
        publish_with(&dest, |p| {
            names.push(p.to_path_buf());
            if names.len() == 1 {
                std::fs::write(p, b"another publisher's")?;
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            std::fs::write(p, b"mine")
        })
        .unwrap();
        assert_eq!(std::fs::read(&names[0]).unwrap(), b"another publisher's");
        assert_eq!(std::fs::read(&dest).unwrap(), b"mine");
    }

    #[tokio::test]
    async fn mapped_and_copied_reads_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mapped = LocalBlobStore::new(dir.path().join("store")).unwrap();
        let copied = mapped.clone().without_mapped_reads();
        let key = BlobKey::new("nar/big.nar").unwrap();
        let data: Vec<u8> = (0..(3 * READ_CHUNK + 4321))
            .map(|i| (i % 253) as u8)
            .collect();
        mapped
            .put_bytes(&key, bytes::Bytes::from(data.clone()))
            .await
            .unwrap();
        let last = data.len() as u64 - 1;
        for range in [
            None,
            Some((0, last)),
            Some((1, last)),
            Some((4095, READ_CHUNK as u64 + 5)),
            Some((READ_CHUNK as u64 - 1, 2 * READ_CHUNK as u64)),
            Some((last - 10, last)),
        ] {
            let range = range.map(|(start, end)| BlobRange { start, end });
            let want = match range {
                Some(r) => &data[r.start as usize..=r.end as usize],
                None => &data[..],
            };
            for store in [&mapped, &copied] {
                let mut read = store.read(&key, range).await.unwrap().unwrap();
                // The first piece, held: a mapping when mapped reads are on (other tests may
                // hold mappings too, so only this way round is certain).
                let first = read.body.next().await.unwrap().unwrap();
                #[cfg(target_os = "linux")]
                if store.map_reads {
                    assert!(crate::mapped::in_use() > 0, "{range:?} was not mapped");
                }
                let mut got = first.to_vec();
                got.extend(collect(read).await);
                assert!(got == want, "{range:?}, mapped: {}", store.map_reads);
            }
        }
    }

    #[tokio::test]
    async fn publish_read_range_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path().join("store")).unwrap();
        let staging = Staging::new(dir.path().join("tmp")).unwrap();
        let key = BlobKey::new("nar/abc.nar").unwrap();
        assert!(store.stat(&key).await.unwrap().is_none());
        assert!(store.read(&key, None).await.unwrap().is_none());

        let staged = staging.create().await.unwrap();
        staged
            .append(bytes::Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        staged.sync().await.unwrap();
        store.put_file(&key, staged.path()).await.unwrap();
        drop(staged);
        assert_eq!(
            std::fs::read_dir(staging.dir()).unwrap().count(),
            0,
            "staged file not removed"
        );

        assert_eq!(store.stat(&key).await.unwrap(), Some(10));
        assert_eq!(
            collect(store.read(&key, None).await.unwrap().unwrap()).await,
            b"0123456789"
        );
        let part = store
            .read(&key, Some(BlobRange { start: 2, end: 4 }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(part.size, 10);
        assert_eq!(collect(part).await, b"234");

        store.delete(&key).await.unwrap();
        store.delete(&key).await.unwrap();
        assert!(store.stat(&key).await.unwrap().is_none());
    }
}
