//! What every worker does, whatever its engine.
//!
//! [`serve`] puts an [`Engine`] behind two runtime endpoints of one component:
//! - `generate`: a JSON [`PreprocessedRequest`] in, a stream of JSON [`EngineOutput`]s out.
//!   Dropping the engine's stream is how a request is cancelled; the runtime does that when the
//!   caller cancels or disappears.
//! - `tokenizer`: the model's `tokenizer.json`, in chunks, so that a frontend on another
//!   machine can tokenize for this model.
//!
//! It publishes the engine's KV block events for routers ([`kv_events`]), then writes the
//! model card to etcd under the process's lease and mirrors the engine's block statistics into
//! `dynamo_component_kvstats_*` on the system status server.

pub mod kv_events;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use prometheus::{GaugeVec, Opts};
use std::sync::Arc;
use tandem_model::ModelFiles;
use tandem_protocols::card::{
    MDC_ROOT, ModelDeploymentCard, ModelEntry, ModelRuntimeConfig, slugify,
};
use tandem_protocols::llm::{EngineOutput, PreprocessedRequest};
use tandem_runtime::{DistributedRuntime, EndpointId, RequestContext, RuntimeError};

pub type EngineStream = BoxStream<'static, EngineOutput>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("prompt of {prompt} tokens does not fit the context of {context} tokens")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("engine stopped")]
    Stopped,
}

/// Block and queue statistics an engine reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub total_blocks: u64,
    pub active_blocks: u64,
    pub prefix_hit_rate: f64,
    pub running: u64,
    pub waiting: u64,
    /// Prompt tokens computed so far (cache hits excluded).
    pub prefill_tokens: u64,
    /// Prompt tokens served from the prefix cache so far.
    pub cached_prompt_tokens: u64,
    /// Sequences preempted (blocks released, to be recomputed) so far.
    pub preemptions: u64,
}

/// Batching flags every engine shares (vLLM's and Dynamo's names).
#[derive(clap::Args, Debug, Clone)]
pub struct BatchingArgs {
    /// Tokens per KV block (default 16 for the candle engine, 64 for the mocker, as Dynamo).
    #[arg(long = "block-size")]
    pub block_size: Option<usize>,
    /// KV blocks in the cache (default: the candle engine sizes it from free memory, the
    /// mocker uses 16384).
    #[arg(long = "kv-cache-blocks", alias = "num-gpu-blocks-override")]
    pub num_blocks: Option<usize>,
    #[arg(long = "max-num-seqs", default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long = "max-num-batched-tokens", default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Fraction of blocks kept free when admitting new sequences.
    #[arg(long, default_value_t = 0.01)]
    pub watermark: f64,
    #[arg(long = "enable-prefix-caching", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,
}

impl Default for BatchingArgs {
    fn default() -> Self {
        Self {
            block_size: None,
            num_blocks: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            watermark: 0.01,
            enable_prefix_caching: true,
        }
    }
}

/// A token generator. Implemented by the mocker and the candle engine.
pub trait Engine: Send + Sync + 'static {
    /// Starts generating; the stream ends after the output carrying a finish reason.
    /// Dropping the stream stops the request and frees its blocks.
    fn generate(&self, request: PreprocessedRequest) -> Result<EngineStream, EngineError>;
    fn stats(&self) -> EngineStats;
    fn runtime_config(&self) -> ModelRuntimeConfig;
    fn block_size(&self) -> u32;
    /// The engine's KV block events from now on, in order (one subscriber; a later call
    /// replaces it). Nothing is kept while nobody subscribes.
    fn subscribe_kv_events(&self) -> tokio::sync::mpsc::UnboundedReceiver<tandem_kv::BlockEvent>;
}

/// How the worker presents its model.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The generate endpoint; `tokenizer` is served beside it in the same component.
    pub endpoint: EndpointId,
    pub model_name: String,
    pub context_length: u32,
    pub migration_limit: u32,
    /// Publish KV block events (off for decode-only workers).
    pub publish_kv_events: bool,
    /// vLLM's `--kv-events-config`: also publish over ZMQ.
    pub kv_events_config: Option<kv_events::KvEventsConfig>,
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

    register_kvstats(drt, &config.endpoint, engine.clone());

    let files = tokenizer_json.clone();
    drt.endpoint(tokenizer_ep.clone())
        .serve(move |_body: Bytes, _ctx: RequestContext| {
            let files = files.clone();
            async move {
                let chunks: Vec<Result<Bytes, String>> = (0..files.len())
                    .step_by(TOKENIZER_CHUNK)
                    .map(|at| Ok(files.slice(at..(at + TOKENIZER_CHUNK).min(files.len()))))
                    .collect();
                Ok(futures::stream::iter(chunks).boxed())
            }
        })
        .await?;

    let gen_engine = engine.clone();
    let context_length = config.context_length as usize;
    drt.endpoint(config.endpoint.clone())
        .serve(move |body: Bytes, _ctx: RequestContext| {
            let engine = gen_engine.clone();
            async move {
                let request: PreprocessedRequest =
                    serde_json::from_slice(&body).map_err(|e| format!("invalid request: {e}"))?;
                if request.token_ids.len() >= context_length {
                    return Err(EngineError::PromptTooLong {
                        prompt: request.token_ids.len(),
                        context: context_length,
                    }
                    .to_string());
                }
                let stream = engine.generate(request).map_err(|e| e.to_string())?;
                Ok(stream
                    .map(|out| {
                        serde_json::to_vec(&out)
                            .map(Bytes::from)
                            .map_err(|e| e.to_string())
                    })
                    .boxed())
            }
        })
        .await?;

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

    let card = ModelDeploymentCard {
        display_name: config.model_name.clone(),
        slug: slugify(&config.model_name),
        context_length: config.context_length,
        kv_cache_block_size: engine.block_size(),
        migration_limit: config.migration_limit,
        model_type: vec!["chat".into(), "completions".into()],
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
    tracing::info!(model = %config.model_name, endpoint = %ep, "model registered");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("model: {0}")]
    Model(String),
    #[error("kv events: {0}")]
    KvEvents(String),
}

/// `dynamo_component_kvstats_*` gauges, refreshed from the engine at every scrape.
fn register_kvstats(drt: &DistributedRuntime, ep: &EndpointId, engine: Arc<dyn Engine>) {
    let metrics = drt.metrics();
    let labels = ["dynamo_namespace", "dynamo_component", "worker_id"];
    let make = |name: &str, help: &str| -> Option<prometheus::Gauge> {
        let vec = GaugeVec::new(Opts::new(name, help), &labels).ok()?;
        metrics.registry().register(Box::new(vec.clone())).ok()?;
        Some(vec.with_label_values(&[
            ep.namespace.as_str(),
            ep.component.as_str(),
            metrics.worker_id(),
        ]))
    };
    let (Some(active), Some(total), Some(usage), Some(hit)) = (
        make(
            "dynamo_component_kvstats_active_blocks",
            "Number of active KV cache blocks",
        ),
        make(
            "dynamo_component_kvstats_total_blocks",
            "Total number of KV cache blocks",
        ),
        make(
            "dynamo_component_kvstats_gpu_cache_usage_percent",
            "KV cache usage as a fraction of total blocks (0.0-1.0)",
        ),
        make(
            "dynamo_component_kvstats_gpu_prefix_cache_hit_rate",
            "Prefix cache hit rate of recent requests (0.0-1.0)",
        ),
    ) else {
        tracing::error!("kvstats gauges could not be registered");
        return;
    };
    metrics.add_scrape_hook(Box::new(move || {
        let s = engine.stats();
        active.set(s.active_blocks as f64);
        total.set(s.total_blocks as f64);
        usage.set(if s.total_blocks > 0 {
            s.active_blocks as f64 / s.total_blocks as f64
        } else {
            0.0
        });
        hit.set(s.prefix_hit_rate);
    }));
}
