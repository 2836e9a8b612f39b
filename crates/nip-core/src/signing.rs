//! Nix ed25519 signing keys, public keys and narinfo signatures in `name:base64` form.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _};

use crate::narinfo::NarInfo;

/// Why a key (or key name) was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key name {0:?} is invalid: it must be non-empty and contain no ':' or whitespace")]
    BadName(String),
    #[error("key is not in \"name:base64\" form")]
    MissingColon,
    #[error("key data is not valid base64: {0}")]
    BadBase64(String),
    #[error("key data is {actual} bytes, expected {expected}")]
    BadLength {
        expected: &'static str,
        actual: usize,
    },
    #[error("public key bytes are not a valid ed25519 point")]
    InvalidPublicKey,
    #[error("secret key's embedded public half does not match its seed")]
    PublicHalfMismatch,
}

fn validate_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        return Err(KeyError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Split `name:base64` and decode the data part.
fn split_key(s: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let (name, data) = s.split_once(':').ok_or(KeyError::MissingColon)?;
    validate_name(name)?;
    let bytes = STANDARD
        .decode(data)
        .map_err(|e| KeyError::BadBase64(e.to_string()))?;
    Ok((name, bytes))
}

/// A named ed25519 secret key, as in `nix-store --generate-binary-cache-key` output.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// Create a fresh random key.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        validate_name(name)?;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Ok(SigningKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Parse `name:base64(seed ++ public)` (libsodium's 64-byte form) or a 32-byte seed.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(s.trim())?;
        if bytes.len() != 32 && bytes.len() != 64 {
            return Err(KeyError::BadLength {
                expected: "64 (or a 32-byte seed)",
                actual: bytes.len(),
            });
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[..32]);
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        // A mismatched public half means a corrupted file; signing with it would
        // produce signatures nobody can verify under the advertised key.
        if bytes.len() == 64 && key.verifying_key().as_bytes()[..] != bytes[32..] {
            return Err(KeyError::PublicHalfMismatch);
        }
        Ok(SigningKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name:base64(seed ++ public)`, the format Nix reads with `secret-key-files`.
    pub fn to_secret_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.to_keypair_bytes())
        )
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Sign `message`, returning `name:base64(signature)`.
    pub fn sign(&self, message: &[u8]) -> String {
        let sig = self.key.sign(message);
        format!("{}:{}", self.name, STANDARD.encode(sig.to_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    // Never print key material: this type ends up in config structs that get logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A named ed25519 public key, as in Nix's `trusted-public-keys`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// Parse `name:base64(32 bytes)`; surrounding whitespace is ignored.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_key(s.trim())?;
        let raw: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::BadLength {
                expected: "32",
                actual: bytes.len(),
            })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| KeyError::InvalidPublicKey)?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Check a `name:base64` signature; false if the name differs, it is malformed, or
    /// it does not verify.
    pub fn verify(&self, message: &[u8], sig: &str) -> bool {
        let Some((name, data)) = sig.trim().split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = STANDARD.decode(data) else {
            return false;
        };
        let Ok(raw) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        // Strict verification rejects malleable/small-order inputs, like libsodium does.
        self.key
            .verify_strict(message, &Signature::from_bytes(&raw))
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The first key in `keys` that verifies any of the narinfo's `Sig:` lines over its
/// fingerprint.
pub fn verify_narinfo<'a>(info: &NarInfo, keys: &'a [PublicKey]) -> Option<&'a PublicKey> {
    let fingerprint = info.fingerprint();
    keys.iter().find(|key| {
        info.sigs
            .iter()
            .any(|sig| key.verify(fingerprint.as_bytes(), sig))
    })
}

impl NarInfo {
    /// Sign the fingerprint, replacing any earlier signature by a key of the same name.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        self.sigs
            .retain(|s| s.split_once(':').map(|(n, _)| n) != Some(key.name()));
        self.sigs.push(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narinfo::tests::{CURL, HELLO};
    use proptest::prelude::*;

    const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

    #[test]
    fn real_cache_nixos_org_signatures_verify() {
        let nixos = PublicKey::parse(NIXOS_KEY).unwrap();
        assert_eq!(nixos.to_string(), NIXOS_KEY);
        for text in [HELLO, CURL] {
            let info = NarInfo::parse(text).unwrap();
            let keys = [nixos.clone()];
            assert_eq!(verify_narinfo(&info, &keys), Some(&keys[0]));
            // Changing anything in the fingerprint breaks it.
            let mut tampered = info.clone();
            tampered.nar_size += 1;
            assert_eq!(verify_narinfo(&tampered, &keys), None);
            let mut fewer_refs = info.clone();
            fewer_refs.references.pop();
            assert_eq!(verify_narinfo(&fewer_refs, &keys), None);
        }
    }

    #[test]
    fn sign_then_verify() {
        let key = SigningKey::generate("cache.example.org-1").unwrap();
        let public = key.public_key();
        assert_eq!(public.name(), "cache.example.org-1");
        let mut info = NarInfo::parse(HELLO).unwrap();
        info.sign(&key);
        assert_eq!(info.sigs.len(), 2);
        let keys = [public.clone()];
        assert_eq!(verify_narinfo(&info, &keys), Some(&keys[0]));
        // Re-signing replaces our old signature rather than piling up.
        info.sign(&key);
        assert_eq!(info.sigs.len(), 2);
        assert!(info.sigs[0].starts_with("cache.nixos.org-1:"));
        // The signature survives serialisation.
        let reparsed = NarInfo::parse(&info.to_text()).unwrap();
        assert_eq!(verify_narinfo(&reparsed, &keys), Some(&keys[0]));

        let mut tampered = info.clone();
        tampered.nar_size = 205969;
        assert_eq!(verify_narinfo(&tampered, &keys), None);

        let other = SigningKey::generate("cache.example.org-1")
            .unwrap()
            .public_key();
        assert_eq!(verify_narinfo(&info, std::slice::from_ref(&other)), None);

        // Same key material under another name must not verify.
        let renamed = PublicKey::parse(&public.to_string().replace("example", "other")).unwrap();
        assert!(!renamed.verify(info.fingerprint().as_bytes(), info.sigs.last().unwrap()));
        assert_eq!(verify_narinfo(&info, &[renamed, other.clone()]), None);
        // Order of keys decides which match is reported.
        let both = [other, public];
        assert_eq!(verify_narinfo(&info, &both), Some(&both[1]));
    }

    #[test]
    fn verify_rejects_malformed_sigs() {
        let key = SigningKey::generate("k").unwrap();
        let public = key.public_key();
        let good = key.sign(b"msg");
        assert!(public.verify(b"msg", &good));
        assert!(!public.verify(b"msh", &good));
        let data = good.split_once(':').unwrap().1;
        for bad in [
            "",
            "k",
            "k:",
            "k:!!!",
            "k:AAAA",
            &format!("j:{data}"),
            &format!("k:{}", &data[4..]),
        ] {
            assert!(!public.verify(b"msg", bad), "{bad:?}");
        }
    }

    #[test]
    fn key_strings_round_trip() {
        let key = SigningKey::generate("cache.example.org-1").unwrap();
        let secret = key.to_secret_string();
        let parsed = SigningKey::parse(&format!("  {secret}\n")).unwrap();
        assert_eq!(parsed.name(), key.name());
        assert_eq!(parsed.to_secret_string(), secret);
        assert_eq!(parsed.public_key(), key.public_key());
        let public = key.public_key().to_string();
        assert_eq!(PublicKey::parse(&public).unwrap().to_string(), public);
        assert_eq!(public.parse::<PublicKey>().unwrap(), key.public_key());
        // A bare 32-byte seed gives the same key.
        let keypair = STANDARD.decode(secret.split_once(':').unwrap().1).unwrap();
        let seed_only = format!("cache.example.org-1:{}", STANDARD.encode(&keypair[..32]));
        assert_eq!(
            SigningKey::parse(&seed_only).unwrap().to_secret_string(),
            secret
        );
        // Debug never leaks key material.
        let dbg = format!("{key:?}");
        assert!(dbg.contains("cache.example.org-1"));
        assert!(!dbg.contains(secret.split_once(':').unwrap().1));
    }

    #[test]
    fn bad_keys() {
        use KeyError::*;
        for name in ["", "a b", "a:b", "tab\t", "nl\n"] {
            assert_eq!(
                SigningKey::generate(name).unwrap_err(),
                BadName(name.into())
            );
        }
        assert_eq!(PublicKey::parse("nocolon").unwrap_err(), MissingColon);
        assert_eq!(
            PublicKey::parse(":AAAA").unwrap_err(),
            BadName(String::new())
        );
        assert!(matches!(
            PublicKey::parse("k:!!").unwrap_err(),
            BadBase64(_)
        ));
        assert!(matches!(
            PublicKey::parse("k:AAAA").unwrap_err(),
            BadLength { actual: 3, .. }
        ));
        let secret = SigningKey::generate("k").unwrap().to_secret_string();
        // A secret key is not a public key, and vice versa.
        assert!(matches!(
            PublicKey::parse(&secret).unwrap_err(),
            BadLength { actual: 64, .. }
        ));
        assert!(matches!(
            SigningKey::parse("k:AAAA").unwrap_err(),
            BadLength { actual: 3, .. }
        ));
        // Corrupt the public half of a 64-byte secret.
        let mut bytes = STANDARD.decode(secret.split_once(':').unwrap().1).unwrap();
        bytes[40] ^= 1;
        let corrupt = format!("k:{}", STANDARD.encode(&bytes));
        assert_eq!(SigningKey::parse(&corrupt).unwrap_err(), PublicHalfMismatch);
        assert!(KeyError::PublicHalfMismatch
            .to_string()
            .contains("does not match"));
    }

    proptest! {
        #[test]
        fn key_parsers_never_panic(s in "\\PC{0,120}") {
            let _ = PublicKey::parse(&s);
            let _ = SigningKey::parse(&s);
        }

        #[test]
        fn base64ish_keys_never_panic(name in "[a-z.-]{0,10}", data in "[A-Za-z0-9+/=]{0,100}") {
            let s = format!("{name}:{data}");
            let _ = PublicKey::parse(&s);
            let _ = SigningKey::parse(&s);
        }

        #[test]
        fn verify_never_panics(sig in "\\PC{0,120}") {
            let key = PublicKey::parse(NIXOS_KEY).unwrap();
            prop_assert!(!key.verify(b"x", &sig));
        }
    }
}
