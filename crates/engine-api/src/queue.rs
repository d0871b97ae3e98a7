//! The queue policy every engine's scheduler applies to its [`BlockPool`] (through
//! [`crate::Batcher`]): dropping cancelled sequences (their blocks go back at once) and
//! admitting waiting sequences into the running batch while `max_num_seqs`, the
//! `max_num_batched_tokens` budget and a free-block watermark allow. `running` is kept in
//! admission order, which is what preemption relies on: the newest admitted gives way first.

use std::collections::VecDeque;
use tandem_kv::{BlockPool, SeqBlocks};

/// What the policy needs to know about a sequence.
pub trait Queued {
    /// Every token the sequence's cache must hold (prompt and output so far).
    fn tokens(&self) -> &[u32];
    fn blocks_mut(&mut self) -> &mut Option<SeqBlocks>;
    /// The requester has gone away.
    fn is_cancelled(&self) -> bool;
    /// Nothing generated yet: this admission is its first, not a return after preemption.
    fn is_fresh(&self) -> bool;
    /// Tokens whose KV the engine has computed (less than `tokens().len()` between steps).
    fn computed(&self) -> usize;
    /// Tokens its next step must compute: one for a decode (its last token), the rest of a
    /// prompt otherwise.
    fn to_compute(&self) -> usize {
        self.tokens().len().saturating_sub(self.computed())
    }
}

/// Gives a sequence's blocks back to the pool. Its prompt's blocks entered the prefix cache at
/// admission; those past what it computed (a prompt left mid-chunk) leave it first, so no later
/// prompt counts them as cached.
pub fn release_blocks(pool: &mut BlockPool, blocks: SeqBlocks, computed: usize) {
    pool.forget_from(&blocks, computed / pool.block_size());
    pool.release(blocks);
}

/// Prompt accounting of admissions, kept the same way by every engine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AdmitCounters {
    /// Tokens admitted sequences must compute (cache hits excluded; recomputation after
    /// preemption included).
    pub prefill_tokens: u64,
    /// Prompt tokens served from the prefix cache at sequences' first admission.
    pub cached_prompt_tokens: u64,
    /// Prompt tokens looked up in the prefix cache at sequences' first admission.
    pub queried_prompt_tokens: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct AdmitLimits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Fraction of blocks kept free when admitting beside running sequences.
    pub watermark: f64,
    /// The engine computes a prompt over several steps when the budget runs out (chunked
    /// prefill): a prompt is admitted whenever some of the step's budget is left. Without
    /// it, a prompt larger than what is left waits, unless it is the step's first admission.
    pub chunked_prefill: bool,
}

/// What the next step computes for each running sequence (in running, i.e. admission, order)
/// when `limits.chunked_prefill`: `None` for all it has left (a decode's one token, or the rest
/// of a prompt), `Some(n)` for a chunk of `n` prompt tokens when the step's
/// `max_num_batched_tokens` runs out first. Decodes are served first, a token each, as vLLM's
/// scheduler serves its running requests before prompts. Without chunking, every sequence
/// computes all it has left.
pub fn plan_step<S: Queued>(running: &[S], limits: AdmitLimits) -> Vec<Option<usize>> {
    if !limits.chunked_prefill {
        return vec![None; running.len()];
    }
    let decodes = running.iter().filter(|s| s.to_compute() <= 1).count();
    let mut left = limits.max_num_batched_tokens.saturating_sub(decodes);
    running
        .iter()
        .map(|s| {
            let rest = s.to_compute();
            if rest <= 1 {
                return None;
            }
            let take = rest.min(left);
            left -= take;
            (take < rest).then_some(take)
        })
        .collect()
}

/// Removes cancelled sequences from both queues, releasing their blocks. `running` keeps its
/// order (admission order, which preemption relies on).
pub fn drop_cancelled<S: Queued>(
    pool: &mut BlockPool,
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
) {
    let mut i = 0;
    while i < running.len() {
        if running[i].is_cancelled() {
            let mut s = running.remove(i);
            if let Some(b) = s.blocks_mut().take() {
                release_blocks(pool, b, s.computed());
            }
        } else {
            i += 1;
        }
    }
    waiting.retain(|s| !s.is_cancelled());
}

/// Moves waiting sequences to the end of `running` with their blocks allocated (cached prefix
/// reused), counting them in `counters`. Returns the sequences that can never run because
/// they need more blocks than the whole pool; the caller ends them.
pub fn admit<S: Queued>(
    pool: &mut BlockPool,
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
    limits: AdmitLimits,
    counters: &mut AdmitCounters,
) -> Vec<S> {
    let total = pool.total_blocks();
    let reserve = (limits.watermark * total as f64).ceil() as usize;
    // What the running sequences still need this step: a token each for decodes, the rest
    // of a prompt being prefilled in chunks.
    let pending: usize = running.iter().map(|s| s.to_compute().max(1)).sum();
    let mut budget = limits.max_num_batched_tokens.saturating_sub(pending);
    let mut rejected = Vec::new();
    let mut admitted_any = false;
    while running.len() < limits.max_num_seqs.max(1) {
        let Some(front) = waiting.front() else {
            break;
        };
        if front.tokens().len().div_ceil(pool.block_size()) > total {
            rejected.extend(waiting.pop_front());
            continue;
        }
        let (needed, new_tokens) = pool.prompt_need(front.tokens());
        // An empty batch takes whatever fits, so a lone large prompt cannot wait forever.
        let reserve_now = if running.is_empty() { 0 } else { reserve };
        if pool.available_blocks() < needed + reserve_now {
            break;
        }
        // The budget is what the step computes, as vLLM counts it: a prompt's cached prefix
        // costs nothing, so several long prompts that hit the cache start in one step instead
        // of one per step.
        let over = if limits.chunked_prefill {
            budget == 0
        } else {
            admitted_any && new_tokens > budget
        };
        if over {
            break;
        }
        let Some(mut seq) = waiting.pop_front() else {
            break;
        };
        let Some(blocks) = pool.allocate(seq.tokens()) else {
            waiting.push_front(seq);
            break;
        };
        let computed = seq.tokens().len() - blocks.cached_tokens;
        budget = budget.saturating_sub(computed);
        counters.prefill_tokens += computed as u64;
        if seq.is_fresh() {
            counters.cached_prompt_tokens += blocks.cached_tokens as u64;
            counters.queried_prompt_tokens += seq.tokens().len() as u64;
        }
        *seq.blocks_mut() = Some(blocks);
        running.push(seq);
        admitted_any = true;
    }
    rejected
}

#[cfg(test)]
mod tests {
    use super::*;

    struct S {
        tokens: Vec<u32>,
        blocks: Option<SeqBlocks>,
        cancelled: bool,
        /// Prompt tokens still to compute (a prompt being prefilled in chunks).
        left: usize,
    }

    impl Queued for S {
        fn tokens(&self) -> &[u32] {
            &self.tokens
        }
        fn blocks_mut(&mut self) -> &mut Option<SeqBlocks> {
            &mut self.blocks
        }
        fn is_cancelled(&self) -> bool {
            self.cancelled
        }
        fn is_fresh(&self) -> bool {
            true
        }
        fn computed(&self) -> usize {
            self.tokens.len() - self.left
        }
    }

    fn seq(len: u32, base: u32) -> S {
        S {
            tokens: (base..base + len).collect(),
            blocks: None,
            cancelled: false,
            left: 0,
        }
    }

    const LIMITS: AdmitLimits = AdmitLimits {
        max_num_seqs: 3,
        max_num_batched_tokens: 100,
        watermark: 0.0,
        chunked_prefill: false,
    };

    #[test]
    fn a_step_serves_decodes_first_and_chunks_the_prompts_that_do_not_fit() {
        let limits = AdmitLimits {
            max_num_batched_tokens: 50,
            chunked_prefill: true,
            ..LIMITS
        };
        // Prompts of 40 tokens with 30 left at 0, 200 and 300; a decode (1 left) at 100.
        let running = [(0, 30), (100, 1), (200, 30), (300, 30)].map(|(base, left)| S {
            left,
            ..seq(40, base)
        });
        // One decode token, then 30 for the first prompt, 19 for the second, none for the third.
        assert_eq!(plan_step(&running, limits), [None, None, Some(19), Some(0)]);
        let whole = AdmitLimits {
            chunked_prefill: false,
            ..limits
        };
        assert_eq!(plan_step(&running, whole), [None; 4]);
    }

    #[test]
    fn with_chunked_prefill_a_prompt_starts_while_the_step_has_tokens_left() {
        let mut pool = BlockPool::new(100, 4, true);
        let mut counters = AdmitCounters::default();
        let limits = AdmitLimits {
            max_num_batched_tokens: 50,
            max_num_seqs: 10,
            chunked_prefill: true,
            ..LIMITS
        };
        let mut running = Vec::new();
        let mut waiting: VecDeque<S> = [seq(60, 0), seq(8, 100)].into_iter().collect();
        admit(&mut pool, &mut running, &mut waiting, limits, &mut counters);
        assert_eq!(
            (running.len(), waiting.len()),
            (1, 1),
            "a prompt over the budget starts (to be chunked) and takes all of it"
        );
        // Its first chunk took 50 tokens, 10 are left: the next prompt starts beside it.
        running[0].left = 10;
        admit(&mut pool, &mut running, &mut waiting, limits, &mut counters);
        assert_eq!(running.len(), 2);
        // A prompt whose rest fills the step leaves nothing for a new one.
        running[0].left = 49;
        waiting.push_back(seq(4, 200));
        admit(&mut pool, &mut running, &mut waiting, limits, &mut counters);
        assert_eq!(
            waiting.len(),
            1,
            "49 pending + 1 decode use the budget of 50"
        );
        // Without chunking the same step admits its first waiting prompt regardless.
        let whole = AdmitLimits {
            chunked_prefill: false,
            ..limits
        };
        admit(&mut pool, &mut running, &mut waiting, whole, &mut counters);
        assert_eq!(waiting.len(), 0);
    }

    #[test]
    fn admits_up_to_the_limits_and_rejects_what_can_never_fit() {
        let mut pool = BlockPool::new(10, 4, true);
        let mut running = Vec::new();
        let mut counters = AdmitCounters::default();
        let mut waiting: VecDeque<S> = [
            seq(41, 0),
            seq(8, 100),
            seq(8, 200),
            seq(8, 300),
            seq(8, 400),
        ]
        .into_iter()
        .collect();
        let rejected = admit(&mut pool, &mut running, &mut waiting, LIMITS, &mut counters);
        assert_eq!(rejected.len(), 1, "41 tokens need 11 of 10 blocks");
        assert_eq!(running.len(), 3, "max_num_seqs");
        assert_eq!(counters.prefill_tokens, 3 * 8);
        assert!(
            running
                .iter()
                .all(|s| s.blocks.as_ref().is_some_and(|b| b.blocks.len() == 2))
        );
        assert_eq!(waiting.len(), 1);
        assert_eq!(pool.stats().active_blocks, 6);

        // A token budget of 6: the first prompt (4) goes in, the second would exceed what is left.
        let limits = AdmitLimits {
            max_num_batched_tokens: 6,
            max_num_seqs: 10,
            ..LIMITS
        };
        let mut waiting: VecDeque<S> = [seq(4, 500), seq(4, 600)].into_iter().collect();
        let mut batch = Vec::new();
        admit(&mut pool, &mut batch, &mut waiting, limits, &mut counters);
        assert_eq!(batch.len(), 1);
        // With running sequences, a watermark keeps blocks free: 3 free of 10 at 0.3.
        let limits = AdmitLimits {
            watermark: 0.3,
            max_num_seqs: 10,
            ..LIMITS
        };
        admit(&mut pool, &mut batch, &mut waiting, limits, &mut counters);
        assert_eq!(
            batch.len(),
            1,
            "admitting would leave fewer than 3 blocks free"
        );

        // The budget counts new tokens: two 24-token prompts whose first 20 are cached (5 of
        // 6 blocks) fit a budget of 10 together; uncached, only the first would.
        let mut cache_pool = BlockPool::new(40, 4, true);
        let mut warm = Vec::new();
        let mut cold_q: VecDeque<S> = [seq(20, 900)].into_iter().collect();
        admit(
            &mut cache_pool,
            &mut warm,
            &mut cold_q,
            LIMITS,
            &mut counters,
        );
        let prompt = |tail: u32| S {
            tokens: (900..920).chain([tail; 4]).collect(),
            ..seq(0, 0)
        };
        let limits = AdmitLimits {
            max_num_batched_tokens: 10 + warm.len(),
            max_num_seqs: 10,
            ..LIMITS
        };
        let mut hits: VecDeque<S> = [prompt(1), prompt(2)].into_iter().collect();
        admit(&mut cache_pool, &mut warm, &mut hits, limits, &mut counters);
        assert_eq!(
            (warm.len(), hits.len()),
            (3, 0),
            "both cached prompts start"
        );
        let mut misses: VecDeque<S> = [seq(24, 2000), seq(24, 3000)].into_iter().collect();
        let mut batch = Vec::new();
        admit(
            &mut cache_pool,
            &mut batch,
            &mut misses,
            limits,
            &mut counters,
        );
        assert_eq!(
            (batch.len(), misses.len()),
            (1, 1),
            "only one uncached prompt starts"
        );

        running[1].cancelled = true;
        waiting.push_back(S {
            cancelled: true,
            ..seq(4, 700)
        });
        drop_cancelled(&mut pool, &mut running, &mut waiting);
        assert_eq!(running.len(), 2);
        assert_eq!(running[1].tokens[0], 300, "order kept");
        assert_eq!(waiting.len(), 1);
        assert_eq!(pool.stats().active_blocks, 5);
    }
}
