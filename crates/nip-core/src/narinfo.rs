//! `.narinfo` files: parsing, canonical serialization and the signature fingerprint.

use std::fmt;

use crate::hash::{HashError, NixHash};
use crate::nar_file::Compression;
use crate::store_path::{StorePath, StorePathError};

/// Upper bound on narinfo text we will parse; real ones are a few KiB.
pub const MAX_NARINFO_SIZE: usize = 256 * 1024;

/// Why a narinfo could not be parsed. Line numbers are 1-based.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo is {0} bytes, larger than the {MAX_NARINFO_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("narinfo line {line}: expected \"Key: value\", got {text:?}")]
    MalformedLine { line: usize, text: String },
    #[error("narinfo line {line}: duplicate {key:?} field")]
    Duplicate { line: usize, key: &'static str },
    #[error("narinfo is missing required field {0:?}")]
    Missing(&'static str),
    #[error("narinfo line {line}: bad {key}: {source}")]
    BadHash {
        line: usize,
        key: &'static str,
        source: HashError,
    },
    #[error("narinfo line {line}: bad store path in {key}: {source}")]
    BadStorePath {
        line: usize,
        key: &'static str,
        source: StorePathError,
    },
    #[error("narinfo line {line}: {key} {value:?} is not a non-negative integer")]
    BadNumber {
        line: usize,
        key: &'static str,
        value: String,
    },
}

/// The contents of a `.narinfo` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    /// `StorePath:` (full path).
    pub store_path: StorePath,
    /// `URL:` of the NAR file, relative to the cache root.
    pub url: String,
    /// `Compression:` exactly as written.
    pub compression: Option<String>,
    pub file_hash: Option<NixHash>,
    pub file_size: Option<u64>,
    pub nar_hash: NixHash,
    pub nar_size: u64,
    /// `References:` base names, in file order.
    pub references: Vec<StorePath>,
    /// `Deriver:` base name as written.
    pub deriver: Option<String>,
    pub system: Option<String>,
    /// Every `Sig:` line, in order.
    pub sigs: Vec<String>,
    /// `CA:` content-address assertion.
    pub ca: Option<String>,
    /// Unknown keys, kept in order so re-serialising loses nothing.
    pub extra: Vec<(String, String)>,
}

/// First 80 chars of a bad line: enough to spot it, bounded so errors stay small.
fn excerpt(line: &str) -> String {
    line.chars().take(80).collect()
}

/// Store `value` into a single-valued slot, rejecting a second occurrence.
fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    line: usize,
    key: &'static str,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::Duplicate { line, key });
    }
    *slot = Some(value);
    Ok(())
}

fn parse_u64(value: &str, line: usize, key: &'static str) -> Result<u64, NarInfoError> {
    // `u64::from_str` accepts a leading '+', which Nix does not write; insist on digits.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NarInfoError::BadNumber {
            line,
            key,
            value: excerpt(value),
        });
    }
    value.parse().map_err(|_| NarInfoError::BadNumber {
        line,
        key,
        value: excerpt(value),
    })
}

fn parse_hash(value: &str, line: usize, key: &'static str) -> Result<NixHash, NarInfoError> {
    NixHash::parse(value).map_err(|source| NarInfoError::BadHash { line, key, source })
}

impl NarInfo {
    /// Parse narinfo text. Blank lines are ignored; unknown keys go to `extra`.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        if text.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge(text.len()));
        }
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut extra = Vec::new();

        for (idx, raw) in text.split('\n').enumerate() {
            let line = idx + 1;
            // Tolerate CRLF files; values never legitimately end in '\r'.
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            if raw.trim().is_empty() {
                continue;
            }
            // "Key:" at end of line is an empty value (e.g. a trimmed "References: ").
            let (key, value) = match raw.split_once(": ") {
                Some(kv) => kv,
                None => match raw.strip_suffix(':') {
                    Some(k) => (k, ""),
                    None => {
                        return Err(NarInfoError::MalformedLine {
                            line,
                            text: excerpt(raw),
                        })
                    }
                },
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(NarInfoError::MalformedLine {
                    line,
                    text: excerpt(raw),
                });
            }
            match key {
                "StorePath" => {
                    let p = StorePath::parse_full(value).map_err(|source| {
                        NarInfoError::BadStorePath {
                            line,
                            key: "StorePath",
                            source,
                        }
                    })?;
                    set_once(&mut store_path, p, line, "StorePath")?;
                }
                "URL" => set_once(&mut url, value.to_owned(), line, "URL")?,
                "Compression" => set_once(&mut compression, value.to_owned(), line, "Compression")?,
                "FileHash" => {
                    let h = parse_hash(value, line, "FileHash")?;
                    set_once(&mut file_hash, h, line, "FileHash")?;
                }
                "FileSize" => {
                    let n = parse_u64(value, line, "FileSize")?;
                    set_once(&mut file_size, n, line, "FileSize")?;
                }
                "NarHash" => {
                    let h = parse_hash(value, line, "NarHash")?;
                    set_once(&mut nar_hash, h, line, "NarHash")?;
                }
                "NarSize" => {
                    let n = parse_u64(value, line, "NarSize")?;
                    set_once(&mut nar_size, n, line, "NarSize")?;
                }
                "References" => {
                    let refs = value
                        .split_whitespace()
                        .map(StorePath::parse_base_name)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|source| NarInfoError::BadStorePath {
                            line,
                            key: "References",
                            source,
                        })?;
                    set_once(&mut references, refs, line, "References")?;
                }
                "Deriver" => set_once(&mut deriver, value.to_owned(), line, "Deriver")?,
                "System" => set_once(&mut system, value.to_owned(), line, "System")?,
                "Sig" => sigs.push(value.to_owned()),
                "CA" => set_once(&mut ca, value.to_owned(), line, "CA")?,
                _ => extra.push((key.to_owned(), value.to_owned())),
            }
        }

        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }

    /// Canonical serialisation; hashes are written as `sha256:<nix32>`.
    pub fn to_text(&self) -> String {
        use fmt::Write as _;
        let mut out = String::with_capacity(512);
        // Writing to a String cannot fail, so the results are ignored.
        let _ = writeln!(out, "StorePath: {}", self.store_path.full());
        let _ = writeln!(out, "URL: {}", self.url);
        if let Some(c) = &self.compression {
            let _ = writeln!(out, "Compression: {c}");
        }
        if let Some(h) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(out, "FileSize: {n}");
        }
        let _ = writeln!(out, "NarHash: {}", self.nar_hash);
        let _ = writeln!(out, "NarSize: {}", self.nar_size);
        // Nix always writes References, even when empty.
        let refs: Vec<String> = self.references.iter().map(StorePath::base_name).collect();
        let _ = writeln!(out, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(out, "Deriver: {d}");
        }
        if let Some(s) = &self.system {
            let _ = writeln!(out, "System: {s}");
        }
        for sig in &self.sigs {
            let _ = writeln!(out, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(out, "CA: {ca}");
        }
        for (k, v) in &self.extra {
            let _ = writeln!(out, "{k}: {v}");
        }
        out
    }

    /// The string Nix signs: `1;<path>;<narhash>;<narsize>;<comma-joined full refs>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self.references.iter().map(StorePath::full).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path.full(),
            self.nar_hash.to_nix32_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    /// The compression in effect: a missing line means bzip2 (Nix's historic default);
    /// an unrecognised value gives `None`.
    pub fn compression_kind(&self) -> Option<Compression> {
        match &self.compression {
            None => Some(Compression::Bzip2),
            Some(s) => Compression::from_narinfo(s),
        }
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

#[cfg(test)]
pub(crate) mod tests;
