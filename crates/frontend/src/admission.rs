//! Admission: how many generation requests run at once, and how many may wait for a turn.
//!
//! With `--max-concurrent-requests N` a request runs only while it holds one of `N` permits
//! (held until its response has been sent, stream included). Without a free permit it waits
//! in a queue of at most `--queue-size` requests for at most `--queue-timeout-secs`; a request
//! the queue cannot take, or that waited too long, is answered at once with 503, a
//! `Retry-After` header and the OpenAI error envelope (type `overloaded`), and counted with
//! `error_type="overload"`. Waiting requests show in `dynamo_frontend_queued_requests`. Without
//! `--max-concurrent-requests` every request is admitted.

use crate::error::ApiError;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Seconds a refused client is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Requests running at once; `None`: no limit.
    pub max_concurrent: Option<usize>,
    /// Requests that may wait for a permit.
    pub queue_size: usize,
    pub queue_timeout: Duration,
}

/// A running request's turn; dropping it lets the next one in.
pub struct Permit {
    _held: Option<OwnedSemaphorePermit>,
}

pub struct Admission {
    config: AdmissionConfig,
    permits: Option<Arc<Semaphore>>,
    waiting: AtomicUsize,
}

/// Leaves the queue however the wait ends (admitted, timed out, client gone).
struct Waiting<'a>(&'a AtomicUsize, &'a prometheus::IntGauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.dec();
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            config,
            permits: config.max_concurrent.map(|n| Arc::new(Semaphore::new(n))),
            waiting: AtomicUsize::new(0),
        }
    }

    /// A turn for a request, waiting in the queue if need be; `queued` is the request's model's
    /// `dynamo_frontend_queued_requests` gauge.
    pub async fn admit(&self, queued: &prometheus::IntGauge) -> Result<Permit, ApiError> {
        let Some(permits) = &self.permits else {
            return Ok(Permit { _held: None });
        };
        if let Ok(p) = permits.clone().try_acquire_owned() {
            return Ok(Permit { _held: Some(p) });
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.config.queue_size {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::overloaded(format!(
                "the server is at its limit of {} concurrent requests and its queue of {} is full",
                self.config.max_concurrent.unwrap_or(0),
                self.config.queue_size
            )));
        }
        queued.inc();
        let _waiting = Waiting(&self.waiting, queued);
        match tokio::time::timeout(self.config.queue_timeout, permits.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => Ok(Permit { _held: Some(p) }),
            Ok(Err(_)) => Err(ApiError::overloaded("the server is shutting down")),
            Err(_) => Err(ApiError::overloaded(format!(
                "no turn within the queue timeout of {:?}",
                self.config.queue_timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> prometheus::IntGauge {
        prometheus::IntGauge::new("q", "q").unwrap()
    }

    #[tokio::test]
    async fn beyond_the_limit_requests_wait_then_are_refused_when_the_queue_is_full() {
        let a = Admission::new(AdmissionConfig {
            max_concurrent: Some(1),
            queue_size: 1,
            queue_timeout: Duration::from_secs(30),
        });
        let q = gauge();
        let first = a.admit(&q).await.unwrap();
        // The second waits (the queue has room for one)…
        let waiting = {
            let q = q.clone();
            let a = &a;
            async move { a.admit(&q).await }
        };
        let mut waiting = Box::pin(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        assert_eq!(q.get(), 1, "one request queued");
        // …the third finds the queue full.
        let e = a.admit(&q).await.err().unwrap();
        assert_eq!(e.status.as_u16(), 503);
        assert_eq!(e.kind(), "overloaded");
        assert_eq!(e.metric_error_type(), "overload");
        drop(first);
        let second = waiting.await.unwrap();
        assert_eq!(q.get(), 0);
        drop(second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waits_too_long_is_refused() {
        let a = Admission::new(AdmissionConfig {
            max_concurrent: Some(1),
            queue_size: 4,
            queue_timeout: Duration::from_secs(2),
        });
        let q = gauge();
        let _held = a.admit(&q).await.unwrap();
        let e = a.admit(&q).await.err().unwrap();
        assert!(e.message.contains("queue timeout"), "{}", e.message);
        assert_eq!(q.get(), 0, "left the queue");
    }

    #[tokio::test]
    async fn without_a_limit_everyone_is_admitted() {
        let a = Admission::new(AdmissionConfig {
            max_concurrent: None,
            queue_size: 0,
            queue_timeout: Duration::from_secs(1),
        });
        let q = gauge();
        let held: Vec<_> = futures::future::join_all((0..100).map(|_| a.admit(&q))).await;
        assert!(held.iter().all(Result::is_ok));
    }
}
