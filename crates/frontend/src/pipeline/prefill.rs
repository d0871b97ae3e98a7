//! Stage 2a, `prefill`: where the prompt is computed when the model has prefill workers.
//!
//! Inside span `prefill_routing` (a child of `http-request`, so the prefill worker's
//! `handle_payload` joins the request's trace) a prefill worker is chosen — by the KV router
//! over the prefill workers' events under `--router-mode kv` — and runs the prompt with
//! `max_tokens = 1`. Its answer (the first token and where the prompt's KV blocks wait) goes
//! on the decode request as `prefill_result`; the decode worker fetches the blocks it lacks.
//!
//! Once a prefill leg has succeeded, the prefill worker holds the prompt's blocks for the
//! decode worker. Until the decode worker has the request ([`HeldTransfer::handed_over`]),
//! a failure to start the decode leg — no decode worker answers, the client leaves between
//! the legs — frees them through the prefill worker's `kv_release` endpoint at once instead of
//! at the hold's expiry.
//!
//! Every request is counted by path (`dynamo_frontend_disaggregated_requests_total`):
//! - `remote_prefill`: the prompt was computed on a prefill worker;
//! - `local_prefill`: on the decode worker by choice — no prefill worker serves the model,
//!   `n` > 1 (legs carry one sequence), or the uncached part of the prompt is within
//!   `--max-local-prefill-length`;
//! - `fallback`: the prefill leg failed (worker gone, error, no transfer parameters) and the
//!   decode worker computes the prompt, so the client still gets its answer — unless
//!   `--enforce-disagg`, which answers 503 instead (as it does when no prefill worker exists).

use super::migrate::Inhibited;
use super::prepare::Prepared;
use super::route::{Route, pick};
use crate::config::DisaggConfig;
use crate::error::ApiError;
use crate::metrics::FrontendMetrics;
use crate::models::{PrefillTarget, ServedModel};
use futures::StreamExt;
use std::time::Instant;
use tandem_protocols::disagg::{PrefillResult, ReleaseRequest};
use tandem_protocols::llm::{EngineOutput, PreprocessedRequest};
use tandem_runtime::{Client, RequestOptions, RouterMode, RuntimeError};
use tracing::Instrument;

/// How a request's prompt was computed (the `path` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillPath {
    Remote,
    Local,
    Fallback,
}

impl PrefillPath {
    pub fn label(self) -> &'static str {
        match self {
            Self::Remote => "remote_prefill",
            Self::Local => "local_prefill",
            Self::Fallback => "fallback",
        }
    }
}

/// A transfer a prefill worker holds for this request; freed there when dropped before
/// [`HeldTransfer::handed_over`].
pub struct HeldTransfer {
    release: Client,
    worker_id: u64,
    transfer_id: u64,
    armed: bool,
}

impl HeldTransfer {
    /// The decode worker has the request: fetching (or freeing) the blocks is its job now.
    pub fn handed_over(mut self) {
        self.armed = false;
    }
}

impl Drop for HeldTransfer {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, worker, transfer_id) =
            (self.release.clone(), self.worker_id, self.transfer_id);
        rt.spawn(async move {
            let request = ReleaseRequest { transfer_id };
            let call = client.call::<_, bool>(
                RouterMode::Direct(worker),
                &request,
                RequestOptions::default(),
            );
            match call.await {
                Ok(mut answers) => while answers.next().await.is_some() {},
                Err(e) => {
                    tracing::debug!(error = %e, transfer_id, "releasing a held transfer failed")
                }
            }
        });
    }
}

/// Runs the prefill leg when the request should have one; the result goes on the decode
/// request. `opts` carry the request's headers (trace context, `x-request-id`).
pub async fn prefill(
    model: &ServedModel,
    config: DisaggConfig,
    avoid: &Inhibited,
    p: &Prepared,
    opts: RequestOptions,
    parent: &tracing::Span,
    metrics: &FrontendMetrics,
) -> Result<Option<(PrefillResult, HeldTransfer)>, ApiError> {
    let count = |path: PrefillPath| {
        metrics
            .prefill_path
            .with_label_values(&[model.name.as_str(), path.label()])
            .inc();
    };
    let Some(target) = model.prefill() else {
        if config.enforce {
            return Err(ApiError::unavailable(format!(
                "no prefill worker serves model `{}` and --enforce-disagg is set",
                model.name
            )));
        }
        count(PrefillPath::Local);
        return Ok(None);
    };
    if p.n() > 1 {
        count(PrefillPath::Local);
        return Ok(None);
    }
    let span = tracing::info_span!(
        parent: parent,
        "prefill_routing",
        prefill_worker_id = tracing::field::Empty,
        overlap_blocks = tracing::field::Empty,
        path = tracing::field::Empty,
    );
    let started = Instant::now();
    let outcome = run_leg(&target, model, config, avoid, p, opts, &span)
        .instrument(span.clone())
        .await;
    let path = match &outcome {
        Ok(Some(_)) => PrefillPath::Remote,
        Ok(None) => PrefillPath::Local,
        Err(_) => PrefillPath::Fallback,
    };
    span.record("path", path.label());
    match outcome {
        Ok(result) => {
            if result.is_some() {
                metrics
                    .prefill_duration
                    .with_label_values(&[model.name.as_str()])
                    .observe(started.elapsed().as_secs_f64());
            }
            count(path);
            Ok(result)
        }
        Err(e) if config.enforce => {
            tracing::warn!(parent: &span, error = %e.message, "remote prefill failed; --enforce-disagg answers 503");
            Err(ApiError::unavailable(format!(
                "remote prefill failed: {}",
                e.message
            )))
        }
        Err(e) => {
            tracing::warn!(parent: &span, error = %e.message, "remote prefill failed; prefilling on the decode worker");
            count(path);
            Ok(None)
        }
    }
}

/// Chooses the prefill worker and runs the leg; `None` when the prompt is short enough to
/// prefill locally.
async fn run_leg(
    target: &PrefillTarget,
    model: &ServedModel,
    config: DisaggConfig,
    avoid: &Inhibited,
    p: &Prepared,
    mut opts: RequestOptions,
    span: &tracing::Span,
) -> Result<Option<(PrefillResult, HeldTransfer)>, ApiError> {
    let tokens = &p.request.token_ids;
    let mut route = pick(
        &target.router,
        &target.client,
        target.total_kv_blocks,
        tokens,
        span,
        avoid,
    )?;
    if let Route::Kv {
        worker,
        overlap_blocks,
        ..
    } = &route
    {
        span.record("prefill_worker_id", *worker);
        span.record("overlap_blocks", *overlap_blocks);
    }
    if config.max_local_prefill_length > 0 {
        let cached = match &route {
            Route::Kv { overlap_blocks, .. } => {
                *overlap_blocks as usize * model.card.kv_cache_block_size as usize
            }
            Route::Worker(_) | Route::Balanced { .. } => 0,
        };
        if tokens.len().saturating_sub(cached) <= config.max_local_prefill_length as usize {
            return Ok(None);
        }
    }
    opts.id = opts.id.map(|id| format!("{id}-prefill"));
    let request = prefill_request(&p.request);
    // A prefill worker that vanished is avoided by the next requests' prefill legs.
    let route_worker = route.worker();
    let failed = |e: RuntimeError| {
        if e.is_retryable() {
            avoid.add(route_worker);
        }
        ApiError::from(e)
    };
    let mut stream = target
        .client
        .call::<_, EngineOutput>(route.mode(), &request, opts)
        .await
        .map_err(failed)?;
    let mut first_token = None;
    let mut first_logprob = None;
    let mut cached_tokens = None;
    let mut params = None;
    let mut held = None;
    while let Some(item) = stream.next().await {
        // An error after the parameters still leaves a hold to free (`held` drops).
        let out = item.map_err(failed)?;
        route.prefill_done();
        if first_token.is_none() {
            first_token = out.token_ids.first().copied();
            first_logprob = out.logprobs.and_then(|l| l.into_iter().next());
        }
        cached_tokens = cached_tokens.or(out.cached_tokens);
        if let Some(d) = &out.disaggregated_params {
            held = Some(HeldTransfer {
                release: target.release.clone(),
                worker_id: d.worker_id,
                transfer_id: d.transfer_id,
                armed: true,
            });
            params = out.disaggregated_params;
        }
    }
    match (first_token, params, held) {
        (Some(first_token), Some(disaggregated_params), Some(held)) => {
            span.record("prefill_worker_id", disaggregated_params.worker_id);
            let result = PrefillResult {
                disaggregated_params,
                first_token,
                cached_tokens,
                first_logprob,
            };
            Ok(Some((result, held)))
        }
        _ => Err(ApiError::internal(
            "the prefill worker's answer had no first token or no disaggregated_params",
        )),
    }
}

/// The prefill leg's request: the prompt and sampling as sent, one token.
fn prefill_request(request: &PreprocessedRequest) -> PreprocessedRequest {
    let mut leg = request.clone();
    leg.stop.max_tokens = Some(1);
    // A first token that must not be EOS stays so; later ones are the decode leg's business.
    leg.stop.min_tokens = leg.stop.min_tokens.map(|m| m.min(1));
    leg.prefill_result = None;
    leg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leg_asks_for_one_token_and_keeps_the_rest() {
        let mut r = PreprocessedRequest {
            token_ids: vec![1, 2, 3],
            ..Default::default()
        };
        r.stop.max_tokens = Some(50);
        r.stop.min_tokens = Some(10);
        r.sampling.temperature = Some(0.0);
        let leg = prefill_request(&r);
        assert_eq!(leg.stop.max_tokens, Some(1));
        assert_eq!(leg.stop.min_tokens, Some(1));
        assert_eq!(leg.token_ids, r.token_ids);
        assert_eq!(leg.sampling.temperature, Some(0.0));
        assert_eq!(
            r.stop.max_tokens,
            Some(50),
            "the decode request keeps its limit"
        );
    }

    #[test]
    fn path_labels() {
        let labels: Vec<_> = [
            PrefillPath::Remote,
            PrefillPath::Local,
            PrefillPath::Fallback,
        ]
        .iter()
        .map(|p| p.label())
        .collect();
        assert_eq!(labels, ["remote_prefill", "local_prefill", "fallback"]);
    }
}
