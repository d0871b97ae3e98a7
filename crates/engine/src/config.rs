//! The shape of a Llama-family decoder, read from GGUF metadata or an HF `config.json`.
//!
//! One struct covers Llama / SmolLM2 / Mistral (plain), Qwen2 / Qwen2.5 (bias on q, k, v),
//! Qwen3 (RMS norm on each head of q and k) and tied or separate output weights. RoPE
//! frequencies come from the theta and, where given, Llama-3 or linear scaling.

use candle_core::quantized::gguf_file::{Content, Value};
use serde::Deserialize;
use std::path::Path;

use crate::LoadError as EngineError;

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor.
    Linear(f32),
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// GGUF's Llama weights pair dimensions (2i, 2i+1) for RoPE; HF checkpoints and
    /// NeoX-style architectures pair (i, i + d/2).
    pub rope_interleaved: bool,
    pub qkv_bias: bool,
    /// Bias on the attention output projection (HF `attention_bias` on Llama and Qwen3; Qwen2
    /// has q/k/v biases only).
    pub o_bias: bool,
    pub qk_norm: bool,
    pub tie_embeddings: bool,
    pub max_position: usize,
}

/// llama.cpp's list of architectures whose RoPE is NeoX-style (non-interleaved).
fn gguf_rope_is_neox(arch: &str) -> bool {
    matches!(
        arch,
        "qwen"
            | "qwen2"
            | "qwen2moe"
            | "qwen3"
            | "qwen3moe"
            | "phi2"
            | "phi3"
            | "stablelm"
            | "starcoder2"
            | "olmo2"
    )
}

impl ModelConfig {
    pub fn from_gguf(content: &Content) -> Result<Self, EngineError> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | "qwen3") {
            return Err(EngineError::Unsupported(format!(
                "GGUF architecture {arch} (supported: llama, mistral, qwen2, qwen3)"
            )));
        }
        let get = |k: &str| -> Option<&Value> { md.get(&format!("{arch}.{k}")) };
        let req_u = |k: &str| -> Result<usize, EngineError> {
            get(k)
                .and_then(|v| {
                    v.to_u32()
                        .ok()
                        .or_else(|| v.to_u64().ok().map(|x| x as u32))
                })
                .map(|v| v as usize)
                .ok_or_else(|| {
                    EngineError::Unsupported(format!("GGUF metadata {arch}.{k} missing"))
                })
        };
        let f = |k: &str| get(k).and_then(|v| v.to_f32().ok());
        let hidden_size = req_u("embedding_length")?;
        let num_heads = req_u("attention.head_count")?;
        let num_kv_heads = req_u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = req_u("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let has = |name: &str| content.tensor_infos.contains_key(name);
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims().first().copied().unwrap_or(0),
            None => {
                return Err(EngineError::Unsupported(
                    "GGUF without token_embd.weight".into(),
                ));
            }
        };
        let rope_scaling = match get("rope.scaling.type").and_then(|v| v.to_string().ok()) {
            Some(t) if t == "linear" => {
                RopeScaling::Linear(f("rope.scaling.factor").unwrap_or(1.0))
            }
            _ => RopeScaling::None,
        };
        Ok(Self {
            hidden_size,
            intermediate_size: req_u("feed_forward_length")?,
            num_layers: req_u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: !gguf_rope_is_neox(&arch),
            qkv_bias: has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            qk_norm: has("blk.0.attn_q_norm.weight"),
            tie_embeddings: !has("output.weight"),
            max_position: req_u("context_length").unwrap_or(4096),
            architecture: arch,
        })
    }

    pub fn from_hf_dir(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let c: HfConfig = serde_json::from_str(&text)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let model_type = c.model_type.clone().unwrap_or_else(|| "llama".into());
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2" | "qwen3") {
            return Err(EngineError::Unsupported(format!(
                "model_type {model_type} (supported: llama, mistral, qwen2, qwen3)"
            )));
        }
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = c
            .head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let rope_scaling = match &c.rope_scaling {
            Some(s) => match s.rope_type.as_deref().or(s.kind.as_deref()) {
                Some("llama3") => RopeScaling::Llama3 {
                    factor: s.factor.unwrap_or(1.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position: s.original_max_position_embeddings.unwrap_or(8192)
                        as f32,
                },
                Some("linear") => RopeScaling::Linear(s.factor.unwrap_or(1.0)),
                Some("default") | None => RopeScaling::None,
                Some(other) => {
                    return Err(EngineError::Unsupported(format!(
                        "rope_scaling type {other}"
                    )));
                }
            },
            None => RopeScaling::None,
        };
        Ok(Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: c.rope_theta.unwrap_or(10_000.0) as f32,
            rope_scaling,
            rope_interleaved: false,
            // Qwen2 always has q/k/v biases; elsewhere `attention_bias` puts one on all four.
            qkv_bias: model_type == "qwen2" || c.attention_bias.unwrap_or(false),
            o_bias: model_type != "qwen2" && c.attention_bias.unwrap_or(false),
            qk_norm: model_type == "qwen3",
            tie_embeddings: c.tie_word_embeddings.unwrap_or(false),
            max_position: c.max_position_embeddings.unwrap_or(4096),
            architecture: model_type,
        })
    }

    /// RoPE inverse frequencies, one per pair of dimensions.
    pub fn inv_freqs(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear(f) => base.into_iter().map(|x| x / f).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    attention_bias: Option<bool>,
}
