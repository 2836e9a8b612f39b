//! NAR prefetch: Nix asks for a path's narinfo and then, nearly always, for its NAR, one path at a
//! time. When a narinfo miss was fetched from an upstream, a NAR file up to
//! `--cache-prefetch-nar-max-size` is fetched at once in the background, so the NAR request that
//! follows is a hit or joins the running fill instead of waiting for the upstream. Bounded: a few
//! at a time and a bounded queue; a NAR request never waits for a prefetch that has not started
//! (it starts its own fill, which the prefetch then finds running).
use std::sync::atomic::{AtomicUsize, Ordering};

use nip_store::{NarInfoRecord, NarSource};
use tokio::sync::Semaphore;

use crate::cache::cluster;
use crate::cache::fill::{FillRole, FillSpec};
use crate::AppState;

/// Prefetches running at once: enough to keep the upstream busy while Nix asks for narinfos,
/// few enough to leave the cores to the requests.
const AT_ONCE: usize = 8;
/// Prefetches waiting for their turn; past this, narinfo misses prefetch nothing.
const QUEUE_MAX: usize = 2048;

pub struct Prefetcher {
    permits: Semaphore,
    queued: AtomicUsize,
}

impl Default for Prefetcher {
    fn default() -> Self {
        Prefetcher {
            permits: Semaphore::new(AT_ONCE),
            queued: AtomicUsize::new(0),
        }
    }
}

/// Queues the prefetch of the NAR of a narinfo just fetched from an upstream, when its file
/// size is known and small enough.
pub fn after_fetch(state: &AppState, record: &NarInfoRecord, sources: Vec<NarSource>) {
    let max = state.config.prefetch_nar_max_size;
    if max == 0 || !record.file_size.is_some_and(|n| n >= 0 && n as u64 <= max) {
        return;
    }
    let Ok(spec) = FillSpec::for_narinfo(record, sources) else {
        return;
    };
    let queue = &state.prefetch.queued;
    if queue.fetch_add(1, Ordering::Relaxed) >= QUEUE_MAX {
        queue.fetch_sub(1, Ordering::Relaxed);
        counted("dropped");
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let permit = state.prefetch.permits.acquire().await;
        state.prefetch.queued.fetch_sub(1, Ordering::Relaxed);
        if permit.is_ok() {
            run(&state, spec).await;
        }
    });
}

fn counted(outcome: &'static str) {
    metrics::counter!("nip_nar_prefetches_total", "outcome" => outcome).increment(1);
}

async fn run(state: &AppState, spec: FillSpec) {
    let file = spec.nar_file.clone();
    let Ok(key) = nip_store::BlobKey::nar(&file) else {
        return counted("skipped");
    };
    if state.hot_nars.get(&file).is_some() || state.fills.is_running(&file) {
        return counted("skipped");
    }
    // Stored already (another narinfo names the same file, or an upload): nothing to fetch.
    if !matches!(state.meta.get_nar(&file).await, Ok(None)) {
        return counted("skipped");
    }
    // Another instance fetching it is left to it: a prefetch never waits.
    let stored = || crate::cache::nar::is_stored(state, &file, &key);
    let Some(lease) = cluster::try_lead(state, &format!("nar:{file}"), stored).await else {
        return counted("skipped");
    };
    match state.fills.join_or_start(state, spec).await {
        Ok(Some((fill, FillRole::Started))) => {
            tracing::debug!(nar_file = %file, "prefetching NAR");
            counted("started");
            state.stats.activity("nar-prefetch", file);
            fill.finished().await;
            drop(lease);
        }
        // A request here started its fill meanwhile: the lease row is that fill's too.
        Ok(Some((_, FillRole::Joined))) => {
            counted("skipped");
            lease.leave_to_running_fill();
        }
        Ok(None) => counted("skipped"),
        Err(e) => tracing::debug!(nar_file = %file, error = %e, "cannot prefetch NAR"),
    }
}
