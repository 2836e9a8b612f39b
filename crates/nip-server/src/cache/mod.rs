//! The cache service layer: what the cache does with narinfos, NARs and artifacts, apart from
//! HTTP. Handlers in `nix/` and `v1/` and the background jobs call these; [`CacheError`] becomes a
//! status in one place ([`From<CacheError> for ApiError`]). The trust rules of uploads live here
//! (docs/security.md, "A write key is not a root key").
pub mod artifact;
pub mod cluster;
pub mod extras;
pub mod fill;
pub mod listing;
pub mod nar;
pub mod narinfo;
pub mod prefetch;
pub mod realisation;
pub mod upload;

use crate::error::ApiError;

/// Why the cache refused or failed a Nix operation.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The request itself is wrong (bad narinfo, NAR not uploaded first, …).
    #[error("{0}")]
    Invalid(String),
    /// A narinfo for this store path is stored with other contents.
    #[error("{store_path} is already in this cache with another NarHash, NarSize or References; store paths are immutable, so the upload was refused (stored from {origin})")]
    Immutable { store_path: String, origin: String },
    /// An upstream has a trusted narinfo for this store path with other contents.
    #[error("upstream {upstream} has {store_path} signed by a trusted key with another NarHash; an upload never shadows upstream content, so it was refused")]
    ShadowsUpstream {
        store_path: String,
        upstream: String,
    },
    /// Some upstream could not tell whether it has this store path.
    #[error("cannot accept {store_path} yet: upstream {} did not answer whether it has this path, and an upload must never shadow upstream content; retry when it is reachable, or remove it from --cache-upstream-url", upstreams.join(", "))]
    UpstreamsUnknown {
        store_path: String,
        upstreams: Vec<String>,
    },
    /// `--cache-require-trusted-signature` and no trusted upload key signed it.
    #[error("{store_path} is not signed by a trusted upload key ({}); this cache requires one (--cache-require-trusted-signature): sign it with `nix store sign --key-file <secret key> <path>` before uploading", if keys.is_empty() { "none is configured: add --cache-trusted-upload-key".to_string() } else { keys.join(", ") })]
    Untrusted {
        store_path: String,
        keys: Vec<String>,
    },
    /// Another file is stored under this name; stored files are never replaced.
    #[error("{0}")]
    Replaces(String),
    /// A signature in the name of a trusted key that does not verify.
    #[error("{what} carries a signature in the name of trusted key {key} that does not verify; it was refused")]
    Forged { what: String, key: String },
    #[error(transparent)]
    Meta(#[from] nip_store::MetaError),
    #[error(transparent)]
    Store(#[from] nip_store::StoreError),
    /// The index failed inside a shared lookup (its error as text).
    #[error("database: {0}")]
    Unavailable(String),
}

impl CacheError {
    /// A refusal by the trust rules: what an attempt to poison the cache looks like. Audited as
    /// an action of its own.
    pub fn is_trust_refusal(&self) -> bool {
        matches!(
            self,
            CacheError::Immutable { .. }
                | CacheError::ShadowsUpstream { .. }
                | CacheError::Untrusted { .. }
                | CacheError::Forged { .. }
                | CacheError::Replaces(_)
        )
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        // Exhaustive on purpose: a new refusal must choose its status. Uploads never get a 5xx
        // (Nix 2.8 hangs on one): UpstreamsUnknown is a 424, not a 503.
        match e {
            CacheError::Invalid(m) => ApiError::BadRequest(m),
            e @ (CacheError::Immutable { .. }
            | CacheError::ShadowsUpstream { .. }
            | CacheError::Replaces(_)) => ApiError::Conflict(e.to_string()),
            e @ CacheError::UpstreamsUnknown { .. } => ApiError::FailedDependency(e.to_string()),
            e @ (CacheError::Untrusted { .. } | CacheError::Forged { .. }) => {
                ApiError::Forbidden(e.to_string())
            }
            CacheError::Meta(e) => e.into(),
            CacheError::Store(e) => e.into(),
            e @ CacheError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}
