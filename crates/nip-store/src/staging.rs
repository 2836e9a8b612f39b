//! Staging area for incoming bytes: temp files that are hashed while written, fsynced, and only
//! then published. A staged file that is dropped unpublished is deleted.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::blob::StoreError;
use crate::local::on_blocking_pool;

/// Directory where incoming bytes are staged (`--cache-temp-path`).
#[derive(Clone, Debug)]
pub struct Staging {
    dir: PathBuf,
}

/// A staged temp file. `file` is shared so that readers can stream it (positional reads) while
/// it is still being written.
pub struct StagedFile {
    temp: tempfile::TempPath,
    pub file: Arc<std::fs::File>,
}

impl Staging {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(StoreError::from_io)?;
        Ok(Staging { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a new empty staged file.
    pub async fn create(&self) -> Result<StagedFile, StoreError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let named = tempfile::Builder::new()
                .prefix("nip-staged-")
                .tempfile_in(&dir)
                .map_err(StoreError::from_io)?;
            let (file, temp) = named.into_parts();
            Ok(StagedFile {
                temp,
                file: Arc::new(file),
            })
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// Removes staged files left over by a crash. Returns how many were removed.
    pub fn clean_leftovers(&self) -> std::io::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("nip-staged-")
            {
                std::fs::remove_file(entry.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl StagedFile {
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Appends bytes at the end (the file is only ever appended to).
    pub async fn append(&self, data: bytes::Bytes) -> Result<(), StoreError> {
        let file = self.file.clone();
        on_blocking_pool(move || {
            use std::io::Write;
            (&*file).write_all(&data)
        })
        .await
    }

    /// Flushes the bytes to stable storage.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let file = self.file.clone();
        on_blocking_pool(move || file.sync_all()).await
    }
}

/// Reads up to `len` bytes at `offset` from a file shared with a writer.
pub async fn read_at(
    file: Arc<std::fs::File>,
    offset: u64,
    len: usize,
) -> std::io::Result<bytes::Bytes> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(bytes::Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Most bytes collected while a write is in flight before the sender waits for it: network reads
/// arrive in 8–64 KiB pieces, and a blocking-pool round trip each would cost more than the write.
const WRITE_BATCH: usize = 512 * 1024;

/// Written bytes handed to the kernel's writeback every this many, so the fsync before a file
/// is published finds little left to write (it was a fifth of a 256 MiB upload's time).
const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;

/// Starts writing `len` bytes at `offset` of `file` to disk without waiting for them.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a syscall on a file descriptor that `file` keeps open for the call; it shares no
    // memory with us.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) -> std::io::Result<()> {
    Ok(())
}

/// Batches at least this big are hashed on one blocking thread while another writes them (the two
/// took turns on one thread: SHA-256 is about a fifth of an upload's CPU); smaller ones are not
/// worth a second hop.
const SPLIT_HASH: u64 = 128 * 1024;

/// A batch being written (and hashed).
struct InFlight {
    /// The hasher comes back from here when the batch was small enough to hash on the way.
    write: tokio::task::JoinHandle<std::io::Result<Option<Sha256>>>,
    hash: Option<tokio::task::JoinHandle<Sha256>>,
    len: u64,
}

impl InFlight {
    fn is_finished(&self) -> bool {
        self.write.is_finished() && self.hash.as_ref().is_none_or(|h| h.is_finished())
    }
}

/// Appends a stream of chunks to a staged file, hashing (SHA-256) as it writes. When no write is
/// in flight, what has arrived is written at once (low latency for readers of the file); while one
/// is, chunks are collected into the next batch (few blocking-pool round trips when bytes come
/// fast), so receiving, hashing and writing overlap. At most two batches are in memory.
pub struct BatchedWriter<'a> {
    staged: &'a StagedFile,
    pending: Vec<bytes::Bytes>,
    pending_len: usize,
    in_flight: Option<InFlight>,
    hasher: Option<Sha256>,
    received: u64,
    on_disk: u64,
    /// Bytes before this offset were handed to writeback already.
    writeback_from: u64,
}

impl<'a> BatchedWriter<'a> {
    pub fn new(staged: &'a StagedFile) -> Self {
        BatchedWriter {
            staged,
            pending: Vec::new(),
            pending_len: 0,
            in_flight: None,
            hasher: Some(Sha256::new()),
            received: 0,
            on_disk: 0,
            writeback_from: 0,
        }
    }

    /// Bytes received so far (written or about to be).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Queues `chunk` and writes what it can. Returns the number of bytes now in the file when
    /// that number moved (readers of the staged file may read that far).
    pub async fn push(&mut self, chunk: bytes::Bytes) -> Result<Option<u64>, StoreError> {
        let before = self.on_disk;
        self.received += chunk.len() as u64;
        self.pending_len += chunk.len();
        self.pending.push(chunk);
        let done = self.in_flight.as_ref().is_some_and(InFlight::is_finished);
        if done || self.pending_len >= WRITE_BATCH {
            self.wait_in_flight().await?;
        }
        if self.in_flight.is_none() {
            self.start_batch();
        }
        Ok((self.on_disk != before).then_some(self.on_disk))
    }

    /// Writes what is left; returns the total size and the SHA-256 of everything pushed.
    pub async fn finish(&mut self) -> Result<(u64, [u8; 32]), StoreError> {
        self.wait_in_flight().await?;
        if !self.pending.is_empty() {
            self.start_batch();
            self.wait_in_flight().await?;
        }
        let hasher = self.hasher.take().unwrap_or_default();
        Ok((self.on_disk, hasher.finalize().into()))
    }

    /// Throws away everything pushed: waits for a write in flight (so none lands later), then
    /// empties the file, ready to be written from the start again.
    pub async fn discard(&mut self) -> Result<(), StoreError> {
        if let Some(batch) = self.in_flight.take() {
            // Its outcome no longer matters, only that it is over.
            let _ = batch.write.await;
            if let Some(hash) = batch.hash {
                let _ = hash.await;
            }
        }
        let file = self.staged.file.clone();
        on_blocking_pool(move || {
            use std::io::{Seek, SeekFrom};
            file.set_len(0)?;
            (&*file).seek(SeekFrom::Start(0)).map(|_| ())
        })
        .await?;
        *self = BatchedWriter::new(self.staged);
        Ok(())
    }

    fn start_batch(&mut self) {
        let batch = std::mem::take(&mut self.pending);
        let len = std::mem::take(&mut self.pending_len) as u64;
        let file = self.staged.file.clone();
        let mut hasher = self.hasher.take().unwrap_or_default();
        // No batch is in flight here, so `on_disk` is where this one starts.
        let end = self.on_disk + len;
        let writeback = (end - self.writeback_from >= WRITEBACK_EVERY).then(|| {
            let range = (self.writeback_from, end - self.writeback_from);
            self.writeback_from = end;
            range
        });
        let batch = Arc::new(batch);
        // The hasher goes to its own task for a big batch, else along with the write.
        let (hash, mut inline) = if len >= SPLIT_HASH {
            let batch = batch.clone();
            let task = tokio::task::spawn_blocking(move || {
                batch.iter().for_each(|b| hasher.update(b));
                hasher
            });
            (Some(task), None)
        } else {
            (None, Some(hasher))
        };
        let write = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            for b in batch.iter() {
                if let Some(h) = inline.as_mut() {
                    h.update(b);
                }
                (&*file).write_all(b)?;
            }
            if let Some((offset, len)) = writeback {
                // Only a hint: the fsync before publishing is what makes the bytes safe.
                if let Err(e) = start_writeback(&file, offset, len) {
                    tracing::debug!(error = %e, "sync_file_range failed");
                }
            }
            Ok(inline)
        });
        self.in_flight = Some(InFlight { write, hash, len });
    }

    async fn wait_in_flight(&mut self) -> Result<(), StoreError> {
        if let Some(batch) = self.in_flight.take() {
            let joined = |e: tokio::task::JoinError| StoreError::Io(std::io::Error::other(e));
            let written = batch.write.await.map_err(joined)?;
            let hashed = match batch.hash {
                Some(task) => Some(task.await.map_err(joined)?),
                None => None,
            };
            let hasher = written.map_err(StoreError::from_io)?;
            self.hasher = hashed.or(hasher);
            self.on_disk += batch.len;
        }
        Ok(())
    }
}

/// Bounds on bytes staged at once for client uploads: in all, and per client (a key name or an
/// address). Uploads reserve bytes before writing them and give them back when their
/// [`StageReservation`] is dropped, whatever the outcome (published, refused, or the connection
/// dropped mid-body), so stalled uploads cannot fill the temp path.
#[derive(Clone, Debug)]
pub struct StagingLimits(Arc<LimitsInner>);

#[derive(Debug)]
struct LimitsInner {
    caps: std::sync::Mutex<LimitsState>,
}

#[derive(Debug, Default)]
struct LimitsState {
    global_cap: u64,
    client_cap: u64,
    total: u64,
    by_client: std::collections::HashMap<String, u64>,
}

/// Which bound a reservation would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    Global,
    Client,
}

impl StagingLimits {
    pub fn new(global_cap: u64, client_cap: u64) -> Self {
        StagingLimits(Arc::new(LimitsInner {
            caps: std::sync::Mutex::new(LimitsState {
                global_cap,
                client_cap,
                ..Default::default()
            }),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LimitsState> {
        self.0.caps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the caps (tests use small ones); reservations already held stay valid.
    pub fn set_caps(&self, global_cap: u64, client_cap: u64) {
        let mut st = self.state();
        st.global_cap = global_cap;
        st.client_cap = client_cap;
    }

    pub fn caps(&self) -> (u64, u64) {
        let st = self.state();
        (st.global_cap, st.client_cap)
    }

    /// Bytes reserved now, in all and by `client`.
    pub fn reserved(&self, client: &str) -> (u64, u64) {
        let st = self.state();
        (st.total, st.by_client.get(client).copied().unwrap_or(0))
    }

    /// Reserves `bytes` for `client` (0 is fine: grow it as bytes arrive).
    pub fn reserve(&self, client: &str, bytes: u64) -> Result<StageReservation, OverLimit> {
        let mut r = StageReservation {
            limits: self.clone(),
            client: client.to_string(),
            bytes: 0,
        };
        r.grow_to(bytes)?;
        Ok(r)
    }
}

/// Bytes reserved by one upload; given back on drop.
#[derive(Debug)]
pub struct StageReservation {
    limits: StagingLimits,
    client: String,
    bytes: u64,
}

impl StageReservation {
    /// Makes the reservation at least `total` bytes; on refusal it keeps what it held.
    pub fn grow_to(&mut self, total: u64) -> Result<(), OverLimit> {
        if total <= self.bytes {
            return Ok(());
        }
        let more = total - self.bytes;
        let mut st = self.limits.state();
        let mine = st.by_client.get(&self.client).copied().unwrap_or(0);
        if st.total.saturating_add(more) > st.global_cap {
            return Err(OverLimit::Global);
        }
        if mine.saturating_add(more) > st.client_cap {
            return Err(OverLimit::Client);
        }
        st.total += more;
        *st.by_client.entry(self.client.clone()).or_insert(0) += more;
        self.bytes = total;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for StageReservation {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut st = self.limits.state();
        st.total = st.total.saturating_sub(self.bytes);
        if let Some(n) = st.by_client.get_mut(&self.client) {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                st.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn staging_limits_bound_and_release() {
        use super::{OverLimit, StagingLimits};
        let limits = StagingLimits::new(100, 60);
        let a1 = limits.reserve("a", 50).unwrap();
        // Per client: a has 50 of 60.
        assert_eq!(limits.reserve("a", 20).unwrap_err(), OverLimit::Client);
        let mut b = limits.reserve("b", 0).unwrap();
        b.grow_to(40).unwrap();
        // Globally: 90 of 100.
        assert_eq!(b.grow_to(55).unwrap_err(), OverLimit::Global);
        assert_eq!(b.bytes(), 40, "a refused growth keeps what was held");
        b.grow_to(10).unwrap();
        assert_eq!(limits.reserved("b"), (90, 40));
        drop(a1);
        assert_eq!(limits.reserved("a"), (40, 0));
        let a2 = limits.reserve("a", 60).unwrap();
        drop(b);
        drop(a2);
        assert_eq!(limits.reserved("a"), (0, 0));
        assert!(limits.0.caps.lock().unwrap().by_client.is_empty());
        limits.set_caps(10, 10);
        assert_eq!(limits.reserve("a", 11).unwrap_err(), OverLimit::Global);
    }

    use super::*;
    use sha2::Digest;

    #[tokio::test]
    async fn batched_writes_keep_every_byte_in_order_and_hash_them() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::new(dir.path()).unwrap();
        let staged = staging.create().await.unwrap();
        // Past WRITEBACK_EVERY twice: writeback hints along the way change nothing written.
        let data: Vec<u8> = (0..20_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = BatchedWriter::new(&staged);
        let mut reported = 0;
        for piece in data.chunks(60_007) {
            if let Some(n) = w.push(bytes::Bytes::copy_from_slice(piece)).await.unwrap() {
                assert!(n > reported && n <= w.received());
                reported = n;
            }
        }
        assert!(reported > 0, "nothing was written before the end");
        let (size, digest) = w.finish().await.unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(std::fs::read(staged.path()).unwrap(), data);
    }

    #[test]
    fn the_kernel_takes_the_writeback_hint() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &vec![1u8; 1 << 20]).unwrap();
        start_writeback(&f, 0, 1 << 20).unwrap();
        start_writeback(&f, 4096, 8192).unwrap();
    }

    #[tokio::test]
    async fn discard_empties_the_file_for_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Staging::new(dir.path()).unwrap().create().await.unwrap();
        let mut w = BatchedWriter::new(&staged);
        for _ in 0..40 {
            w.push(bytes::Bytes::from(vec![7u8; 100_000]))
                .await
                .unwrap();
        }
        w.discard().await.unwrap();
        assert_eq!(std::fs::metadata(staged.path()).unwrap().len(), 0);
        w.push(bytes::Bytes::from_static(b"fresh")).await.unwrap();
        let (size, digest) = w.finish().await.unwrap();
        assert_eq!(
            (size, digest),
            (5, <[u8; 32]>::from(Sha256::digest(b"fresh")))
        );
        assert_eq!(std::fs::read(staged.path()).unwrap(), b"fresh");
    }
}
