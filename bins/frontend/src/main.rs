//! `frontend`: the OpenAI-compatible HTTP server (wiring only; see `tandem-frontend`).

/// mimalloc: the request path allocates per token (frames, JSON, SSE chunks); glibc malloc
/// was ~12 % of the frontend's CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use std::sync::Arc;
use tandem_frontend::admission::Admission;
use tandem_frontend::config::FrontendArgs;
use tandem_frontend::http::{Access, AppState, router};
use tandem_frontend::metrics::FrontendMetrics;
use tandem_frontend::models::ModelManager;
use tandem_runtime::{DistributedRuntime, RuntimeConfig};

#[derive(Parser, Debug)]
#[command(version, about = "tandem frontend")]
struct Cli {
    #[command(flatten)]
    frontend: FrontendArgs,
    #[command(
        flatten,
        next_help_heading = "Runtime: NATS, etcd, system status, observability"
    )]
    runtime: RuntimeConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = tandem_telemetry::init("frontend")?;
    let mut cli = Cli::parse();
    if cli.runtime.system_port().is_some() {
        tracing::warn!(
            "DYN_SYSTEM_PORT is set but not used by the frontend: metrics are on the HTTP port"
        );
        cli.runtime.system_port = None;
    }
    let drt = DistributedRuntime::connect(cli.runtime.clone()).await?;
    let metrics = Arc::new(FrontendMetrics::new());
    let models = ModelManager::watch(
        &drt,
        metrics.clone(),
        cli.frontend.routing(),
        cli.frontend.exec_policy(),
    );
    let app = router(
        AppState {
            models,
            metrics,
            runtime_registry: Some(drt.metrics().registry().clone()),
            admission: Arc::new(Admission::new(cli.frontend.admission())),
        },
        Access {
            api_key: cli.frontend.api_key.clone(),
            protect_metrics: cli.frontend.protect_metrics,
        },
    );
    let f = &cli.frontend;
    let listener = tokio::net::TcpListener::bind((f.http_host.as_str(), f.http_port)).await?;
    tracing::info!(addr = %listener.local_addr()?, "frontend listening");
    tandem_frontend::serve(listener, app, tandem_runtime::shutdown_signal()).await?;
    drt.shutdown().await;
    Ok(())
}
