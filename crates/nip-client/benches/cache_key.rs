//! Criterion micro-benchmarks of cache-key derivation (`nip build` does it before every lookup):
//! the digest itself, with recipe parsing, and the source-tree digest of the example recipe. Run by
//! `bench/run.sh` (`cargo bench -p nip-client --bench cache_key -- --quick`).
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nip_client::key::{cache_key, source_digest};
use nip_client::recipe::{parse, select_variants};
use std::path::Path;

const RECIPE: &str = r#"
name = "hello"
version = "2.12"
description = "GNU hello, with optional language bindings"
source = "hello-src"
variants = ["python", "ruby", "static"]
build = "cp -r . $OUT && echo built > $OUT/stamp"
"#;

fn keys(c: &mut Criterion) {
    let path = Path::new("hello.toml");
    let recipe = parse(path, RECIPE).unwrap();
    let variants = vec!["python".to_string(), "ruby".to_string()];
    c.bench_function("cache_key/digest", |b| {
        b.iter(|| {
            cache_key(
                black_box(&recipe),
                Some("0f3a"),
                black_box(&variants),
                "linux-x86_64",
            )
        })
    });
    let args = vec!["+ruby".to_string(), "+python".to_string()];
    c.bench_function("cache_key/parse_recipe_and_digest", |b| {
        b.iter(|| {
            let r = parse(path, black_box(RECIPE)).unwrap();
            let v = select_variants(&r.recipe, &args).unwrap();
            cache_key(&r, Some("0f3a"), &v, "linux-x86_64")
        })
    });
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/recipes/hello-src");
    c.bench_function("cache_key/source_digest_example", |b| {
        b.iter(|| source_digest(black_box(&src)).unwrap())
    });
}

criterion_group!(benches, keys);
criterion_main!(benches);
