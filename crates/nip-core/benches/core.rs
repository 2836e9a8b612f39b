//! Criterion micro-benchmarks of the hot pure functions of a narinfo hit or miss: parsing and
//! serialising a narinfo, its fingerprint, checking an upstream signature, and the SHA-256 that
//! every upload and NAR fill computes over its bytes. Run by
//! `bench/run.sh` (`cargo bench -p nip-core --bench core -- --quick`).
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use nip_core::narinfo::NarInfo;
use nip_core::signing::{verify_narinfo, PublicKey, SigningKey};
use sha2::{Digest, Sha256};

/// A real narinfo from cache.nixos.org (curl 7.82.0, bin output), with its real signature: the
/// unit tests' fixture.
const CURL: &str = include_str!("../src/narinfo/fixtures/curl-7.82.0-bin.narinfo");
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
