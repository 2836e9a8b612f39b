//! Cache keys: a digest of the canonical recipe, the source tree, the sorted variants, the
//! platform and a format version, written `<name>-<version>-<32 hex>` (a valid `/v1` key).
use crate::error::{io_ctx, Result};
use crate::recipe::LoadedRecipe;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Bumped whenever the artifact layout or the key derivation changes, so old artifacts are not
/// mistaken for new ones.
pub const FORMAT_VERSION: u32 = 1;

/// `<os>-<arch>` of this machine, e.g. `linux-x86_64`.
pub fn platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

/// Digest of a directory tree: relative paths, entry kinds, executable bits, symlink targets and
/// file contents, visited in sorted order (so it does not depend on the file system's order or
/// on timestamps).
pub fn source_digest(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    walk(dir, Path::new(""), &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn walk(root: &Path, rel: &Path, h: &mut Sha256) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io_ctx(format!("read source {}", dir.display())))?
        .collect::<std::io::Result<_>>()
        .map_err(io_ctx(format!("read source {}", dir.display())))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = rel.join(e.file_name());
        let meta =
            std::fs::symlink_metadata(&path).map_err(io_ctx(format!("stat {}", path.display())))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            h.update(b"d");
            field(h, rel.as_os_str().as_bytes());
            walk(root, &rel, h)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .map_err(io_ctx(format!("readlink {}", path.display())))?;
            h.update(b"l");
            field(h, rel.as_os_str().as_bytes());
            field(h, target.as_os_str().as_bytes());
        } else if ft.is_file() {
            h.update(if meta.permissions().mode() & 0o111 != 0 {
                b"x"
            } else {
                b"f"
            });
            field(h, rel.as_os_str().as_bytes());
            let mut f =
                std::fs::File::open(&path).map_err(io_ctx(format!("open {}", path.display())))?;
            let mut fh = Sha256::new();
            std::io::copy(&mut f, &mut fh).map_err(io_ctx(format!("read {}", path.display())))?;
            h.update(meta.len().to_le_bytes());
            h.update(fh.finalize());
        }
        // Sockets, fifos and devices are not source: skipped.
    }
    Ok(())
}

/// The cache key for a recipe built with `variants` (already sorted) on `platform`.
pub fn cache_key(
    recipe: &LoadedRecipe,
    source_digest: Option<&str>,
    variants: &[String],
    platform: &str,
) -> String {
    let mut h = Sha256::new();
    field(&mut h, format!("nip-artifact-v{FORMAT_VERSION}").as_bytes());
    field(&mut h, recipe.canonical.as_bytes());
    field(&mut h, source_digest.unwrap_or("").as_bytes());
    field(&mut h, variants.join(",").as_bytes());
    field(&mut h, platform.as_bytes());
    let digest = hex::encode(h.finalize());
    format!(
        "{}-{}-{}",
        recipe.recipe.name,
        recipe.recipe.version,
        &digest[..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::parse;

    #[test]
    fn key_is_valid_and_changes_with_each_input() {
        let r = parse(
            Path::new("a.toml"),
            "name='hello'\nversion='1.0'\nbuild='true'\nvariants=['a','b']",
        )
        .unwrap();
        let v = vec!["a".to_string()];
        let k = cache_key(&r, Some("s1"), &v, "linux-x86_64");
        assert!(k.starts_with("hello-1.0-"));
        nip_core::api::validate_key(&k).unwrap();
        assert_eq!(k, cache_key(&r, Some("s1"), &v, "linux-x86_64"));
        assert_ne!(k, cache_key(&r, Some("s2"), &v, "linux-x86_64"));
        assert_ne!(k, cache_key(&r, Some("s1"), &[], "linux-x86_64"));
        assert_ne!(k, cache_key(&r, Some("s1"), &v, "macos-aarch64"));
        let r2 = parse(
            Path::new("a.toml"),
            "name='hello'\nversion='1.0'\nbuild='make'\nvariants=['a','b']",
        )
        .unwrap();
        assert_ne!(k, cache_key(&r2, Some("s1"), &v, "linux-x86_64"));
    }

    #[test]
    fn source_digest_sees_content_names_and_modes_not_mtimes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a.txt"), "one").unwrap();
        let d1 = source_digest(d.path()).unwrap();
        std::fs::write(d.path().join("sub/a.txt"), "one").unwrap();
        assert_eq!(d1, source_digest(d.path()).unwrap());
        std::fs::write(d.path().join("sub/a.txt"), "two").unwrap();
        let d2 = source_digest(d.path()).unwrap();
        assert_ne!(d1, d2);
        std::fs::set_permissions(
            d.path().join("sub/a.txt"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_ne!(d2, source_digest(d.path()).unwrap());
    }
}
