//! Disaggregated prefill and decode on the wire (Dynamo's `disaggregated_params` and
//! `prefill_result`, with tandem's own transfer parameters in place of NIXL's).
//!
//! A prefill worker answers the prefill leg (the request with `max_tokens = 1`) with the
//! first token and [`DisaggregatedParams`]: where its KV blocks for the prompt can be fetched
//! (the data-plane address it also advertises in its model card), under which transfer id, the
//! blocks themselves and their layout. The frontend sends the decode worker the original
//! request plus a [`PrefillResult`]; the decode worker fetches the blocks it does not already
//! cache over a direct TCP connection ([`FetchRequest`] → [`FetchHeader`] + raw blocks) and
//! continues from the first token.

use serde::{Deserialize, Serialize};

/// How a worker's KV blocks are laid out: two workers can exchange blocks only when they
/// agree on every field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    /// `f32`, `f16`, `bf16`; `mock` for the mocker, whose blocks carry no data.
    pub dtype: String,
}

impl KvLayout {
    /// Bytes of one block on the wire: keys then values of every layer, `block_size` rows of
    /// `num_kv_heads × head_dim` elements each, little-endian.
    pub fn block_bytes(&self) -> usize {
        let elem = match self.dtype.as_str() {
            "f32" => 4,
            "f16" | "bf16" => 2,
            _ => 0,
        };
        2 * self.num_layers as usize
            * self.block_size as usize
            * self.num_kv_heads as usize
            * self.head_dim as usize
            * elem
    }

    /// Why blocks of `other` cannot be written into this layout, if they cannot.
    pub fn mismatch(&self, other: &KvLayout) -> Option<String> {
        (self != other).then(|| format!("KV layout {other:?} does not match {self:?}"))
    }
}

/// A worker's KV data-plane address (Dynamo's `disaggregated_endpoint` in the runtime config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPlaneEndpoint {
    pub host: String,
    pub port: u16,
}

/// What a prefill worker's answer carries besides the first token. The engine fills in the
/// blocks; the worker adds who and where it is and the layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisaggregatedParams {
    /// The prefill worker's instance id.
    pub worker_id: u64,
    /// Where to fetch the blocks.
    pub endpoint: DataPlaneEndpoint,
    /// Names the held blocks on the prefill worker; a fetch releases them.
    pub transfer_id: u64,
    /// The prompt's blocks on the prefill worker, in order; the last may be partial.
    pub block_ids: Vec<u32>,
    /// Dynamo sequence hashes of the prompt's full blocks (one per full block).
    pub block_hashes: Vec<u64>,
    /// Prompt tokens the blocks hold.
    pub num_tokens: u32,
    pub layout: KvLayout,
}

/// The prefill leg's outcome, sent with the decode request (Dynamo's `prefill_result`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillResult {
    pub disaggregated_params: DisaggregatedParams,
    /// The token the prefill worker sampled; the decode worker emits it first.
    pub first_token: u32,
    /// Prompt tokens the prefill worker found in its prefix cache (usage's `cached_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
    /// The first token's logprobs, when the request asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_logprob: Option<crate::llm::TokenLogprob>,
}

/// The request-plane call (`kv_release` beside a prefill worker's `generate`) that frees a
/// held transfer whose decode leg will not run; answered with whether it was still held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub transfer_id: u64,
}

/// Name of the release endpoint, in the prefill worker's component.
pub const RELEASE_ENDPOINT: &str = "kv_release";

/// Decode → prefill on a data-plane connection: send blocks `first_block..` of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub transfer_id: u64,
    pub first_block: u32,
    /// The fetcher's layout; the prefill worker refuses blocks it cannot write.
    pub layout: KvLayout,
}

/// Prefill → decode: the answer to a [`FetchRequest`], followed by `blocks × block_bytes`
/// bytes when `error` is unset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchHeader {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<FetchError>,
    pub blocks: u32,
    pub block_bytes: u64,
}

/// Why a fetch was refused; also the `reason` label of transfer failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchError {
    /// No blocks are held under that id (never were, already fetched, or expired).
    UnknownTransfer,
    /// The layouts differ (another model, dtype or block size).
    LayoutMismatch,
    /// The request asked for blocks past the transfer's end.
    BadRange,
    /// The engine could not read a block.
    ReadFailed,
}

impl FetchError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownTransfer => "unknown_transfer",
            Self::LayoutMismatch => "layout_mismatch",
            Self::BadRange => "bad_range",
            Self::ReadFailed => "read_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_bytes_and_mismatch() {
        let l = KvLayout {
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            dtype: "f32".into(),
        };
        assert_eq!(l.block_bytes(), 2 * 30 * 16 * 3 * 64 * 4);
        assert!(l.mismatch(&l.clone()).is_none());
        let bf = KvLayout {
            dtype: "bf16".into(),
            ..l.clone()
        };
        assert_eq!(bf.block_bytes(), l.block_bytes() / 2);
        assert!(l.mismatch(&bf).unwrap().contains("bf16"));
        let mock = KvLayout {
            dtype: "mock".into(),
            ..l
        };
        assert_eq!(mock.block_bytes(), 0);
    }
}
