//! Load the router itself put on each worker: prompt tokens still to prefill and blocks held by
//! requests in flight.
//!
//! A request's load is added when it is routed — before it is sent, so concurrent routing
//! decisions see each other — and taken off by its [`LoadGuard`]: prefill tokens at the first
//! output token ([`LoadGuard::prefill_done`]), everything when the guard drops, whichever way
//! the request ends (finished, failed, cancelled, client gone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A worker's routed load, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    pub prefill_tokens: u64,
    /// Distinct blocks of the requests in flight: full blocks shared by several requests (a
    /// common system prompt, a conversation's earlier turns) count once, as they do in the
    /// worker's cache; each request's unfinished last block counts for itself.
    pub decode_blocks: u64,
    pub requests: u64,
}

#[derive(Default)]
struct Tracked {
    prefill_tokens: u64,
    /// Sequence hash → requests holding the block.
    blocks: HashMap<u64, u32>,
    partial: u64,
    requests: u64,
}

impl Tracked {
    fn summary(&self) -> WorkerLoad {
        WorkerLoad {
            prefill_tokens: self.prefill_tokens,
            decode_blocks: self.blocks.len() as u64 + self.partial,
            requests: self.requests,
        }
    }
}

#[derive(Default)]
pub struct ActiveSequences {
    loads: Mutex<HashMap<u64, Tracked>>,
}

impl ActiveSequences {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn load(&self, worker_id: u64) -> WorkerLoad {
        self.lock()
            .get(&worker_id)
            .map(Tracked::summary)
            .unwrap_or_default()
    }

    pub fn all(&self) -> HashMap<u64, WorkerLoad> {
        self.lock().iter().map(|(k, v)| (*k, v.summary())).collect()
    }

    /// The worker's load now, and what it would be if a request with these full-block
    /// hashes (plus a partial block when `partial`) and `prefill_tokens` to compute were added.
    pub fn potential(
        &self,
        worker_id: u64,
        hashes: &[u64],
        partial: bool,
        prefill_tokens: u64,
    ) -> (WorkerLoad, WorkerLoad) {
        let loads = self.lock();
        let t = loads.get(&worker_id);
        let now = t.map(Tracked::summary).unwrap_or_default();
        let mut load = now;
        let new_blocks = match t {
            Some(t) => hashes.iter().filter(|h| !t.blocks.contains_key(h)).count(),
            None => hashes.len(),
        };
        load.decode_blocks += new_blocks as u64 + u64::from(partial);
        load.prefill_tokens += prefill_tokens;
        (now, load)
    }

    /// How many leading blocks of `hashes` requests in flight on `worker_id` hold: a prefix
    /// the worker is computing, or has just computed, before its block events can say so.
    pub fn inflight_prefix(&self, worker_id: u64, hashes: &[u64]) -> u32 {
        let loads = self.lock();
        let Some(t) = loads.get(&worker_id) else {
            return 0;
        };
        hashes
            .iter()
            .take_while(|h| t.blocks.contains_key(h))
            .count() as u32
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.loads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request on `worker_id`; its load stays until the guard drops.
    pub fn add(
        self: &Arc<Self>,
        worker_id: u64,
        prefill_tokens: u64,
        hashes: Vec<u64>,
        partial: bool,
    ) -> LoadGuard {
        let mut loads = self.lock();
        let t = loads.entry(worker_id).or_default();
        t.prefill_tokens += prefill_tokens;
        for h in &hashes {
            *t.blocks.entry(*h).or_insert(0) += 1;
        }
        t.partial += u64::from(partial);
        t.requests += 1;
        LoadGuard {
            seqs: self.clone(),
            worker_id,
            prefill_tokens,
            hashes,
            partial,
        }
    }

    /// Forgets a worker that left (its guards then subtract from nothing). Workers stay
    /// listed, idle, until then.
    pub fn remove_worker(&self, worker_id: u64) {
        self.lock().remove(&worker_id);
    }
}

/// A routed request's share of its worker's load.
#[must_use = "dropping the guard releases the request's load at once"]
pub struct LoadGuard {
    seqs: Arc<ActiveSequences>,
    worker_id: u64,
    prefill_tokens: u64,
    hashes: Vec<u64>,
    partial: bool,
}

impl LoadGuard {
    /// The first token arrived: the prompt is no longer waiting to be computed.
    pub fn prefill_done(&mut self) {
        let n = std::mem::take(&mut self.prefill_tokens);
        if n > 0
            && let Some(t) = self.seqs.lock().get_mut(&self.worker_id)
        {
            t.prefill_tokens = t.prefill_tokens.saturating_sub(n);
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let mut loads = self.seqs.lock();
        let Some(t) = loads.get_mut(&self.worker_id) else {
            return;
        };
        t.prefill_tokens = t.prefill_tokens.saturating_sub(self.prefill_tokens);
        for h in &self.hashes {
            if let Some(n) = t.blocks.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    t.blocks.remove(h);
                }
            }
        }
        t.partial = t.partial.saturating_sub(u64::from(self.partial));
        t.requests = t.requests.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_release_on_every_path() {
        let s = ActiveSequences::new();
        let mut a = s.add(1, 100, vec![1, 2, 3], true);
        // Shares blocks 1 and 2 with `a`: only block 4 and its partial block are new.
        let (now, with) = s.potential(1, &[1, 2, 4], true, 50);
        assert_eq!((now.decode_blocks, with.decode_blocks), (4, 6));
        let b = s.add(1, 50, vec![1, 2, 4], true);
        assert_eq!(
            s.load(1),
            WorkerLoad {
                prefill_tokens: 150,
                decode_blocks: 6,
                requests: 2
            }
        );
        a.prefill_done();
        a.prefill_done();
        assert_eq!(s.load(1).prefill_tokens, 50);
        drop(b);
        assert_eq!(
            s.load(1),
            WorkerLoad {
                prefill_tokens: 0,
                decode_blocks: 4,
                requests: 1
            }
        );
        // A panicking or cancelled request path still drops its guard.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = s.add(2, 10, vec![9], false);
            panic!("request failed");
        }));
        assert!(r.is_err());
        drop(a);
        assert!(s.all().values().all(|l| *l == WorkerLoad::default()));
    }
}
