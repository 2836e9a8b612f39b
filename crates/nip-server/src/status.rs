//! `GET /`: ncps' JSON `{"hostname","publicKey"}` for clients that ask for JSON, and for browsers a
//! small server-rendered status page (no JavaScript): version, uptime, store size against its
//! limit, entries, hit rate, upstream health, recent activity, the public key with a nix.conf
//! snippet, and how to point `nip cache remote` here. Never shows a secret; once any API key
//! exists, recent activity shows only counts by action, no names. Public unless Nix reads need
//! a token (`--cache-require-auth-read`, `--cache-get-token`): then the page needs a read key or
//! the get token (the JSON answer stays public: it is what `/pubkey` serves).
//! Also `GET /metrics` (see [`crate::metrics`]), under the same rule unless `--prometheus-public`.
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::stats::{Activity, Kind};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(crate::metrics::metrics_handler))
}

/// When Nix reads need a token, the caller must be able to read (a read key or the get token).
pub async fn check_read_access(state: &AppState, parts: &mut Parts) -> Result<(), ApiError> {
    if !(state.config.require_auth_read || state.config.get_token.is_some()) {
        return Ok(());
    }
    let caller = Caller::from_request_parts(parts, state).await?;
    state.check_nix_read(&caller)
}

async fn index(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (mut parts, _) = req.into_parts();
    let headers = &parts.headers;
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/html"));
    if wants_json {
        return Ok(Json(serde_json::json!({
            "hostname": state.config.hostname,
            "publicKey": state.public_key.to_string(),
        }))
        .into_response());
    }
    check_read_access(&state, &mut parts).await?;
    let usage = state.meta.usage().await.ok();
    let show_names = !state.keys_exist().await.unwrap_or(true);
    Ok(Html(render(
        &state,
        usage,
        host_url(&parts.headers, &state),
        show_names,
    ))
    .into_response())
}

/// Recent activity as table rows: with names while the server is open (no key exists), else
/// only how many of each action (the names are artifact keys and store paths of every prefix).
fn activity_rows(recent: &[Activity], show_names: bool) -> String {
    if recent.is_empty() {
        return "<tr><td colspan=\"3\">nothing yet</td></tr>".into();
    }
    if show_names {
        return recent
            .iter()
            .map(|a| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                    nip_core::api::rfc3339(a.at),
                    esc(a.action),
                    esc(&a.target)
                )
            })
            .collect();
    }
    let mut counts: Vec<(&str, usize, i64)> = Vec::new();
    for a in recent {
        match counts.iter_mut().find(|(action, _, _)| *action == a.action) {
            Some((_, n, _)) => *n += 1,
            None => counts.push((a.action, 1, a.at)),
        }
    }
    counts
        .iter()
        .map(|(action, n, latest)| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{n} (names hidden: API keys exist)</td></tr>",
                nip_core::api::rfc3339(*latest),
                esc(action),
            )
        })
        .collect()
}

/// The URL clients reach this server at, from the request's Host header.
fn host_url(headers: &HeaderMap, state: &AppState) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .map(String::from)
        .unwrap_or_else(|| format!("{}:8501", state.config.hostname));
    format!("http://{host}")
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn human_bytes(n: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.max(0) as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86400),
    }
}

fn rate(hits: u64, misses: u64) -> String {
    if hits + misses == 0 {
        "–".into()
    } else {
        format!(
            "{:.1}% ({hits} hits, {misses} misses)",
            hits as f64 * 100.0 / (hits + misses) as f64
        )
    }
}

fn render(
    state: &AppState,
    usage: Option<nip_store::Usage>,
    url: String,
    show_names: bool,
) -> String {
    let c = &state.config;
    let usage = usage.unwrap_or_default();
    let limit = c
        .max_size
        .map(|m| human_bytes(m as i64))
        .unwrap_or_else(|| "no limit".into());
    let percent = c
        .max_size
        .map(|m| format!(" ({:.0}%)", usage.bytes as f64 * 100.0 / m as f64))
        .unwrap_or_default();
    let (hits, misses) = state.stats.totals();
    let kinds: String = [Kind::Narinfo, Kind::Nar, Kind::Artifact]
        .iter()
        .map(|k| {
            let (h, m) = state.stats.by_kind(*k);
            format!("<tr><td>{}</td><td>{}</td></tr>", k.as_str(), rate(h, m))
        })
        .collect();
    let upstreams: String = state
        .upstreams
        .list()
        .iter()
        .map(|u| {
            format!(
                "<tr><td><code>{}</code></td><td>{}</td><td class=\"{}\">{}</td></tr>",
                esc(u.name()),
                u.priority(),
                if u.is_healthy() { "ok" } else { "bad" },
                if u.is_healthy() {
                    "healthy"
                } else {
                    "skipped after failures"
                }
            )
        })
        .collect();
    let activity = activity_rows(&state.stats.recent(), show_names);
    let key = esc(&state.public_key.to_string());
    let url = esc(&url);
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nip — {host}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}
h1{{font-size:1.6rem}} h2{{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}}
table{{border-collapse:collapse}} td,th{{padding:.2rem .8rem .2rem 0;text-align:left;vertical-align:top}}
pre{{background:#f4f4f4;padding:.7rem;overflow-x:auto}} .ok{{color:#176117}} .bad{{color:#a11}}
</style></head><body>
<h1>nip cache <code>{host}</code></h1>
<table id="summary">
<tr><th>Version</th><td>{version}</td></tr>
<tr><th>Uptime</th><td>{uptime}</td></tr>
<tr><th>Store</th><td id="store-size">{size} of {limit}{percent}</td></tr>
<tr><th>Entries</th><td id="entries">{nars} NARs, {narinfos} narinfos, {artifacts} artifacts</td></tr>
<tr><th>Hit rate</th><td id="hit-rate">{hit_rate}</td></tr>
</table>
<h2>Hit rate by kind</h2><table>{kinds}</table>
<h2>Upstream caches</h2>
<table id="upstreams"><tr><th>URL</th><th>Priority</th><th>Health</th></tr>{upstreams}</table>
<h2>Recent activity</h2>
<table id="activity"><tr><th>Time (UTC)</th><th>Action</th><th>Target</th></tr>{activity}</table>
<h2>Use it from Nix</h2>
<p>Public key: <code id="public-key">{key}</code></p>
<pre>substituters = {url}
trusted-public-keys = {key}</pre>
<h2>Use it from <code>nip build</code></h2>
<pre>nip cache remote config --url {url} --api-key &lt;token&gt; --enable
nip cache remote status</pre>
<p>An administrator creates tokens on the server with <code>nip keys create --name NAME --scope read|write</code>.</p>
</body></html>
"#,
        host = esc(&c.hostname),
        version = env!("CARGO_PKG_VERSION"),
        uptime = human_duration(crate::uptime(state).as_secs()),
        size = human_bytes(usage.bytes),
        nars = usage.nars,
        narinfos = usage.narinfos,
        artifacts = usage.artifacts,
        hit_rate = rate(hits, misses),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(50 << 20), "50.0 MiB");
        assert_eq!(rate(3, 1), "75.0% (3 hits, 1 misses)");
        assert_eq!(rate(0, 0), "–");
    }

    #[test]
    fn activity_hides_names_once_keys_exist() {
        let recent = vec![
            Activity {
                at: 0,
                action: "upload",
                target: "secret-prefix/key".into(),
            },
            Activity {
                at: 0,
                action: "upload",
                target: "other/key".into(),
            },
        ];
        let open = activity_rows(&recent, true);
        assert!(open.contains("secret-prefix/key"), "{open}");
        let closed = activity_rows(&recent, false);
        assert!(!closed.contains("key<"), "{closed}");
        assert!(!closed.contains("secret-prefix"), "{closed}");
        assert!(
            closed.contains("upload") && closed.contains(">2 ("),
            "{closed}"
        );
    }
}
