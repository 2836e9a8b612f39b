//! Logging and, with `--otel-enabled`, OpenTelemetry: the `tracing` subscriber of `nip serve`.
//!
//! Log lines always go to stderr (text or JSON). With OpenTelemetry on, two more layers sit beside
//! that one: spans become OTel spans (tracing-opentelemetry) and events become OTel log records
//! (opentelemetry-appender-tracing). Both are exported in batches by background threads, OTLP over
//! gRPC to `--otel-grpc-url` or, without a URL, to stdout as ncps does. A slow or unreachable
//! collector costs requests nothing: the batch queues drop what they cannot hold, and the SDK logs
//! the failed exports (target `opentelemetry_sdk`) on stderr.
use std::time::Duration;

use nip_server::config::{redact_userinfo, OtelConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// What a graceful shutdown flushes.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    logger: Option<SdkLoggerProvider>,
}

/// Crates whose events and spans never become OTel data: the exporter's own HTTP/2 stack and
/// the SDK's internal logs would otherwise feed back into themselves.
const NOT_EXPORTED: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry-otlp",
    "opentelemetry_otlp",
    "tonic",
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "reqwest",
];

fn stderr_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(format!(
        "{level},hyper=warn,sqlx=warn,reqwest=warn,h2=warn,tonic=warn"
    ))
    .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// As on stderr (no per-query sqlx events), plus the per-request spans whatever the level, and
/// nothing of the exporter's own stack.
fn otel_directives(level: &str) -> String {
    let offs: Vec<String> = NOT_EXPORTED.iter().map(|t| format!("{t}=off")).collect();
    format!(
        "{level},sqlx=warn,{}=debug,{}",
        nip_server::metrics::REQUEST_SPANS,
        offs.join(",")
    )
}

fn otel_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(otel_directives(level))
        .unwrap_or_else(|_| EnvFilter::new(otel_directives("info")))
}

/// `service.name` from OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES, else "nip"; plus the
/// version and whatever else OTEL_RESOURCE_ATTRIBUTES names.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::new("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named {
        builder.build()
    } else {
        builder.with_service_name("nip").build()
    }
}

/// Builds the exporting providers. Must run inside the tokio runtime: the gRPC channel's
/// background tasks are spawned on it.
fn providers(config: &OtelConfig) -> anyhow::Result<(SdkTracerProvider, SdkLoggerProvider)> {
    let resource = resource();
    let mut tracer = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut logger = SdkLoggerProvider::builder().with_resource(resource);
    match &config.grpc_url {
        Some(url) => {
            let shown = redact_userinfo(url);
            // OTEL_EXPORTER_OTLP_TIMEOUT / _HEADERS / _COMPRESSION are read by the exporter.
            let tls = url.starts_with("https://").then(|| {
                opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                    .with_webpki_roots()
            });
            let mut spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone());
            let mut logs = opentelemetry_otlp::LogExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone());
            if let Some(tls) = tls {
                spans = spans.with_tls_config(tls.clone());
                logs = logs.with_tls_config(tls);
            }
            // The exporter's own error may quote the URL: it is masked there too.
            let masked = |e: &dyn std::fmt::Display| {
                anyhow::anyhow!(
                    "--otel-grpc-url {shown}: {}",
                    e.to_string().replace(url.as_str(), &shown)
                )
            };
            let spans = spans.build().map_err(|e| masked(&e))?;
            let logs = logs.build().map_err(|e| masked(&e))?;
            tracer = tracer.with_batch_exporter(spans);
            logger = logger.with_batch_exporter(logs);
        }
        None => {
            tracer = tracer.with_batch_exporter(opentelemetry_stdout::SpanExporter::default());
            logger = logger.with_batch_exporter(opentelemetry_stdout::LogExporter::default());
        }
    }
    Ok((tracer.build(), logger.build()))
}

/// Installs the global subscriber. With OpenTelemetry, call it inside the tokio runtime.
pub fn init(level: &str, format: &str, otel: Option<&OtelConfig>) -> anyhow::Result<Telemetry> {
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Some(otel) = otel else {
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        // One global filter when stderr is the only output: a per-layer filter lost the events
        // of the whole start-up after connecting to PostgreSQL at --log-level debug.
        let registry = tracing_subscriber::registry().with(stderr_filter(level));
        if format == "json" {
            registry.with(fmt.json()).init();
        } else {
            registry.with(fmt).init();
        }
        return Ok(Telemetry {
            tracer: None,
            logger: None,
        });
    };
    let otel = Some(otel);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().with_filter(stderr_filter(level)).boxed()
    } else {
        fmt.with_filter(stderr_filter(level)).boxed()
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![fmt];
    let mut telemetry = Telemetry {
        tracer: None,
        logger: None,
    };
    if let Some(config) = otel {
        let (tracer, logger) = providers(config)?;
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer.tracer("nip"))
                .with_filter(otel_filter(level))
                .boxed(),
        );
        layers.push(
            opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&logger)
                .with_filter(otel_filter(level))
                .boxed(),
        );
        nip_server::metrics::enable_otel_span_fields();
        telemetry.tracer = Some(tracer);
        telemetry.logger = Some(logger);
    }
    tracing_subscriber::registry().with(layers).init();
    if let Some(config) = otel {
        match &config.grpc_url {
            Some(url) => {
                tracing::info!(url = %redact_userinfo(url), "OpenTelemetry: traces and logs go to the OTLP gRPC collector")
            }
            None => {
                tracing::info!("OpenTelemetry: traces and logs go to stdout (no --otel-grpc-url)")
            }
        }
    }
    Ok(telemetry)
}

impl Telemetry {
    pub fn is_exporting(&self) -> bool {
        self.tracer.is_some()
    }

    /// Exports what is still queued and stops the exporters; waits at most a few seconds for a
    /// collector that does not answer. Call it while the tokio runtime still runs.
    pub fn shutdown(self) {
        const WAIT: Duration = Duration::from_secs(5);
        if let Some(t) = self.tracer {
            if let Err(e) = t.shutdown_with_timeout(WAIT) {
                tracing::warn!(error = %e, "OpenTelemetry: the last spans were not exported");
            }
        }
        if let Some(l) = self.logger {
            if let Err(e) = l.shutdown_with_timeout(WAIT) {
                tracing::warn!(error = %e, "OpenTelemetry: the last log records were not exported");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_for_every_level() {
        for level in ["error", "warn", "info", "debug", "trace"] {
            EnvFilter::try_new(otel_directives(level)).unwrap();
        }
    }
}
