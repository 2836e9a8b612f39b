//! Tests for narinfo parsing/serialisation; the fixtures are shared with `signing` tests.

use super::*;
use crate::store_path::StorePathHash;
use proptest::prelude::*;

/// Real narinfo from cache.nixos.org (hello 2.10), signed by `cache.nixos.org-1`.
pub(crate) const HELLO: &str = "\
StorePath: /nix/store/w9yy7v61ipb5rx6i35zq1mvc2iqfmps1-hello-2.10
URL: nar/15zk4zszw9lgkdkkwy7w11m5vag11n5dhv2i6hj308qpxczvdddx.nar.xz
Compression: xz
FileHash: sha256:15zk4zszw9lgkdkkwy7w11m5vag11n5dhv2i6hj308qpxczvdddx
FileSize: 41232
NarHash: sha256:1mi14cqk363wv368ffiiy01knardmnlyphi6h9xv6dkjz44hk30i
NarSize: 205968
References: 9df65igwjmf2wbw0gbrrgair6piqjgmi-glibc-2.31 w9yy7v61ipb5rx6i35zq1mvc2iqfmps1-hello-2.10
Sig: cache.nixos.org-1:uP5KU8MCmyRnKGlN5oEv6xWJBI5EO/Pf5aFztZuLSz8BpCcZ1fdBnJkVXhBAlxkdm/CemsgQskhwvyd2yghTAg==
";

/// Real narinfo from cache.nixos.org (curl 7.82.0, bin output) with a Deriver line; the
/// criterion benches read the same file.
pub(crate) const CURL: &str = include_str!("fixtures/curl-7.82.0-bin.narinfo");

const CURL_FINGERPRINT: &str = "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n";

#[test]
fn parses_real_fixtures() {
    let info = NarInfo::parse(CURL).unwrap();
    assert_eq!(info.store_path.name(), "curl-7.82.0-bin");
    assert_eq!(
        info.url,
        "nar/05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56.nar.xz"
    );
    assert_eq!(info.compression.as_deref(), Some("xz"));
    assert_eq!(info.compression_kind(), Some(Compression::Xz));
    assert_eq!(info.file_size, Some(68852));
    assert_eq!(info.nar_size, 196040);
    assert_eq!(info.references.len(), 4);
    assert_eq!(info.references[1].name(), "glibc-2.34-115");
    assert_eq!(
        info.deriver.as_deref(),
        Some("5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv")
    );
    assert_eq!(info.sigs.len(), 1);
    assert_eq!(info.fingerprint(), CURL_FINGERPRINT);
    // The fixtures are already canonical, so serialisation reproduces them byte for byte.
    assert_eq!(info.to_text(), CURL);
    assert_eq!(info.to_string(), CURL);
    let hello = NarInfo::parse(HELLO).unwrap();
    assert_eq!(hello.to_text(), HELLO);
    assert_eq!(NarInfo::parse(&hello.to_text()).unwrap(), hello);
}

#[test]
fn normalises_and_keeps_extras() {
    let text = format!(
        "{}System: x86_64-linux\nCA: fixed:r:sha256:abc\nX-Custom: a: b\nEmpty:\n\n",
        HELLO.replace(
            "NarHash: sha256:1mi14cqk363wv368ffiiy01knardmnlyphi6h9xv6dkjz44hk30i",
            // Same digest, hex form: re-serialised as nix32.
            &format!(
                "NarHash: sha256:{}",
                NixHash::parse("sha256:1mi14cqk363wv368ffiiy01knardmnlyphi6h9xv6dkjz44hk30i")
                    .unwrap()
                    .to_hex()
            )
        )
    )
    .replace('\n', "\r\n");
    let info = NarInfo::parse(&text).unwrap();
    assert_eq!(info.system.as_deref(), Some("x86_64-linux"));
    assert_eq!(info.ca.as_deref(), Some("fixed:r:sha256:abc"));
    assert_eq!(
        info.extra,
        vec![
            ("X-Custom".into(), "a: b".into()),
            ("Empty".into(), String::new())
        ]
    );
    let out = info.to_text();
    assert!(out.contains("NarHash: sha256:1mi14cqk363wv368ffiiy01knardmnlyphi6h9xv6dkjz44hk30i\n"));
    assert!(out.ends_with("System: x86_64-linux\nSig: cache.nixos.org-1:uP5KU8MCmyRnKGlN5oEv6xWJBI5EO/Pf5aFztZuLSz8BpCcZ1fdBnJkVXhBAlxkdm/CemsgQskhwvyd2yghTAg==\nCA: fixed:r:sha256:abc\nX-Custom: a: b\nEmpty: \n"));
    assert_eq!(NarInfo::parse(&out).unwrap(), info);
}

#[test]
fn minimal_and_defaults() {
    let text = "StorePath: /nix/store/0123456789abcdfghijklmnpqrsvwxyz-tool\nURL: nar/x.nar\n\
                NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 0";
    let info = NarInfo::parse(text).unwrap();
    assert!(info.references.is_empty());
    assert_eq!(info.compression, None);
    assert_eq!(info.compression_kind(), Some(Compression::Bzip2));
    assert!(info.to_text().contains("\nReferences: \n"));
    assert_eq!(
        info.fingerprint(),
        "1;/nix/store/0123456789abcdfghijklmnpqrsvwxyz-tool;sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;0;"
    );
    let mut other = info.clone();
    other.compression = Some("lzip".into());
    assert_eq!(other.compression_kind(), None);
}

#[test]
fn rejects_bad_input() {
    use NarInfoError::*;
    let err = |t: &str| NarInfo::parse(t).unwrap_err();
    assert!(matches!(
        err(&HELLO.replace(
            "StorePath: /nix/store/w9yy7v61ipb5rx6i35zq1mvc2iqfmps1-hello-2.10\n",
            ""
        )),
        Missing("StorePath")
    ));
    assert!(matches!(err(&HELLO.replace("URL", "Url")), Missing("URL")));
    assert!(matches!(
        err(&HELLO.replace("NarHash", "NarHosh")),
        Missing("NarHash")
    ));
    assert!(matches!(
        err(&HELLO.replace("NarSize: 205968\n", "")),
        Missing("NarSize")
    ));
    assert!(matches!(
        err(&format!("{HELLO}URL: again\n")),
        Duplicate {
            line: 10,
            key: "URL"
        }
    ));
    assert!(matches!(
        err(&format!("{HELLO}References: \n")),
        Duplicate {
            key: "References",
            ..
        }
    ));
    assert!(matches!(
        err(&HELLO.replace("NarSize: 205968", "NarSize: -1")),
        BadNumber { line: 7, .. }
    ));
    assert!(matches!(
        err(&HELLO.replace("NarSize: 205968", "NarSize: +1")),
        BadNumber { .. }
    ));
    assert!(matches!(
        err(&HELLO.replace("FileSize: 41232", "FileSize: 99999999999999999999999")),
        BadNumber { .. }
    ));
    assert!(matches!(
        err(&HELLO.replace("sha256:1mi14", "sha256:1mi1e")),
        BadHash { key: "NarHash", .. }
    ));
    assert!(matches!(
        err(&HELLO.replace("FileHash: sha256:", "FileHash: md5:")),
        BadHash {
            key: "FileHash",
            ..
        }
    ));
    assert!(matches!(
        err(&HELLO.replace("-glibc-2.31", "-glibc 2.31/")),
        BadStorePath {
            key: "References",
            ..
        }
    ));
    assert!(matches!(
        err(&HELLO.replace("/nix/store/w9yy", "/nix/store/../w9yy")),
        BadStorePath {
            key: "StorePath",
            ..
        }
    ));
    assert!(matches!(
        err(&format!("{HELLO}garbage\n")),
        MalformedLine { line: 10, .. }
    ));
    assert!(matches!(
        err(&format!("{HELLO}Key:value\n")),
        MalformedLine { .. }
    ));
    assert!(matches!(
        err(&format!("{HELLO}: value\n")),
        MalformedLine { .. }
    ));
    assert!(matches!(
        err(&format!("{HELLO}My Key: value\n")),
        MalformedLine { .. }
    ));
    let huge = format!("{HELLO}X: {}\n", "a".repeat(MAX_NARINFO_SIZE));
    assert!(matches!(err(&huge), TooLarge(_)));
    // Messages name the problem.
    assert_eq!(
        err("").to_string(),
        "narinfo is missing required field \"StorePath\""
    );
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (
        "[0-9a-df-np-sv-z]{32}",
        "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,40}",
    )
        .prop_map(|(h, n)| StorePath::new(StorePathHash::parse(&h).unwrap(), &n).unwrap())
}

const KNOWN_KEYS: [&str; 12] = [
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "System",
    "Sig",
    "CA",
];

fn value() -> impl Strategy<Value = String> {
    "[^\n\r]{0,30}"
}

prop_compose! {
    fn narinfo()(
        store_path in store_path(),
        url in value(),
        compression in proptest::option::of(value()),
        file_hash in proptest::option::of(any::<[u8; 32]>()),
        file_size in proptest::option::of(any::<u64>()),
        nar_hash in any::<[u8; 32]>(),
        nar_size in any::<u64>(),
        references in proptest::collection::vec(store_path(), 0..5),
        deriver in proptest::option::of(value()),
        system in proptest::option::of(value()),
        sigs in proptest::collection::vec(value(), 0..3),
        ca in proptest::option::of(value()),
        extra in proptest::collection::vec(
            ("[A-Za-z][A-Za-z0-9:-]{0,15}".prop_filter("known key", |k| !KNOWN_KEYS.contains(&k.as_str())), value()),
            0..3,
        ),
    ) -> NarInfo {
        NarInfo {
            store_path, url, compression,
            file_hash: file_hash.map(NixHash::sha256), file_size,
            nar_hash: NixHash::sha256(nar_hash), nar_size,
            references, deriver, system, sigs, ca, extra,
        }
    }
}

proptest! {
    #[test]
    fn round_trip(info in narinfo()) {
        let text = info.to_text();
        prop_assert!(text.ends_with('\n'));
        prop_assert_eq!(NarInfo::parse(&text).unwrap(), info);
    }

    #[test]
    fn parse_never_panics(s in "\\PC{0,400}") {
        let _ = NarInfo::parse(&s);
    }

    #[test]
    fn parse_never_panics_on_mutated_fixture(pos in 0usize..2000, junk in "\\PC{0,12}") {
        let mut s = CURL.to_owned();
        let mut at = pos % s.len();
        while !s.is_char_boundary(at) { at -= 1; }
        s.insert_str(at, &junk);
        let _ = NarInfo::parse(&s);
    }

    #[test]
    fn parse_never_panics_on_key_value_lines(
        lines in proptest::collection::vec(
            (proptest::sample::select(KNOWN_KEYS.to_vec()), "[ -~]{0,60}"), 0..15)
    ) {
        let text: String = lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        let _ = NarInfo::parse(&text);
    }
}
