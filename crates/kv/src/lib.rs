//! KV-cache block bookkeeping shared by every engine (the mocker and the real one) and, for the
//! hashes, by the router.
//!
//! - [`hash`]: Dynamo's block identities — xxh3-64 (seed 1337) of a full block's token ids,
//!   chained with the parent's hash into a sequence hash.
//! - [`pool`]: a fixed number of blocks; sequences own block tables; full blocks are
//!   registered under their sequence hash so later prompts with the same prefix reuse them;
//!   blocks nobody uses stay cached until evicted least-recently-used first. Registrations and
//!   evictions are recorded as [`pool::BlockEvent`]s for publication.
//! - [`tap`]: the channel an engine's block events leave it through.

pub mod hash;
pub mod pool;
pub mod tap;

pub use hash::{BlockHashes, local_block_hash, sequence_hashes};
pub use pool::{BlockEvent, BlockId, BlockPool, PoolStats, SeqBlocks};
pub use tap::EventTap;
