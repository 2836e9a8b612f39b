//! Store paths: the validated `<hash>-<name>` base name and its `/nix/store` full form.

use std::fmt;
use std::str::FromStr;

use crate::base32;

/// The only store directory nip serves.
pub const STORE_DIR: &str = "/nix/store";
/// Length of the nix32 hash part of a store path (20 bytes).
pub const HASH_LEN: usize = 32;
/// Longest allowed name part, matching Nix's limit.
pub const MAX_NAME_LEN: usize = 211;

/// Why a store path (or its hash part) is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("store path hash must be {HASH_LEN} characters, got {0}")]
    HashLength(usize),
    #[error("store path hash contains invalid character {0:?} (not nix32)")]
    HashChar(char),
    #[error("store path {0:?} is missing the '-' between hash and name")]
    MissingDash(String),
    #[error("store path name is empty")]
    EmptyName,
    #[error("store path name is {0} characters, longer than {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error("store path name must not start with '.'")]
    LeadingDot,
    #[error("store path name contains invalid character {0:?}")]
    NameChar(char),
    #[error("path {0:?} is not directly inside {STORE_DIR}")]
    NotInStore(String),
}

/// The 32-char nix32 hash part of a store path, validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash(String);

impl StorePathHash {
    /// Validate exactly 32 nix32 characters.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        if let Some(c) = s
            .chars()
            .find(|&c| !c.is_ascii() || !base32::is_nix32_char(c as u8))
        {
            return Err(StorePathError::HashChar(c));
        }
        if s.len() != HASH_LEN {
            return Err(StorePathError::HashLength(s.len()));
        }
        Ok(StorePathHash(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StorePathHash {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A store path base name `<hash>-<name>`: name non-empty, chars `[A-Za-z0-9+\-._?=]`,
/// not starting with '.', at most [`MAX_NAME_LEN`] chars.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StorePath {
    hash: StorePathHash,
    name: String,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_' | '?' | '=')
}

fn validate_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if let Some(c) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(StorePathError::NameChar(c));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(name.len()));
    }
    // Rules out ".", ".." and hidden-file names, which could confuse path handling.
    if name.starts_with('.') {
        return Err(StorePathError::LeadingDot);
    }
    Ok(())
}

impl StorePath {
    /// Parse `<hash>-<name>` (no directory).
    pub fn parse_base_name(s: &str) -> Result<Self, StorePathError> {
        // `get` rather than slicing: a multi-byte char may straddle byte 32.
        let (hash, rest) = match (s.get(..HASH_LEN), s.get(HASH_LEN..)) {
            (Some(h), Some(r)) => (h, r),
            _ => {
                let hash_part = s.split('-').next().unwrap_or(s);
                StorePathHash::parse(hash_part)?;
                return Err(StorePathError::MissingDash(s.to_owned()));
            }
        };
        let hash = StorePathHash::parse(hash)?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(s.to_owned()))?;
        validate_name(name)?;
        Ok(StorePath {
            hash,
            name: name.to_owned(),
        })
    }

    /// Parse `/nix/store/<hash>-<name>`; any other directory or extra component is rejected.
    pub fn parse_full(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        Self::parse_base_name(base)
    }

    /// Build from an already-validated hash and a name.
    pub fn new(hash: StorePathHash, name: &str) -> Result<Self, StorePathError> {
        validate_name(name)?;
        Ok(StorePath {
            hash,
            name: name.to_owned(),
        })
    }

    pub fn hash(&self) -> &StorePathHash {
        &self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn full(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: &str = "w9yy7v61ipb5rx6i35zq1mvc2iqfmps1";

    #[test]
    fn good_paths() {
        let p = StorePath::parse_base_name(&format!("{H}-hello-2.10")).unwrap();
        assert_eq!(p.hash().as_str(), H);
        assert_eq!(p.name(), "hello-2.10");
        assert_eq!(p.base_name(), format!("{H}-hello-2.10"));
        assert_eq!(p.full(), format!("/nix/store/{H}-hello-2.10"));
        assert_eq!(StorePath::parse_full(&p.full()).unwrap(), p);
        for name in [
            "a",
            "x+y-z._?=",
            "gcc-13.2.0-lib",
            "A9",
            &"n".repeat(MAX_NAME_LEN),
        ] {
            StorePath::parse_base_name(&format!("{H}-{name}")).unwrap();
        }
        assert_eq!(H.parse::<StorePathHash>().unwrap().to_string(), H);
    }

    #[test]
    fn bad_names() {
        use StorePathError::*;
        let bp = |name: &str| StorePath::parse_base_name(&format!("{H}-{name}"));
        assert_eq!(bp(""), Err(EmptyName));
        assert_eq!(bp(".hidden"), Err(LeadingDot));
        assert_eq!(bp("."), Err(LeadingDot));
        assert_eq!(bp(".."), Err(LeadingDot));
        assert_eq!(bp("a b"), Err(NameChar(' ')));
        assert_eq!(bp("a/b"), Err(NameChar('/')));
        assert_eq!(bp("a\0"), Err(NameChar('\0')));
        assert_eq!(bp("ü"), Err(NameChar('ü')));
        assert_eq!(bp("a%2f"), Err(NameChar('%')));
        assert_eq!(
            bp(&"n".repeat(MAX_NAME_LEN + 1)),
            Err(NameTooLong(MAX_NAME_LEN + 1))
        );
        assert!(matches!(StorePath::parse_base_name(H), Err(MissingDash(_))));
        assert!(matches!(
            StorePath::parse_base_name(&format!("{H}_x")),
            Err(MissingDash(_))
        ));
    }

    #[test]
    fn bad_hashes() {
        use StorePathError::*;
        assert_eq!(StorePathHash::parse(&H[..31]), Err(HashLength(31)));
        assert_eq!(StorePathHash::parse(&format!("{H}0")), Err(HashLength(33)));
        for bad in ['e', 'o', 'u', 't', 'A', '/'] {
            let h = format!("{bad}{}", &H[1..]);
            assert_eq!(StorePathHash::parse(&h), Err(HashChar(bad)));
            assert_eq!(
                StorePath::parse_base_name(&format!("{h}-foo")),
                Err(HashChar(bad))
            );
        }
        // Short hash followed by a name: the hash error is the informative one.
        assert_eq!(StorePath::parse_base_name("abc-foo"), Err(HashLength(3)));
        assert!(StorePath::parse_base_name(&format!("{}é-foo", &H[..31])).is_err());
    }

    #[test]
    fn full_path_prefix() {
        let base = format!("{H}-hello");
        for bad in [
            base.clone(),
            format!("/nix/store//{base}"),
            format!("/nix/store/{base}/"),
            format!("/nix/store/{base}/bin/hello"),
            format!("/nix/storex/{base}"),
            format!("/gnu/store/{base}"),
            format!("nix/store/{base}"),
            format!("/nix/store/../store/{base}"),
        ] {
            assert!(StorePath::parse_full(&bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,300}") {
            let _ = StorePath::parse_base_name(&s);
            let _ = StorePath::parse_full(&s);
            let _ = StorePathHash::parse(&s);
        }

        #[test]
        fn valid_round_trip(h in "[0-9a-df-np-sv-z]{32}", name in "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}") {
            let p = StorePath::parse_base_name(&format!("{h}-{name}")).unwrap();
            prop_assert_eq!(StorePath::parse_full(&p.full()).unwrap(), p.clone());
            prop_assert_eq!(p.name(), name.as_str());
        }
    }
}
