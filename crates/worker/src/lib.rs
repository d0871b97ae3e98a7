//! What every worker does, whatever its engine.
//!
//! [`serve`] puts an [`Engine`] behind two runtime endpoints of one component:
//! - `generate`: a [`PreprocessedRequest`] in, a stream of [`EngineOutput`]s out (typed on the
//!   request plane). Engine errors leave as their class ([`engine_error`]): a prompt over the
//!   context is `context_length`, a bad request `invalid_request`, a failed step `internal`.
//!   Dropping the engine's stream is how a request is cancelled; the runtime does that when the
//!   caller cancels or disappears. A [`GenerateControl::StopChoice`] from the caller ends one
//!   choice (the frontend's stop strings, which the engine cannot see).
//! - `tokenizer`: the model's `tokenizer.json`, in chunks, so that a frontend on another
//!   machine can tokenize for this model.
//!
//! It publishes the engine's KV block events for routers ([`kv_events`]), then writes the
//! model card to etcd under the process's lease and mirrors the engine's statistics into
//! metrics on the system status server ([`metrics`]).
//!
//! Its [`DisaggregationMode`] decides what `generate` does ([`disagg`]): a prefill worker
//! runs prefill legs and serves the held blocks on its KV data plane (advertised in the
//! card); decode and aggregated workers run decode legs, fetching a request's prompt blocks
//! when it carries a prefill result.

pub mod canary;
pub mod disagg;
pub mod kv_events;
mod metrics;
pub mod request_log;

pub use disagg::DisaggregationMode;
pub use metrics::TransferMetrics;

use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tandem_engine_api::{ChoiceStopper, Engine, EngineError, EngineStream};
use tandem_model::ModelFiles;
use tandem_protocols::card::{MDC_ROOT, ModelDeploymentCard, ModelEntry, slugify};
use tandem_protocols::disagg::{RELEASE_ENDPOINT, ReleaseRequest};
use tandem_protocols::llm::{EngineOutput, GenerateControl, PreprocessedRequest};
use tandem_runtime::{
    DistributedRuntime, EndpointId, ErrorCode, RemoteError, RequestContext, RuntimeError,
    TypedHandlerStream,
};

/// How the worker presents its model.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The generate endpoint; `tokenizer` is served beside it in the same component.
    pub endpoint: EndpointId,
    pub model_name: String,
    pub context_length: u32,
    pub migration_limit: u32,
    /// `--dyn-reasoning-parser`, validated by the binary, published in the card.
    pub reasoning_parser: Option<String>,
    /// `--dyn-tool-call-parser`, validated by the binary, published in the card.
    pub tool_call_parser: Option<String>,
    /// Publish KV block events (off for decode-only workers).
    pub publish_kv_events: bool,
    /// vLLM's `--kv-events-config`: also publish over ZMQ.
    pub kv_events_config: Option<kv_events::KvEventsConfig>,
    pub mode: DisaggregationMode,
    pub kv_transfer: KvTransferConfig,
    /// Canary health checks while idle (`DYN_HEALTH_CHECK_ENABLED`).
    pub canary: Option<canary::CanaryConfig>,
}

/// Default of [`KvTransferConfig::max_buffered_bytes`]: 4 GiB.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 4 << 30;

/// A worker's KV data plane.
#[derive(Debug, Clone)]
pub struct KvTransferConfig {
    /// Address to bind and to advertise to decode workers.
    pub host: String,
    /// 0: any free port.
    pub port: u16,
    /// How long held blocks wait for their decode worker before they are freed.
    pub hold_timeout: Duration,
    /// Decode side: most KV bytes fetched and not yet written into the engine's pool.
    pub max_buffered_bytes: u64,
}

impl Default for KvTransferConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            hold_timeout: Duration::from_secs(30),
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
        }
    }
}

/// Size of one tokenizer chunk: well under NATS' default 1 MiB max payload.
const TOKENIZER_CHUNK: usize = 256 * 1024;

pub async fn serve(
    drt: &DistributedRuntime,
    engine: Arc<dyn Engine>,
    model: &ModelFiles,
    config: ServeConfig,
) -> Result<(), WorkerError> {
    let tokenizer_json = Bytes::from(
        model
            .tokenizer_json()
            .map_err(|e| WorkerError::Model(e.to_string()))?,
    );
    let checksum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&tokenizer_json));
    let tokenizer_ep = EndpointId::new(
        &config.endpoint.namespace,
        &config.endpoint.component,
        "tokenizer",
    )?;

    metrics::register_engine_metrics(drt, &config.endpoint, &config.model_name, engine.clone());

    let files = tokenizer_json.clone();
    drt.endpoint(tokenizer_ep.clone())
        .serve(move |_body: Bytes, _ctx: RequestContext| {
            let files = files.clone();
            async move {
                let chunks: Vec<Result<Bytes, RemoteError>> = (0..files.len())
                    .step_by(TOKENIZER_CHUNK)
                    .map(|at| Ok(files.slice(at..(at + TOKENIZER_CHUNK).min(files.len()))))
                    .collect();
                Ok(futures::stream::iter(chunks).boxed())
            }
        })
        .await?;

    let transfer_metrics = TransferMetrics::new(&config.endpoint)?;
    transfer_metrics.register(drt.metrics().registry());
    let prefill_side = match config.mode {
        DisaggregationMode::Prefill => {
            Some(start_prefill_side(drt, &engine, &config, &transfer_metrics).await?)
        }
        _ => None,
    };
    let activity = Arc::new(canary::Activity::default());
    if let Some(c) = config.canary {
        canary::spawn(
            engine.clone(),
            drt.health().clone(),
            config.endpoint.name.clone(),
            activity.clone(),
            c,
            drt.shutdown_token(),
        );
    }
    let handler = Arc::new(Generate {
        activity,
        engine: engine.clone(),
        side: prefill_side.clone(),
        metrics: transfer_metrics,
        budget: disagg::FetchBudget::new(config.kv_transfer.max_buffered_bytes),
        endpoint: config.endpoint.to_string(),
        context_length: config.context_length as usize,
    });
    drt.endpoint(config.endpoint.clone())
        .serve_typed(move |request: PreprocessedRequest, ctx: RequestContext| {
            let handler = handler.clone();
            async move { handler.handle(request, ctx).await }
        })
        .await?;

    if let Some(side) = &prefill_side {
        serve_release(drt, &config.endpoint, side.clone()).await?;
    }

    let kv_events_zmq = if config.publish_kv_events {
        kv_events::start(
            drt,
            &engine,
            &config.endpoint,
            config.kv_events_config.as_ref(),
        )
        .await?
    } else {
        None
    };
    let mut runtime_config = engine.runtime_config();
    runtime_config.kv_events_zmq = kv_events_zmq;
    runtime_config.reasoning_parser = config.reasoning_parser.clone();
    runtime_config.tool_call_parser = config.tool_call_parser.clone();
    runtime_config.disaggregated_endpoint = prefill_side.as_ref().map(|s| s.endpoint.clone());
    let model_type = match config.mode {
        DisaggregationMode::Prefill => vec!["prefill".into()],
        _ => vec!["chat".into(), "completions".into()],
    };

    let card = ModelDeploymentCard {
        display_name: config.model_name.clone(),
        slug: slugify(&config.model_name),
        context_length: config.context_length,
        kv_cache_block_size: engine.block_size(),
        migration_limit: config.migration_limit,
        model_type,
        runtime_config,
        prompt: model.prompt.clone(),
        tokenizer_endpoint: tokenizer_ep.to_string(),
        tokenizer_checksum: checksum,
    };
    let id = drt.instance_id();
    let ep = &config.endpoint;
    let entry = ModelEntry {
        kind: "Model".into(),
        namespace: ep.namespace.clone(),
        component: ep.component.clone(),
        endpoint: ep.name.clone(),
        instance_id: id,
        card_json: card,
    };
    let key = format!(
        "{MDC_ROOT}/{}/{}/{}/{id:x}",
        ep.namespace, ep.component, ep.name
    );
    drt.discovery()
        .register(
            &key,
            serde_json::to_vec(&entry).map_err(RuntimeError::from)?,
        )
        .await?;
    tracing::info!(model = %config.model_name, endpoint = %ep, mode = ?config.mode, "model registered");
    Ok(())
}

/// Serves `kv_release` beside a prefill worker's `generate`: the frontend frees a transfer
/// whose decode leg could not start (no decode worker answered, the client left between legs).
async fn serve_release(
    drt: &DistributedRuntime,
    generate: &EndpointId,
    side: Arc<disagg::PrefillSide>,
) -> Result<(), WorkerError> {
    let ep = EndpointId::new(&generate.namespace, &generate.component, RELEASE_ENDPOINT)?;
    drt.endpoint(ep)
        .serve_typed(move |request: ReleaseRequest, _ctx: RequestContext| {
            let released = side.holds.release(request.transfer_id);
            tracing::debug!(
                transfer_id = request.transfer_id,
                released,
                "release requested"
            );
            async move { Ok(futures::stream::iter([Ok(released)]).boxed()) }
        })
        .await?;
    Ok(())
}

/// Starts a prefill worker's hold book-keeping and KV data plane.
async fn start_prefill_side(
    drt: &DistributedRuntime,
    engine: &Arc<dyn Engine>,
    config: &ServeConfig,
    metrics: &TransferMetrics,
) -> Result<Arc<disagg::PrefillSide>, WorkerError> {
    let kv = &config.kv_transfer;
    let transfer = engine.kv_transfer();
    let holds = disagg::holds::Holds::new(transfer.clone(), kv.hold_timeout, metrics.clone());
    let endpoint = disagg::data_plane::start(
        &kv.host,
        kv.port,
        transfer,
        holds.clone(),
        metrics.clone(),
        drt.shutdown_token(),
    )
    .await
    .map_err(|e| WorkerError::DataPlane(format!("{}:{}: {e}", kv.host, kv.port)))?;
    tracing::info!(host = %endpoint.host, port = endpoint.port, "KV data plane listening");
    Ok(Arc::new(disagg::PrefillSide::new(
        drt.instance_id(),
        endpoint,
        holds,
    )))
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("model: {0}")]
    Model(String),
    #[error("kv events: {0}")]
    KvEvents(String),
    #[error("KV data plane: {0}")]
    DataPlane(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The `generate` endpoint's handler.
struct Generate {
    /// Every request marks the worker busy (no canary needed).
    activity: Arc<canary::Activity>,
    engine: Arc<dyn Engine>,
    /// Set on prefill workers: every request is a prefill leg.
    side: Option<Arc<disagg::PrefillSide>>,
    metrics: TransferMetrics,
    budget: disagg::FetchBudget,
    endpoint: String,
    context_length: usize,
}

impl Generate {
    /// Starts one leg (prefill, decode or aggregated) and logs it ([`request_log`]); its
    /// outputs end at the first engine error, which leaves as its class.
    async fn handle(
        &self,
        request: PreprocessedRequest,
        ctx: RequestContext,
    ) -> Result<TypedHandlerStream<EngineOutput>, RemoteError> {
        self.activity.touch();
        let prompt = request.token_ids.len();
        let leg = match (&self.side, &request.prefill_result) {
            (Some(_), _) => "prefill",
            (None, Some(_)) => "decode",
            (None, None) => "aggregated",
        };
        request_log::accepted(&self.endpoint, leg, &request.model, prompt);
        // OpenTelemetry's GenAI attributes, for an exported trace only: the log lines carry
        // the same facts as fields of their own.
        let span = tracing::Span::current();
        if tandem_telemetry::propagation::is_exported(&span) {
            span.record("gen_ai.request.model", request.model.as_str());
            if let Some(m) = request.stop.max_tokens {
                span.record("gen_ai.request.max_tokens", u64::from(m));
            }
            span.record("gen_ai.usage.input_tokens", prompt as u64);
        }
        let model = request.model.clone();
        match self.start(request, &ctx).await {
            Ok(stream) => {
                let stream = request_log::Logged::new(stream, &self.endpoint, leg, model, prompt);
                Ok(stream.map(|item| item.map_err(engine_error)).boxed())
            }
            Err(e) => {
                request_log::refused(&self.endpoint, leg, &model, prompt, &e);
                Err(engine_error(e))
            }
        }
    }

    async fn start(
        &self,
        request: PreprocessedRequest,
        ctx: &RequestContext,
    ) -> Result<EngineOutputs, EngineError> {
        if let Err(e) = check_context(&request, self.context_length) {
            // Refused: the prefill worker need not hold the prompt's blocks any longer.
            if let Some(p) = request.prefill_result {
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    disagg::release_remote(&p.disaggregated_params, &metrics).await
                });
            }
            return Err(e);
        }
        match &self.side {
            Some(side) => disagg::prefill_leg(self.engine.as_ref(), side, request),
            None => disagg::decode_leg(self.engine.as_ref(), request, &self.budget, &self.metrics)
                .await
                .map(|s| stream_with_controls(s, ctx)),
        }
    }
}

type EngineOutputs = futures::stream::BoxStream<'static, Result<EngineOutput, EngineError>>;

/// A prompt must leave room for at least one token.
fn check_context(request: &PreprocessedRequest, context_length: usize) -> Result<(), EngineError> {
    if request.token_ids.len() >= context_length {
        return Err(EngineError::PromptTooLong {
            prompt: request.token_ids.len(),
            context: context_length,
        });
    }
    Ok(())
}

/// Hands the caller's control messages (stop one choice) to the engine's stream, which then
/// leaves as a boxed stream.
fn stream_with_controls(stream: EngineStream, ctx: &RequestContext) -> EngineOutputs {
    if let Some(controls) = ctx.take_controls() {
        tokio::spawn(apply_controls(controls, stream.stopper()));
    }
    stream.boxed()
}

/// Applies the caller's control messages until the request ends (the runtime then drops the
/// sender).
async fn apply_controls(
    mut controls: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    stopper: ChoiceStopper,
) {
    while let Some(payload) = controls.recv().await {
        match tandem_runtime::typed::decode_control::<GenerateControl>(&payload) {
            Ok(GenerateControl::StopChoice { index }) => stopper.stop(index),
            Err(e) => tracing::warn!(error = %e, "ignoring a control message"),
        }
    }
}

/// The request plane's class of an engine error.
pub fn engine_error(e: EngineError) -> RemoteError {
    let code = match &e {
        EngineError::PromptTooLong { .. } => ErrorCode::ContextLength,
        EngineError::Invalid(_) => ErrorCode::InvalidRequest,
        EngineError::Stopped => ErrorCode::Unavailable,
        EngineError::StepFailed(_) => ErrorCode::Internal,
    };
    RemoteError::new(code, e.to_string())
}
