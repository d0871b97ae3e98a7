//! Turns OpenAI requests into token ids and token ids back into text.
//!
//! A [`Preprocessor`] is built from a model's `tokenizer.json` and prompt format (both come
//! from the worker's model card). Requests flow through it as:
//! chat messages → [`template::ChatTemplate`] (HF Jinja semantics) → prompt text → token ids;
//! and responses as: token ids → [`detokenize::IncrementalDecoder`] (never splits a UTF-8
//! character) → [`stop::StopMatcher`] (holds back text that may still become a stop string)
//! → deltas for the client.

pub mod detokenize;
pub mod reasoning;
pub mod segments;
pub mod stop;
pub mod template;
#[cfg(test)]
mod test_model;
pub mod token_bytes;
pub mod tools;

use serde_json::Value;
use tandem_protocols::card::PromptFormat;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("invalid tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("this model has no chat template; use /v1/completions")]
    NoChatTemplate,
    #[error("tokenization failed: {0}")]
    Encode(String),
}

pub struct Preprocessor {
    tokenizer: Tokenizer,
    template: Option<template::ChatTemplate>,
    prompt: PromptFormat,
    /// Built on the first logprobs request or the first decoder.
    token_bytes: std::sync::OnceLock<token_bytes::TokenBytes>,
    /// Tokenization by cached segments, for tokenizers where it gives the same ids.
    segments: Option<segments::SegmentCache>,
}

impl Preprocessor {
    pub fn new(tokenizer: Tokenizer, prompt: PromptFormat) -> Result<Self, PreprocessError> {
        let template = match &prompt.chat_template {
            Some(src) => Some(template::ChatTemplate::new(
                src,
                prompt.bos_token.clone(),
                prompt.eos_token.clone(),
            )?),
            None => None,
        };
        let segments = segments::SegmentCache::for_tokenizer(&tokenizer);
        Ok(Self {
            tokenizer,
            template,
            prompt,
            token_bytes: std::sync::OnceLock::new(),
            segments,
        })
    }

    /// Builds from `tokenizer.json` text.
    pub fn from_json(tokenizer_json: &str, prompt: PromptFormat) -> Result<Self, PreprocessError> {
        let tokenizer: Tokenizer = tokenizer_json
            .parse()
            .map_err(|e: tokenizers::Error| PreprocessError::Tokenizer(e.to_string()))?;
        Self::new(tokenizer, prompt)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.prompt.eos_token_ids
    }

    /// Renders chat messages (already JSON values with `role` and string `content`) into the
    /// prompt text.
    pub fn render_chat(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, PreprocessError> {
        self.template
            .as_ref()
            .ok_or(PreprocessError::NoChatTemplate)?
            .render(messages, tools, add_generation_prompt)
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) map to their
    /// ids, as the rendered chat template requires.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        let ids = match &self.segments {
            Some(cache) => cache.encode(&self.tokenizer, text),
            None => self
                .tokenizer
                .encode(text, false)
                .map(|enc| enc.get_ids().to_vec()),
        };
        ids.map_err(|e| PreprocessError::Encode(e.to_string()))
    }

    /// Token ids of a completions prompt: BOS first when the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        let mut ids = self.encode(text)?;
        if self.prompt.add_bos_token
            && let Some(bos) = self
                .prompt
                .bos_token
                .as_deref()
                .and_then(|t| self.tokenizer.token_to_id(t))
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, PreprocessError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| PreprocessError::Encode(e.to_string()))
    }

    /// The bytes token `id` stands for (logprobs' `bytes`).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes().get(id)
    }

    fn bytes(&self) -> &token_bytes::TokenBytes {
        self.token_bytes
            .get_or_init(|| token_bytes::TokenBytes::new(&self.tokenizer))
    }

    /// An incremental decoder; for byte-level tokenizers one that joins the tokens' bytes
    /// instead of running the tokenizer's decoder on every token.
    pub fn decoder(&self) -> detokenize::IncrementalDecoder<'_> {
        let bytes = Some(self.bytes()).filter(|b| b.decodes_as_bytes());
        detokenize::IncrementalDecoder::new(&self.tokenizer, bytes)
    }
}
