//! The step skeleton both engines run: continuous batching over a [`BlockPool`].
//!
//! An engine's loop, each step:
//! 1. [`Batcher::enqueue`] new sequences (one per choice of a request).
//! 2. [`Batcher::schedule`]: drop cancelled sequences (blocks back at once); give every running
//!    sequence room for the token it computes next, **preempting the most recently admitted
//!    sequence** (blocks released, requeued at the front to be recomputed later, reusing its
//!    own cached blocks) while the pool is short — the one preemption rule, so that the oldest
//!    requests keep making progress; then, if nothing was preempted, admit waiting sequences
//!    behind the decodes ([`crate::queue::admit`]). Running sequences are in admission order.
//! 3. The engine computes one token for every running sequence (a forward pass, or the
//!    mocker's simulation) reading `tokens[computed..]` and the block table.
//! 4. [`Batcher::complete`] with those tokens: blocks now full are registered in the prefix
//!    cache, outputs go out with finish reasons, finished sequences free their blocks and the
//!    pool's block events are published. Or [`Batcher::fail`] when the step failed: every
//!    sequence in it gets the error and frees its blocks; the engine carries on.
//! 5. [`Batcher::publish`] the stats.
//!
//! Disaggregation ([`crate::transfer`]) adds two things to the skeleton. A prefill leg's
//! sequence, when it ends, keeps its blocks *held* under its transfer id (named in its last
//! output) until [`Intake::Release`]. A decode leg's sequence carries the prompt's KV: at
//! admission the blocks it did not find in the cache are queued as writes
//! ([`Batcher::take_writes`], which the engine applies before its forward pass), the first
//! token leaves at once, and it joins the batch as a decode. When the cache no longer holds
//! the prefix the import was fetched against, the sequence computes what it lacks instead.

use crate::queue::{self, AdmitCounters, AdmitLimits, Queued};
use crate::stream::OutputSender;
use crate::transfer::{CacheIndex, Disagg, KvImport};
use crate::{EngineError, EngineStats, StepHistogram};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tandem_kv::{BlockPool, EventTap, SeqBlocks};
use tandem_protocols::disagg::DisaggregatedParams;
use tandem_protocols::llm::{
    EngineOutput, FinishReason, PreprocessedRequest, StopConditions, TokenLogprob,
};

/// What a step computed for one running sequence: its next token (with its logprobs when
/// the request asked for them), or why that sequence alone cannot go on (its grammar
/// allows nothing).
pub type Computed = Result<(u32, Option<TokenLogprob>), EngineError>;

/// What a step did for one running sequence ([`Batcher::complete_progress`]).
pub enum Progress {
    /// It computed everything it had: its next token, or why it cannot go on.
    Done(Computed),
    /// It computed only this many more tokens of its prompt (chunked prefill: the step's
    /// token budget ran out); no token yet, the rest comes in later steps.
    Chunk(usize),
}

/// What reaches an engine's scheduler.
pub enum Intake<X> {
    Seq(Box<Seq<X>>),
    /// Free the blocks held for a transfer.
    Release(u64),
}

/// One choice of one request; `X` is what the engine keeps besides (a sampler, an RNG).
pub struct Seq<X> {
    out: OutputSender,
    pub index: u32,
    pub prompt_len: usize,
    /// Prompt and generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the cache.
    pub computed: usize,
    pub blocks: Option<SeqBlocks>,
    stop: StopConditions,
    pub generated: u32,
    /// Prompt tokens found in the cache at first admission, sent with the first output.
    cached_tokens: Option<u32>,
    /// Admitted before: a return after preemption is not a new prompt (its lookup would find
    /// the blocks of its own earlier chunks).
    admitted: bool,
    /// Prefill leg: when the choice ends, its blocks are held under this transfer id.
    hold: Option<u64>,
    /// Decode leg: the prompt's KV from the prefill worker, applied at admission.
    import: Option<KvImport>,
    /// The request's phases as spans under its caller's span.
    trace: PhaseSpans,
    pub ext: X,
}

/// One span per phase of a sequence — `engine.queued` (waiting for admission, again after a
/// preemption), `engine.prefill` (admitted, computing its prompt), `engine.decode` (from its
/// first token to its end) — children of the span the request arrived in (the worker's
/// `handle_payload`), so that a trace shows where a slow request spent its time. Never one
/// per token; a span is only created, recorded into once, and dropped.
struct PhaseSpans {
    parent: tracing::Span,
    phase: Option<(Phase, tracing::Span)>,
    steps: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Prefill,
    Decode,
}

thread_local! {
    /// Set by [`without_phase_spans`] for the call it wraps.
    static PHASE_SPANS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` — an engine's `generate` or `generate_leg`, which creates a request's sequences
/// before it returns — so that those sequences open no phase spans. For a caller that knows
/// the request's trace leaves the process neither way (not sampled, or export off): the spans
/// would be built and dropped for nobody. Only the synchronous call is covered.
pub fn without_phase_spans<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PHASE_SPANS_OFF.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(PHASE_SPANS_OFF.with(|c| c.replace(true)));
    f()
}

impl PhaseSpans {
    fn new() -> Self {
        let off = PHASE_SPANS_OFF.with(|c| c.get());
        Self {
            parent: if off {
                tracing::Span::none()
            } else {
                tracing::Span::current()
            },
            phase: None,
            steps: 0,
        }
    }

    fn is(&self, phase: Phase) -> bool {
        self.phase.as_ref().is_some_and(|(p, _)| *p == phase)
    }

    /// Ends the current phase (its span closes) and opens `phase`'s.
    fn enter(&mut self, phase: Phase, make: impl FnOnce(&tracing::Span) -> tracing::Span) {
        self.phase = None;
        if self.parent.is_disabled() {
            return;
        }
        self.phase = Some((phase, make(&self.parent)));
    }

    fn record(&self, field: &str, value: u64) {
        if let Some((_, span)) = &self.phase {
            span.record(field, value);
        }
    }
}

impl<X> Seq<X> {
    /// One sequence per choice of `request`, all sending on `out`; `ext(index)` makes each
    /// choice's engine state.
    pub fn for_request(
        request: &PreprocessedRequest,
        out: &OutputSender,
        mut ext: impl FnMut(u32) -> X,
    ) -> Vec<Self> {
        (0..request.sampling.n.max(1))
            .map(|index| Seq {
                out: out.clone(),
                index,
                prompt_len: request.token_ids.len(),
                tokens: request.token_ids.clone(),
                computed: 0,
                blocks: None,
                stop: request.stop.clone(),
                generated: 0,
                cached_tokens: None,
                admitted: false,
                hold: None,
                import: None,
                trace: PhaseSpans::new(),
                ext: ext(index),
            })
            .collect()
    }

    /// The sequences of one leg of a request: [`Self::for_request`] for an aggregated one; a
    /// prefill or decode leg has one choice (the frontend sends `n > 1` aggregated).
    pub fn for_leg(
        request: &PreprocessedRequest,
        disagg: Disagg,
        out: &OutputSender,
        ext: impl FnMut(u32) -> X,
    ) -> Result<Vec<Self>, EngineError> {
        if !matches!(disagg, Disagg::Aggregated) && request.sampling.n > 1 {
            return Err(EngineError::Invalid(
                "a disaggregated leg has one choice (n = 1)".into(),
            ));
        }
        let mut seqs = Self::for_request(request, out, ext);
        for seq in &mut seqs {
            match &disagg {
                Disagg::Aggregated => {}
                Disagg::Prefill { transfer_id } => {
                    seq.hold = Some(*transfer_id);
                    seq.stop.max_tokens = Some(1);
                }
                Disagg::Decode(import) => {
                    seq.tokens.push(import.first_token);
                    seq.generated = 1;
                }
            }
        }
        if let (Disagg::Decode(import), Some(seq)) = (disagg, seqs.first_mut()) {
            seq.import = Some(import);
        }
        Ok(seqs)
    }

    fn finish_reason(&self, token: u32, max_model_len: usize) -> Option<FinishReason> {
        let stop = &self.stop;
        // `min_tokens` tokens come before any stop token can end the choice (vLLM's meaning).
        let min_ok = self.generated > stop.min_tokens.unwrap_or(0);
        // The frontend leaves end-of-sequence ids out of the list when the request ignores EOS.
        if min_ok && stop.stop_token_ids.contains(&token) {
            return Some(FinishReason::Stop);
        }
        if stop.max_tokens.is_some_and(|m| self.generated >= m)
            || self.tokens.len() >= max_model_len
        {
            return Some(FinishReason::Length);
        }
        None
    }
}

impl<X> Queued for Seq<X> {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn blocks_mut(&mut self) -> &mut Option<SeqBlocks> {
        &mut self.blocks
    }
    fn is_cancelled(&self) -> bool {
        self.out.is_cancelled(self.index)
    }
    fn is_fresh(&self) -> bool {
        // A decode leg arrives with its first token generated: its prompt is counted where its
        // import is applied.
        self.generated == 0 && !self.admitted
    }
    fn computed(&self) -> usize {
        self.computed
    }
}

/// What [`Batcher::schedule`] decided: `running[..decodes]` generate their next token,
/// `running[decodes..]` were admitted this step and compute their prompts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub decodes: usize,
    pub preempted: bool,
}

pub struct Batcher<X> {
    pool: BlockPool,
    waiting: VecDeque<Seq<X>>,
    /// In admission order.
    pub running: Vec<Seq<X>>,
    limits: AdmitLimits,
    max_model_len: usize,
    counters: AdmitCounters,
    preemptions: u64,
    generated: u64,
    events: EventTap,
    index: CacheIndex,
    stats: Arc<Mutex<EngineStats>>,
    /// Prefill legs' blocks waiting to be fetched, by transfer id.
    held: HashMap<u64, SeqBlocks>,
    /// Imported blocks to write before the next forward pass: (block id, contents).
    writes: Vec<(u32, Vec<u8>)>,
    imported_blocks: u64,
    import_misses: u64,
    steps: StepHistogram,
}

impl<X> Batcher<X> {
    /// `max_model_len` caps prompt plus output of every sequence; `stats` is where
    /// [`Self::publish`] leaves its snapshot.
    pub fn new(
        pool: BlockPool,
        limits: AdmitLimits,
        max_model_len: usize,
        events: EventTap,
        stats: Arc<Mutex<EngineStats>>,
    ) -> Self {
        Self {
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            limits,
            max_model_len: max_model_len.max(1),
            counters: AdmitCounters::default(),
            preemptions: 0,
            generated: 0,
            events,
            index: CacheIndex::default(),
            stats,
            held: HashMap::new(),
            writes: Vec::new(),
            imported_blocks: 0,
            import_misses: 0,
            steps: StepHistogram::default(),
        }
    }

    /// The hashes this batcher's pool has cached, kept current after every step.
    pub fn cache_index(&self) -> CacheIndex {
        self.index.clone()
    }

    pub fn intake(&mut self, item: Intake<X>) {
        match item {
            Intake::Seq(s) => self.enqueue(*s),
            Intake::Release(id) => {
                if let Some(b) = self.held.remove(&id) {
                    self.pool.release(b);
                    self.flush_events();
                }
            }
        }
    }

    /// Imported blocks to write into the cache before this step's forward pass.
    pub fn take_writes(&mut self) -> Vec<(u32, Vec<u8>)> {
        std::mem::take(&mut self.writes)
    }

    fn flush_events(&mut self) {
        let events = self.pool.drain_events();
        self.index.apply(&events);
        self.events.send_all(events);
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn enqueue(&mut self, mut seq: Seq<X>) {
        seq.trace.enter(
            Phase::Queued,
            |p| tracing::info_span!(parent: p, "engine.queued", preempted = false),
        );
        self.waiting.push_back(seq);
    }

    /// What the next step computes for each running sequence ([`queue::plan_step`] under
    /// this batcher's limits).
    pub fn plan(&self) -> Vec<Option<usize>> {
        queue::plan_step(&self.running, self.limits)
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    fn release(&mut self, seq: &mut Seq<X>) {
        if let Some(b) = seq.blocks.take() {
            queue::release_blocks(&mut self.pool, b, seq.computed);
        }
        seq.computed = 0;
    }

    /// Ends a sequence that can never run.
    fn reject(&mut self, mut seq: Seq<X>) {
        self.release(&mut seq);
        seq.out.send(EngineOutput {
            index: seq.index,
            token_ids: vec![],
            finish_reason: Some(FinishReason::Length),
            ..Default::default()
        });
    }

    /// Steps 2 of the module docs: cancellations, room for the running sequences (preempting
    /// the newest), admission.
    pub fn schedule(&mut self) -> Scheduled {
        queue::drop_cancelled(&mut self.pool, &mut self.running, &mut self.waiting);
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
            victim.trace.enter(
                Phase::Queued,
                |p| tracing::info_span!(parent: p, "engine.queued", preempted = true),
            );
            tracing::debug!(
                index = victim.index,
                "preempted a sequence: out of KV blocks"
            );
            self.waiting.push_front(victim);
            preempted = true;
        }
        let decodes = self.running.len();
        if !preempted {
            self.admit();
        }
        Scheduled { decodes, preempted }
    }

    fn admit(&mut self) {
        let before = self.running.len();
        let rejected = queue::admit(
            &mut self.pool,
            &mut self.running,
            &mut self.waiting,
            self.limits,
            &mut self.counters,
        );
        for s in rejected {
            self.reject(s);
        }
        let mut ended = Vec::new();
        for i in before..self.running.len() {
            let seq = &mut self.running[i];
            let cached = seq.blocks.as_ref().map_or(0, |b| b.cached_tokens);
            seq.computed = cached;
            if seq.is_fresh() {
                seq.cached_tokens = Some(cached as u32);
            }
            seq.admitted = true;
            let (prompt, imported) = (seq.prompt_len, seq.import.is_some());
            seq.trace.enter(Phase::Prefill, |p| {
                tracing::info_span!(
                    parent: p,
                    "engine.prefill",
                    prompt_tokens = prompt,
                    cached_tokens = cached,
                    imported,
                )
            });
            if let Some(import) = seq.import.take()
                && !self.apply_import(i, import)
            {
                ended.push(i);
            }
        }
        for i in ended.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.release(&mut s);
        }
    }

    /// A decode leg was admitted as `running[i]`: queue the writes of the prompt blocks it did
    /// not find cached and send the first token. False when the sequence has already ended
    /// (its first token finished it, or its caller is gone).
    fn apply_import(&mut self, i: usize, mut import: KvImport) -> bool {
        let bs = self.pool.block_size();
        let seq = &mut self.running[i];
        let cached = seq.computed;
        let matched = cached / bs;
        let prompt_blocks = seq.prompt_len.div_ceil(bs);
        // `queue::admit` counted every uncached token as computed here.
        let counted = (seq.tokens.len() - cached) as u64;
        self.counters.prefill_tokens = self.counters.prefill_tokens.saturating_sub(counted);
        self.counters.cached_prompt_tokens += cached as u64;
        self.counters.queried_prompt_tokens += seq.prompt_len as u64;
        let covers = matched >= import.first_block
            && import.first_block + import.blocks.len() == prompt_blocks;
        match seq.blocks.as_ref() {
            Some(blocks) if covers => {
                for b in matched..prompt_blocks {
                    let data = std::mem::take(&mut import.blocks[b - import.first_block]);
                    self.writes.push((blocks.blocks[b].0, data));
                }
                self.imported_blocks += (prompt_blocks - matched) as u64;
                seq.computed = seq.prompt_len;
            }
            _ => {
                // Evicted since the fetch (or a malformed import): compute what is missing.
                self.import_misses += 1;
                self.counters.prefill_tokens += (seq.prompt_len - cached) as u64;
                tracing::debug!(
                    cached,
                    first_block = import.first_block,
                    "imported KV no longer applies; computing the prompt here"
                );
            }
        }
        let first = import.first_token;
        let finish = seq.finish_reason(first, self.max_model_len);
        let sent = seq.out.send(EngineOutput {
            index: seq.index,
            token_ids: vec![first],
            finish_reason: finish,
            cached_tokens: import.cached_tokens,
            logprobs: import.first_logprob.map(|l| vec![l]),
            ..Default::default()
        });
        // Not counted in `generated`: the prefill worker's step produced it.
        finish.is_none() && sent
    }

    /// Step 4: `tokens[i]` is the token computed for `running[i]`.
    pub fn complete(&mut self, tokens: &[u32]) {
        self.complete_each(tokens.iter().map(|t| Ok((*t, None))).collect());
    }

    /// Step 4 with each sequence's own outcome: `computed[i]` is `running[i]`'s. A sequence
    /// that failed gets its error and frees its blocks; the others go on.
    pub fn complete_each(&mut self, computed: Vec<Computed>) {
        self.complete_progress(computed.into_iter().map(Progress::Done).collect());
    }

    /// Step 4 where a step may compute only part of a prompt: `progress[i]` is what it did
    /// for `running[i]`. A chunk only moves the sequence's `computed` on (its prompt blocks
    /// were registered at admission; a failed step forgets those past `computed`).
    pub fn complete_progress(&mut self, progress: Vec<Progress>) {
        debug_assert_eq!(progress.len(), self.running.len());
        let step_tokens: usize = self
            .running
            .iter()
            .zip(&progress)
            .map(|(s, p)| match p {
                Progress::Done(_) => s.tokens.len() - s.computed,
                Progress::Chunk(n) => *n,
            })
            .sum();
        self.steps.observe(step_tokens as u64);
        let mut finished = Vec::new();
        for (i, step) in progress.into_iter().enumerate() {
            let Some(seq) = self.running.get_mut(i) else {
                break;
            };
            let result = match step {
                Progress::Done(result) => result,
                Progress::Chunk(n) => {
                    // The last prompt token is left for the step that samples from it.
                    seq.computed = (seq.computed + n).min(seq.tokens.len().saturating_sub(1));
                    continue;
                }
            };
            seq.computed = seq.tokens.len();
            if let Some(b) = seq.blocks.as_mut() {
                self.pool.commit(b, &seq.tokens[..seq.computed]);
            }
            let (token, logprob) = match result {
                Ok(t) => t,
                Err(e) => {
                    // Its blocks hold what this step computed: they stay cached, freed.
                    seq.out.fail(e);
                    finished.push((i, false));
                    continue;
                }
            };
            seq.tokens.push(token);
            seq.generated += 1;
            self.generated += 1;
            if !seq.trace.is(Phase::Decode) {
                seq.trace.enter(Phase::Decode, |p| {
                    tracing::info_span!(
                        parent: p,
                        "engine.decode",
                        tokens = tracing::field::Empty,
                        steps = tracing::field::Empty,
                    )
                });
            }
            seq.trace.steps += 1;
            let finish = seq.finish_reason(token, self.max_model_len);
            let params = seq
                .hold
                .filter(|_| finish.is_some())
                .map(|id| held_params(seq, id));
            let sent = seq.out.send(EngineOutput {
                index: seq.index,
                token_ids: vec![token],
                finish_reason: finish,
                cached_tokens: seq.cached_tokens.take(),
                logprobs: logprob.map(|l| vec![l]),
                disaggregated_params: params,
            });
            if finish.is_some() || !sent {
                seq.trace.record("tokens", u64::from(seq.generated));
                seq.trace.record("steps", u64::from(seq.trace.steps));
                finished.push((i, sent));
            }
        }
        for (i, sent) in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            match (s.hold, s.blocks.take()) {
                // Its caller has the block list: keep them until fetched or released.
                (Some(id), Some(blocks)) if sent => {
                    if let Some(old) = self.held.insert(id, blocks) {
                        // Transfer ids are random; a repeat must still not leak the first.
                        self.pool.release(old);
                    }
                }
                (_, blocks) => {
                    s.blocks = blocks;
                    self.release(&mut s);
                }
            }
        }
        self.flush_events();
    }

    /// Writing imported blocks failed: `unwritten` (the block that failed and those not yet
    /// written) leave the prefix cache — they were registered at admission — and the step
    /// fails as [`Batcher::fail`].
    pub fn writes_failed(&mut self, unwritten: &[u32], error: EngineError) {
        self.pool
            .forget(unwritten.iter().map(|&id| tandem_kv::BlockId(id)));
        self.fail(error);
    }

    /// The step failed: every running sequence ends with `error` and frees its blocks. Waiting
    /// sequences stay queued: the failure was this batch's, not the engine's.
    pub fn fail(&mut self, error: EngineError) {
        for mut s in std::mem::take(&mut self.running) {
            s.out.fail(error.clone());
            // Blocks past what earlier steps computed were registered at admission but never
            // written: `release` takes them out of the cache.
            self.release(&mut s);
        }
        self.flush_events();
    }

    pub fn publish(&self) {
        let s = self.pool.stats();
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = EngineStats {
            total_blocks: s.total_blocks as u64,
            active_blocks: s.active_blocks as u64,
            prefix_hit_rate: s.prefix_hit_rate,
            running: self.running.len() as u64,
            waiting: self.waiting.len() as u64,
            prefill_tokens: self.counters.prefill_tokens,
            cached_prompt_tokens: self.counters.cached_prompt_tokens,
            generated_tokens: self.generated,
            preemptions: self.preemptions,
            queried_prompt_tokens: self.counters.queried_prompt_tokens,
            held_blocks: self.held.values().map(|b| b.blocks.len() as u64).sum(),
            imported_blocks: self.imported_blocks,
            import_misses: self.import_misses,
            step_tokens: self.steps,
        };
    }
}

/// The blocks a finished prefill leg holds, for its last output (the worker adds where and
/// how to fetch them).
fn held_params<X>(seq: &Seq<X>, transfer_id: u64) -> DisaggregatedParams {
    let blocks = seq.blocks.as_ref();
    DisaggregatedParams {
        transfer_id,
        block_ids: blocks.map_or_else(Vec::new, |b| b.blocks.iter().map(|id| id.0).collect()),
        block_hashes: blocks.map_or_else(Vec::new, |b| b.full.iter().map(|h| h.sequence).collect()),
        num_tokens: seq.prompt_len as u32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::output_channel;
    use futures::StreamExt;
    use tandem_protocols::llm::SamplingOptions;

    fn request(prompt: std::ops::Range<u32>, max_tokens: u32, n: u32) -> PreprocessedRequest {
        PreprocessedRequest {
            model: "m".into(),
            token_ids: prompt.collect(),
            sampling: SamplingOptions {
                n,
                ..Default::default()
            },
            stop: StopConditions {
                max_tokens: Some(max_tokens),
                stop_token_ids: vec![9999],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn batcher(blocks: usize) -> Batcher<()> {
        let limits = AdmitLimits {
            max_num_seqs: 8,
            max_num_batched_tokens: 1000,
            watermark: 0.0,
            chunked_prefill: false,
        };
        Batcher::new(
            BlockPool::new(blocks, 4, true),
            limits,
            1000,
            EventTap::new(),
            Arc::default(),
        )
    }

    /// Runs steps, each computing token `100 + step` for everyone, until idle.
    fn run(b: &mut Batcher<()>) -> Vec<Scheduled> {
        let mut log = Vec::new();
        let mut step = 0;
        while !b.is_idle() {
            let s = b.schedule();
            log.push(s);
            let tokens = vec![100 + step; b.running.len()];
            b.complete(&tokens);
            step += 1;
            assert!(step < 100, "no progress");
        }
        log
    }

    #[test]
    fn phase_spans_go_under_the_current_span_unless_turned_off_for_the_call() {
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            let (out, _rx) = output_channel(1);
            let span = tracing::info_span!("handle_payload");
            let _entered = span.enter();
            let seqs = || Seq::for_request(&request(0..6, 8, 1), &out, |_| ());
            assert_eq!(seqs()[0].trace.parent.id(), span.id());
            let off = without_phase_spans(seqs);
            assert!(off[0].trace.parent.is_disabled());
            assert_eq!(
                seqs()[0].trace.parent.id(),
                span.id(),
                "only the wrapped call is affected"
            );
        });
    }

    #[tokio::test]
    async fn the_newest_admitted_sequence_is_preempted_and_everything_completes() {
        // 5 blocks of 4 tokens; two 6-token prompts growing to 14 tokens need 4 blocks each.
        let mut b = batcher(5);
        let (out_a, rx_a) = output_channel(1);
        let (out_b, rx_b) = output_channel(1);
        for s in Seq::for_request(&request(0..6, 8, 1), &out_a, |_| ()) {
            b.enqueue(s);
        }
        for s in Seq::for_request(&request(50..56, 8, 1), &out_b, |_| ()) {
            b.enqueue(s);
        }
        drop((out_a, out_b));
        let first = b.schedule();
        assert_eq!(first.decodes, 0);
        assert_eq!(b.running.len(), 2);
        b.complete(&[1, 2]);
        let log = run(&mut b);
        assert!(log.iter().any(|s| s.preempted));
        b.publish();
        let stats = *b.stats.lock().unwrap();
        assert!(stats.preemptions > 0);
        assert_eq!(stats.active_blocks, 0);
        assert_eq!(
            stats.generated_tokens, 16,
            "preempted tokens are not generated again"
        );
        // The older request ran straight through: its outputs are one per step from the start.
        let a: Vec<_> = rx_a.collect().await;
        let b_out: Vec<_> = rx_b.collect().await;
        assert_eq!(a.len(), 8);
        assert_eq!(b_out.len(), 8);
        let a_tokens: Vec<u32> = a.iter().map(|o| o.as_ref().unwrap().token_ids[0]).collect();
        assert_eq!(a_tokens[..3], [1, 100, 101], "A was never preempted");
        assert_eq!(
            a.last().unwrap().as_ref().unwrap().finish_reason,
            Some(FinishReason::Length)
        );
    }

    #[tokio::test]
    async fn a_stopped_choice_frees_its_blocks_and_the_other_goes_on() {
        let mut b = batcher(32);
        let (out, rx) = output_channel(2);
        for s in Seq::for_request(&request(0..6, 20, 2), &out, |_| ()) {
            b.enqueue(s);
        }
        drop(out);
        b.schedule();
        b.complete(&[7, 7]);
        rx.stopper().stop(0);
        b.schedule();
        assert_eq!(b.running.len(), 1);
        assert_eq!(b.running[0].index, 1);
        run(&mut b);
        b.publish();
        let stats = *b.stats.lock().unwrap();
        assert_eq!(stats.generated_tokens, 1 + 20);
        assert_eq!(stats.active_blocks, 0);
    }

    /// Queues a one-choice request for `prompt`, schedules it and returns the sequence hashes
    /// of its full prompt blocks (registered at admission).
    fn admit_prompt(
        b: &mut Batcher<()>,
        prompt: std::ops::Range<u32>,
        out: &crate::stream::OutputSender,
    ) -> Vec<u64> {
        for s in Seq::for_request(&request(prompt, 2, 1), out, |_| ()) {
            b.enqueue(s);
        }
        b.schedule();
        let seq = b.running.last().unwrap();
        let blocks = seq.blocks.as_ref().unwrap();
        blocks.full.iter().map(|h| h.sequence).collect()
    }

    #[tokio::test]
    async fn a_chunk_sends_no_token_and_a_failure_or_cancel_after_it_uncaches_what_it_did_not_compute()
     {
        let mut b = batcher(32);
        let (out, mut rx) = output_channel(2);
        for s in Seq::for_request(&request(0..22, 2, 1), &out, |_| ()) {
            b.enqueue(s);
        }
        b.schedule();
        b.complete_progress(vec![Progress::Chunk(9)]);
        assert_eq!((b.running[0].computed, b.running[0].generated), (9, 0));
        // A chunk cannot pass the last prompt token: the step that samples computes it.
        b.complete_progress(vec![Progress::Chunk(100)]);
        assert_eq!(b.running[0].computed, 21);
        b.complete_progress(vec![Progress::Done(Ok((7, None)))]);
        assert_eq!(rx.next().await.unwrap().unwrap().token_ids, vec![7]);
        // Another prompt: its 5 full blocks are registered at admission; the step after its
        // first chunk (9 tokens) fails, so only the 2 blocks that chunk computed stay cached.
        let full = admit_prompt(&mut b, 100..122, &out);
        b.complete_progress(vec![Progress::Done(Ok((8, None))), Progress::Chunk(9)]);
        assert_eq!(b.cache_index().cached_prefix(&full), 5);
        b.fail(EngineError::StepFailed("x".into()));
        assert_eq!(b.cache_index().cached_prefix(&full), 2);
        // Cancelled after a first chunk of 13: the 3 blocks it computed stay cached.
        let (out, rx) = output_channel(1);
        let full = admit_prompt(&mut b, 200..222, &out);
        b.complete_progress(vec![Progress::Chunk(13)]);
        rx.stopper().stop(0);
        b.schedule();
        assert!(b.running.is_empty());
        b.complete_progress(vec![]);
        assert_eq!(b.cache_index().cached_prefix(&full), 3);
    }

    #[tokio::test]
    async fn a_failed_step_sends_the_error_and_frees_the_blocks() {
        let mut b = batcher(32);
        let (out, mut rx) = output_channel(1);
        for s in Seq::for_request(&request(0..6, 20, 1), &out, |_| ()) {
            b.enqueue(s);
        }
        b.schedule();
        b.fail(EngineError::StepFailed("nan in logits".into()));
        b.publish();
        assert!(b.is_idle());
        assert_eq!(b.stats.lock().unwrap().active_blocks, 0);
        assert_eq!(
            rx.next().await,
            Some(Err(EngineError::StepFailed("nan in logits".into())))
        );
        // The prompt's blocks were never computed: the same prompt finds nothing cached.
        let (out, rx) = output_channel(1);
        for s in Seq::for_request(&request(0..6, 1, 1), &out, |_| ()) {
            b.enqueue(s);
        }
        drop(out);
        b.schedule();
        assert_eq!(b.running[0].computed, 0);
        b.complete(&[5]);
        let outs: Vec<_> = rx.collect().await;
        assert_eq!(outs[0].as_ref().unwrap().cached_tokens, Some(0));
    }

    #[tokio::test]
    async fn stop_tokens_end_a_choice_after_min_tokens() {
        let mut b = batcher(32);
        let mut req = request(0..6, 20, 1);
        req.stop.min_tokens = Some(2);
        let (out, rx) = output_channel(1);
        for s in Seq::for_request(&req, &out, |_| ()) {
            b.enqueue(s);
        }
        drop(out);
        for _ in 0..3 {
            b.schedule();
            let n = b.running.len();
            b.complete(&vec![9999; n]);
        }
        let outs: Vec<_> = rx.collect().await;
        assert_eq!(
            outs.len(),
            3,
            "the stop token counts only from the third token on"
        );
        assert_eq!(
            outs[2].as_ref().unwrap().finish_reason,
            Some(FinishReason::Stop)
        );
    }

    #[tokio::test]
    async fn a_prefill_leg_holds_its_blocks_until_released() {
        let mut b = batcher(32);
        let (out, rx) = output_channel(1);
        let req = request(0..10, 20, 1);
        let seqs = Seq::for_leg(&req, Disagg::Prefill { transfer_id: 7 }, &out, |_| ()).unwrap();
        for s in seqs {
            b.enqueue(s);
        }
        drop(out);
        run(&mut b);
        let outs: Vec<_> = rx.collect().await;
        assert_eq!(outs.len(), 1, "a prefill leg makes one token");
        let last = outs[0].as_ref().unwrap();
        assert_eq!(last.finish_reason, Some(FinishReason::Length));
        let params = last.disaggregated_params.clone().unwrap();
        assert_eq!(params.transfer_id, 7);
        assert_eq!(params.block_ids.len(), 3, "10 tokens in blocks of 4");
        assert_eq!(params.block_hashes.len(), 2, "two full blocks");
        assert_eq!(params.num_tokens, 10);
        b.publish();
        assert_eq!(b.stats.lock().unwrap().held_blocks, 3);
        assert_eq!(b.stats.lock().unwrap().active_blocks, 3);
        b.intake(Intake::Release(99));
        assert_eq!(b.pool.stats().active_blocks, 3, "another id frees nothing");
        b.intake(Intake::Release(7));
        b.publish();
        let stats = *b.stats.lock().unwrap();
        assert_eq!((stats.held_blocks, stats.active_blocks), (0, 0));
        // The prompt's full blocks stay in the prefix cache, and the index knows them.
        assert_eq!(b.cache_index().cached_prefix(&params.block_hashes), 2);
    }

    #[tokio::test]
    async fn a_prefill_leg_whose_caller_left_frees_its_blocks() {
        let mut b = batcher(32);
        let (out, rx) = output_channel(1);
        let req = request(0..10, 20, 1);
        for s in Seq::for_leg(&req, Disagg::Prefill { transfer_id: 1 }, &out, |_| ()).unwrap() {
            b.enqueue(s);
        }
        b.schedule();
        drop(rx);
        b.complete(&[5]);
        b.publish();
        assert_eq!(b.stats.lock().unwrap().active_blocks, 0);
    }

    fn import(first_block: usize, blocks: usize) -> KvImport {
        KvImport {
            first_token: 42,
            cached_tokens: Some(4),
            first_block,
            blocks: (0..blocks).map(|i| vec![i as u8; 3]).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_decode_leg_writes_only_uncached_blocks_and_starts_from_the_first_token() {
        let mut b = batcher(32);
        // Cache the first two blocks of the prompt (8 of its 10 tokens) with an earlier request.
        let (out, rx) = output_channel(1);
        for s in Seq::for_request(&request(0..9, 1, 1), &out, |_| ()) {
            b.enqueue(s);
        }
        drop(out);
        run(&mut b);
        drop(rx);
        b.take_writes();
        let (out, rx) = output_channel(1);
        let req = request(0..10, 3, 1);
        let seqs = Seq::for_leg(&req, Disagg::Decode(import(0, 3)), &out, |_| ()).unwrap();
        for s in seqs {
            b.enqueue(s);
        }
        drop(out);
        let s = b.schedule();
        assert_eq!(s.decodes, 0);
        let writes = b.take_writes();
        assert_eq!(
            writes.len(),
            1,
            "blocks 0 and 1 were cached: only block 2 is written"
        );
        assert_eq!(writes[0].1, vec![2u8; 3]);
        assert_eq!(
            b.running[0].computed, 10,
            "nothing of the prompt left to compute"
        );
        assert_eq!(b.running[0].tokens.len(), 11);
        b.complete(&[43]);
        run(&mut b);
        let toks: Vec<u32> = rx
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flat_map(|o| o.unwrap().token_ids)
            .collect();
        assert_eq!(&toks[..2], &[42, 43]);
        assert_eq!(toks.len(), 3);
        b.publish();
        let stats = *b.stats.lock().unwrap();
        assert_eq!(stats.imported_blocks, 1);
        assert_eq!(stats.import_misses, 0);
        assert_eq!(
            stats.prefill_tokens, 9,
            "only the earlier request's prompt was computed"
        );
        assert_eq!(stats.active_blocks, 0);
    }

    #[tokio::test]
    async fn an_import_the_cache_no_longer_matches_is_computed_here() {
        let mut b = batcher(32);
        let (out, rx) = output_channel(1);
        let req = request(0..10, 2, 1);
        // Fetched as if blocks 0-1 were cached here; they are not.
        let seqs = Seq::for_leg(&req, Disagg::Decode(import(2, 1)), &out, |_| ()).unwrap();
        for s in seqs {
            b.enqueue(s);
        }
        drop(out);
        b.schedule();
        assert!(b.take_writes().is_empty());
        assert_eq!(
            b.running[0].computed, 0,
            "the whole prompt and first token are computed"
        );
        run(&mut b);
        let outs: Vec<_> = rx.collect().await;
        assert_eq!(outs[0].as_ref().unwrap().token_ids, vec![42]);
        assert_eq!(outs.len(), 2);
        b.publish();
        let stats = *b.stats.lock().unwrap();
        assert_eq!((stats.import_misses, stats.prefill_tokens), (1, 10));
    }

    #[tokio::test]
    async fn imported_blocks_that_could_not_be_written_leave_the_cache() {
        let mut b = batcher(32);
        let (out, rx) = output_channel(1);
        // 12 tokens: three full blocks, all imported and registered at admission.
        let req = request(0..12, 3, 1);
        for s in Seq::for_leg(&req, Disagg::Decode(import(0, 3)), &out, |_| ()).unwrap() {
            b.enqueue(s);
        }
        drop(out);
        b.schedule();
        let hashes: Vec<u64> = tandem_kv::sequence_hashes(&req.token_ids, 4)
            .iter()
            .map(|h| h.sequence)
            .collect();
        b.flush_events();
        assert_eq!(b.cache_index().cached_prefix(&hashes), 3);
        let writes = b.take_writes();
        // The second write fails: it and the third were never written.
        let unwritten: Vec<u32> = writes[1..].iter().map(|(id, _)| *id).collect();
        b.writes_failed(&unwritten, EngineError::StepFailed("disk on fire".into()));
        assert_eq!(b.cache_index().cached_prefix(&hashes), 1);
        let outs: Vec<_> = rx.collect().await;
        assert!(outs.last().unwrap().is_err());
        b.publish();
        assert_eq!(b.stats.lock().unwrap().active_blocks, 0);
    }

    #[test]
    fn disaggregated_legs_have_one_choice() {
        let (out, _rx) = output_channel(2);
        let req = request(0..4, 2, 2);
        assert!(
            Seq::<()>::for_leg(&req, Disagg::Prefill { transfer_id: 1 }, &out, |_| ()).is_err()
        );
        assert!(Seq::<()>::for_leg(&req, Disagg::Aggregated, &out, |_| ()).is_ok());
    }
}
