//! Structured output: what a choice may generate, as a token mask per step.
//!
//! A request's [`GuidedDecoding`] (a JSON Schema, any JSON object, a regex, a Lark grammar or
//! a list of choices) is compiled by `llguidance` — the constrained-decoding library vLLM,
//! SGLang and llama.cpp use — against the model's vocabulary. [`Guides`] is built once per
//! model from its tokenizer and end-of-sequence ids: the frontend calls [`Guides::check`] so
//! that a grammar that does not compile is the client's 400 before any worker sees it; the
//! engine calls [`Guides::guide`] for each choice and hands the [`Guide`] to the choice's
//! sampler ([`tandem_sampling::Constraint`]): each step it sets the logits of every token
//! the grammar forbids to −∞, and moves past the token chosen. Once the grammar is complete
//! only the end-of-sequence tokens are allowed, so the choice ends as `stop`.
//!
//! The vocabulary as bytes (what llguidance matches grammars against) comes from the
//! tokenizer's own `tokenizer.json` through llguidance's reader; text llguidance needs
//! tokenized goes through the model's tokenizer. Both are built on first use: a worker that
//! never sees a structured request never pays for them.
//!
//! JSON Schemas compile with fixed separators (`", "` and `": "`, as Python's `json.dumps`)
//! and no free whitespace unless the schema says otherwise in its own `x-guidance` options:
//! a small model given room for whitespace can spend its whole budget on it.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};
pub use tandem_protocols::llm::GuidedDecoding;
use tokenizers::Tokenizer;

/// Why a grammar cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuideError {
    /// The request's grammar or schema is wrong (the client's error).
    #[error("{0}")]
    Invalid(String),
    /// The model's vocabulary could not be read for constrained decoding.
    #[error("structured output is not available for this model: {0}")]
    Vocabulary(String),
}

/// The model's vocabulary for llguidance: the token trie from `tokenizer.json`, and the
/// tokenizer itself for text llguidance tokenizes.
struct Vocab {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match self
            .tokenizer
            .encode(String::from_utf8_lossy(s).as_ref(), false)
        {
            Ok(enc) => enc.get_ids().to_vec(),
            // Only ever asked for text of a grammar; a failure means "no tokens" to it.
            Err(e) => {
                tracing::warn!(error = %e, "tokenizing for the grammar failed");
                Vec::new()
            }
        }
    }
}

/// Grammars for one model: compiles them and makes a [`Guide`] per choice.
pub struct Guides {
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    factory: OnceLock<Result<Arc<ParserFactory>, GuideError>>,
}

impl Guides {
    /// `eos`: the ids that end a sequence (the first is llguidance's end of text).
    pub fn new(tokenizer: Tokenizer, eos: Vec<u32>) -> Self {
        Self {
            tokenizer,
            eos,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, GuideError> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer, &self.eos).map(Arc::new))
            .as_ref()
            .map(|f| f.as_ref())
            .map_err(Clone::clone)
    }

    /// Builds the vocabulary's token trie and the grammar compiler now (a few hundred ms for
    /// a 50k vocabulary) instead of on the first structured request. Blocking: call it off
    /// the async threads, at model load.
    pub fn warm(&self) -> Result<(), GuideError> {
        self.factory().map(|_| ())
    }

    /// Compiles `g` once: `Err(Invalid)` names what is wrong with it.
    pub fn check(&self, g: &GuidedDecoding) -> Result<(), GuideError> {
        self.guide(g).map(|_| ())
    }

    /// A fresh guide for one choice.
    pub fn guide(&self, g: &GuidedDecoding) -> Result<Guide, GuideError> {
        let factory = self.factory()?;
        let parser = factory
            .create_parser(grammar(g)?)
            .map_err(|e| GuideError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GuideError::Invalid(e));
        }
        Ok(Guide { matcher })
    }
}

fn build_factory(tokenizer: &Tokenizer, eos: &[u32]) -> Result<ParserFactory, GuideError> {
    let started = std::time::Instant::now();
    let bad = |e: String| GuideError::Vocabulary(e);
    let json: Value = tokenizer
        .to_string(false)
        .map_err(|e| bad(e.to_string()))
        .and_then(|s| serde_json::from_str(&s).map_err(|e| bad(e.to_string())))?;
    let words =
        llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(e.to_string()))?;
    // llguidance asserts its end-of-sequence ids are in the vocabulary it was given.
    let eos: Vec<u32> = eos
        .iter()
        .copied()
        .filter(|id| (*id as usize) < words.len())
        .collect();
    let first = *eos.first().ok_or_else(|| {
        bad("the model names no end-of-sequence token inside its vocabulary".into())
    })?;
    let info = TokRxInfo::new(words.len() as u32, first);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
    let env: TokEnv = Arc::new(Vocab {
        trie,
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
    factory.quiet();
    tracing::info!(
        tokens = words.len(),
        ms = started.elapsed().as_millis() as u64,
        "structured output ready for this model's vocabulary"
    );
    Ok(factory)
}

/// The compact separators every schema gets unless it sets its own `x-guidance`.
fn with_layout(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut()
        && !obj.contains_key("x-guidance")
    {
        obj.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// llguidance's grammar for `g`.
fn grammar(g: &GuidedDecoding) -> Result<TopLevelGrammar, GuideError> {
    Ok(match g {
        GuidedDecoding::JsonSchema(schema) => {
            if !schema.is_object() && !schema.is_boolean() {
                return Err(GuideError::Invalid(
                    "a JSON Schema must be an object".into(),
                ));
            }
            TopLevelGrammar::from_json_schema(with_layout(schema.clone()))
        }
        GuidedDecoding::JsonObject => {
            TopLevelGrammar::from_json_schema(with_layout(json!({"type": "object"})))
        }
        GuidedDecoding::Regex(rx) => TopLevelGrammar::from_regex(rx),
        GuidedDecoding::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        GuidedDecoding::Choice(choices) => {
            if choices.is_empty() {
                return Err(GuideError::Invalid("the list of choices is empty".into()));
            }
            // Lark string literals are JSON strings.
            let alts: Vec<String> = choices
                .iter()
                .map(|c| serde_json::to_string(c).unwrap_or_default())
                .collect();
            TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
        }
    })
}

/// One choice's grammar state.
pub struct Guide {
    matcher: Matcher,
}

impl Guide {
    /// Whether the grammar is complete (only end-of-sequence may follow).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

impl tandem_sampling::Constraint for Guide {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let words = allowed.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    fn advance(&mut self, token: u32) -> Result<(), String> {
        if self.matcher.is_stopped() {
            // Past the grammar's end only end-of-sequence was allowed; nothing to move.
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
