//! The model deployment card (Dynamo's MDC): what a worker tells the frontend about the model
//! it serves. Workers write it to etcd under their lease at
//! `v1/mdc/{namespace}/{component}/{endpoint}/{instance_hex}`; the frontend watches `v1/mdc/`.

use serde::{Deserialize, Serialize};

pub const MDC_ROOT: &str = "v1/mdc";

/// Runtime facts an engine publishes once started (Dynamo's `ModelRuntimeConfig`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRuntimeConfig {
    pub total_kv_blocks: u64,
    pub max_num_seqs: u64,
    pub max_num_batched_tokens: u64,
    #[serde(default = "one")]
    pub data_parallel_size: u32,
    /// Where the worker also publishes its KV events over ZMQ (vLLM's format), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_zmq: Option<ZmqEventsEndpoint>,
    /// A prefill worker's KV data plane, where decode workers fetch blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disaggregated_endpoint: Option<crate::disagg::DataPlaneEndpoint>,
    /// How the model marks its reasoning (`--dyn-reasoning-parser`: `basic`, `qwen3`,
    /// `deepseek_r1`), for the frontend to split it into `reasoning_content`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_parser: Option<String>,
    /// How the model writes tool calls (`--dyn-tool-call-parser`: `hermes`, `llama3_json`,
    /// `mistral`), for the frontend to return them as `tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_parser: Option<String>,
}

/// A ZMQ PUB endpoint of KV events, as routers should connect to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZmqEventsEndpoint {
    pub endpoint: String,
    pub topic: String,
}

fn one() -> u32 {
    1
}

/// Everything a frontend needs to turn a chat request into tokens for this model, except the
/// tokenizer itself, which is too large for etcd and is fetched from the worker's
/// `tokenizer_endpoint` (checked against `tokenizer_checksum`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptFormat {
    /// Jinja chat template (HF semantics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Whether completions prompts get the BOS token prepended.
    #[serde(default)]
    pub add_bos_token: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDeploymentCard {
    /// The name clients use in `model`.
    pub display_name: String,
    pub slug: String,
    pub context_length: u32,
    pub kv_cache_block_size: u32,
    #[serde(default)]
    pub migration_limit: u32,
    /// `chat`, `completions`; a prefill worker's card says `prefill` instead (Dynamo's
    /// `ModelType.Prefill`): it serves the prefill leg of disaggregated requests only.
    pub model_type: Vec<String>,
    pub runtime_config: ModelRuntimeConfig,
    pub prompt: PromptFormat,
    /// `dyn://` address of the endpoint that serves `tokenizer.json`.
    pub tokenizer_endpoint: String,
    /// xxh3-64 of the tokenizer JSON, lowercase hex: all workers of a model must agree.
    pub tokenizer_checksum: String,
}

impl ModelDeploymentCard {
    /// The card of a prefill worker.
    pub fn is_prefill(&self) -> bool {
        self.model_type.iter().any(|t| t == "prefill")
    }
}

/// The etcd record around a card, as Dynamo 1.x writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub namespace: String,
    pub component: String,
    pub endpoint: String,
    pub instance_id: u64,
    pub card_json: ModelDeploymentCard,
}

/// Dynamo's slug: lowercase, anything but `[a-z0-9_-]` becomes `_`.
pub fn slugify(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn slugs() {
        assert_eq!(super::slugify("Qwen/Qwen3-0.6B"), "qwen_qwen3-0_6b");
    }
}
