//! Background jobs of a running server: flushing batched access times, artifact retention,
//! size-bounded eviction (on its cron schedule, or at once when a write overshoots the budget) and
//! the scrub of the store (on `--cache-verify-schedule`).
//! Retention, eviction and the scrub are cluster-wide: when several instances share a database, a
//! lease makes one instance at a time run them, and the others skip passes that were just done.
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Schedule, Zone};
use crate::AppState;

const ACCESS_FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Eviction schedule when `--cache-max-size` is set without `--cache-lru-schedule`.
const DEFAULT_EVICT_EVERY: Duration = Duration::from_secs(300);
/// Longest a pass holds its lease: an instance that dies mid-pass blocks the others at most this.
const LEASE_TERM: Duration = Duration::from_secs(900);
/// After an eviction pass, other instances skip eviction this long: the store was just trimmed.
const EVICT_COOLDOWN: Duration = Duration::from_secs(30);
/// After a scrub, other instances skip theirs at most this long (less on frequent schedules): the
/// store was just read through, and their clocks may be a little behind ours.
const VERIFY_COOLDOWN: Duration = Duration::from_secs(600);
/// When a schedule gives no next run (e.g. a local time that a DST change makes ambiguous or
/// skips), its job asks again after this instead of stopping until a restart.
const NO_NEXT_RUN_RETRY: Duration = Duration::from_secs(60);

/// Runs `pass` while this instance holds the cluster-wide lease `name`, then keeps the lease for
/// `cooldown` so other instances skip the work just done. `None` when another instance has it.
pub async fn exclusive<T>(
    state: &AppState,
    name: &str,
    cooldown: Duration,
    pass: impl std::future::Future<Output = T>,
) -> Option<T> {
    let now = nip_store::unix_now();
    let until = now + LEASE_TERM.as_secs() as i64;
    match state
        .meta
        .take_lease(name, &state.instance_id, now, until)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(
                job = name,
                "another instance holds the lease; skipping this pass"
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(job = name, error = %e, "cannot take the job lease; skipping this pass");
            return None;
        }
    }
    let out = pass.await;
    let until = nip_store::unix_now() + cooldown.as_secs() as i64;
    if let Err(e) = state.meta.end_lease(name, &state.instance_id, until).await {
        tracing::warn!(job = name, error = %e, "cannot release the job lease; it expires by itself");
    }
    Some(out)
}

/// Reads since the last flush; recorded in batches so a hit costs no database write.
#[derive(Default)]
pub struct Accessed {
    pub artifacts: Mutex<HashSet<String>>,
    pub nars: Mutex<HashSet<String>>,
    pub narinfos: Mutex<HashSet<String>>,
}

impl Accessed {
    pub fn note(set: &Mutex<HashSet<String>>, key: &str) {
        let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: past this, extra keys wait for the next flush to be counted at all.
        // A key already noted costs no allocation (hot entries are read over and over).
        if set.len() < 100_000 && !set.contains(key) {
            set.insert(key.to_string());
        }
    }

    fn drain(set: &Mutex<HashSet<String>>) -> Vec<String> {
        set.lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect()
    }
}

pub struct Jobs {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
}

pub fn spawn(state: AppState) -> Jobs {
    let (stop, rx) = watch::channel(false);
    let mut handles = vec![
        tokio::spawn(flush_loop(state.clone(), rx.clone())),
        tokio::spawn(presence_loop(state.clone(), rx.clone())),
    ];
    if state.read_audit.enabled() {
        handles.push(tokio::spawn(crate::read_audit::flush_loop(
            state.clone(),
            rx.clone(),
        )));
    }
    if let Some(retention) = state.config.artifact_retention {
        handles.push(tokio::spawn(retention_loop(
            state.clone(),
            retention,
            rx.clone(),
        )));
    }
    if let Some(schedule) = state.config.verify_schedule.clone() {
        handles.push(tokio::spawn(verify_loop(
            state.clone(),
            schedule,
            rx.clone(),
        )));
    }
    if let Some(max) = state.budget.max_bytes {
        handles.push(tokio::spawn(eviction_loop(state, max, rx)));
    }
    Jobs { stop, handles }
}

/// Renews this instance's presence row until shutdown, then deletes it.
async fn presence_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(crate::cache::cluster::PRESENCE_EVERY) => {}
            _ = stop.changed() => break,
        }
        crate::cache::cluster::announce(&state).await;
    }
    crate::cache::cluster::withdraw(&state).await;
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
    let now = nip_store::unix_now();
    let artifacts = Accessed::drain(&state.accessed.artifacts);
    if !artifacts.is_empty() {
        if let Err(e) = state.meta.touch_artifacts(&artifacts, now).await {
            tracing::warn!(error = %e, count = artifacts.len(), "could not record artifact access times");
        }
    }
    let (nars, narinfos) = (
        Accessed::drain(&state.accessed.nars),
        Accessed::drain(&state.accessed.narinfos),
    );
    if !nars.is_empty() || !narinfos.is_empty() {
        if let Err(e) = state.meta.touch_nix(&nars, &narinfos, now).await {
            tracing::warn!(error = %e, "could not record NAR access times");
        }
    }
}

async fn flush_loop(state: AppState, mut rx: watch::Receiver<bool>) {
    while tick(&mut rx, ACCESS_FLUSH_EVERY).await {
        flush_access_times(&state).await;
    }
    flush_access_times(&state).await;
}

/// The access time before which an artifact has been idle for `retention`, at `now`. Saturating:
/// a huge retention (`--artifact-retention 1e19`) lands far in the past and deletes nothing,
/// instead of wrapping into the future and deleting everything.
fn idle_before(now: i64, retention: Duration) -> i64 {
    now.saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX))
}

/// Deletes artifacts not read for `retention`; returns how many.
pub async fn retention_pass(state: &AppState, retention: Duration) -> usize {
    flush_access_times(state).await;
    let before = idle_before(nip_store::unix_now(), retention);
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
            match crate::cache::artifact::delete(state, &key).await {
                Ok(Some(rec)) => {
                    deleted += 1;
                    state.stats.activity("retention-delete", key.clone());
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
        exclusive(
            &state,
            "retention",
            period / 2,
            retention_pass(&state, retention),
        )
        .await;
        if !tick(&mut rx, period).await {
            return;
        }
    }
}

/// One eviction pass down to `max` bytes.
pub async fn eviction_pass(state: &AppState, max: u64) {
    state.budget.pass_started();
    flush_access_times(state).await;
    let target = crate::budget::Budget::eviction_target(max);
    let started = std::time::Instant::now();
    let result =
        nip_store::gc::evict(state.meta.as_ref(), state.blobs.as_ref(), target, false).await;
    metrics::counter!("nip_eviction_runs_total").increment(1);
    metrics::histogram!("nip_eviction_duration_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(s) => {
            metrics::counter!("nip_evictions_total", "kind" => "narinfo").increment(s.narinfos);
            metrics::counter!("nip_evictions_total", "kind" => "extra").increment(s.extras);
            metrics::counter!("nip_evicted_bytes_total").increment(s.bytes.max(0) as u64);
            state.budget.pass_finished(s.usage_after);
            // Which entries went is not reported: drop them all from memory.
            if s.narinfos > 0 {
                state.hot_narinfos.clear();
            }
            if s.nars > 0 {
                state.hot_nars.clear();
            }
            if s.artifacts > 0 {
                state.hot_artifacts.clear();
            }
            if s.nars + s.artifacts > 0 {
                metrics::counter!("nip_evictions_total", "kind" => "nar").increment(s.nars);
                metrics::counter!("nip_evictions_total", "kind" => "artifact")
                    .increment(s.artifacts);
                state.stats.activity(
                    "evict",
                    format!(
                        "{} NARs, {} artifacts, {} bytes",
                        s.nars, s.artifacts, s.bytes
                    ),
                );
                tracing::info!(
                    nars = s.nars,
                    narinfos = s.narinfos,
                    artifacts = s.artifacts,
                    bytes = s.bytes,
                    usage = s.usage_after,
                    limit = max,
                    "evicted least recently used entries"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "eviction failed; trying again in a few seconds");
            // A busy or briefly unreachable database must not leave the store over its limit
            // until the next scheduled run.
            let state = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(EVICT_RETRY).await;
                state.budget.evict_now.notify_one();
            });
        }
    }
}

/// How soon a failed eviction pass is tried again.
const EVICT_RETRY: Duration = Duration::from_secs(3);

/// Time until the eviction schedule's next run (in `zone`, `--cache-lru-schedule-timezone`).
fn until_next(schedule: Option<&str>, zone: Zone) -> Duration {
    schedule
        .and_then(|s| next_run(s, zone))
        .unwrap_or(DEFAULT_EVICT_EVERY)
}

/// Time until the next run of a schedule (ncps' forms, see [`Schedule`]) evaluated in `zone`
/// unless it names its own (`CRON_TZ=`); `None` when it has none.
fn next_run(expr: &str, zone: Zone) -> Option<Duration> {
    Schedule::parse(expr).ok()?.until_next(zone)
}

/// One eviction pass if no other instance is running one; false when skipped.
async fn exclusive_eviction(state: &AppState, max: u64) -> bool {
    exclusive(state, "eviction", EVICT_COOLDOWN, eviction_pass(state, max))
        .await
        .is_some()
}

async fn eviction_loop(state: AppState, max: u64, mut rx: watch::Receiver<bool>) {
    let mut skipped = !exclusive_eviction(&state, max).await;
    loop {
        // Skipped while over the limit: another instance was evicting; check again after its
        // cooldown instead of waiting for the next scheduled run.
        let over = skipped && {
            if let Ok(u) = state.meta.usage().await {
                state.budget.set(u.bytes);
            }
            state.budget.bytes() > max as i64
        };
        let wait = if over {
            EVICT_COOLDOWN
        } else {
            until_next(
                state.config.lru_schedule.as_deref(),
                state.config.lru_timezone,
            )
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.budget.evict_now.notified() => {}
            _ = rx.changed() => return,
        }
        skipped = !exclusive_eviction(&state, max).await;
    }
}

/// One scrub with repair: every stored blob is hashed against its row, and what is bad goes (a
/// proxied path is fetched again on its next request). Returns the report, `None` when it failed.
pub async fn verify_pass(state: &AppState) -> Option<nip_store::VerifyReport> {
    let started = std::time::Instant::now();
    let report = match nip_store::verify::verify(
        state.meta.as_ref(),
        state.blobs.as_ref(),
        true,
        &|_, _| {},
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "scrub of the store failed; it runs again on --cache-verify-schedule");
            return None;
        }
    };
    // This instance must not keep serving what was just removed (others' hot caches expire
    // within seconds by themselves).
    for hash in &report.removed_narinfos {
        state.hot_narinfos.forget(hash);
    }
    for key in &report.removed_artifacts {
        state.hot_artifacts.forget(key);
    }
    if report.removed() > 0 {
        state.hot_nars.clear();
        if let Ok(u) = state.meta.usage().await {
            state.budget.set(u.bytes);
        }
    }
    let summary = report.summary();
    for f in &report.findings {
        metrics::counter!("nip_verify_findings_total", "problem" => f.problem.as_str())
            .increment(1);
    }
    if report.is_clean() {
        tracing::info!(
            nars = report.nars,
            artifacts = report.artifacts,
            bytes = report.bytes,
            seconds = started.elapsed().as_secs(),
            "scrub of the store found no problems"
        );
    } else {
        // Each finding, but not an unbounded flood: `nip admin verify` lists them all.
        for f in report.findings.iter().take(100) {
            tracing::warn!(
                kind = f.kind.as_str(),
                id = %f.id,
                problem = f.problem.as_str(),
                expected_sha256 = f.expected_sha256.as_deref().unwrap_or("-"),
                actual_sha256 = f.actual_sha256.as_deref().unwrap_or("-"),
                error = f.error.as_deref().unwrap_or("-"),
                removed = f.removed,
                "scrub: bad store entry"
            );
        }
        tracing::warn!(
            findings = report.findings.len(),
            removed = report.removed(),
            seconds = started.elapsed().as_secs(),
            "scrub of the store: {summary}"
        );
    }
    if let Some(why) = &report.repair_skipped {
        tracing::error!("scrub of the store: {why}");
    }
    state.stats.activity("verify", summary.clone());
    let entry = nip_store::AuditEntry {
        at: nip_store::unix_now(),
        remote_addr: Some("scheduled".into()),
        action: "store-verify".into(),
        size: i64::try_from(report.bytes).ok(),
        result: summary,
        ..Default::default()
    };
    state.audit(entry).await;
    Some(report)
}

/// A scrub that keeps renewing its lease while it runs: reading a large store takes longer than
/// one lease term, and another instance must not start a second scrub meanwhile. When another
/// instance has taken the lease (ours ran out, e.g. the database was unreachable for a term), this
/// pass stops: two instances must not repair at once. What it had not done yet is found again by
/// the next scrub.
async fn verify_holding_lease(state: &AppState) -> Option<nip_store::VerifyReport> {
    let renew = async {
        loop {
            tokio::time::sleep(LEASE_TERM / 3).await;
            let now = nip_store::unix_now();
            let until = now + LEASE_TERM.as_secs() as i64;
            match state
                .meta
                .take_lease("verify", &state.instance_id, now, until)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("scrub: another instance took the lease; stopping this pass");
                    break;
                }
                // Kept on: the lease may still be ours, the next renewal tells.
                Err(e) => tracing::warn!(error = %e, "scrub: cannot renew the lease"),
            }
        }
    };
    tokio::select! {
        r = verify_pass(state) => r,
        () = renew => None,
    }
}

/// What the scrub loop does with the schedule's answer: `Ok(wait)` runs a scrub after `wait`;
/// `Err(wait)` only asks the schedule again after `wait`. No next run now (a local time that a
/// DST change makes ambiguous or skips, a run already due) is not no run ever: the scrub must not
/// stay off until a restart.
fn scrub_wait(next: Option<Duration>) -> Result<Duration, Duration> {
    next.ok_or(NO_NEXT_RUN_RETRY)
}

async fn verify_loop(state: AppState, schedule: String, mut rx: watch::Receiver<bool>) {
    loop {
        // The scrub is nip's own: its schedule is in UTC unless it says `CRON_TZ=`.
        let wait = scrub_wait(next_run(&schedule, Zone::Utc));
        if let Err(retry) = wait {
            tracing::warn!(
                %schedule,
                "--cache-verify-schedule gives no next run now; asking again in {}s",
                retry.as_secs()
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(wait.unwrap_or_else(|r| r)) => {}
            _ = rx.changed() => return,
        }
        if wait.is_err() {
            continue;
        }
        let cooldown = next_run(&schedule, Zone::Utc)
            .map(|d| (d / 2).min(VERIFY_COOLDOWN))
            .unwrap_or(VERIFY_COOLDOWN);
        // A scrub of a large store takes long: a shutdown does not wait for it (what it had not
        // repaired yet is found again by the next one; its lease expires by itself).
        tokio::select! {
            _ = exclusive(&state, "verify", cooldown, verify_holding_lease(&state)) => {}
            _ = rx.changed() => return,
        }
    }
}

/// Refreshes the store size gauges from the index.
pub async fn update_store_gauges(state: &AppState) {
    if let Ok(u) = state.meta.usage().await {
        metrics::gauge!("nip_store_size_bytes").set(u.bytes as f64);
        metrics::gauge!("nip_store_entries", "kind" => "nar").set(u.nars as f64);
        metrics::gauge!("nip_store_entries", "kind" => "narinfo").set(u.narinfos as f64);
        metrics::gauge!("nip_store_entries", "kind" => "artifact").set(u.artifacts as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_gives_the_wait_until_the_next_run() {
        assert_eq!(until_next(None, Zone::Utc), DEFAULT_EVICT_EVERY);
        assert!(next_run("*/5 * * * *", Zone::Utc).is_some_and(|d| d <= Duration::from_secs(300)));
        assert_eq!(next_run("not a schedule", Zone::Utc), None);
        let every_minute = until_next(Some("* * * * *"), Zone::Local);
        assert!(every_minute <= Duration::from_secs(60), "{every_minute:?}");
        // ncps' forms: an interval, and a zone of its own.
        let hourly = next_run("@every 1h", Zone::Utc).unwrap();
        assert!(
            hourly > Duration::from_secs(3590) && hourly <= Duration::from_secs(3600),
            "{hourly:?}"
        );
        let paris = Zone::parse("Europe/Paris").unwrap();
        let daily = next_run("CRON_TZ=Asia/Tokyo 0 2 * * *", paris).unwrap();
        assert!(daily <= Duration::from_secs(86400), "{daily:?}");
    }

    #[test]
    fn a_schedule_without_a_next_run_is_asked_again_instead_of_ending_the_scrub() {
        assert_eq!(scrub_wait(None), Err(NO_NEXT_RUN_RETRY));
        assert_eq!(NO_NEXT_RUN_RETRY, Duration::from_secs(60));
        let hour = Duration::from_secs(3600);
        assert_eq!(scrub_wait(Some(hour)), Ok(hour));
    }

    #[test]
    fn retention_cutoff_saturates_so_a_huge_retention_deletes_nothing() {
        let now = 1_700_000_000;
        assert_eq!(idle_before(now, Duration::from_secs(3600)), now - 3600);
        assert_eq!(idle_before(now, Duration::ZERO), now);
        // `--artifact-retention 1e19` parses: 1e19 s does not fit an i64 (the old `as i64` wrapped
        // to a negative retention, a cutoff in the future, and every artifact went).
        for secs in [10_000_000_000_000_000_000u64, u64::MAX, i64::MAX as u64] {
            let before = idle_before(now, Duration::from_secs(secs));
            assert!(before < 0, "{secs}: {before}");
            assert_eq!(before, now - i64::MAX, "{secs}");
        }
        // Even at the far ends of the clock it does not wrap.
        assert_eq!(
            idle_before(i64::MIN, Duration::from_secs(u64::MAX)),
            i64::MIN
        );
    }
}
