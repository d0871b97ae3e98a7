//! A fixed pool of KV blocks with prefix caching.
//!
//! Every block is in one of three states: *active* (one or more sequences reference it),
//! *cached* (no references, but it holds a full block registered under its sequence hash, so a
//! later prompt can reuse it) or *free* (holds nothing reusable). Cached blocks are kept in
//! least-recently-released order and are the first thing evicted when a sequence needs a block
//! and no free one is left. Registering a full block records a `Stored` event; evicting a
//! registered block records `Removed`.

use crate::hash::{BlockHashes, chain, local_block_hash, sequence_hashes};
use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// What changed in the set of reusable blocks, in Dynamo's terms (hashes are sequence
/// hashes; `local` are the per-block token hashes the router keys its tree on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockEvent {
    /// Consecutive blocks of one sequence, the first a child of `parent_hash`.
    Stored {
        parent_hash: Option<u64>,
        blocks: Vec<BlockHashes>,
        /// The blocks' tokens, `block_size` per block (vLLM's event carries them).
        tokens: Vec<u32>,
    },
    Removed {
        hashes: Vec<u64>,
    },
    Cleared,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    refs: u32,
    hash: Option<BlockHashes>,
    /// Position in `cached` while refs == 0 and hash is set.
    released_at: u64,
}

/// The blocks a sequence holds, in order, and the hashes of its registered full blocks.
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    pub blocks: Vec<BlockId>,
    /// One entry per full block of the sequence (registered or not).
    pub full: Vec<BlockHashes>,
    /// Prompt tokens found in the cache when the sequence was allocated.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolStats {
    pub total_blocks: usize,
    pub active_blocks: usize,
    pub cached_blocks: usize,
    /// Mean prefix-cache hit rate of the last 1000 allocated prompts (0..1).
    pub prefix_hit_rate: f64,
}

pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    cached: BTreeMap<u64, BlockId>,
    by_hash: HashMap<u64, BlockId>,
    clock: u64,
    prefix_caching: bool,
    events: Vec<BlockEvent>,
    active: usize,
    hit_rates: VecDeque<f64>,
}

const HIT_RATE_WINDOW: usize = 1000;

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size: block_size.max(1),
            blocks: vec![
                Block {
                    refs: 0,
                    hash: None,
                    released_at: 0,
                };
                num_blocks
            ],
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
            cached: BTreeMap::new(),
            by_hash: HashMap::new(),
            clock: 0,
            prefix_caching,
            events: Vec::new(),
            active: 0,
            hit_rates: VecDeque::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free plus cached-but-unused).
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total_blocks: self.blocks.len(),
            active_blocks: self.active,
            cached_blocks: self.cached.len(),
            prefix_hit_rate: if self.hit_rates.is_empty() {
                0.0
            } else {
                self.hit_rates.iter().sum::<f64>() / self.hit_rates.len() as f64
            },
        }
    }

    /// Takes the recorded events, oldest first.
    pub fn drain_events(&mut self) -> Vec<BlockEvent> {
        std::mem::take(&mut self.events)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// How many leading full blocks of `hashes` are cached here.
    pub fn cached_prefix(&self, hashes: &[BlockHashes]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(&h.sequence))
            .count()
    }

    /// For a prompt of `tokens`, given what is cached: the new blocks it would take, and the
    /// tokens [`Self::allocate`] would leave to compute (the prompt less the cached blocks it
    /// reuses). One hashing pass, nothing allocated.
    pub fn prompt_need(&self, tokens: &[u32]) -> (usize, usize) {
        let hashes = sequence_hashes(tokens, self.block_size);
        let cached = self.cached_prefix(&hashes);
        let reused = self.reusable(cached, tokens.len());
        (
            self.blocks_for(tokens.len()) - cached,
            tokens.len() - reused * self.block_size,
        )
    }

    /// Of `cached` leading blocks of a `len`-token prompt, those reused: never the whole
    /// prompt, since its last token must be computed to produce output.
    fn reusable(&self, cached: usize, len: usize) -> usize {
        if cached > 0 && cached * self.block_size >= len {
            cached - 1
        } else {
            cached
        }
    }

    /// Allocates blocks for a prompt, reusing its cached prefix. `None` (and no change) when
    /// there are not enough blocks.
    pub fn allocate(&mut self, tokens: &[u32]) -> Option<SeqBlocks> {
        let hashes = sequence_hashes(tokens, self.block_size);
        let matched = self.reusable(self.cached_prefix(&hashes), tokens.len());
        let reused: Vec<BlockId> = hashes[..matched]
            .iter()
            .filter_map(|h| self.by_hash.get(&h.sequence).copied())
            .collect();
        let reused_idle = reused
            .iter()
            .filter(|b| self.blocks[b.0 as usize].refs == 0)
            .count();
        let needed = self.blocks_for(tokens.len()) - matched;
        if needed > self.available_blocks() - reused_idle {
            return None;
        }
        let mut seq = SeqBlocks {
            blocks: Vec::with_capacity(matched + needed),
            full: hashes.clone(),
            cached_tokens: matched * self.block_size,
        };
        for b in reused {
            self.acquire(b);
            seq.blocks.push(b);
        }
        for _ in 0..needed {
            let b = self.take_block()?;
            seq.blocks.push(b);
        }
        self.register(&seq, tokens, matched, hashes.len());
        if !tokens.is_empty() {
            if self.hit_rates.len() == HIT_RATE_WINDOW {
                self.hit_rates.pop_front();
            }
            self.hit_rates
                .push_back(seq.cached_tokens as f64 / tokens.len() as f64);
        }
        Some(seq)
    }

    /// Makes room for the sequence to hold `len` tokens in total; false when no block is
    /// left (the caller preempts something).
    pub fn grow(&mut self, seq: &mut SeqBlocks, len: usize) -> bool {
        while seq.blocks.len() < self.blocks_for(len) {
            match self.take_block() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Registers the blocks `tokens` (the sequence's whole content) has filled since the last
    /// call.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) {
        let full_now = tokens.len() / self.block_size;
        let before = seq.full.len();
        for i in before..full_now.min(seq.blocks.len()) {
            let block_tokens = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let local = local_block_hash(block_tokens);
            let sequence = match seq.full.last() {
                Some(p) => chain(p.sequence, local),
                None => local,
            };
            seq.full.push(BlockHashes { local, sequence });
        }
        if seq.full.len() > before {
            self.register(seq, tokens, before, seq.full.len());
        }
    }

    /// Releases a sequence's blocks. Registered blocks stay cached; the tail is released
    /// first so that it is also evicted first.
    pub fn release(&mut self, seq: SeqBlocks) {
        for b in seq.blocks.into_iter().rev() {
            let block = &mut self.blocks[b.0 as usize];
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 {
                self.active -= 1;
                if block.hash.is_some() && self.prefix_caching {
                    self.clock += 1;
                    block.released_at = self.clock;
                    self.cached.insert(self.clock, b);
                } else {
                    if let Some(h) = block.hash.take() {
                        self.by_hash.remove(&h.sequence);
                    }
                    self.free.push(b);
                }
            }
        }
    }

    /// Unregisters the sequence's blocks from `first_block` on (their contents were never
    /// computed: the step that was to compute them failed), so that no later prompt reuses
    /// them; records `Removed` for each. The blocks stay the sequence's until released.
    pub fn forget_from(&mut self, seq: &SeqBlocks, first_block: usize) {
        self.forget(seq.blocks.iter().skip(first_block).copied());
    }

    /// Takes `ids` out of the prefix cache (their contents are not what their hashes say);
    /// the blocks stay allocated to whoever holds them.
    pub fn forget(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        let mut removed = Vec::new();
        for b in ids {
            let block = &mut self.blocks[b.0 as usize];
            if let Some(h) = block.hash
                && self.by_hash.get(&h.sequence) == Some(&b)
            {
                self.by_hash.remove(&h.sequence);
                block.hash = None;
                removed.push(h.sequence);
            }
        }
        if !removed.is_empty() {
            self.events.push(BlockEvent::Removed { hashes: removed });
        }
    }

    /// Forgets every cached block (active ones stay registered).
    pub fn clear_cache(&mut self) {
        let cached = std::mem::take(&mut self.cached);
        for (_, b) in cached {
            if let Some(h) = self.blocks[b.0 as usize].hash.take() {
                self.by_hash.remove(&h.sequence);
            }
            self.free.push(b);
        }
        self.events.push(BlockEvent::Cleared);
    }

    fn acquire(&mut self, b: BlockId) {
        let block = &mut self.blocks[b.0 as usize];
        if block.refs == 0 {
            self.cached.remove(&block.released_at);
            self.active += 1;
        }
        block.refs += 1;
    }

    /// A block with no content: a free one, or the least recently released cached one.
    fn take_block(&mut self) -> Option<BlockId> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.cached.pop_first()?;
                if let Some(h) = self.blocks[b.0 as usize].hash.take() {
                    self.by_hash.remove(&h.sequence);
                    self.events.push(BlockEvent::Removed {
                        hashes: vec![h.sequence],
                    });
                }
                b
            }
        };
        let block = &mut self.blocks[b.0 as usize];
        block.refs = 1;
        block.hash = None;
        self.active += 1;
        Some(b)
    }

    /// Registers full blocks `from..to` of `seq` (whose content is `tokens`) under their
    /// hashes and records `Stored` events: one per run of newly registered blocks, so that each
    /// event's blocks really are a chain under its parent.
    fn register(&mut self, seq: &SeqBlocks, tokens: &[u32], from: usize, to: usize) {
        if !self.prefix_caching || from >= to {
            return;
        }
        let mut run: Vec<BlockHashes> = Vec::new();
        let mut run_start = from;
        for i in from..to {
            let (Some(&b), Some(&h)) = (seq.blocks.get(i), seq.full.get(i)) else {
                break;
            };
            // Another block may already hold this hash (its parent was evicted, it was not):
            // keep that one, this block stays anonymous, and the run restarts under it.
            if self.by_hash.contains_key(&h.sequence) {
                self.push_stored(seq, tokens, run_start, std::mem::take(&mut run));
                run_start = i + 1;
                continue;
            }
            self.by_hash.insert(h.sequence, b);
            self.blocks[b.0 as usize].hash = Some(h);
            run.push(h);
        }
        self.push_stored(seq, tokens, run_start, run);
    }

    fn push_stored(
        &mut self,
        seq: &SeqBlocks,
        tokens: &[u32],
        start: usize,
        run: Vec<BlockHashes>,
    ) {
        if run.is_empty() {
            return;
        }
        let bs = self.block_size;
        let parent_hash = start
            .checked_sub(1)
            .and_then(|p| seq.full.get(p))
            .map(|h| h.sequence);
        let toks = tokens
            .get(start * bs..(start + run.len()) * bs)
            .map(<[u32]>::to_vec)
            .unwrap_or_default();
        self.events.push(BlockEvent::Stored {
            parent_hash,
            blocks: run,
            tokens: toks,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: u32, base: u32) -> Vec<u32> {
        (base..base + n).collect()
    }

    #[test]
    fn prefix_reuse_counts_cached_tokens_and_keeps_blocks_active() {
        let mut pool = BlockPool::new(10, 4, true);
        let a = pool.allocate(&toks(10, 0)).unwrap();
        assert_eq!(a.blocks.len(), 3);
        assert_eq!(a.cached_tokens, 0);
        assert_eq!(pool.stats().active_blocks, 3);
        let events = pool.drain_events();
        assert!(
            matches!(&events[..], [BlockEvent::Stored { parent_hash: None, blocks, tokens }] if blocks.len() == 2 && tokens.len() == 8)
        );

        // Same first 8 tokens: two blocks shared.
        let mut p2 = toks(8, 0);
        p2.extend([100, 101, 102]);
        let b = pool.allocate(&p2).unwrap();
        assert_eq!(b.cached_tokens, 8);
        assert_eq!(&b.blocks[..2], &a.blocks[..2]);
        assert_eq!(pool.stats().active_blocks, 4);
        pool.release(a);
        pool.release(b);
        let s = pool.stats();
        assert_eq!(s.active_blocks, 0);
        assert_eq!(s.cached_blocks, 2);
        assert!((s.prefix_hit_rate - (0.0 + 8.0 / 11.0) / 2.0).abs() < 1e-9);
    }

    #[test]
    fn cached_blocks_are_evicted_lru_with_removed_events() {
        let mut pool = BlockPool::new(4, 2, true);
        let a = pool.allocate(&toks(4, 0)).unwrap();
        pool.release(a);
        pool.drain_events();
        assert_eq!(pool.available_blocks(), 4);
        // Needs all 4 blocks: both cached ones are evicted, tail first.
        let b = pool.allocate(&toks(8, 50)).unwrap();
        let removed: Vec<_> = pool
            .drain_events()
            .into_iter()
            .filter(|e| matches!(e, BlockEvent::Removed { .. }))
            .collect();
        assert_eq!(removed.len(), 2);
        assert!(pool.allocate(&toks(2, 90)).is_none(), "pool is full");
        pool.release(b);
        assert_eq!(pool.stats().active_blocks, 0);
    }

    #[test]
    fn growing_and_committing_registers_generated_blocks() {
        let mut pool = BlockPool::new(3, 2, true);
        let mut tokens = toks(3, 0);
        let mut seq = pool.allocate(&tokens).unwrap();
        pool.drain_events();
        for t in 10..13 {
            tokens.push(t);
            assert!(pool.grow(&mut seq, tokens.len()));
            pool.commit(&mut seq, &tokens);
        }
        assert_eq!(seq.full.len(), 3);
        let events = pool.drain_events();
        assert_eq!(events.len(), 2, "{events:?}");
        tokens.push(13);
        assert!(!pool.grow(&mut seq, tokens.len()), "out of blocks");
        pool.release(seq);
        // The whole generated sequence is reusable now.
        let again = pool.allocate(&tokens[..6]).unwrap();
        assert_eq!(again.cached_tokens, 4, "last block is recomputed");
    }

    #[test]
    fn without_prefix_caching_nothing_is_reused() {
        let mut pool = BlockPool::new(4, 2, false);
        let a = pool.allocate(&toks(4, 0)).unwrap();
        pool.release(a);
        let b = pool.allocate(&toks(4, 0)).unwrap();
        assert_eq!(b.cached_tokens, 0);
        assert!(pool.drain_events().is_empty());
    }
}
