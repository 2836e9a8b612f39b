//! `nip serve`: its flags are generated from the settings table (see [`crate::config_load`]), so
//! every flag, environment variable and config key of ncps is accepted under the same name.
use anyhow::Context;
use clap::Args;

use crate::config_load::{load_config, ServerSettings};

// `///` comments on the fields are their `--help` text.
#[derive(Args)]
pub struct ServeArgs {
    /// Print the effective configuration as JSON (secrets masked) and exit
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: ServerSettings,
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args.settings)?;
    if args.print_config {
        let json = serde_json::to_string_pretty(&config.print_json()).unwrap_or_default();
        println!("{json}");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Inside the runtime: the OTLP exporter's gRPC channel runs on it.
    let telemetry = {
        let _entered = rt.enter();
        crate::telemetry::init(&config.log_level, &config.log_format, config.otel.as_ref())?
    };
    for (flag, reason) in &config.ignored {
        tracing::warn!("{flag} is ignored because {reason}");
    }
    // A bad certificate or key is an error now, before storage is opened or the port bound.
    if let Some(files) = &config.tls {
        nip_server::tls::load(files)?;
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let result = rt.block_on(async move {
        let addr = config.listen_addr();
        let state = nip_server::AppState::open(config).await?;
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--server-addr)"))?;
        tracing::info!(addr = %listener.local_addr()?, scheme, public_key = %state.public_key(), "nip serve listening");
        nip_server::serve(listener, state, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok::<_, anyhow::Error>(())
    });
    // main prints the error on stderr; the collector gets it as a log record too.
    if let (Err(e), true) = (&result, telemetry.is_exporting()) {
        tracing::error!("{e:#}");
    }
    // The last spans and log records, exported while the runtime still drives the gRPC channel.
    telemetry.shutdown();
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
