//! `/v1` artifacts in the store: bytes kept once per content under their SHA-256, rows naming
//! them by key. Publishing, deleting (the bytes go with the last key that shares them) and
//! presigned downloads; the HTTP handlers and the retention job both come here.
use nip_store::{ArtifactRecord, BlobKey, PutArtifact, StagedFile};

use crate::cache::CacheError;
use crate::AppState;

/// How long a presigned download URL stays valid (`--s3-presign-downloads`): long enough to start
/// a large download, short enough that a leaked URL soon stops working.
pub const PRESIGN_TTL: std::time::Duration = std::time::Duration::from_secs(900);

/// Publishes a staged upload's bytes (unless the same content is stored already), then records
/// `rec` under its key. The caller checked size and SHA-256 while the bytes streamed in.
pub async fn publish(
    state: &AppState,
    staged: &StagedFile,
    rec: &ArtifactRecord,
    name: Option<&str>,
    version: Option<&str>,
) -> Result<PutArtifact, CacheError> {
    staged.sync().await?;
    let blob = BlobKey::artifact(&rec.sha256)?;
    if state.blobs.stat(&blob).await? != Some(rec.size as u64) {
        state.blobs.put_file(&blob, staged.path()).await?;
    }
    let put = state.meta.put_artifact(rec, name, version).await?;
    if let PutArtifact::Created = put {
        state.hot_artifacts.forget(&rec.key);
        state.budget.stored(rec.size as u64);
        state.stats.activity("artifact-upload", &rec.key);
    }
    Ok(put)
}

/// Removes an artifact's row, then its bytes unless another key shares them. `None` when absent.
pub async fn delete(state: &AppState, key: &str) -> Result<Option<ArtifactRecord>, CacheError> {
    let deleted = state.meta.delete_artifact(key).await?;
    state.hot_artifacts.forget(key);
    let Some((rec, shared)) = deleted else {
        return Ok(None);
    };
    if !shared {
        state.blobs.delete(&BlobKey::artifact(&rec.sha256)?).await?;
    }
    Ok(Some(rec))
}

/// With `--s3-presign-downloads`, a presigned URL of the artifact's bytes. The download then
/// bypasses this server, so it counts as an access now (for retention and LRU). When signing
/// fails (e.g. credentials not fetched yet), `None`: the bytes go through this server instead.
pub async fn presigned(
    state: &AppState,
    rec: &ArtifactRecord,
) -> Result<Option<String>, CacheError> {
    if !state.config.s3_presign_downloads {
        return Ok(None);
    }
    let url = match state
        .blobs
        .presigned_get(&BlobKey::artifact(&rec.sha256)?, PRESIGN_TTL)
        .await
    {
        Ok(url) => url,
        Err(e) => {
            tracing::warn!(key = %rec.key, error = %e, "cannot presign a download URL; serving the bytes directly");
            None
        }
    };
    if url.is_some() {
        crate::jobs::Accessed::note(&state.accessed.artifacts, &rec.key);
        state.stats.hit(crate::stats::Kind::Artifact);
    }
    Ok(url)
}
