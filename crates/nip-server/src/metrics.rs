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
        "nip_nar_prefetches_total",
        "NARs fetched with their narinfo (--cache-prefetch-nar-max-size), by outcome: started, skipped (stored, running, or another instance fetching), dropped (queue full)"
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
    describe_counter!("nip_eviction_runs_total", "Eviction passes run");
    describe_counter!(
        "nip_evicted_bytes_total",
        Unit::Bytes,
        "Bytes freed by eviction"
    );
    describe_histogram!(
        "nip_eviction_duration_seconds",
        Unit::Seconds,
        "Time an eviction pass took"
    );
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
    let mut text = handle.render();
    if state.config.prometheus_ncps_metrics {
        text.push_str(&ncps_metrics(&text, &state));
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// One sample line of the Prometheus text format.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the sample lines of `text` (comments skipped); label values unescaped.
fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let (mut key, mut value, mut in_value, mut escaped) =
                (String::new(), String::new(), false, false);
            let mut end = body.len();
            for (i, c) in body.char_indices() {
                match (in_value, c) {
                    (true, _) if escaped => {
                        value.push(if c == 'n' { '\n' } else { c });
                        escaped = false;
                    }
                    (true, '\\') => escaped = true,
                    (true, '"') => {
                        labels.push((std::mem::take(&mut key), std::mem::take(&mut value)));
                        in_value = false;
                    }
                    (true, _) => value.push(c),
                    (false, '}') => {
                        end = i + 1;
                        break;
                    }
                    (false, '"') => in_value = true,
                    (false, '=' | ',') => {}
                    (false, _) => key.push(c),
                }
            }
            rest = &body[end..];
        }
        if let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            out.push(Sample {
                name,
                labels,
                value,
            });
        }
    }
    out
}

/// The sum of `name`'s samples whose labels include every pair of `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// ncps' metrics (its names, labels and types), computed from nip's own and from the state, so
/// dashboards built for ncps keep working. The mapping is listed in the README ("ncps users").
fn ncps_metrics(nip: &str, state: &AppState) -> String {
    let samples = parse_samples(nip);
    let mut out = String::new();
    ncps_served(&mut out, &samples);
    ncps_gauges(&mut out, &samples, state);
    ncps_lru_counters(&mut out, &samples);
    ncps_histograms(&mut out, &samples);
    out
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `ncps_nar_served_total` and `ncps_narinfo_served_total`: hits and misses.
fn ncps_served(out: &mut String, samples: &[Sample]) {
    use std::fmt::Write;
    for (name, kind, help) in [
        (
            "ncps_nar_served_total",
            "nar",
            "Counts the number of NAR files served.",
        ),
        (
            "ncps_narinfo_served_total",
            "narinfo",
            "Counts the number of NAR info files served.",
        ),
    ] {
        head(out, name, "counter", help);
        for (result, nip_name) in [
            ("hit", "nip_cache_hits_total"),
            ("miss", "nip_cache_misses_total"),
        ] {
            let v = sum(samples, nip_name, &[("kind", kind)]);
            let _ = writeln!(
                out,
                "{name}{{result=\"{result}\",status=\"success\"}} {}",
                number(v)
            );
        }
    }
}

/// The store's size and entries, the size limit, the upstreams.
fn ncps_gauges(out: &mut String, samples: &[Sample], state: &AppState) {
    let stored = sum(samples, "nip_store_size_bytes", &[]);
    let max = state.budget.max_bytes.unwrap_or(0) as f64;
    let healthy = state
        .upstreams
        .list()
        .iter()
        .filter(|u| u.is_healthy())
        .count();
    let gauges = [
        (
            "ncps_store_total_size_bytes",
            "The total size of all NAR files in the store.",
            stored,
        ),
        (
            "ncps_narinfo_count",
            "Number of narinfo objects currently in cache.",
            sum(samples, "nip_store_entries", &[("kind", "narinfo")]),
        ),
        (
            "ncps_nar_file_count",
            "Number of NAR file objects currently in cache.",
            sum(samples, "nip_store_entries", &[("kind", "nar")]),
        ),
        (
            "ncps_cache_max_size_bytes",
            "Configured maximum cache size in bytes.",
            max,
        ),
        (
            "ncps_cache_utilization_ratio",
            "Current cache size as a ratio of maximum size (0.0 to 1.0).",
            if max > 0.0 { stored / max } else { 0.0 },
        ),
        (
            "ncps_upstream_count_total",
            "Total number of configured upstream caches",
            state.upstreams.list().len() as f64,
        ),
        (
            "ncps_upstream_count_healthy",
            "Number of healthy upstream caches",
            healthy as f64,
        ),
    ];
    singles(out, "gauge", &gauges);
}

/// Metrics of one sample each: (name, help, value).
fn singles(out: &mut String, kind: &str, metrics: &[(&str, &str, f64)]) {
    use std::fmt::Write;
    for (name, help, v) in metrics {
        head(out, name, kind, help);
        let _ = writeln!(out, "{name} {}", number(*v));
    }
}

/// What eviction did.
fn ncps_lru_counters(out: &mut String, samples: &[Sample]) {
    let counters = [
        (
            "ncps_lru_cleanup_runs_total",
            "Total number of LRU cleanup executions.",
            sum(samples, "nip_eviction_runs_total", &[]),
        ),
        (
            "ncps_lru_narinfos_evicted_total",
            "Total number of narinfos evicted by LRU.",
            sum(samples, "nip_evictions_total", &[("kind", "narinfo")]),
        ),
        (
            "ncps_lru_nar_files_evicted_total",
            "Total number of NAR files evicted by LRU.",
            sum(samples, "nip_evictions_total", &[("kind", "nar")]),
        ),
        // nip stores whole NARs: no chunks.
        (
            "ncps_lru_chunks_evicted_total",
            "Total number of chunks evicted by LRU.",
            0.0,
        ),
        (
            "ncps_lru_bytes_freed_total",
            "Total bytes freed by LRU eviction.",
            sum(samples, "nip_evicted_bytes_total", &[]),
        ),
    ];
    singles(out, "counter", &counters);
}

/// Eviction and upstream fetch durations, from nip's histograms summed over their labels.
fn ncps_histograms(out: &mut String, samples: &[Sample]) {
    use std::fmt::Write;
    let histograms = [
        (
            "ncps_lru_cleanup_duration_seconds",
            "Duration of LRU cleanup operations.",
            "nip_eviction_duration_seconds",
            None,
        ),
        (
            "ncps_upstream_narinfo_fetch_duration_seconds",
            "Duration of narinfo fetches from upstream caches.",
            "nip_upstream_request_duration_seconds",
            Some(("kind", "narinfo")),
        ),
        (
            "ncps_upstream_nar_fetch_duration_seconds",
            "Duration of NAR fetches from upstream caches.",
            "nip_upstream_request_duration_seconds",
            Some(("kind", "nar")),
        ),
    ];
    for (name, help, nip_name, filter) in histograms {
        head(out, name, "histogram", help);
        let with: Vec<(&str, &str)> = filter.into_iter().collect();
        // Buckets summed over nip's label sets (e.g. every upstream), in `le` order.
        let mut buckets: Vec<(String, f64)> = Vec::new();
        let bucket_name = format!("{nip_name}_bucket");
        for s in samples
            .iter()
            .filter(|s| s.name == bucket_name && with.iter().all(|(k, v)| s.label(k) == Some(*v)))
        {
            let Some(le) = s.label("le") else { continue };
            match buckets.iter_mut().find(|(l, _)| l == le) {
                Some((_, n)) => *n += s.value,
                None => buckets.push((le.to_string(), s.value)),
            }
        }
        let bound = |le: &str| le.parse::<f64>().unwrap_or(f64::INFINITY);
        buckets.sort_by(|a, b| bound(&a.0).total_cmp(&bound(&b.0)));
        let count = sum(samples, &format!("{nip_name}_count"), &with);
        if buckets.last().is_none_or(|(le, _)| bound(le).is_finite()) {
            buckets.push(("+Inf".into(), count));
        }
        for (le, n) in buckets {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", number(n));
        }
        let total = sum(samples, &format!("{nip_name}_sum"), &with);
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {}",
            number(total),
            number(count)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_parsed_with_their_labels() {
        let text = "# TYPE x counter\nnip_cache_hits_total{kind=\"nar\"} 3\nnip_cache_hits_total{kind=\"narinfo\"} 4\n\
            nip_upstream_request_duration_seconds_bucket{upstream=\"http://a/\\\"x\",kind=\"nar\",le=\"0.5\"} 2\nnip_store_size_bytes 10\n";
        let s = parse_samples(text);
        assert_eq!(s.len(), 4);
        assert_eq!(sum(&s, "nip_cache_hits_total", &[("kind", "nar")]), 3.0);
        assert_eq!(sum(&s, "nip_cache_hits_total", &[]), 7.0);
        assert_eq!(s[2].label("upstream"), Some("http://a/\"x"));
        assert_eq!(s[2].label("le"), Some("0.5"));
        assert_eq!(sum(&s, "nip_store_size_bytes", &[]), 10.0);
    }

    #[test]
    fn method_labels_are_a_closed_set() {
        let made_up = axum::http::Method::from_bytes(b"ABCDEFGHIJ").unwrap();
        assert_eq!(method_label(&made_up), "other");
        assert_eq!(method_label(&axum::http::Method::GET), "GET");
        assert_eq!(method_label(&axum::http::Method::CONNECT), "other");
    }
}
