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

pub mod kv_events;
mod metrics;

use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use tandem_engine_api::{ChoiceStopper, Engine, EngineError};
use tandem_model::ModelFiles;
use tandem_protocols::card::{MDC_ROOT, ModelDeploymentCard, ModelEntry, slugify};
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

    let gen_engine = engine.clone();
    let context_length = config.context_length as usize;
    drt.endpoint(config.endpoint.clone())
        .serve_typed(move |request: PreprocessedRequest, ctx: RequestContext| {
            let engine = gen_engine.clone();
            async move { generate(engine.as_ref(), request, &ctx, context_length) }
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

/// Starts one generation; its outputs end at the first engine error, which leaves as its
/// class.
fn generate(
    engine: &dyn Engine,
    request: PreprocessedRequest,
    ctx: &RequestContext,
    context_length: usize,
) -> Result<TypedHandlerStream<EngineOutput>, RemoteError> {
    if request.token_ids.len() >= context_length {
        return Err(engine_error(EngineError::PromptTooLong {
            prompt: request.token_ids.len(),
            context: context_length,
        }));
    }
    let stream = engine.generate(request).map_err(engine_error)?;
    if let Some(controls) = ctx.take_controls() {
        tokio::spawn(apply_controls(controls, stream.stopper()));
    }
    Ok(stream.map(|item| item.map_err(engine_error)).boxed())
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
