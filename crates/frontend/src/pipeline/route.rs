//! Stage 2, `route`: which worker gets the request.
//!
//! One enum for the choice ([`Route`]): the worker the client named (`nvext.backend_instance_id`),
//! the KV router's pick (with the load it registered on that worker, released however the
//! request ends), the least loaded by requests in flight ([`super::balance`], with its load
//! guard likewise), or round-robin / random over the runtime client's instances. A request
//! of a session (`X-Dynamo-Session-ID`) goes where the session's last one went while that
//! worker is there, through the same router (its load counted). Either way the worker is
//! known before the call, and workers that failed recently ([`Inhibited`]) are left out while
//! others remain.

use super::balance::{InflightGuard, Sessions};
use super::migrate::Inhibited;
use super::prepare::Prepared;
use crate::error::ApiError;
use crate::models::{ModelRouter, ServedModel};
use tandem_kv_router::{Candidate, KvRouter, LoadGuard};
use tandem_runtime::{Client, RouterMode};

pub enum Route {
    /// The worker picked round-robin or at random, or the one the client named.
    Worker(u64),
    /// The least loaded worker; `inflight` counts the request on it until it ends.
    Balanced {
        worker: u64,
        inflight: InflightGuard,
    },
    /// The KV router picked `worker`; `load` is the request's share of that worker's load.
    Kv {
        worker: u64,
        load: LoadGuard,
        /// Prompt blocks the router found cached on `worker`.
        overlap_blocks: u32,
    },
}

impl Route {
    pub fn worker(&self) -> u64 {
        match self {
            Self::Worker(w) | Self::Balanced { worker: w, .. } | Self::Kv { worker: w, .. } => *w,
        }
    }

    pub fn mode(&self) -> RouterMode {
        RouterMode::Direct(self.worker())
    }

    /// The prompt has been computed: the worker's prefill load is over.
    pub fn prefill_done(&mut self) {
        if let Self::Kv { load, .. } = self {
            load.prefill_done();
        }
    }
}

/// Chooses the worker for `p` (or for `tokens`, a migrated choice's context), in the
/// request's `http-request` span `parent`; binds the request's session to it.
pub fn route(
    model: &ServedModel,
    p: &Prepared,
    tokens: &[u32],
    parent: &tracing::Span,
    avoid: &Inhibited,
    sessions: Option<&Sessions>,
) -> Result<Route, ApiError> {
    if let Some(worker) = p.worker {
        if !model.client.instance_ids().contains(&worker) {
            return Err(ApiError::new(
                tandem_runtime::ErrorCode::NotFound,
                format!("worker {worker} is not serving model `{}`", model.name),
            )
            .with_param(Some("nvext.backend_instance_id")));
        }
        return Ok(Route::Worker(worker));
    }
    let session = p.session.as_deref().zip(sessions);
    let pinned = session.and_then(|(id, s)| s.get(id, &worker_ids(&model.client, avoid)));
    let route = pick_among(
        &model.router,
        &model.client,
        model.card.runtime_config.total_kv_blocks,
        tokens,
        parent,
        avoid,
        pinned,
    )?;
    if let Some((id, s)) = session {
        s.put(id, route.worker());
    }
    Ok(route)
}

/// The choice of `router` among `client`'s workers for a prompt of `tokens`; unavailable
/// when there is none.
pub fn pick(
    router: &ModelRouter,
    client: &Client,
    total_blocks: u64,
    tokens: &[u32],
    parent: &tracing::Span,
    avoid: &Inhibited,
) -> Result<Route, ApiError> {
    pick_among(router, client, total_blocks, tokens, parent, avoid, None)
}

/// [`pick`], limited to `only` when given (a session's worker).
fn pick_among(
    router: &ModelRouter,
    client: &Client,
    total_blocks: u64,
    tokens: &[u32],
    parent: &tracing::Span,
    avoid: &Inhibited,
    only: Option<u64>,
) -> Result<Route, ApiError> {
    let basic = |mode| {
        client
            .pick_id(only.map_or(mode, RouterMode::Direct), |w| avoid.contains(w))
            .map(Route::Worker)
            .map_err(ApiError::from)
    };
    match router {
        ModelRouter::Basic(mode) => basic(*mode),
        ModelRouter::Load(policy, inflight) => {
            let ids = only.map_or_else(|| worker_ids(client, avoid), |w| vec![w]);
            match inflight.enter_chosen(*policy, &ids) {
                Some(guard) => Ok(Route::Balanced {
                    worker: guard.worker(),
                    inflight: guard,
                }),
                None => basic(RouterMode::RoundRobin),
            }
        }
        ModelRouter::Kv(kv) => {
            let mut cands = candidates(client, total_blocks, avoid);
            if let Some(w) = only {
                cands.retain(|c| c.worker_id == w);
            }
            match route_kv(kv, &cands, tokens, parent) {
                Some(route) => Ok(route),
                None => basic(RouterMode::RoundRobin),
            }
        }
    }
}

/// With `--busy-threshold`, waits while every worker of `model` is busy, up to `limit`;
/// false when they still all are (the request gets 503 `overloaded`). The request waits as a
/// queued request (`dynamo_frontend_queued_requests` counts it until its first token).
pub async fn wait_while_busy(
    model: &ServedModel,
    avoid: &Inhibited,
    limit: std::time::Duration,
) -> bool {
    let ModelRouter::Kv(kv) = &model.router else {
        return true;
    };
    let busy = || {
        kv.all_busy(&candidates(
            &model.client,
            model.card.runtime_config.total_kv_blocks,
            avoid,
        ))
    };
    let deadline = tokio::time::Instant::now() + limit;
    while busy() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        // The router's loads change as requests end; a short poll is cheaper than a channel
        // every request would have to notify.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

/// `client`'s workers, less those failed recently unless that leaves none.
fn worker_ids(client: &Client, avoid: &Inhibited) -> Vec<u64> {
    let ids = client.instance_ids();
    let kept: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|w| !avoid.contains(*w))
        .collect();
    if kept.is_empty() { ids } else { kept }
}

/// The KV router's candidates: [`worker_ids`] with their cache sizes.
fn candidates(client: &Client, total_blocks: u64, avoid: &Inhibited) -> Vec<Candidate> {
    worker_ids(client, avoid)
        .into_iter()
        .map(|worker_id| Candidate {
            worker_id,
            total_blocks,
        })
        .collect()
}

fn route_kv(
    kv: &KvRouter,
    candidates: &[Candidate],
    tokens: &[u32],
    parent: &tracing::Span,
) -> Option<Route> {
    // For the trace only, like the router's own stage spans (see `KvRouter::route`).
    let span = if tandem_telemetry::propagation::is_exported(parent) {
        tracing::info_span!(
            parent: parent,
            "kv_router.route_request",
            worker_id = tracing::field::Empty,
            overlap_blocks = tracing::field::Empty,
            cost = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    let _entered = span.enter();
    let d = kv.route(tokens, candidates)?;
    span.record("worker_id", d.worker_id);
    span.record("overlap_blocks", d.overlap_blocks);
    span.record("cost", d.cost);
    Some(Route::Kv {
        worker: d.worker_id,
        load: d.guard,
        overlap_blocks: d.overlap_blocks,
    })
}
