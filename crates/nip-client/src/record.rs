//! The local record of cache operations, `$XDG_CACHE_HOME/nip/operations.jsonl`: one JSON object
//! per line, appended, kept across runs; `nip cache stats` and `nip cache list --recent` read it.
use crate::error::{io_ctx, Result};
use crate::local::Metadata;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// One `nip build`: outcome `local`, `remote`, `built` or `failed`.
    Build,
    /// A remote lookup: `hit`, `miss` or `failed`.
    Lookup,
    /// A transfer from a remote: `ok` or `failed`.
    Download,
    /// A transfer to a remote: `ok`, `exists` or `failed`.
    Upload,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Op {
    /// RFC 3339, UTC.
    pub at: String,
    pub op: OpKind,
    pub key: String,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// For cache hits: the build time the hit saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Op {
    pub fn new(op: OpKind, key: &str, outcome: &str) -> Self {
        Op {
            at: now_rfc3339(),
            op,
            key: key.to_string(),
            outcome: outcome.to_string(),
            server: None,
            bytes: None,
            duration_ms: None,
            saved_secs: None,
            detail: None,
        }
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    nip_core::api::rfc3339(now_unix())
}

pub struct Record {
    path: PathBuf,
}

impl Record {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Appends one line. A single `write` of a short line with O_APPEND keeps concurrent runs from
    /// interleaving.
    pub fn append(&self, op: &Op) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_ctx(format!("create {}", dir.display())))?;
        let mut line = serde_json::to_string(op).expect("op serializes");
        line.push('\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(io_ctx(format!("append to {}", self.path.display())))
    }

    /// Every readable operation, oldest first. Lines that do not parse (a torn write, a newer
    /// format) are skipped rather than making the whole record unreadable.
    pub fn read(&self) -> Vec<Op> {
        let Ok(f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}

/// `nip cache stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub builds: u64,
    pub local_hits: u64,
    pub remote_hits: u64,
    pub built: u64,
    pub failed_builds: u64,
    /// (local + remote hits) / builds, 0..1; `None` with no builds.
    pub hit_rate: Option<f64>,
    pub uploads: u64,
    pub uploads_ok: u64,
    pub upload_success_rate: Option<f64>,
    pub downloads: u64,
    pub downloads_ok: u64,
    pub download_success_rate: Option<f64>,
    pub avg_download_ms: Option<f64>,
    pub local_artifacts: u64,
    pub local_cache_bytes: u64,
    pub avg_cache_age_secs: Option<f64>,
    pub build_time_saved_secs: f64,
}

fn rate(ok: u64, all: u64) -> Option<f64> {
    (all > 0).then(|| ok as f64 / all as f64)
}

/// Computes the figures from the record and the local cache contents (pure; `now` injected).
pub fn stats(ops: &[Op], local: &[Metadata], local_bytes: u64, now: i64) -> Stats {
    let mut s = Stats::default();
    let mut dl_ms = Vec::new();
    for op in ops {
        match (op.op, op.outcome.as_str()) {
            (OpKind::Build, o) => {
                s.builds += 1;
                match o {
                    "local" => s.local_hits += 1,
                    "remote" => s.remote_hits += 1,
                    "built" => s.built += 1,
                    _ => s.failed_builds += 1,
                }
                s.build_time_saved_secs += op.saved_secs.unwrap_or(0.0);
            }
            (OpKind::Upload, o) => {
                s.uploads += 1;
                s.uploads_ok += u64::from(o == "ok" || o == "exists");
            }
            (OpKind::Download, o) => {
                s.downloads += 1;
                if o == "ok" {
                    s.downloads_ok += 1;
                    dl_ms.extend(op.duration_ms);
                }
            }
            (OpKind::Lookup, _) => {}
        }
    }
    s.hit_rate = rate(s.local_hits + s.remote_hits, s.builds);
    s.upload_success_rate = rate(s.uploads_ok, s.uploads);
    s.download_success_rate = rate(s.downloads_ok, s.downloads);
    s.avg_download_ms =
        (!dl_ms.is_empty()).then(|| dl_ms.iter().sum::<u64>() as f64 / dl_ms.len() as f64);
    s.local_artifacts = local.len() as u64;
    s.local_cache_bytes = local_bytes;
    let ages: Vec<f64> = local
        .iter()
        .filter_map(|m| humantime::parse_rfc3339(&m.created).ok())
        .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| (now - d.as_secs() as i64).max(0) as f64)
        .collect();
    s.avg_cache_age_secs = (!ages.is_empty()).then(|| ages.iter().sum::<f64>() / ages.len() as f64);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_skips_torn_lines() {
        let t = tempfile::tempdir().unwrap();
        let r = Record::new(t.path().join("nip/ops.jsonl"));
        r.append(&Op::new(OpKind::Build, "k", "built")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(t.path().join("nip/ops.jsonl"))
            .unwrap()
            .write_all(b"{\"torn\n")
            .unwrap();
        r.append(&Op::new(OpKind::Upload, "k", "ok")).unwrap();
        let ops = r.read();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].op, OpKind::Upload);
    }

    #[test]
    fn stats_count_rates_and_savings() {
        let mut ops = vec![
            Op::new(OpKind::Build, "a", "built"),
            Op::new(OpKind::Upload, "a", "ok"),
            Op::new(OpKind::Upload, "a", "failed"),
            Op::new(OpKind::Download, "a", "ok"),
            Op::new(OpKind::Download, "a", "failed"),
        ];
        let mut hit = Op::new(OpKind::Build, "a", "remote");
        hit.saved_secs = Some(2.5);
        ops.push(hit);
        ops[3].duration_ms = Some(40);
        let s = stats(&ops, &[], 0, 0);
        assert_eq!((s.builds, s.remote_hits, s.built), (2, 1, 1));
        assert_eq!(s.hit_rate, Some(0.5));
        assert_eq!(s.upload_success_rate, Some(0.5));
        assert_eq!(s.download_success_rate, Some(0.5));
        assert_eq!(s.avg_download_ms, Some(40.0));
        assert_eq!(s.build_time_saved_secs, 2.5);
        assert_eq!(stats(&[], &[], 0, 0).hit_rate, None);
    }
}
