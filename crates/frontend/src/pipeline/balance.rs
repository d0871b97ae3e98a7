//! Routing by load without the KV index, and session affinity — Dynamo's `power-of-two` and
//! `least-loaded` router modes and its `X-Dynamo-Session-ID` header.
//!
//! Load is what this frontend has in flight on each worker ([`Inflight`]): a request counts
//! from its routing to its end (a guard in its [`super::route::Route`]), so a burst is spread
//! before any worker reports anything. `least-loaded` takes the worker with the fewest, ties
//! in turn; `power-of-two` samples two workers at random and takes the less loaded, which
//! keeps most of the balance at a fraction of the bookkeeping when workers are many.
//!
//! [`Sessions`] remembers which worker each session id went to, for `ttl` after its last
//! request: the session's next request goes there while that worker serves the model, so a
//! conversation keeps finding its prefix in one cache whatever the router mode.

use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `--router-mode power-of-two | least-loaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPolicy {
    PowerOfTwo,
    LeastLoaded,
}

/// Requests in flight per worker, as this frontend routed them.
#[derive(Default)]
pub struct Inflight {
    counts: Mutex<HashMap<u64, usize>>,
    turn: AtomicUsize,
}

/// One request's place in [`Inflight`]; dropping it ends the request's load.
pub struct InflightGuard {
    owner: Arc<Inflight>,
    worker: u64,
}

impl InflightGuard {
    pub fn worker(&self) -> u64 {
        self.worker
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut counts = self.owner.counts();
        if let Some(n) = counts.get_mut(&self.worker) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.worker);
            }
        }
    }
}

impl Inflight {
    fn counts(&self) -> MutexGuard<'_, HashMap<u64, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight on `worker`.
    pub fn load(&self, worker: u64) -> usize {
        self.counts().get(&worker).copied().unwrap_or(0)
    }

    /// The worker `policy` picks among `ids` (none when `ids` is empty), with the request
    /// counted on it: one step under one lock, so that concurrent requests never both take
    /// the same least loaded worker.
    pub fn enter_chosen(
        self: &Arc<Self>,
        policy: LoadPolicy,
        ids: &[u64],
    ) -> Option<InflightGuard> {
        let mut counts = self.counts();
        let worker = self.pick(&counts, policy, ids)?;
        *counts.entry(worker).or_insert(0) += 1;
        Some(InflightGuard {
            owner: self.clone(),
            worker,
        })
    }

    /// The worker `policy` picks among `ids` (none when `ids` is empty), without counting.
    pub fn choose(&self, policy: LoadPolicy, ids: &[u64]) -> Option<u64> {
        self.pick(&self.counts(), policy, ids)
    }

    fn pick(&self, counts: &HashMap<u64, usize>, policy: LoadPolicy, ids: &[u64]) -> Option<u64> {
        let load = |w: &u64| counts.get(w).copied().unwrap_or(0);
        match (policy, ids.len()) {
            (_, 0) => None,
            (_, 1) => Some(ids[0]),
            (LoadPolicy::PowerOfTwo, n) => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let (a, b) = (ids[a], ids[b]);
                Some(if load(&b) < load(&a) { b } else { a })
            }
            (LoadPolicy::LeastLoaded, n) => {
                let least = ids.iter().map(load).min().unwrap_or(0);
                let tied: Vec<u64> = ids.iter().copied().filter(|w| load(w) == least).collect();
                // Ties in turn, so that an idle fleet is not all sent to its first worker.
                let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                tied.get(turn % tied.len().max(1))
                    .copied()
                    .or(ids.get(turn % n).copied())
            }
        }
    }

    /// Counts one request on `worker` until the guard drops.
    pub fn enter(self: &Arc<Self>, worker: u64) -> InflightGuard {
        *self.counts().entry(worker).or_insert(0) += 1;
        InflightGuard {
            owner: self.clone(),
            worker,
        }
    }
}

/// Session id → the worker its requests go to, each entry kept `ttl` after its last use.
pub struct Sessions {
    ttl: Duration,
    map: Mutex<HashMap<String, (u64, Instant)>>,
}

/// Above this many sessions, expired ones are swept on insertion.
const SWEEP_ABOVE: usize = 1024;

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker `session` is bound to, if it is bound, not expired, and among `alive`.
    pub fn get(&self, session: &str, alive: &[u64]) -> Option<u64> {
        let map = self.map();
        let (worker, last) = map.get(session)?;
        (last.elapsed() < self.ttl && alive.contains(worker)).then_some(*worker)
    }

    /// Binds `session` to `worker` from now for `ttl`.
    pub fn put(&self, session: &str, worker: u64) {
        let mut map = self.map();
        if map.len() > SWEEP_ABOVE {
            let ttl = self.ttl;
            map.retain(|_, (_, last)| last.elapsed() < ttl);
        }
        map.insert(session.to_string(), (worker, Instant::now()));
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_fills_the_emptiest_and_takes_ties_in_turn() {
        let f = Arc::new(Inflight::default());
        let ids = [1, 2, 3];
        // An idle fleet: in turn.
        let mut guards = Vec::new();
        let mut first = Vec::new();
        for _ in 0..3 {
            let g = f.enter_chosen(LoadPolicy::LeastLoaded, &ids).unwrap();
            first.push(g.worker());
            guards.push(g);
        }
        first.sort();
        assert_eq!(first, ids, "one each before any gets a second");
        // Worker 2 finishes: it is the least loaded.
        guards.retain(|g| g.worker != 2);
        assert_eq!(f.choose(LoadPolicy::LeastLoaded, &ids), Some(2));
        drop(guards);
        assert_eq!(
            (f.load(1), f.load(2), f.load(3)),
            (0, 0, 0),
            "guards release their load"
        );
        assert_eq!(f.choose(LoadPolicy::LeastLoaded, &[]), None);
        // Concurrent requests: counted as they are chosen, so they spread exactly.
        let f2 = f.clone();
        let picks: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let f = f2.clone();
                    s.spawn(move || {
                        (0..30)
                            .map(|_| {
                                let g = f.enter_chosen(LoadPolicy::LeastLoaded, &ids).unwrap();
                                let w = g.worker();
                                std::mem::forget(g);
                                w
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        for w in ids {
            assert_eq!(picks.iter().filter(|p| **p == w).count(), 40, "{w}");
        }
    }

    #[test]
    fn power_of_two_never_picks_the_busiest_of_two() {
        let f = Arc::new(Inflight::default());
        let _busy: Vec<_> = (0..5).map(|_| f.enter(9)).collect();
        for _ in 0..200 {
            assert_eq!(f.choose(LoadPolicy::PowerOfTwo, &[9, 4]), Some(4));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(f.choose(LoadPolicy::PowerOfTwo, &[1, 2, 3]).unwrap());
        }
        assert_eq!(seen.len(), 3, "equal loads: every worker gets picked");
    }

    #[test]
    fn sessions_stick_while_alive_and_fresh() {
        let s = Sessions::new(Duration::from_secs(60));
        assert_eq!(s.get("a", &[1, 2]), None);
        s.put("a", 2);
        assert_eq!(s.get("a", &[1, 2]), Some(2));
        assert_eq!(s.get("a", &[1]), None, "its worker is gone");
        let expired = Sessions::new(Duration::ZERO);
        expired.put("a", 2);
        assert_eq!(expired.get("a", &[1, 2]), None, "past its ttl");
        for i in 0..SWEEP_ABOVE + 2 {
            expired.put(&i.to_string(), 1);
        }
        assert!(
            expired.len() <= SWEEP_ABOVE + 1,
            "expired sessions are swept"
        );
    }
}
