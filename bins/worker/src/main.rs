//! `worker`: loads a model's files, starts an engine and serves it (wiring only; the pieces
//! live in `tandem-worker`, `tandem-engine`, `tandem-mocker` and `tandem-runtime`).

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use tandem_engine::{CandleArgs, CandleEngine};
use tandem_engine_api::{BatchingArgs, Engine};
use tandem_mocker::{MockEngine, MockerArgs};
use tandem_model::ModelFiles;
use tandem_runtime::{DistributedRuntime, EndpointId, RuntimeConfig};
use tandem_worker::ServeConfig;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineKind {
    /// The real model on candle: paged KV cache, continuous batching, prefix cache.
    Candle,
    /// Simulated timing over real KV-block accounting (Dynamo's mocker).
    Mocker,
}

#[derive(Parser, Debug)]
#[command(version, about = "tandem worker")]
struct Cli {
    /// A .gguf file, an HF-style model directory, or a Hub id (org/name) to download.
    #[arg(long = "model-path", alias = "model", env = "DYN_MODEL_PATH")]
    model_path: PathBuf,
    /// Hub revision when --model-path is a Hub id.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Name clients use in `model` (default: the model's own name).
    #[arg(long = "model-name", alias = "served-model-name")]
    model_name: Option<String>,
    /// Endpoint to serve (default dyn://{namespace}.backend.generate).
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long, value_enum, default_value = "candle")]
    engine: EngineKind,
    /// Override the model's context length.
    #[arg(long = "context-length", value_parser = clap::value_parser!(u32).range(2..))]
    context_length: Option<u32>,
    #[arg(long = "migration-limit", default_value_t = 0)]
    migration_limit: u32,
    #[command(flatten)]
    runtime: RuntimeConfig,
    #[command(flatten)]
    batching: BatchingArgs,
    #[command(flatten)]
    candle: CandleArgs,
    /// vLLM's KV event publisher settings, e.g.
    /// '{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:20082","enable_kv_cache_events":true}':
    /// events then also go out on that ZMQ PUB socket in vLLM's format (they always go out on
    /// NATS for the KV router).
    #[arg(long = "kv-events-config")]
    kv_events_config: Option<tandem_worker::kv_events::KvEventsConfig>,
    /// This worker only decodes: it publishes no KV events. (Disaggregated prefill/decode
    /// itself is not implemented yet; the flag only affects event publishing.)
    #[arg(long = "is-decode-worker")]
    is_decode_worker: bool,
    /// Mocker only: divides every simulated delay; 0 removes them.
    #[arg(long = "speedup-ratio", default_value_t = 1.0, value_parser = non_negative)]
    speedup_ratio: f64,
    /// Mocker only, for testing failure paths: a step fails (as a forward pass can) once a
    /// sequence in it has generated this many tokens.
    #[arg(long = "fail-after-tokens")]
    fail_after_tokens: Option<u32>,
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number >= 0")),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = tandem_telemetry::init("worker")?;
    let cli = Cli::parse();
    let path = match cli.model_path.to_str() {
        Some(id) if !cli.model_path.exists() && tandem_model::hub::is_hub_id(id) => {
            tandem_model::hub::Hub::from_env()
                .fetch(id, &cli.revision)
                .await?
        }
        _ => cli.model_path.clone(),
    };
    let model = ModelFiles::load(&path)?;
    let endpoint: EndpointId = match &cli.endpoint {
        Some(e) => e.parse()?,
        None => EndpointId::new(&cli.runtime.namespace, "backend", "generate")?,
    };
    let context_length = cli.context_length.unwrap_or(model.context_length);
    let engine: Arc<dyn Engine> = match cli.engine {
        EngineKind::Mocker => {
            let mut args = MockerArgs::new(&cli.batching, cli.speedup_ratio);
            args.fail_after_tokens = cli.fail_after_tokens;
            MockEngine::start(args, model.tokenizer.get_vocab_size(true) as u32)
        }
        EngineKind::Candle => {
            let (weights, candle, batching) = (
                model.weights.clone(),
                cli.candle.clone(),
                cli.batching.clone(),
            );
            tokio::task::spawn_blocking(move || {
                CandleEngine::start(&weights, &candle, &batching, context_length as usize)
            })
            .await??
        }
    };
    let drt = DistributedRuntime::connect(cli.runtime.clone()).await?;
    let config = ServeConfig {
        endpoint,
        model_name: cli.model_name.clone().unwrap_or_else(|| model.name.clone()),
        context_length,
        migration_limit: cli.migration_limit,
        publish_kv_events: !cli.is_decode_worker,
        kv_events_config: cli.kv_events_config.clone(),
    };
    tandem_worker::serve(&drt, engine, &model, config).await?;
    tandem_runtime::shutdown_signal().await;
    tracing::info!("shutting down");
    drt.shutdown().await;
    Ok(())
}
