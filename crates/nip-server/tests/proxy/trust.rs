//! The trust rules of Nix uploads (docs/security.md): a write key can neither replace a stored
//! store path nor shadow what an upstream has, and the signature gate is fail-closed.
use nip_core::nar_file::Compression;
use nip_core::narinfo::NarInfo;
use nip_core::signing::SigningKey;

use crate::harness::*;

fn put_on() -> Vec<(&'static str, Vec<String>)> {
    vec![("cache.allow-put-verb", vec!["true".into()])]
}

/// Uploads `e`'s NAR and then its narinfo; the narinfo PUT's status and body.
async fn upload(nip: &Nip, e: &Entry) -> (u16, String) {
    let nar = client()
        .put(format!("{}/{}", nip.url, e.nar_path))
        .body(e.nar.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(nar.status().as_u16(), 200, "NAR upload");
    let resp = client()
        .put(format!("{}/{}", nip.url, e.narinfo_path()))
        .body(e.narinfo.to_text())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// Another build of the same store path: same hash and name, other bytes and NarHash.
fn impostor(genuine: &Entry, key: &SigningKey) -> Entry {
    let mut e = make_entry("x", genuine.nar.len(), Compression::None, key);
    e.hash = genuine.hash.clone();
    e.narinfo.store_path = genuine.narinfo.store_path.clone();
    e.narinfo.sigs.clear();
    e.narinfo.sign(key);
    e
}

async fn served(nip: &Nip, e: &Entry) -> NarInfo {
    let (status, body) = get(&format!("{}/{}", nip.url, e.narinfo_path())).await;
    assert_eq!(status, 200);
    NarInfo::parse(std::str::from_utf8(&body.unwrap()).unwrap()).unwrap()
}

/// An upstream holding `genuine` (signed by the upstream key) and nip in front of it, uploads on.
async fn genuine_upstream() -> (FakeUpstream, Entry, Nip) {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let genuine = make_entry("hello-1.0", 2048, Compression::None, &key);
    up.publish(&genuine);
    let nip = start_nip(&[&up], &[key.public_key()], put_on()).await;
    (up, genuine, nip)
}

async fn audit_actions(nip: &Nip) -> Vec<(String, String, String)> {
    nip.state
        .index()
        .audit_since(0, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.action, e.target.unwrap_or_default(), e.result))
        .collect()
}

#[tokio::test]
async fn an_upload_cannot_replace_a_path_fetched_from_an_upstream() {
    let (up, genuine, nip) = genuine_upstream().await;
    let attacker = SigningKey::generate("attacker-1").unwrap();
    let before = served(&nip, &genuine).await;
    assert_eq!(before.nar_hash, genuine.narinfo.nar_hash);

    let (status, body) = upload(&nip, &impostor(&genuine, &attacker)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(&genuine.narinfo.store_path.full()), "{body}");
    assert!(
        body.contains("immutable") || body.contains("shadows"),
        "{body}"
    );
    let after = served(&nip, &genuine).await;
    assert_eq!(after, before, "the stored narinfo changed");
    let rec = nip.narinfo_record(&genuine.hash).await.unwrap();
    assert_eq!(rec.signed_by.as_deref(), Some("upstream-test-1"));
    assert_eq!(rec.origin, format!("{}/", up.url));
    assert!(audit_actions(&nip)
        .await
        .iter()
        .any(|(a, t, r)| a == "narinfo-upload-refused"
            && *t == genuine.narinfo.store_path.full()
            && r == "409"));
}

#[tokio::test]
async fn an_upload_cannot_pre_poison_a_path_only_the_upstream_has() {
    let (up, genuine, nip) = genuine_upstream().await;
    let attacker = SigningKey::generate("attacker-1").unwrap();

    let (status, body) = upload(&nip, &impostor(&genuine, &attacker)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(&up.url), "names the upstream: {body}");
    // Readers get the upstream's narinfo, with its signature.
    let after = served(&nip, &genuine).await;
    assert_eq!(after.nar_hash, genuine.narinfo.nar_hash);
    assert!(after.sigs.iter().any(|s| s.starts_with("upstream-test-1:")));
    assert!(!after.sigs.iter().any(|s| s.starts_with("attacker-1:")));
}

#[tokio::test]
async fn the_same_contents_as_the_upstream_are_accepted_keeping_its_signature() {
    let (_up, genuine, nip) = genuine_upstream().await;
    // The uploader's copy: same contents, its own (unsigned) narinfo.
    let mut copy = genuine.clone();
    copy.narinfo.sigs.clear();
    let (status, body) = upload(&nip, &copy).await;
    assert_eq!(status, 200, "{body}");
    let served = served(&nip, &genuine).await;
    assert!(served
        .sigs
        .iter()
        .any(|s| s.starts_with("upstream-test-1:")));
    let rec = nip.narinfo_record(&genuine.hash).await.unwrap();
    assert_ne!(rec.origin, "upload");
}

#[tokio::test]
async fn a_new_path_is_stored_once_and_then_immutable() {
    let key = upstream_key();
    let builder = SigningKey::generate("ci-1").unwrap();
    let up = FakeUpstream::start(40).await;
    let nip = start_nip(&[&up], &[key.public_key()], put_on()).await;
    let mine = make_entry("app-2.0", 1024, Compression::None, &builder);

    assert_eq!(upload(&nip, &mine).await.0, 200);
    assert_eq!(
        up.hits(&mine.narinfo_path()),
        1,
        "the upstream was asked first"
    );
    // A retry of the same upload (nix copy does that) succeeds and changes nothing.
    let first = served(&nip, &mine).await;
    assert_eq!(upload(&nip, &mine).await.0, 200);
    assert_eq!(served(&nip, &mine).await, first);
    let (status, body) = upload(&nip, &impostor(&mine, &builder)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("immutable"), "{body}");
    assert_eq!(served(&nip, &mine).await, first);
    let rec = nip.narinfo_record(&mine.hash).await.unwrap();
    assert_eq!(rec.origin, "upload");
    assert_eq!(rec.signed_by, None, "no trusted upload key is configured");
}

#[tokio::test]
async fn new_paths_are_refused_with_a_4xx_while_an_upstream_cannot_answer() {
    let key = upstream_key();
    let builder = SigningKey::generate("ci-1").unwrap();
    let up = FakeUpstream::start(40).await;
    let down = FakeUpstream::start(40).await;
    let nip = start_nip(&[&up, &down], &[key.public_key()], put_on()).await;
    let mine = make_entry("app-2.0", 1024, Compression::None, &builder);
    down.set(&mine.narinfo_path(), Behavior::Status(502));

    let (status, body) = upload(&nip, &mine).await;
    assert_eq!(status, 424, "{body}");
    assert!(
        body.contains(&down.url),
        "names the silent upstream: {body}"
    );
    assert!(nip.narinfo_record(&mine.hash).await.is_none());
    // Once it answers, the same upload goes through.
    down.set(&mine.narinfo_path(), Behavior::Status(404));
    assert_eq!(upload(&nip, &mine).await.0, 200);
}

/// A 403 or an error page is no "not here": the upstream may have the path, so an upload of it
/// must not go through (it would shadow the upstream for everyone).
#[tokio::test]
async fn an_unclear_upstream_answer_is_not_an_absence() {
    let key = upstream_key();
    let builder = SigningKey::generate("ci-1").unwrap();
    let up = FakeUpstream::start(40).await;
    let nip = start_nip(&[&up], &[key.public_key()], put_on()).await;
    for answer in [
        Behavior::Status(403),
        Behavior::Serve(bytes::Bytes::from_static(
            b"<html>Service temporarily unavailable</html>",
        )),
    ] {
        let mine = make_entry("app-2.0", 1024, Compression::None, &builder);
        up.set(&mine.narinfo_path(), answer);
        let (status, body) = upload(&nip, &mine).await;
        assert_eq!(status, 424, "{body}");
        assert!(nip.narinfo_record(&mine.hash).await.is_none());
        // Readers still see it as absent.
        assert_eq!(
            get(&format!("{}/{}", nip.url, mine.narinfo_path())).await.0,
            404
        );
    }
}

#[tokio::test]
async fn the_signature_gate_refuses_unsigned_uploads_and_keeps_the_uploaders_signature() {
    let key = upstream_key();
    let builder = SigningKey::generate("ci-1").unwrap();
    let stranger = SigningKey::generate("stranger-1").unwrap();
    let up = FakeUpstream::start(40).await;
    let down = FakeUpstream::start(40).await;
    let mut extra = put_on();
    extra.push(("cache.require-trusted-signature", vec!["true".into()]));
    extra.push((
        "cache.trusted-upload-keys",
        vec![builder.public_key().to_string()],
    ));
    let nip = start_nip(&[&up, &down], &[key.public_key()], extra).await;

    let mut unsigned = make_entry("app-2.0", 1024, Compression::None, &builder);
    unsigned.narinfo.sigs.clear();
    let (status, body) = upload(&nip, &unsigned).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("ci-1"), "names the trusted keys: {body}");
    let foreign = make_entry("app-2.1", 1024, Compression::None, &stranger);
    assert_eq!(upload(&nip, &foreign).await.0, 403);

    // A trusted signature also vouches while an upstream is down.
    let signed = make_entry("app-2.2", 1024, Compression::None, &builder);
    down.set(&signed.narinfo_path(), Behavior::Status(502));
    assert_eq!(upload(&nip, &signed).await.0, 200);
    let served = served(&nip, &signed).await;
    assert!(
        served.sigs.iter().any(|s| s.starts_with("ci-1:")),
        "{served:?}"
    );
    assert!(
        served.sigs.iter().any(|s| s.starts_with("nip-test-1:")),
        "{served:?}"
    );
    let rec = nip.narinfo_record(&signed.hash).await.unwrap();
    assert_eq!(rec.signed_by.as_deref(), Some("ci-1"));
    let refused: Vec<_> = audit_actions(&nip)
        .await
        .into_iter()
        .filter(|(a, _, _)| a == "narinfo-upload-refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
}

/// Fail closed, as ncps: the gate without a key starts (with a warning) and refuses every upload.
#[tokio::test]
async fn the_gate_without_keys_refuses_every_upload() {
    let key = upstream_key();
    let up = FakeUpstream::start(40).await;
    let mut extra = put_on();
    extra.push(("cache.require-trusted-signature", vec!["true".into()]));
    let nip = start_nip(&[&up], &[key.public_key()], extra).await;
    let signed = make_entry("app-2.0", 1024, Compression::None, &key);
    let (status, body) = upload(&nip, &signed).await;
    assert_eq!(status, 403, "{body}");
    assert!(nip.narinfo_record(&signed.hash).await.is_none());
}

/// A narinfo is never served without its NAR: deleting the NAR takes the narinfos with it.
#[tokio::test]
async fn deleting_a_nar_removes_the_narinfos_that_point_at_it() {
    let key = upstream_key();
    let builder = SigningKey::generate("ci-1").unwrap();
    let up = FakeUpstream::start(40).await;
    let mut extra = put_on();
    extra.push(("cache.allow-delete-verb", vec!["true".into()]));
    let nip = start_nip(&[&up], &[key.public_key()], extra).await;
    let mine = make_entry("app-2.0", 1024, Compression::None, &builder);
    assert_eq!(upload(&nip, &mine).await.0, 200);
    assert_eq!(served(&nip, &mine).await.nar_hash, mine.narinfo.nar_hash);
    let resp = client()
        .delete(format!("{}/{}", nip.url, mine.nar_path))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert!(nip.narinfo_record(&mine.hash).await.is_none());
    assert_eq!(
        get(&format!("{}/{}", nip.url, mine.narinfo_path())).await.0,
        404
    );
}
