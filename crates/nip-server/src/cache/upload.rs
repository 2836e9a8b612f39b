//! Uploaded narinfos (`nix copy --to`) and the trust rules that keep a write key from becoming a
//! root key for every Nix client (docs/security.md):
//! 1. a stored store path is immutable: the same contents again is a no-op, other contents a 409;
//! 2. an upload never shadows upstream content: a path not stored yet is first looked up upstream
//!    (the same coalesced, negative-cached fetch a GET miss makes); an upstream's trusted narinfo
//!    wins, and while an upstream cannot answer, new paths are refused with a 4xx (fail closed);
//! 3. with `--cache-require-trusted-signature`, a narinfo needs a valid signature by one of the
//!    `--cache-trusted-upload-key`s (kept in the served narinfo beside this cache's own);
//! 4. only what the cache can stand behind is signed and served: unverifiable signatures, junk
//!    Deriver/CA values and unknown fields are dropped ([`sanitize`]).
use nip_core::nar_file::NarFileName;
use nip_core::narinfo::NarInfo;
use nip_core::signing::{verify_narinfo, PublicKey};
use nip_core::store_path::{StorePath, StorePathHash};
use nip_store::{NarInfoRecord, PutNarInfo};

use crate::cache::narinfo::{fetch, Fetched};
use crate::cache::CacheError;
use crate::AppState;

/// What an accepted upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uploaded {
    /// Stored as uploaded (and signed by this cache).
    Stored,
    /// The same contents were already stored, from an earlier upload or an upstream; nothing
    /// changed (retries of `nix copy` succeed).
    AlreadyStored,
}

/// Parses an uploaded narinfo for `hash` (the URL's).
pub fn parse(hash: &StorePathHash, text: &str) -> Result<NarInfo, CacheError> {
    let info =
        NarInfo::parse(text).map_err(|e| CacheError::Invalid(format!("invalid narinfo: {e}")))?;
    if info.store_path.hash() != hash {
        return Err(CacheError::Invalid(
            "the narinfo's StorePath does not match the URL".into(),
        ));
    }
    Ok(info)
}

/// Stores an uploaded narinfo under the trust rules. `uploader` is the API key's name.
pub async fn store(
    state: &AppState,
    mut info: NarInfo,
    uploader: Option<String>,
) -> Result<Uploaded, CacheError> {
    let store_path = info.store_path.full();
    let signed_by = vouching_key(state, &info)?;
    sanitize(&mut info, &trusted_keys(state));
    let hash = info.store_path.hash().clone();
    if let Some(existing) = state.meta.get_narinfo(hash.as_str()).await? {
        return same_contents(&existing, &info);
    }
    let file = stored_nar(state, &info).await?;
    if let Some(done) = check_upstreams(state, &hash, &info, signed_by.is_some()).await? {
        return Ok(done);
    }
    if state.config.sign_narinfo {
        info.sign(&state.signer);
    }
    let rec = NarInfoRecord {
        hash: hash.as_str().to_string(),
        store_path,
        nar_file: file.file_name(),
        file_size: info.file_size.map(|n| n as i64),
        file_hash: info.file_hash.as_ref().map(|h| h.to_string()),
        nar_hash: info.nar_hash.to_string(),
        narinfo: info.to_text(),
        origin: nip_store::UPLOAD_ORIGIN.into(),
        signed_by,
        uploaded_by: uploader,
    };
    match state.meta.put_narinfo(&rec, &[]).await? {
        PutNarInfo::Inserted => {
            state.hot_narinfos.forget(hash.as_str());
            state.stats.activity("narinfo-upload", rec.store_path);
            Ok(Uploaded::Stored)
        }
        // Stored meanwhile by a concurrent upload or fetch: judged like any stored path.
        PutNarInfo::Exists(existing) => same_contents(&existing, &info),
    }
}

/// The trusted upload key whose signature vouches for `info`, if any; an error when one is
/// required and none signed.
fn vouching_key(state: &AppState, info: &NarInfo) -> Result<Option<String>, CacheError> {
    let keys = &state.config.trusted_upload_keys;
    let key = verify_narinfo(info, keys).map(|k| k.name().to_string());
    if key.is_none() && state.config.require_trusted_signature {
        return Err(CacheError::Untrusted {
            store_path: info.store_path.full(),
            keys: keys.iter().map(|k| k.name().to_string()).collect(),
        });
    }
    Ok(key)
}

/// Every key whose signature this cache can vouch for: trusted upload keys and upstream keys.
fn trusted_keys(state: &AppState) -> Vec<PublicKey> {
    let config = state.config();
    let mut keys = config.trusted_upload_keys.clone();
    keys.extend(config.upstream_public_keys.iter().cloned());
    keys
}

/// What this cache signs and serves of an upload is only what it can stand behind: signatures
/// that verify against a trusted key (a fake `Sig: cache.nixos.org-1:…` would otherwise be served
/// beside this cache's own), a Deriver that is a store path name, a CA that names a known method;
/// unknown fields are dropped. None of these enter the signed fingerprint.
pub(crate) fn sanitize(info: &mut NarInfo, keys: &[PublicKey]) {
    let fingerprint = info.fingerprint();
    info.sigs.retain(|sig| {
        keys.iter().any(|k| {
            sig.split_once(':')
                .is_some_and(|(name, _)| name == k.name())
                && k.verify(fingerprint.as_bytes(), sig)
        })
    });
    if info
        .deriver
        .as_deref()
        .is_some_and(|d| !d.ends_with(".drv") || StorePath::parse_base_name(d).is_err())
    {
        info.deriver = None;
    }
    // A control character (a lone `\r`) would let a reader that also splits lines on it see a
    // line nip never checked, such as a `Sig:`.
    let plain = |v: &str| !v.chars().any(char::is_control);
    if info
        .ca
        .as_deref()
        .is_some_and(|ca| !(ca.starts_with("fixed:") || ca.starts_with("text:")) || !plain(ca))
    {
        info.ca = None;
    }
    if info.system.as_deref().is_some_and(|s| !plain(s)) {
        info.system = None;
    }
    info.extra.clear();
}

/// Whether two narinfos describe the same contents of their store path.
fn same_narinfo(a: &NarInfo, b: &NarInfo) -> bool {
    a.nar_hash == b.nar_hash && a.nar_size == b.nar_size && a.references == b.references
}

/// Accepts an upload of a stored path only when it describes the same contents.
fn same_contents(existing: &NarInfoRecord, info: &NarInfo) -> Result<Uploaded, CacheError> {
    let same = NarInfo::parse(&existing.narinfo).is_ok_and(|stored| same_narinfo(&stored, info));
    if same {
        Ok(Uploaded::AlreadyStored)
    } else {
        Err(CacheError::Immutable {
            store_path: info.store_path.full(),
            origin: existing.origin.clone(),
        })
    }
}

/// The uploaded narinfo's NAR must be stored already, with the FileHash and FileSize it states.
async fn stored_nar(state: &AppState, info: &NarInfo) -> Result<NarFileName, CacheError> {
    let file = info
        .url
        .strip_prefix("nar/")
        .and_then(|f| NarFileName::parse(f).ok())
        .ok_or_else(|| {
            CacheError::Invalid(format!(
                "URL {:?} must be nar/<filehash>.nar[.ext]",
                info.url
            ))
        })?;
    let stored = state
        .meta
        .get_nar(&file.file_name())
        .await?
        .ok_or_else(|| {
            CacheError::Invalid(format!(
                "upload the NAR first: PUT /nar/{file} (this cache does not have it)"
            ))
        })?;
    let file_hash_ok = info
        .file_hash
        .as_ref()
        .is_some_and(|h| hex::encode(&h.digest) == stored.sha256);
    if !file_hash_ok || info.file_size != Some(stored.size as u64) {
        return Err(CacheError::Invalid(
            "FileHash/FileSize do not match the stored NAR".into(),
        ));
    }
    Ok(file)
}

/// Rule 2: asks the upstreams (unless every one of them said "missing" within the negative TTL).
/// A trusted upstream narinfo is stored by the lookup itself, so readers get the upstream's;
/// `Some` when that settled the upload. While an upstream cannot answer, only an upload that a
/// trusted upload key signed (`vouched`) is accepted: the operator trusts that key's builds.
async fn check_upstreams(
    state: &AppState,
    hash: &StorePathHash,
    info: &NarInfo,
    vouched: bool,
) -> Result<Option<Uploaded>, CacheError> {
    if state.is_known_missing(hash.as_str(), true) {
        return Ok(None);
    }
    let store_path = info.store_path.full();
    match fetch(state, hash).await.0 {
        Fetched::Missing { unknown } if unknown.is_empty() => Ok(None),
        Fetched::Missing { unknown } if vouched => {
            tracing::warn!(%store_path, upstreams = ?unknown, "accepting an upload signed by a trusted upload key although some upstreams did not answer");
            Ok(None)
        }
        Fetched::Missing { unknown } => Err(CacheError::UpstreamsUnknown {
            store_path,
            upstreams: unknown.to_vec(),
        }),
        // The upstream's copy cannot be served; the same contents may be, from the upload.
        Fetched::Unservable { info: theirs, .. } if same_narinfo(&theirs, info) => Ok(None),
        Fetched::Unservable { upstream, .. } => Err(CacheError::ShadowsUpstream {
            store_path,
            upstream,
        }),
        Fetched::Stored(_) => match state.meta.get_narinfo(hash.as_str()).await? {
            Some(rec) => same_contents(&rec, info).map(Some).map_err(|e| match e {
                CacheError::Immutable { origin, .. } if origin != nip_store::UPLOAD_ORIGIN => {
                    CacheError::ShadowsUpstream {
                        store_path,
                        upstream: origin,
                    }
                }
                e => e,
            }),
            // Deleted meanwhile: nothing left to shadow.
            None => Ok(None),
        },
        Fetched::Failed(e) => Err(CacheError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use nip_core::signing::SigningKey;

    use super::*;

    const JUNK: &str = "StorePath: /nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello-2.12
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz
Compression: xz
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
FileSize: 50
NarHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
NarSize: 100
References: 
Deriver: ../../../etc/passwd
CA: junk
X-Evil: yes
Sig: cache.nixos.org-1:AAAA
";

    #[test]
    fn only_what_the_cache_can_stand_behind_is_kept() {
        let uploader = SigningKey::generate("ci-1").unwrap();
        let mut info = NarInfo::parse(JUNK).unwrap();
        info.sign(&uploader);
        let nixos = PublicKey::parse(crate::config::DEFAULT_UPSTREAM_KEY).unwrap();
        sanitize(&mut info, &[nixos, uploader.public_key()]);
        assert_eq!(info.sigs.len(), 1, "{:?}", info.sigs);
        assert!(info.sigs[0].starts_with("ci-1:"));
        assert_eq!(info.deriver, None);
        assert_eq!(info.ca, None);
        assert!(info.extra.is_empty());

        let mut cr = NarInfo::parse(JUNK).unwrap();
        cr.ca = Some("fixed:r:sha256:x\rSig: evil-2:AA".into());
        cr.system = Some("x86_64-linux\rSig: evil-3:AA".into());
        sanitize(&mut cr, &[]);
        assert_eq!((cr.ca, cr.system), (None, None));

        let mut good = NarInfo::parse(JUNK).unwrap();
        good.deriver = Some("0c6kzph7l0dcbfmjap64f0czdafn3b7x-hello-2.12.drv".into());
        good.ca =
            Some("fixed:r:sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3".into());
        sanitize(&mut good, &[]);
        assert!(good.deriver.is_some() && good.ca.is_some());
        assert!(good.sigs.is_empty());
    }
}
