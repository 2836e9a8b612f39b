//! The `/v1` artifact cache API: request/response bodies and key rules, shared by the server and
//! the client so both sides agree by construction.
use serde::{Deserialize, Serialize};

/// Header carrying the SHA-256 (hex) the client expects the uploaded bytes to have.
pub const HEADER_SHA256: &str = "x-nip-sha256";
/// Longest artifact key.
pub const MAX_KEY_LEN: usize = 255;

/// Every error response: `{"error": "..."}` with a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// `GET /v1/artifacts/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactInfo {
    pub key: String,
    /// Relative to the server's base URL (`/v1/download/{key}`), or absolute.
    pub download_url: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// `POST /v1/artifacts/{key}`: 201 when stored, 200 when the same bytes were already there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadResult {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// False when the key already held these exact bytes (idempotent re-upload).
    pub created: bool,
}

/// `GET /v1/artifacts?name=&version=&limit=`: newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactList {
    pub artifacts: Vec<ArtifactListItem>,
    /// True when the server stopped adding items before `limit` because the response grew past
    /// its size cap: ask again with a narrower query (or a smaller `limit`) for the rest. Absent
    /// (false) otherwise, so older clients and servers read each other unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactListItem {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub created_at: String,
    pub metadata: serde_json::Value,
}

#[derive(Debug, PartialEq, Eq)]
pub struct InvalidKey(pub String);

impl std::fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid artifact key {:?}: use 1-255 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
            self.0.chars().take(80).collect::<String>()
        )
    }
}

impl std::error::Error for InvalidKey {}

/// Checks an artifact key against `^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$`.
pub fn validate_key(key: &str) -> Result<(), InvalidKey> {
    let b = key.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_KEY_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(InvalidKey(key.to_string()))
    }
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-23T10:00:00Z`).
pub fn rfc3339(unix_secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys() {
        for good in ["a", "hello-2.12-x86_64", "A.b_c-D", &"k".repeat(255)] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "_x",
            "a/b",
            "..",
            "a b",
            "a%2fb",
            "a\0",
            "é",
            &"k".repeat(256),
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lookup_body_uses_camel_case() {
        let info = ArtifactInfo {
            key: "k".into(),
            download_url: "/v1/download/k".into(),
            size: 3,
            sha256: "ab".into(),
            created_at: rfc3339(0),
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["downloadUrl"], "/v1/download/k");
        assert_eq!(v["createdAt"], "1970-01-01T00:00:00Z");
    }

    proptest! {
        #[test]
        fn accepted_keys_are_safe_path_segments(key in "\\PC{0,300}") {
            if validate_key(&key).is_ok() {
                prop_assert!(!key.contains('/') && key != "." && key != ".." && !key.starts_with('.'));
            }
        }
    }
}
