//! `--audit-reads`: /v1 lookups and downloads and Nix narinfo and NAR reads in the audit log.
//! A read only appends to an in-memory buffer; a background job writes the buffer in one
//! transaction every [`FLUSH_EVERY`], or as soon as it holds [`FLUSH_AT`] entries, so a hit costs
//! no database write on the request path.
use std::sync::Mutex;
use std::time::Duration;

use nip_store::AuditEntry;
use tokio::sync::{watch, Notify};

use crate::auth::{cap_audit_text, Caller, AUDIT_TEXT_MAX};
use crate::AppState;

/// The longest a read waits in memory before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Entries that make the job write at once rather than at its next tick.
pub const FLUSH_AT: usize = 512;
/// Entries held at most. Past it (the database is slower than the reads) reads are only counted,
/// and the count is written as one entry: memory stays bounded.
pub const MAX_PENDING: usize = 50_000;

/// Reads not written yet. Does nothing when `--audit-reads` is off.
#[derive(Default)]
pub struct ReadAudit {
    enabled: bool,
    pending: Mutex<Pending>,
    full: Notify,
}

#[derive(Default)]
struct Pending {
    entries: Vec<AuditEntry>,
    dropped: u64,
}

/// What was read, for the audit entry.
pub struct Read<'a> {
    pub action: &'static str,
    pub target: &'a str,
    pub result: &'a str,
    pub size: Option<i64>,
    pub sha256: Option<&'a str>,
}

impl ReadAudit {
    pub fn new(enabled: bool) -> Self {
        ReadAudit {
            enabled,
            ..Default::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Notes a read by `caller`: memory only.
    pub fn note(&self, caller: &Caller, read: Read<'_>) {
        if !self.enabled {
            return;
        }
        let mut entry = caller.audit_entry(read.action, Some(read.target), read.result);
        entry.size = read.size;
        entry.sha256 = read.sha256.map(String::from);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.entries.len() >= MAX_PENDING {
            p.dropped += 1;
            return;
        }
        p.entries.push(entry);
        if p.entries.len() == FLUSH_AT {
            // Stored as a permit when the job is busy writing: the batch is not forgotten.
            self.full.notify_one();
        }
    }

    fn take(&self) -> (Vec<AuditEntry>, u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        (
            std::mem::take(&mut p.entries),
            std::mem::take(&mut p.dropped),
        )
    }
}

/// Writes the reads noted so far, in one transaction.
pub async fn flush(state: &AppState) {
    let (mut entries, dropped) = state.read_audit.take();
    if dropped > 0 {
        entries.push(AuditEntry {
            at: nip_store::unix_now(),
            action: "read-audit-overflow".into(),
            result: format!("{dropped} reads not recorded: the audit log fell behind"),
            ..Default::default()
        });
    }
    if entries.is_empty() {
        return;
    }
    for e in &mut entries {
        e.target = e.target.take().map(|t| cap_audit_text(t, AUDIT_TEXT_MAX));
        e.result = cap_audit_text(std::mem::take(&mut e.result), AUDIT_TEXT_MAX);
    }
    if let Err(e) = state.meta.audit_many(&entries).await {
        tracing::error!(error = %e, count = entries.len(), "could not write reads to the audit log");
    }
}

/// Writes the buffer every [`FLUSH_EVERY`] or when it fills; a last time when asked to stop.
pub async fn flush_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => {}
            _ = state.read_audit.full.notified() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
        flush(&state).await;
    }
    flush(&state).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller {
            principal: None,
            remote: Some("10.0.0.1:5".parse().unwrap()),
            get_token: false,
        }
    }

    fn read(target: &str) -> Read<'_> {
        Read {
            action: "artifact-lookup",
            target,
            result: "200",
            size: None,
            sha256: None,
        }
    }

    #[test]
    fn off_notes_nothing() {
        let audit = ReadAudit::new(false);
        audit.note(&caller(), read("k"));
        assert_eq!(audit.take().0.len(), 0);
    }

    #[test]
    fn the_buffer_is_bounded_and_counts_what_it_drops() {
        let audit = ReadAudit::new(true);
        for _ in 0..MAX_PENDING + 3 {
            audit.note(&caller(), read("k"));
        }
        let (entries, dropped) = audit.take();
        assert_eq!((entries.len(), dropped), (MAX_PENDING, 3));
        assert_eq!(entries[0].remote_addr.as_deref(), Some("10.0.0.1"));
        assert_eq!(audit.take(), (vec![], 0));
    }
}
