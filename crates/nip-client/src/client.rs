//! The client context shared by every command: directories, effective remote config, local cache,
//! operation record, and the two remote moves every flow uses (fetch into the local cache, push
//! from it), both of which turn remote failures into warnings.
use crate::artifact::{self, Unpacked};
use crate::config::RemoteConfig;
use crate::dirs::Dirs;
use crate::error::Result;
use crate::local::{LocalCache, Metadata};
use crate::record::{Op, OpKind, Record};
use crate::remote::{RemoteClient, RemoteError, UploadOutcome};
use crate::worker::{Chunk, StreamWorker};
use nip_core::api::ArtifactInfo;
use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

pub struct Client {
    pub dirs: Dirs,
    pub config: RemoteConfig,
    pub local: LocalCache,
    pub record: Record,
    /// Servers found unreachable during this run: not tried again (no second round of retries).
    down: RefCell<HashSet<String>>,
}

/// What a remote fetch found.
pub enum Fetch {
    /// Downloaded, verified and stored in the local cache.
    Hit(Box<Fetched>),
    /// No server has it.
    Miss,
    /// No server had it usable, and at least one failed (warned already).
    Failed,
}

pub struct Fetched {
    pub meta: Metadata,
    /// The package unpacked while it downloaded, when asked for (`unpack_into`): publish it, the
    /// bytes are verified.
    pub unpacked: Option<Result<Unpacked>>,
}

/// Prints a one-line warning on stderr; remote problems never fail a build.
pub fn warn(msg: &str) {
    eprintln!("⚠️ {msg}");
}

impl Client {
    pub fn new(dirs: Dirs, config: RemoteConfig) -> Self {
        Client {
            local: LocalCache::new(dirs.binary_cache()),
            record: Record::new(dirs.record_file()),
            dirs,
            config,
            down: RefCell::default(),
        }
    }

    /// Clients for the configured servers in priority order, minus those already found down.
    pub fn remotes(&self) -> Vec<RemoteClient> {
        let down = self.down.borrow();
        self.config
            .servers
            .iter()
            .filter(|s| !down.contains(&s.url))
            .filter_map(|s| {
                RemoteClient::new(
                    s.clone(),
                    self.config.timeout,
                    self.config.policies.clone(),
                    self.config.ca_cert.as_deref(),
                )
                .map_err(|e| warn(&format!("Remote cache {}: {e}", s.url)))
                .ok()
            })
            .collect()
    }

    fn note_failure(&self, rc: &RemoteClient, e: &RemoteError) {
        if matches!(
            e,
            RemoteError::Unreachable { .. } | RemoteError::Timeout { .. } | RemoteError::Tls { .. }
        ) {
            self.down.borrow_mut().insert(rc.server.url.clone());
        }
    }

    /// Appends to the record; failing to record is worth a warning, never a failure.
    pub fn log(&self, op: Op) {
        if let Err(e) = self.record.append(&op) {
            warn(&format!("cannot record the operation: {e}"));
        }
    }

    /// Looks `key` up on each server in order and downloads the first hit into the local cache,
    /// verified against its SHA-256. `fallback` supplies metadata if the server's is unusable.
    /// With `unpack_into`, the package is unpacked there (unpublished) while it downloads.
    pub fn fetch(
        &self,
        key: &str,
        fallback: &dyn Fn(&ArtifactInfo) -> Metadata,
        unpack_into: Option<&Path>,
    ) -> Fetch {
        let mut failed = false;
        for rc in self.remotes() {
            let url = rc.server.url.clone();
            let op = |kind, outcome: &str, detail: Option<String>| {
                let mut o = Op::new(kind, key, outcome);
                o.server = Some(url.clone());
                o.detail = detail;
                o
            };
            let info = match rc.lookup(key) {
                Ok(Some(info)) => info,
                Ok(None) => {
                    self.log(op(OpKind::Lookup, "miss", None));
                    continue;
                }
                Err(e) => {
                    self.note_failure(&rc, &e);
                    warn(&format!(
                        "Remote cache lookup failed, building locally if needed: {e}"
                    ));
                    self.log(op(OpKind::Lookup, "failed", Some(e.to_string())));
                    failed = true;
                    continue;
                }
            };
            self.log(op(OpKind::Lookup, "hit", None));
            let started = Instant::now();
            // Unpacking overlaps the download; without a thread it happens afterwards instead.
            // Bounded by the announced size, which the download never exceeds.
            let (limits, size) = (self.config.policies.unpack_limits(), info.size);
            let mut unpacker = unpack_into.and_then(|pkgs| {
                let (pkgs, k) = (pkgs.to_path_buf(), key.to_string());
                StreamWorker::spawn("nip-unpack", move |r| {
                    artifact::unpack_stream(r, size, &pkgs, &k, &limits)
                })
                .ok()
            });
            let mut feed = unpacker.as_mut().map(|u| move |c: &Chunk| u.feed(c));
            let tap = feed.as_mut().map(|f| f as &mut dyn FnMut(&Chunk));
            let downloaded = rc.download(&info, self.local.dir(), tap);
            // Joined either way, so a rejected download leaves no temp directory behind.
            let unpacked = unpacker.map(StreamWorker::finish);
            let verified = match downloaded {
                Ok(v) => v,
                Err(e) => {
                    self.note_failure(&rc, &e);
                    warn(&format!("Remote download rejected, discarded: {e}"));
                    self.log(op(OpKind::Download, "failed", Some(e.to_string())));
                    failed = true;
                    continue;
                }
            };
            let elapsed = started.elapsed();
            let mut meta = rc
                .metadata(key)
                .ok()
                .and_then(|v| serde_json::from_value::<Metadata>(v).ok())
                .filter(|m| m.key == key)
                .unwrap_or_else(|| fallback(&info));
            // The verified figures win over whatever the metadata claims.
            meta.sha256 = verified.sha256.clone();
            meta.size = verified.size;
            if let Err(e) = self.local.insert(verified.file, &meta) {
                warn(&format!(
                    "Cannot store the download in the local cache: {e}"
                ));
                failed = true;
                continue;
            }
            let mut o = op(OpKind::Download, "ok", None);
            o.bytes = Some(meta.size);
            o.duration_ms = Some(elapsed.as_millis() as u64);
            self.log(o);
            return Fetch::Hit(Box::new(Fetched { meta, unpacked }));
        }
        if failed {
            Fetch::Failed
        } else {
            Fetch::Miss
        }
    }

    /// Uploads a local artifact to the first server that takes it. Returns the server and outcome,
    /// or every server's error (each recorded).
    pub fn push(&self, meta: &Metadata) -> Result<(String, UploadOutcome), Vec<RemoteError>> {
        let path = self.local.artifact_path(&meta.key);
        let value = serde_json::to_value(meta).expect("metadata serializes");
        let mut errors = Vec::new();
        for rc in self.remotes() {
            let mut op = Op::new(OpKind::Upload, &meta.key, "ok");
            op.server = Some(rc.server.url.clone());
            op.bytes = Some(meta.size);
            let started = Instant::now();
            match rc.upload(&meta.key, &path, &meta.sha256, &value) {
                Ok(outcome) => {
                    op.duration_ms = Some(started.elapsed().as_millis() as u64);
                    if outcome == UploadOutcome::AlreadyPresent {
                        op.outcome = "exists".into();
                    }
                    self.log(op);
                    return Ok((rc.server.url.clone(), outcome));
                }
                Err(e) => {
                    self.note_failure(&rc, &e);
                    op.outcome = "failed".into();
                    op.detail = Some(e.to_string());
                    self.log(op);
                    errors.push(e);
                }
            }
        }
        Err(errors)
    }
}
