//! Hostile input for the server's own parsers: `Range` headers, netrc files, config documents
//! (YAML, TOML, JSON through `layer_from_document` and `ServeConfig::from_layer`) and multipart
//! uploads with arbitrary metadata. Bounded property runs: no panic, no 5xx, no unbounded
//! allocation, and the server still answers afterwards.
use nip_server::netrc::Netrc;
use nip_server::range::{parse_range, RangeRequest};
use nip_server::settings::layer_from_document;
use proptest::prelude::*;

use crate::harness::*;

fn range_header() -> impl Strategy<Value = String> {
    let num = prop_oneof![
        Just(String::new()),
        "[0-9]{1,3}",
        "[0-9]{15,25}",
        Just("18446744073709551615".to_string()),
        Just("-0".to_string()),
        Just(" 7 ".to_string()),
    ];
    prop_oneof![
        (num.clone(), num).prop_map(|(a, b)| format!("bytes={a}-{b}")),
        "bytes=\\PC{0,40}",
        "\\PC{0,40}",
        Just("bytes=0-1,2-3".to_string()),
    ]
}

/// A JSON value of bounded depth and size, as a config document might parse to.
fn document() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        Just("cache".to_string()),
        Just("hostname".to_string()),
        Just("upstream".to_string()),
        Just("urls".to_string()),
        Just("server".to_string()),
        Just("addr".to_string()),
        Just("cache.max-size".to_string()),
        Just("artifact.max-size".to_string()),
        Just("cache.negative-ttl".to_string()),
        Just("rate-limit.rps".to_string()),
        "[a-z.-]{0,12}",
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "\\PC{0,30}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("10G")),
        Just(serde_json::Value::from("99999999999999999999G")),
        Just(serde_json::Value::from(":8501")),
    ];
    leaf.prop_recursive(4, 64, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
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

    /// Any Range header against any size: no panic, and a partial range lies inside the body.
    #[test]
    fn range_parse_is_total_and_in_bounds(h in range_header(), size in prop_oneof![Just(0u64), 0u64..5000, Just(u64::MAX)]) {
        if let RangeRequest::Partial(r) = parse_range(Some(&h), size) {
            prop_assert!(r.start <= r.end && r.end < size, "{h} on {size}: {r:?}");
        }
    }

    /// Any netrc text: no panic; credentials only for hosts named in it.
    #[test]
    fn netrc_parse_is_total(text in "(machine|login|password|default|macdef|\\PC|\\s){0,60}") {
        let n = Netrc::parse(&text);
        let _ = n.credentials("example.org");
        let _ = n.credentials("");
    }

    /// Any config document: a clear error or a layer, and a layer gives a config or an error,
    /// never a panic.
    #[test]
    fn config_documents_never_panic(doc in document()) {
        if let Ok(layer) = layer_from_document(&doc) {
            let _ = nip_server::config::ServeConfig::from_layer(&layer);
        }
    }

    /// Any text as a YAML, TOML or JSON config file.
    #[test]
    fn config_text_never_panics(text in "(cache|server|:|\\.|-|\\[|\\]|\\{|\\}|=|\\n| |\"|[a-z0-9]){0,120}") {
        if let Ok(v) = serde_yaml::from_str::<serde_json::Value>(&text) {
            let _ = layer_from_document(&v);
        }
        if let Ok(v) = toml::from_str::<serde_json::Value>(&text) {
            let _ = layer_from_document(&v);
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let _ = layer_from_document(&v);
        }
    }
}

/// One multipart body: a boundary, then parts with arbitrary names, headers and contents.
fn multipart_body() -> impl Strategy<Value = (String, Vec<u8>)> {
    let part = (
        prop_oneof![
            Just("file".to_string()),
            Just("metadata".to_string()),
            "\\PC{0,10}"
        ],
        prop_oneof![
            Just(br#"{"name":"x","version":"1"}"#.to_vec()),
            Just(b"[1,2,3]".to_vec()),
            Just(b"{\"a\":".repeat(200)),
            Just(br#"{"sha256":"00"}"#.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..300),
        ],
        any::<bool>(),
    );
    (
        "[A-Za-z0-9]{1,20}",
        proptest::collection::vec(part, 0..4),
        any::<bool>(),
    )
        .prop_map(|(boundary, parts, close)| {
            let mut body = Vec::new();
            for (name, content, with_type) in parts {
                body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
                );
                if with_type {
                    body.extend_from_slice(b"Content-Type: application/json\r\n");
                }
                body.extend_from_slice(b"\r\n");
                body.extend_from_slice(&content);
                body.extend_from_slice(b"\r\n");
            }
            if close {
                body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
            }
            (boundary, body)
        })
}

/// Arbitrary multipart uploads (missing parts, bad JSON, duplicate parts, cut bodies, bad
/// boundaries) to `POST /v1/artifacts/{key}`: always a 2xx or 4xx answer, never a 5xx, and the
/// server keeps answering.
#[test]
fn multipart_uploads_never_cause_a_server_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = "fuzz-token-0123456789abcdef";
    let (_up, nip) = rt.block_on(start_nip_with_api_key(token));
    let client = client();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(200),
        ..ProptestConfig::default()
    });
    let n = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&multipart_body(), |(boundary, body)| {
            let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let status = rt.block_on(async {
                client
                    .post(format!("{}/v1/artifacts/fuzz-{n}", nip.url))
                    .bearer_auth(token)
                    .header(
                        "content-type",
                        format!("multipart/form-data; boundary={boundary}"),
                    )
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            });
            prop_assert!(status < 500, "status {status}");
            Ok(())
        })
        .unwrap();
    let status = rt.block_on(async {
        client
            .get(format!("{}/v1/health", nip.url))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
}
