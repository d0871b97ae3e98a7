//! The routing decision: overlap from the index, load from the active sequences, one cost.
//!
//! For each candidate worker `w` with `overlap` matched blocks:
//! `prefill_blocks = (tracked prefill tokens + ISL − overlap × block_size) / block_size`,
//! `decode_blocks = tracked decode blocks + ⌈ISL / block_size⌉`,
//! `cost = overlap_score_weight × prefill_blocks + decode_blocks` (Dynamo's formula). At
//! temperature 0 the cheapest wins, ties to the less loaded worker, then the smaller cache, then
//! at random; above 0 a worker is drawn from a softmax over the normalised negated costs.
//!
//! The default cost model ([`CostModel::Work`]) counts the blocks in flight at a quarter
//! ([`IN_FLIGHT_BLOCK_COST`]: a decode step costs far less per block than a prefill) and adds
//! what the choice costs everyone else, which Dynamo's formula leaves out, both in prefill
//! blocks times the same weight:
//! - *interference*: the `new` blocks this request must compute on `w` delay each request
//!   already routed there (their tokens wait for the step that computes them), so
//!   `new × requests(w)`;
//! - *eviction*: when `w`'s cache (the index's blocks for it against its size) has no room for
//!   `new` blocks, the overflow evicts cached prefixes that someone will compute again.
//!
//! A cached request adds neither, so the router moves a conversation away from the worker that
//! holds its prefix only when that worker is busier by more than the work the move creates:
//! measured with 4 mocker workers, Dynamo's formula alone moved conversations at an imbalance
//! of one, and each move was a cold prefill that stalled the batch it landed in.
//!
//! Events arrive through [`KvRouter::apply_event`], which also checks each worker's event ids
//! (sequential from 0) and says when the worker's state must be fetched again
//! ([`Intake::Resync`]). In approximate mode (`--no-kv-events`) the router instead records what
//! it sent where and forgets it after a TTL.

use crate::indexer::{ApplyStatus, RadixTree};
use crate::metrics::RouterMetrics;
use crate::sequences::{ActiveSequences, LoadGuard};
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_kv::sequence_hashes;
use tandem_protocols::kv_events::{
    KvCacheEventData, KvCacheStoreData, KvCacheStoredBlock, KvStateDump,
};

/// Router settings (Dynamo's flags).
#[derive(Debug, Clone)]
pub struct KvRouterConfig {
    pub overlap_score_weight: f64,
    pub temperature: f64,
    /// Consume worker KV events; false = approximate mode.
    pub use_kv_events: bool,
    /// How long approximate mode assumes a routed prefix stays cached.
    pub approx_ttl: Duration,
    /// Workers whose routed blocks exceed this fraction of their cache are skipped while a
    /// less busy worker exists.
    pub busy_threshold: Option<f64>,
    pub cost_model: CostModel,
}

/// How a worker's cost is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CostModel {
    /// Dynamo's formula with blocks in flight at a quarter, plus the interference and
    /// eviction a choice causes (module docs).
    #[default]
    Work,
    /// Dynamo's formula alone: `weight × prefill_blocks + decode_blocks`.
    Dynamo,
}

impl Default for KvRouterConfig {
    fn default() -> Self {
        Self {
            overlap_score_weight: 1.0,
            temperature: 0.0,
            use_kv_events: true,
            approx_ttl: Duration::from_secs(120),
            busy_threshold: None,
            cost_model: CostModel::Work,
        }
    }
}

/// A worker the router may pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub worker_id: u64,
    /// The worker's KV cache size in blocks (0 = unknown).
    pub total_blocks: u64,
}

/// Where a request goes and why; holds the request's load until dropped.
pub struct Decision {
    pub worker_id: u64,
    pub overlap_blocks: u32,
    pub cost: f64,
    pub guard: LoadGuard,
}

/// What to do after an event arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    Applied,
    /// Already reflected (an id at or below one a resync covered).
    Stale,
    /// The worker's state must be fetched again: events were lost, it restarted, or this is
    /// the first event the router sees from it mid-stream.
    Resync(ResyncReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    Gap,
    Restart,
    Joined,
}

impl ResyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gap => "gap",
            Self::Restart => "restart",
            Self::Joined => "joined",
        }
    }
}

#[derive(Default)]
struct Approx {
    /// (worker, block hash) → when last routed there.
    touched: HashMap<(u64, u64), Instant>,
    order: VecDeque<(Instant, u64, u64)>,
}

pub struct KvRouter {
    config: KvRouterConfig,
    block_size: usize,
    index: Mutex<RadixTree>,
    /// Next expected event id per worker.
    next_event: Mutex<HashMap<u64, u64>>,
    approx: Mutex<Approx>,
    active: Arc<ActiveSequences>,
    metrics: RouterMetrics,
}

impl KvRouter {
    pub fn new(config: KvRouterConfig, block_size: usize, metrics: RouterMetrics) -> Self {
        Self {
            config,
            block_size: block_size.max(1),
            index: Mutex::new(RadixTree::new()),
            next_event: Mutex::default(),
            approx: Mutex::default(),
            active: ActiveSequences::new(),
            metrics,
        }
    }

    /// Makes the router's per-worker load visible in its metrics (read at every scrape).
    pub fn publish_loads(self: &Arc<Self>) {
        self.metrics.watch_loads(Arc::downgrade(&self.active));
    }

    pub fn config(&self) -> &KvRouterConfig {
        &self.config
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn active(&self) -> &Arc<ActiveSequences> {
        &self.active
    }

    fn index(&self) -> std::sync::MutexGuard<'_, RadixTree> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks the index holds for `worker_id`.
    pub fn tree_size(&self, worker_id: u64) -> usize {
        self.index().tree_size(worker_id)
    }

    /// Workers the index holds blocks for.
    pub fn indexed_workers(&self) -> Vec<u64> {
        self.index().workers()
    }

    /// Picks the worker for a prompt of `tokens` among `candidates` and registers the
    /// request's load on it. `None` when there is no candidate.
    /// Whether every candidate is over `--busy-threshold` (its decode blocks, as this router
    /// counts them, over that share of its KV blocks); false without a threshold.
    pub fn all_busy(&self, candidates: &[Candidate]) -> bool {
        let Some(t) = self.config.busy_threshold else {
            return false;
        };
        !candidates.is_empty()
            && candidates.iter().all(|c| {
                c.total_blocks > 0
                    && self.active.load(c.worker_id).decode_blocks as f64 / c.total_blocks as f64
                        > t
            })
    }

    pub fn route(&self, tokens: &[u32], candidates: &[Candidate]) -> Option<Decision> {
        let started = Instant::now();
        if candidates.is_empty() {
            return None;
        }
        // Dynamo's router stage spans exist for the trace only: no log line is written inside
        // them. Building five spans through every layer cost most of a routing decision's CPU
        // (~4 % of the frontend's under load), so they are made only when the trace leaves
        // the process.
        let traced = tandem_telemetry::propagation::current_is_exported();
        macro_rules! stage {
            ($($span:tt)*) => {
                if traced { tracing::info_span!($($span)*) } else { tracing::Span::none() }
            };
        }
        let hashes = {
            let _s = stage!("kv_router.compute_block_hashes").entered();
            sequence_hashes(tokens, self.block_size)
        };
        if !self.config.use_kv_events {
            self.expire_approx(started);
        }
        let scores = {
            let _s = stage!(
                "kv_router.find_matches",
                block_count = hashes.len(),
                block_size = self.block_size
            )
            .entered();
            let local: Vec<u64> = hashes.iter().map(|h| h.local).collect();
            self.index().find_matches(&local).scores
        };
        let (choice, overlap, cost) = {
            let _s = stage!("kv_router.schedule").entered();
            let seq: Vec<u64> = {
                let _s = stage!("kv_router.compute_seq_hashes").entered();
                hashes.iter().map(|h| h.sequence).collect()
            };
            let select = stage!(
                "kv_router.select_worker",
                candidates = candidates.len(),
                worker_id = tracing::field::Empty,
            )
            .entered();
            let chosen = self.select(tokens.len(), &seq, &scores, candidates);
            select.record("worker_id", chosen.0);
            chosen
        };
        let isl = tokens.len() as u64;
        let bs = self.block_size as u64;
        let new_prefill = isl.saturating_sub(u64::from(overlap) * bs);
        let guard = self.active.add(
            choice,
            new_prefill,
            hashes.iter().map(|h| h.sequence).collect(),
            !tokens.len().is_multiple_of(self.block_size),
        );
        if !self.config.use_kv_events {
            self.record_approx(choice, &hashes, started);
        }
        let blocks = hashes.len().max(1);
        self.metrics
            .hit_rate
            .observe(f64::from(overlap) / blocks as f64);
        self.metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            worker_id = choice,
            overlap_blocks = overlap,
            cost,
            "kv router selected worker"
        );
        Some(Decision {
            worker_id: choice,
            overlap_blocks: overlap,
            cost,
            guard,
        })
    }

    /// Cost-based choice among `candidates`: (worker, overlap, cost).
    fn select(
        &self,
        isl: usize,
        seq_hashes: &[u64],
        scores: &HashMap<u64, u32>,
        candidates: &[Candidate],
    ) -> (u64, u32, f64) {
        let bs = self.block_size as f64;
        let partial = !isl.is_multiple_of(self.block_size);
        let sizes: Vec<usize> = {
            let idx = self.index();
            candidates
                .iter()
                .map(|c| idx.tree_size(c.worker_id))
                .collect()
        };
        // One pass over the candidates: overlap, load now (for busy and ties), cost with this
        // request added.
        let all: Vec<Scored> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // A prefix routed there and still in flight counts as cached: a burst of one
                // prompt lands on one worker before its first block events arrive.
                let indexed = scores.get(&c.worker_id).copied().unwrap_or(0);
                let overlap = indexed.max(self.active.inflight_prefix(c.worker_id, seq_hashes));
                let new_prefill =
                    (isl as u64).saturating_sub(u64::from(overlap) * self.block_size as u64);
                let (now, with) =
                    self.active
                        .potential(c.worker_id, seq_hashes, partial, new_prefill);
                let weight = self.config.overlap_score_weight;
                let decode = with.decode_blocks as f64;
                let cost = weight * with.prefill_tokens as f64 / bs
                    + match self.config.cost_model {
                        CostModel::Dynamo => decode,
                        CostModel::Work => {
                            let new_blocks = new_prefill.div_ceil(self.block_size as u64);
                            let side = side_cost(
                                new_blocks,
                                now.requests,
                                sizes[i] as u64,
                                c.total_blocks,
                            );
                            IN_FLIGHT_BLOCK_COST * decode + weight * side as f64
                        }
                    };
                let busy = match (self.config.busy_threshold, c.total_blocks) {
                    (Some(t), total) if total > 0 => now.decode_blocks as f64 / total as f64 > t,
                    _ => false,
                };
                Scored {
                    index: i,
                    overlap,
                    cost,
                    load: now.decode_blocks,
                    busy,
                }
            })
            .collect();
        let eval: Vec<Scored> = if all.iter().all(|e| e.busy) {
            all
        } else {
            all.into_iter().filter(|e| !e.busy).collect()
        };
        let mut rng = rand::rng();
        let pick = if self.config.temperature > 0.0 {
            softmax_pick(&eval, self.config.temperature, &mut rng)
        } else {
            // Cheapest; ties to the less loaded, then the smaller cache, then at random.
            let key = |e: &Scored| (e.cost, e.load, sizes[e.index]);
            let best = eval
                .iter()
                .map(key)
                .min_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            let ties: Vec<usize> = eval
                .iter()
                .enumerate()
                .filter(|(_, e)| Some(key(e)) == best)
                .map(|(j, _)| j)
                .collect();
            // `eval` is never empty (candidates are not), so neither is `ties`.
            ties[rng.random_range(0..ties.len())]
        };
        let e = &eval[pick];
        (candidates[e.index].worker_id, e.overlap, e.cost)
    }

    /// Applies a worker's event, checking its id against the worker's sequence.
    pub fn apply_event(&self, worker_id: u64, event_id: u64, data: &KvCacheEventData) -> Intake {
        let mut next = self.next_event.lock().unwrap_or_else(|p| p.into_inner());
        match next.get(&worker_id).copied() {
            None if event_id != 0 => return Intake::Resync(ResyncReason::Joined),
            Some(n) if event_id > n => return Intake::Resync(ResyncReason::Gap),
            Some(n) if event_id < n => {
                // Id 0 again: the worker's publisher started over (restart). Anything else
                // below the expected id was already covered by a resync.
                if event_id == 0 {
                    return Intake::Resync(ResyncReason::Restart);
                }
                return Intake::Stale;
            }
            _ => {}
        }
        next.insert(worker_id, event_id + 1);
        drop(next);
        self.apply_unchecked(worker_id, data);
        Intake::Applied
    }

    fn apply_unchecked(&self, worker_id: u64, data: &KvCacheEventData) {
        let (status, size) = {
            let mut idx = self.index();
            (idx.apply(worker_id, data), idx.tree_size(worker_id))
        };
        let kind = match data {
            KvCacheEventData::Stored(_) => "stored",
            KvCacheEventData::Removed(_) => "removed",
            KvCacheEventData::Cleared => "cleared",
        };
        if status != ApplyStatus::Ok {
            tracing::debug!(
                worker_id,
                kind,
                status = status.as_str(),
                "kv event not applied"
            );
        }
        self.metrics.event_applied(kind, status.as_str());
        self.metrics.tree_size(worker_id, size);
    }

    /// Replaces what the index holds for a worker with its dumped state; events up to
    /// `last_event_id` are then stale.
    pub fn apply_dump(&self, dump: &KvStateDump, reason: ResyncReason) {
        self.metrics.resync(reason.as_str());
        {
            let mut idx = self.index();
            idx.clear_worker(dump.worker_id);
            for s in &dump.stored {
                idx.store(dump.worker_id, s);
            }
        }
        self.metrics
            .tree_size(dump.worker_id, self.tree_size(dump.worker_id));
        let mut next = self.next_event.lock().unwrap_or_else(|p| p.into_inner());
        next.insert(
            dump.worker_id,
            dump.last_event_id.map(|e| e + 1).unwrap_or(0),
        );
        tracing::info!(
            worker_id = dump.worker_id,
            reason = reason.as_str(),
            blocks = self.tree_size(dump.worker_id),
            "kv index resynchronised from the worker's state"
        );
    }

    /// A worker left discovery: its blocks and its event sequence go.
    pub fn remove_worker(&self, worker_id: u64) {
        self.index().remove_worker(worker_id);
        self.next_event
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&worker_id);
        self.active.remove_worker(worker_id);
        self.metrics.forget_worker(worker_id);
    }

    fn record_approx(&self, worker: u64, hashes: &[tandem_kv::BlockHashes], now: Instant) {
        if hashes.is_empty() {
            return;
        }
        let stored = KvCacheStoreData {
            parent_hash: None,
            blocks: hashes
                .iter()
                .map(|h| KvCacheStoredBlock {
                    block_hash: h.sequence,
                    tokens_hash: h.local,
                })
                .collect(),
        };
        self.index().store(worker, &stored);
        let mut a = self.approx.lock().unwrap_or_else(|p| p.into_inner());
        for h in hashes {
            a.touched.insert((worker, h.sequence), now);
            a.order.push_back((now, worker, h.sequence));
        }
        drop(a);
        self.metrics.tree_size(worker, self.tree_size(worker));
    }

    fn expire_approx(&self, now: Instant) {
        let ttl = self.config.approx_ttl;
        let mut a = self.approx.lock().unwrap_or_else(|p| p.into_inner());
        let mut expired: Vec<(u64, u64)> = Vec::new();
        while let Some(&(t, w, h)) = a.order.front() {
            if now.duration_since(t) < ttl {
                break;
            }
            a.order.pop_front();
            // Only the newest record of a block counts.
            if a.touched.get(&(w, h)) == Some(&t) {
                a.touched.remove(&(w, h));
                expired.push((w, h));
            }
        }
        drop(a);
        if expired.is_empty() {
            return;
        }
        let mut idx = self.index();
        // Deepest blocks were recorded last: remove in reverse so children go first.
        for (w, h) in expired.into_iter().rev() {
            idx.remove(w, &[h]);
        }
    }
}

/// A candidate as the selection sees it.
struct Scored {
    /// Position in the candidate list.
    index: usize,
    overlap: u32,
    cost: f64,
    /// Decode blocks routed there now (before this request).
    load: u64,
    busy: bool,
}

/// Under [`CostModel::Work`], what a block of the requests in flight on a worker counts for
/// against a block to prefill (Dynamo's formula counts both alike). A decode step computes one
/// token per sequence whatever its blocks, a prefill all of a block's tokens: in Dynamo's
/// mocker timing model (fitted to a real engine) a block in flight lengthens a step by
/// ~0.003–0.013 ms (a cache of 262 k or 65 k tokens) where a block to prefill costs ~0.24 ms.
/// A quarter still spreads requests when one worker holds several more than another, but no
/// longer moves a conversation off the worker holding its prompt for one request more there:
/// with clients pausing between turns, weight 1 made 26 such moves in 256 requests (hit rate
/// 0.80), each ~220 ms of cold prefill; counted as a quarter, hit rate 0.92 and mean TTFT 61
/// instead of 84 ms (docs/benchmarks.md).
const IN_FLIGHT_BLOCK_COST: f64 = 0.25;

/// What computing `new_blocks` on a worker costs others, in blocks: the requests already
/// routed there wait for them, and what does not fit in the free part of its cache
/// (`total_blocks`, 0 = unknown) evicts blocks of cached prefixes.
fn side_cost(new_blocks: u64, requests: u64, cached_blocks: u64, total_blocks: u64) -> u64 {
    let interference = new_blocks * requests;
    let evicted = if total_blocks == 0 {
        0
    } else {
        (cached_blocks + new_blocks)
            .saturating_sub(total_blocks)
            .min(new_blocks)
    };
    interference + evicted
}

fn softmax_pick(eval: &[Scored], temperature: f64, rng: &mut impl Rng) -> usize {
    let (min, max) = eval.iter().fold((f64::MAX, f64::MIN), |(lo, hi), e| {
        (lo.min(e.cost), hi.max(e.cost))
    });
    if eval.len() <= 1 || max - min <= f64::EPSILON {
        return rng.random_range(0..eval.len());
    }
    let logits: Vec<f64> = eval
        .iter()
        .map(|e| -(e.cost / (max - min)) / temperature)
        .collect();
    let top = logits.iter().cloned().fold(f64::MIN, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    eval.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(config: KvRouterConfig) -> KvRouter {
        KvRouter::new(config, 4, RouterMetrics::unregistered().unwrap())
    }

    fn stored(tokens: &[u32]) -> KvCacheEventData {
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: None,
            blocks: sequence_hashes(tokens, 4)
                .iter()
                .map(|h| KvCacheStoredBlock {
                    block_hash: h.sequence,
                    tokens_hash: h.local,
                })
                .collect(),
        })
    }

    fn cands(ids: &[u64]) -> Vec<Candidate> {
        ids.iter()
            .map(|&worker_id| Candidate {
                worker_id,
                total_blocks: 100,
            })
            .collect()
    }

    #[test]
    fn prefix_holder_wins_until_its_load_outweighs_the_overlap() {
        let r = router(KvRouterConfig::default());
        let prompt: Vec<u32> = (0..40).collect();
        assert_eq!(r.apply_event(2, 0, &stored(&prompt)), Intake::Applied);
        let d = r.route(&prompt, &cands(&[1, 2, 3])).unwrap();
        assert_eq!((d.worker_id, d.overlap_blocks), (2, 10));
        // The repeat shares all ten blocks with the request in flight there, so it adds no
        // block to worker 2 (cost 0 + 10) against 10 + 10 elsewhere.
        let d2 = r.route(&prompt, &cands(&[1, 2, 3])).unwrap();
        assert_eq!(d2.worker_id, 2);
        // Pile load on worker 2: 200 blocks of decode make it the worst choice.
        let _heavy: Vec<_> = (0..20u64)
            .map(|i| {
                r.active()
                    .add(2, 0, (i * 100..i * 100 + 10).collect(), false)
            })
            .collect();
        let d3 = r.route(&prompt, &cands(&[1, 2, 3])).unwrap();
        assert_ne!(d3.worker_id, 2);
        drop((d, d2, d3));
    }

    /// The worker (1 or 2) a 40-token prompt goes to under `model` when worker 2 holds it and
    /// `in_flight` has registered the requests already routed.
    fn pick_for_a_prompt_on_worker_2(
        model: CostModel,
        in_flight: impl Fn(&KvRouter) -> Vec<LoadGuard>,
    ) -> u64 {
        let prompt: Vec<u32> = (0..40).collect();
        let r = router(KvRouterConfig {
            cost_model: model,
            ..Default::default()
        });
        r.apply_event(2, 0, &stored(&prompt));
        let _g = in_flight(&r);
        r.route(&prompt, &cands(&[1, 2])).unwrap().worker_id
    }

    #[test]
    fn a_move_must_pay_for_the_prefill_it_puts_on_busy_workers() {
        // Worker 2 holds the prompt and runs three requests of 10 blocks of their own;
        // worker 1 runs two one-block requests.
        let busy = |r: &KvRouter| {
            (0..3u64)
                .map(|i| {
                    r.active()
                        .add(2, 0, (i * 100..i * 100 + 10).collect(), false)
                })
                .chain((0..2u64).map(|i| r.active().add(1, 0, vec![9000 + i], false)))
                .collect()
        };
        // Dynamo's formula: worker 2 costs 0 + 30 + 10 = 40, worker 1 10 + 2 + 10 = 22.
        assert_eq!(pick_for_a_prompt_on_worker_2(CostModel::Dynamo, busy), 1);
        // Blocks in flight at a quarter, and computing the 10 blocks on worker 1 delays its
        // two requests: worker 2 0 + 40 / 4 = 10, worker 1 10 + 12 / 4 + 20 = 33.
        assert_eq!(pick_for_a_prompt_on_worker_2(CostModel::Work, busy), 2);
    }

    #[test]
    fn one_request_more_in_flight_does_not_move_a_conversation_off_its_prompt() {
        // Worker 2 holds the prompt and runs another conversation as long (12 blocks);
        // worker 1 is idle with nothing cached.
        let one_more = |r: &KvRouter| vec![r.active().add(2, 0, (100..112).collect(), false)];
        // Dynamo's formula: worker 2 costs 0 + 12 + 10 = 22, worker 1 10 + 10 = 20: the
        // conversation moves and its whole prompt is computed again.
        assert_eq!(
            pick_for_a_prompt_on_worker_2(CostModel::Dynamo, one_more),
            1
        );
        // In flight at a quarter: worker 2 22 / 4 = 5.5, worker 1 10 + 10 / 4 = 12.5.
        assert_eq!(pick_for_a_prompt_on_worker_2(CostModel::Work, one_more), 2);
    }

    #[test]
    fn side_cost_counts_waiting_requests_and_evicted_blocks() {
        assert_eq!(side_cost(10, 0, 0, 100), 0);
        assert_eq!(side_cost(10, 3, 0, 100), 30);
        // 95 cached of 100: 5 of the 10 new blocks evict; a full cache evicts all 10.
        assert_eq!(side_cost(10, 0, 95, 100), 5);
        assert_eq!(side_cost(10, 1, 100, 100), 20);
        assert_eq!(
            side_cost(10, 0, 1000, 0),
            0,
            "unknown size: no eviction counted"
        );
        assert_eq!(
            side_cost(0, 5, 100, 100),
            0,
            "a cached request costs others nothing"
        );
    }

    #[test]
    fn a_burst_of_one_prefix_lands_where_the_first_went_before_any_event() {
        let r = router(KvRouterConfig::default());
        let system: Vec<u32> = (0..128).collect();
        let ask =
            |q: u32| -> Vec<u32> { system.iter().copied().chain(q * 100..q * 100 + 8).collect() };
        let mut first = r.route(&ask(1), &cands(&[1, 2, 3])).unwrap();
        assert_eq!(first.overlap_blocks, 0, "nothing indexed yet");
        // Its prompt is computed (its first token is out); its events have not arrived.
        first.guard.prefill_done();
        let rest: Vec<_> = (2..6)
            .map(|q| r.route(&ask(q), &cands(&[1, 2, 3])).unwrap())
            .collect();
        for d in &rest {
            assert_eq!(
                d.worker_id, first.worker_id,
                "the shared prefix is in flight there"
            );
            assert_eq!(d.overlap_blocks, 32, "its 32 blocks count as cached");
        }
        // Once those requests end, only the index counts: nothing cached anywhere yet.
        drop((first, rest));
        let d = r.route(&ask(7), &cands(&[1, 2, 3])).unwrap();
        assert_eq!(d.overlap_blocks, 0);
    }

    #[test]
    fn ties_go_to_the_less_loaded_worker_and_distinct_prompts_spread() {
        let r = router(KvRouterConfig::default());
        let mut guards = Vec::new();
        let mut per = HashMap::new();
        for i in 0..30u32 {
            let p: Vec<u32> = (i * 1000..i * 1000 + 32).collect();
            let d = r.route(&p, &cands(&[1, 2, 3])).unwrap();
            *per.entry(d.worker_id).or_insert(0) += 1;
            guards.push(d);
        }
        assert_eq!(
            per.values()
                .copied()
                .collect::<Vec<_>>()
                .iter()
                .sum::<i32>(),
            30
        );
        assert!(per.values().all(|&n| n == 10), "{per:?}");
        drop(guards);
        assert!(
            r.active()
                .all()
                .values()
                .all(|l| *l == crate::sequences::WorkerLoad::default()),
            "every guard released its load"
        );
    }

    #[test]
    fn event_ids_detect_gaps_restarts_and_stale_events() {
        let r = router(KvRouterConfig::default());
        let p: Vec<u32> = (0..8).collect();
        assert_eq!(
            r.apply_event(5, 3, &stored(&p)),
            Intake::Resync(ResyncReason::Joined)
        );
        r.apply_dump(
            &KvStateDump {
                worker_id: 5,
                last_event_id: Some(3),
                stored: vec![match stored(&p) {
                    KvCacheEventData::Stored(s) => s,
                    _ => unreachable!(),
                }],
            },
            ResyncReason::Joined,
        );
        assert_eq!(r.tree_size(5), 2);
        assert_eq!(
            r.apply_event(5, 3, &KvCacheEventData::Cleared),
            Intake::Stale
        );
        assert_eq!(
            r.apply_event(5, 4, &KvCacheEventData::Cleared),
            Intake::Applied
        );
        assert_eq!(r.tree_size(5), 0);
        assert_eq!(
            r.apply_event(5, 9, &KvCacheEventData::Cleared),
            Intake::Resync(ResyncReason::Gap)
        );
        assert_eq!(
            r.apply_event(5, 0, &KvCacheEventData::Cleared),
            Intake::Resync(ResyncReason::Restart)
        );
        assert_eq!(r.apply_event(6, 0, &stored(&p)), Intake::Applied);
        r.remove_worker(6);
        assert!(r.indexed_workers().is_empty());
    }

    #[test]
    fn approximate_mode_remembers_routes_until_the_ttl() {
        let r = router(KvRouterConfig {
            use_kv_events: false,
            approx_ttl: Duration::from_millis(50),
            ..Default::default()
        });
        let p: Vec<u32> = (0..64).collect();
        let first = r.route(&p, &cands(&[1, 2, 3])).unwrap();
        drop(first.guard);
        for _ in 0..5 {
            let d = r.route(&p, &cands(&[1, 2, 3])).unwrap();
            assert_eq!(d.worker_id, first.worker_id);
            assert_eq!(d.overlap_blocks, 16);
        }
        r.expire_approx(Instant::now() + Duration::from_millis(60));
        assert_eq!(r.tree_size(first.worker_id), 0);
    }

    #[test]
    fn temperature_samples_but_prefers_cheap_workers() {
        let r = router(KvRouterConfig {
            temperature: 0.5,
            ..Default::default()
        });
        let p: Vec<u32> = (0..400).collect();
        r.apply_event(1, 0, &stored(&p));
        let mut hits = 0;
        for _ in 0..200 {
            let d = r.route(&p, &cands(&[1, 2])).unwrap();
            hits += usize::from(d.worker_id == 1);
        }
        assert!(hits > 150 && hits < 200, "{hits}");
    }
}
