//! The radix tree of cached blocks: which worker holds which prefix.
//!
//! Nodes are blocks keyed, under their parent, by `tokens_hash` (the hash of the block's own
//! tokens), so equal prefixes from different workers share a path. Each node lists the workers
//! holding it. Per worker, a map from the worker's `block_hash` (sequence hash) to its node
//! applies `stored` (find the parent) and `removed` events in O(1) per block.
//! `find_matches` walks the request's block hashes from the root and counts, per worker, how
//! many leading blocks it holds.
//!
//! Nodes live in a slab (`Vec` + free list) and workers are small dense indices. Most nodes of
//! a prefix tree have one child and few holders, so a node keeps its only child and up to four
//! holders inline: storing or removing a block in the middle of a conversation allocates nothing.

use smallvec::SmallVec;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use tandem_protocols::kv_events::{KvCacheEventData, KvCacheStoreData};

/// Block hashes are xxh3 outputs already: hashing them again only costs time.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type HashMapU64<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

/// Worker ids are lease ids, not hashes: one multiply spreads them over the table's bits
/// (the default SipHash cost a quarter of an event).
#[derive(Default)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A node's children by `tokens_hash`: inline while there is at most one (a conversation's
/// chain of blocks), a map once the prefix branches.
#[derive(Default)]
enum Children {
    #[default]
    None,
    One(u64, u32),
    Many(HashMapU64<u32>),
}

impl Children {
    fn get(&self, key: u64) -> Option<u32> {
        match self {
            Self::None => None,
            Self::One(k, n) => (*k == key).then_some(*n),
            Self::Many(m) => m.get(&key).copied(),
        }
    }

    fn insert(&mut self, key: u64, node: u32) {
        match self {
            Self::None => *self = Self::One(key, node),
            Self::One(k, n) => {
                let mut m = HashMapU64::default();
                m.insert(*k, *n);
                m.insert(key, node);
                *self = Self::Many(m);
            }
            Self::Many(m) => {
                m.insert(key, node);
            }
        }
    }

    fn remove(&mut self, key: u64) {
        match self {
            Self::One(k, _) if *k == key => *self = Self::None,
            Self::Many(m) => {
                m.remove(&key);
            }
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::None => true,
            Self::One(..) => false,
            Self::Many(m) => m.is_empty(),
        }
    }
}

const ROOT: u32 = 0;
/// `parent` of a slot on the free list.
const FREED: u32 = u32::MAX;

#[derive(Default)]
struct Node {
    parent: u32,
    key: u64,
    children: Children,
    /// Dense worker indices holding this block.
    workers: SmallVec<[u32; 4]>,
}

/// Why an event was (partly) not applied; Dynamo's `kv_cache_events_applied` statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyStatus {
    Ok,
    ParentBlockNotFound,
    BlockNotFound,
}

impl ApplyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ParentBlockNotFound => "parent_block_not_found",
            Self::BlockNotFound => "block_not_found",
        }
    }
}

/// Matched leading blocks per worker for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlapScores {
    pub scores: HashMap<u64, u32>,
}

#[derive(Default)]
pub struct RadixTree {
    nodes: Vec<Node>,
    free: Vec<u32>,
    worker_index: HashMap<u64, u32, BuildHasherDefault<MixHasher>>,
    worker_ids: Vec<u64>,
    /// Per worker index: block_hash → node.
    lookup: Vec<HashMapU64<u32>>,
    free_workers: Vec<u32>,
}

impl RadixTree {
    pub fn new() -> Self {
        Self {
            nodes: vec![Node::default()],
            ..Default::default()
        }
    }

    fn worker(&mut self, worker_id: u64) -> u32 {
        if let Some(&w) = self.worker_index.get(&worker_id) {
            return w;
        }
        let w = match self.free_workers.pop() {
            Some(w) => {
                self.worker_ids[w as usize] = worker_id;
                w
            }
            None => {
                self.worker_ids.push(worker_id);
                self.lookup.push(HashMapU64::default());
                (self.worker_ids.len() - 1) as u32
            }
        };
        self.worker_index.insert(worker_id, w);
        w
    }

    fn alloc(&mut self, parent: u32, key: u64) -> u32 {
        let node = Node {
            parent,
            key,
            ..Default::default()
        };
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// Frees `n` and then its ancestors while they hold nothing and lead nowhere.
    fn prune(&mut self, mut n: u32) {
        while n != ROOT {
            let node = &self.nodes[n as usize];
            if node.parent == FREED || !node.workers.is_empty() || !node.children.is_empty() {
                return;
            }
            let (parent, key) = (node.parent, node.key);
            self.nodes[parent as usize].children.remove(key);
            self.nodes[n as usize] = Node {
                parent: FREED,
                ..Default::default()
            };
            self.free.push(n);
            n = parent;
        }
    }

    /// Applies one event of `worker_id`.
    pub fn apply(&mut self, worker_id: u64, data: &KvCacheEventData) -> ApplyStatus {
        match data {
            KvCacheEventData::Stored(s) => self.store(worker_id, s),
            KvCacheEventData::Removed(r) => self.remove(worker_id, &r.block_hashes),
            KvCacheEventData::Cleared => {
                self.clear_worker(worker_id);
                ApplyStatus::Ok
            }
        }
    }

    pub fn store(&mut self, worker_id: u64, data: &KvCacheStoreData) -> ApplyStatus {
        let w = self.worker(worker_id);
        let mut at = match data.parent_hash {
            None => ROOT,
            Some(p) => match self.lookup[w as usize].get(&p) {
                Some(&n) => n,
                None => return ApplyStatus::ParentBlockNotFound,
            },
        };
        for b in &data.blocks {
            let next = match self.lookup[w as usize].get(&b.block_hash) {
                // Already known for this worker (a re-announcement): keep its node.
                Some(&n) => n,
                None => {
                    let n = match self.nodes[at as usize].children.get(b.tokens_hash) {
                        Some(n) => n,
                        None => {
                            let n = self.alloc(at, b.tokens_hash);
                            self.nodes[at as usize].children.insert(b.tokens_hash, n);
                            n
                        }
                    };
                    self.lookup[w as usize].insert(b.block_hash, n);
                    n
                }
            };
            let workers = &mut self.nodes[next as usize].workers;
            if !workers.contains(&w) {
                workers.push(w);
            }
            at = next;
        }
        ApplyStatus::Ok
    }

    pub fn remove(&mut self, worker_id: u64, block_hashes: &[u64]) -> ApplyStatus {
        let Some(&w) = self.worker_index.get(&worker_id) else {
            return ApplyStatus::BlockNotFound;
        };
        for h in block_hashes {
            let Some(n) = self.lookup[w as usize].remove(h) else {
                return ApplyStatus::BlockNotFound;
            };
            let workers = &mut self.nodes[n as usize].workers;
            workers.retain(|x| *x != w);
            self.prune(n);
        }
        ApplyStatus::Ok
    }

    /// Forgets everything `worker_id` holds (a `cleared` event, or the worker left).
    pub fn clear_worker(&mut self, worker_id: u64) {
        let Some(&w) = self.worker_index.get(&worker_id) else {
            return;
        };
        let nodes: Vec<u32> = self.lookup[w as usize].drain().map(|(_, n)| n).collect();
        for n in &nodes {
            self.nodes[*n as usize].workers.retain(|x| *x != w);
        }
        // Any order: prune walks up, stops at anything still used, and skips freed slots.
        for n in nodes {
            self.prune(n);
        }
    }

    /// Forgets `worker_id` entirely.
    pub fn remove_worker(&mut self, worker_id: u64) {
        self.clear_worker(worker_id);
        if let Some(w) = self.worker_index.remove(&worker_id) {
            self.free_workers.push(w);
        }
    }

    /// Matched leading blocks per worker for a request whose full blocks hash to `local`.
    pub fn find_matches(&self, local: &[u64]) -> OverlapScores {
        let mut scores = HashMap::new();
        let mut at = ROOT;
        for h in local {
            let Some(n) = self.nodes[at as usize].children.get(*h) else {
                break;
            };
            let node = &self.nodes[n as usize];
            if node.workers.is_empty() {
                break;
            }
            for &w in &node.workers {
                *scores.entry(self.worker_ids[w as usize]).or_insert(0) += 1;
            }
            at = n;
        }
        OverlapScores { scores }
    }

    /// Blocks the index holds for `worker_id`.
    pub fn tree_size(&self, worker_id: u64) -> usize {
        self.worker_index
            .get(&worker_id)
            .map(|&w| self.lookup[w as usize].len())
            .unwrap_or(0)
    }

    /// Workers with at least one block.
    pub fn workers(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .worker_index
            .iter()
            .filter(|(_, w)| !self.lookup[**w as usize].is_empty())
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable();
        v
    }

    /// Live nodes besides the root.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_kv::sequence_hashes;
    use tandem_protocols::kv_events::{KvCacheRemoveData, KvCacheStoredBlock};

    fn stored(tokens: &[u32], bs: usize, from: usize) -> KvCacheEventData {
        let h = sequence_hashes(tokens, bs);
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: from.checked_sub(1).map(|p| h[p].sequence),
            blocks: h[from..]
                .iter()
                .map(|b| KvCacheStoredBlock {
                    block_hash: b.sequence,
                    tokens_hash: b.local,
                })
                .collect(),
        })
    }

    fn locals(tokens: &[u32], bs: usize) -> Vec<u64> {
        sequence_hashes(tokens, bs)
            .iter()
            .map(|h| h.local)
            .collect()
    }

    #[test]
    fn shared_prefixes_score_per_worker_and_removal_prunes() {
        let bs = 4;
        let a: Vec<u32> = (0..16).collect();
        let mut b: Vec<u32> = (0..8).collect();
        b.extend(100..108);
        let mut t = RadixTree::new();
        assert_eq!(t.apply(1, &stored(&a, bs, 0)), ApplyStatus::Ok);
        assert_eq!(t.apply(2, &stored(&b[..8], bs, 0)), ApplyStatus::Ok);
        assert_eq!(
            t.apply(2, &stored(&b, bs, 2)),
            ApplyStatus::Ok,
            "continues under a parent"
        );
        assert_eq!(
            t.node_count(),
            6,
            "two shared blocks, then two branches of two"
        );

        let m = t.find_matches(&locals(&a, bs));
        assert_eq!(m.scores[&1], 4);
        assert_eq!(m.scores[&2], 2);
        let m = t.find_matches(&locals(&b, bs));
        assert_eq!((m.scores[&1], m.scores[&2]), (2, 4));
        assert!(t.find_matches(&locals(&[9; 8], bs)).scores.is_empty());

        // Unknown parent and unknown block are reported, not applied.
        let orphan = KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: Some(12345),
            blocks: vec![],
        });
        assert_eq!(t.apply(1, &orphan), ApplyStatus::ParentBlockNotFound);
        let bogus = KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: vec![42],
        });
        assert_eq!(t.apply(1, &bogus), ApplyStatus::BlockNotFound);

        // Worker 1 drops its last two blocks: the branch disappears.
        let h = sequence_hashes(&a, bs);
        let rm = KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: vec![h[3].sequence, h[2].sequence],
        });
        assert_eq!(t.apply(1, &rm), ApplyStatus::Ok);
        assert_eq!(t.node_count(), 4);
        assert_eq!(t.find_matches(&locals(&a, bs)).scores[&1], 2);
        assert_eq!(t.tree_size(1), 2);

        t.remove_worker(2);
        assert_eq!(t.node_count(), 2);
        assert_eq!(t.workers(), vec![1]);
        t.apply(1, &KvCacheEventData::Cleared);
        assert_eq!(t.node_count(), 0);
        assert!(t.workers().is_empty());
        // Slots are reused.
        t.apply(3, &stored(&a, bs, 0));
        assert_eq!(t.node_count(), 4);
        assert_eq!(t.find_matches(&locals(&a, bs)).scores[&3], 4);
    }

    #[test]
    fn many_branches_and_many_holders() {
        // Six workers share a prefix (holders spill past the inline four) and each then
        // branches off it (the shared node's children become a map).
        let bs = 4;
        let shared: Vec<u32> = (0..8).collect();
        let mut t = RadixTree::new();
        let mut own = Vec::new();
        for w in 0..6u64 {
            let mut toks = shared.clone();
            toks.extend((0..4).map(|i| 1000 * (w as u32 + 1) + i));
            assert_eq!(t.apply(w, &stored(&toks, bs, 0)), ApplyStatus::Ok);
            own.push(toks);
        }
        assert_eq!(t.node_count(), 2 + 6);
        for (w, toks) in own.iter().enumerate() {
            let m = t.find_matches(&locals(toks, bs));
            assert_eq!(m.scores.len(), 6);
            assert_eq!(m.scores[&(w as u64)], 3);
            assert!(m.scores.iter().all(|(k, v)| *k == w as u64 || *v == 2));
        }
        // Branches go one by one; the shared prefix stays until its last holder leaves.
        for w in 0..6u64 {
            let h = sequence_hashes(&own[w as usize], bs);
            let rm = KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: vec![h[2].sequence],
            });
            assert_eq!(t.apply(w, &rm), ApplyStatus::Ok);
        }
        assert_eq!(t.node_count(), 2);
        for w in 0..5u64 {
            t.remove_worker(w);
        }
        assert_eq!(t.find_matches(&locals(&own[5], bs)).scores[&5], 2);
        t.remove_worker(5);
        assert_eq!(t.node_count(), 0);
        // A branch re-added under a node whose child map emptied is found again.
        assert_eq!(t.apply(9, &stored(&own[0], bs, 0)), ApplyStatus::Ok);
        assert_eq!(t.find_matches(&locals(&own[0], bs)).scores[&9], 3);
    }
}
