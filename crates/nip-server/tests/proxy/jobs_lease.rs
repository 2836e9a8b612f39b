//! Cluster-wide jobs (eviction, retention) run on one instance at a time: two servers on one
//! database compete for the same lease.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nip_server::jobs::exclusive;

use crate::harness::*;

#[tokio::test]
async fn two_instances_on_one_database_never_run_a_job_pass_together() {
    let a = start_nip(&[], &[], vec![]).await;
    let shared = a.dir.path().join("data").display().to_string();
    let b = start_nip(&[], &[], vec![("cache.storage.local", vec![shared])]).await;
    assert_ne!(a.state.instance_id(), b.state.instance_id());

    let running = AtomicUsize::new(0);
    let most = AtomicUsize::new(0);
    let pass = || async {
        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        running.fetch_sub(1, Ordering::SeqCst);
    };
    let (ra, rb) = tokio::join!(
        exclusive(&a.state, "eviction", Duration::ZERO, pass()),
        exclusive(&b.state, "eviction", Duration::ZERO, pass()),
    );
    assert_eq!(
        ra.is_some() as u8 + rb.is_some() as u8,
        1,
        "exactly one pass ran"
    );
    assert_eq!(most.load(Ordering::SeqCst), 1);

    // Without a cooldown the lease is free again at once; with one, the others skip.
    assert!(
        exclusive(&b.state, "eviction", Duration::from_secs(60), async {})
            .await
            .is_some()
    );
    assert!(exclusive(&a.state, "eviction", Duration::ZERO, async {})
        .await
        .is_none());
    assert!(
        exclusive(&b.state, "eviction", Duration::ZERO, async {})
            .await
            .is_some(),
        "holder renews"
    );
    // Another job's lease is independent.
    assert!(exclusive(&a.state, "retention", Duration::ZERO, async {})
        .await
        .is_some());
}
