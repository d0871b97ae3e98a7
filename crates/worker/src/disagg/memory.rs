//! A [`KvTransfer`] over blocks in host memory: the data plane exercised without an engine
//! (its unit tests, `examples/kv_transfer_bench.rs`). Releases are recorded, not acted on.

use std::collections::HashMap;
use std::sync::Mutex;
use tandem_engine_api::{EngineError, KvTransfer};
use tandem_protocols::disagg::KvLayout;

pub struct MemoryBlocks {
    layout: KvLayout,
    blocks: HashMap<u32, Vec<u8>>,
    released: Mutex<Vec<u64>>,
}

impl MemoryBlocks {
    /// Blocks by id; each should be `layout.block_bytes()` long.
    pub fn new(layout: KvLayout, blocks: HashMap<u32, Vec<u8>>) -> Self {
        Self {
            layout,
            blocks,
            released: Mutex::default(),
        }
    }

    /// Transfer ids released so far, in order.
    pub fn released(&self) -> Vec<u64> {
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl KvTransfer for MemoryBlocks {
    fn layout(&self) -> KvLayout {
        self.layout.clone()
    }

    fn read_block(&self, id: u32, out: &mut Vec<u8>) -> Result<(), EngineError> {
        let b = self
            .blocks
            .get(&id)
            .ok_or_else(|| EngineError::StepFailed(format!("no block {id}")))?;
        out.extend_from_slice(b);
        Ok(())
    }

    fn cached_prefix(&self, _: &[u64]) -> usize {
        0
    }

    fn release(&self, transfer_id: u64) {
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(transfer_id);
    }
}
