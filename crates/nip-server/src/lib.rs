//! The nip HTTP server: a Nix binary cache proxy (and, on the same store, the artifact cache).
//! [`router`] builds the whole application from an [`AppState`]; `main` only parses config and serves.
pub mod auth;
pub mod budget;
pub mod cache;
pub mod coalesce;
pub mod config;
pub mod conn;
pub mod error;
pub mod health;
pub mod hot;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod netrc;
pub mod nix;
pub mod range;
pub mod read_audit;
pub mod settings;
pub mod state;
pub mod stats;
pub mod status;
pub mod takeover;
pub mod tls;
pub mod upstream;
pub mod v1;

use std::time::Duration;

use axum::Router;

pub use crate::state::{open_blobs, AppState};

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(status::router())
        .merge(nix::router())
        .merge(v1::router())
        .fallback(|| async { error::ApiError::NotFound("no such endpoint".into()) })
        .layer(axum::middleware::from_fn(metrics::track))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let upstreams = state.upstreams.clone();
    tokio::spawn(async move { upstreams.refresh_priorities().await });
    // Before serving, so the others see this one soon (they may believe themselves alone for up
    // to 200 ms more: at worst a miss is fetched twice then).
    cache::cluster::announce(&state).await;
    let jobs = jobs::spawn(state.clone());
    let tls = state.config.tls.clone();
    let limits = state.config.conn_limits;
    let app = router(state);
    let result = match tls {
        Some(files) => tls::serve_https(listener, app, files, limits, shutdown).await,
        None => {
            tls::warn_if_plaintext(listener.local_addr());
            // Timeouts and a connection limit that axum::serve lacks (slowloris, idle sockets).
            conn::serve_tcp(listener, app, limits, shutdown).await
        }
    };
    jobs.shutdown().await;
    result
}

/// Time since start, for health output.
pub fn uptime(state: &AppState) -> Duration {
    state.started_at.elapsed()
}
