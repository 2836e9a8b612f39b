//! NAR files in the store: the one way a NAR's bytes enter it (from an upload or an upstream fill)
//! and leave it, with the bookkeeping every write needs.
use bytes::Bytes;
use nip_store::{BlobKey, NarRecord, StagedFile};

use crate::cache::CacheError;
use crate::AppState;

/// Where a NAR being published comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Uploaded: its row is written durably.
    Upload,
    /// Fetched from an upstream, which has it again should its row be lost (see
    /// `MetaStore::put_fetched_nar`). `named_by_content`: the name is the SHA-256 the bytes were
    /// checked against, so bytes stored under it meanwhile are the same and need no look.
    Fetched { named_by_content: bool },
}

/// Where a NAR's checked bytes are.
pub enum Checked<'a> {
    Staged(&'a StagedFile),
    /// A small NAR received into memory: published without a staged file.
    Memory(Bytes),
}

/// Publishes a NAR whose size and SHA-256 were checked, then records it: bytes first, fsynced
/// and renamed into place, the row only once they are safe.
pub async fn publish(
    state: &AppState,
    bytes: Checked<'_>,
    rec: &NarRecord,
    origin: Origin,
) -> Result<(), CacheError> {
    let named_by_content = origin
        == Origin::Fetched {
            named_by_content: true,
        };
    // Another fill (another instance, or an upstream with other compressed bytes of a NAR
    // known only by its NarHash) stored this name first: its row and bytes stand together.
    let key = BlobKey::nar(&rec.nar_file)?;
    let existing = match named_by_content {
        true => None,
        false => state.meta.get_nar(&rec.nar_file).await?,
    };
    if let Some(existing) = &existing {
        if existing.sha256 != rec.sha256 && state.blobs.stat(&key).await?.is_some() {
            tracing::debug!(nar_file = %rec.nar_file, "stored meanwhile with other bytes; keeping those");
            return Ok(());
        }
    }
    match bytes {
        Checked::Staged(staged) => {
            staged.sync().await?;
            state.blobs.put_file(&key, staged.path()).await?;
        }
        Checked::Memory(bytes) => state.blobs.put_bytes(&key, bytes).await?,
    }
    let seen = state.hot_nars.generation();
    // A row that may be lost must not leave an older durable one for these new bytes behind.
    match (origin, existing) {
        (Origin::Fetched { .. }, None) => state.meta.put_fetched_nar(rec).await?,
        _ => state.meta.put_nar(rec).await?,
    }
    state.hot_nars.insert(&rec.nar_file, (), seen);
    // After the row: an eviction pass this wakes counts the store from the rows.
    state.budget.stored(rec.size as u64);
    Ok(())
}

/// Whether `nar_file` is stored: its row and its bytes (a row whose blob went missing is being
/// fetched again, not stored).
pub async fn is_stored(state: &AppState, nar_file: &str, key: &BlobKey) -> bool {
    matches!(state.meta.get_nar(nar_file).await, Ok(Some(_)))
        && matches!(state.blobs.stat(key).await, Ok(Some(_)))
}

/// Removes a NAR's row and bytes together with every narinfo that points at it (none may be
/// served without its NAR); true when the NAR was stored.
pub async fn delete(state: &AppState, nar_file: &str) -> Result<bool, CacheError> {
    state.hot_nars.forget(nar_file);
    state.fills.forget_stored(nar_file);
    let existed = state.meta.get_nar(nar_file).await?.is_some();
    for hash in state.meta.evict_nar(nar_file).await? {
        state.hot_narinfos.forget(&hash);
    }
    state.blobs.delete(&BlobKey::nar(nar_file)?).await?;
    Ok(existed)
}
