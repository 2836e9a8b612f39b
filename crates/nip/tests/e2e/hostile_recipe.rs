//! Hostile input for the client's recipe parser (`nip_client::recipe`): recipe files come from
//! directories anyone on the machine may write to. Bounded property runs: no panic, variant
//! selection never accepts a name the recipe does not list, and accepted names are safe.
use std::path::Path;

use nip_client::recipe::{parse, select_variants};
use proptest::prelude::*;

fn recipe_text() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("\"hello\"".to_string()),
        Just("\"2.12\"".to_string()),
        Just("\"../../etc\"".to_string()),
        Just("[\"python\", \"ruby\", \"\"]".to_string()),
        Just("\"echo hi > $OUT/x\"".to_string()),
        Just("1".to_string()),
        Just("{ a = 1 }".to_string()),
        "\"\\PC{0,20}\"",
        "\\PC{0,20}",
    ];
    let key = prop_oneof![
        Just("name"),
        Just("version"),
        Just("description"),
        Just("source"),
        Just("variants"),
        Just("build"),
        Just("unknown"),
    ];
    proptest::collection::vec((key, value), 0..8).prop_map(|lines| {
        lines
            .into_iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect::<String>()
    })
}

/// Case count: the default, or `PROPTEST_CASES` for a longer run.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1000), ..ProptestConfig::default() })]

    /// Any recipe text: an error naming the file, or a recipe whose name and version are safe
    /// path segments and whose variants select only what it lists.
    #[test]
    fn recipe_parse_never_panics(text in recipe_text(), args in proptest::collection::vec("\\+?\\PC{0,8}", 0..4)) {
        match parse(Path::new("fuzz.toml"), &text) {
            Err(e) => prop_assert!(e.to_string().contains("fuzz.toml"), "{e}"),
            Ok(loaded) => {
                let r = &loaded.recipe;
                for s in [&r.name, &r.version] {
                    prop_assert!(!s.is_empty() && !s.contains('/') && s != ".." , "{s:?}");
                }
                if let Ok(selected) = select_variants(r, &args) {
                    for v in selected {
                        prop_assert!(r.variants.contains(&v), "{v:?} not in {:?}", r.variants);
                    }
                }
            }
        }
    }
}
