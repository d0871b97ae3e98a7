//! `frontend`: the OpenAI-compatible HTTP server (wiring only; see `tandem-frontend`).

use clap::Parser;
use std::sync::Arc;
use tandem_frontend::metrics::FrontendMetrics;
use tandem_frontend::models::{ModelManager, Routing};
use tandem_frontend::service::{AppState, router};
use tandem_kv_router::KvRouterArgs;
use tandem_runtime::{DistributedRuntime, RouterMode, RuntimeConfig};

#[derive(Parser, Debug)]
#[command(version, about = "tandem frontend")]
struct Cli {
    #[arg(long = "http-host", env = "DYN_HTTP_HOST", default_value = "0.0.0.0")]
    http_host: String,
    #[arg(long = "http-port", env = "DYN_HTTP_PORT", default_value_t = 8000)]
    http_port: u16,
    /// How requests are spread over workers: round-robin, random, or kv (to the worker with
    /// the most of the prompt cached, weighed against its load).
    #[arg(
        long = "router-mode",
        env = "DYN_ROUTER_MODE",
        default_value = "round-robin"
    )]
    router_mode: String,
    #[command(flatten)]
    kv_router: KvRouterArgs,
    #[command(flatten)]
    runtime: RuntimeConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = tandem_telemetry::init("frontend")?;
    let mut cli = Cli::parse();
    let routing = match cli.router_mode.as_str() {
        "kv" => Routing::Kv(Arc::new(cli.kv_router.clone())),
        other => Routing::Basic(other.parse::<RouterMode>()?),
    };
    if cli.runtime.system_port().is_some() {
        tracing::warn!(
            "DYN_SYSTEM_PORT is set but not used by the frontend: metrics are on the HTTP port"
        );
        cli.runtime.system_port = None;
    }
    let drt = DistributedRuntime::connect(cli.runtime.clone()).await?;
    let metrics = Arc::new(FrontendMetrics::new());
    let models = ModelManager::watch(&drt, metrics.clone(), routing);
    let app = router(AppState {
        models,
        metrics,
        runtime_registry: Some(drt.metrics().registry().clone()),
    });
    let listener = tokio::net::TcpListener::bind((cli.http_host.as_str(), cli.http_port)).await?;
    tracing::info!(addr = %listener.local_addr()?, "frontend listening");
    tandem_frontend::serve(listener, app, tandem_runtime::shutdown_signal()).await?;
    drt.shutdown().await;
    Ok(())
}
