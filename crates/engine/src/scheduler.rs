//! Continuous batching over the paged cache.
//!
//! Each step: take new sequences off the channel and drop cancelled ones (their blocks go
//! back to the pool at once); give every running sequence a slot for its next token,
//! preempting the most recently admitted sequence (release its blocks, requeue it for
//! recomputation) when the pool is empty; then, if nothing was preempted, admit waiting
//! sequences while `max_num_seqs`, the `max_num_batched_tokens` budget and the free-block
//! watermark allow, each reusing its cached prefix. All decodes and admitted prefills run
//! as one [`Model::forward`]; each sequence samples its token, newly filled blocks are
//! registered in the prefix cache, and outputs go back on the request's channel.
//!
//! Prefills are not chunked: a prompt runs whole in the step that admits it, so a block a
//! sequence finds in the cache has been computed (or is computed in the same step, before
//! any attention reads it).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tandem_kv::{AdmitCounters, AdmitLimits, BlockPool, EventTap, Queued, SeqBlocks};
use tandem_protocols::llm::{EngineOutput, FinishReason, PreprocessedRequest, StopConditions};
use tandem_sampling::Sampler;
use tandem_worker::{BatchingArgs, EngineStats};
use tokio::sync::mpsc;

use crate::model::{KvCache, Model, StepSeq};

/// One choice of one request.
pub struct Seq {
    out: mpsc::UnboundedSender<EngineOutput>,
    index: u32,
    prompt_len: usize,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Option<SeqBlocks>,
    sampler: Sampler,
    stop: StopConditions,
    generated: u32,
    /// Prompt tokens found in the cache at first admission, sent with the first output.
    cached_tokens: Option<u32>,
}

impl Seq {
    /// One sequence per choice; they share the output channel.
    pub fn for_request(
        request: &PreprocessedRequest,
        out: mpsc::UnboundedSender<EngineOutput>,
    ) -> Vec<Seq> {
        (0..request.sampling.n.max(1))
            .map(|index| Seq {
                out: out.clone(),
                index,
                prompt_len: request.token_ids.len(),
                tokens: request.token_ids.clone(),
                computed: 0,
                blocks: None,
                sampler: Sampler::new(request.sampling.clone(), index as u64),
                stop: request.stop.clone(),
                generated: 0,
                cached_tokens: None,
            })
            .collect()
    }
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

pub struct Scheduler {
    model: Model,
    cache: KvCache,
    pool: BlockPool,
    args: BatchingArgs,
    max_model_len: usize,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: Arc<Mutex<EngineStats>>,
    events: EventTap,
    counters: AdmitCounters,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(
        model: Model,
        cache: KvCache,
        args: BatchingArgs,
        max_model_len: usize,
        stats: Arc<Mutex<EngineStats>>,
        events: EventTap,
    ) -> Self {
        Self {
            pool: BlockPool::new(
                cache.num_blocks,
                cache.block_size,
                args.enable_prefix_caching,
            ),
            model,
            cache,
            args,
            max_model_len,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats,
            events,
            counters: AdmitCounters::default(),
            preemptions: 0,
        }
    }

    /// Runs until every engine handle is gone.
    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<Seq>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                match rx.blocking_recv() {
                    Some(s) => self.waiting.push_back(s),
                    None => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.waiting.push_back(s);
            }
            self.step();
            self.publish();
        }
    }

    fn release(&mut self, seq: &mut Seq) {
        if let Some(b) = seq.blocks.take() {
            self.pool.release(b);
        }
        seq.computed = 0;
    }

    fn drop_cancelled(&mut self) {
        tandem_kv::queue::drop_cancelled(&mut self.pool, &mut self.running, &mut self.waiting);
    }

    /// Ends a sequence that can never run.
    fn reject(&mut self, mut seq: Seq, reason: FinishReason) {
        self.release(&mut seq);
        let _ = seq.out.send(EngineOutput {
            index: seq.index,
            token_ids: vec![],
            finish_reason: Some(reason),
            cached_tokens: None,
        });
    }

    fn step(&mut self) {
        self.drop_cancelled();
        // Room for every running sequence's next token, newest sequences giving way.
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() {
            let len = self.running[i].tokens.len();
            let grown = match self.running[i].blocks.as_mut() {
                Some(b) => self.pool.grow(b, len),
                None => false,
            };
            if grown {
                i += 1;
                continue;
            }
            let Some(mut victim) = self.running.pop() else {
                break;
            };
            self.release(&mut victim);
            self.preemptions += 1;
            tracing::debug!(
                index = victim.index,
                "preempted a sequence: out of KV blocks"
            );
            self.waiting.push_front(victim);
            preempted = true;
        }
        let n_decode = self.running.len();
        if !preempted {
            self.admit();
        }
        if self.running.is_empty() {
            return;
        }
        let batch: Vec<StepSeq> = self
            .running
            .iter()
            .map(|s| StepSeq {
                tokens: s.tokens[s.computed..].to_vec(),
                start: s.computed,
                block_table: s
                    .blocks
                    .as_ref()
                    .map(|b| b.blocks.iter().map(|id| id.0).collect())
                    .unwrap_or_default(),
            })
            .collect();
        debug_assert!(batch[..n_decode].iter().all(|s| s.tokens.len() == 1));
        let logits = match self.model.forward(&batch, &self.cache) {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails its sequences, not the engine.
                tracing::error!(error = %e, "forward pass failed");
                for s in std::mem::take(&mut self.running) {
                    self.reject(s, FinishReason::Cancelled);
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (i, mut row) in logits.into_iter().enumerate() {
            let seq = &mut self.running[i];
            seq.computed = seq.tokens.len();
            if let Some(b) = seq.blocks.as_mut() {
                self.pool.commit(b, &seq.tokens[..seq.computed]);
            }
            let token = seq.sampler.sample(&mut row, &seq.tokens[..seq.prompt_len]);
            seq.sampler.observe(token);
            seq.tokens.push(token);
            seq.generated += 1;
            let finish = finish_reason(seq, token, self.max_model_len);
            let sent = seq
                .out
                .send(EngineOutput {
                    index: seq.index,
                    token_ids: vec![token],
                    finish_reason: finish,
                    cached_tokens: seq.cached_tokens.take(),
                })
                .is_ok();
            if finish.is_some() || !sent {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.release(&mut s);
        }
        self.events.send_all(self.pool.drain_events());
    }

    /// Moves waiting sequences into `running` (behind the decodes) with their blocks.
    fn admit(&mut self) {
        let before = self.running.len();
        let limits = AdmitLimits {
            max_num_seqs: self.args.max_num_seqs,
            max_num_batched_tokens: self.args.max_num_batched_tokens,
            watermark: self.args.watermark,
        };
        let rejected = tandem_kv::queue::admit(
            &mut self.pool,
            &mut self.running,
            &mut self.waiting,
            limits,
            &mut self.counters,
        );
        for s in rejected {
            self.reject(s, FinishReason::Length);
        }
        for seq in &mut self.running[before..] {
            let cached = seq.blocks.as_ref().map_or(0, |b| b.cached_tokens);
            seq.computed = cached;
            if seq.is_fresh() {
                seq.cached_tokens = Some(cached as u32);
            }
        }
    }

    fn publish(&self) {
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

fn finish_reason(seq: &Seq, token: u32, max_model_len: usize) -> Option<FinishReason> {
    let stop = &seq.stop;
    let min_ok = seq.generated >= stop.min_tokens.unwrap_or(0);
    // The frontend leaves end-of-sequence ids out of the list when the request ignores EOS.
    if min_ok && stop.stop_token_ids.contains(&token) {
        return Some(FinishReason::Stop);
    }
    if stop.max_tokens.is_some_and(|m| seq.generated >= m) || seq.tokens.len() >= max_model_len {
        return Some(FinishReason::Length);
    }
    None
}
