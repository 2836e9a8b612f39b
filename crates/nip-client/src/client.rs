//! The client context shared by every command: directories, effective remote config, local cache,
//! operation record, and the two remote moves every flow uses (fetch into the local cache, push
//! from it), both of which turn remote failures into warnings. Servers found unreachable are
//! asked no more in the run, and are remembered for a short while (see `unreachable`).
use crate::artifact::{self, Unpacked};
use crate::config::RemoteConfig;
use crate::dirs::Dirs;
use crate::error::Result;
use crate::local::{LocalCache, Metadata};
use crate::record::{now_unix, Op, OpKind, Record};
use crate::remote::{Found, RemoteClient, RemoteError, UploadOutcome};
use crate::unreachable::{Unreachable, REMEMBER};
use crate::worker::{Chunk, StreamWorker};
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
    /// Servers found unreachable by recent runs.
    pub unreachable: Unreachable,
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

/// Prints a one-line failure on stderr in the words of the guide (`❌ Download failed: …`), so
/// people find it by searching for them; the details follow.
pub fn fail(msg: &str) {
    eprintln!("❌ {msg}");
}

impl Client {
    pub fn new(dirs: Dirs, config: RemoteConfig) -> Self {
        Client {
            local: LocalCache::new(dirs.binary_cache()),
            record: Record::new(dirs.record_file()),
            unreachable: Unreachable::new(dirs.unreachable_file()),
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

    /// Skips, for this run, the servers that recent runs found unreachable, with one warning
    /// each: a loop of builds against a dead remote pays its deadline once, not every time.
    pub fn skip_recently_unreachable(&self) {
        let recent = self.unreachable.recent(now_unix().max(0) as u64);
        for s in &self.config.servers {
            if let Some((ago, reason)) = recent.get(&s.url) {
                let why = if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                };
                warn(&format!(
                    "Remote cache {} skipped: unreachable {} s ago{why} (asked again {} s after \
                     that; `nip cache remote status` checks it now)",
                    s.url,
                    ago.as_secs(),
                    REMEMBER.as_secs()
                ));
                self.down.borrow_mut().insert(s.url.clone());
            }
        }
    }

    /// A failure talking to `rc`: an unreachable server is asked no more in this run, and, when
    /// `remember` (it failed to answer a lookup), by the runs of the next little while.
    fn note_failure(&self, rc: &RemoteClient, e: &RemoteError, remember: bool) {
        if e.is_unreachable() {
            self.down.borrow_mut().insert(rc.server.url.clone());
            if remember {
                self.unreachable
                    .note(&rc.server.url, now_unix().max(0) as u64, &e.to_string());
            }
        }
    }

    /// `rc` answered: it is reachable again.
    fn note_answer(&self, rc: &RemoteClient) {
        self.unreachable.forget(&rc.server.url);
    }

    /// Appends to the record; failing to record is worth a warning, never a failure.
    pub fn log(&self, op: Op) {
        if let Err(e) = self.record.append(&op) {
            warn(&format!("cannot record the operation: {e}"));
        }
    }

    /// Looks `key` up on each server in order and downloads the first hit into the local cache,
    /// verified against its size and SHA-256 as far as the lookup or, failing that, the server's
    /// metadata give them. `fallback` supplies metadata if the server's is unusable. With
    /// `unpack_into` and a known size, the package is unpacked there (unpublished) while it
    /// downloads.
    pub fn fetch(
        &self,
        key: &str,
        fallback: &dyn Fn(&Found) -> Metadata,
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
            let mut info = match rc.lookup(key) {
                Ok(Some(info)) => info,
                Ok(None) => {
                    self.note_answer(&rc);
                    self.log(op(OpKind::Lookup, "miss", None));
                    continue;
                }
                Err(e) => {
                    self.note_failure(&rc, &e, true);
                    fail(&format!("Remote cache lookup failed: {e}"));
                    self.log(op(OpKind::Lookup, "failed", Some(e.to_string())));
                    failed = true;
                    continue;
                }
            };
            self.note_answer(&rc);
            self.log(op(OpKind::Lookup, "hit", None));
            // The server's metadata of this key, if it has usable metadata: it also gives size
            // and SHA-256 to verify when the lookup did not (the guide's lookup has only the URL).
            let remote_meta = rc
                .metadata(key)
                .ok()
                .and_then(|v| serde_json::from_value::<Metadata>(v).ok())
                .filter(|m| m.key == key);
            if let Some(m) = &remote_meta {
                info.size = info.size.or(Some(m.size));
                info.sha256 = info.sha256.clone().or_else(|| Some(m.sha256.clone()));
            }
            let started = Instant::now();
            // Unpacking overlaps the download; without a thread it happens afterwards instead.
            // Bounded by the announced size, which the download never exceeds; of a download
            // of unknown size the whole file is unpacked afterwards.
            let limits = self.config.policies.unpack_limits();
            let size = info.size;
            let mut unpacker = unpack_into.zip(size).and_then(|(pkgs, size)| {
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
                    self.note_failure(&rc, &e, false);
                    match e {
                        RemoteError::Corrupt { .. } => {
                            warn(&format!("Remote download rejected, discarded: {e}"))
                        }
                        _ => fail(&format!("Download failed: {e}")),
                    }
                    self.log(op(OpKind::Download, "failed", Some(e.to_string())));
                    failed = true;
                    continue;
                }
            };
            let elapsed = started.elapsed();
            let mut meta = remote_meta.unwrap_or_else(|| fallback(&info));
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
    /// or every server's error (each recorded). With `probe`, each server is first asked with a
    /// lookup (a short deadline): an unreachable one fails fast, and one that already has these
    /// bytes is not sent them again.
    pub fn push(
        &self,
        meta: &Metadata,
        probe: bool,
    ) -> Result<(String, UploadOutcome), Vec<RemoteError>> {
        let path = self.local.artifact_path(&meta.key);
        let value = serde_json::to_value(meta).expect("metadata serializes");
        let mut errors = Vec::new();
        for rc in self.remotes() {
            let mut op = Op::new(OpKind::Upload, &meta.key, "ok");
            op.server = Some(rc.server.url.clone());
            op.bytes = Some(meta.size);
            let started = Instant::now();
            let probed = if probe {
                rc.lookup(&meta.key)
            } else {
                Ok(None)
            };
            let result = match probed {
                Err(e) if e.is_unreachable() => Err(e),
                Ok(Some(f))
                    if f.sha256
                        .as_deref()
                        .is_some_and(|s| s.eq_ignore_ascii_case(&meta.sha256)) =>
                {
                    Ok(UploadOutcome::AlreadyPresent)
                }
                // A miss, a key that may not read, or a server that does not say what it has.
                _ => rc.upload(&meta.key, &path, &meta.sha256, &value),
            };
            match result {
                Ok(outcome) => {
                    self.note_answer(&rc);
                    op.duration_ms = Some(started.elapsed().as_millis() as u64);
                    if outcome == UploadOutcome::AlreadyPresent {
                        op.outcome = "exists".into();
                    }
                    self.log(op);
                    return Ok((rc.server.url.clone(), outcome));
                }
                Err(e) => {
                    self.note_failure(&rc, &e, matches!(e, RemoteError::Unreachable { .. }));
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
