//! Criterion micro-benchmarks of the hot pure functions of a narinfo hit or miss: parsing and
//! serialising a narinfo, its fingerprint, checking an upstream signature, and the SHA-256 that
//! every upload and NAR fill computes over its bytes. Run by
//! `bench/run.sh` (`cargo bench -p nip-core --bench core -- --quick`).
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use nip_core::narinfo::NarInfo;
use nip_core::signing::{verify_narinfo, PublicKey, SigningKey};
use sha2::{Digest, Sha256};

/// A real narinfo from cache.nixos.org (curl 7.82.0, bin output), with its real signature.
const CURL: &str = "\
StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin
URL: nar/05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56.nar.xz
Compression: xz
FileHash: sha256:05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56
FileSize: 68852
NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0
NarSize: 196040
References: 0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0 6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115 j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12 yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n
Deriver: 5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv
Sig: cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==
";
const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

fn narinfo(c: &mut Criterion) {
    let info = NarInfo::parse(CURL).unwrap();
    c.bench_function("narinfo/parse", |b| {
        b.iter(|| NarInfo::parse(black_box(CURL)).unwrap())
    });
    c.bench_function("narinfo/to_text", |b| b.iter(|| black_box(&info).to_text()));
    c.bench_function("narinfo/fingerprint", |b| {
        b.iter(|| black_box(&info).fingerprint())
    });
}

fn signatures(c: &mut Criterion) {
    let info = NarInfo::parse(CURL).unwrap();
    let keys = [PublicKey::parse(NIXOS_KEY).unwrap()];
    assert!(
        verify_narinfo(&info, &keys).is_some(),
        "the fixture's signature must verify"
    );
    c.bench_function("signature/verify_narinfo", |b| {
        b.iter(|| verify_narinfo(black_box(&info), black_box(&keys)).is_some())
    });
    let key = SigningKey::generate("bench-1").unwrap();
    c.bench_function("signature/sign_narinfo", |b| {
        b.iter(|| black_box(info.clone()).sign(black_box(&key)))
    });
}

/// SHA-256 over 1 MiB: bounds the MiB/s of uploads and NAR fills, which hash every byte.
fn sha256(c: &mut Criterion) {
    let data = vec![0x5au8; 1 << 20];
    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("sha256_1MiB", |b| {
        b.iter(|| Sha256::digest(black_box(&data)))
    });
    group.finish();
}

criterion_group!(benches, narinfo, signatures, sha256);
criterion_main!(benches);
