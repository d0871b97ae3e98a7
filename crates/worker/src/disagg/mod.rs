//! The worker's part in disaggregated serving (Dynamo §4): its role, the prefill leg and the
//! decode leg around the engine's [`KvTransfer`].
//!
//! - **Prefill worker** (`--is-prefill-worker`): every request is a prefill leg. The engine
//!   computes the prompt and one token and holds the prompt's blocks; the last output leaves
//!   with [`DisaggregatedParams`] completed here (this worker's id, its data-plane address,
//!   the layout) and the hold is recorded in [`holds::Holds`] with its expiry. If the output
//!   never left (the caller went away first), the blocks are freed at once.
//! - **Decode worker** (`--is-decode-worker`) — and an aggregated one, which can do the same:
//!   a request carrying a `prefill_result` fetches the prompt blocks it does not already cache
//!   over the [`data_plane`] and hands them to the engine with the first token. Any failure
//!   (prefill worker gone, layout mismatch, blocks expired) is counted by reason and the
//!   worker computes the prompt itself: the client still gets its answer.

pub mod data_plane;
pub mod holds;
pub mod memory;

use crate::metrics::TransferMetrics;
use data_plane::TransferFailure;
use futures::StreamExt;
use std::sync::Arc;
use tandem_engine_api::{
    Disagg, Engine, EngineError, EngineStream, ImportLease, KvImport, KvTransfer,
};
use tandem_protocols::disagg::{DataPlaneEndpoint, DisaggregatedParams, FetchError, PrefillResult};
use tandem_protocols::llm::{EngineOutput, PreprocessedRequest};
use tracing::Instrument;

/// What this worker does with requests (Dynamo's `--disaggregation-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DisaggregationMode {
    /// Prefill and decode (and decode legs of disaggregated requests when sent one).
    #[default]
    Agg,
    /// Prefill legs only: registers as `prefill`, holds blocks for decode workers.
    Prefill,
    /// Decode: fetches prompt blocks from prefill workers; publishes no KV events.
    Decode,
}

/// A prefill worker's side: where its blocks can be fetched and who holds them.
pub struct PrefillSide {
    pub worker_id: u64,
    pub endpoint: DataPlaneEndpoint,
    pub holds: holds::Holds,
}

impl PrefillSide {
    pub fn new(worker_id: u64, endpoint: DataPlaneEndpoint, holds: holds::Holds) -> Self {
        Self {
            worker_id,
            endpoint,
            holds,
        }
    }
}

/// A decode worker's bound on KV bytes fetched and not yet written into its pool (fetched
/// blocks wait in host memory until their request is admitted). A fetch that does not fit
/// falls back to local prefill instead of growing memory without limit.
#[derive(Clone)]
pub struct FetchBudget {
    kib: Arc<tokio::sync::Semaphore>,
    total_bytes: u64,
}

impl FetchBudget {
    pub fn new(bytes: u64) -> Self {
        let kib = (bytes / 1024).min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            kib: Arc::new(tokio::sync::Semaphore::new(kib)),
            total_bytes: bytes,
        }
    }

    /// Reserves `bytes` until the returned lease is dropped; `None` when they do not fit now.
    fn reserve(&self, bytes: u64) -> Option<ImportLease> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?;
        let permit = self.kib.clone().try_acquire_many_owned(kib).ok()?;
        Some(ImportLease(Arc::new(permit)))
    }
}

/// Frees a prefill leg's blocks if its last output never left this worker.
struct UndeliveredRelease {
    transfer: Arc<dyn KvTransfer>,
    transfer_id: u64,
    delivered: bool,
}

impl Drop for UndeliveredRelease {
    fn drop(&mut self) {
        if !self.delivered {
            self.transfer.release(self.transfer_id);
        }
    }
}

/// Starts a prefill leg: one token, the blocks held for a decode worker.
pub fn prefill_leg(
    engine: &dyn Engine,
    side: &Arc<PrefillSide>,
    mut request: PreprocessedRequest,
) -> Result<futures::stream::BoxStream<'static, Result<EngineOutput, EngineError>>, EngineError> {
    if request.prefill_result.is_some() {
        return Err(EngineError::Invalid(
            "a prefill worker got a decode leg (prefill_result set)".into(),
        ));
    }
    request.stop.max_tokens = Some(1);
    request.stop.min_tokens = request.stop.min_tokens.map(|m| m.min(1));
    // Random: whoever can reach the data plane cannot guess another request's transfer (and
    // so free or read its blocks).
    let transfer_id = rand::random::<u64>();
    let transfer = engine.kv_transfer();
    let layout = transfer.layout();
    let stream = start_leg(engine, request, Disagg::Prefill { transfer_id })?;
    let mut guard = UndeliveredRelease {
        transfer,
        transfer_id,
        delivered: false,
    };
    let side = side.clone();
    Ok(stream
        .map(move |mut item| {
            // The whole guard moves into the stream (not just the field written below): it
            // must live as long as the stream does.
            let guard = &mut guard;
            if let Ok(out) = &mut item
                && let Some(p) = out.disaggregated_params.as_mut()
            {
                p.worker_id = side.worker_id;
                p.endpoint = side.endpoint.clone();
                p.layout = layout.clone();
                side.holds.hold(p.transfer_id, p.block_ids.clone());
                guard.delivered = true;
            }
            item
        })
        .boxed())
}

/// Starts a decode leg: fetches the prompt's KV when the request carries a prefill result,
/// else (or when the fetch fails) computes the prompt here.
pub async fn decode_leg(
    engine: &dyn Engine,
    mut request: PreprocessedRequest,
    budget: &FetchBudget,
    metrics: &TransferMetrics,
) -> Result<EngineStream, EngineError> {
    let Some(prefill) = request.prefill_result.take() else {
        return start_leg(engine, request, Disagg::Aggregated);
    };
    let span = tracing::info_span!(
        "kv_transfer",
        prefill_worker_id = prefill.disaggregated_params.worker_id,
        blocks = tracing::field::Empty,
        cached_blocks = tracing::field::Empty,
    );
    // If this leg is dropped (its caller left) before the fetch settles the transfer, the
    // prefill worker is told to free the blocks rather than wait for the hold to expire.
    let mut unsettled = Unsettled(Some((
        prefill.disaggregated_params.clone(),
        metrics.clone(),
    )));
    let transfer = engine.kv_transfer();
    let fetched = import(transfer.as_ref(), &request, prefill, budget, metrics)
        .instrument(span)
        .await;
    unsettled.0 = None;
    match fetched {
        Ok(import) => start_leg(engine, request, Disagg::Decode(import)),
        Err(e) => {
            metrics.failed(e.reason());
            tracing::warn!(error = %e, "KV transfer failed; computing the prompt on this worker");
            start_leg(engine, request, Disagg::Aggregated)
        }
    }
}

/// Hands a leg to the engine inside the request's `handle_payload` span. The engine's phase
/// spans (`engine.queued`, `engine.prefill`, `engine.decode`) are only opened for a trace that
/// is exported: an unsampled request, or any request with export off, costs none.
fn start_leg(
    engine: &dyn Engine,
    request: PreprocessedRequest,
    disagg: Disagg,
) -> Result<EngineStream, EngineError> {
    if tandem_telemetry::propagation::is_exported(&tracing::Span::current()) {
        engine.generate_leg(request, disagg)
    } else {
        tandem_engine_api::without_phase_spans(|| engine.generate_leg(request, disagg))
    }
}

/// Frees a transfer's blocks on its prefill worker without moving any (a fetch from past the
/// last block), for a decode leg that will not run.
pub async fn release_remote(params: &DisaggregatedParams, metrics: &TransferMetrics) {
    let end = params.block_ids.len();
    if let Err(e) = data_plane::fetch(params, end, &params.layout, 0, metrics).await {
        tracing::debug!(error = %e, "releasing a transfer on its prefill worker failed");
    }
}

struct Unsettled(Option<(DisaggregatedParams, TransferMetrics)>);

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some((params, metrics)) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { release_remote(&params, &metrics).await });
        }
    }
}

/// Fetches the prompt blocks this engine lacks.
async fn import(
    transfer: &dyn KvTransfer,
    request: &PreprocessedRequest,
    prefill: PrefillResult,
    budget: &FetchBudget,
    metrics: &TransferMetrics,
) -> Result<KvImport, TransferFailure> {
    let params = &prefill.disaggregated_params;
    let layout = transfer.layout();
    let bs = layout.block_size.max(1) as usize;
    let prompt = &request.token_ids;
    let hashes: Vec<u64> = tandem_kv::sequence_hashes(prompt, bs)
        .iter()
        .map(|h| h.sequence)
        .collect();
    let n_blocks = prompt.len().div_ceil(bs);
    let refusal = if let Some(why) = params.layout.mismatch(&layout) {
        // A different model, dtype or block size: nothing there can be written here.
        Some(TransferFailure::Refused(FetchError::LayoutMismatch)).inspect(
            |_| tracing::warn!(%why, "the prefill worker's KV layout differs from this worker's"),
        )
    } else if params.num_tokens as usize != prompt.len()
        || params.block_ids.len() != n_blocks
        || params.block_hashes != hashes
    {
        Some(TransferFailure::PromptMismatch(
            "the prompt's tokens or blocks differ".into(),
        ))
    } else {
        None
    };
    if let Some(failure) = refusal {
        // Still connect once: that frees the prefill worker's blocks now, not at expiry.
        let _ = data_plane::fetch(params, params.block_ids.len(), &layout, 0, metrics).await;
        return Err(failure);
    }
    // The full blocks already cached here are not fetched.
    let first_block = transfer.cached_prefix(&hashes).min(n_blocks);
    let span = tracing::Span::current();
    span.record("blocks", n_blocks - first_block);
    span.record("cached_blocks", first_block);
    let bytes = ((n_blocks - first_block) * layout.block_bytes()) as u64;
    let Some(lease) = budget.reserve(bytes) else {
        release_remote(params, metrics).await;
        return Err(TransferFailure::OverBudget {
            bytes,
            budget: budget.total_bytes,
        });
    };
    let simulated = transfer.simulated_block_bytes();
    let blocks = data_plane::fetch(params, first_block, &layout, simulated, metrics).await?;
    let delay = transfer.simulated_delay(blocks.len());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(KvImport {
        first_token: prefill.first_token,
        first_logprob: prefill.first_logprob.clone(),
        cached_tokens: prefill.cached_tokens,
        first_block,
        blocks,
        lease: Some(lease),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fetch_budget_refuses_what_does_not_fit_until_leases_end() {
        let budget = FetchBudget::new(10 << 20);
        let a = budget.reserve(6 << 20).unwrap();
        assert!(budget.reserve(6 << 20).is_none(), "6 + 6 MiB > 10 MiB");
        let b = budget.reserve(4 << 20).unwrap();
        drop(a);
        assert!(budget.reserve(6 << 20).is_some());
        drop(b);
        assert!(budget.reserve(10 << 20).is_some());
        assert!(budget.reserve(11 << 20).is_none());
        assert!(
            budget.reserve(0).is_some(),
            "the mocker's blocks take no bytes"
        );
    }
}
