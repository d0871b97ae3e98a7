//! Models the frontend serves, kept in step with the model cards workers write to etcd.
//!
//! A card appears → the first one for its name brings the tokenizer (fetched from the worker's
//! `tokenizer` endpoint and checked against the card's checksum), a preprocessor and a client
//! for the worker's generate endpoint. The last card for a name disappears → the model is
//! dropped, and requests for it get 503 (it was served here) instead of 404 (never was).
//! With `--router-mode kv` each model also gets a KV router fed by its workers' events.
//!
//! Cards of prefill workers (model type `prefill`) do not make a model servable by
//! themselves: they attach a [`PrefillTarget`] (client and router of the prefill endpoint) to
//! the model their decode workers serve, and requests then take the disaggregated path
//! (`pipeline::prefill`). The last prefill worker leaving detaches it again.

use crate::config::ExecPolicy;
use crate::metrics::FrontendMetrics;
use crate::pipeline::balance::{Inflight, LoadPolicy};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tandem_kv_router::{KvRouter, KvRouterArgs, RouterMetrics};
use tandem_preprocessor::Preprocessor;
use tandem_protocols::card::{MDC_ROOT, ModelDeploymentCard, ModelEntry};
use tandem_protocols::disagg::RELEASE_ENDPOINT;
use tandem_runtime::{Client, DistributedRuntime, EndpointId, RequestOptions, RouterMode};
use tokio_util::sync::CancellationToken;

/// How the frontend spreads requests over a model's workers (`--router-mode`).
#[derive(Clone)]
pub enum Routing {
    Basic(RouterMode),
    Kv(Arc<KvRouterArgs>),
    /// `power-of-two`, `least-loaded`: by requests in flight.
    Load(LoadPolicy),
}

/// A model's router: the runtime client's own choice, or a KV router.
pub enum ModelRouter {
    Basic(RouterMode),
    Kv(Arc<KvRouter>),
    /// By this frontend's requests in flight on each worker.
    Load(LoadPolicy, Arc<Inflight>),
}

pub struct ServedModel {
    pub name: String,
    pub card: ModelDeploymentCard,
    pub preprocessor: Preprocessor,
    /// Structured-output grammars, compiled against this model's vocabulary.
    pub guides: Arc<tandem_structured::Guides>,
    pub client: Client,
    pub router: ModelRouter,
    /// Stops the KV router's event intake when the model goes.
    kv_stop: CancellationToken,
    pub created: u64,
    /// The model's prefill workers, while there are any.
    prefill: RwLock<Option<Arc<PrefillTarget>>>,
}

impl ServedModel {
    /// The reasoning parser the model's workers named (`--dyn-reasoning-parser`).
    pub fn reasoning_parser(&self) -> Option<tandem_preprocessor::reasoning::ReasoningParser> {
        self.card
            .runtime_config
            .reasoning_parser
            .as_deref()
            .and_then(|name| name.parse().ok())
    }

    /// The tool-call parser the model's workers named (`--dyn-tool-call-parser`).
    pub fn tool_call_parser(&self) -> Option<tandem_preprocessor::tools::ToolCallParser> {
        self.card
            .runtime_config
            .tool_call_parser
            .as_deref()
            .and_then(|name| name.parse().ok())
    }

    pub fn prefill(&self) -> Option<Arc<PrefillTarget>> {
        self.prefill
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_prefill(&self, target: Option<Arc<PrefillTarget>>) {
        *self.prefill.write().unwrap_or_else(|p| p.into_inner()) = target;
    }
}

impl Drop for ServedModel {
    fn drop(&mut self) {
        self.kv_stop.cancel();
    }
}

/// Where a model's prefill legs go: the prefill endpoint's client and router (KV-aware under
/// `--router-mode kv`, fed by the prefill workers' events).
pub struct PrefillTarget {
    pub endpoint: EndpointId,
    /// The prefill workers' `kv_release` endpoint: frees a transfer whose decode leg never
    /// started.
    pub release: Client,
    /// Blocks per prefill worker, from their card (the KV router's load denominator).
    pub total_kv_blocks: u64,
    pub client: Client,
    pub router: ModelRouter,
    kv_stop: CancellationToken,
}

impl Drop for PrefillTarget {
    fn drop(&mut self) {
        self.kv_stop.cancel();
    }
}

#[derive(Default)]
struct State {
    models: HashMap<String, Arc<ServedModel>>,
    retired: HashSet<String>,
}

pub enum Lookup {
    Ready(Arc<ServedModel>),
    Gone,
    Unknown,
}

#[derive(Clone)]
pub struct ModelManager {
    state: Arc<RwLock<State>>,
    pub routing: Routing,
    pub exec: ExecPolicy,
    router_metrics: Option<RouterMetrics>,
}

impl ModelManager {
    pub fn lookup(&self, name: &str) -> Lookup {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        match st.models.get(name) {
            Some(m) => Lookup::Ready(m.clone()),
            None if st.retired.contains(name) => Lookup::Gone,
            None => Lookup::Unknown,
        }
    }

    pub fn list(&self) -> Vec<Arc<ServedModel>> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = st.models.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Starts following `v1/mdc/` in etcd.
    pub fn watch(
        drt: &DistributedRuntime,
        metrics: Arc<FrontendMetrics>,
        routing: Routing,
        exec: ExecPolicy,
    ) -> Self {
        let router_metrics = match &routing {
            Routing::Kv(_) => match RouterMetrics::new(&metrics.registry) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(error = %e, "kv router metrics not registered");
                    RouterMetrics::unregistered().ok()
                }
            },
            Routing::Basic(_) | Routing::Load(_) => None,
        };
        let mgr = Self {
            state: Arc::default(),
            routing,
            exec,
            router_metrics,
        };
        let mut rx = drt.discovery().watch_prefix(&format!("{MDC_ROOT}/"));
        let (drt, this) = (drt.clone(), mgr.clone());
        tokio::spawn(async move {
            loop {
                let snapshot = rx.borrow_and_update().clone();
                let complete = this.sync(&drt, &metrics, snapshot).await;
                // A model that failed to load (worker busy, NATS hiccup) is retried soon even
                // if etcd does not change again.
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(1)), if !complete => {}
                }
            }
        });
        mgr
    }

    /// Applies a snapshot of the cards; false when some model could not be loaded yet.
    async fn sync(
        &self,
        drt: &DistributedRuntime,
        metrics: &FrontendMetrics,
        snapshot: BTreeMap<String, Vec<u8>>,
    ) -> bool {
        let mut complete = true;
        let mut by_name: HashMap<String, Vec<ModelEntry>> = HashMap::new();
        let mut prefill_by_name: HashMap<String, Vec<ModelEntry>> = HashMap::new();
        for (key, raw) in snapshot {
            match serde_json::from_slice::<ModelEntry>(&raw) {
                Ok(e) => {
                    let map = if e.card_json.is_prefill() {
                        &mut prefill_by_name
                    } else {
                        &mut by_name
                    };
                    map.entry(e.card_json.display_name.clone())
                        .or_default()
                        .push(e)
                }
                Err(e) => tracing::warn!(%key, error = %e, "ignoring malformed model card"),
            }
        }
        let known: Vec<String> = self.list().iter().map(|m| m.name.clone()).collect();
        for name in known {
            if !by_name.contains_key(&name) {
                tracing::info!(model = %name, "last worker left; model removed");
                let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                st.models.remove(&name);
                st.retired.insert(name.clone());
                if let Some(g) = metrics.model_gauge("workers", &name) {
                    g.set(0);
                }
            }
        }
        for (name, entries) in by_name {
            // Counted once the model is served here, so that a nonzero count means requests
            // for it can be answered.
            let set_workers = || {
                if let Some(g) = metrics.model_gauge("workers", &name) {
                    g.set(entries.len() as i64);
                }
            };
            if matches!(self.lookup(&name), Lookup::Ready(_)) {
                set_workers();
                continue;
            }
            let Some(first) = entries.first() else {
                continue;
            };
            match load_model(drt, first, &self.routing, self.router_metrics.as_ref()).await {
                Ok(model) => {
                    set_card_gauges(metrics, &model.card, &self.exec);
                    tracing::info!(model = %name, "model added");
                    let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                    st.retired.remove(&name);
                    st.models.insert(name.clone(), Arc::new(model));
                    drop(st);
                    set_workers();
                }
                Err(e) => {
                    complete = false;
                    tracing::warn!(model = %name, error = %e, "cannot load model yet; retrying");
                }
            }
        }
        for model in self.list() {
            let entries = prefill_by_name.remove(&model.name).unwrap_or_default();
            complete &= self.sync_prefill(drt, &model, &entries).await;
            let attached = if model.prefill().is_some() {
                entries.len()
            } else {
                0
            };
            if let Some(g) = metrics.model_gauge("prefill_workers", &model.name) {
                g.set(attached as i64);
            }
        }
        complete
    }

    /// Attaches or detaches `model`'s prefill target; false when one could not be made yet.
    async fn sync_prefill(
        &self,
        drt: &DistributedRuntime,
        model: &ServedModel,
        entries: &[ModelEntry],
    ) -> bool {
        let Some(first) = entries.first() else {
            if model.prefill().is_some() {
                tracing::info!(model = %model.name, "last prefill worker left; prefilling on decode workers");
                model.set_prefill(None);
            }
            return true;
        };
        if model.prefill().is_some() {
            return true;
        }
        if first.card_json.tokenizer_checksum != model.card.tokenizer_checksum {
            tracing::warn!(
                model = %model.name,
                "prefill workers serve a different tokenizer; not using them"
            );
            return true;
        }
        let block_size = first.card_json.kv_cache_block_size;
        let made = EndpointId::new(&first.namespace, &first.component, &first.endpoint)
            .map_err(|e| e.to_string())
            .and_then(|ep| {
                let kv_stop = CancellationToken::new();
                let router = make_router(
                    drt,
                    &self.routing,
                    self.router_metrics.as_ref(),
                    block_size,
                    &ep,
                    &kv_stop,
                )?;
                let release_ep = EndpointId::new(&ep.namespace, &ep.component, RELEASE_ENDPOINT)
                    .map_err(|e| e.to_string())?;
                Ok(PrefillTarget {
                    release: drt.endpoint(release_ep).client(),
                    total_kv_blocks: first.card_json.runtime_config.total_kv_blocks,
                    client: drt.endpoint(ep.clone()).client(),
                    endpoint: ep,
                    router,
                    kv_stop,
                })
            });
        // Attached (and counted) once a prefill leg can be routed, as a model is listed.
        let made = match made {
            Ok(target) => routable(&target.client, first.instance_id)
                .await
                .map(|()| target),
            Err(e) => Err(e),
        };
        match made {
            Ok(target) => {
                tracing::info!(model = %model.name, endpoint = %target.endpoint, "prefill workers found; disaggregated serving");
                model.set_prefill(Some(Arc::new(target)));
                true
            }
            Err(e) => {
                tracing::warn!(model = %model.name, error = %e, "cannot use prefill workers yet; retrying");
                false
            }
        }
    }
}

fn set_card_gauges(m: &FrontendMetrics, card: &ModelDeploymentCard, exec: &ExecPolicy) {
    let rc = &card.runtime_config;
    let name = card.display_name.as_str();
    for (g, v) in [
        ("total_kv_blocks", rc.total_kv_blocks as i64),
        ("max_num_seqs", rc.max_num_seqs as i64),
        ("max_num_batched_tokens", rc.max_num_batched_tokens as i64),
        ("context_length", card.context_length as i64),
        ("kv_cache_block_size", card.kv_cache_block_size as i64),
        (
            "migration_limit",
            exec.migration_limit(card.migration_limit) as i64,
        ),
    ] {
        if let Some(gauge) = m.model_gauge(g, name) {
            gauge.set(v);
        }
    }
}

async fn load_model(
    drt: &DistributedRuntime,
    entry: &ModelEntry,
    routing: &Routing,
    router_metrics: Option<&RouterMetrics>,
) -> Result<ServedModel, String> {
    let card = entry.card_json.clone();
    let tok_ep: EndpointId = card
        .tokenizer_endpoint
        .parse()
        .map_err(|e| format!("{e}"))?;
    let tok_client = drt.endpoint(tok_ep).client();
    routable(&tok_client, entry.instance_id).await?;
    let mut stream = tok_client
        .generate(
            RouterMode::Direct(entry.instance_id),
            bytes::Bytes::new(),
            RequestOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut json = Vec::new();
    while let Some(chunk) = stream.next().await {
        json.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&json));
    if sum != card.tokenizer_checksum {
        return Err(format!(
            "tokenizer checksum {sum} does not match the card's {}",
            card.tokenizer_checksum
        ));
    }
    let text = String::from_utf8(json).map_err(|e| e.to_string())?;
    let preprocessor =
        Preprocessor::from_json(&text, card.prompt.clone()).map_err(|e| e.to_string())?;
    let gen_ep = EndpointId::new(&entry.namespace, &entry.component, &entry.endpoint)
        .map_err(|e| e.to_string())?;
    let kv_stop = CancellationToken::new();
    let router = make_router(
        drt,
        routing,
        router_metrics,
        card.kv_cache_block_size,
        &gen_ep,
        &kv_stop,
    )?;
    let guides = Arc::new(tandem_structured::Guides::new(
        preprocessor.tokenizer().clone(),
        preprocessor.eos_token_ids().to_vec(),
    ));
    // The vocabulary's grammar compiler takes a few hundred ms to build: now, off the async
    // threads, rather than inside the first structured request.
    let warm = guides.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = warm.warm() {
            tracing::warn!(error = %e, "structured output will be refused for this model");
        }
    });
    let model = ServedModel {
        name: card.display_name.clone(),
        client: drt.endpoint(gen_ep).client(),
        router,
        kv_stop,
        preprocessor,
        guides,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        card,
        prefill: RwLock::new(None),
    };
    // Listed only once a request can be routed: a fresh client's instance list starts empty
    // and fills from etcd a moment later, and a request in that moment would find no worker
    // for a model the frontend lists (and counts workers for). Dropped on failure, the model
    // stops its router's event intake.
    routable(&model.client, entry.instance_id).await?;
    Ok(model)
}

/// Waits (up to 5 s) until `client` lists `instance`: a fresh client's list fills from etcd
/// a moment after it is made.
async fn routable(client: &Client, instance: u64) -> Result<(), String> {
    client
        .wait_for(Duration::from_secs(5), |v| {
            v.iter().any(|i| i.instance_id == instance)
        })
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The router of the workers at `ep`; a KV router's event intake runs until `kv_stop`.
fn make_router(
    drt: &DistributedRuntime,
    routing: &Routing,
    router_metrics: Option<&RouterMetrics>,
    card_block_size: u32,
    ep: &EndpointId,
    kv_stop: &CancellationToken,
) -> Result<ModelRouter, String> {
    let args = match routing {
        Routing::Basic(mode) => return Ok(ModelRouter::Basic(*mode)),
        Routing::Load(policy) => return Ok(ModelRouter::Load(*policy, Arc::default())),
        Routing::Kv(args) => args,
    };
    // Both are at least 1: the flag is checked when parsed, the card by the worker.
    let block_size = args.block_size.unwrap_or(card_block_size).max(1);
    let metrics = match router_metrics {
        Some(m) => m.clone(),
        None => RouterMetrics::unregistered().map_err(|e| e.to_string())?,
    };
    let router = Arc::new(KvRouter::new(args.config(), block_size as usize, metrics));
    router.publish_loads();
    tandem_kv_router::intake::spawn(drt, router.clone(), ep, args.source, kv_stop.clone())
        .map_err(|e| e.to_string())?;
    tracing::info!(
        endpoint = %ep,
        block_size,
        kv_events = args.config().use_kv_events,
        "kv router started"
    );
    Ok(ModelRouter::Kv(router))
}
