//! Which unpacked packages in `pkgs/` can be used as they are.
//!
//! Unpacked files are not fsynced (a package can hold thousands; Nix does not fsync store paths
//! either), so a machine that crashes may lose writes still in the page cache and leave a package
//! truncated under its final name. A package is therefore trusted as it is only during the boot
//! that unpacked or checked it, which a marker `.boot/<key>` beside it records (the kernel's boot
//! id; in a directory of their own, so a 255-byte key still makes a valid name). After a reboot
//! its first use compares it with its archive, already checked against its digest; one that
//! differs is unpacked again. Without a boot id (not Linux, or no `/proc`),
//! packages are trusted. The marker is also the package's lock: every check, publish and mark
//! holds it, so concurrent `nip build`s never replace a package another one just published.
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::artifact::relative_path;
use crate::error::{io_ctx, Result};

/// This boot's id, read once.
fn this_boot() -> Option<&'static str> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

fn marker(pkgs: &Path, key: &str) -> PathBuf {
    markers_dir(pkgs).join(key)
}

/// The directory of the markers, in `pkgs`.
const MARKERS: &str = ".boot";

fn markers_dir(pkgs: &Path) -> PathBuf {
    pkgs.join(MARKERS)
}

/// The exclusive lock on one package, held through its marker file.
pub struct Locked {
    file: File,
    dest: PathBuf,
    marker: PathBuf,
}

/// Waits for the lock on `<pkgs>/<key>`.
pub fn lock(pkgs: &Path, key: &str) -> Result<Locked> {
    let dir = markers_dir(pkgs);
    std::fs::create_dir_all(&dir).map_err(io_ctx(format!("create {}", dir.display())))?;
    let path = marker(pkgs, key);
    let ctx = || format!("lock {}", path.display());
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_ctx(ctx()))?;
        file.lock().map_err(io_ctx(ctx()))?;
        // The file may have been removed while we waited: then lock the one now there.
        if still_at(&file, &path) {
            return Ok(Locked {
                file,
                dest: pkgs.join(key),
                marker: path,
            });
        }
    }
}

/// Whether `file` is still the one at `path` (not removed or replaced since it was opened).
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

impl Locked {
    /// Whether the package exists and was unpacked or checked during this boot.
    pub fn trusted(&mut self) -> bool {
        if !self.dest.is_dir() {
            return false;
        }
        let Some(id) = this_boot() else {
            return true;
        };
        let mut text = String::new();
        std::io::Seek::rewind(&mut self.file).is_ok()
            && self.file.read_to_string(&mut text).is_ok()
            && text.trim() == id
    }

    /// Records that the package is complete in this boot. Not fsynced: a crash changes the boot
    /// id anyway. A failed write only costs a check on the next use.
    pub fn mark(&mut self) {
        if let Some(id) = this_boot() {
            let _ = self.file.set_len(0);
            let _ = std::io::Seek::rewind(&mut self.file);
            let _ = self.file.write_all(id.as_bytes());
        }
    }
}

impl Drop for Locked {
    /// A marker without its package (an unpack that failed) goes, while the lock is still held:
    /// waiters that opened it see it gone and open a new one.
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.dest).is_err() {
            let _ = std::fs::remove_file(&self.marker);
        }
    }
}

/// Whether `<pkgs>/<key>` exists and can be used without reading it. A package that does not
/// exist is answered without taking its lock.
pub fn trusted(pkgs: &Path, key: &str) -> Result<bool> {
    if !pkgs.join(key).is_dir() {
        return Ok(false);
    }
    Ok(lock(pkgs, key)?.trusted())
}

/// Puts the complete package `fresh` in the place of `dest`, which exists but cannot be trusted,
/// under its lock. The old tree is moved aside first and put back if `fresh` cannot take its
/// place, so `dest` is missing only between two renames.
pub fn replace(fresh: &Path, dest: &Path) -> Result<()> {
    let pkgs = dest.parent().unwrap_or(Path::new("."));
    let aside = tempfile::Builder::new()
        .prefix(".stale-")
        .tempdir_in(pkgs)
        .map_err(io_ctx(format!("create a directory in {}", pkgs.display())))?;
    let old = aside.path().join("old");
    std::fs::rename(dest, &old).map_err(io_ctx(format!("move {} aside", dest.display())))?;
    if let Err(e) = std::fs::rename(fresh, dest) {
        if std::fs::rename(&old, dest).is_err() {
            // Keep the old tree rather than delete it with `aside`.
            let _ = aside.keep();
        }
        return Err(io_ctx(format!("rename into {}", dest.display()))(e));
    }
    // `aside` is removed with the old tree in it when dropped here.
    Ok(())
}

/// Temp and moved-aside trees older than this (by their modification time) are leftovers of a
/// crashed unpack, not one under way.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes what crashed unpacks left in `pkgs`: temp trees (`.unpack-*`) and moved-aside ones
/// (`.stale-*`) a day old, and markers whose package is gone. Errors are ignored: only disk
/// space is at stake.
pub fn sweep(pkgs: &Path) {
    let Ok(rd) = std::fs::read_dir(pkgs) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && (name.starts_with(".unpack-") || name.starts_with(".stale-")) {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > LEFTOVER_AGE));
            if old {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let Ok(rd) = std::fs::read_dir(markers_dir(pkgs)) else {
        return;
    };
    for e in rd.flatten() {
        if let Some(key) = e.file_name().to_str() {
            remove_orphan_marker(pkgs, key);
        }
    }
}

/// Removes the marker of a package that is gone, unless someone holds its lock.
fn remove_orphan_marker(pkgs: &Path, key: &str) {
    if pkgs.join(key).exists() {
        return;
    }
    let path = marker(pkgs, key);
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(&path) else {
        return;
    };
    // Locked and still the file at `path`: another sweep may have removed this one and someone
    // may hold the new one.
    if file.try_lock().is_ok() && still_at(&file, &path) && !pkgs.join(key).exists() {
        // Waiters that opened it before see it gone once they hold it, and open a new one.
        let _ = std::fs::remove_file(&path);
    }
}

/// One entry of an unpacked tree, as the archive must describe it.
struct Node {
    kind: Kind,
    /// Given by the archive, or implied by an entry below it.
    seen: bool,
}

#[derive(PartialEq)]
enum Kind {
    Dir,
    File {
        size: u64,
        exec: bool,
    },
    /// The target as bytes: `Path`'s equality would take `lib/` for `lib`.
    Symlink(std::ffi::OsString),
}

/// The tree under `dest`, walked without following symlinks, and the most bytes an archive of
/// it can take (data rounded up to tar's 512-byte blocks, a header and long-name and long-link
/// records for each entry); `None` when it cannot be read (it then does not match anything).
fn walk(dest: &Path) -> Option<(HashMap<PathBuf, Node>, u64)> {
    use std::os::unix::fs::PermissionsExt;
    let (mut nodes, mut bytes) = (HashMap::new(), 0u64);
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for e in std::fs::read_dir(dest.join(&rel)).ok()? {
            let e = e.ok()?;
            let rel = rel.join(e.file_name());
            let meta = std::fs::symlink_metadata(e.path()).ok()?;
            bytes += 3 * 1024 + rel.as_os_str().len() as u64;
            let kind = if meta.is_dir() {
                dirs.push(rel.clone());
                Kind::Dir
            } else if meta.is_symlink() {
                let target = std::fs::read_link(e.path()).ok()?;
                bytes += target.as_os_str().len() as u64;
                Kind::Symlink(target.into_os_string())
            } else if meta.is_file() {
                bytes += meta.len().div_ceil(512) * 512;
                Kind::File {
                    size: meta.len(),
                    exec: meta.permissions().mode() & 0o111 != 0,
                }
            } else {
                return None;
            };
            nodes.insert(rel, Node { kind, seen: false });
        }
    }
    Some((nodes, bytes))
}

/// Whether the trees at `a` and `b` hold the same paths, kinds, files (bytes and executable bit)
/// and symlink targets; `false` when either cannot be read.
pub fn same_tree(a: &Path, b: &Path) -> bool {
    let (Some((x, _)), Some((y, _))) = (walk(a), walk(b)) else {
        return false;
    };
    x.len() == y.len()
        && x.iter().all(|(rel, n)| {
            y.get(rel).is_some_and(|m| {
                n.kind == m.kind
                    && match n.kind {
                        Kind::File { size, .. } => std::fs::File::open(a.join(rel))
                            .is_ok_and(|mut f| same_bytes(&mut f, &b.join(rel), size)),
                        _ => true,
                    }
            })
        })
}

/// Whether the tree at `dest` holds exactly what `archive` unpacks to: the same paths (walked
/// without following symlinks), files with the same bytes and executable bit, symlinks with the
/// same targets, directories, and nothing else. The archive is read at most about as far as the
/// tree's own size allows, so a hostile archive costs no more than the tree it is compared with.
pub fn matches_archive(archive: &Path, dest: &Path) -> Result<bool> {
    let ctx = || format!("compare {} with {}", dest.display(), archive.display());
    let Some((mut nodes, bytes)) = walk(dest) else {
        return Ok(false);
    };
    let f = std::fs::File::open(archive).map_err(io_ctx(ctx()))?;
    let Ok(dec) = zstd::Decoder::new(f) else {
        return Ok(false);
    };
    // An archive that needs more has something the tree does not (the slack: its end, and
    // records such as pax headers).
    let room = bytes + (64 << 10);
    let mut ar = tar::Archive::new(dec.take(room));
    let matched = (|| -> Result<bool> {
        let Ok(entries) = ar.entries() else {
            return Ok(false);
        };
        for entry in entries {
            let Ok(mut entry) = entry else {
                return Ok(false);
            };
            let Some(rel) = entry.path().ok().and_then(|p| relative_path(&p)) else {
                return Ok(false);
            };
            if rel.as_os_str().is_empty() {
                // The package directory itself.
                if entry.header().entry_type() != tar::EntryType::Directory {
                    return Ok(false);
                }
                continue;
            }
            let Some(node) = nodes.get(&rel) else {
                return Ok(false);
            };
            if !entry_matches(&mut entry, &node.kind, &dest.join(&rel)) {
                return Ok(false);
            }
            for p in rel.ancestors().filter(|p| !p.as_os_str().is_empty()) {
                match nodes.get_mut(p) {
                    Some(n) if n.seen => break,
                    Some(n) => n.seen = true,
                    None => return Ok(false),
                }
            }
        }
        Ok(true)
    })()?;
    // Stopped at `room`: the rest was never compared.
    let cut = ar.into_inner().limit() == 0;
    Ok(matched && !cut && nodes.values().all(|n| n.seen))
}

fn entry_matches<R: Read>(entry: &mut tar::Entry<'_, R>, kind: &Kind, path: &Path) -> bool {
    use tar::EntryType as T;
    match (entry.header().entry_type(), kind) {
        (T::Directory, Kind::Dir) => true,
        (T::Symlink, Kind::Symlink(have)) => {
            // As bytes: `Path`'s equality would take `a//b` for `a/b`.
            matches!(entry.link_name(), Ok(Some(want)) if want.as_os_str() == have.as_os_str())
        }
        (T::Regular | T::Continuous, Kind::File { size, exec }) => {
            let want_exec = entry.header().mode().unwrap_or(0) & 0o111 != 0;
            entry.size() == *size && want_exec == *exec && same_bytes(entry, path, *size)
        }
        _ => false,
    }
}

/// Whether `a` yields exactly `size` bytes, the same as the file at `path`.
fn same_bytes(a: &mut impl Read, path: &Path, size: u64) -> bool {
    let Ok(mut b) = std::fs::File::open(path) else {
        return false;
    };
    let (mut x, mut y) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut read = 0u64;
    loop {
        let n = match a.read(&mut x) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            // The file must end here too.
            return read == size && matches!(b.read(&mut y[..1]), Ok(0));
        }
        read += n as u64;
        if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
            return false;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::artifact::{pack, unpack, UnpackLimits};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::Duration;

    /// A package (a file, an executable, a symlink, a nested directory) packed, and unpacked
    /// into `<tmp>/pkgs/k`: (pkgs, the archive's path).
    fn unpacked(t: &Path) -> (PathBuf, PathBuf) {
        let out = t.join("out");
        std::fs::create_dir_all(out.join("bin/deep")).unwrap();
        std::fs::write(out.join("bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(out.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(out.join("README"), vec![b'r'; 200_000]).unwrap();
        std::os::unix::fs::symlink("bin/tool", out.join("link")).unwrap();
        let packed = pack(&out, &t.join("tmp")).unwrap();
        let (_, archive) = packed.file.keep().unwrap();
        let pkgs = t.join("pkgs");
        unpack(&archive, &pkgs, "k", &UnpackLimits::default()).unwrap();
        (pkgs, archive)
    }

    /// What `dir` holds, sorted; nothing if it does not exist.
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn boot() -> &'static str {
        this_boot().expect("Linux has a boot id")
    }

    #[test]
    fn a_package_matches_its_archive_until_anything_in_it_changes() {
        let t = tempfile::tempdir().unwrap();
        let (pkgs, archive) = unpacked(t.path());
        let dest = pkgs.join("k");
        let check = || matches_archive(&archive, &dest).unwrap();
        assert!(check());
        let readme = dest.join("README");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&readme)
            .unwrap();
        f.set_len(4096).unwrap();
        assert!(!check(), "a truncated file");
        std::fs::write(&readme, vec![b'r'; 200_000]).unwrap();
        assert!(check());
        let mut bytes = vec![b'r'; 200_000];
        bytes[150_000] = 0;
        std::fs::write(&readme, &bytes).unwrap();
        assert!(!check(), "a file of the same size with other bytes");
        std::fs::write(&readme, vec![b'r'; 200_000]).unwrap();
        std::fs::write(dest.join("bin/deep/extra"), "x").unwrap();
        assert!(!check(), "an extra file");
        std::fs::remove_file(dest.join("bin/deep/extra")).unwrap();
        assert!(check());
        let tool = dest.join("bin/tool");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!check(), "an executable that lost its execute bit");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_file(dest.join("link")).unwrap();
        std::os::unix::fs::symlink("README", dest.join("link")).unwrap();
        assert!(!check(), "a symlink to elsewhere");
        std::fs::remove_file(dest.join("link")).unwrap();
        std::os::unix::fs::symlink("bin//tool", dest.join("link")).unwrap();
        assert!(!check(), "a symlink written otherwise");
        std::fs::remove_file(dest.join("link")).unwrap();
        assert!(!check(), "a missing entry");
        std::os::unix::fs::symlink("bin/tool", dest.join("link")).unwrap();
        assert!(check());
        std::fs::remove_dir(dest.join("bin/deep")).unwrap();
        assert!(!check(), "a missing directory");
    }

    #[test]
    fn after_a_reboot_a_damaged_package_is_unpacked_again_and_a_whole_one_kept() {
        let t = tempfile::tempdir().unwrap();
        let (pkgs, archive) = unpacked(t.path());
        let limits = UnpackLimits::default();
        let (dest, mark_file) = (pkgs.join("k"), marker(&pkgs, "k"));
        assert_eq!(std::fs::read_to_string(&mark_file).unwrap(), boot());
        assert!(trusted(&pkgs, "k").unwrap());
        let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let readme_inode = inode(&dest.join("README"));

        // A reboot after the unpack's writes reached the disk: compared, kept as it is.
        std::fs::write(&mark_file, "an-earlier-boot").unwrap();
        assert!(!trusted(&pkgs, "k").unwrap());
        assert_eq!(unpack(&archive, &pkgs, "k", &limits).unwrap(), dest);
        assert_eq!(
            inode(&dest.join("README")),
            readme_inode,
            "not unpacked again"
        );
        assert!(trusted(&pkgs, "k").unwrap());

        // A crash that lost some of them: unpacked again, in place of the damaged tree.
        std::fs::write(&mark_file, "an-earlier-boot").unwrap();
        std::fs::write(dest.join("README"), "").unwrap();
        assert_eq!(unpack(&archive, &pkgs, "k", &limits).unwrap(), dest);
        assert_eq!(
            std::fs::read(dest.join("README")).unwrap(),
            vec![b'r'; 200_000]
        );
        assert_ne!(inode(&dest.join("README")), readme_inode);
        assert!(trusted(&pkgs, "k").unwrap());
        // Nothing left beside it but its marker (no temp or moved-aside trees).
        assert_eq!(names(&pkgs), [".boot", "k"]);

        // In this boot a package is used without being read at all, even if changed since.
        std::fs::write(dest.join("README"), "").unwrap();
        unpack(&archive, &pkgs, "k", &limits).unwrap();
        assert_eq!(std::fs::read(dest.join("README")).unwrap(), b"");
    }

    #[test]
    fn a_package_unpacked_meanwhile_or_whole_is_kept_and_a_damaged_one_replaced() {
        let t = tempfile::tempdir().unwrap();
        let (pkgs, archive) = unpacked(t.path());
        let dest = pkgs.join("k");
        let f = std::fs::File::open(&archive).unwrap();
        let size = f.metadata().unwrap().len();
        let stream = || {
            crate::artifact::unpack_stream(
                std::io::BufReader::new(std::fs::File::open(&archive).unwrap()),
                size,
                &pkgs,
                "k",
                &UnpackLimits::default(),
            )
            .unwrap()
        };
        let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let theirs = inode(&dest.join("README"));
        assert_eq!(stream().publish().unwrap(), dest);
        assert_eq!(
            inode(&dest.join("README")),
            theirs,
            "trusted: theirs is kept"
        );
        std::fs::write(marker(&pkgs, "k"), "an-earlier-boot").unwrap();
        assert_eq!(stream().publish().unwrap(), dest);
        assert_eq!(
            inode(&dest.join("README")),
            theirs,
            "untrusted but the same as the new one: kept"
        );
        assert!(trusted(&pkgs, "k").unwrap());
        std::fs::write(marker(&pkgs, "k"), "an-earlier-boot").unwrap();
        std::fs::write(dest.join("README"), "").unwrap();
        assert_eq!(stream().publish().unwrap(), dest);
        assert_ne!(inode(&dest.join("README")), theirs, "untrusted: replaced");
        assert_eq!(std::fs::read(dest.join("README")).unwrap().len(), 200_000);
        assert!(trusted(&pkgs, "k").unwrap());
    }

    #[test]
    fn sweep_removes_a_crash_s_leftovers_and_nothing_under_way() {
        let t = tempfile::tempdir().unwrap();
        let (pkgs, _) = unpacked(t.path());
        let day_old = std::time::SystemTime::now() - LEFTOVER_AGE - Duration::from_secs(60);
        for name in [
            ".unpack-old",
            ".stale-old/old/bin",
            ".unpack-new",
            ".stale-new/old",
        ] {
            std::fs::create_dir_all(pkgs.join(name)).unwrap();
        }
        std::fs::write(pkgs.join(".stale-old/old/bin/tool"), "x").unwrap();
        for name in [".unpack-old", ".stale-old"] {
            std::fs::File::open(pkgs.join(name))
                .unwrap()
                .set_modified(day_old)
                .unwrap();
        }
        std::fs::write(marker(&pkgs, "gone"), boot()).unwrap();
        sweep(&pkgs);
        assert_eq!(names(&pkgs), [".boot", ".stale-new", ".unpack-new", "k"]);
        assert_eq!(
            names(&pkgs.join(".boot")),
            ["k"],
            "the marker of the package that is gone is removed"
        );
    }
    #[test]
    fn a_tree_reached_through_symlinks_or_with_the_wrong_kinds_does_not_match() {
        let t = tempfile::tempdir().unwrap();
        // The archive: e/, e/f, d/f (plain directories).
        let out = t.path().join("out");
        std::fs::create_dir_all(out.join("e")).unwrap();
        std::fs::create_dir_all(out.join("d")).unwrap();
        std::fs::write(out.join("e/f"), "x").unwrap();
        std::fs::write(out.join("d/f"), "x").unwrap();
        let (_, archive) = pack(&out, &t.path().join("tmp"))
            .unwrap()
            .file
            .keep()
            .unwrap();
        let tree = |name: &str| {
            let d = t.path().join(name);
            std::fs::create_dir_all(d.join("e")).unwrap();
            std::fs::write(d.join("e/f"), "x").unwrap();
            d
        };
        // `d` a symlink to `e`: `d/f` reads the same bytes, but it is not the tree the archive makes.
        let linked = tree("linked");
        std::os::unix::fs::symlink("e", linked.join("d")).unwrap();
        assert!(!matches_archive(&archive, &linked).unwrap());
        // `d` a file where a directory should be.
        let file = tree("file");
        std::fs::write(file.join("d"), "x").unwrap();
        assert!(!matches_archive(&archive, &file).unwrap());
        // `d/f` a directory where a file should be.
        let dir = tree("dir");
        std::fs::create_dir_all(dir.join("d/f")).unwrap();
        assert!(!matches_archive(&archive, &dir).unwrap());
        let whole = tree("whole");
        std::fs::create_dir_all(whole.join("d")).unwrap();
        std::fs::write(whole.join("d/f"), "x").unwrap();
        assert!(matches_archive(&archive, &whole).unwrap());
    }

    #[test]
    fn a_hostile_archive_costs_no_more_than_the_tree_it_is_compared_with() {
        let t = tempfile::tempdir().unwrap();
        let (pkgs, _) = unpacked(t.path());
        // One entry with a 64 MiB GNU long name, a few KiB once compressed.
        let mut b = tar::Builder::new(zstd::Encoder::new(Vec::new(), 3).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        let name = "a/".repeat(32 << 20);
        b.append_data(&mut h, &name, &b"x"[..]).unwrap();
        let bomb = t.path().join("bomb.tar.zst");
        std::fs::write(&bomb, b.into_inner().unwrap().finish().unwrap()).unwrap();
        assert!(std::fs::metadata(&bomb).unwrap().len() < 1 << 20);
        let start = std::time::Instant::now();
        assert!(!matches_archive(&bomb, &pkgs.join("k")).unwrap());
        // Generous: the tree is 200 KB, so the archive is read for about 1.3 MB at most.
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn concurrent_publishes_of_an_untrusted_package_leave_one_whole_package() {
        let t = tempfile::tempdir().unwrap();
        let (pkgs, archive) = unpacked(t.path());
        std::fs::write(marker(&pkgs, "k"), "an-earlier-boot").unwrap();
        std::fs::write(pkgs.join("k/README"), "").unwrap();
        let size = std::fs::metadata(&archive).unwrap().len();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..5 {
                        let u = crate::artifact::unpack_stream(
                            std::io::BufReader::new(std::fs::File::open(&archive).unwrap()),
                            size,
                            &pkgs,
                            "k",
                            &UnpackLimits::default(),
                        )
                        .unwrap();
                        let dest = u.publish().unwrap();
                        // Whoever published, the package is whole whenever a publish returns.
                        assert_eq!(std::fs::read(dest.join("README")).unwrap().len(), 200_000);
                    }
                });
            }
        });
        assert!(trusted(&pkgs, "k").unwrap());
        assert_eq!(names(&pkgs), [".boot", "k"]);
    }

    #[test]
    fn the_longest_key_gets_a_marker_too() {
        let t = tempfile::tempdir().unwrap();
        let (_, archive) = unpacked(t.path());
        let (pkgs, key) = (
            t.path().join("pkgs2"),
            "k".repeat(nip_core::api::MAX_KEY_LEN),
        );
        unpack(&archive, &pkgs, &key, &UnpackLimits::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(marker(&pkgs, &key)).unwrap(),
            boot()
        );
        assert!(trusted(&pkgs, &key).unwrap());
    }

    #[test]
    fn same_tree_tells_every_difference() {
        let t = tempfile::tempdir().unwrap();
        let make = |name: &str, target: &str, bytes: &str| {
            let d = t.path().join(name);
            std::fs::create_dir_all(d.join("lib")).unwrap();
            std::fs::write(d.join("lib/f"), bytes).unwrap();
            std::os::unix::fs::symlink(target, d.join("link")).unwrap();
            d
        };
        let a = make("a", "lib", "x");
        assert!(same_tree(&a, &make("b", "lib", "x")));
        assert!(
            !same_tree(&a, &make("c", "lib/", "x")),
            "a symlink written otherwise"
        );
        assert!(!same_tree(&a, &make("d", "lib", "y")), "other bytes");
        let e = make("e", "lib", "x");
        std::fs::write(e.join("lib/g"), "").unwrap();
        assert!(!same_tree(&a, &e), "an extra file");
        assert!(!same_tree(&e, &a), "a missing file");
        let f = make("f", "lib", "x");
        std::fs::set_permissions(f.join("lib/f"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!same_tree(&a, &f), "an execute bit");
    }
}
