//! Which unpacked packages in `pkgs/` can be used as they are.
//!
//! Unpacked files are not fsynced (a package can hold thousands; Nix does not fsync store paths
//! either), so a machine that crashes may lose writes still in the page cache and leave a package
//! truncated under its final name. A package is therefore trusted as it is only during the boot
//! that unpacked or checked it, which a marker `.<key>.boot` beside it records (the kernel's boot
//! id). After a reboot its first use compares it with its archive, already checked against its
//! digest; one that differs is unpacked again. Without a boot id (not Linux), packages are trusted.
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::artifact::{relative_path, UnpackLimits};
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
    pkgs.join(format!(".{key}.boot"))
}

/// Whether `<pkgs>/<key>` exists and was unpacked or checked during this boot.
pub fn trusted(pkgs: &Path, key: &str) -> bool {
    if !pkgs.join(key).is_dir() {
        return false;
    }
    match this_boot() {
        None => true,
        Some(id) => std::fs::read_to_string(marker(pkgs, key)).is_ok_and(|s| s.trim() == id),
    }
}

/// Records that `<pkgs>/<key>` is complete in this boot. Not fsynced: a crash changes the boot id
/// anyway. A failed write only costs a check on the next use.
pub fn mark(pkgs: &Path, key: &str) {
    if let Some(id) = this_boot() {
        let _ = std::fs::write(marker(pkgs, key), id);
    }
}

/// Puts the complete package `fresh` in the place of `dest`, which exists but cannot be trusted.
/// The old tree is moved aside first, so `dest` is never missing or mixed for long.
pub fn replace(fresh: &Path, dest: &Path) -> Result<()> {
    let pkgs = dest.parent().unwrap_or(Path::new("."));
    let aside = tempfile::Builder::new()
        .prefix(".stale-")
        .tempdir_in(pkgs)
        .map_err(io_ctx(format!("create a directory in {}", pkgs.display())))?;
    let old = aside.path().join("old");
    std::fs::rename(dest, &old).map_err(io_ctx(format!("move {} aside", dest.display())))?;
    if let Err(e) = std::fs::rename(fresh, dest) {
        let _ = std::fs::rename(&old, dest);
        return Err(io_ctx(format!("rename into {}", dest.display()))(e));
    }
    // `aside` is removed with the old tree in it when dropped here.
    Ok(())
}

/// Temp and moved-aside trees older than this are leftovers of a crashed unpack, not one under way.
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
        if name.starts_with(".unpack-") || name.starts_with(".stale-") {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > LEFTOVER_AGE));
            if old {
                let _ = std::fs::remove_dir_all(e.path());
            }
        } else if let Some(key) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".boot")) {
            if !pkgs.join(key).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Whether the tree at `dest` holds exactly what `archive` unpacks to: the same entries, files
/// with the same bytes and executable bit, symlinks with the same targets. `false` as soon as
/// anything differs or the archive goes past `limits` (it then cannot be unpacked either).
pub fn matches_archive(archive: &Path, dest: &Path, limits: &UnpackLimits) -> Result<bool> {
    let ctx = || format!("compare {} with {}", dest.display(), archive.display());
    let f = std::fs::File::open(archive).map_err(io_ctx(ctx()))?;
    let size = f.metadata().map_err(io_ctx(ctx()))?.len();
    let dec = zstd::Decoder::new(f).map_err(io_ctx(ctx()))?;
    let mut ar = tar::Archive::new(dec.take(limits.max_bytes(size)));
    let mut seen: HashSet<PathBuf> = HashSet::new();
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
        for p in rel.ancestors().filter(|p| !p.as_os_str().is_empty()) {
            if !seen.insert(p.to_path_buf()) {
                break;
            }
        }
        if seen.len() as u64 > limits.max_entries {
            return Ok(false);
        }
        if !entry_matches(&mut entry, &dest.join(&rel))? {
            return Ok(false);
        }
    }
    Ok(count_entries(dest)? == seen.len() as u64)
}

fn entry_matches<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    use tar::EntryType as T;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(false);
    };
    Ok(match entry.header().entry_type() {
        T::Directory => meta.is_dir(),
        T::Symlink => {
            meta.is_symlink()
                && matches!(
                    (entry.link_name(), std::fs::read_link(path)),
                    (Ok(Some(want)), Ok(have)) if *want == *have
                )
        }
        T::Regular | T::Continuous => {
            let exec = |mode: u32| mode & 0o111 != 0;
            meta.is_file()
                && meta.len() == entry.size()
                && exec(meta.permissions().mode()) == exec(entry.header().mode().unwrap_or(0))
                && same_bytes(entry, path)?
        }
        _ => false,
    })
}

fn same_bytes(a: &mut impl Read, path: &Path) -> Result<bool> {
    let ctx = || format!("read {}", path.display());
    let mut b = std::fs::File::open(path).map_err(io_ctx(ctx()))?;
    let (mut x, mut y) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = match a.read(&mut x) {
            Ok(n) => n,
            Err(_) => return Ok(false),
        };
        if n == 0 {
            // The sizes were compared: the file has nothing more.
            return Ok(true);
        }
        if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

/// Files, directories and symlinks under `dir`, not following symlinks.
fn count_entries(dir: &Path) -> Result<u64> {
    let mut n = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(io_ctx(format!("read {}", d.display())))? {
            let e = e.map_err(io_ctx(format!("read {}", d.display())))?;
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{pack, unpack};
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

    fn boot() -> &'static str {
        this_boot().expect("Linux has a boot id")
    }

    #[test]
    fn a_package_matches_its_archive_until_anything_in_it_changes() {
        let t = tempfile::tempdir().unwrap();
        let (pkgs, archive) = unpacked(t.path());
        let (dest, limits) = (pkgs.join("k"), UnpackLimits::default());
        let check = || matches_archive(&archive, &dest, &limits).unwrap();
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
        assert!(trusted(&pkgs, "k"));
        let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let readme_inode = inode(&dest.join("README"));

        // A reboot after the unpack's writes reached the disk: compared, kept as it is.
        std::fs::write(&mark_file, "an-earlier-boot").unwrap();
        assert!(!trusted(&pkgs, "k"));
        assert_eq!(unpack(&archive, &pkgs, "k", &limits).unwrap(), dest);
        assert_eq!(
            inode(&dest.join("README")),
            readme_inode,
            "not unpacked again"
        );
        assert!(trusted(&pkgs, "k"));

        // A crash that lost some of them: unpacked again, in place of the damaged tree.
        std::fs::write(&mark_file, "an-earlier-boot").unwrap();
        std::fs::write(dest.join("README"), "").unwrap();
        assert_eq!(unpack(&archive, &pkgs, "k", &limits).unwrap(), dest);
        assert_eq!(
            std::fs::read(dest.join("README")).unwrap(),
            vec![b'r'; 200_000]
        );
        assert_ne!(inode(&dest.join("README")), readme_inode);
        assert!(trusted(&pkgs, "k"));
        // Nothing left beside it but its marker (no temp or moved-aside trees).
        let mut left: Vec<String> = std::fs::read_dir(&pkgs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".k.boot", "k"]);

        // In this boot a package is used without being read at all, even if changed since.
        std::fs::write(dest.join("README"), "").unwrap();
        unpack(&archive, &pkgs, "k", &limits).unwrap();
        assert_eq!(std::fs::read(dest.join("README")).unwrap(), b"");
    }

    #[test]
    fn a_package_unpacked_meanwhile_in_this_boot_is_kept_and_an_untrusted_one_replaced() {
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
        std::fs::write(dest.join("README"), "").unwrap();
        assert_eq!(stream().publish().unwrap(), dest);
        assert_ne!(inode(&dest.join("README")), theirs, "untrusted: replaced");
        assert_eq!(std::fs::read(dest.join("README")).unwrap().len(), 200_000);
        assert!(trusted(&pkgs, "k"));
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
        std::fs::write(pkgs.join(".gone.boot"), boot()).unwrap();
        sweep(&pkgs);
        let mut left: Vec<String> = std::fs::read_dir(&pkgs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".k.boot", ".stale-new", ".unpack-new", "k"]);
    }
}
