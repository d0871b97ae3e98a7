//! The prefill worker's record of held transfers: which blocks each transfer id names, until
//! a decode worker claims them over the data plane or the hold expires (`--kv-transfer-timeout`;
//! the blocks are then freed, e.g. when the decode worker died before fetching).

use crate::metrics::TransferMetrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_engine_api::KvTransfer;

#[derive(Clone)]
pub struct Holds {
    held: Arc<Mutex<HashMap<u64, Vec<u32>>>>,
    transfer: Arc<dyn KvTransfer>,
    timeout: Duration,
    metrics: TransferMetrics,
}

impl Holds {
    pub fn new(transfer: Arc<dyn KvTransfer>, timeout: Duration, metrics: TransferMetrics) -> Self {
        Self {
            held: Arc::default(),
            transfer,
            timeout,
            metrics,
        }
    }

    /// Records that `blocks` wait under `transfer_id`; frees them after the timeout unless
    /// claimed first.
    pub fn hold(&self, transfer_id: u64, blocks: Vec<u32>) {
        self.lock().insert(transfer_id, blocks);
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.timeout).await;
            if this.lock().remove(&transfer_id).is_some() {
                tracing::warn!(
                    transfer_id,
                    timeout_s = this.timeout.as_secs_f64(),
                    "KV blocks were not fetched in time; freeing them"
                );
                this.metrics.failed("expired");
                this.transfer.release(transfer_id);
            }
        });
    }

    /// Takes the blocks of `transfer_id` for sending; `None` when unknown or expired. The
    /// caller releases them when done.
    pub fn claim(&self, transfer_id: u64) -> Option<Vec<u32>> {
        self.lock().remove(&transfer_id)
    }

    /// Frees the blocks of `transfer_id` now (its decode leg will not run); false when they
    /// were not held (fetched, expired, never were).
    pub fn release(&self, transfer_id: u64) -> bool {
        let held = self.claim(transfer_id).is_some();
        if held {
            self.transfer.release(transfer_id);
        }
        held
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<u32>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}
