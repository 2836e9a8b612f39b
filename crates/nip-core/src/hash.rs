//! Nix hash strings (`sha256:<nix32|hex|base64>` and SRI `sha256-<base64>`) and their algorithms.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::base32;

/// Hash algorithms Nix uses for NAR and file hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlgo {
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// Digest size in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// Name as written in hash strings: "sha1", "sha256", "sha512".
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Inverse of [`HashAlgo::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "sha1" => Some(HashAlgo::Sha1),
            "sha256" => Some(HashAlgo::Sha256),
            "sha512" => Some(HashAlgo::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a hash string could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("hash {0:?} has no algorithm prefix (expected e.g. \"sha256:...\" or \"sha256-...\")")]
    MissingAlgo(String),
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    #[error("{algo} hash has length {len}, which is not a valid nix32, hex or base64 length")]
    BadLength { algo: HashAlgo, len: usize },
    #[error("invalid {encoding} in {algo} hash: {reason}")]
    BadEncoding {
        algo: HashAlgo,
        encoding: &'static str,
        reason: String,
    },
    #[error("{algo} digest must be {expected} bytes, got {actual}")]
    WrongDigestLength {
        algo: HashAlgo,
        expected: usize,
        actual: usize,
    },
}

/// A digest together with its algorithm.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NixHash {
    pub algo: HashAlgo,
    pub digest: Vec<u8>,
}

impl NixHash {
    /// Parse `algo:<nix32|hex|base64>` (encoding chosen by length, as Nix does) or SRI
    /// `algo-<base64>`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        // SRI uses '-', Nix's own format ':'; whichever separator comes first wins.
        let sep = s
            .find([':', '-'])
            .ok_or_else(|| HashError::MissingAlgo(s.to_owned()))?;
        let (algo_name, rest) = (&s[..sep], &s[sep + 1..]);
        let algo = HashAlgo::from_name(algo_name)
            .ok_or_else(|| HashError::UnknownAlgo(algo_name.to_owned()))?;
        let size = algo.digest_len();
        let bad = |encoding: &'static str, reason: String| HashError::BadEncoding {
            algo,
            encoding,
            reason,
        };
        let digest = if s.as_bytes()[sep] == b'-' {
            decode_base64(rest).map_err(|e| bad("base64", e))?
        } else if rest.len() == size * 2 {
            hex::decode(rest).map_err(|e| bad("hex", e.to_string()))?
        } else if rest.len() == base32::encoded_len(size) {
            base32::decode(rest).map_err(|e| bad("nix32", e.to_string()))?
        } else if rest.len() == base64_len(size) {
            decode_base64(rest).map_err(|e| bad("base64", e))?
        } else {
            return Err(HashError::BadLength {
                algo,
                len: rest.len(),
            });
        };
        Self::new(algo, digest)
    }

    /// Build from raw parts, checking the digest length.
    pub fn new(algo: HashAlgo, digest: Vec<u8>) -> Result<Self, HashError> {
        if digest.len() != algo.digest_len() {
            return Err(HashError::WrongDigestLength {
                algo,
                expected: algo.digest_len(),
                actual: digest.len(),
            });
        }
        Ok(NixHash { algo, digest })
    }

    /// A SHA-256 hash from its digest.
    pub fn sha256(digest: [u8; 32]) -> Self {
        NixHash {
            algo: HashAlgo::Sha256,
            digest: digest.to_vec(),
        }
    }

    /// `algo:<nix32>`, the form used in narinfo files.
    pub fn to_nix32_string(&self) -> String {
        format!("{}:{}", self.algo, base32::encode(&self.digest))
    }

    /// Just the nix32 digest, no prefix.
    pub fn to_nix32_digest(&self) -> String {
        base32::encode(&self.digest)
    }

    /// Digest in lowercase hex, no prefix.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.digest)
    }

    /// SRI form `algo-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, STANDARD.encode(&self.digest))
    }
}

fn base64_len(size: usize) -> usize {
    size.div_ceil(3) * 4
}

fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    STANDARD.decode(s).map_err(|e| e.to_string())
}

impl fmt::Display for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32_string())
    }
}

impl FromStr for NixHash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const EMPTY_B64: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn all_four_forms_agree() {
        let expected = NixHash::sha256(Sha256::digest(b"").into());
        for s in [
            format!("sha256:{EMPTY_NIX32}"),
            format!("sha256:{EMPTY_HEX}"),
            format!("sha256:{}", EMPTY_HEX.to_uppercase()),
            format!("sha256:{EMPTY_B64}"),
            format!("sha256-{EMPTY_B64}"),
        ] {
            let h = NixHash::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(h, expected, "{s}");
            assert_eq!(s.parse::<NixHash>().unwrap(), expected);
        }
        assert_eq!(expected.to_string(), format!("sha256:{EMPTY_NIX32}"));
        assert_eq!(expected.to_hex(), EMPTY_HEX);
        assert_eq!(expected.to_sri(), format!("sha256-{EMPTY_B64}"));
    }

    #[test]
    fn other_algos() {
        let sha1 = NixHash::parse("sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709").unwrap();
        assert_eq!(sha1.algo, HashAlgo::Sha1);
        assert_eq!(NixHash::parse(&sha1.to_nix32_string()).unwrap(), sha1);
        assert_eq!(NixHash::parse(&sha1.to_sri()).unwrap(), sha1);
        let sha512 = NixHash::new(HashAlgo::Sha512, vec![7; 64]).unwrap();
        assert_eq!(sha512.to_nix32_string().len(), "sha512:".len() + 103);
        assert_eq!(NixHash::parse(&sha512.to_nix32_string()).unwrap(), sha512);
        assert_eq!(
            NixHash::parse(&format!("sha512:{}", sha512.to_hex())).unwrap(),
            sha512
        );
    }

    #[test]
    fn rejects_bad_hashes() {
        let cases = [
            "",
            "sha256",
            EMPTY_NIX32,
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:",
            "sha256:abc",
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e", // 'e'
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256-47DEQpj8HBSa", // SRI too short
            "sha1-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", // wrong size for algo
            "sha256-!!!!",
        ];
        for s in cases {
            assert!(NixHash::parse(s).is_err(), "{s:?} should fail");
        }
        assert_eq!(
            NixHash::parse("sha256:abc"),
            Err(HashError::BadLength {
                algo: HashAlgo::Sha256,
                len: 3
            })
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,120}") {
            let _ = NixHash::parse(&s);
        }

        #[test]
        fn parse_prefixed_never_panics(rest in "[0-9a-zA-Z+/=]{0,110}", algo in "sha(1|256|512)[:-]") {
            let _ = NixHash::parse(&format!("{algo}{rest}"));
        }

        #[test]
        fn forms_round_trip(digest in any::<[u8; 32]>()) {
            let h = NixHash::sha256(digest);
            prop_assert_eq!(NixHash::parse(&h.to_nix32_string()).unwrap(), h.clone());
            prop_assert_eq!(NixHash::parse(&format!("sha256:{}", h.to_hex())).unwrap(), h.clone());
            prop_assert_eq!(NixHash::parse(&h.to_sri()).unwrap(), h);
        }
    }
}
