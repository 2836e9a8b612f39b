//! Hand-made Nix uploads (a NAR and its narinfo) for tests that do not need real Nix.
#![allow(dead_code)]
use nip_core::base32;
use sha2::{Digest, Sha256};

pub struct Upload {
    pub hash: String,
    pub nar_file: String,
    pub nar: Vec<u8>,
    pub narinfo: String,
}

/// An uncompressed "NAR" of random bytes and a matching narinfo for a fresh store path.
pub fn upload(name: &str) -> Upload {
    upload_sized(name, 4096)
}

pub fn upload_sized(name: &str, size: usize) -> Upload {
    let nar: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    let digest = base32::encode(&Sha256::digest(&nar));
    let hash = base32::encode(&rand::random::<[u8; 20]>());
    let nar_file = format!("{digest}.nar");
    let narinfo = format!(
        "StorePath: /nix/store/{hash}-{name}\nURL: nar/{nar_file}\nCompression: none\nFileHash: sha256:{digest}\nFileSize: {len}\nNarHash: sha256:{digest}\nNarSize: {len}\nReferences: \n",
        len = nar.len()
    );
    Upload {
        hash,
        nar_file,
        nar,
        narinfo,
    }
}
