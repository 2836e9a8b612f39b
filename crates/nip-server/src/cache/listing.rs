//! NAR listings made from a stored NAR, for paths whose upstream has no `<hash>.ls`: the JSON
//! Nix writes with `write-nar-listing=true` (`{"version":1,"root":…}`, with each regular file's
//! size, executable bit and `narOffset`). Uncompressed, zstd, xz and bzip2 NARs can be read here.
use async_compression::tokio::bufread::{BzDecoder, XzDecoder, ZstdDecoder};
use nip_core::nar_file::{Compression, NarFileName};
use nip_core::store_path::StorePathHash;
use nip_store::{ExtraKind, ExtraRecord, PutExtra};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio_util::io::StreamReader;

use crate::cache::CacheError;
use crate::AppState;

/// More entries than this and the listing is not made (a hostile NAR could be all names).
const MAX_ENTRIES: usize = 500_000;
/// More header bytes (names, targets, tokens) than this and the listing is not made: it would
/// exceed the size of a stored listing.
const MAX_TEXT: u64 = crate::cache::extras::MAX_LARGE;
/// Longest name, symlink target or token read from a NAR.
const MAX_STRING: u64 = 64 * 1024;
/// Deepest directory nesting accepted.
const MAX_DEPTH: usize = 256;

/// Makes and stores the listing of the stored NAR of `hash`. `None` when this cache has no
/// narinfo for it, the NAR is not stored, or its compression cannot be read here.
pub async fn generate(
    state: &AppState,
    hash: &StorePathHash,
) -> Result<Option<ExtraRecord>, CacheError> {
    let Some(info) = state.meta.get_narinfo(hash.as_str()).await? else {
        return Ok(None);
    };
    let Ok(file) = NarFileName::parse(&info.nar_file) else {
        return Ok(None);
    };
    let compression = file.compression();
    if !matches!(
        compression,
        Compression::None | Compression::Zstd | Compression::Xz | Compression::Bzip2
    ) {
        tracing::debug!(nar = %info.nar_file, "no listing: this NAR's compression cannot be read here");
        return Ok(None);
    }
    if state.meta.get_nar(&info.nar_file).await?.is_none() {
        return Ok(None);
    }
    let key = nip_store::BlobKey::nar(&info.nar_file)?;
    let Some(read) = state.blobs.read(&key, None).await? else {
        return Ok(None);
    };
    let raw = BufReader::new(StreamReader::new(read.body));
    let listing = match compression {
        Compression::Zstd => list(&mut Counting::new(ZstdDecoder::new(raw))).await,
        Compression::Xz => {
            let xz = XzDecoder::with_mem_limit(raw, crate::cache::fill::XZ_MEM_LIMIT);
            list(&mut Counting::new(xz)).await
        }
        Compression::Bzip2 => list(&mut Counting::new(BzDecoder::new(raw))).await,
        _ => list(&mut Counting::new(raw)).await,
    };
    let listing = match listing {
        Ok(v) => v,
        Err(why) => {
            tracing::warn!(nar = %info.nar_file, %why, "cannot list a stored NAR");
            return Ok(None);
        }
    };
    let bytes = serde_json::to_vec(&listing).expect("JSON values serialize");
    let staged = state.staging.create().await?;
    staged.append(bytes::Bytes::from(bytes.clone())).await?;
    use sha2::Digest;
    let rec = ExtraRecord {
        kind: ExtraKind::Listing,
        name: hash.as_str().to_string(),
        size: bytes.len() as i64,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        content_type: crate::cache::extras::content_type(ExtraKind::Listing).to_string(),
        content_encoding: None,
        origin: "generated".into(),
        uploaded_by: None,
        last_accessed_at: 0,
    };
    match crate::cache::extras::publish(state, &staged, &rec).await? {
        PutExtra::Inserted => {
            crate::cache::extras::count(ExtraKind::Listing, "generated");
            Ok(Some(rec))
        }
        PutExtra::Exists(e) => Ok(Some(*e)),
    }
}

/// A reader that knows how many bytes it has given out (for `narOffset`).
struct Counting<R> {
    inner: R,
    pos: u64,
    /// Header bytes read so far.
    text: u64,
}

impl<R: AsyncRead + Unpin> Counting<R> {
    fn new(inner: R) -> Self {
        Counting {
            inner,
            pos: 0,
            text: 0,
        }
    }

    async fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.inner
            .read_exact(&mut b)
            .await
            .map_err(|e| format!("NAR cut short: {e}"))?;
        self.pos += 8;
        Ok(u64::from_le_bytes(b))
    }

    async fn skip(&mut self, n: u64) -> Result<(), String> {
        let copied = tokio::io::copy(&mut (&mut self.inner).take(n), &mut tokio::io::sink())
            .await
            .map_err(|e| format!("NAR cut short: {e}"))?;
        if copied != n {
            return Err("NAR cut short".into());
        }
        self.pos += n;
        Ok(())
    }

    fn padding(n: u64) -> u64 {
        (8 - n % 8) % 8
    }

    async fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u64().await?;
        if n > MAX_STRING {
            return Err(format!("a {n}-byte string in a NAR header"));
        }
        self.text += n;
        if self.text > MAX_TEXT {
            return Err("the NAR's listing would be too large".into());
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .await
            .map_err(|e| format!("NAR cut short: {e}"))?;
        self.pos += n;
        self.skip(Self::padding(n)).await?;
        Ok(buf)
    }

    async fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes().await?).map_err(|_| "a NAR name is not UTF-8".to_string())
    }

    async fn expect(&mut self, token: &str) -> Result<(), String> {
        let got = self.string().await?;
        if got != token {
            return Err(format!("expected {token:?} in the NAR, found {got:?}"));
        }
        Ok(())
    }
}

/// The listing of a whole NAR.
async fn list<R: AsyncRead + Unpin + Send>(r: &mut Counting<R>) -> Result<Value, String> {
    r.expect("nix-archive-1").await?;
    let mut entries = 0;
    let root = node(r, 0, &mut entries).await?;
    Ok(json!({ "version": 1, "root": root }))
}

/// One node, after its `(` … through its `)`. Boxed: directories recurse.
fn node<'a, R: AsyncRead + Unpin + Send + 'a>(
    r: &'a mut Counting<R>,
    depth: usize,
    entries: &'a mut usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, String>> + Send + 'a>> {
    Box::pin(async move {
        if depth > MAX_DEPTH {
            return Err("NAR nested too deeply".into());
        }
        *entries += 1;
        if *entries > MAX_ENTRIES {
            return Err("NAR has too many entries".into());
        }
        r.expect("(").await?;
        r.expect("type").await?;
        let kind = r.string().await?;
        let mut obj = Map::new();
        match kind.as_str() {
            "regular" => {
                obj.insert("type".into(), json!("regular"));
                let mut tag = r.string().await?;
                if tag == "executable" {
                    r.expect("").await?;
                    obj.insert("executable".into(), json!(true));
                    tag = r.string().await?;
                }
                if tag != "contents" {
                    return Err(format!("expected \"contents\" in the NAR, found {tag:?}"));
                }
                let size = r.u64().await?;
                obj.insert("size".into(), json!(size));
                obj.insert("narOffset".into(), json!(r.pos));
                r.skip(size + Counting::<R>::padding(size)).await?;
                r.expect(")").await?;
            }
            "symlink" => {
                r.expect("target").await?;
                let target = r.string().await?;
                obj.insert("type".into(), json!("symlink"));
                obj.insert("target".into(), json!(target));
                r.expect(")").await?;
            }
            "directory" => {
                obj.insert("type".into(), json!("directory"));
                let mut children = Map::new();
                loop {
                    match r.string().await?.as_str() {
                        ")" => break,
                        "entry" => {
                            r.expect("(").await?;
                            r.expect("name").await?;
                            let name = r.string().await?;
                            if name.is_empty()
                                || name == "."
                                || name == ".."
                                || name.contains('/')
                                || name.contains('\0')
                            {
                                return Err(format!("invalid name {name:?} in the NAR"));
                            }
                            r.expect("node").await?;
                            let child = node(r, depth + 1, entries).await?;
                            r.expect(")").await?;
                            children.insert(name, child);
                        }
                        other => return Err(format!("unexpected {other:?} in a NAR directory")),
                    }
                }
                obj.insert("entries".into(), Value::Object(children));
            }
            other => return Err(format!("unknown NAR node type {other:?}")),
        }
        Ok(Value::Object(obj))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, v: &[u8]) {
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v);
        out.resize(out.len() + (8 - v.len() % 8) % 8, 0);
    }

    /// A NAR of a directory with an executable file and a symlink, written by hand.
    fn nar() -> Vec<u8> {
        let mut n = Vec::new();
        for t in [
            "nix-archive-1",
            "(",
            "type",
            "directory",
            "entry",
            "(",
            "name",
            "bin",
        ] {
            s(&mut n, t.as_bytes());
        }
        for t in ["node", "(", "type", "regular", "executable", "", "contents"] {
            s(&mut n, t.as_bytes());
        }
        s(&mut n, b"#!/bin/sh\n");
        for t in [
            ")", ")", "entry", "(", "name", "link", "node", "(", "type", "symlink",
        ] {
            s(&mut n, t.as_bytes());
        }
        for t in ["target", "bin", ")", ")", ")"] {
            s(&mut n, t.as_bytes());
        }
        n
    }

    #[tokio::test]
    async fn lists_a_nar_as_nix_does() {
        let bytes = nar();
        let v = list(&mut Counting::new(&bytes[..])).await.unwrap();
        // "#!/bin/sh\n" starts after 15 eight-byte-aligned headers: see nar().
        let offset = bytes.windows(10).position(|w| w == b"#!/bin/sh\n").unwrap();
        assert_eq!(
            v,
            json!({"version": 1, "root": {"type": "directory", "entries": {
                "bin": {"type": "regular", "executable": true, "size": 10, "narOffset": offset},
                "link": {"type": "symlink", "target": "bin"}
            }}})
        );
        // Cut short or corrupt: an error, never a listing.
        assert!(list(&mut Counting::new(&bytes[..bytes.len() - 8]))
            .await
            .is_err());
        let mut bad = bytes.clone();
        bad[16] = b'X';
        assert!(list(&mut Counting::new(&bad[..])).await.is_err());
    }

    /// An xz or bzip2 NAR lists as the NAR itself does.
    #[tokio::test]
    async fn lists_compressed_nars() {
        use async_compression::tokio::bufread::{BzEncoder, XzEncoder};
        let bytes = nar();
        let want = list(&mut Counting::new(&bytes[..])).await.unwrap();
        let (mut xz, mut bz) = (Vec::new(), Vec::new());
        XzEncoder::new(&bytes[..])
            .read_to_end(&mut xz)
            .await
            .unwrap();
        BzEncoder::new(&bytes[..])
            .read_to_end(&mut bz)
            .await
            .unwrap();
        let xz = XzDecoder::with_mem_limit(&xz[..], crate::cache::fill::XZ_MEM_LIMIT);
        assert_eq!(list(&mut Counting::new(xz)).await.unwrap(), want);
        let bz = BzDecoder::new(&bz[..]);
        assert_eq!(list(&mut Counting::new(bz)).await.unwrap(), want);
    }
}
