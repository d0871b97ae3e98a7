//! Continuous batching over the paged cache.
//!
//! The step skeleton (cancellations, preemption of the newest admitted sequence, admission,
//! outputs and finish reasons) is the shared [`Batcher`]; what is the candle engine's own is
//! the compute: all decodes and admitted prefills run as one [`Model::forward`], and each
//! sequence samples its token with its choice's sampler (its grammar's mask first, when it
//! has one). A failed forward pass fails the sequences of that step with
//! [`EngineError::StepFailed`] and the engine goes on; a choice whose grammar allows nothing
//! fails alone.
//!
//! Blocks a decode leg imported are written into the cache at the start of the step that
//! admitted it, before the forward pass.
//!
//! Prefills are not chunked: a prompt runs whole in the step that admits it, so a block a
//! sequence finds in the cache has been computed (or is computed in the same step, before
//! any attention reads it).

use std::sync::{Arc, Mutex};
use tandem_engine_api::{
    Batcher, BatchingArgs, CacheIndex, Computed, Disagg, EngineError, EngineStats, Intake,
    OutputSender, Scheduled, Seq,
};
use tandem_kv::{BlockPool, EventTap};
use tandem_protocols::llm::PreprocessedRequest;
use tandem_sampling::Sampler;
use tandem_structured::Guides;
use tokio::sync::mpsc;

use crate::model::{KvCache, Model, StepSeq};

/// One choice of a request as the candle engine keeps it: the shared sequence state plus the
/// choice's sampler.
pub type CandleSeq = Seq<Sampler>;

/// The sequences of one request (or one leg of it), one per choice. Each choice's sampler
/// reports logprobs when asked, follows the request's grammar (compiled by `guides`), and
/// has seen the tokens the choice produced before this leg: a migrated request's resumed
/// tokens, a decode leg's first token.
pub fn sequences(
    request: &PreprocessedRequest,
    disagg: Disagg,
    out: &OutputSender,
    guides: Option<&Guides>,
) -> Result<Vec<CandleSeq>, EngineError> {
    let ids = &request.token_ids;
    let mut before: Vec<u32> =
        ids[ids.len().saturating_sub(request.resumed_tokens as usize)..].to_vec();
    if let Disagg::Decode(import) = &disagg {
        before.push(import.first_token);
    }
    let samplers = (0..request.sampling.n.max(1))
        .map(|index| sampler(request, index, &before, guides))
        .collect::<Result<Vec<_>, _>>()?;
    let mut samplers = samplers.into_iter();
    Seq::for_leg(request, disagg, out, |_| {
        samplers
            .next()
            .unwrap_or_else(|| Sampler::new(request.sampling.clone(), 0))
    })
}

fn sampler(
    request: &PreprocessedRequest,
    index: u32,
    before: &[u32],
    guides: Option<&Guides>,
) -> Result<Sampler, EngineError> {
    let mut s = Sampler::new(request.sampling.clone(), u64::from(index))
        .with_logprobs(request.output_options.logprobs);
    if let Some(g) = &request.sampling.guided_decoding {
        let guides = guides.ok_or_else(|| {
            EngineError::Invalid(
                "structured output: this engine has no tokenizer to compile grammars with".into(),
            )
        })?;
        let guide = guides
            .guide(g)
            .map_err(|e| EngineError::Invalid(format!("structured output: {e}")))?;
        s = s.with_constraint(Box::new(guide));
    }
    for t in before {
        s.resume_after(*t)
            .map_err(|e| EngineError::Invalid(format!("resumed token {t}: {e}")))?;
    }
    Ok(s)
}

pub struct Scheduler {
    model: Model,
    cache: KvCache,
    batcher: Batcher<Sampler>,
}

impl Scheduler {
    pub fn new(
        model: Model,
        cache: KvCache,
        args: &BatchingArgs,
        max_model_len: usize,
        stats: Arc<Mutex<EngineStats>>,
        events: EventTap,
    ) -> Self {
        let pool = BlockPool::new(
            cache.num_blocks,
            cache.block_size,
            args.enable_prefix_caching,
        );
        Self {
            batcher: Batcher::new(pool, args.limits(), max_model_len, events, stats),
            model,
            cache,
        }
    }

    pub fn cache_index(&self) -> CacheIndex {
        self.batcher.cache_index()
    }

    /// Runs until every engine handle is gone.
    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<Intake<Sampler>>) {
        loop {
            while let Ok(item) = rx.try_recv() {
                self.batcher.intake(item);
            }
            if self.batcher.is_idle() {
                self.batcher.publish();
                match rx.blocking_recv() {
                    Some(item) => self.batcher.intake(item),
                    None => return,
                }
                continue;
            }
            let scheduled = self.batcher.schedule();
            self.step(scheduled);
            self.batcher.publish();
        }
    }

    /// Writes imported blocks, then computes one token for every running sequence in one
    /// forward pass.
    fn step(&mut self, scheduled: Scheduled) {
        // Registered at admission: written now, whether or not their sequence still runs.
        let writes = self.batcher.take_writes();
        for (i, (id, data)) in writes.iter().enumerate() {
            if let Err(e) = self.cache.write_block(*id, data) {
                tracing::error!(error = %e, block = id, "writing an imported block failed");
                let unwritten: Vec<u32> = writes[i..].iter().map(|(id, _)| *id).collect();
                self.batcher.writes_failed(
                    &unwritten,
                    EngineError::StepFailed(format!("writing imported KV block {id}: {e}")),
                );
                return;
            }
        }
        let running = &mut self.batcher.running;
        if running.is_empty() {
            return;
        }
        let batch: Vec<StepSeq> = running
            .iter()
            .map(|s| StepSeq {
                tokens: s.tokens[s.computed..].to_vec(),
                start: s.computed,
                block_table: s
                    .blocks
                    .as_ref()
                    .map(|b| b.blocks.iter().map(|id| id.0).collect())
                    .unwrap_or_default(),
            })
            .collect();
        debug_assert!(
            batch[..scheduled.decodes]
                .iter()
                .all(|s| s.tokens.len() == 1)
        );
        let logits = match self.model.forward(&batch, &self.cache) {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails its sequences (each client is told), not the engine.
                tracing::error!(error = %e, "forward pass failed");
                self.batcher.fail(EngineError::StepFailed(e.to_string()));
                return;
            }
        };
        let computed: Vec<Computed> = running
            .iter_mut()
            .zip(logits)
            .map(|(seq, mut row)| {
                let s = seq.ext.sample(&mut row, &seq.tokens[..seq.prompt_len])?;
                seq.ext.observe(s.token)?;
                Ok((s.token, s.logprob))
            })
            // The request's grammar led nowhere: its own error, not the engine's.
            .map(|r: Result<_, tandem_sampling::SampleError>| {
                r.map_err(|e| EngineError::Invalid(e.to_string()))
            })
            .collect();
        self.batcher.complete_each(computed);
    }
}
