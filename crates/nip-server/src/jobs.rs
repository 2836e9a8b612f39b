//! Background jobs of a running server: flushing batched access times and artifact retention.
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::AppState;

const ACCESS_FLUSH_EVERY: Duration = Duration::from_secs(5);

pub struct Jobs {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
}

pub fn spawn(state: AppState) -> Jobs {
    let (stop, rx) = watch::channel(false);
    let mut handles = vec![tokio::spawn(flush_loop(state.clone(), rx.clone()))];
    if let Some(retention) = state.config.artifact_retention {
        handles.push(tokio::spawn(retention_loop(state, retention, rx)));
    }
    Jobs { stop, handles }
}

impl Jobs {
    /// Stops the jobs after a last flush of access times.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for h in self.handles {
            let _ = h.await;
        }
    }
}

/// Waits `period`; false when asked to stop.
async fn tick(rx: &mut watch::Receiver<bool>, period: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => !*rx.borrow(),
        _ = rx.changed() => false,
    }
}

pub async fn flush_access_times(state: &AppState) {
    let keys: Vec<String> = {
        let mut set = state.accessed.lock().unwrap_or_else(|e| e.into_inner());
        set.drain().collect()
    };
    if keys.is_empty() {
        return;
    }
    if let Err(e) = state
        .meta
        .touch_artifacts(&keys, nip_store::unix_now())
        .await
    {
        tracing::warn!(error = %e, count = keys.len(), "could not record artifact access times");
    }
}

async fn flush_loop(state: AppState, mut rx: watch::Receiver<bool>) {
    while tick(&mut rx, ACCESS_FLUSH_EVERY).await {
        flush_access_times(&state).await;
    }
    flush_access_times(&state).await;
}

/// Deletes artifacts not read for `retention`; returns how many.
pub async fn retention_pass(state: &AppState, retention: Duration) -> usize {
    flush_access_times(state).await;
    let before = nip_store::unix_now() - retention.as_secs() as i64;
    let mut deleted = 0;
    loop {
        let keys = match state.meta.artifacts_idle_since(before, 500).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "retention: cannot list idle artifacts");
                return deleted;
            }
        };
        if keys.is_empty() {
            break;
        }
        let batch = keys.len();
        for key in keys {
            match crate::v1::artifacts::delete_artifact(state, &key).await {
                Ok(Some(rec)) => {
                    deleted += 1;
                    let entry = nip_store::AuditEntry {
                        at: nip_store::unix_now(),
                        action: "retention-delete".into(),
                        target: Some(key),
                        size: Some(rec.size),
                        sha256: Some(rec.sha256),
                        result: "deleted".into(),
                        ..Default::default()
                    };
                    state.audit(entry).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%key, error = %e, "retention: delete failed");
                    return deleted;
                }
            }
        }
        if batch < 500 {
            break;
        }
    }
    if deleted > 0 {
        tracing::info!(
            deleted,
            "retention: deleted artifacts not downloaded for {}s",
            retention.as_secs()
        );
    }
    deleted
}

async fn retention_loop(state: AppState, retention: Duration, mut rx: watch::Receiver<bool>) {
    let period = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        retention_pass(&state, retention).await;
        if !tick(&mut rx, period).await {
            return;
        }
    }
}
