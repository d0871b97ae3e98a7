//! Frontend ↔ worker messages, serialized as JSON in runtime frames.

use serde::{Deserialize, Serialize};

/// Sampling settings; `None` means the engine's default (greedy when temperature is unset
/// or 0).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Number of choices to generate for this prompt.
    #[serde(default = "one")]
    pub n: u32,
    /// Structured output: the grammar every choice's tokens must follow (Dynamo's
    /// `guided_decoding`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_decoding: Option<GuidedDecoding>,
}

/// What a constrained choice must match. The frontend checks that it compiles before any
/// worker sees it; the engine compiles it again per choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuidedDecoding {
    /// A JSON document valid against this JSON Schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// Text matching this regular expression (whole output).
    Regex(String),
    /// Text derived from this Lark grammar (llguidance's dialect).
    Grammar(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// What each output carries besides its tokens (Dynamo's `output_options`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputOptions {
    /// `Some(k)`: every generated token's log-probability, with the `k` most likely
    /// alternatives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
}

/// A generated token's log-probability under the distribution it was sampled from, and the
/// most likely tokens of that distribution, most likely first, as `(token id, logprob)`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(u32, f32)>,
}

fn one() -> u32 {
    1
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopConditions {
    /// Most tokens to generate per choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Tokens that end a choice (the model's end-of-sequence ids and any from the request).
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
}

/// A tokenized request, ready for an engine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreprocessedRequest {
    pub model: String,
    pub token_ids: Vec<u32>,
    #[serde(default)]
    pub sampling: SamplingOptions,
    #[serde(default)]
    pub stop: StopConditions,
    #[serde(default)]
    pub output_options: OutputOptions,
    /// The last `resumed_tokens` of `token_ids` are this choice's own output from an earlier
    /// worker (a migrated request): penalties and the structured-output grammar count them
    /// as generated, not as prompt.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed_tokens: u32,
    /// Decode leg of a disaggregated request: where the prompt's KV blocks are and the first
    /// token (Dynamo's `prefill_result`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_result: Option<crate::disagg::PrefillResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token (end of sequence) or stop string ended the choice.
    Stop,
    /// `max_tokens` or the context length ended it.
    Length,
}

impl FinishReason {
    pub fn as_openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What a caller can tell a running generate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenerateControl {
    /// End choice `index` now: the caller has all it wants of it (a stop string matched).
    StopChoice { index: u32 },
}

/// One step of one choice: new tokens, and the reason when the choice has ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineOutput {
    /// Which of the request's `n` choices this belongs to.
    #[serde(default)]
    pub index: u32,
    pub token_ids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens found in the prefix cache (sent once, with the first output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
    /// One entry per token of `token_ids`, when the request asked for logprobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// A prefill worker's last output: where the prompt's KV blocks wait for the decode
    /// worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disaggregated_params: Option<crate::disagg::DisaggregatedParams>,
}
