//! Realisations of content-addressed derivations (`realisations/<drv hash>!<output>.doi`): which
//! store path a derivation output built to. Nix trusts one the way it trusts a narinfo, by its
//! signatures, so they get the narinfo rules: only signatures that verify against a trusted key
//! are kept, a signature in a trusted key's name that does not verify is a forgery and refused,
//! `--cache-require-trusted-signature` applies to uploads, a stored realisation is immutable, and
//! this cache adds its own signature. From upstreams, only realisations signed by an upstream key
//! (or from a `?trusted=1` upstream) are stored. ncps' `build-trace-v2` entries (newer Nix) are
//! the same statement in another JSON shape and get the same rules.
use std::collections::BTreeMap;

use nip_core::signing::PublicKey;
use nip_core::store_path::StorePath;
use nip_store::{ExtraKind, ExtraRecord, StagedFile};
use serde::{Deserialize, Serialize};

use crate::cache::CacheError;
use crate::AppState;

/// Checks `<hash algo>:<digest>!<output name>` as Nix writes it (`sha256:<hex>!out`).
pub fn parse_id(id: &str) -> Result<(), String> {
    let (hash, output) = id
        .split_once('!')
        .ok_or("expected <drv hash>!<output name>")?;
    let digest = hash
        .strip_prefix("sha256:")
        .ok_or("the derivation hash must be sha256:<digest>")?;
    let ok_digest = (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
        || (digest.len() == 52 && nip_core::base32::decode(digest).is_ok());
    if !ok_digest {
        return Err("the derivation hash must be 64 hex or 52 nix-base32 characters".into());
    }
    if !valid_output_name(output) {
        return Err(format!("invalid output name {output:?}"));
    }
    Ok(())
}

/// Whether `output` can be a derivation output's name: 1 to 211 characters of a store path
/// name's alphabet.
pub fn valid_output_name(output: &str) -> bool {
    !output.is_empty()
        && output.len() <= 211
        && output
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

/// A realisation as Nix serialises it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Realisation {
    pub id: String,
    pub out_path: String,
    #[serde(default)]
    pub signatures: Vec<String>,
    #[serde(default)]
    pub dependent_realisations: BTreeMap<String, String>,
}

impl Realisation {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let r: Realisation =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid realisation: {e}"))?;
        parse_id(&r.id)?;
        StorePath::parse_base_name(&r.out_path)
            .map_err(|e| format!("invalid outPath {:?}: {e}", r.out_path))?;
        for (id, path) in &r.dependent_realisations {
            parse_id(id)?;
            StorePath::parse_base_name(path)
                .map_err(|e| format!("invalid dependent realisation {path:?}: {e}"))?;
        }
        Ok(r)
    }

    /// What Nix signs: the JSON without `signatures`, keys sorted, no spaces (nlohmann's dump).
    pub fn fingerprint(&self) -> String {
        let s = |v: &str| serde_json::to_string(v).expect("strings serialize");
        let deps: Vec<String> = self
            .dependent_realisations
            .iter()
            .map(|(k, v)| format!("{}:{}", s(k), s(v)))
            .collect();
        format!(
            "{{\"dependentRealisations\":{{{}}},\"id\":{},\"outPath\":{}}}",
            deps.join(","),
            s(&self.id),
            s(&self.out_path)
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("realisations serialize")
    }
}

/// ncps' `build-trace-v2` entry (newer Nix): a realisation keyed by derivation path and output.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BuildTrace {
    pub key: BuildTraceKey,
    pub value: BuildTraceValue,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildTraceKey {
    pub drv_path: String,
    pub output_name: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildTraceValue {
    pub out_path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<BuildTraceSig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BuildTraceSig {
    pub key_name: String,
    pub sig: String,
}

impl BuildTrace {
    /// `name` is `<drv base name>/<output>`, as in the URL.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Self, String> {
        let t: BuildTrace =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid build trace entry: {e}"))?;
        let (drv, output) = name.split_once('/').ok_or("invalid build trace name")?;
        if t.key.drv_path != format!("/nix/store/{drv}") || t.key.output_name != output {
            return Err("the build trace entry's key does not match the URL".into());
        }
        let out = t.value.out_path.trim_start_matches("/nix/store/");
        StorePath::parse_base_name(out)
            .map_err(|e| format!("invalid outPath {:?}: {e}", t.value.out_path))?;
        Ok(t)
    }

    /// What is signed: the entry without signatures, as ncps and Nix serialise it.
    pub fn fingerprint(&self) -> String {
        let mut t = self.clone();
        t.value.signatures.clear();
        serde_json::to_string(&t).expect("build traces serialize")
    }
}

/// A signed statement of what a derivation output built to, in either format.
enum Doc {
    Realisation(Realisation),
    BuildTrace(BuildTrace),
}

impl Doc {
    fn parse(kind: ExtraKind, name: &str, bytes: &[u8]) -> Result<Self, String> {
        match kind {
            ExtraKind::BuildTrace => BuildTrace::parse(bytes, name).map(Doc::BuildTrace),
            _ => {
                let r = Realisation::parse(bytes)?;
                if r.id != name {
                    return Err("the realisation's id does not match the URL".into());
                }
                Ok(Doc::Realisation(r))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Doc::Realisation(r) => format!("realisation {}", r.id),
            Doc::BuildTrace(t) => {
                format!("build trace entry {}!{}", t.key.drv_path, t.key.output_name)
            }
        }
    }

    fn out_path(&self) -> &str {
        match self {
            Doc::Realisation(r) => &r.out_path,
            Doc::BuildTrace(t) => t.value.out_path.trim_start_matches("/nix/store/"),
        }
    }

    fn fingerprint(&self) -> String {
        match self {
            Doc::Realisation(r) => r.fingerprint(),
            Doc::BuildTrace(t) => t.fingerprint(),
        }
    }

    /// Signatures as `name:base64`.
    fn signatures(&self) -> Vec<String> {
        match self {
            Doc::Realisation(r) => r.signatures.clone(),
            Doc::BuildTrace(t) => t
                .value
                .signatures
                .iter()
                .map(|s| format!("{}:{}", s.key_name, s.sig))
                .collect(),
        }
    }

    fn set_signatures(&mut self, sigs: Vec<String>) {
        match self {
            Doc::Realisation(r) => r.signatures = sigs,
            Doc::BuildTrace(t) => {
                t.value.signatures = sigs
                    .iter()
                    .filter_map(|s| s.split_once(':'))
                    .map(|(k, s)| BuildTraceSig {
                        key_name: k.to_string(),
                        sig: s.to_string(),
                    })
                    .collect()
            }
        }
    }

    /// The signatures that verify against `keys`, and the name of a key of `keys` that a
    /// signature claims without verifying (a forgery). Signatures by other keys are dropped.
    fn check(&self, keys: &[PublicKey]) -> (Vec<String>, Option<String>) {
        check_sigs(&self.fingerprint(), &self.signatures(), keys)
    }

    /// Keeps `valid` and adds this cache's signature (unless narinfo signing is off).
    fn resign(&mut self, state: &AppState, mut valid: Vec<String>) {
        if state.config.sign_narinfo {
            let sig = state.signer.sign(self.fingerprint().as_bytes());
            if !valid.contains(&sig) {
                valid.push(sig);
            }
        }
        self.set_signatures(valid);
    }

    fn to_json(&self) -> Vec<u8> {
        match self {
            Doc::Realisation(r) => r.to_json(),
            Doc::BuildTrace(t) => serde_json::to_vec(t).expect("build traces serialize"),
        }
    }
}

fn check_sigs(fp: &str, sigs: &[String], keys: &[PublicKey]) -> (Vec<String>, Option<String>) {
    let mut valid = Vec::new();
    let mut forged = None;
    for sig in sigs {
        let name = sig.split_once(':').map_or("", |(n, _)| n);
        let named: Vec<_> = keys.iter().filter(|k| k.name() == name).collect();
        if named.is_empty() {
            continue;
        }
        if named.iter().any(|k| k.verify(fp.as_bytes(), sig)) {
            if !valid.contains(sig) {
                valid.push(sig.clone());
            }
        } else {
            forged = Some(name.to_string());
        }
    }
    (valid, forged)
}

fn upload_keys(state: &AppState) -> Vec<PublicKey> {
    let c = state.config();
    let mut keys = c.trusted_upload_keys.clone();
    keys.extend(c.upstream_public_keys.iter().cloned());
    keys
}

/// What an accepted realisation upload comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// New: the staged file was rewritten to what is served; publish it.
    New,
    /// The same outPath is stored already (uploaded before, or an upstream's): nothing to do.
    AlreadyStored,
}

/// Judges an uploaded realisation or build trace entry (staged at `staged`, described by `rec`)
/// and rewrites the staged file to what is served: verified signatures only, plus this cache's.
pub async fn accept_upload(
    state: &AppState,
    staged: &StagedFile,
    rec: &mut ExtraRecord,
) -> Result<Accepted, CacheError> {
    if rec.content_encoding.is_some() {
        return Err(CacheError::Invalid(
            "send realisations uncompressed: this cache checks their signatures".into(),
        ));
    }
    let bytes = tokio::fs::read(staged.path())
        .await
        .map_err(nip_store::StoreError::from_io)?;
    let mut doc = Doc::parse(rec.kind, &rec.name, &bytes).map_err(CacheError::Invalid)?;
    let (valid, forged) = doc.check(&upload_keys(state));
    if let Some(key) = forged {
        return Err(CacheError::Forged {
            what: doc.describe(),
            key,
        });
    }
    let c = state.config();
    let fp = doc.fingerprint();
    let by_upload_key = c
        .trusted_upload_keys
        .iter()
        .any(|k| valid.iter().any(|s| k.verify(fp.as_bytes(), s)));
    if c.require_trusted_signature && !by_upload_key {
        return Err(CacheError::Untrusted {
            store_path: doc.describe(),
            keys: c
                .trusted_upload_keys
                .iter()
                .map(|k| k.name().to_string())
                .collect(),
        });
    }
    // An upload never shadows an upstream's: one an upstream has (signed by its key) is fetched
    // and kept first, and the upload is judged against it. As for narinfos (docs/security.md),
    // while an upstream cannot tell, only an upload signed by a trusted upload key is taken.
    if stored(state, rec.kind, &rec.name).await?.is_none() {
        if let Err(upstreams) =
            crate::cache::extras::ask_every_upstream(state, rec.kind, &rec.name).await
        {
            if by_upload_key {
                tracing::warn!(what = %doc.describe(), ?upstreams, "accepting a realisation signed by a trusted upload key although some upstreams did not answer");
            } else {
                return Err(CacheError::UpstreamsUnknown {
                    store_path: doc.describe(),
                    upstreams,
                });
            }
        }
    }
    if let Some(existing) = stored(state, rec.kind, &rec.name).await? {
        if existing.out_path() != doc.out_path() {
            return Err(CacheError::Replaces(format!(
                "{} is already in this cache with outPath {}; realisations are never replaced",
                doc.describe(),
                existing.out_path()
            )));
        }
        return Ok(Accepted::AlreadyStored);
    }
    doc.resign(state, valid);
    rewrite(staged, rec, &doc.to_json()).await?;
    Ok(Accepted::New)
}

/// The stored document of this kind and name, parsed.
async fn stored(state: &AppState, kind: ExtraKind, name: &str) -> Result<Option<Doc>, CacheError> {
    let Some(rec) = state.meta.get_extra(kind, name).await? else {
        return Ok(None);
    };
    let Some(read) = state.blobs.read(&rec.blob_key()?, None).await? else {
        return Ok(None);
    };
    let bytes = collect(read.body).await?;
    Ok(Doc::parse(kind, name, &bytes).ok())
}

async fn collect(
    mut body: futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
) -> Result<Vec<u8>, CacheError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.map_err(nip_store::StoreError::from_io)?);
    }
    Ok(out)
}

/// Replaces the staged bytes with `bytes` and updates the record's size and SHA-256.
pub(crate) async fn rewrite(
    staged: &StagedFile,
    rec: &mut ExtraRecord,
    bytes: &[u8],
) -> Result<(), CacheError> {
    use sha2::Digest;
    tokio::fs::write(staged.path(), bytes)
        .await
        .map_err(nip_store::StoreError::from_io)?;
    rec.size = bytes.len() as i64;
    rec.sha256 = hex::encode(sha2::Sha256::digest(bytes));
    Ok(())
}

/// Judges a realisation or build trace entry fetched from an upstream (`trusted`: marked
/// `?trusted=1`); the bytes to store, or why not.
pub fn accept_fetched(
    state: &AppState,
    kind: ExtraKind,
    name: &str,
    bytes: &[u8],
    trusted: bool,
) -> Result<Vec<u8>, String> {
    let mut doc = Doc::parse(kind, name, bytes)?;
    let (valid, _) = doc.check(&state.config().upstream_public_keys);
    if valid.is_empty() && !trusted {
        return Err("not signed by any --upstream-public-key".into());
    }
    doc.resign(state, valid);
    Ok(doc.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        let hex = "a".repeat(64);
        assert!(parse_id(&format!("sha256:{hex}!out")).is_ok());
        assert!(parse_id(&format!("sha256:{hex}!dev.x+1")).is_ok());
        for bad in [
            format!("sha256:{hex}"),
            format!("sha256:{hex}!"),
            format!("sha256:{hex}!a/b"),
            format!("md5:{hex}!out"),
            "sha256:zz!out".to_string(),
        ] {
            assert!(parse_id(&bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn fingerprint_is_what_nix_signs_and_forgeries_are_found() {
        let id = format!("sha256:{}!out", "b".repeat(64));
        let text = format!(
            r#"{{"id":"{id}","outPath":"{}-x","signatures":[],"dependentRealisations":{{}}}}"#,
            "0".repeat(32)
        );
        let mut r = Realisation::parse(text.as_bytes()).unwrap();
        assert_eq!(
            r.fingerprint(),
            format!(
                r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"{}-x"}}"#,
                "0".repeat(32)
            )
        );
        let key = nip_core::signing::SigningKey::generate("k-1").unwrap();
        let other = nip_core::signing::SigningKey::generate("k-1").unwrap();
        let stranger = nip_core::signing::SigningKey::generate("s-1").unwrap();
        let good = key.sign(r.fingerprint().as_bytes());
        r.signatures = vec![good.clone(), stranger.sign(r.fingerprint().as_bytes())];
        let check =
            |r: &Realisation| check_sigs(&r.fingerprint(), &r.signatures, &[key.public_key()]);
        assert_eq!(check(&r), (vec![good.clone()], None));
        // Same key name, other key: a forgery.
        r.signatures.push(other.sign(r.fingerprint().as_bytes()));
        assert_eq!(check(&r), (vec![good], Some("k-1".to_string())));
    }
}

#[cfg(test)]
mod build_trace_tests {
    use super::*;

    #[test]
    fn build_trace_fingerprint_and_signatures() {
        let drv = format!("{}-x.drv", "0".repeat(32));
        let name = format!("{drv}/out");
        let text = format!(
            r#"{{"key":{{"drvPath":"/nix/store/{drv}","outputName":"out"}},"value":{{"outPath":"/nix/store/{}-x","signatures":[]}}}}"#,
            "1".repeat(32)
        );
        let t = BuildTrace::parse(text.as_bytes(), &name).unwrap();
        assert_eq!(
            t.fingerprint(),
            format!(
                r#"{{"key":{{"drvPath":"/nix/store/{drv}","outputName":"out"}},"value":{{"outPath":"/nix/store/{}-x"}}}}"#,
                "1".repeat(32)
            )
        );
        assert!(BuildTrace::parse(text.as_bytes(), &format!("{drv}/dev")).is_err());
        let key = nip_core::signing::SigningKey::generate("k-1").unwrap();
        let mut doc = Doc::BuildTrace(t);
        let sig = key.sign(doc.fingerprint().as_bytes());
        doc.set_signatures(vec![sig.clone()]);
        assert_eq!(doc.check(&[key.public_key()]), (vec![sig], None));
        let json: serde_json::Value = serde_json::from_slice(&doc.to_json()).unwrap();
        assert_eq!(json["value"]["signatures"][0]["keyName"], "k-1");
    }
}
