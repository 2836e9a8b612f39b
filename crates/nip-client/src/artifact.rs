//! The artifact format: an output directory as a deterministic `tar.zst` (sorted entries, zero
//! mtimes and owners, normalized modes), so the same output always gives the same bytes, and
//! unpacking into `pkgs/` by atomic rename.
use crate::error::{io_ctx, ClientError, Result};
use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A packed artifact in a temp file, with its digest.
pub struct Packed {
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub sha256: String,
}

/// Hashes and counts what passes through to the file.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Packs `dir` into a temp file created in `tmp_dir`, streaming (never the whole archive in memory).
pub fn pack(dir: &Path, tmp_dir: &Path) -> Result<Packed> {
    std::fs::create_dir_all(tmp_dir).map_err(io_ctx(format!("create {}", tmp_dir.display())))?;
    let file = tempfile::NamedTempFile::new_in(tmp_dir)
        .map_err(io_ctx(format!("create a file in {}", tmp_dir.display())))?;
    let ctx = || format!("pack {}", dir.display());
    let out = HashingWriter {
        inner: file.reopen().map_err(io_ctx(ctx()))?,
        hasher: Sha256::new(),
        size: 0,
    };
    let enc = zstd::Encoder::new(out, 3).map_err(io_ctx(ctx()))?;
    let mut tar = tar::Builder::new(enc);
    add_dir(&mut tar, dir, Path::new("")).map_err(io_ctx(ctx()))?;
    let enc = tar.into_inner().map_err(io_ctx(ctx()))?;
    let mut out = enc.finish().map_err(io_ctx(ctx()))?;
    out.flush().map_err(io_ctx(ctx()))?;
    out.inner.sync_all().map_err(io_ctx(ctx()))?;
    Ok(Packed {
        file,
        size: out.size,
        sha256: hex::encode(out.hasher.finalize()),
    })
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn add_dir<W: Write>(tar: &mut tar::Builder<W>, root: &Path, rel: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = rel.join(e.file_name());
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut h, &rel, std::io::empty())?;
            add_dir(tar, root, &rel)?;
        } else if ft.is_symlink() {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            tar.append_link(&mut h, &rel, std::fs::read_link(&path)?)?;
        } else if ft.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let mut h = header(tar::EntryType::Regular, mode, meta.len());
            tar.append_data(&mut h, &rel, std::fs::File::open(&path)?)?;
        }
    }
    Ok(())
}

/// SHA-256 (hex) of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_ctx(format!("open {}", path.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_ctx(format!("read {}", path.display())))?;
    Ok(hex::encode(h.finalize()))
}

/// Bounds on what unpacking one archive may write, so a small hostile archive (a "zstd bomb":
/// 131 KB that decompresses to 4 GiB) cannot fill the disk. An archive may unpack to
/// `max(min_bytes, ratio × its compressed size)` bytes of tar stream (file contents plus the
/// 512-byte headers) in at most `max_entries` entries, counting as entries too the directories
/// their paths imply; past either the unpack stops and everything it wrote is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Always allowed, whatever the archive's size (`policies.maxUnpackBytes`).
    pub min_bytes: u64,
    /// Allowed per compressed byte (`policies.maxUnpackRatio`).
    pub ratio: u64,
    /// Entries (files, directories, links) per archive, each distinct directory a path implies
    /// included (a 255-byte name `a/a/…/f` makes ~127) (`policies.maxUnpackEntries`).
    pub max_entries: u64,
}

impl UnpackLimits {
    /// 256 MiB.
    pub const DEFAULT_MIN_BYTES: u64 = 256 << 20;
    pub const DEFAULT_RATIO: u64 = 100;
    pub const DEFAULT_MAX_ENTRIES: u64 = 250_000;

    /// No bound: only for an archive this machine just packed from its own build output.
    pub const UNLIMITED: UnpackLimits = UnpackLimits {
        min_bytes: u64::MAX,
        ratio: 0,
        max_entries: u64::MAX,
    };

    /// The unpacked bytes allowed for an archive of `archive_size` compressed bytes.
    pub fn max_bytes(&self, archive_size: u64) -> u64 {
        self.min_bytes.max(self.ratio.saturating_mul(archive_size))
    }
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            min_bytes: Self::DEFAULT_MIN_BYTES,
            ratio: Self::DEFAULT_RATIO,
            max_entries: Self::DEFAULT_MAX_ENTRIES,
        }
    }
}

/// `<pkgs>/<key>` from `archive` (checked against its digest by the caller): the package already
/// there when it can be trusted (see [`crate::pkgs`]) or still matches the archive, else unpacked
/// into a temp directory renamed into place, so a crash never leaves a half-unpacked package
/// that looks complete. Holds the package's lock throughout, so a concurrent build of the same
/// package waits and then finds it done.
pub fn unpack(archive: &Path, pkgs: &Path, key: &str, limits: &UnpackLimits) -> Result<PathBuf> {
    let mut locked = crate::pkgs::lock(pkgs, key)?;
    let dest = pkgs.join(key);
    if locked.trusted() {
        return Ok(dest);
    }
    if dest.is_dir() && crate::pkgs::matches_archive(archive, &dest)? {
        locked.mark();
        return Ok(dest);
    }
    let f = std::fs::File::open(archive).map_err(io_ctx(format!("open {}", archive.display())))?;
    let size = f
        .metadata()
        .map_err(io_ctx(format!("stat {}", archive.display())))?
        .len();
    // Large reads: the archive can be hundreds of MiB.
    let r = std::io::BufReader::with_capacity(1 << 20, f);
    unpack_stream(r, size, pkgs, key, limits)?.publish_locked(locked)
}

/// A package unpacked into a temp directory beside its final place, not yet visible there.
/// Dropped without `publish`, it is removed.
pub struct Unpacked {
    tmp: tempfile::TempDir,
    pkgs: PathBuf,
    key: String,
}

impl Unpacked {
    /// Renames the package into `<pkgs>/<key>` and returns that path. A package already there
    /// is kept when it can be trusted (someone else unpacked it concurrently: theirs is as good
    /// as ours), else replaced.
    pub fn publish(self) -> Result<PathBuf> {
        let locked = crate::pkgs::lock(&self.pkgs, &self.key)?;
        self.publish_locked(locked)
    }

    fn publish_locked(self, mut locked: crate::pkgs::Locked) -> Result<PathBuf> {
        let dest = self.pkgs.join(&self.key);
        if locked.trusted() {
            // `self.tmp` is removed when dropped.
            return Ok(dest);
        }
        // A package from an earlier boot that is whole stays, as after a comparison with the
        // archive (a program may be running from it).
        if dest.is_dir() && crate::pkgs::same_tree(&dest, self.tmp.path()) {
            locked.mark();
            return Ok(dest);
        }
        let kept = self.tmp.keep();
        let placed = if std::fs::symlink_metadata(&dest).is_ok() {
            crate::pkgs::replace(&kept, &dest)
        } else {
            std::fs::rename(&kept, &dest).map_err(io_ctx(format!("rename into {}", dest.display())))
        };
        if let Err(e) = placed {
            let _ = std::fs::remove_dir_all(&kept);
            return Err(e);
        }
        locked.mark();
        Ok(dest)
    }
}

/// The decompressed stream, refused past `max` bytes: the hard bound behind the per-entry
/// checks, covering what tar reads besides file contents (headers, long names, pax records).
struct Capped<R> {
    inner: R,
    read: u64,
    max: u64,
    /// Set when the cap refused a read, so the error tar wraps it in can be told apart.
    hit: Rc<Cell<bool>>,
}

impl<R: std::io::Read> std::io::Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read >= self.max {
            self.hit.set(true);
            return Err(std::io::Error::other(format!(
                "unpacks to more than {} bytes",
                self.max
            )));
        }
        let room = usize::try_from(self.max - self.read).unwrap_or(usize::MAX);
        let n = buf.len().min(room);
        let n = self.inner.read(&mut buf[..n])?;
        self.read += n as u64;
        Ok(n)
    }
}

/// Unpacks a `tar.zst` stream of `archive_size` compressed bytes into a temp directory in `pkgs`,
/// to be published as `<pkgs>/<key>` by the caller once it trusts the bytes (e.g. while a
/// download is still being hashed). Past `limits` it stops and removes what it wrote. Modes are
/// normalized as `pack` records them: directories 0755, files 0755 when any execute bit is set,
/// else 0644; never setuid/setgid/sticky, never group or world writable, never the archive's
/// owners.
pub fn unpack_stream(
    archive: impl std::io::BufRead,
    archive_size: u64,
    pkgs: &Path,
    key: &str,
    limits: &UnpackLimits,
) -> Result<Unpacked> {
    std::fs::create_dir_all(pkgs).map_err(io_ctx(format!("create {}", pkgs.display())))?;
    crate::pkgs::sweep(pkgs);
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(pkgs)
        .map_err(io_ctx(format!("create a directory in {}", pkgs.display())))?;
    let root = tmp
        .path()
        .canonicalize()
        .map_err(io_ctx(format!("resolve {}", tmp.path().display())))?;
    let mut unpack = Unpack {
        key,
        limits,
        archive_size,
        max_bytes: limits.max_bytes(archive_size),
        root,
        hit: Rc::new(Cell::new(false)),
        count: 0,
        dirs: Dirs::default(),
    };
    let dec = zstd::Decoder::with_buffer(archive).map_err(|e| unpack.corrupt(e))?;
    let capped = Capped {
        inner: dec,
        read: 0,
        max: unpack.max_bytes,
        hit: Rc::clone(&unpack.hit),
    };
    let mut ar = tar::Archive::new(capped);
    // Only the permission bits (masked below), never the archive's owners or xattrs.
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_mask(0o022);
    let result = (|| -> Result<()> {
        for entry in ar.entries().map_err(|e| unpack.corrupt(e))? {
            let entry = entry.map_err(|e| unpack.failed(e))?;
            unpack.entry(entry)?;
        }
        normalize_modes(&unpack.root)
    })();
    // On error `tmp` is dropped here: everything written so far is removed.
    result?;
    Ok(Unpacked {
        tmp,
        pkgs: pkgs.to_path_buf(),
        key: key.to_string(),
    })
}

/// One unpack under way: its limits, and what it has unpacked so far.
struct Unpack<'a> {
    key: &'a str,
    limits: &'a UnpackLimits,
    archive_size: u64,
    max_bytes: u64,
    /// The (canonical) temp directory entries are unpacked in.
    root: PathBuf,
    /// Set when the decompressed stream passed `max_bytes`.
    hit: Rc<Cell<bool>>,
    /// Entries so far, with the directories their paths imply.
    count: u64,
    dirs: Dirs,
}

impl Unpack<'_> {
    fn corrupt(&self, e: std::io::Error) -> ClientError {
        ClientError::Corrupt(self.key.to_string(), format!("cannot unpack: {e}"))
    }

    /// A read or write error: the byte limit's refusal when it was hit, an I/O error when this
    /// machine's disk is full or read-only, else a corrupt archive.
    fn failed(&self, e: std::io::Error) -> ClientError {
        use std::io::ErrorKind as K;
        if self.hit.get() {
            self.too_big()
        } else if matches!(
            e.kind(),
            K::StorageFull | K::QuotaExceeded | K::ReadOnlyFilesystem
        ) {
            // This machine's disk, not the archive: the archive is kept. (Not PermissionDenied:
            // an archive's symlink into a directory we cannot read gives that too.)
            io_ctx(format!("unpack {}", self.key))(e)
        } else {
            self.corrupt(e)
        }
    }

    fn too_big(&self) -> ClientError {
        ClientError::Refused(
            self.key.to_string(),
            format!(
                "it unpacks to more than {} from a {} archive (limit: max(policies.maxUnpackBytes, \
                 policies.maxUnpackRatio × archive size))",
                human_bytes(self.max_bytes),
                human_bytes(self.archive_size)
            ),
        )
    }

    fn too_many(&self) -> ClientError {
        ClientError::Refused(
            self.key.to_string(),
            format!(
                "it has more than {} entries, counting the directories their paths imply \
                 (limit: policies.maxUnpackEntries)",
                self.limits.max_entries
            ),
        )
    }

    /// Absolute paths and `..` are refused, not skipped as `unpack_in` would: a skipped entry's
    /// path must never reach the mode fix-up.
    fn escapes(&self, name: &[u8]) -> ClientError {
        ClientError::Refused(
            self.key.to_string(),
            format!(
                "entry {} has an absolute path or a `..` component",
                name.escape_ascii()
            ),
        )
    }

    /// Checks one entry against the limits and unpacks it under `root`.
    fn entry<R: std::io::Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        self.count += 1;
        if self.count > self.limits.max_entries {
            return Err(self.too_many());
        }
        // The size the header announces, refused before a byte of it is written.
        if entry.raw_file_position().saturating_add(entry.size()) > self.max_bytes {
            return Err(self.too_big());
        }
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        if !matches!(kind, T::Regular | T::Continuous | T::Directory | T::Symlink) {
            return Err(ClientError::Refused(
                self.key.to_string(),
                format!(
                    "entry {} has type {kind:?}; only files, directories and symlinks are unpacked",
                    entry.path_bytes().escape_ascii()
                ),
            ));
        }
        let rel = relative_path(&entry.path().map_err(|e| self.corrupt(e))?)
            .ok_or_else(|| self.escapes(&entry.path_bytes()))?;
        // `unpack_in` creates every missing parent: count them before it does.
        if let Some(parent) = rel.parent() {
            if !self
                .dirs
                .add(parent, &mut self.count, self.limits.max_entries)
            {
                return Err(self.too_many());
            }
        }
        if kind == T::Directory {
            self.dirs.add_counted(&rel);
        }
        // `unpack_in` also refuses entries that would land outside the target directory (e.g.
        // through a symlink), and skips (`false`) those it will not unpack: refused here.
        let unpacked = entry.unpack_in(&self.root).map_err(|e| self.failed(e))?;
        if !unpacked {
            return Err(self.escapes(&entry.path_bytes()));
        }
        if kind == T::Directory {
            // At once, so a directory recorded read-only still takes its contents (and can be
            // removed if the unpack stops).
            set_mode(&self.root.join(&rel), 0o755)?;
        }
        Ok(())
    }
}

/// An entry's path relative to the target, its `.` components dropped; `None` if it has any
/// component but those and plain names (`..`, a root, a prefix).
pub(crate) fn relative_path(path: &Path) -> Option<PathBuf> {
    use std::path::Component as C;
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            C::Normal(name) => rel.push(name),
            C::CurDir => {}
            C::ParentDir | C::RootDir | C::Prefix(_) => return None,
        }
    }
    Some(rel)
}

/// The directories an unpack has created or seen, as a tree: (parent id, name) → id, the target
/// being 0. Each costs its own name only, however deep, and walking a path costs its length, so a
/// hostile archive's bookkeeping stays within the bounds it is refused at.
#[derive(Default)]
struct Dirs(HashMap<(usize, OsString), usize>);

impl Dirs {
    /// Records `dir` (relative, plain names only) and its ancestors, adding each one not seen
    /// before to `count`; `false` as soon as `count` passes `max`, before it is recorded.
    fn add(&mut self, dir: &Path, count: &mut u64, max: u64) -> bool {
        let mut id = 0;
        for name in dir.iter() {
            let key = (id, name.to_os_string());
            id = match self.0.get(&key) {
                Some(&known) => known,
                None => {
                    *count += 1;
                    if *count > max {
                        return false;
                    }
                    let new = self.0.len() + 1;
                    self.0.insert(key, new);
                    new
                }
            };
        }
        true
    }

    /// Records the directory entry `dir`, already counted as an entry, whose parents are recorded.
    fn add_counted(&mut self, dir: &Path) {
        let mut no_count = 0;
        self.add(dir, &mut no_count, u64::MAX);
    }
}

/// Sets the mode of `path` only if it is a real directory or file: `chmod` follows symlinks, and
/// one in an archive may point anywhere.
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::symlink_metadata(path).map_err(io_ctx(format!("stat {}", path.display())))?;
    if !(meta.is_dir() || meta.is_file()) {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_ctx(format!("chmod {}", path.display())))
}

/// Directories (also those created implicitly for a file's parents, whatever the umask) 0755;
/// files 0755 if any execute bit is set, else 0644. Symlinks are left alone (never followed: only
/// what `symlink_metadata` says is a real directory or file is walked or chmodded).
/// Iterative: a hostile archive may nest directories thousands deep.
fn normalize_modes(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        set_mode(&dir, 0o755)?;
        let rd = std::fs::read_dir(&dir).map_err(io_ctx(format!("read {}", dir.display())))?;
        for e in rd {
            let e = e.map_err(io_ctx(format!("read {}", dir.display())))?;
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path)
                .map_err(io_ctx(format!("stat {}", path.display())))?;
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() {
                let want = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                if mode & 0o7777 != want {
                    set_mode(&path, want)?;
                }
            }
        }
    }
    Ok(())
}

/// `1.5 GiB`, `131 KiB`: sizes in messages.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(dir.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(dir.join("README"), "hello").unwrap();
        std::os::unix::fs::symlink("bin/tool", dir.join("link")).unwrap();
    }

    #[test]
    fn pack_is_deterministic_and_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        sample(&a);
        sample(&b);
        let pa = pack(&a, &t.path().join("tmp")).unwrap();
        let pb = pack(&b, &t.path().join("tmp")).unwrap();
        assert_eq!(pa.sha256, pb.sha256);
        assert_eq!(pa.sha256, file_sha256(pa.file.path()).unwrap());
        assert_eq!(pa.size, std::fs::metadata(pa.file.path()).unwrap().len());
        let limits = UnpackLimits::default();
        let out = unpack(pa.file.path(), &t.path().join("pkgs"), "k", &limits).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("README")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            Path::new("bin/tool")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.tar.zst");
        std::fs::write(&p, b"not zstd at all").unwrap();
        assert!(unpack(&p, &t.path().join("pkgs"), "k", &UnpackLimits::default()).is_err());
        assert!(!t.path().join("pkgs/k").exists());
    }

    /// A zstd frame by hand: the tar `header` as a raw block, then `zeros` zero bytes as RLE
    /// blocks of 128 KiB (4 bytes each): 4 GiB in about 131 KB, the bomb of issue 19.
    fn zstd_bomb(header: &tar::Header, zeros: u64) -> Vec<u8> {
        // Magic, frame header descriptor (no content size, no checksum), window 128 KiB.
        let mut out = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x38];
        let block = |out: &mut Vec<u8>, last: bool, kind: u32, size: u64| {
            let h = u32::from(last) | (kind << 1) | ((size as u32) << 3);
            out.extend_from_slice(&h.to_le_bytes()[..3]);
        };
        block(&mut out, false, 0, 512);
        out.extend_from_slice(header.as_bytes());
        let mut left = zeros;
        while left > 0 {
            let n = left.min(128 << 10);
            left -= n;
            block(&mut out, left == 0, 1, n);
            out.push(0);
        }
        out
    }

    fn file_header(path: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = header(tar::EntryType::Regular, mode, size);
        h.set_path(path).unwrap();
        h.set_cksum();
        h
    }

    /// A `tar.zst` of `entries` (header, data) appended as they are, without normalization.
    fn archive(entries: &[(tar::Header, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(zstd::Encoder::new(Vec::new(), 3).unwrap());
        for (h, data) in entries {
            b.append(h, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    /// What is left in `pkgs`, markers as `.boot/<key>` (the directory itself not counted):
    /// nothing, after a refused unpack.
    fn left_in(pkgs: &Path) -> Vec<String> {
        use crate::pkgs::tests::names;
        let mut left: Vec<String> = names(pkgs).into_iter().filter(|n| n != ".boot").collect();
        left.extend(
            names(&pkgs.join(".boot"))
                .into_iter()
                .map(|n| format!(".boot/{n}")),
        );
        left.sort();
        left
    }

    /// Unpacks `p` into `pkgs`, expecting a refusal that leaves nothing behind; its message.
    fn refused(p: &Path, pkgs: &Path, limits: &UnpackLimits) -> String {
        let err = unpack(p, pkgs, "k", limits).unwrap_err();
        assert!(matches!(err, ClientError::Refused(..)), "{err}");
        assert_eq!(left_in(pkgs), Vec::<String>::new());
        err.to_string()
    }

    fn small_limits() -> UnpackLimits {
        UnpackLimits {
            min_bytes: 1 << 20,
            ratio: 0,
            max_entries: 10,
        }
    }

    #[test]
    fn a_header_announcing_4_gib_is_refused_by_default_before_a_byte_is_written() {
        let t = tempfile::tempdir().unwrap();
        let bomb = zstd_bomb(&file_header("big", 0o644, 4 << 30), (4 << 30) + 1024);
        assert!(bomb.len() < 140_000, "{} bytes", bomb.len());
        let p = t.path().join("bomb.tar.zst");
        std::fs::write(&p, &bomb).unwrap();
        let pkgs = t.path().join("pkgs");
        let err = refused(&p, &pkgs, &UnpackLimits::default());
        assert!(
            err.contains("artifact k refused: it unpacks to more than 256.0 MiB"),
            "{err}"
        );
        assert!(err.contains("policies.maxUnpackRatio"), "{err}");
    }

    #[test]
    fn data_expanding_past_the_limit_is_refused_and_removed() {
        let t = tempfile::tempdir().unwrap();
        // Each file is under the 1 MiB limit; together they are not.
        let entries: Vec<_> = (0..3)
            .map(|i| {
                (
                    file_header(&format!("f{i}"), 0o644, 400 << 10),
                    vec![0u8; 400 << 10],
                )
            })
            .collect();
        let p = t.path().join("a.tar.zst");
        std::fs::write(&p, archive(&entries)).unwrap();
        let pkgs = t.path().join("pkgs");
        let err = refused(&p, &pkgs, &small_limits());
        assert!(err.contains("more than 1.0 MiB"), "{err}");
        // The same archive within a larger bound unpacks.
        let ok = UnpackLimits {
            min_bytes: 2 << 20,
            ..small_limits()
        };
        let out = unpack(&p, &pkgs, "k", &ok).unwrap();
        assert_eq!(std::fs::metadata(out.join("f2")).unwrap().len(), 400 << 10);
    }

    #[test]
    fn metadata_past_the_limit_is_refused_too() {
        // A GNU long name of 2 MiB: tar reads it into memory, not into a file.
        let t = tempfile::tempdir().unwrap();
        let mut long = header(tar::EntryType::GNULongName, 0o644, 2 << 20);
        long.set_path("././@LongLink").unwrap();
        long.set_cksum();
        let p = t.path().join("a.tar.zst");
        std::fs::write(
            &p,
            archive(&[
                (long, vec![b'a'; 2 << 20]),
                (file_header("f", 0o644, 1), b"x".to_vec()),
            ]),
        )
        .unwrap();
        let pkgs = t.path().join("pkgs");
        refused(&p, &pkgs, &small_limits());
    }

    #[test]
    fn more_entries_than_allowed_are_refused_and_removed() {
        let t = tempfile::tempdir().unwrap();
        let entries: Vec<_> = (0..11)
            .map(|i| (file_header(&format!("f{i}"), 0o644, 1), b"x".to_vec()))
            .collect();
        let p = t.path().join("a.tar.zst");
        std::fs::write(&p, archive(&entries)).unwrap();
        let pkgs = t.path().join("pkgs");
        let err = refused(&p, &pkgs, &small_limits());
        assert!(err.contains("more than 10 entries"), "{err}");
        assert!(err.contains("policies.maxUnpackEntries"), "{err}");
        // Ten are fine.
        std::fs::write(&p, archive(&entries[..10])).unwrap();
        assert!(unpack(&p, &pkgs, "k", &small_limits()).is_ok());
    }

    #[test]
    fn the_bound_holds_while_a_download_streams_in() {
        use crate::worker::{Chunk, StreamWorker};
        let t = tempfile::tempdir().unwrap();
        let bomb = zstd_bomb(&file_header("big", 0o644, 4 << 30), (4 << 30) + 1024);
        let pkgs = t.path().join("pkgs");
        let (p, size) = (pkgs.clone(), bomb.len() as u64);
        let mut w = StreamWorker::spawn("unpack", move |r| {
            unpack_stream(r, size, &p, "k", &UnpackLimits::default())
        })
        .unwrap();
        for c in bomb.chunks(16 << 10) {
            w.feed(&Chunk::new(c.to_vec()));
        }
        let err = w.finish().err().expect("refused").to_string();
        assert!(err.contains("refused"), "{err}");
        assert_eq!(left_in(&pkgs), Vec::<String>::new());
    }

    #[test]
    fn devices_and_other_entry_types_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut dev = header(tar::EntryType::Char, 0o666, 0);
        dev.set_path("null").unwrap();
        dev.set_cksum();
        let p = t.path().join("a.tar.zst");
        std::fs::write(&p, archive(&[(dev, Vec::new())])).unwrap();
        let pkgs = t.path().join("pkgs");
        let err = refused(&p, &pkgs, &small_limits());
        assert!(
            err.contains("only files, directories and symlinks"),
            "{err}"
        );
    }

    #[test]
    fn modes_are_normalized_never_setuid_or_world_writable_nor_the_archives_owners() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let dir = |path: &str, mode: u32| {
            let mut h = header(tar::EntryType::Directory, mode, 0);
            h.set_path(path).unwrap();
            h.set_cksum();
            (h, Vec::new())
        };
        let file = |path: &str, mode: u32| {
            let mut h = file_header(path, mode, 2);
            h.set_uid(4242);
            h.set_gid(4242);
            h.set_cksum();
            (h, b"hi".to_vec())
        };
        let p = t.path().join("a.tar.zst");
        std::fs::write(
            &p,
            archive(&[
                file("suid", 0o6755),
                file("sticky", 0o1777),
                file("world", 0o777),
                file("rw", 0o666),
                file("owner-x", 0o700),
                file("none", 0o000),
                dir("d", 0o7777),
                dir("ro", 0o555),
                file("ro/f", 0o600),
                file("implicit/sub/f", 0o4711),
            ]),
        )
        .unwrap();
        // Ten entries and the two directories `implicit/sub/f` implies.
        let limits = UnpackLimits {
            max_entries: 12,
            ..small_limits()
        };
        let out = unpack(&p, &t.path().join("pkgs"), "k", &limits).unwrap();
        let me = std::fs::metadata(t.path()).unwrap();
        let expected = [
            ("", 0o755),
            ("suid", 0o755),
            ("sticky", 0o755),
            ("world", 0o755),
            ("rw", 0o644),
            ("owner-x", 0o755),
            ("none", 0o644),
            ("d", 0o755),
            ("ro", 0o755),
            ("ro/f", 0o644),
            ("implicit", 0o755),
            ("implicit/sub", 0o755),
            ("implicit/sub/f", 0o755),
        ];
        for (rel, mode) in expected {
            let m = std::fs::metadata(out.join(rel)).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, mode, "{rel:?}");
            assert_eq!((m.uid(), m.gid()), (me.uid(), me.gid()), "{rel:?}");
        }
        assert_eq!(std::fs::read(out.join("implicit/sub/f")).unwrap(), b"hi");
    }

    /// A header whose name is written as raw bytes, as a hostile archive may have it (`set_path`
    /// refuses `..` and absolute paths).
    fn raw_header(kind: tar::EntryType, mode: u32, name: &[u8]) -> tar::Header {
        let mut h = header(kind, mode, 0);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        h
    }

    fn symlink_header(path: &str, target: &Path) -> tar::Header {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        h.set_path(path).unwrap();
        h.set_link_name(target).unwrap();
        h.set_cksum();
        h
    }

    /// A file outside the unpack target, mode 0600, for an archive to aim at.
    fn victim(t: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let v = t.join("outside/id_ed25519");
        std::fs::create_dir_all(v.parent().unwrap()).unwrap();
        std::fs::write(&v, "secret").unwrap();
        std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o600)).unwrap();
        v
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    /// Asserts the file [`victim`] made still has its mode and contents.
    #[track_caller]
    fn assert_victim_untouched(v: &Path) {
        assert_eq!(mode_of(v), 0o600);
        assert_eq!(std::fs::read_to_string(v).unwrap(), "secret");
    }

    /// A symlink `link -> target`, then a directory entry `dir` (raw) that resolves through it.
    fn symlink_then_dir(link: &str, target: &Path, dir: &[u8]) -> Vec<u8> {
        archive(&[
            (symlink_header(link, target), Vec::new()),
            (
                raw_header(tar::EntryType::Directory, 0o755, dir),
                Vec::new(),
            ),
        ])
    }

    #[test]
    fn a_dotdot_directory_behind_a_symlink_cannot_chmod_a_file_outside() {
        // The review's attack: `a -> victim`, then a directory `a/..`, which tar skips and the
        // mode fix-up used to resolve to `a`, chmodding the victim 0755 through the symlink.
        let t = tempfile::tempdir().unwrap();
        let v = victim(t.path());
        let p = t.path().join("a.tar.zst");
        std::fs::write(&p, symlink_then_dir("a", &v, b"a/..")).unwrap();
        let pkgs = t.path().join("pkgs");
        let err = refused(&p, &pkgs, &small_limits());
        assert_victim_untouched(&v);
        assert!(err.contains("a/.."), "{err}");
    }

    #[test]
    fn absolute_and_dotdot_paths_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let pkgs = t.path().join("pkgs");
        let p = t.path().join("a.tar.zst");
        for (kind, name) in [
            (tar::EntryType::Directory, &b"/abs"[..]),
            (tar::EntryType::Regular, b"/abs/f"),
            (tar::EntryType::Directory, b".."),
            (tar::EntryType::Regular, b"d/../f"),
            (tar::EntryType::Regular, b"../f"),
        ] {
            std::fs::write(
                &p,
                archive(&[
                    (file_header("ok", 0o644, 1), b"x".to_vec()),
                    (raw_header(kind, 0o755, name), Vec::new()),
                ]),
            )
            .unwrap();
            refused(&p, &pkgs, &small_limits());
        }
        assert!(!t.path().join("abs").exists() && !t.path().join("f").exists());
    }

    #[test]
    fn modes_are_never_set_through_a_symlink() {
        // A symlink to a file outside is kept as a link; neither the directory fix-up nor the
        // final pass touches its target.
        let t = tempfile::tempdir().unwrap();
        let v = victim(t.path());
        let p = t.path().join("a.tar.zst");
        std::fs::write(
            &p,
            archive(&[
                (symlink_header("l", &v), Vec::new()),
                (symlink_header("d", v.parent().unwrap()), Vec::new()),
            ]),
        )
        .unwrap();
        let out = unpack(&p, &t.path().join("pkgs"), "k", &small_limits()).unwrap();
        assert_eq!(std::fs::read_link(out.join("l")).unwrap(), v);
        assert_victim_untouched(&v);
        // A directory entry over a symlink to a directory outside is refused, its target untouched.
        use std::os::unix::fs::PermissionsExt;
        let outside = v.parent().unwrap();
        std::fs::set_permissions(outside, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(&p, symlink_then_dir("d", outside, b"d")).unwrap();
        let pkgs = t.path().join("pkgs2");
        assert!(unpack(&p, &pkgs, "k", &small_limits()).is_err());
        assert_eq!(mode_of(outside), 0o700);
        assert_eq!(left_in(&pkgs), Vec::<String>::new());
    }

    #[test]
    fn directories_implied_by_deep_paths_count_toward_the_entries_limit() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.tar.zst");
        let pkgs = t.path().join("pkgs");
        // Two entries imply twelve directories: fourteen against a limit of ten.
        let deep = |top: &str| {
            (
                file_header(&format!("{top}/a/a/a/a/a/f"), 0o644, 1),
                b"x".to_vec(),
            )
        };
        std::fs::write(&p, archive(&[deep("x1"), deep("x2")])).unwrap();
        let err = refused(&p, &pkgs, &small_limits());
        assert!(err.contains("more than 10 entries"), "{err}");
        assert!(err.contains("policies.maxUnpackEntries"), "{err}");
        // The review's shape: one 255-byte ustar name, ~127 directories in one header.
        let mut name = "x1".to_string();
        while name.len() + 4 <= 255 {
            name.push_str("/a");
        }
        name.push_str("/f");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_path(&name).unwrap();
        h.set_cksum();
        assert!(h.as_ustar().is_some() && name.len() > 250);
        std::fs::write(&p, archive(&[(h, b"x".to_vec())])).unwrap();
        let err = unpack(&p, &pkgs, "k", &UnpackLimits::default()).map(|_| ());
        assert!(err.is_ok(), "{err:?}");
        let limits = UnpackLimits {
            max_entries: 100,
            ..small_limits()
        };
        let err = unpack(&p, &pkgs, "k2", &limits).unwrap_err().to_string();
        assert!(err.contains("more than 100 entries"), "{err}");
        assert_eq!(
            left_in(&pkgs),
            [".boot/k", "k"],
            "only the first package and its marker"
        );
        // Directories shared between entries, or given as entries, count once: eight entries (one
        // of them the directory `d`) and the directories `d/e` and `d/e/f` make ten.
        let file = |path: &str| (file_header(path, 0o644, 1), b"x".to_vec());
        let dir = |path: &str| {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            h.set_path(path).unwrap();
            h.set_cksum();
            (h, Vec::new())
        };
        let ok = [
            dir("d"),
            file("d/e/f/1"),
            file("d/e/f/2"),
            file("d/e/f/3"),
            file("d/e/4"),
            file("d/5"),
            file("6"),
            file("7"),
        ];
        std::fs::write(&p, archive(&ok)).unwrap();
        let out = unpack(&p, &pkgs, "k3", &small_limits()).unwrap();
        assert_eq!(std::fs::read(out.join("d/e/f/3")).unwrap(), b"x");
        // The same entries with one file a directory deeper: eleven.
        let mut over = ok.to_vec();
        over[7] = file("d/e/g/7");
        std::fs::write(&p, archive(&over)).unwrap();
        assert!(unpack(&p, &pkgs, "k4", &small_limits()).is_err());
        assert!(!pkgs.join("k4").exists());
    }
}
