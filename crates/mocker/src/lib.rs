//! The mocker: an engine that behaves like vLLM's scheduler without a model (Dynamo §7).
//!
//! Requests enter a waiting queue. Each iteration the scheduler admits waiting sequences while
//! `max_num_seqs`, the `max_num_batched_tokens` budget and the free-block watermark allow,
//! allocating their blocks from a real [`BlockPool`] (so prefix caching, LRU eviction and
//! block events are the real thing); then every running sequence gets one token. When a
//! sequence needs a block and none is left, it is preempted: its blocks are released and it
//! waits to be recomputed. An iteration lasts what Dynamo's timing model says (prefill time
//! for newly admitted tokens plus a decode time that grows with KV usage), divided by
//! `--speedup-ratio`; a ratio of 0 means no delay at all. Tokens are pseudo-random ids that
//! avoid the low, special ids, so no end-of-sequence ever ends a choice early.

use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_kv::{AdmitCounters, AdmitLimits, BlockPool, EventTap, Queued, SeqBlocks};
use tandem_protocols::card::ModelRuntimeConfig;
use tandem_protocols::llm::{EngineOutput, FinishReason, PreprocessedRequest};
use tandem_worker::{BatchingArgs, Engine, EngineError, EngineStats, EngineStream};
use tokio::sync::mpsc;

/// The mocker's settings: the shared batching flags plus its timing.
#[derive(Debug, Clone)]
pub struct MockerArgs {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Fraction of blocks kept free when admitting new sequences.
    pub watermark: f64,
    /// Divides every simulated delay; 0 removes them.
    pub speedup_ratio: f64,
    pub enable_prefix_caching: bool,
}

/// Dynamo mocker's defaults for what the shared flags leave unset.
pub const DEFAULT_NUM_BLOCKS: usize = 16384;
pub const DEFAULT_BLOCK_SIZE: usize = 64;

impl MockerArgs {
    pub fn new(batching: &BatchingArgs, speedup_ratio: f64) -> Self {
        Self {
            num_blocks: batching.num_blocks.unwrap_or(DEFAULT_NUM_BLOCKS),
            block_size: batching.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            max_num_seqs: batching.max_num_seqs,
            max_num_batched_tokens: batching.max_num_batched_tokens,
            watermark: batching.watermark,
            speedup_ratio,
            enable_prefix_caching: batching.enable_prefix_caching,
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
    tx: mpsc::UnboundedSender<Seq>,
    stats: Arc<Mutex<EngineStats>>,
    events: EventTap,
}

struct Seq {
    out: mpsc::Sender<EngineOutput>,
    index: u32,
    tokens: Vec<u32>,
    generated: u32,
    max_tokens: u32,
    blocks: Option<SeqBlocks>,
    rng: u64,
    /// Cached prompt tokens are reported once, with the first output.
    reported: bool,
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
        let scheduler = Scheduler {
            events: events.clone(),
            pool: BlockPool::new(args.num_blocks, args.block_size, args.enable_prefix_caching),
            args: args.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: stats.clone(),
            vocab: vocab_size.max(FIRST_PLAIN_TOKEN + 1),
            counters: AdmitCounters::default(),
            preemptions: 0,
        };
        tokio::spawn(scheduler.run(rx));
        Arc::new(Self {
            args,
            tx,
            stats,
            events,
        })
    }
}

impl Engine for MockEngine {
    fn generate(&self, request: PreprocessedRequest) -> Result<EngineStream, EngineError> {
        if request.token_ids.is_empty() {
            return Err(EngineError::Invalid("empty prompt".into()));
        }
        let n = request.sampling.n.max(1);
        let (out, rx) = mpsc::channel(64);
        let seed = request.sampling.seed.unwrap_or_else(|| {
            request
                .token_ids
                .iter()
                .fold(0x9e37_79b9, |h, t| h ^ (*t as u64 + h.rotate_left(5)))
        });
        for index in 0..n {
            let seq = Seq {
                out: out.clone(),
                index,
                tokens: request.token_ids.clone(),
                generated: 0,
                max_tokens: request.stop.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
                blocks: None,
                rng: seed ^ (index as u64).wrapping_mul(0xa076_1d64_78bd_642f),
                reported: false,
            };
            self.tx.send(seq).map_err(|_| EngineError::Stopped)?;
        }
        Ok(tokio_stream(rx))
    }

    fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime_config(&self) -> ModelRuntimeConfig {
        ModelRuntimeConfig {
            total_kv_blocks: self.args.num_blocks as u64,
            max_num_seqs: self.args.max_num_seqs as u64,
            max_num_batched_tokens: self.args.max_num_batched_tokens as u64,
            data_parallel_size: 1,
            kv_events_zmq: None,
        }
    }

    fn block_size(&self) -> u32 {
        self.args.block_size as u32
    }

    fn subscribe_kv_events(&self) -> mpsc::UnboundedReceiver<tandem_kv::BlockEvent> {
        self.events.subscribe()
    }
}

fn tokio_stream(mut rx: mpsc::Receiver<EngineOutput>) -> EngineStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

impl Queued for Seq {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn blocks_mut(&mut self) -> &mut Option<SeqBlocks> {
        &mut self.blocks
    }
    fn is_cancelled(&self) -> bool {
        self.out.is_closed()
    }
    fn is_fresh(&self) -> bool {
        self.generated == 0
    }
}

struct Scheduler {
    args: MockerArgs,
    events: EventTap,
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: Arc<Mutex<EngineStats>>,
    vocab: u32,
    /// Cumulative counters reported in [`EngineStats`].
    counters: AdmitCounters,
    preemptions: u64,
}

/// Dynamo mocker's prefill cost in ms for `t` newly computed tokens.
fn prefill_ms(t: usize) -> f64 {
    let t = t as f64;
    4.209989e-07 * t * t + 1.518344e-02 * t + 16.50142
}

/// Dynamo mocker's decode iteration cost in ms at KV usage `p` (0..1).
fn decode_ms(p: f64) -> f64 {
    -5.47 * p * p + 43.88 * p + 19.44
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
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Seq>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish_stats();
                match rx.recv().await {
                    Some(s) => self.waiting.push_back(s),
                    None => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.waiting.push_back(s);
            }
            self.drop_cancelled();
            let prefill = self.admit();
            let work_ms = if self.running.is_empty() {
                0.0
            } else {
                let s = self.pool.stats();
                prefill + decode_ms(s.active_blocks as f64 / s.total_blocks.max(1) as f64)
            };
            if self.args.speedup_ratio > 0.0 && work_ms > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(
                    work_ms / 1000.0 / self.args.speedup_ratio,
                ))
                .await;
            } else {
                tokio::task::yield_now().await;
            }
            self.step().await;
            self.publish_stats();
        }
    }

    fn release(&mut self, seq: &mut Seq) {
        if let Some(b) = seq.blocks.take() {
            self.pool.release(b);
        }
    }

    fn drop_cancelled(&mut self) {
        tandem_kv::queue::drop_cancelled(&mut self.pool, &mut self.running, &mut self.waiting);
    }

    /// Admits waiting sequences; returns the simulated prefill time in ms.
    fn admit(&mut self) -> f64 {
        let before = self.running.len();
        let limits = AdmitLimits {
            max_num_seqs: self.args.max_num_seqs,
            max_num_batched_tokens: self.args.max_num_batched_tokens,
            watermark: self.args.watermark,
        };
        for s in tandem_kv::queue::admit(
            &mut self.pool,
            &mut self.running,
            &mut self.waiting,
            limits,
            &mut self.counters,
        ) {
            // Can never fit: end it rather than block the queue forever.
            let _ = s.out.try_send(EngineOutput {
                index: s.index,
                token_ids: vec![],
                finish_reason: Some(FinishReason::Length),
                cached_tokens: None,
            });
        }
        self.running[before..]
            .iter()
            .map(|s| prefill_ms(s.tokens.len() - s.blocks.as_ref().map_or(0, |b| b.cached_tokens)))
            .sum()
    }

    async fn step(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let vocab = self.vocab;
            let seq = &mut self.running[i];
            let token = next_token(&mut seq.rng, vocab);
            seq.tokens.push(token);
            let len = seq.tokens.len();
            let grown = match seq.blocks.as_mut() {
                Some(b) => self.pool.grow(b, len),
                None => false,
            };
            if !grown {
                // Preempt: release everything, recompute later from the tokens so far.
                let mut s = self.running.swap_remove(i);
                s.tokens.pop();
                self.release(&mut s);
                self.preemptions += 1;
                tracing::debug!(
                    index = s.index,
                    "mocker preempted a sequence: out of KV blocks"
                );
                self.waiting.push_front(s);
                continue;
            }
            let seq = &mut self.running[i];
            if let Some(b) = seq.blocks.as_mut() {
                self.pool.commit(b, &seq.tokens);
            }
            seq.generated += 1;
            let done = seq.generated >= seq.max_tokens;
            let cached = (!seq.reported).then(|| {
                seq.blocks
                    .as_ref()
                    .map(|b| b.cached_tokens as u32)
                    .unwrap_or(0)
            });
            seq.reported = true;
            let out = EngineOutput {
                index: seq.index,
                token_ids: vec![token],
                finish_reason: done.then_some(FinishReason::Length),
                cached_tokens: cached,
            };
            let sent = seq.out.send(out).await.is_ok();
            if done || !sent {
                let mut s = self.running.swap_remove(i);
                self.release(&mut s);
                continue;
            }
            i += 1;
        }
        self.events.send_all(self.pool.drain_events());
    }

    fn publish_stats(&self) {
        let s = self.pool.stats();
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = EngineStats {
            total_blocks: s.total_blocks as u64,
            active_blocks: s.active_blocks as u64,
            prefix_hit_rate: s.prefix_hit_rate,
            running: self.running.len() as u64,
            waiting: self.waiting.len() as u64,
            prefill_tokens: self.counters.prefill_tokens,
            cached_prompt_tokens: self.counters.cached_prompt_tokens,
            preemptions: self.preemptions,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocols::llm::{SamplingOptions, StopConditions};

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
    async fn generates_max_tokens_per_choice_and_frees_blocks() {
        let engine = MockEngine::start(args(64), 1000);
        let outs: Vec<EngineOutput> = engine
            .generate(request((0..10).collect(), 5, 2))
            .unwrap()
            .collect()
            .await;
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
        let again: Vec<EngineOutput> = engine
            .generate(request((0..10).collect(), 5, 1))
            .unwrap()
            .collect()
            .await;
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
            let outs: Vec<_> = s.collect().await;
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
}
