//! What an engine is to the worker that serves it.
//!
//! An [`Engine`] takes a tokenized [`PreprocessedRequest`] and answers with an [`EngineStream`]:
//! one [`EngineOutput`] per step and choice, ending when every choice has a finish reason, or
//! with one [`EngineError`] when a step fails. Dropping the stream cancels the request;
//! [`ChoiceStopper::stop`] ends a single choice (the frontend's stop strings end choices the
//! engine cannot see). The engine's blocks and queues are summarised in [`EngineStats`].
//!
//! Both engines — the candle engine and the mocker — schedule the same way, so the policy
//! lives here once: [`queue`] (cancellation sweep and admission) and [`batcher`] (the step
//! skeleton: intake, room for every running sequence with one preemption rule, admission,
//! outputs and finish reasons). An engine only says how a step's tokens are computed.
//!
//! Disaggregated serving ([`transfer`]): a request can be a prefill leg (blocks held for a
//! decode worker to fetch) or a decode leg (blocks imported from a prefill worker); the
//! block contents move through the engine's [`KvTransfer`].
//!
//! This crate knows nothing of NATS, etcd or HTTP: the worker (`tandem-worker`) puts an engine
//! on the request plane and maps [`EngineError`]s to the wire's error classes.

pub mod batcher;
pub mod queue;
pub mod stream;
pub mod transfer;

pub use batcher::{Batcher, Computed, Intake, Progress, Scheduled, Seq, without_phase_spans};
pub use queue::{AdmitCounters, AdmitLimits, Queued};
pub use stream::{ChoiceStopper, EngineStream, OutputSender, output_channel};
pub use transfer::{CacheIndex, Disagg, ImportLease, KvImport, KvTransfer};

use std::sync::Arc;
use tandem_protocols::card::ModelRuntimeConfig;
use tandem_protocols::llm::PreprocessedRequest;
pub use tandem_protocols::llm::{EngineOutput, FinishReason};

/// Why an engine refused or failed a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The prompt leaves no room to generate within the context.
    #[error("prompt of {prompt} tokens does not fit the context of {context} tokens")]
    PromptTooLong { prompt: usize, context: usize },
    /// The request itself is wrong (empty prompt, token ids outside the vocabulary, …).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The engine has shut down.
    #[error("engine stopped")]
    Stopped,
    /// A step the request was part of failed (a forward pass error); its blocks were freed.
    #[error("engine step failed: {0}")]
    StepFailed(String),
}

/// Upper bounds of [`StepHistogram`]'s buckets: tokens computed in one engine step.
pub const STEP_TOKEN_BUCKETS: [u64; 14] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
];

/// Tokens computed per engine step, as cumulative bucket counts (Prometheus' shape).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepHistogram {
    /// `buckets[i]`: steps with at most `STEP_TOKEN_BUCKETS[i]` tokens.
    pub buckets: [u64; 14],
    pub count: u64,
    pub sum: u64,
}

impl StepHistogram {
    pub fn observe(&mut self, tokens: u64) {
        for (b, &le) in self.buckets.iter_mut().zip(&STEP_TOKEN_BUCKETS) {
            if tokens <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum += tokens;
    }
}

/// Block and queue statistics an engine reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub total_blocks: u64,
    pub active_blocks: u64,
    pub prefix_hit_rate: f64,
    pub running: u64,
    pub waiting: u64,
    /// Prompt tokens computed so far (cache hits excluded).
    pub prefill_tokens: u64,
    /// Prompt tokens served from the prefix cache so far.
    pub cached_prompt_tokens: u64,
    /// Tokens generated so far, over every choice of every request.
    pub generated_tokens: u64,
    /// Sequences preempted (blocks released, to be recomputed) so far.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache so far (`cached_prompt_tokens` of them hit).
    pub queried_prompt_tokens: u64,
    /// Blocks held for transfers to decode workers now (counted in `active_blocks` too).
    pub held_blocks: u64,
    /// Prompt blocks written from other workers' transfers so far.
    pub imported_blocks: u64,
    /// Decode legs whose fetched blocks no longer applied at admission (computed here instead).
    pub import_misses: u64,
    pub step_tokens: StepHistogram,
}

/// What every engine checks of a prompt before queueing it: not empty, every id inside the
/// vocabulary (an id outside it would index past the embedding table).
pub fn check_prompt(token_ids: &[u32], vocab_size: usize) -> Result<(), EngineError> {
    if token_ids.is_empty() {
        return Err(EngineError::Invalid("empty prompt".into()));
    }
    match token_ids.iter().find(|&&t| t as usize >= vocab_size) {
        Some(t) => Err(EngineError::Invalid(format!(
            "token id {t} is outside the vocabulary of {vocab_size}"
        ))),
        None => Ok(()),
    }
}

/// [`check_prompt`] for a leg: a decode leg's first token must be inside the vocabulary too
/// (it is fed to the model like any other).
pub fn check_leg(token_ids: &[u32], disagg: &Disagg, vocab_size: usize) -> Result<(), EngineError> {
    check_prompt(token_ids, vocab_size)?;
    match disagg {
        Disagg::Decode(import) if import.first_token as usize >= vocab_size => {
            Err(EngineError::Invalid(format!(
                "first token {} is outside the vocabulary of {vocab_size}",
                import.first_token
            )))
        }
        _ => Ok(()),
    }
}

fn positive_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
        Ok(f) => Err(format!("{f} is not in [0, 1)")),
        Err(e) => Err(e.to_string()),
    }
}

/// Batching flags every engine shares (vLLM's and Dynamo's names), checked when parsed.
#[derive(clap::Args, Debug, Clone)]
pub struct BatchingArgs {
    /// Tokens per KV block (default 16 for the candle engine, 64 for the mocker, as Dynamo).
    #[arg(long = "block-size", value_parser = positive_usize)]
    pub block_size: Option<usize>,
    /// KV blocks in the cache (default: the candle engine sizes it from free memory, the
    /// mocker uses 16384).
    #[arg(long = "kv-cache-blocks", alias = "num-gpu-blocks-override", value_parser = positive_usize)]
    pub num_blocks: Option<usize>,
    #[arg(long = "max-num-seqs", default_value_t = 256, value_parser = positive_usize)]
    pub max_num_seqs: usize,
    #[arg(long = "max-num-batched-tokens", default_value_t = 8192, value_parser = positive_usize)]
    pub max_num_batched_tokens: usize,
    /// Fraction of blocks kept free when admitting new sequences.
    #[arg(long, default_value_t = 0.01, value_parser = fraction)]
    pub watermark: f64,
    #[arg(long = "enable-prefix-caching", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,
}

impl Default for BatchingArgs {
    fn default() -> Self {
        Self {
            block_size: None,
            num_blocks: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            watermark: 0.01,
            enable_prefix_caching: true,
        }
    }
}

impl BatchingArgs {
    pub fn limits(&self) -> AdmitLimits {
        AdmitLimits {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            watermark: self.watermark,
            chunked_prefill: false,
        }
    }
}

/// A token generator. Implemented by the mocker and the candle engine.
pub trait Engine: Send + Sync + 'static {
    /// Starts generating; the stream ends after every choice's output carrying a finish
    /// reason, or after one error. Dropping the stream stops the request and frees its blocks.
    fn generate(&self, request: PreprocessedRequest) -> Result<EngineStream, EngineError> {
        self.generate_leg(request, Disagg::Aggregated)
    }
    /// [`Self::generate`] as one leg of a disaggregated request.
    fn generate_leg(
        &self,
        request: PreprocessedRequest,
        disagg: Disagg,
    ) -> Result<EngineStream, EngineError>;
    /// How this engine's blocks leave and enter it.
    fn kv_transfer(&self) -> Arc<dyn KvTransfer>;
    fn stats(&self) -> EngineStats;
    fn runtime_config(&self) -> ModelRuntimeConfig;
    fn block_size(&self) -> u32;
    /// The engine's KV block events from now on, in order (one subscriber; a later call
    /// replaces it). Nothing is kept while nobody subscribes.
    fn subscribe_kv_events(&self) -> tokio::sync::mpsc::UnboundedReceiver<tandem_kv::BlockEvent>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_decode_legs_first_token_must_be_in_the_vocabulary() {
        let leg = |first_token| {
            Disagg::Decode(KvImport {
                first_token,
                ..Default::default()
            })
        };
        assert!(check_leg(&[1, 2], &leg(9), 10).is_ok());
        let err = check_leg(&[1, 2], &leg(10), 10).unwrap_err();
        assert!(err.to_string().contains("first token 10"), "{err}");
        assert!(check_leg(&[1, 10], &Disagg::Aggregated, 10).is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        b: BatchingArgs,
    }

    #[test]
    fn batching_flags_are_checked_when_parsed() {
        let ok = Cli::try_parse_from(["x", "--block-size", "32", "--watermark", "0.05"]).unwrap();
        assert_eq!(ok.b.block_size, Some(32));
        for bad in [
            &["x", "--block-size", "0"][..],
            &["x", "--max-num-seqs", "0"],
            &["x", "--watermark", "1.5"],
            &["x", "--watermark", "nan"],
            &["x", "--kv-cache-blocks", "many"],
        ] {
            let err = Cli::try_parse_from(bad).err().unwrap().to_string();
            assert!(err.contains(bad[1]), "{err}");
        }
    }
}
