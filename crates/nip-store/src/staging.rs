//! Staging area for incoming bytes: temp files that are hashed while written, fsynced, and only
//! then published. A staged file that is dropped unpublished is deleted.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::blob::StoreError;

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
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            (&*file).write_all(&data)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
        .map_err(StoreError::from_io)
    }

    /// Flushes the bytes to stable storage.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            .map_err(StoreError::from_io)
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
