//! Hostile input for the pure parsers that see untrusted bytes (upstream narinfo, uploaded
//! narinfo, URL path segments): bounded property runs that must never panic, must stay bounded
//! for oversized input, and must only accept what they can print back identically.
use nip_core::api::validate_key;
use nip_core::hash::NixHash;
use nip_core::nar_file::NarFileName;
use nip_core::narinfo::{NarInfo, MAX_NARINFO_SIZE};
use nip_core::signing::{verify_narinfo, PublicKey, SigningKey};
use nip_core::store_path::{StorePath, StorePathHash};
use proptest::prelude::*;

const HASH: &str = "0i4gw2rx5b0nlrak4pq0n3mnm6q4rhzs";
const FILE_HASH: &str = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

/// Lines that are almost right: real keys with mutated values, so the parser gets past its
/// first checks instead of rejecting everything at line one.
fn narinfo_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("StorePath".to_string()),
        Just("URL".to_string()),
        Just("Compression".to_string()),
        Just("FileHash".to_string()),
        Just("FileSize".to_string()),
        Just("NarHash".to_string()),
        Just("NarSize".to_string()),
        Just("References".to_string()),
        Just("Deriver".to_string()),
        Just("System".to_string()),
        Just("Sig".to_string()),
        Just("CA".to_string()),
        "[A-Za-z]{0,12}",
    ];
    let value = prop_oneof![
        Just(format!("/nix/store/{HASH}-hello")),
        Just(FILE_HASH.to_string()),
        Just(format!("nar/{}.nar.xz", &FILE_HASH[7..])),
        Just(format!("{HASH}-dep {HASH}-other")),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("cache.nixos.org-1:AAAA".to_string()),
        "\\PC{0,80}",
        "[0-9]{0,25}",
    ];
    (
        key,
        prop_oneof![Just(": "), Just(":"), Just(" "), Just("")],
        value,
    )
        .prop_map(|(k, sep, v)| format!("{k}{sep}{v}"))
}

fn narinfo_text() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(narinfo_line(), 0..16).prop_map(|l| l.join("\n")),
        "\\PC{0,400}",
        proptest::collection::vec(any::<u8>(), 0..400)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// Case count: the default, or `PROPTEST_CASES` for a longer run.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2000), ..ProptestConfig::default() })]

    /// Parsing never panics, and whatever parses prints to text that parses to the same value
    /// (what nip stores is exactly what it accepted).
    #[test]
    fn narinfo_parse_is_total_and_stable(text in narinfo_text()) {
        if let Ok(info) = NarInfo::parse(&text) {
            let printed = info.to_text();
            let again = NarInfo::parse(&printed).expect("printed narinfo parses");
            prop_assert_eq!(again.to_text(), printed);
            let _ = info.fingerprint();
            let _ = info.compression_kind();
        }
    }

    /// Verifying signatures on arbitrary narinfo never panics and never succeeds for a key that
    /// did not sign.
    #[test]
    fn narinfo_signatures_cannot_be_forged(text in narinfo_text()) {
        if let Ok(info) = NarInfo::parse(&text) {
            let key = SigningKey::generate("fuzz-1").unwrap();
            prop_assert!(verify_narinfo(&info, &[key.public_key()]).is_none());
        }
    }

    /// Path segments from URLs: store paths, NAR file names, hashes, keys and artifact keys.
    #[test]
    fn path_parsers_never_panic(s in "\\PC{0,300}") {
        let _ = StorePathHash::parse(&s);
        let _ = StorePath::parse_full(&s);
        if let Ok(p) = StorePath::parse_base_name(&s) {
            prop_assert_eq!(p.base_name(), s.clone());
        }
        if let Ok(f) = NarFileName::parse(&s) {
            prop_assert_eq!(f.file_name(), s.clone());
            prop_assert!(!s.contains('/') && !s.contains(".."));
        }
        let _ = NixHash::parse(&s);
        let _ = PublicKey::parse(&s);
        let _ = SigningKey::parse(&s);
        if validate_key(&s).is_ok() {
            prop_assert!(!s.contains('/') && s != "." && s != "..");
        }
    }
}

/// Oversized narinfo is refused by its length before any line is looked at.
#[test]
fn narinfo_over_the_limit_is_refused_without_parsing() {
    let mut text = format!("StorePath: /nix/store/{HASH}-x\n");
    text.push_str(&"References: ".repeat(MAX_NARINFO_SIZE / 8));
    assert!(text.len() > MAX_NARINFO_SIZE);
    let started = std::time::Instant::now();
    assert!(NarInfo::parse(&text).is_err());
    // Generous: a length check; parsing 256 KiB of references would also finish, but a
    // quadratic parser would not.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Just under the limit with many references: still linear.
    let refs = format!("{HASH}-r ").repeat((MAX_NARINFO_SIZE - 4096) / (HASH.len() + 3));
    let text = format!(
        "StorePath: /nix/store/{HASH}-x\nURL: nar/{}.nar\nCompression: none\nNarHash: {FILE_HASH}\nNarSize: 1\nReferences: {refs}\n",
        &FILE_HASH[7..]
    );
    assert!(text.len() <= MAX_NARINFO_SIZE);
    let _ = NarInfo::parse(&text);
}
