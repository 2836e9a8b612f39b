//! Pieces of a stored file handed out as mappings of the page cache (Linux). A response then
//! goes from the page cache to the socket in one copy, where reading first copied every piece
//! into a buffer: about a fifth of the CPU of serving a big NAR, which decides throughput when
//! many clients share the cores.
//!
//! Why a mapping is safe here: published blobs are never changed in place. They are replaced by
//! rename and removed by unlink, and either leaves a mapped inode intact, so a response that holds
//! a piece keeps valid bytes. The pages are brought in when mapped and checked to be in memory, so
//! a read error shows as an error of the read that falls back, not as a fault later.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use bytes::Bytes;

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

/// `len` bytes of `file` from `offset`, mapped with every page in memory; `None` when they
/// cannot be (nothing to map, the file is shorter, a page could not be read, mmap failed): the
/// caller reads them instead.
pub fn map(file: &File, offset: u64, len: usize) -> Option<Bytes> {
    if len == 0 {
        return None;
    }
    let page = page_size();
    let start = offset - offset % page;
    let skip = (offset - start) as usize;
    let map_len = skip.checked_add(len)?;
    // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the address.
    // MAP_POPULATE reads the pages in now (errors are not reported: `mincore` checks below).
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            libc::off_t::try_from(start).ok()?,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    let mapping = Mapping {
        ptr: NonNull::new(ptr)?,
        map_len,
        skip,
        len,
    };
    let pages = map_len.div_ceil(page as usize);
    let mut resident = vec![0u8; pages];
    // SAFETY: `ptr` is page-aligned (mmap's result), `map_len` lies within the mapping and
    // `resident` has one byte per page of it.
    let rc = unsafe { libc::mincore(ptr, map_len, resident.as_mut_ptr()) };
    // A page past the end of the file, or one the kernel could not read, is not resident:
    // touching it would fault (SIGBUS), so such a piece is read instead.
    if rc != 0 || resident.iter().any(|r| r & 1 == 0) {
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
        for (offset, len) in [(0, 300_000), (1, 5000), (4095, 4097), (123_457, 100_000)] {
            let piece = map(&f, offset as u64, len).expect("mapped");
            assert_eq!(&piece[..], &data[offset..offset + len], "at {offset}");
        }
        // Past the end, or nothing: not mapped (the caller reads, and sees the short file).
        assert!(map(&f, 299_000, 8192).is_none());
        assert!(map(&f, 0, 0).is_none());
    }

    #[test]
    fn a_piece_outlives_the_file_s_name_and_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![42u8; 100_000]).unwrap();
        let f = File::open(&path).unwrap();
        let piece = map(&f, 0, 100_000).unwrap();
        // Removed (eviction) and replaced (a new publish renames over it) while a response holds
        // the piece: it keeps the bytes it had.
        drop(f);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![7u8; 100_000]).unwrap();
        assert!(piece.iter().all(|b| *b == 42));
    }
}
