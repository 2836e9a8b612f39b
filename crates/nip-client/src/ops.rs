//! Manual operations: `nip cache remote status`, `pull` and `push`. Unlike `nip build`, these
//! report remote failures as errors: the user asked for the remote explicitly.
use crate::build::resolve;
use crate::client::{Client, Fetch};
use crate::config::Policies;
use crate::error::{ClientError, Result};
use crate::key;
use crate::local::Metadata;
use crate::remote::{RemoteClient, UploadOutcome};
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
    pub servers: Vec<ServerStatus>,
    /// At least one server is reachable and accepts its key.
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Checks each server: reachable (`/v1/health`), then key accepted (an authenticated read).
/// One attempt each: a status check should answer now, not after the retry policy.
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
        servers,
        available,
        reason,
    }
}

/// Turns `<key>` or `<pkg> <version> [+variant…]` into cache keys. With a recipe of that version
/// the key is computed; otherwise `candidates` (local or remote metadata) are searched.
pub fn resolve_keys(
    client: &Client,
    args: &[String],
    cwd: &Path,
    recipes_path: Option<&str>,
    candidates: &dyn Fn(&str, &str) -> Result<Vec<Metadata>>,
) -> Result<Vec<String>> {
    match args {
        [] => Err(ClientError::NotFound(
            "give a cache key or <pkg> <version> [+variant…]".into(),
        )),
        [key] => {
            nip_core::api::validate_key(key).map_err(|e| ClientError::NotFound(e.to_string()))?;
            Ok(vec![key.clone()])
        }
        [pkg, version, variant_args @ ..] => {
            if let Ok(r) = resolve(client, pkg, variant_args, cwd, recipes_path) {
                if &r.recipe.recipe.version == version {
                    return Ok(vec![r.key]);
                }
            }
            let mut wanted: Vec<String> = variant_args
                .iter()
                .flat_map(|a| a.split('+').filter(|s| !s.is_empty()).map(String::from))
                .collect();
            wanted.sort();
            wanted.dedup();
            let platform = key::platform();
            let keys: Vec<String> = candidates(pkg, version)?
                .into_iter()
                .filter(|m| m.platform == platform)
                .filter(|m| variant_args.is_empty() || m.variants == wanted)
                .map(|m| m.key)
                .collect();
            if keys.is_empty() {
                return Err(ClientError::NotFound(format!(
                    "no artifact for {pkg} {version} {} on {platform}",
                    variant_args.join(" ")
                )));
            }
            Ok(keys)
        }
    }
}

/// `nip cache remote pull`: downloads into the local cache (verified).
pub fn pull(client: &Client, key: &str) -> Result<Metadata> {
    if let Some(m) = client.local.get(key) {
        return Ok(m);
    }
    if client.config.servers.is_empty() {
        return Err(ClientError::ConfigInvalid(
            "no remote cache configured (nip cache remote config --url URL)".into(),
        ));
    }
    // Without the server's metadata we still know what the key says.
    let fallback = |info: &nip_core::api::ArtifactInfo| Metadata {
        name: String::new(),
        version: String::new(),
        variants: vec![],
        key: key.to_string(),
        platform: String::new(),
        sha256: info.sha256.clone(),
        size: info.size,
        build_duration_secs: 0.0,
        builder_host: "unknown".into(),
        created: info.created_at.clone(),
    };
    match client.fetch(key, &fallback, None) {
        Fetch::Hit(hit) => Ok(hit.meta),
        Fetch::Miss => Err(ClientError::NotFound(format!(
            "{key} is not in the remote cache"
        ))),
        Fetch::Failed => Err(ClientError::NotFound(format!(
            "{key} could not be pulled (see the warnings above)"
        ))),
    }
}

/// `nip cache remote push`: uploads a local artifact.
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
    client.push(&meta).map_err(|errors| {
        let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        ClientError::NotFound(format!("push of {key} failed: {}", all.join("; ")))
    })
}

/// Remote metadata of `name`/`version` artifacts, for `pull <pkg> <version>` without a recipe.
pub fn remote_candidates(client: &Client, name: &str, version: &str) -> Result<Vec<Metadata>> {
    let mut out = Vec::new();
    for rc in client.remotes() {
        let list = rc.list(Some(name), Some(version), 100)?;
        out.extend(
            list.artifacts
                .into_iter()
                .filter_map(|a| serde_json::from_value::<Metadata>(a.metadata).ok()),
        );
    }
    Ok(out)
}
