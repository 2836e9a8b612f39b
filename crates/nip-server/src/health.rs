//! `GET /healthz` (liveness, as ncps) and `GET /v1/health` (JSON, with a readiness check of the
//! database and storage). No authentication.
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "OK\n" }))
        .route("/v1/health", get(health))
}

async fn health(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    state.meta.ping().await?;
    let probe = nip_store::BlobKey::new("health-probe").map_err(ApiError::from)?;
    state.blobs.stat(&probe).await?;
    Ok(Json(
        json!({ "status": "ok", "uptimeSeconds": crate::uptime(&state).as_secs() }),
    ))
}
