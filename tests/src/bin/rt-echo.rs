//! Test program for the runtime: `serve` an endpoint whose handler streams numbered frames,
//! or `call` one and print each frame. The integration tests run it as a real process to kill
//! it, restart the servers under it, and scrape its system status server.

use clap::{Parser, Subcommand};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::time::Duration;
use tandem_runtime::{
    DistributedRuntime, EndpointId, RemoteError, RequestContext, RuntimeConfig, TypedHandlerStream,
};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    runtime: RuntimeConfig,
    #[arg(long, default_value = "dyn://test.echo.generate")]
    endpoint: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve the endpoint until SIGTERM.
    Serve {
        /// Wait this long after connecting before serving (to observe /health going 503 → 200).
        #[arg(long, env = "RT_ECHO_SERVE_AFTER_MS", default_value_t = 0)]
        serve_after_ms: u64,
    },
    /// Send one request and print each frame as a line.
    Call {
        #[arg(long, default_value_t = 10)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
}

/// What the echo handler is asked to stream.
#[derive(Serialize, Deserialize)]
struct EchoRequest {
    count: u64,
    #[serde(default)]
    delay_ms: u64,
    /// Bytes of padding in each frame (to test payload limits).
    #[serde(default)]
    pad: usize,
}

#[derive(Serialize, Deserialize)]
struct EchoFrame {
    i: u64,
    instance: String,
    pad: String,
}

async fn echo(
    req: EchoRequest,
    _ctx: RequestContext,
    instance: String,
) -> Result<TypedHandlerStream<EchoFrame>, RemoteError> {
    let pad = "x".repeat(req.pad);
    let stream = futures::stream::iter(0..req.count).then(move |i| {
        let (instance, pad) = (instance.clone(), pad.clone());
        async move {
            if req.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(req.delay_ms)).await;
            }
            Ok(EchoFrame { i, instance, pad })
        }
    });
    Ok(stream.boxed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _log = tandem_telemetry::init("rt-echo")?;
    let cli = Cli::parse();
    let id: EndpointId = cli.endpoint.parse()?;
    let drt = DistributedRuntime::connect(cli.runtime).await?;
    match cli.mode {
        Mode::Serve { serve_after_ms } => {
            if serve_after_ms > 0 {
                tokio::time::sleep(Duration::from_millis(serve_after_ms)).await;
            }
            let stop = tandem_runtime::shutdown_signal();
            let instance = format!("{:x}", drt.instance_id());
            drt.endpoint(id)
                .serve_typed(move |req, ctx| echo(req, ctx, instance.clone()))
                .await?;
            stop.await;
            drt.shutdown().await;
        }
        Mode::Call { count, delay_ms } => {
            let client = drt.endpoint(id).client();
            client.wait_for_instances(Duration::from_secs(10)).await?;
            let body = serde_json::to_vec(&EchoRequest {
                count,
                delay_ms,
                pad: 0,
            })?;
            let mut stream = client.round_robin(body.into(), Default::default()).await?;
            let mut out = std::io::stdout();
            while let Some(frame) = stream.next().await {
                let frame: EchoFrame = serde_json::from_slice(&frame?)?;
                writeln!(out, "frame {} from {}", frame.i, frame.instance)?;
                out.flush()?;
            }
            writeln!(out, "done")?;
        }
    }
    Ok(())
}
