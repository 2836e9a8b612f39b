//! `nip admin path-info <hash|store path>`: where a cached narinfo came from (provenance), which
//! keys signed what is served, whether its NAR is stored, and the audit entries naming it.
use anyhow::bail;
use clap::Args;
use nip_core::narinfo::NarInfo;
use nip_core::store_path::{StorePath, StorePathHash};
use nip_store::{AuditLog, MetaStore, SqliteMeta};

use crate::config_load::ServerSettings;

/// Audit entries looked through for the path: enough for any one path's history.
const AUDIT_SCAN: i64 = 100_000;

// `///` comments on the fields are their `--help` text.
#[derive(Args)]
pub struct PathInfoArgs {
    /// A store path hash, <hash>-<name>, or /nix/store/<hash>-<name>
    #[arg(value_name = "HASH|STORE_PATH")]
    path: String,
    /// Print JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub settings: ServerSettings,
}

/// The hash part of any of the accepted forms.
pub fn parse_hash(arg: &str) -> anyhow::Result<StorePathHash> {
    let arg = arg.trim_end_matches('/');
    if let Ok(p) = StorePath::parse_full(arg) {
        return Ok(p.hash().clone());
    }
    if let Ok(p) = StorePath::parse_base_name(arg) {
        return Ok(p.hash().clone());
    }
    StorePathHash::parse(arg).map_err(|e| {
        anyhow::anyhow!(
            "{arg:?} is not a store path or store path hash ({e}); e.g. /nix/store/<hash>-hello-2.12"
        )
    })
}

pub async fn run(db: &SqliteMeta, args: &PathInfoArgs) -> anyhow::Result<()> {
    let arg = args.path.as_str();
    let hash = parse_hash(arg)?;
    let Some(rec) = db.get_narinfo(hash.as_str()).await? else {
        bail!("this cache holds no narinfo for {arg}");
    };
    let sigs = NarInfo::parse(&rec.narinfo)
        .map(|i| i.sigs)
        .unwrap_or_default();
    let nar_stored = db.get_nar(&rec.nar_file).await?.is_some();
    let history: Vec<_> = db
        .audit_since(0, None, AUDIT_SCAN)
        .await?
        .into_iter()
        .filter(|e| e.target.as_deref() == Some(rec.store_path.as_str()))
        .collect();
    let uploaded = rec.origin == "upload";
    if args.json {
        let v = serde_json::json!({
            "storePath": rec.store_path,
            "hash": rec.hash,
            "origin": if uploaded { "upload" } else { "upstream" },
            "upstream": (!uploaded).then_some(&rec.origin),
            "signedBy": rec.signed_by,
            "uploadedBy": rec.uploaded_by,
            "narFile": rec.nar_file,
            "narHash": rec.nar_hash,
            "fileSize": rec.file_size,
            "narStored": nar_stored,
            "signatures": sigs,
            "audit": history.iter().map(|e| serde_json::json!({
                "time": nip_core::api::rfc3339(e.at), "action": e.action, "key": e.key_name,
                "remoteAddr": e.remote_addr, "result": e.result,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("store path:   {}", rec.store_path);
    if uploaded {
        println!("origin:       upload by API key {}", dash(&rec.uploaded_by));
        println!(
            "vouched by:   {}",
            rec.signed_by
                .as_deref()
                .map(|k| format!("trusted upload key {k}"))
                .unwrap_or_else(|| "no trusted upload key".into())
        );
    } else {
        println!("origin:       upstream {}", rec.origin);
        println!("verified by:  {}", dash(&rec.signed_by));
    }
    println!(
        "NAR:          nar/{} ({})",
        rec.nar_file,
        if nar_stored {
            "stored"
        } else {
            "not stored yet"
        }
    );
    println!("NarHash:      {}", rec.nar_hash);
    for s in &sigs {
        println!(
            "signature:    {}",
            s.split_once(':').map_or(s.as_str(), |(name, _)| name)
        );
    }
    for e in &history {
        println!(
            "audit:        {} {} by {} -> {}",
            nip_core::api::rfc3339(e.at),
            e.action,
            dash(&e.key_name),
            e.result
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_store_path_names_its_hash() {
        let h = "0c6kzph7l0dcbfmjap64f0czdafn3b7x";
        for arg in [
            h.to_string(),
            format!("{h}-hello-2.12"),
            format!("/nix/store/{h}-hello-2.12"),
            format!("/nix/store/{h}-hello-2.12/"),
        ] {
            assert_eq!(parse_hash(&arg).unwrap().as_str(), h, "{arg}");
        }
        assert!(parse_hash("/tmp/x").is_err());
        assert!(parse_hash("short").is_err());
    }
}
