//! Taking over an ncps installation in place, once: its signing key (so every client's
//! `trusted-public-keys` keeps matching), its narinfos with their NARs from ncps' storage layout,
//! and its pins. ncps' tables and files are only read; NAR files are hard-linked (S3: copied on
//! the server) into nip's layout, so switching back to ncps keeps working.
use std::collections::HashSet;

use futures::StreamExt;
use nip_core::hash::{HashAlgo, NixHash};
use nip_core::nar_file::NarFileName;
use nip_core::narinfo::NarInfo;
use nip_core::signing::{verify_narinfo, PublicKey, SigningKey};
use nip_store::ncps::{ncps_nar_path, ImportCounts, ImportTx, NcpsDb, NcpsNarInfo};
use nip_store::{BlobKey, BlobStore, NarInfoRecord, NarRecord, SqlMeta};
use sha2::Digest;

use crate::config::ServeConfig;

/// The `imports` row that says ncps' data was taken over.
pub const SOURCE: &str = "ncps";
/// Narinfos read from ncps per query.
const PAGE: i64 = 1000;

/// Where this cache's signing key came from in the takeover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `--cache-secret-key-path` already held a key: it stays (as ncps, the file wins).
    File,
    /// ncps' database (`config` table, `secret_key`).
    Database,
    /// The file older ncps versions kept in their storage (`config/cache.key`).
    LegacyFile,
    /// ncps has no key: a new one is generated as on any first start.
    None,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub narinfos: u64,
    pub nars: u64,
    pub pins: u64,
    /// Narinfos whose NAR file is not in ncps' storage: not imported (fetched again on demand).
    pub missing_nars: u64,
    /// Narinfos nip cannot read (bad fields, a NAR file size that does not match).
    pub invalid: u64,
    /// Placeholder rows without a NAR URL.
    pub stubs: u64,
    pub key: Option<KeySource>,
    /// Public key of the signing key nip serves with after the takeover.
    pub public_key: Option<String>,
}

pub enum Outcome {
    /// The database is not ncps'.
    NotNcps,
    AlreadyImported {
        at: i64,
    },
    /// Taken over now (or, with `dry_run`, what would be).
    Imported(Summary),
}

/// Progress: (narinfos looked at, narinfos in ncps' database).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Takes over ncps' data when `meta` sits on an ncps database and has not done so yet.
pub async fn ncps(
    config: &ServeConfig,
    meta: &SqlMeta,
    blobs: &dyn BlobStore,
    dry_run: bool,
    progress: Progress<'_>,
) -> anyhow::Result<Outcome> {
    let Some(url) = meta.ncps_url() else {
        return Ok(Outcome::NotNcps);
    };
    if let Some(at) = meta.imported_at(SOURCE).await? {
        return Ok(Outcome::AlreadyImported { at });
    }
    let shown = nip_core::redact::redact_userinfo(url);
    let db = NcpsDb::open(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the ncps database {shown}: {e}"))?;
    let counts = db.counts().await?;
    let mut s = Summary {
        stubs: counts.stubs,
        ..Summary::default()
    };
    let signer = signing_key(config, &db, blobs, dry_run, &mut s).await?;
    let mut trusted: Vec<PublicKey> = config.trusted_upload_keys.clone();
    trusted.extend(config.upstream_public_keys.iter().cloned());
    let mut import = Import {
        config,
        blobs,
        layout: Layout::of(config),
        trusted,
        signer,
        adopted: HashSet::new(),
        s,
    };
    let mut tx = if dry_run {
        None
    } else {
        Some(meta.begin_import().await?)
    };
    let (mut after, mut seen) = (0i64, 0u64);
    loop {
        let page = db.narinfos_after(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for n in &page {
            seen += 1;
            import.one(n, tx.as_mut()).await?;
        }
        progress(seen, counts.narinfos);
    }
    let mut s = import.s;
    let pins = db.pins().await?;
    let now = nip_store::unix_now();
    for hash in &pins {
        match tx.as_mut() {
            Some(tx) => {
                if tx.pin(hash, now).await? {
                    s.pins += 1;
                }
            }
            None => s.pins += 1,
        }
    }
    db.close().await;
    if let Some(tx) = tx {
        let counts = ImportCounts {
            narinfos: s.narinfos,
            nars: s.nars,
            pins: s.pins,
        };
        if let Err(e) = tx.finish(SOURCE, counts).await {
            // Another instance starting at the same time took it over first: its import stands.
            if let Some(at) = meta.imported_at(SOURCE).await? {
                return Ok(Outcome::AlreadyImported { at });
            }
            return Err(e.into());
        }
    }
    Ok(Outcome::Imported(s))
}

/// The import of ncps' narinfos and NAR files, one narinfo at a time.
struct Import<'a> {
    config: &'a ServeConfig,
    blobs: &'a dyn BlobStore,
    layout: Layout,
    /// Keys whose signatures are kept: trusted upload keys, then upstream keys.
    trusted: Vec<PublicKey>,
    signer: Option<SigningKey>,
    /// NAR files adopted so far (several narinfos may share one).
    adopted: HashSet<String>,
    s: Summary,
}

impl Import<'_> {
    /// Imports one of ncps' narinfos and its NAR file (without `tx`: counts what would be).
    async fn one(&mut self, n: &NcpsNarInfo, tx: Option<&mut ImportTx>) -> anyhow::Result<()> {
        let (blobs, s) = (self.blobs, &mut self.s);
        let upstream_keys = &self.config.upstream_public_keys;
        let Some(item) = convert(n, &self.trusted, upstream_keys) else {
            s.invalid += 1;
            return Ok(());
        };
        let from = self.layout.ncps_key(&n.url)?;
        let Some(size) = blobs.stat(&from).await? else {
            s.missing_nars += 1;
            return Ok(());
        };
        if item.info.file_size.is_some_and(|f| f != size) {
            tracing::warn!(store_path = %n.store_path, file = %from.as_str(), size, "ncps' NAR file does not have the size its narinfo says: not imported");
            s.invalid += 1;
            return Ok(());
        }
        let sha256 = match &item.info.file_hash {
            Some(h) if h.algo == HashAlgo::Sha256 => h.to_hex(),
            _ => hash_blob(blobs, &from).await?,
        };
        let mut info = item.info;
        if self.config.sign_narinfo {
            if let Some(key) = &self.signer {
                info.sign(key);
            }
        }
        let rec = NarInfoRecord {
            hash: info.store_path.hash().as_str().to_string(),
            store_path: info.store_path.full(),
            nar_file: item.file.clone(),
            file_size: Some(size as i64),
            file_hash: info.file_hash.as_ref().map(|h| h.to_string()),
            nar_hash: info.nar_hash.to_string(),
            narinfo: info.to_text(),
            origin: item.origin,
            signed_by: item.signed_by,
            uploaded_by: None,
        };
        let Some(tx) = tx else {
            s.narinfos += 1;
            if self.adopted.insert(item.file) {
                s.nars += 1;
            }
            return Ok(());
        };
        if self.adopted.insert(item.file.clone()) {
            // Bytes first, rows after: the rows commit only once every adopted file is durable.
            blobs.adopt(&from, &BlobKey::nar(&item.file)?).await?;
            let nar = NarRecord {
                nar_file: item.file,
                size: size as i64,
                sha256,
            };
            if tx.nar(&nar, n.created_at, n.last_accessed_at).await? {
                s.nars += 1;
            }
        }
        if tx.narinfo(&rec, n.created_at, n.last_accessed_at).await? {
            s.narinfos += 1;
        }
        Ok(())
    }
}

/// Where ncps' files are relative to nip's blob store: locally nip's root is `<data>/store`,
/// which is ncps' `store/` directory too; on S3 both start at the bucket (or prefix) root.
enum Layout {
    Local,
    S3,
}

impl Layout {
    fn of(config: &ServeConfig) -> Self {
        if config.s3.is_some() {
            Layout::S3
        } else {
            Layout::Local
        }
    }

    fn ncps_key(&self, url: &str) -> anyhow::Result<BlobKey> {
        let (_, path) =
            ncps_nar_path(url).ok_or_else(|| anyhow::anyhow!("bad ncps NAR URL {url:?}"))?;
        Ok(BlobKey::new(match self {
            Layout::Local => path,
            Layout::S3 => format!("store/{path}"),
        })?)
    }
}

struct Converted {
    info: NarInfo,
    file: String,
    origin: String,
    signed_by: Option<String>,
}

/// ncps' row as the narinfo nip serves, keeping only signatures nip can stand behind (as for
/// uploads); `None` when a field is not what Nix writes.
fn convert(n: &NcpsNarInfo, trusted: &[PublicKey], upstream: &[PublicKey]) -> Option<Converted> {
    let (file, _) = ncps_nar_path(&n.url)?;
    NarFileName::parse(&file).ok()?;
    let mut text = format!("StorePath: {}\nURL: nar/{file}\n", n.store_path);
    let mut line = |k: &str, v: &Option<String>| {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            text.push_str(&format!("{k}: {v}\n"));
        }
    };
    line("Compression", &n.compression);
    line("FileHash", &n.file_hash);
    line("FileSize", &n.file_size.map(|v| v.to_string()));
    line("NarHash", &Some(n.nar_hash.clone()));
    line("NarSize", &Some(n.nar_size.to_string()));
    line("References", &Some(n.references.join(" ")));
    line("Deriver", &n.deriver);
    line("System", &n.system);
    for sig in &n.signatures {
        line("Sig", &Some(sig.clone()));
    }
    line("CA", &n.ca);
    let mut info = NarInfo::parse(&text).ok()?;
    if info.store_path.hash().as_str() != n.hash {
        return None;
    }
    crate::cache::upload::sanitize(&mut info, trusted);
    let by_upstream = verify_narinfo(&info, upstream).map(|k| k.name().to_string());
    let signed_by = by_upstream
        .clone()
        .or_else(|| verify_narinfo(&info, trusted).map(|k| k.name().to_string()));
    // ncps records no upstream for uploads nor for rows older than mid-2026: a signature by an
    // upstream key tells the two apart.
    let origin = match (&n.upstream_url, &by_upstream) {
        (Some(u), _) if !u.is_empty() => u.clone(),
        (_, Some(_)) => "ncps".to_string(),
        _ => nip_store::UPLOAD_ORIGIN.to_string(),
    };
    Some(Converted {
        info,
        file,
        origin,
        signed_by,
    })
}

/// The signing key after the takeover: `--cache-secret-key-path`'s file when it exists, else
/// ncps' key (database, then its older file), written to that path.
async fn signing_key(
    config: &ServeConfig,
    db: &NcpsDb,
    blobs: &dyn BlobStore,
    dry_run: bool,
    s: &mut Summary,
) -> anyhow::Result<Option<SigningKey>> {
    let path = &config.secret_key_path;
    let from_db = db.secret_key().await?;
    if path.exists() {
        let key = crate::keys::load_or_generate(path, &config.hostname)?;
        if let Some(other) = from_db.as_deref().and_then(|t| SigningKey::parse(t).ok()) {
            if other.public_key().to_string() != key.public_key().to_string() {
                tracing::warn!(path = %path.display(), ncps_public_key = %other.public_key(), public_key = %key.public_key(), "the signing key file differs from the key in ncps' database; nip signs with the file's key (as ncps did): clients trusting only ncps' database key must add this one");
            }
        }
        s.key = Some(KeySource::File);
        s.public_key = Some(key.public_key().to_string());
        return Ok(Some(key));
    }
    let (text, source) = match from_db {
        Some(t) => (Some(t), KeySource::Database),
        None => (legacy_key(config, blobs).await?, KeySource::LegacyFile),
    };
    let Some(text) = text else {
        s.key = Some(KeySource::None);
        return Ok(None);
    };
    let key = SigningKey::parse(text.trim())
        .map_err(|e| anyhow::anyhow!("ncps' signing key is not a Nix secret key: {e}"))?;
    if !dry_run && !crate::keys::write_new(path, &key)? {
        // Written meanwhile by an instance starting at the same time: use what is there.
        let there = crate::keys::load_or_generate(path, &config.hostname)?;
        s.key = Some(KeySource::File);
        s.public_key = Some(there.public_key().to_string());
        return Ok(Some(there));
    }
    s.key = Some(source);
    s.public_key = Some(key.public_key().to_string());
    Ok(Some(key))
}

/// The key file older ncps versions kept in their storage, `config/cache.key`.
async fn legacy_key(config: &ServeConfig, blobs: &dyn BlobStore) -> anyhow::Result<Option<String>> {
    if config.s3.is_none() {
        let path = config.data_path.join("config").join("cache.key");
        return match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
    }
    let Some(read) = blobs.read(&BlobKey::new("config/cache.key")?, None).await? else {
        return Ok(None);
    };
    let mut body = read.body;
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        bytes.extend_from_slice(&chunk?);
        anyhow::ensure!(
            bytes.len() < 4096,
            "ncps' config/cache.key is too big for a key"
        );
    }
    Ok(Some(String::from_utf8(bytes)?))
}

/// SHA-256 (hex) of a blob, for NARs whose narinfo has no FileHash.
async fn hash_blob(blobs: &dyn BlobStore, key: &BlobKey) -> anyhow::Result<String> {
    let read = blobs
        .read(key, None)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{} disappeared while importing it", key.as_str()))?;
    let mut body = read.body;
    let mut h = sha2::Sha256::new();
    while let Some(chunk) = body.next().await {
        h.update(&chunk?);
    }
    Ok(NixHash::sha256(h.finalize().into()).to_hex())
}
