//! Dynamo's block hashing (reference: `lib/llm/src/kv_router/indexer.rs`).
//!
//! A block's *local* hash is xxh3-64 with seed 1337 over its token ids as little-endian u32;
//! a trailing partial block has none. The *sequence* hash chains them:
//! `seq[0] = local[0]`, `seq[i] = xxh3(le(seq[i-1]) ‖ le(local[i]))`, so equal sequence hashes
//! mean equal prefixes.

use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const XXH3_SEED: u64 = 1337;

pub fn local_block_hash(tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, XXH3_SEED)
}

pub fn chain(parent: u64, local: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&parent.to_le_bytes());
    bytes[8..].copy_from_slice(&local.to_le_bytes());
    xxh3_64_with_seed(&bytes, XXH3_SEED)
}

/// Local and sequence hash of one full block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHashes {
    pub local: u64,
    pub sequence: u64,
}

/// Hashes of every full block of `tokens`.
pub fn sequence_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHashes> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut parent: Option<u64> = None;
    for block in tokens.chunks_exact(block_size.max(1)) {
        let local = local_block_hash(block);
        let sequence = match parent {
            None => local,
            Some(p) => chain(p, local),
        };
        out.push(BlockHashes { local, sequence });
        parent = Some(sequence);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_blocks_are_ignored_and_prefixes_share_hashes() {
        let a = sequence_hashes(&[1, 2, 3, 4, 5, 6, 7], 2);
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].sequence, a[0].local);
        let b = sequence_hashes(&[1, 2, 3, 4, 9, 9], 2);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // Same tokens in a different position: same local hash, different sequence hash.
        let c = sequence_hashes(&[3, 4], 2);
        assert_eq!(c[0].local, a[1].local);
        assert_ne!(c[0].sequence, a[1].sequence);
    }

    #[test]
    fn local_hash_is_xxh3_seed_1337_over_le_u32() {
        let expected = xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0], 1337);
        assert_eq!(local_block_hash(&[1, 2]), expected);
        assert_ne!(
            local_block_hash(&[1, 2]),
            xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0], 0)
        );
    }
}
