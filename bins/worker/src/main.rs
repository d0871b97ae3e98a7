//! `worker`: loads a model's files, starts an engine and serves it (wiring only; the pieces
//! live in `tandem-worker`, `tandem-engine`, `tandem-mocker` and `tandem-runtime`).

/// mimalloc: the request path allocates per token (frames, JSON, SSE chunks); glibc malloc
/// was ~12 % of the frontend's CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use tandem_engine::{CandleArgs, CandleEngine};
use tandem_engine_api::{BatchingArgs, Engine};
use tandem_mocker::{MockEngine, MockerArgs};
use tandem_model::ModelFiles;
use tandem_runtime::{DistributedRuntime, EndpointId, RuntimeConfig};
use tandem_worker::{DisaggregationMode, KvTransferConfig, ServeConfig};

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
    #[arg(
        help_heading = "Model",
        long = "model-path",
        alias = "model",
        env = "DYN_MODEL_PATH"
    )]
    model_path: PathBuf,
    /// Hub revision when --model-path is a Hub id.
    #[arg(help_heading = "Model", long, default_value = "main")]
    revision: String,
    /// Name clients use in `model` (default: the model's own name).
    #[arg(
        help_heading = "Model",
        long = "model-name",
        alias = "served-model-name"
    )]
    model_name: Option<String>,
    /// Endpoint to serve (default dyn://{namespace}.backend.generate; a prefill worker's
    /// dyn://{namespace}.prefill.generate).
    #[arg(help_heading = "Routing and migration", long)]
    endpoint: Option<String>,
    #[arg(help_heading = "Engine", long, value_enum, default_value = "candle")]
    engine: EngineKind,
    /// Override the model's context length.
    #[arg(help_heading = "Model", long = "context-length", value_parser = clap::value_parser!(u32).range(2..))]
    context_length: Option<u32>,
    #[arg(
        help_heading = "Routing and migration",
        long = "migration-limit",
        default_value_t = 0
    )]
    migration_limit: u32,
    /// How the model marks its reasoning, so that the frontend returns it as
    /// `reasoning_content`: `basic` / `qwen3` (`<think>…</think>`), `deepseek_r1` (reasoning
    /// until `</think>`).
    #[arg(help_heading = "Model", long = "dyn-reasoning-parser", env = "DYN_REASONING_PARSER", value_parser = reasoning_parser)]
    reasoning_parser: Option<String>,
    /// How the model writes tool calls, so that the frontend returns them as `tool_calls`
    /// with `tool_choice: "auto"`: `hermes` / `qwen` (`<tool_call>` blocks), `llama3_json`,
    /// `mistral` (`[TOOL_CALLS]`).
    #[arg(help_heading = "Model", long = "dyn-tool-call-parser", env = "DYN_TOOL_CALL_PARSER", value_parser = tool_call_parser)]
    tool_call_parser: Option<String>,
    #[command(
        flatten,
        next_help_heading = "Runtime: NATS, etcd, system status, observability"
    )]
    runtime: RuntimeConfig,
    #[command(flatten, next_help_heading = "Engine")]
    batching: BatchingArgs,
    #[command(flatten, next_help_heading = "Engine")]
    candle: CandleArgs,
    /// vLLM's KV event publisher settings, e.g.
    /// '{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:20082","enable_kv_cache_events":true}':
    /// events then also go out on that ZMQ PUB socket in vLLM's format (they always go out on
    /// NATS for the KV router).
    #[arg(help_heading = "Routing and migration", long = "kv-events-config")]
    kv_events_config: Option<tandem_worker::kv_events::KvEventsConfig>,
    /// Prefill worker: computes prompts and their first token, holds the KV blocks for a
    /// decode worker to fetch, registers as `prefill` (same as --disaggregation-mode prefill).
    /// Both role flags at once is an error: a worker that does both is aggregated.
    #[arg(help_heading = "Disaggregation", 
        long = "is-prefill-worker",
        conflicts_with_all = ["disaggregation_mode", "is_decode_worker"]
    )]
    is_prefill_worker: bool,
    /// Decode worker: fetches prompt KV blocks from prefill workers; publishes no KV events
    /// (same as --disaggregation-mode decode).
    #[arg(
        help_heading = "Disaggregation",
        long = "is-decode-worker",
        conflicts_with = "disaggregation_mode"
    )]
    is_decode_worker: bool,
    /// Dynamo 1.x's name for the two flags above; default agg.
    #[arg(
        help_heading = "Disaggregation",
        long = "disaggregation-mode",
        value_enum
    )]
    disaggregation_mode: Option<DisaggregationMode>,
    /// Prefill workers: address the KV data plane binds and advertises to decode workers.
    #[arg(
        help_heading = "Disaggregation",
        long = "kv-transfer-host",
        env = "DYN_KV_TRANSFER_HOST",
        default_value = "127.0.0.1"
    )]
    kv_transfer_host: String,
    /// Prefill workers: KV data plane port (0: any free port).
    #[arg(
        help_heading = "Disaggregation",
        long = "kv-transfer-port",
        env = "DYN_KV_TRANSFER_PORT",
        default_value_t = 0
    )]
    kv_transfer_port: u16,
    /// Prefill workers: seconds held KV blocks wait for their decode worker before they are freed.
    #[arg(help_heading = "Disaggregation", long = "kv-transfer-timeout", default_value_t = 30.0, value_parser = secs_up_to_a_day)]
    kv_transfer_timeout: f64,
    /// Decode workers: most bytes of fetched prompt KV waiting to be written into the cache
    /// (queued requests hold theirs); a fetch beyond it prefills locally instead.
    #[arg(help_heading = "Disaggregation", long = "kv-transfer-max-buffered-bytes", default_value_t = tandem_worker::DEFAULT_MAX_BUFFERED_BYTES)]
    kv_transfer_max_buffered_bytes: u64,
    /// Send the engine a one-token canary generation when idle; `/health` reports the
    /// generate endpoint not ready while canaries fail.
    #[arg(help_heading = "Health", long = "health-check-enabled", env = "DYN_HEALTH_CHECK_ENABLED", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    health_check_enabled: bool,
    /// Idle seconds before a canary is sent.
    #[arg(help_heading = "Health", long = "canary-wait-time", env = "DYN_CANARY_WAIT_TIME", default_value_t = 10.0, value_parser = secs_up_to_a_day)]
    canary_wait_time: f64,
    /// Seconds a canary may take before the worker counts as not ready.
    #[arg(help_heading = "Health", long = "health-check-request-timeout", env = "DYN_HEALTH_CHECK_REQUEST_TIMEOUT", default_value_t = 3.0, value_parser = secs_up_to_a_day)]
    health_check_request_timeout: f64,
    /// Mocker only: KV bytes per token of the simulated model (sizes simulated transfers;
    /// default Llama-3-8B bf16).
    #[arg(help_heading = "Mocker engine (--engine mocker)", long = "kv-bytes-per-token", default_value_t = tandem_mocker::DEFAULT_KV_BYTES_PER_TOKEN)]
    kv_bytes_per_token: u64,
    /// Mocker only: simulated KV transfer bandwidth, bytes per second.
    #[arg(help_heading = "Mocker engine (--engine mocker)", long = "kv-transfer-bandwidth", default_value_t = tandem_mocker::DEFAULT_KV_TRANSFER_BANDWIDTH, value_parser = positive)]
    kv_transfer_bandwidth: f64,
    /// Mocker only: divides every simulated delay; 0 removes them.
    #[arg(help_heading = "Mocker engine (--engine mocker)", long = "speedup-ratio", default_value_t = 1.0, value_parser = non_negative)]
    speedup_ratio: f64,
    /// Mocker only: split a prompt longer than a step's token budget (--max-num-batched-tokens)
    /// over several steps, as Dynamo's mocker and vLLM do.
    #[arg(help_heading = "Mocker engine (--engine mocker)", long = "enable-chunked-prefill", default_value_t = true, action = clap::ArgAction::Set)]
    enable_chunked_prefill: bool,
    /// Mocker only: when a step's tokens are sent. after-step: when its simulated time has
    /// passed (a forward pass's tokens); after-prefill: when its prefill time has passed,
    /// before its decode pass's, as Dynamo 1.6.1's mocker does — for benchmarks beside it.
    #[arg(help_heading = "Mocker engine (--engine mocker)", long = "token-timing", value_enum, default_value_t = tandem_mocker::TokenTiming::AfterStep)]
    token_timing: tandem_mocker::TokenTiming,
    /// Mocker only, for testing failure paths: a step fails (as a forward pass can) once a
    /// sequence in it has generated this many tokens.
    #[arg(
        help_heading = "Mocker engine (--engine mocker)",
        long = "fail-after-tokens"
    )]
    fail_after_tokens: Option<u32>,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number > 0")),
        Err(e) => Err(e.to_string()),
    }
}

/// Seconds: more than 0, at most a day.
fn secs_up_to_a_day(s: &str) -> Result<f64, String> {
    match positive(s)? {
        v if v <= 86_400.0 => Ok(v),
        v => Err(format!("{v} is more than a day (86400 s)")),
    }
}

impl Cli {
    /// The worker's role from whichever flag names it (clap refuses two at once).
    fn mode(&self) -> DisaggregationMode {
        match (self.is_prefill_worker, self.is_decode_worker) {
            (true, _) => DisaggregationMode::Prefill,
            (_, true) => DisaggregationMode::Decode,
            _ => self.disaggregation_mode.unwrap_or_default(),
        }
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number >= 0")),
        Err(e) => Err(e.to_string()),
    }
}

/// Flags only the mocker reads, and flags only the candle engine reads (clap ids).
const MOCKER_ONLY: &[&str] = &[
    "speedup_ratio",
    "fail_after_tokens",
    "kv_bytes_per_token",
    "kv_transfer_bandwidth",
    "enable_chunked_prefill",
    "token_timing",
];
const CANDLE_ONLY: &[&str] = &[
    "device",
    "dtype",
    "kv_cache_memory_fraction",
    "attention_backend",
    "cpu_kernels",
];

/// A flag given on the command line for the engine that does not read it would be silently
/// ignored: refuse it at start-up, naming it.
fn check_engine_flags(matches: &ArgMatches, engine: EngineKind) -> anyhow::Result<()> {
    let (ignored, reader) = match engine {
        EngineKind::Candle => (MOCKER_ONLY, "mocker"),
        EngineKind::Mocker => (CANDLE_ONLY, "candle"),
    };
    let command = Cli::command();
    for id in ignored {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            let flag = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_long())
                .unwrap_or(id);
            anyhow::bail!("--{flag} applies to --engine {reader} only");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    pin_cpu_thread_count();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

/// candle sizes its CPU matmuls from `RAYON_NUM_THREADS` and, when it is unset, counts the
/// physical cores by parsing `/proc/cpuinfo` — on every matmul (≈ 10 % of a single-stream
/// decode step here). Setting it once, to what rayon would pick anyway, removes that.
fn pin_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        #[allow(unsafe_code)]
        // SAFETY: called first thing in `main`, before the runtime or any other thread exists,
        // so nothing can read the environment concurrently.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string())
        };
    }
}

async fn serve() -> anyhow::Result<()> {
    let _telemetry = tandem_telemetry::init("worker")?;
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    check_engine_flags(&matches, cli.engine)?;
    let mode = cli.mode();
    let path = match cli.model_path.to_str() {
        Some(id) if !cli.model_path.exists() && tandem_model::hub::is_hub_id(id) => {
            tandem_model::hub::Hub::from_env()?
                .fetch(id, &cli.revision)
                .await?
        }
        _ => cli.model_path.clone(),
    };
    let model = ModelFiles::load(&path)?;
    let endpoint: EndpointId = match &cli.endpoint {
        Some(e) => e.parse()?,
        None if mode == DisaggregationMode::Prefill => {
            EndpointId::new(&cli.runtime.namespace, "prefill", "generate")?
        }
        None => EndpointId::new(&cli.runtime.namespace, "backend", "generate")?,
    };
    let context_length = cli.context_length.unwrap_or(model.context_length);
    let engine: Arc<dyn Engine> = match cli.engine {
        EngineKind::Mocker => {
            let mut args = MockerArgs::new(&cli.batching, cli.speedup_ratio);
            args.fail_after_tokens = cli.fail_after_tokens;
            args.kv_bytes_per_token = cli.kv_bytes_per_token;
            args.kv_transfer_bandwidth = cli.kv_transfer_bandwidth;
            args.enable_chunked_prefill = cli.enable_chunked_prefill;
            args.token_timing = cli.token_timing;
            MockEngine::start(args, model.tokenizer.get_vocab_size(true) as u32)
        }
        EngineKind::Candle => {
            let (weights, candle, batching) = (
                model.weights.clone(),
                cli.candle.clone(),
                cli.batching.clone(),
            );
            let guides = Arc::new(tandem_engine::Guides::new(
                model.tokenizer.clone(),
                model.prompt.eos_token_ids.clone(),
            ));
            tokio::task::spawn_blocking(move || {
                // Built with the engine, not inside the first structured request.
                if let Err(e) = guides.warm() {
                    tracing::warn!(error = %e, "structured output will be refused");
                }
                CandleEngine::start_with(
                    &weights,
                    &candle,
                    &batching,
                    context_length as usize,
                    Some(guides),
                )
            })
            .await??
        }
    };
    // Before the worker registers: a SIGTERM from then on shuts it down cleanly.
    let stop = tandem_runtime::shutdown_signal();
    let drt = DistributedRuntime::connect(cli.runtime.clone()).await?;
    let config = ServeConfig {
        endpoint,
        model_name: cli.model_name.clone().unwrap_or_else(|| model.name.clone()),
        context_length,
        migration_limit: cli.migration_limit,
        reasoning_parser: cli.reasoning_parser.clone(),
        tool_call_parser: cli.tool_call_parser.clone(),
        publish_kv_events: mode != DisaggregationMode::Decode,
        kv_events_config: cli.kv_events_config.clone(),
        mode,
        kv_transfer: KvTransferConfig {
            host: cli.kv_transfer_host.clone(),
            port: cli.kv_transfer_port,
            hold_timeout: std::time::Duration::from_secs_f64(cli.kv_transfer_timeout),
            max_buffered_bytes: cli.kv_transfer_max_buffered_bytes,
        },
        canary: cli
            .health_check_enabled
            .then(|| tandem_worker::canary::CanaryConfig {
                wait: std::time::Duration::from_secs_f64(cli.canary_wait_time),
                timeout: std::time::Duration::from_secs_f64(cli.health_check_request_timeout),
            }),
    };
    tandem_worker::serve(&drt, engine, &model, config).await?;
    stop.await;
    tracing::info!("shutting down");
    drt.shutdown().await;
    Ok(())
}

/// Checks a `--dyn-tool-call-parser` name at start-up.
fn tool_call_parser(name: &str) -> Result<String, String> {
    name.parse::<tandem_preprocessor::tools::ToolCallParser>()
        .map(|_| name.to_string())
}

/// Checks a `--dyn-reasoning-parser` name at start-up.
fn reasoning_parser(name: &str) -> Result<String, String> {
    name.parse::<tandem_preprocessor::reasoning::ReasoningParser>()
        .map(|_| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str]) -> anyhow::Result<()> {
        let argv = ["worker", "--model-path", "m.gguf"].iter().chain(args);
        let matches = Cli::command().try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        check_engine_flags(&matches, cli.engine)
    }

    #[test]
    fn a_flag_for_the_other_engine_is_refused_by_name() {
        for id in MOCKER_ONLY.iter().chain(CANDLE_ONLY) {
            assert!(
                Cli::command().get_arguments().any(|a| a.get_id() == id),
                "{id} is no flag of the worker"
            );
        }
        check(&[
            "--engine",
            "mocker",
            "--speedup-ratio",
            "2",
            "--token-timing",
            "after-prefill",
        ])
        .unwrap();
        check(&["--dtype", "f32", "--device", "cpu"]).unwrap();
        let err = check(&["--speedup-ratio", "2"]).unwrap_err().to_string();
        assert_eq!(err, "--speedup-ratio applies to --engine mocker only");
        let err = check(&["--engine", "mocker", "--dtype", "f32"])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--dtype applies to --engine candle only");
        // Shared flags are for both.
        check(&["--engine", "mocker", "--max-num-batched-tokens", "512"]).unwrap();
    }
}
