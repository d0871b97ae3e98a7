//! Request migration: what `execute` does when a worker fails a request that another worker
//! could finish.
//!
//! A failure the request plane calls retryable ([`RuntimeError::is_retryable`]: nobody
//! answered, the worker vanished or lost frames mid-stream, it is shutting down) is not the
//! client's answer while the choice has migrations left (`--migration-limit`, per choice):
//! - before any output (`new_request`): the same request goes to another worker;
//! - mid-stream (`ongoing_request`): the choice continues on another worker from where it
//!   stopped — its prompt plus the tokens it already produced, `max_tokens` (and
//!   `min_tokens`) reduced by those — so the client's stream goes on without a gap or a
//!   repeat, and usage counts each token once.
//!
//! A worker that failed is avoided for new requests for `--inhibited-duration-secs`
//! ([`Inhibited`]) instead of being picked again until its lease expires. Never for a
//! cancellation (the client is gone, so nothing is retried) nor for a worker's own error.
//! Pure except for the clock: unit-tested without NATS.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tandem_protocols::llm::PreprocessedRequest;

/// `migration_type` label of `dynamo_frontend_model_migration_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationType {
    /// Nothing had been produced: the request is sent again.
    NewRequest,
    /// The stream broke after some output: the choice continues elsewhere.
    OngoingRequest,
}

impl MigrationType {
    pub fn label(self) -> &'static str {
        match self {
            Self::NewRequest => "new_request",
            Self::OngoingRequest => "ongoing_request",
        }
    }
}

/// The request that continues one choice elsewhere: `original`'s prompt followed by the
/// `generated` tokens (marked as resumed: penalties and a structured-output grammar count
/// them as output), one choice, limits reduced by what was generated, no prefill result
/// (the new worker computes the whole context; its prefix cache may hold some of it).
pub fn resumed(original: &PreprocessedRequest, generated: &[u32]) -> PreprocessedRequest {
    let mut r = original.clone();
    r.token_ids.extend_from_slice(generated);
    r.resumed_tokens += generated.len() as u32;
    let done = generated.len() as u32;
    r.stop.max_tokens = r.stop.max_tokens.map(|m| m.saturating_sub(done).max(1));
    r.stop.min_tokens = r
        .stop
        .min_tokens
        .map(|m| m.saturating_sub(done))
        .filter(|m| *m > 0);
    r.sampling.n = 1;
    r.prefill_result = None;
    r
}

/// Workers that failed recently, avoided for new requests until their time is up.
pub struct Inhibited {
    period: Duration,
    until: Mutex<HashMap<u64, Instant>>,
}

impl Inhibited {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            until: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `worker` failed now.
    pub fn add(&self, worker: u64) {
        if self.period.is_zero() {
            return;
        }
        self.map().insert(worker, Instant::now() + self.period);
    }

    /// Whether `worker` is to be avoided now.
    pub fn contains(&self, worker: u64) -> bool {
        let mut map = self.map();
        if map.is_empty() {
            return false;
        }
        let now = Instant::now();
        map.retain(|_, until| *until > now);
        map.contains_key(&worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        prompt: Vec<u32>,
        max: Option<u32>,
        min: Option<u32>,
        n: u32,
    ) -> PreprocessedRequest {
        let mut r = PreprocessedRequest {
            token_ids: prompt,
            ..Default::default()
        };
        r.stop.max_tokens = max;
        r.stop.min_tokens = min;
        r.sampling.n = n;
        r
    }

    #[test]
    fn a_resumed_choice_continues_from_its_tokens_with_what_is_left() {
        let r = resumed(
            &request(vec![1, 2, 3], Some(10), Some(6), 3),
            &[7, 8, 9, 10],
        );
        assert_eq!(r.token_ids, [1, 2, 3, 7, 8, 9, 10]);
        assert_eq!(r.stop.max_tokens, Some(6));
        assert_eq!(r.stop.min_tokens, Some(2));
        assert_eq!(r.sampling.n, 1, "one choice per resumed request");
        assert!(r.prefill_result.is_none());
        assert_eq!(r.resumed_tokens, 4, "the worker counts them as output");
        let again = resumed(&r, &[11]);
        assert_eq!(again.resumed_tokens, 5, "a second move resumes from both");

        let r = resumed(&request(vec![1], Some(4), Some(2), 1), &[5, 6, 7]);
        assert_eq!(r.stop.max_tokens, Some(1));
        assert_eq!(
            r.stop.min_tokens, None,
            "a minimum already reached is dropped"
        );
        let r = resumed(&request(vec![1], None, None, 1), &[5]);
        assert_eq!(r.stop.max_tokens, None, "no limit stays no limit");
    }

    #[test]
    fn failed_workers_are_avoided_for_the_period_only() {
        let i = Inhibited::new(Duration::from_millis(50));
        assert!(!i.contains(7));
        i.add(7);
        assert!(i.contains(7));
        assert!(!i.contains(8));
        let deadline = Instant::now() + Duration::from_secs(10);
        while i.contains(7) {
            assert!(Instant::now() < deadline, "never expired");
            std::thread::sleep(Duration::from_millis(10));
        }
        let off = Inhibited::new(Duration::ZERO);
        off.add(7);
        assert!(!off.contains(7), "a zero period turns avoidance off");
    }
}
