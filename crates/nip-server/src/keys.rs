//! This cache's own signing key: loaded from its file, or generated there on first start.
use std::io::Write;
use std::path::Path;

use nip_core::signing::SigningKey;

pub fn load_or_generate(path: &Path, hostname: &str) -> anyhow::Result<SigningKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => SigningKey::parse(&text).map_err(|e| {
            anyhow::anyhow!(
                "signing key file {} is not a Nix secret key (name:base64): {e}",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(&format!("{hostname}-1"))?;
            if write_new(path, &key)? {
                tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a new signing key");
                Ok(key)
            } else {
                load_or_generate(path, hostname)
            }
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot read signing key file {}: {e}",
            path.display()
        )),
    }
}

/// Writes `key` to `path` (mode 0600, atomically) unless a file is there already: false then.
/// Never replaces a key: two instances starting together must not swap keys under each other.
pub fn write_new(path: &Path, key: &SigningKey) -> anyhow::Result<bool> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".secret-key-")
        .tempfile_in(dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(key.to_secret_string().as_bytes())?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {
            std::fs::File::open(dir)?.sync_all()?;
            Ok(true)
        }
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.error.into()),
    }
}
