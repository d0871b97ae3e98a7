//! Canary health checks (Dynamo's `DYN_HEALTH_CHECK_ENABLED`): a worker that has served no
//! request for `DYN_CANARY_WAIT_TIME` sends its own engine a one-token generation; if that
//! fails or takes longer than `DYN_HEALTH_CHECK_REQUEST_TIMEOUT`, the `generate` endpoint
//! reports not ready on `/health` until a later canary succeeds. Real traffic is its own
//! proof of health, so a busy worker sends none.

use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_engine_api::Engine;
use tandem_protocols::llm::PreprocessedRequest;
use tandem_runtime::HealthState;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub struct CanaryConfig {
    /// Idle time before a canary is sent.
    pub wait: Duration,
    /// How long a canary may take.
    pub timeout: Duration,
}

/// When the worker last saw a request, for the canary to know whether it is idle.
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Runs canaries against `engine` until `stop`, reporting on `endpoint` in `health`.
pub fn spawn(
    engine: Arc<dyn Engine>,
    health: Arc<HealthState>,
    endpoint: String,
    activity: Arc<Activity>,
    config: CanaryConfig,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut healthy = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(config.wait) => {}
            }
            if activity.idle_for() < config.wait {
                continue;
            }
            let outcome = tokio::time::timeout(config.timeout, one_token(engine.as_ref())).await;
            let ok = matches!(outcome, Ok(Ok(())));
            if ok != healthy {
                match &outcome {
                    Ok(Ok(())) => tracing::info!(%endpoint, "canary generation succeeded; ready"),
                    Ok(Err(e)) => {
                        tracing::warn!(%endpoint, error = %e, "canary generation failed; not ready")
                    }
                    Err(_) => tracing::warn!(
                        %endpoint,
                        timeout_s = config.timeout.as_secs_f64(),
                        "canary generation timed out; not ready"
                    ),
                }
            }
            healthy = ok;
            health.set(&endpoint, ok);
        }
    });
}

/// One generated token from a one-token prompt.
async fn one_token(engine: &dyn Engine) -> Result<(), String> {
    let mut request = PreprocessedRequest {
        model: "canary".into(),
        token_ids: vec![1],
        ..Default::default()
    };
    request.stop.max_tokens = Some(1);
    let mut stream = engine.generate(request).map_err(|e| e.to_string())?;
    let mut tokens = 0;
    while let Some(out) = stream.next().await {
        tokens += out.map_err(|e| e.to_string())?.token_ids.len();
    }
    if tokens == 0 {
        return Err("no token generated".into());
    }
    Ok(())
}
