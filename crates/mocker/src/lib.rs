//! The mocker: an engine that behaves like vLLM's scheduler without a model (Dynamo §7).
//!
//! It runs the same step skeleton as the candle engine ([`Batcher`]: admission under
//! `max_num_seqs`, the `max_num_batched_tokens` budget and the free-block watermark over a
//! real [`BlockPool`], so prefix caching, LRU eviction and block events are the real thing;
//! preemption of the newest admitted sequence when blocks run out). Only the compute is
//! simulated: a step lasts what Dynamo 1.6.1's mocker's polynomial timing model says, divided
//! by `--speedup-ratio` (0: no delay at all) — one prefill charge for all the tokens the step
//! computes anew, then one decode pass whose cost grows with the KV tokens of the sequences
//! it serves (their prompt and output lengths, over the cache's capacity in tokens) — and
//! each sequence's token is a pseudo-random id that avoids the low, special ids, so no
//! end-of-sequence ever ends a choice early.
//!
//! Chunked prefill (on by default, as in Dynamo's mocker and vLLM): each running decode takes
//! one token of a step's `max_num_batched_tokens`, prompts in admission order share what is
//! left, and a new prompt is admitted only while some is left; a prompt longer than its share
//! is computed over several steps ([`Progress::Chunk`]), each with a decode pass of the
//! others, and only the step that finishes it yields its first token. Off, a prompt is
//! computed in the step that admits it, however long.
//!
//! A step's tokens go out when its simulated time has passed ([`TokenTiming::AfterStep`]), as
//! a forward pass's do, so a request's TTFT includes the whole step that computed its prompt.
//! Dynamo 1.6.1's mocker lets a step's prefill time pass, sends the step's tokens, then lets
//! its decode pass's time pass, so its first tokens come one decode pass sooner (5–26 ms at
//! the KV usages of `scripts/bench-router.sh`); [`TokenTiming::AfterPrefill`] does the same,
//! so that a benchmark beside that mocker compares routers, not token timings.
//!
//! Disaggregation: the mocker plays both roles with the same block accounting as the candle
//! engine (a prefill leg holds its blocks until fetched or released; a decode leg's import
//! skips the prompt's cost). Its blocks carry no data (layout dtype `mock`, zero bytes on the
//! wire); instead a transfer is made to last `blocks × block_size × kv_bytes_per_token /
//! kv_transfer_bandwidth` ([`KvTransfer::simulated_delay`], divided by the speedup ratio).
//!
//! Its tokens are drawn uniformly from the plain ids, so the logprobs it reports when asked
//! are those of that uniform distribution (every alternative as likely as the token drawn).
//! It follows no grammar: structured output is refused (the candle engine has it).
//!
//! For testing failure paths, `fail_after_tokens` makes a step fail (as a forward pass can)
//! as soon as a sequence in it has generated that many tokens.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_engine_api::{
    Batcher, BatchingArgs, CacheIndex, Disagg, Engine, EngineError, EngineStats, EngineStream,
    Intake, KvTransfer, Progress, Queued, Seq,
};
use tandem_kv::{BlockPool, EventTap};
use tandem_protocols::card::ModelRuntimeConfig;
use tandem_protocols::disagg::KvLayout;
use tandem_protocols::llm::{PreprocessedRequest, TokenLogprob};
use tokio::sync::mpsc;

/// The mocker's settings: the shared batching flags plus its timing.
#[derive(Debug, Clone)]
pub struct MockerArgs {
    pub num_blocks: usize,
    pub block_size: usize,
    pub batching: BatchingArgs,
    /// Divides every simulated delay; 0 removes them.
    pub speedup_ratio: f64,
    /// Fail a step once a sequence in it has generated this many tokens (fault injection).
    pub fail_after_tokens: Option<u32>,
    /// KV bytes one token would take on the simulated model (sizes simulated transfers).
    pub kv_bytes_per_token: u64,
    /// Simulated KV transfer bandwidth in bytes per second.
    pub kv_transfer_bandwidth: f64,
    /// When a step's tokens are sent: after its simulated time, or after its prefill part.
    pub token_timing: TokenTiming,
    /// Split prompts longer than a step's token budget over several steps.
    pub enable_chunked_prefill: bool,
}

/// When the mocker sends the tokens a step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TokenTiming {
    /// When the step's simulated time has passed, as a real engine's forward pass delivers
    /// them: a request's TTFT includes the whole step that prefilled it.
    #[default]
    AfterStep,
    /// When the step's prefill time has passed, before its decode pass's: what Dynamo 1.6.1's
    /// mocker does (every token a decode pass sooner; inter-token latency unchanged). For
    /// side-by-side benchmarks with that mocker.
    AfterPrefill,
}

/// Llama-3-8B in bf16: 32 layers × 8 KV heads × 128 × 2 (K, V) × 2 bytes.
pub const DEFAULT_KV_BYTES_PER_TOKEN: u64 = 131_072;
/// 25 GB/s, an RDMA NIC's order of magnitude.
pub const DEFAULT_KV_TRANSFER_BANDWIDTH: f64 = 25e9;

/// Dynamo mocker's defaults for what the shared flags leave unset.
pub const DEFAULT_NUM_BLOCKS: usize = 16384;
pub const DEFAULT_BLOCK_SIZE: usize = 64;

impl MockerArgs {
    pub fn new(batching: &BatchingArgs, speedup_ratio: f64) -> Self {
        Self {
            num_blocks: batching.num_blocks.unwrap_or(DEFAULT_NUM_BLOCKS),
            block_size: batching.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            batching: batching.clone(),
            speedup_ratio,
            fail_after_tokens: None,
            kv_bytes_per_token: DEFAULT_KV_BYTES_PER_TOKEN,
            kv_transfer_bandwidth: DEFAULT_KV_TRANSFER_BANDWIDTH,
            token_timing: TokenTiming::default(),
            enable_chunked_prefill: true,
        }
    }
}

impl Default for MockerArgs {
    fn default() -> Self {
        Self::new(&BatchingArgs::default(), 1.0)
    }
}

/// Lowest token id the mocker emits: below it are the special tokens of common vocabularies.
const FIRST_PLAIN_TOKEN: u32 = 32;
/// Length of a choice whose request set no `max_tokens`.
const DEFAULT_MAX_TOKENS: u32 = 16;

pub struct MockEngine {
    args: MockerArgs,
    vocab: u32,
    tx: mpsc::UnboundedSender<Intake<MockSeq>>,
    transfer: Arc<MockTransfer>,
    stats: Arc<Mutex<EngineStats>>,
    events: EventTap,
}

impl MockEngine {
    /// Starts the scheduler task; `vocab_size` bounds the emitted token ids.
    pub fn start(args: MockerArgs, vocab_size: u32) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(EngineStats {
            total_blocks: args.num_blocks as u64,
            ..Default::default()
        }));
        let events = EventTap::new();
        let pool = BlockPool::new(
            args.num_blocks,
            args.block_size,
            args.batching.enable_prefix_caching,
        );
        let mut limits = args.batching.limits();
        limits.chunked_prefill = args.enable_chunked_prefill;
        let batcher = Batcher::new(pool, limits, usize::MAX, events.clone(), stats.clone());
        let transfer = Arc::new(MockTransfer {
            tx: tx.clone(),
            index: batcher.cache_index(),
            block_size: args.block_size,
            bytes_per_block: args.kv_bytes_per_token as f64 * args.block_size as f64,
            bandwidth: args.kv_transfer_bandwidth,
            speedup_ratio: args.speedup_ratio,
        });
        let scheduler = Scheduler {
            batcher,
            capacity_tokens: args.num_blocks * args.block_size,
            speedup_ratio: args.speedup_ratio,
            fail_after_tokens: args.fail_after_tokens,
            token_timing: args.token_timing,
            vocab: vocab_size.max(FIRST_PLAIN_TOKEN + 1),
            pacer: Pacer::default(),
        };
        tokio::spawn(scheduler.run(rx));
        Arc::new(Self {
            args,
            vocab: vocab_size,
            tx,
            transfer,
            stats,
            events,
        })
    }
}

impl Engine for MockEngine {
    fn generate_leg(
        &self,
        mut request: PreprocessedRequest,
        disagg: Disagg,
    ) -> Result<EngineStream, EngineError> {
        tandem_engine_api::check_leg(&request.token_ids, &disagg, self.vocab as usize)?;
        if request.sampling.guided_decoding.is_some() {
            return Err(EngineError::Invalid(
                "structured output: the mocker engine cannot follow a grammar; use the candle engine".into(),
            ));
        }
        request.stop.max_tokens.get_or_insert(DEFAULT_MAX_TOKENS);
        // Its tokens are random: an end-of-sequence id among them would end choices at random
        // lengths. Like Dynamo's mocker, it generates until the length limit.
        request.stop.stop_token_ids.clear();
        let seed = request.sampling.seed.unwrap_or_else(|| {
            request
                .token_ids
                .iter()
                .fold(0x9e37_79b9, |h, t| h ^ (*t as u64 + h.rotate_left(5)))
        });
        let (out, stream) = tandem_engine_api::output_channel(request.sampling.n);
        let logprobs = request.output_options.logprobs;
        let mut seqs = Seq::for_leg(&request, disagg, &out, |index| MockSeq {
            rng: seed ^ (index as u64).wrapping_mul(0xa076_1d64_78bd_642f),
            logprobs,
        })?;
        let vocab = self.vocab.max(FIRST_PLAIN_TOKEN + 1);
        for mut seq in seqs.drain(..) {
            // A decode leg continues the generator where the prefill worker's left it, so
            // that disaggregated output equals aggregated output.
            for _ in 0..seq.generated {
                next_token(&mut seq.ext.rng, vocab);
            }
            self.tx
                .send(Intake::Seq(Box::new(seq)))
                .map_err(|_| EngineError::Stopped)?;
        }
        Ok(stream)
    }

    fn kv_transfer(&self) -> Arc<dyn KvTransfer> {
        self.transfer.clone()
    }

    fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime_config(&self) -> ModelRuntimeConfig {
        ModelRuntimeConfig {
            total_kv_blocks: self.args.num_blocks as u64,
            max_num_seqs: self.args.batching.max_num_seqs as u64,
            max_num_batched_tokens: self.args.batching.max_num_batched_tokens as u64,
            data_parallel_size: 1,
            ..Default::default()
        }
    }

    fn block_size(&self) -> u32 {
        self.args.block_size as u32
    }

    fn subscribe_kv_events(&self) -> mpsc::UnboundedReceiver<tandem_kv::BlockEvent> {
        self.events.subscribe()
    }
}

/// The mocker's transfers: real block accounting, no data, simulated time.
struct MockTransfer {
    tx: mpsc::UnboundedSender<Intake<MockSeq>>,
    index: CacheIndex,
    block_size: usize,
    bytes_per_block: f64,
    bandwidth: f64,
    speedup_ratio: f64,
}

impl KvTransfer for MockTransfer {
    fn layout(&self) -> KvLayout {
        KvLayout {
            block_size: self.block_size as u32,
            dtype: "mock".into(),
            ..Default::default()
        }
    }

    fn read_block(&self, _id: u32, _out: &mut Vec<u8>) -> Result<(), EngineError> {
        Ok(())
    }

    fn cached_prefix(&self, hashes: &[u64]) -> usize {
        self.index.cached_prefix(hashes)
    }

    fn release(&self, transfer_id: u64) {
        let _ = self.tx.send(Intake::Release(transfer_id));
    }

    fn simulated_delay(&self, blocks: usize) -> Duration {
        if self.speedup_ratio <= 0.0 || self.bandwidth <= 0.0 {
            return Duration::ZERO;
        }
        let secs = blocks as f64 * self.bytes_per_block / self.bandwidth / self.speedup_ratio;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO)
    }

    fn simulated_block_bytes(&self) -> u64 {
        self.bytes_per_block as u64
    }
}

struct Scheduler {
    batcher: Batcher<MockSeq>,
    /// Tokens the KV cache holds when full (blocks × block size): KV usage's denominator.
    capacity_tokens: usize,
    speedup_ratio: f64,
    fail_after_tokens: Option<u32>,
    token_timing: TokenTiming,
    vocab: u32,
    /// When each step is due to end (see [`Pacer`]).
    pacer: Pacer,
}

/// The timer's granularity: a sleep shorter than this lasts about this long.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// The most lateness a busy engine makes up for by shortening its next steps.
const MAX_LAG: Duration = Duration::from_millis(10);

/// When each simulated step ends, so that a busy stretch of steps lasts what the model says.
/// Steps are chained: each starts when the one before was *due* to end, not when its sleep
/// happened to end. A sleep ends late — tokio's timer rounds up to its millisecond tick and a
/// loaded machine wakes the task later still (measured ~0.85 ms a step on an idle 2-core box,
/// 14 % of a 6 ms decode step) — and that lateness is taken off the next steps (up to
/// [`MAX_LAG`], so a long stall is not followed by a burst). A step shorter than the tick would
/// last a whole one if slept for on its own (at `--speedup-ratio 100` a decode step at low KV
/// usage is ~0.06 ms), so steps run back to back while the time they owe stays under a tick
/// and sleep once it does. Time spent idle is not credited: the chain restarts at the first
/// step after [`Self::idle`].
#[derive(Default)]
struct Pacer {
    due: Option<tokio::time::Instant>,
}

impl Pacer {
    /// Plans a step of `work` starting at `now`: the instant to sleep until, or `None` to
    /// run the next step at once (it is due within a tick).
    fn plan(&mut self, now: tokio::time::Instant, work: Duration) -> Option<tokio::time::Instant> {
        let start = match self.due {
            Some(due) => due.max(now.checked_sub(MAX_LAG).unwrap_or(now)),
            None => now,
        };
        let due = start + work;
        self.due = Some(due);
        (due.saturating_duration_since(now) >= TIMER_TICK).then_some(due)
    }

    /// The engine has nothing to run: the next step starts a new chain.
    fn idle(&mut self) {
        self.due = None;
    }
}

/// Dynamo 1.6.1 mocker's prefill cost in ms of a pass computing `t` new tokens (charged once
/// per pass, not per sequence; nothing when nothing is prefilled).
fn prefill_ms(t: usize) -> f64 {
    if t == 0 {
        return 0.0;
    }
    let t = t as f64;
    4.209989e-07 * t * t + 1.518344e-02 * t + 16.50142
}

/// Dynamo 1.6.1 mocker's decode pass cost in ms at KV usage `p` (0..1): the KV tokens of the
/// sequences decoded in the pass over the cache's capacity in tokens. At least 1 ms.
fn decode_ms(p: f64) -> f64 {
    let p = p.clamp(0.0, 1.0);
    (-25.74 * p * p + 54.01 * p + 5.74).max(1.0)
}

/// One token to feed is a decode, not a prefill: a decode leg whose prompt blocks were imported
/// starts with just the first token, as does a fully cached prompt.
fn is_decode(s: &Seq<MockSeq>) -> bool {
    s.to_compute() <= 1
}

/// One choice as the mocker keeps it: its generator, and how many alternatives its logprobs
/// list (when asked for).
pub struct MockSeq {
    rng: u64,
    logprobs: Option<u32>,
}

/// The logprobs of `token` drawn uniformly from the plain ids below `vocab`: every one is
/// equally likely, so the alternatives are the token and the ids after it.
fn uniform_logprob(token: u32, vocab: u32, top: u32) -> TokenLogprob {
    let n = vocab - FIRST_PLAIN_TOKEN;
    let lp = -(n as f32).ln();
    TokenLogprob {
        logprob: lp,
        top: (0..top.min(n))
            .map(|i| (FIRST_PLAIN_TOKEN + (token - FIRST_PLAIN_TOKEN + i) % n, lp))
            .collect(),
    }
}

fn next_token(rng: &mut u64, vocab: u32) -> u32 {
    // splitmix64
    *rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *rng;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    FIRST_PLAIN_TOKEN + (z % (vocab - FIRST_PLAIN_TOKEN) as u64) as u32
}

impl Scheduler {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Intake<MockSeq>>) {
        loop {
            while let Ok(item) = rx.try_recv() {
                self.batcher.intake(item);
            }
            if self.batcher.is_idle() {
                self.batcher.publish();
                self.pacer.idle();
                match rx.recv().await {
                    Some(item) => self.batcher.intake(item),
                    None => return,
                }
                continue;
            }
            self.batcher.schedule();
            // Statistics show the step's batch while it is simulated, as a real engine's do
            // while it computes.
            self.batcher.publish();
            let plan = self.batcher.plan();
            let (prefill, decode) = self.simulated_ms(&plan);
            match self.token_timing {
                TokenTiming::AfterStep => {
                    self.pace(prefill + decode).await;
                    self.step(&plan);
                }
                TokenTiming::AfterPrefill => {
                    self.pace(prefill).await;
                    // A failed step ends its batch: no decode pass follows.
                    if self.step(&plan) {
                        self.pace(decode).await;
                    }
                }
            }
            self.batcher.publish();
        }
    }

    /// Lets the step last `work_ms` of simulated time divided by the speed-up ratio, as
    /// [`Pacer`] plans it.
    async fn pace(&mut self, work_ms: f64) {
        if self.speedup_ratio <= 0.0 || work_ms <= 0.0 {
            tokio::task::yield_now().await;
            return;
        }
        let work = Duration::from_secs_f64(work_ms / 1000.0 / self.speedup_ratio);
        match self.pacer.plan(tokio::time::Instant::now(), work) {
            Some(due) => tokio::time::sleep_until(due).await,
            None => tokio::task::yield_now().await,
        }
    }

    /// How long the step would take on a real engine, in ms: one prefill charge for the prompt
    /// tokens it computes (`plan`), and one decode pass over every running sequence.
    fn simulated_ms(&self, plan: &[Option<usize>]) -> (f64, f64) {
        let running = &self.batcher.running;
        if running.is_empty() {
            return (0.0, 0.0);
        }
        let new_tokens: usize = running
            .iter()
            .zip(plan)
            .filter(|(s, _)| !is_decode(s))
            .map(|(s, chunk)| chunk.unwrap_or(s.to_compute()))
            .sum();
        // Logical lengths, as Dynamo's model counts them: a shared prefix counts once per
        // sequence that attends to it.
        let kv_tokens: usize = running.iter().map(|s| s.tokens.len()).sum();
        (
            prefill_ms(new_tokens),
            decode_ms(kv_tokens as f64 / self.capacity_tokens.max(1) as f64),
        )
    }

    /// Computes the step `plan` describes; false when it failed (fault injection).
    fn step(&mut self, plan: &[Option<usize>]) -> bool {
        // Its blocks carry no data: imports have nothing to write.
        self.batcher.take_writes();
        let running = &mut self.batcher.running;
        if running.is_empty() {
            return true;
        }
        if let Some(limit) = self.fail_after_tokens
            && running.iter().any(|s| s.generated >= limit)
        {
            tracing::warn!(limit, "mocker: injected step failure");
            self.batcher.fail(EngineError::StepFailed(format!(
                "injected failure after {limit} tokens"
            )));
            return false;
        }
        let vocab = self.vocab;
        let progress: Vec<Progress> = running
            .iter_mut()
            .zip(plan)
            .map(|(s, chunk)| match chunk {
                Some(n) => Progress::Chunk(*n),
                None => {
                    let token = next_token(&mut s.ext.rng, vocab);
                    let lp = s.ext.logprobs.map(|k| uniform_logprob(token, vocab, k));
                    Progress::Done(Ok((token, lp)))
                }
            })
            .collect();
        self.batcher.complete_progress(progress);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tandem_protocols::llm::{EngineOutput, FinishReason, SamplingOptions, StopConditions};

    async fn outputs(s: EngineStream) -> Vec<EngineOutput> {
        s.map(|o| o.unwrap()).collect().await
    }

    fn request(prompt: Vec<u32>, max_tokens: u32, n: u32) -> PreprocessedRequest {
        PreprocessedRequest {
            model: "m".into(),
            token_ids: prompt,
            sampling: SamplingOptions {
                n,
                seed: Some(7),
                ..Default::default()
            },
            stop: StopConditions {
                max_tokens: Some(max_tokens),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn args(blocks: usize) -> MockerArgs {
        MockerArgs {
            num_blocks: blocks,
            block_size: 4,
            speedup_ratio: 0.0,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn logprobs_are_those_of_its_uniform_draw_and_grammars_are_refused() {
        let engine = MockEngine::start(args(64), 1000);
        let mut req = request((0..10).collect(), 4, 1);
        req.output_options.logprobs = Some(3);
        let outs = outputs(engine.generate(req.clone()).unwrap()).await;
        assert_eq!(outs.len(), 4);
        for o in &outs {
            let lp = &o.logprobs.as_ref().unwrap()[0];
            assert!((lp.logprob - -(968f32).ln()).abs() < 1e-6);
            assert_eq!(lp.top.len(), 3);
            assert_eq!(
                lp.top[0].0, o.token_ids[0],
                "the token drawn is among the likeliest"
            );
            assert!(
                lp.top
                    .iter()
                    .all(|(t, l)| *t >= FIRST_PLAIN_TOKEN && *t < 1000 && *l == lp.logprob)
            );
        }
        req.sampling.guided_decoding = Some(tandem_protocols::llm::GuidedDecoding::JsonObject);
        assert!(matches!(engine.generate(req), Err(EngineError::Invalid(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn steps_shorter_than_the_timer_tick_are_paced_to_the_model_on_average() {
        let engine = MockEngine::start(
            MockerArgs {
                speedup_ratio: 100.0,
                // Blocks to spare: KV usage (which slows decode steps) stays near 0.
                ..args(4096)
            },
            1000,
        );
        let start = tokio::time::Instant::now();
        let outs = outputs(engine.generate(request((0..10).collect(), 200, 1)).unwrap()).await;
        assert_eq!(outs.len(), 200);
        // One prefill of 10 tokens, then a decode pass per token at a KV usage of
        // (10 + tokens so far) / 16384: ~11.6 ms of model time at this speed-up. Sleeping
        // for each step alone would take 200 ticks (200 ms).
        let capacity = (4096 * 4) as f64;
        let model_ms = (prefill_ms(10)
            + (0..200)
                .map(|i| decode_ms((10 + i) as f64 / capacity))
                .sum::<f64>())
            / 100.0;
        assert!((11.0..12.5).contains(&model_ms), "{model_ms}");
        let took = start.elapsed().as_secs_f64() * 1e3;
        assert!(
            took >= model_ms - 1.0 && took <= model_ms + 3.0,
            "{took} ms for {model_ms} ms of model time"
        );
    }

    /// Milliseconds (paused clock) from a request to each of its outputs, on a fresh mocker at
    /// real speed with a step budget of 40 tokens.
    async fn output_times(
        chunked: bool,
        timing: TokenTiming,
        prompt: u32,
        max_tokens: u32,
    ) -> Vec<f64> {
        let mut a = MockerArgs {
            speedup_ratio: 1.0,
            enable_chunked_prefill: chunked,
            token_timing: timing,
            ..args(4096)
        };
        a.batching.max_num_batched_tokens = 40;
        let engine = MockEngine::start(a, 1000);
        let start = tokio::time::Instant::now();
        let mut s = engine
            .generate(request((0..prompt).collect(), max_tokens, 1))
            .unwrap();
        let mut at = Vec::new();
        while let Some(o) = s.next().await {
            o.unwrap();
            at.push(start.elapsed().as_secs_f64() * 1e3);
        }
        at
    }

    fn near(took: f64, model: f64) -> bool {
        (model - 0.5..=model + 1.5).contains(&took)
    }

    #[tokio::test(start_paused = true)]
    async fn a_prompt_over_the_step_budget_is_prefilled_in_chunks_before_its_first_token() {
        let capacity = (4096 * 4) as f64;
        let d = |kv: usize| decode_ms(kv as f64 / capacity);
        // 100 prompt tokens, 40 a step: chunks of 40, 40 and 20, each step with a decode pass.
        let chunked = output_times(true, TokenTiming::AfterStep, 100, 2).await;
        let model = 2.0 * (prefill_ms(40) + d(100)) + prefill_ms(20) + d(100);
        assert!(near(chunked[0], model), "{chunked:?} vs {model}");
        assert!(near(chunked[1] - chunked[0], d(101)), "{chunked:?}");
        // Off: one step for the whole prompt.
        let whole = output_times(false, TokenTiming::AfterStep, 100, 2).await;
        let model = prefill_ms(100) + d(100);
        assert!(near(whole[0], model), "{whole:?} vs {model}");
    }

    #[tokio::test(start_paused = true)]
    async fn after_prefill_timing_sends_a_steps_tokens_before_its_decode_pass() {
        let capacity = (4096 * 4) as f64;
        let d = |kv: usize| decode_ms(kv as f64 / capacity);
        // The first token leaves once the prefill charge has passed; every later one a decode
        // pass after the one before, as with after-step timing.
        let short = output_times(true, TokenTiming::AfterPrefill, 20, 3).await;
        assert!(near(short[0], prefill_ms(20)), "{short:?}");
        assert!(near(short[1] - short[0], d(20)), "{short:?}");
        assert!(near(short[2] - short[1], d(21)), "{short:?}");
        // A chunked prompt: its earlier chunks' whole steps, then the last chunk's prefill.
        let long = output_times(true, TokenTiming::AfterPrefill, 100, 2).await;
        let model = 2.0 * (prefill_ms(40) + d(100)) + prefill_ms(20);
        assert!(near(long[0], model), "{long:?} vs {model}");
    }

    #[test]
    fn a_late_wake_up_is_taken_off_the_next_steps_and_idle_time_is_not() {
        let ms = Duration::from_millis;
        let t0 = tokio::time::Instant::now();
        let mut p = Pacer::default();
        assert_eq!(p.plan(t0, ms(6)), Some(t0 + ms(6)));
        // The sleep ended 1.7 ms late: the next 6 ms step is due 12 ms after the first began.
        let woke = t0 + ms(6) + Duration::from_micros(1700);
        assert_eq!(p.plan(woke, ms(6)), Some(t0 + ms(12)));
        // Lateness beyond MAX_LAG is not made up.
        let stalled = t0 + ms(12) + ms(30);
        assert_eq!(p.plan(stalled, ms(16)), Some(stalled - MAX_LAG + ms(16)));
        // Owing less than a tick: run at once; the time owed carries over.
        let now = stalled - MAX_LAG + ms(16);
        assert_eq!(p.plan(now, Duration::from_micros(400)), None);
        assert_eq!(
            p.plan(now, Duration::from_micros(800)),
            Some(now + Duration::from_micros(1200))
        );
        // After idling, a step starts when it is planned.
        p.idle();
        let later = now + ms(500);
        assert_eq!(p.plan(later, ms(6)), Some(later + ms(6)));
    }

    #[test]
    fn timing_is_dynamo_1_6_1_polynomial_model() {
        // A cold 10,374-token prompt (the router benchmark's first turn) and a decode pass
        // of three such sequences on 16,384 blocks of 16 tokens.
        assert!((prefill_ms(10_374) - 219.3).abs() < 0.1);
        assert_eq!(prefill_ms(0), 0.0, "no prefill, no charge");
        assert!((decode_ms(3.0 * 10_374.0 / 262_144.0) - 11.79).abs() < 0.01);
        assert_eq!(decode_ms(0.0), 5.74);
        assert!(
            (decode_ms(1.0) - decode_ms(7.0)).abs() < 1e-12,
            "usage is capped"
        );
    }

    #[tokio::test]
    async fn generates_max_tokens_per_choice_and_frees_blocks() {
        let engine = MockEngine::start(args(64), 1000);
        let outs = outputs(engine.generate(request((0..10).collect(), 5, 2)).unwrap()).await;
        for index in 0..2 {
            let mine: Vec<_> = outs.iter().filter(|o| o.index == index).collect();
            assert_eq!(mine.len(), 5);
            assert_eq!(mine[4].finish_reason, Some(FinishReason::Length));
            assert!(mine.iter().all(|o| o.token_ids[0] >= FIRST_PLAIN_TOKEN));
        }
        tokio::task::yield_now().await;
        let s = engine.stats();
        assert_eq!(s.active_blocks, 0);
        // Same seed, same prompt: same tokens.
        let again = outputs(engine.generate(request((0..10).collect(), 5, 1)).unwrap()).await;
        let first: Vec<u32> = outs
            .iter()
            .filter(|o| o.index == 0)
            .map(|o| o.token_ids[0])
            .collect();
        let second: Vec<u32> = again.iter().map(|o| o.token_ids[0]).collect();
        assert_eq!(first, second);
        assert_eq!(
            again[0].cached_tokens,
            Some(8),
            "two full prompt blocks came from the cache"
        );
        tokio::task::yield_now().await;
        let s = engine.stats();
        // The second choice shares the first's two full prompt blocks, and so does the repeat.
        assert_eq!(s.cached_prompt_tokens, 8 + 8);
        assert_eq!(s.prefill_tokens, 10 + 2 + 2);
    }

    #[tokio::test]
    async fn small_pool_preempts_and_still_completes_everything() {
        // 12 blocks of 4 tokens; 8 requests needing 3..5 blocks each at the end.
        let engine = MockEngine::start(args(12), 1000);
        let mut streams = Vec::new();
        for k in 0..8u32 {
            streams.push(
                engine
                    .generate(request((k * 100..k * 100 + 6).collect(), 12, 1))
                    .unwrap(),
            );
        }
        for s in streams {
            let outs = outputs(s).await;
            assert_eq!(outs.len(), 12);
        }
        tokio::task::yield_now().await;
        assert_eq!(engine.stats().active_blocks, 0);
        assert!(engine.stats().preemptions > 0);
    }

    #[tokio::test]
    async fn dropping_the_stream_frees_its_blocks() {
        let mut a = args(64);
        a.speedup_ratio = 100.0;
        let engine = MockEngine::start(a, 1000);
        let mut s = engine
            .generate(request((0..40).collect(), 10_000, 1))
            .unwrap();
        s.next().await;
        assert!(engine.stats().active_blocks > 0);
        drop(s);
        for _ in 0..100 {
            if engine.stats().active_blocks == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("blocks not freed: {:?}", engine.stats());
    }

    #[tokio::test]
    async fn an_injected_step_failure_reaches_every_sequence_of_the_step_and_frees_blocks() {
        let mut a = args(64);
        a.fail_after_tokens = Some(3);
        let engine = MockEngine::start(a, 1000);
        let items: Vec<_> = engine
            .generate(request((0..10).collect(), 50, 2))
            .unwrap()
            .collect()
            .await;
        let tokens = items.iter().filter(|i| i.is_ok()).count();
        assert_eq!(
            tokens,
            2 * 3,
            "three tokens per choice before the failing step"
        );
        let errors: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
        assert_eq!(errors.len(), 2, "one error per choice: {items:?}");
        assert!(matches!(errors[0], EngineError::StepFailed(_)));
        tokio::task::yield_now().await;
        assert_eq!(engine.stats().active_blocks, 0);
    }

    #[tokio::test]
    async fn prefill_then_decode_legs_equal_one_aggregated_run() {
        let args = MockerArgs {
            speedup_ratio: 0.0,
            block_size: 4,
            num_blocks: 64,
            ..Default::default()
        };
        let (agg, prefill, decode) = (
            MockEngine::start(args.clone(), 1000),
            MockEngine::start(args.clone(), 1000),
            MockEngine::start(args, 1000),
        );
        let req = request((0..10).collect(), 6, 1);
        let whole: Vec<u32> = outputs(agg.generate(req.clone()).unwrap())
            .await
            .into_iter()
            .flat_map(|o| o.token_ids)
            .collect();
        let first = outputs(
            prefill
                .generate_leg(req.clone(), Disagg::Prefill { transfer_id: 3 })
                .unwrap(),
        )
        .await;
        let params = first[0].disaggregated_params.clone().unwrap();
        assert_eq!(params.block_ids.len(), 3);
        assert_eq!(prefill.stats().held_blocks, 3);
        prefill.kv_transfer().release(3);
        let import = tandem_engine_api::KvImport {
            first_token: first[0].token_ids[0],
            cached_tokens: first[0].cached_tokens,
            first_block: 0,
            blocks: vec![vec![]; 3],
            ..Default::default()
        };
        let rest: Vec<u32> = outputs(decode.generate_leg(req, Disagg::Decode(import)).unwrap())
            .await
            .into_iter()
            .flat_map(|o| o.token_ids)
            .collect();
        assert_eq!(rest, whole);
        // Stats are published after the step that sent the last output.
        for _ in 0..1000 {
            if prefill.stats().active_blocks == 0 && decode.stats().active_blocks == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let (p, d) = (prefill.stats(), decode.stats());
        assert_eq!((p.held_blocks, p.active_blocks), (0, 0));
        assert_eq!(d.imported_blocks, 3);
        assert_eq!(
            d.prefill_tokens, 0,
            "the decode leg computed no prompt token"
        );
        assert_eq!(
            prefill.kv_transfer().simulated_delay(0),
            Duration::ZERO,
            "nothing to move, no time"
        );
    }
}
