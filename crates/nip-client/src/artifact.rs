//! The artifact format: an output directory as a deterministic `tar.zst` (sorted entries, zero
//! mtimes and owners, normalized modes), so the same output always gives the same bytes, and
//! unpacking into `pkgs/` by atomic rename.
use crate::error::{io_ctx, ClientError, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Unpacks `archive` into `<pkgs>/<key>` unless it is already there, via a temp directory renamed
/// into place, so a crash never leaves a half-unpacked package that looks complete.
pub fn unpack(archive: &Path, pkgs: &Path, key: &str) -> Result<PathBuf> {
    let dest = pkgs.join(key);
    if dest.is_dir() {
        return Ok(dest);
    }
    let f = std::fs::File::open(archive).map_err(io_ctx(format!("open {}", archive.display())))?;
    // Large reads: the archive can be hundreds of MiB.
    unpack_stream(std::io::BufReader::with_capacity(1 << 20, f), pkgs, key)?.publish()
}

/// A package unpacked into a temp directory beside its final place, not yet visible there.
/// Dropped without `publish`, it is removed.
pub struct Unpacked {
    tmp: tempfile::TempDir,
    dest: PathBuf,
}

impl Unpacked {
    /// Renames the package into `<pkgs>/<key>` and returns that path.
    pub fn publish(self) -> Result<PathBuf> {
        let kept = self.tmp.keep();
        if let Err(e) = std::fs::rename(&kept, &self.dest) {
            let _ = std::fs::remove_dir_all(&kept);
            // Someone else unpacked it concurrently: theirs is as good as ours.
            if !self.dest.is_dir() {
                return Err(io_ctx(format!("rename into {}", self.dest.display()))(e));
            }
        }
        Ok(self.dest)
    }
}

/// Unpacks a `tar.zst` stream into a temp directory in `pkgs`, to be published as `<pkgs>/<key>`
/// by the caller once it trusts the bytes (e.g. while a download is still being hashed).
pub fn unpack_stream(archive: impl std::io::BufRead, pkgs: &Path, key: &str) -> Result<Unpacked> {
    std::fs::create_dir_all(pkgs).map_err(io_ctx(format!("create {}", pkgs.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(pkgs)
        .map_err(io_ctx(format!("create a directory in {}", pkgs.display())))?;
    let corrupt =
        |e: std::io::Error| ClientError::Corrupt(key.to_string(), format!("cannot unpack: {e}"));
    let dec = zstd::Decoder::with_buffer(archive).map_err(corrupt)?;
    let mut ar = tar::Archive::new(dec);
    ar.set_preserve_permissions(true);
    // `unpack` refuses entries that would land outside the target directory.
    ar.unpack(tmp.path()).map_err(corrupt)?;
    Ok(Unpacked {
        tmp,
        dest: pkgs.join(key),
    })
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
        let out = unpack(pa.file.path(), &t.path().join("pkgs"), "k").unwrap();
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
        assert!(unpack(&p, &t.path().join("pkgs"), "k").is_err());
        assert!(!t.path().join("pkgs/k").exists());
    }
}
