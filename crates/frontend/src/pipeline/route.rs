//! Stage 2, `route`: which worker gets the request.
//!
//! One enum for the choice ([`Route`]): the worker the client named (`nvext.backend_instance_id`),
//! the KV router's pick (with the load it registered on that worker, released however the
//! request ends), or the runtime client's own round-robin / random choice.

use super::prepare::Prepared;
use crate::error::ApiError;
use crate::models::{ModelRouter, ServedModel};
use tandem_kv_router::{Candidate, KvRouter, LoadGuard};
use tandem_runtime::{Client, RouterMode};

pub enum Route {
    /// The runtime client picks (round-robin, random) or the client named the worker.
    Client(RouterMode),
    /// The KV router picked `worker`; `load` is the request's share of that worker's load.
    Kv {
        worker: u64,
        load: LoadGuard,
        /// Prompt blocks the router found cached on `worker`.
        overlap_blocks: u32,
    },
}

impl Route {
    pub fn mode(&self) -> RouterMode {
        match self {
            Self::Client(mode) => *mode,
            Self::Kv { worker, .. } => RouterMode::Direct(*worker),
        }
    }

    /// The prompt has been computed: the worker's prefill load is over.
    pub fn prefill_done(&mut self) {
        if let Self::Kv { load, .. } = self {
            load.prefill_done();
        }
    }
}

/// Chooses the worker for `p`, in the request's `http-request` span `parent`.
pub fn route(model: &ServedModel, p: &Prepared, parent: &tracing::Span) -> Result<Route, ApiError> {
    if let Some(worker) = p.worker {
        if !model.client.instance_ids().contains(&worker) {
            return Err(ApiError::new(
                tandem_runtime::ErrorCode::NotFound,
                format!("worker {worker} is not serving model `{}`", model.name),
            )
            .with_param(Some("nvext.backend_instance_id")));
        }
        return Ok(Route::Client(RouterMode::Direct(worker)));
    }
    Ok(pick(
        &model.router,
        &model.client,
        model.card.runtime_config.total_kv_blocks,
        &p.request.token_ids,
        parent,
    ))
}

/// The choice of `router` among `client`'s workers for a prompt of `tokens`.
pub fn pick(
    router: &ModelRouter,
    client: &Client,
    total_blocks: u64,
    tokens: &[u32],
    parent: &tracing::Span,
) -> Route {
    match router {
        ModelRouter::Basic(mode) => Route::Client(*mode),
        ModelRouter::Kv(kv) => route_kv(kv, client, total_blocks, tokens, parent)
            // No worker known: the runtime client reports that as unavailable.
            .unwrap_or(Route::Client(RouterMode::RoundRobin)),
    }
}

fn route_kv(
    kv: &KvRouter,
    client: &Client,
    total_blocks: u64,
    tokens: &[u32],
    parent: &tracing::Span,
) -> Option<Route> {
    let span = tracing::info_span!(
        parent: parent,
        "kv_router.route_request",
        worker_id = tracing::field::Empty,
        overlap_blocks = tracing::field::Empty,
        cost = tracing::field::Empty,
    );
    let _entered = span.enter();
    let candidates: Vec<Candidate> = client
        .instance_ids()
        .into_iter()
        .map(|worker_id| Candidate {
            worker_id,
            total_blocks,
        })
        .collect();
    let d = kv.route(tokens, &candidates)?;
    span.record("worker_id", d.worker_id);
    span.record("overlap_blocks", d.overlap_blocks);
    span.record("cost", d.cost);
    Some(Route::Kv {
        worker: d.worker_id,
        load: d.guard,
        overlap_blocks: d.overlap_blocks,
    })
}
