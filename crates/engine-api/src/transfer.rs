//! Moving a prompt's KV blocks from one engine to another (disaggregated prefill and decode).
//!
//! A request takes part as [`Disagg`]: aggregated (`None`), as a **prefill leg** (the engine
//! computes the prompt and the first token, then *holds* the prompt's blocks under a transfer
//! id instead of freeing them, and names them in the last output's `disaggregated_params`), or
//! as a **decode leg** carrying a [`KvImport`] (blocks fetched from the prefill worker, which
//! the engine writes into its own pool at admission before continuing from the first token).
//!
//! How block contents leave and enter an engine is behind [`KvTransfer`], so that the worker's
//! data plane (TCP today) never touches an engine's tensors and a GPU build can later move
//! blocks device to device without touching the scheduler. Engines write imported blocks in
//! their own step, before the forward pass: a block registered in the prefix cache always has
//! its contents by the time any attention reads it.

use crate::EngineError;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tandem_kv::BlockEvent;
use tandem_protocols::disagg::KvLayout;

/// How a request takes part in disaggregated serving.
#[derive(Debug, Default)]
pub enum Disagg {
    /// Prefill and decode here.
    #[default]
    Aggregated,
    /// Compute the prompt and one token, then hold the prompt's blocks under `transfer_id`
    /// until [`KvTransfer::release`].
    Prefill { transfer_id: u64 },
    /// The prompt's KV was computed elsewhere: write it, emit `first_token`, go on decoding.
    Decode(KvImport),
}

/// A decode leg's prompt blocks, fetched from the prefill worker.
#[derive(Debug, Clone, Default)]
pub struct KvImport {
    /// The token the prefill worker sampled; emitted first.
    pub first_token: u32,
    /// Its logprobs, when the request asked for them.
    pub first_logprob: Option<tandem_protocols::llm::TokenLogprob>,
    /// Prompt tokens the prefill worker found cached (reported in the first output).
    pub cached_tokens: Option<u32>,
    /// Index of the prompt block `blocks[0]` is: the blocks before it were in this engine's
    /// cache when they were fetched.
    pub first_block: usize,
    /// One entry per block from `first_block` to the prompt's last (possibly partial) block,
    /// in the [`KvLayout::block_bytes`] wire format.
    pub blocks: Vec<Vec<u8>>,
    /// Held while the fetched bytes are: the worker's budget for fetched-but-unwritten KV
    /// gets them back when the engine has taken the import apart (at admission) or dropped it
    /// (the request ended while queued).
    pub lease: Option<ImportLease>,
}

/// Something the owner of a [`KvImport`] keeps alive as long as the import (a semaphore
/// permit); opaque to engines.
#[derive(Clone)]
pub struct ImportLease(pub Arc<dyn Send + Sync>);

impl std::fmt::Debug for ImportLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportLease")
    }
}

/// The engine side of block transfers.
pub trait KvTransfer: Send + Sync {
    /// This engine's block layout; only an equal layout can be written here.
    fn layout(&self) -> KvLayout;
    /// Appends the contents of block `id` (held for a transfer) to `out`, in the wire format.
    fn read_block(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EngineError>;
    /// How many leading blocks of `hashes` (sequence hashes) are in this engine's prefix cache
    /// now. A snapshot: a block may be evicted before an import lands, and the engine then
    /// computes what it lacks.
    fn cached_prefix(&self, hashes: &[u64]) -> usize;
    /// Frees the blocks held under `transfer_id` (nothing if none are).
    fn release(&self, transfer_id: u64);
    /// Time a transfer of `blocks` blocks is made to last beyond the real copy (the mocker
    /// simulates a link's bandwidth); zero for real engines.
    fn simulated_delay(&self, _blocks: usize) -> Duration {
        Duration::ZERO
    }
    /// Bytes one block stands for beyond what the wire carries (the mocker's blocks carry
    /// nothing but model a real size); counted in transfer metrics. Zero for real engines.
    fn simulated_block_bytes(&self) -> u64 {
        0
    }
}

/// The sequence hashes an engine's pool has registered, kept in step with its block events,
/// so that the worker can ask what is cached without waiting for the engine's step.
#[derive(Clone, Default)]
pub struct CacheIndex(Arc<RwLock<HashSet<u64>>>);

impl CacheIndex {
    pub fn apply(&self, events: &[BlockEvent]) {
        if events.is_empty() {
            return;
        }
        let mut set = self.0.write().unwrap_or_else(|p| p.into_inner());
        for e in events {
            match e {
                BlockEvent::Stored { blocks, .. } => set.extend(blocks.iter().map(|b| b.sequence)),
                BlockEvent::Removed { hashes } => {
                    for h in hashes {
                        set.remove(h);
                    }
                }
                BlockEvent::Cleared => set.clear(),
            }
        }
    }

    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        let set = self.0.read().unwrap_or_else(|p| p.into_inner());
        hashes.iter().take_while(|h| set.contains(h)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_kv::BlockHashes;

    #[test]
    fn the_index_follows_block_events() {
        let idx = CacheIndex::default();
        let b = |s| BlockHashes {
            local: s,
            sequence: s,
        };
        idx.apply(&[BlockEvent::Stored {
            parent_hash: None,
            blocks: vec![b(1), b(2), b(3)],
            tokens: vec![],
        }]);
        assert_eq!(idx.cached_prefix(&[1, 2, 3, 4]), 3);
        idx.apply(&[BlockEvent::Removed { hashes: vec![2] }]);
        assert_eq!(idx.cached_prefix(&[1, 2, 3]), 1);
        idx.apply(&[BlockEvent::Cleared]);
        assert_eq!(idx.cached_prefix(&[1]), 0);
    }
}
