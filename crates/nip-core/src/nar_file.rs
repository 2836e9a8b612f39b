//! NAR file names as served under `/nar/`, and the compression methods their extensions name.
//!
//! Parsing is strict on purpose: a validated [`NarFileName`] is safe to join onto a
//! directory, because it can only contain nix32 characters, dots and a known extension.

use std::fmt;

use crate::base32;
use crate::hash::NixHash;

/// Compression of a NAR file, as named in narinfo `Compression:` lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
    Brotli,
    Lz4,
    Gzip,
}

impl Compression {
    /// Every variant, in a fixed order.
    pub const ALL: [Compression; 7] = [
        Compression::None,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Brotli,
        Compression::Lz4,
        Compression::Gzip,
    ];

    /// Map a narinfo `Compression:` value; unknown values give `None`.
    pub fn from_narinfo(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.narinfo_name() == s)
    }

    /// The narinfo `Compression:` value.
    pub fn narinfo_name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Brotli => "br",
            Compression::Lz4 => "lz4",
            Compression::Gzip => "gzip",
        }
    }

    /// File extension appended after `.nar` (empty for uncompressed).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
            Compression::Brotli => ".br",
            Compression::Lz4 => ".lz4",
            Compression::Gzip => ".gz",
        }
    }

    fn from_extension(ext: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.extension() == ext)
    }
}

/// Why a NAR file name was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NarFileError {
    #[error("NAR file name {0:?} does not have the form <hash>.nar[.ext]")]
    BadForm(String),
    #[error("NAR file hash must be {expected} nix32 characters, got {actual}")]
    HashLength { expected: usize, actual: usize },
    #[error("NAR file hash is not valid nix32: {0}")]
    HashEncoding(#[from] base32::Base32Error),
    #[error("unknown NAR file extension {0:?}")]
    UnknownExtension(String),
}

/// Length in nix32 chars of a sha256 file hash.
pub const NAR_HASH_CHARS: usize = 52;

/// A validated NAR file name `<52-char nix32 file hash>.nar[<ext>]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NarFileName {
    hash: String,
    compression: Compression,
}

impl NarFileName {
    /// Parse a bare file name (no `nar/` prefix).
    pub fn parse(s: &str) -> Result<Self, NarFileError> {
        let bad_form = || NarFileError::BadForm(s.to_owned());
        let dot = s.find('.').ok_or_else(bad_form)?;
        let (hash, rest) = (&s[..dot], &s[dot..]);
        let ext = rest.strip_prefix(".nar").ok_or_else(bad_form)?;
        let compression = Compression::from_extension(ext)
            .ok_or_else(|| NarFileError::UnknownExtension(ext.to_owned()))?;
        // Decoding checks the alphabet and the padding bits, so only canonical hashes pass.
        let digest = base32::decode(hash)?;
        if hash.len() != NAR_HASH_CHARS || digest.len() != 32 {
            return Err(NarFileError::HashLength {
                expected: NAR_HASH_CHARS,
                actual: hash.len(),
            });
        }
        Ok(NarFileName {
            hash: hash.to_owned(),
            compression,
        })
    }

    /// Name a NAR file by its file hash (meaningful for sha256 hashes).
    pub fn new(file_hash: &NixHash, compression: Compression) -> Self {
        NarFileName {
            hash: base32::encode(&file_hash.digest),
            compression,
        }
    }

    /// The nix32 file hash part.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// `<hash>.nar<ext>`.
    pub fn file_name(&self) -> String {
        format!("{}.nar{}", self.hash, self.compression.extension())
    }
}

impl fmt::Display for NarFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: &str = "15zk4zszw9lgkdkkwy7w11m5vag11n5dhv2i6hj308qpxczvdddx";

    #[test]
    fn compression_names_round_trip() {
        for c in Compression::ALL {
            assert_eq!(Compression::from_narinfo(c.narinfo_name()), Some(c));
        }
        assert_eq!(Compression::from_narinfo("brotli"), None);
        assert_eq!(Compression::from_narinfo("XZ"), None);
        assert_eq!(Compression::Zstd.extension(), ".zst");
    }

    #[test]
    fn accepts_good_names() {
        for c in Compression::ALL {
            let name = format!("{H}.nar{}", c.extension());
            let n = NarFileName::parse(&name).unwrap();
            assert_eq!(n.hash(), H);
            assert_eq!(n.compression(), c);
            assert_eq!(n.file_name(), name);
            assert_eq!(n.to_string(), name);
        }
    }

    #[test]
    fn new_matches_parse() {
        let h = NixHash::parse(&format!("sha256:{H}")).unwrap();
        let n = NarFileName::new(&h, Compression::Xz);
        assert_eq!(n.file_name(), format!("{H}.nar.xz"));
        assert_eq!(NarFileName::parse(&n.file_name()).unwrap(), n);
    }

    #[test]
    fn rejects_bad_names() {
        let cases = [
            "".to_owned(),
            "../../etc/passwd".to_owned(),
            "%2e%2e".to_owned(),
            "%2e%2e%2fetc%2fpasswd".to_owned(),
            format!("{H}.nar%2exz"),
            format!("../{H}.nar.xz"),
            format!("nar/{H}.nar.xz"),
            format!("{H}.nar/x"),
            format!("{H}.nar.xz/"),
            format!("{H}.nar.xz\0"),
            format!("{H}\0.nar"),
            format!("{H}.nar.rar"),
            format!("{H}.nar.xz.xz"),
            format!("{H}.narxz"),
            format!("{H}.tar.xz"),
            format!("{H}.nar."),
            format!("{H}.NAR.XZ"),
            H.to_owned(),
            format!("{}.nar.xz", &H[..51]),
            format!("{H}0.nar.xz"),
            format!("{}e.nar.xz", &H[..51]),
            format!("{}u.nar", &H[..51]),
            format!("g{}.nar", &H[1..]),       // non-zero padding bits
            format!("{}.nar", "0".repeat(32)), // sha1-sized
            format!(" {H}.nar"),
            format!("{H}.nar "),
        ];
        for name in &cases {
            assert!(
                NarFileName::parse(name).is_err(),
                "{name:?} should be rejected"
            );
        }
        assert_eq!(
            NarFileName::parse(&format!("{}.nar", &H[..51])),
            Err(NarFileError::HashEncoding(
                base32::Base32Error::InvalidLength(51)
            ))
        );
        assert_eq!(
            NarFileName::parse(&format!("{H}.nar.rar")),
            Err(NarFileError::UnknownExtension(".rar".into()))
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = NarFileName::parse(&s);
        }

        #[test]
        fn parsed_names_are_path_safe(s in "[0-9a-z./%]{0,70}") {
            if let Ok(n) = NarFileName::parse(&s) {
                let f = n.file_name();
                prop_assert_eq!(&f, &s);
                prop_assert!(!f.contains('/') && !f.starts_with('.') && !f.contains(".."));
            }
        }

        #[test]
        fn new_round_trips(digest in any::<[u8; 32]>(), idx in 0usize..7) {
            let n = NarFileName::new(&NixHash::sha256(digest), Compression::ALL[idx]);
            prop_assert_eq!(NarFileName::parse(&n.file_name()).unwrap(), n);
        }
    }
}
