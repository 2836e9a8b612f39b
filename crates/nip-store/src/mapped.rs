//! Pieces of a stored file handed out as mappings of the page cache (Linux). A response then
//! goes from the page cache to the socket in one copy, where reading first copied every piece
//! into a buffer: about a fifth of the CPU of serving a big NAR, which decides throughput when
//! many clients share the cores.
//!
//! Why a mapping is safe here: published blobs are never changed in place. They are replaced by
//! rename and removed by unlink, and either leaves a mapped inode intact, so a response that holds
//! a piece keeps valid bytes (a store edited in place under a running server, e.g. `rsync
//! --inplace`, is not). The pages are read in when mapped, and a piece whose pages cannot all be
//! read is copied instead, so a read error shows as the copy's error. (A page the kernel drops
//! and then fails to read again before the piece is sent is still a fault: a narrow window.)
//! Mappings in use are bounded, far below the kernel's per-process limit: past the bound pieces
//! are copied.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Mappings in use at most: 2 GiB of 256 KiB pieces, two per response, where the kernel allows a
/// process about 65 000 mappings (`vm.max_map_count`) in all, its allocator's included.
const MAX_IN_USE: usize = 8192;
static IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Mappings in use now.
#[cfg(test)]
pub fn in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// A read-only mapping, unmapped on drop. `bytes` of it start `skip` bytes in (the mapping
/// starts on a page boundary).
struct Mapping {
    ptr: NonNull<libc::c_void>,
    map_len: usize,
    skip: usize,
    len: usize,
}

// SAFETY: the mapping is private to this value and read-only; nothing writes through it, so
// sharing or moving it across threads is sound.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `skip + len <= map_len`, and the mapping lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts((self.ptr.as_ptr() as *const u8).add(self.skip), self.len)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `map_len` are what mmap returned and was given; unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr(), self.map_len);
        }
        IN_USE.fetch_sub(1, Ordering::Relaxed);
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// `len` bytes of `file` (of `file_len` bytes) from `offset`, mapped with every page read in;
/// `None` when they are not to be mapped (nothing to map, past the end of the file, too many
/// mappings in use) or cannot be (a page could not be read, an old kernel, mmap failed): the
/// caller copies them instead.
pub fn map(file: &File, file_len: u64, offset: u64, len: usize) -> Option<Bytes> {
    if len == 0 || offset.checked_add(len as u64)? > file_len {
        return None;
    }
    let page = page_size();
    let start = offset - offset % page;
    let skip = (offset - start) as usize;
    let map_len = skip.checked_add(len)?;
    let start = libc::off_t::try_from(start).ok()?;
    if IN_USE.fetch_add(1, Ordering::Relaxed) >= MAX_IN_USE {
        IN_USE.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start,
        )
    };
    let Some(ptr) = NonNull::new(ptr).filter(|p| p.as_ptr() != libc::MAP_FAILED) else {
        IN_USE.fetch_sub(1, Ordering::Relaxed);
        return None;
    };
    // Unmapped (and uncounted) on drop from here on.
    let mapping = Mapping {
        ptr,
        map_len,
        skip,
        len,
    };
    // Reads every page in now. It fails (EFAULT) where touching a page would fault (SIGBUS): an
    // I/O error, or a page past the end of the file; EINVAL before Linux 5.14. Either way the
    // piece is copied instead.
    // SAFETY: the range is exactly the mapping made above.
    let rc = unsafe { libc::madvise(ptr.as_ptr(), map_len, libc::MADV_POPULATE_READ) };
    if rc != 0 {
        return None;
    }
    Some(Bytes::from_owner(mapping))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn pieces_match_the_file_wherever_they_start() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let size = data.len() as u64;
        for (offset, len) in [(0, 300_000), (1, 5000), (4095, 4097), (123_457, 100_000)] {
            let piece = map(&f, size, offset as u64, len).expect("mapped");
            assert_eq!(&piece[..], &data[offset..offset + len], "at {offset}");
        }
        // Past the end (also within the last page, which the kernel would fill with zeros), or
        // nothing: not mapped (the caller copies, and sees the short file).
        assert!(map(&f, size, 299_500, 1000).is_none());
        assert!(map(&f, size, 299_000, 8192).is_none());
        assert!(map(&f, size, 0, 0).is_none());
        // A file that is shorter than the caller believes: the pages past its end cannot be
        // read in, so nothing is mapped.
        assert!(map(&f, size + 100_000, 290_000, 50_000).is_none());
    }

    #[test]
    fn a_piece_outlives_the_file_s_name_and_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![42u8; 100_000]).unwrap();
        let f = File::open(&path).unwrap();
        let piece = map(&f, 100_000, 0, 100_000).unwrap();
        // Removed (eviction) and replaced (a new publish renames over it) while a response holds
        // the piece: it keeps the bytes it had.
        drop(f);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![7u8; 100_000]).unwrap();
        assert!(piece.iter().all(|b| *b == 42));
    }
}
