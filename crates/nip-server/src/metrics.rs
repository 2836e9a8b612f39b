//! Prometheus metrics (`--prometheus-enabled`): a recorder installed once per process, a
//! middleware counting requests by route and status with latency histograms, and `/metrics`.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

use crate::error::ApiError;
use crate::AppState;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
/// Whether a recorder is installed: without one, the request middleware skips building labels.
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Installs the global recorder (once; later calls return the same handle).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            RECORDING.store(true, Ordering::Relaxed);
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "nip_http_requests_total",
        "HTTP requests by route, method and status"
    );
    describe_histogram!(
        "nip_http_request_duration_seconds",
        Unit::Seconds,
        "Time to response headers, by route"
    );
    describe_counter!(
        "nip_http_response_bytes_total",
        Unit::Bytes,
        "Bytes announced in responses (Content-Length)"
    );
    describe_counter!(
        "nip_http_request_bytes_total",
        Unit::Bytes,
        "Bytes announced in requests (Content-Length)"
    );
    describe_counter!(
        "nip_cache_hits_total",
        "Cache hits by kind (narinfo, nar, artifact)"
    );
    describe_counter!("nip_cache_misses_total", "Cache misses by kind");
    describe_counter!(
        "nip_coalesced_requests_total",
        "Requests that joined an upstream fetch under way"
    );
    describe_counter!(
        "nip_upstream_requests_total",
        "Requests to upstream caches by upstream, kind and result"
    );
    describe_histogram!(
        "nip_upstream_request_duration_seconds",
        Unit::Seconds,
        "Upstream request time by upstream and kind"
    );
    describe_counter!(
        "nip_upstream_bytes_total",
        Unit::Bytes,
        "Bytes received from upstream caches"
    );
    describe_counter!(
        "nip_auth_failures_total",
        "Requests refused for a bad token, by reason"
    );
    describe_counter!(
        "nip_rate_limited_total",
        "Requests refused by the rate limit"
    );
    describe_counter!(
        "nip_evictions_total",
        "Entries evicted to stay under --cache-max-size, by kind"
    );
    describe_counter!(
        "nip_verify_findings_total",
        "Bad store entries found by the scheduled scrub, by problem"
    );
    describe_gauge!(
        "nip_store_size_bytes",
        Unit::Bytes,
        "Bytes stored (NARs and artifacts)"
    );
    describe_gauge!("nip_store_entries", "Entries stored (NARs and artifacts)");
}

/// Target of the per-request spans (this middleware's and the handlers'): debug level, so at the
/// usual log levels they cost nothing per request; OpenTelemetry export always takes them (see
/// nip's telemetry filters). Handlers spell it out in their `#[instrument]` attributes.
pub const REQUEST_SPANS: &str = "nip::request";

static OTEL_SPANS: AtomicBool = AtomicBool::new(false);

/// Called when OpenTelemetry export is on: spans then also get the `otel.*` fields that name them
/// ("GET /nix-cache-info") and give their kind. Off, log lines stay free of them.
pub fn enable_otel_span_fields() {
    OTEL_SPANS.store(true, Ordering::Relaxed);
}

pub fn otel_spans() -> bool {
    OTEL_SPANS.load(Ordering::Relaxed)
}

/// Counts every request by its route pattern (bounded cardinality), method and status, and runs
/// it in a `request` span (an OTel server span with `--otel-enabled`). The span names the route
/// pattern, never the query string or headers, so no token reaches it.
pub async fn track(req: Request, next: Next) -> Response {
    // Borrowed, not copied: without a recorder or an enabled span nothing here allocates.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = req.method().clone();
    let recording = RECORDING.load(Ordering::Relaxed);
    if recording {
        if let Some(n) = content_length(req.headers()) {
            metrics::counter!("nip_http_request_bytes_total").increment(n);
        }
    }
    let span = tracing::debug_span!(target: REQUEST_SPANS, "request",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if otel_spans() && !span.is_disabled() {
        span.record("otel.name", format_args!("{method} {route}").to_string());
        span.record("otel.kind", "server");
    }
    let started = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    if !span.is_disabled() {
        // i64: tracing-opentelemetry keeps i64 as a number but turns u64 into a string.
        span.record(
            "http.response.status_code",
            i64::from(resp.status().as_u16()),
        );
        if resp.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
    }
    if recording {
        metrics::histogram!("nip_http_request_duration_seconds", "route" => route.to_owned())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("nip_http_requests_total", "route" => route.to_owned(),
            "method" => method_label(&method), "status" => resp.status().as_str().to_owned())
        .increment(1);
        if let Some(n) = content_length(resp.headers()) {
            metrics::counter!("nip_http_response_bytes_total").increment(n);
        }
    }
    resp
}

/// The `method` label: a closed set. Any token is a valid HTTP method, so a made-up one would
/// otherwise become a new time series that is never freed (memory and `/metrics` grow unbounded).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The declared `Content-Length` of a request or response, when it is a number.
pub(crate) fn content_length(h: &axum::http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// `GET /metrics` in the Prometheus text format (404 unless enabled).
/// `/metrics`: needs read access when Nix reads do, unless `--prometheus-public`.
pub async fn metrics_handler(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    if !state.config.prometheus_public {
        let (mut parts, _) = req.into_parts();
        crate::status::check_read_access(&state, &mut parts).await?;
    }
    let handle = state.metrics.as_ref().ok_or_else(|| {
        ApiError::NotFound("metrics are off: start nip serve with --prometheus-enabled".into())
    })?;
    crate::jobs::update_store_gauges(&state).await;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_a_closed_set() {
        let made_up = axum::http::Method::from_bytes(b"ABCDEFGHIJ").unwrap();
        assert_eq!(method_label(&made_up), "other");
        assert_eq!(method_label(&axum::http::Method::GET), "GET");
        assert_eq!(method_label(&axum::http::Method::CONNECT), "other");
    }
}
