//! Manual operations: `nip cache remote status`, `pull` and `push`. Unlike `nip build`, these
//! report remote failures as errors: the user asked for the remote explicitly.
use crate::build::resolve;
use crate::client::{warn, Client, Fetch};
use crate::config::Policies;
use crate::error::{ClientError, Result};
use crate::key;
use crate::local::Metadata;
use crate::record::now_unix;
use crate::remote::{no_such_endpoint, Found, RemoteClient, RemoteError, UploadOutcome};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    pub url: String,
    pub priority: i64,
    pub api_key_configured: bool,
    pub available: bool,
    /// Why not, when not available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub enabled: bool,
    pub url: Option<String>,
    pub api_key_configured: bool,
    pub timeout_secs: u64,
    pub lookup_timeout_secs: f64,
    pub servers: Vec<ServerStatus>,
    /// At least one server is reachable and accepts its key.
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Checks each server: reachable (`/v1/health`), then key accepted (an authenticated read).
/// One attempt each: a status check should answer now, not after the retry policy. What it
/// finds replaces what recent runs remembered of the server's reachability.
pub fn status(client: &Client) -> StatusReport {
    let c = &client.config;
    let policies = Policies {
        retry_attempts: 1,
        ..c.policies.clone()
    };
    let servers: Vec<ServerStatus> = c
        .servers
        .iter()
        .map(|s| {
            let check =
                RemoteClient::new(s.clone(), c.timeout, policies.clone(), c.ca_cert.as_deref())
                    .and_then(|rc| rc.health().and_then(|()| rc.check_auth()));
            match &check {
                Err(e) if e.is_unreachable() => {
                    client
                        .unreachable
                        .note(&s.url, now_unix().max(0) as u64, &e.to_string())
                }
                _ => client.unreachable.forget(&s.url),
            }
            ServerStatus {
                url: s.url.clone(),
                priority: s.priority,
                api_key_configured: s.api_key.is_some(),
                available: check.is_ok(),
                reason: check.err().map(|e| e.to_string()),
            }
        })
        .collect();
    let available = servers.iter().any(|s| s.available);
    let reason = if servers.is_empty() {
        Some("no server configured (nip cache remote config --url URL)".into())
    } else if !available {
        servers.first().and_then(|s| s.reason.clone())
    } else {
        None
    };
    StatusReport {
        enabled: c.enabled,
        url: c.url.clone(),
        api_key_configured: c.api_key.is_some(),
        timeout_secs: c.timeout.as_secs(),
        lookup_timeout_secs: c.policies.lookup_timeout.as_secs_f64(),
        servers,
        available,
        reason,
    }
}

/// The cache keys `pull` or `push` act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Keys {
    /// Artifacts known to exist (a key given, found in a listing or the local cache) or asked for
    /// exactly (a recipe's key for the variants given).
    Exact(Vec<String>),
    /// Every variant combination a recipe allows, for a server that cannot list what it has:
    /// those it lacks are skipped.
    Possible(Vec<String>),
}

/// Metadata of the artifacts of a name and version, `None` when they cannot be listed.
pub type Candidates<'a> = dyn Fn(&str, &str) -> Result<Option<Vec<Metadata>>> + 'a;

/// Variants of one recipe enumerated at most (2^6 keys) when a server cannot list its artifacts.
const MAX_ENUMERATED_VARIANTS: usize = 6;

/// Turns `<key>` or `<pkg> <version> [+variant…]` into cache keys. With variants and a recipe of
/// that version, the key is computed. Otherwise `candidates` (local or remote metadata; `None`
/// when no server can list) are searched: without variants that is every variant of the version.
/// A server that cannot list gets every variant combination of the recipe, when there is one.
pub fn resolve_keys(
    client: &Client,
    args: &[String],
    cwd: &Path,
    recipes_path: Option<&str>,
    candidates: &Candidates,
) -> Result<Keys> {
    match args {
        [] => Err(ClientError::NotFound(
            "give a cache key or <pkg> <version> [+variant…]".into(),
        )),
        [key] => {
            nip_core::api::validate_key(key).map_err(|e| ClientError::NotFound(e.to_string()))?;
            Ok(Keys::Exact(vec![key.clone()]))
        }
        [pkg, version, variant_args @ ..] => {
            let recipe = resolve(client, pkg, variant_args, cwd, recipes_path)
                .ok()
                .filter(|r| &r.recipe.recipe.version == version);
            if let (Some(r), false) = (&recipe, variant_args.is_empty()) {
                return Ok(Keys::Exact(vec![r.key.clone()]));
            }
            let mut wanted: Vec<String> = variant_args
                .iter()
                .flat_map(|a| a.split('+').filter(|s| !s.is_empty()).map(String::from))
                .collect();
            wanted.sort();
            wanted.dedup();
            let platform = key::platform();
            let Some(found) = candidates(pkg, version)? else {
                return match recipe {
                    Some(r) => every_variant_key(client, &r, pkg, cwd, recipes_path),
                    None => Err(ClientError::NotFound(format!(
                        "the remote cache cannot list its artifacts (no GET /v1/artifacts): give \
                         the cache key, or have the recipe of {pkg} {version} here"
                    ))),
                };
            };
            let mut keys: Vec<String> = found
                .into_iter()
                .filter(|m| m.platform == platform)
                .filter(|m| variant_args.is_empty() || m.variants == wanted)
                .map(|m| m.key)
                .collect();
            keys.dedup();
            if keys.is_empty() {
                return Err(ClientError::NotFound(format!(
                    "no artifact for {pkg} {version} {} on {platform}",
                    variant_args.join(" ")
                )));
            }
            Ok(Keys::Exact(keys))
        }
    }
}

/// The keys of every variant combination of the recipe `r` (the empty one included).
fn every_variant_key(
    client: &Client,
    r: &crate::build::Resolved,
    pkg: &str,
    cwd: &Path,
    recipes_path: Option<&str>,
) -> Result<Keys> {
    let names = &r.recipe.recipe.variants;
    if names.len() > MAX_ENUMERATED_VARIANTS {
        return Err(ClientError::NotFound(format!(
            "the remote cache cannot list its artifacts and {pkg} has {} variants: give them \
             (+a+b) or the cache key",
            names.len()
        )));
    }
    let mut keys = Vec::new();
    for mask in 0u32..(1 << names.len()) {
        let chosen: Vec<&str> = (0..names.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| names[i].as_str())
            .collect();
        let arg = if chosen.is_empty() {
            vec![]
        } else {
            vec![format!("+{}", chosen.join("+"))]
        };
        keys.push(resolve(client, pkg, &arg, cwd, recipes_path)?.key);
    }
    Ok(Keys::Possible(keys))
}

/// `nip cache remote pull`: downloads into the local cache (verified).
pub fn pull(client: &Client, key: &str) -> Result<Metadata> {
    pull_found(client, key)?
        .ok_or_else(|| ClientError::NotFound(format!("{key} is not in the remote cache")))
}

/// As `pull`, with `None` when no server has `key`.
pub fn pull_found(client: &Client, key: &str) -> Result<Option<Metadata>> {
    if let Some(m) = client.local.get(key) {
        return Ok(Some(m));
    }
    if client.config.servers.is_empty() {
        return Err(ClientError::ConfigInvalid(
            "no remote cache configured (nip cache remote config --url URL)".into(),
        ));
    }
    // Without the server's metadata we still know what the key says.
    let fallback = |info: &Found| Metadata {
        name: String::new(),
        version: String::new(),
        variants: vec![],
        key: key.to_string(),
        platform: String::new(),
        sha256: info.sha256.clone().unwrap_or_default(),
        size: info.size.unwrap_or(0),
        build_duration_secs: 0.0,
        builder_host: "unknown".into(),
        created: info
            .created_at
            .clone()
            .unwrap_or_else(crate::record::now_rfc3339),
    };
    match client.fetch(key, &fallback, None) {
        Fetch::Hit(hit) => Ok(Some(hit.meta)),
        Fetch::Miss => Ok(None),
        Fetch::Failed => Err(ClientError::NotFound(format!(
            "{key} could not be pulled (see the messages above)"
        ))),
    }
}

/// `nip cache remote push`: uploads a local artifact, unless the server already has its bytes.
pub fn push(client: &Client, key: &str) -> Result<(String, UploadOutcome)> {
    let meta = client
        .local
        .get(key)
        .ok_or_else(|| ClientError::NotFound(format!("{key} is not in the local cache")))?;
    if client.config.servers.is_empty() {
        return Err(ClientError::ConfigInvalid(
            "no remote cache configured (nip cache remote config --url URL)".into(),
        ));
    }
    client.push(&meta, true).map_err(|errors| {
        let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        if all.is_empty() {
            return ClientError::NotFound(format!(
                "push of {key} skipped: every remote cache was found unreachable above"
            ));
        }
        ClientError::NotFound(format!("push of {key} failed: {}", all.join("; ")))
    })
}

/// Remote metadata of `name`/`version` artifacts, for `pull <pkg> <version>`; `None` when no
/// server can list (the guide's API has no listing). A server that fails is warned about and
/// skipped while another answers.
pub fn remote_candidates(
    client: &Client,
    name: &str,
    version: &str,
) -> Result<Option<Vec<Metadata>>> {
    let mut out = Vec::new();
    let (mut listed, mut error): (bool, Option<RemoteError>) = (false, None);
    for rc in client.remotes() {
        match rc.list(Some(name), Some(version), 100) {
            Ok(list) => {
                listed = true;
                out.extend(
                    list.artifacts
                        .into_iter()
                        .filter_map(|a| serde_json::from_value::<Metadata>(a.metadata).ok()),
                );
            }
            Err(e) if no_such_endpoint(&e) => {}
            Err(e) => {
                warn(&format!("Remote cache {} cannot list: {e}", rc.server.url));
                error = Some(e);
            }
        }
    }
    match error {
        Some(e) if !listed => Err(e.into()),
        _ => Ok(listed.then_some(out)),
    }
}
