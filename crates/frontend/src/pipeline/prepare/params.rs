//! Sampling, length and output fields: OpenAI's documented ranges (and vLLM's for its
//! extensions), merged with Dynamo's `nvext`, turned into the engine's settings.

use crate::error::ApiError;
use tandem_protocols::llm::SamplingOptions;
use tandem_protocols::openai::{CommonParams, NvExt, StopSequences};

/// OpenAI's limit on `n`.
pub const MAX_N: u32 = 128;
const MAX_STOPS: usize = 4;
const MAX_TOP_LOGPROBS: u32 = 20;

/// What the common fields ask of the engine and of the response.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub sampling: SamplingOptions,
    pub max_tokens: Option<u32>,
    pub min_tokens: Option<u32>,
    pub ignore_eos: bool,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `nvext.backend_instance_id`: the worker to use.
    pub worker: Option<u64>,
}

fn range(v: Option<f32>, name: &str, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
            format!("`{name}` must be between {lo} and {hi}, got {x}"),
            Some(name),
        )),
        _ => Ok(()),
    }
}

fn top_k(k: Option<i64>, name: &str) -> Result<Option<u32>, ApiError> {
    match k {
        None | Some(-1) | Some(0) => Ok(None),
        Some(k) if k > 0 && k <= u32::MAX as i64 => Ok(Some(k as u32)),
        Some(k) => Err(ApiError::invalid(
            format!("`{name}` must be -1 (off), 0 (off) or a positive integer, got {k}"),
            Some(name),
        )),
    }
}

fn repetition_penalty(r: Option<f32>, name: &str) -> Result<(), ApiError> {
    match r {
        Some(r) if !(r > 0.0 && r <= 10.0) => Err(ApiError::invalid(
            format!("`{name}` must be in (0, 10], got {r}"),
            Some(name),
        )),
        _ => Ok(()),
    }
}

/// `nvext` fields tandem honours; any other is refused by name.
fn nvext(ext: &NvExt) -> Result<(), ApiError> {
    if let Some((key, _)) = ext.other.iter().find(|(_, v)| !v.is_null()) {
        return Err(ApiError::unsupported(
            &format!("nvext.{key}"),
            "is set, but",
        ));
    }
    top_k(ext.top_k, "nvext.top_k")?;
    range(ext.min_p, "nvext.min_p", 0.0, 1.0)?;
    repetition_penalty(ext.repetition_penalty, "nvext.repetition_penalty")
}

fn stops(stop: Option<&StopSequences>) -> Result<Vec<String>, ApiError> {
    let stops = stop
        .cloned()
        .map(StopSequences::into_vec)
        .unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("at most {MAX_STOPS} stop sequences are allowed"),
            Some("stop"),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop sequences must not be empty",
            Some("stop"),
        ));
    }
    Ok(stops)
}

/// `logit_bias` is not implemented; its keys and values are still checked first, so a
/// malformed one gets the more useful message.
fn logit_bias(p: &CommonParams) -> Result<(), ApiError> {
    let Some(bias) = &p.logit_bias else {
        return Ok(());
    };
    for (token, value) in bias {
        if token.parse::<u32>().is_err() {
            return Err(ApiError::invalid(
                format!("`logit_bias` keys must be token ids, got {token:?}"),
                Some("logit_bias"),
            ));
        }
        if !(-100.0..=100.0).contains(value) {
            return Err(ApiError::invalid(
                format!("`logit_bias` values must be between -100 and 100, got {value}"),
                Some("logit_bias"),
            ));
        }
    }
    if bias.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unsupported("logit_bias", "is set, but"))
    }
}

/// Fields of either endpoint that need a feature tandem does not have yet.
fn unimplemented(p: &CommonParams) -> Result<(), ApiError> {
    logit_bias(p)
}

/// Validates the common fields and turns them into engine settings.
pub fn params(p: &CommonParams) -> Result<Params, ApiError> {
    unimplemented(p)?;
    range(p.temperature, "temperature", 0.0, 2.0)?;
    range(p.top_p, "top_p", 0.0, 1.0)?;
    if p.top_p == Some(0.0) {
        return Err(ApiError::invalid(
            "`top_p` must be greater than 0",
            Some("top_p"),
        ));
    }
    range(p.min_p, "min_p", 0.0, 1.0)?;
    range(p.frequency_penalty, "frequency_penalty", -2.0, 2.0)?;
    range(p.presence_penalty, "presence_penalty", -2.0, 2.0)?;
    repetition_penalty(p.repetition_penalty, "repetition_penalty")?;
    let ext = p.nvext.clone().unwrap_or_default();
    nvext(&ext)?;
    let n = p.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::invalid(
            format!("`n` must be between 1 and {MAX_N}, got {n}"),
            Some("n"),
        ));
    }
    let max_tokens = p.max_completion_tokens.or(p.max_tokens);
    if max_tokens == Some(0) {
        let name = if p.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(ApiError::invalid(
            format!("`{name}` must be at least 1"),
            Some(name),
        ));
    }
    if let (Some(min), Some(max)) = (p.min_tokens, max_tokens)
        && min > max
    {
        return Err(ApiError::invalid(
            format!("`min_tokens` ({min}) must not exceed `max_tokens` ({max})"),
            Some("min_tokens"),
        ));
    }
    let stream = p.stream.unwrap_or(false);
    if p.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "`stream_options` is only allowed when `stream` is true",
            Some("stream_options"),
        ));
    }
    // Top-level fields win over `nvext`'s, as in Dynamo.
    let greedy = ext.greed_sampling.unwrap_or(false);
    Ok(Params {
        sampling: SamplingOptions {
            temperature: if greedy { Some(0.0) } else { p.temperature },
            top_p: p.top_p,
            top_k: top_k(p.top_k, "top_k")?.or(top_k(ext.top_k, "nvext.top_k")?),
            min_p: p.min_p.or(ext.min_p),
            seed: p.seed.map(|s| s as u64),
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            repetition_penalty: p.repetition_penalty.or(ext.repetition_penalty),
            n,
            guided_decoding: None,
        },
        max_tokens,
        min_tokens: p.min_tokens,
        ignore_eos: p.ignore_eos.or(ext.ignore_eos).unwrap_or(false),
        stops: stops(p.stop.as_ref())?,
        stream,
        include_usage: p
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        worker: ext.backend_instance_id,
    })
}

/// Chat's `logprobs` / `top_logprobs` → how many alternatives each token reports (`None`:
/// no logprobs).
pub fn chat_logprobs(logprobs: Option<bool>, top: Option<u32>) -> Result<Option<u32>, ApiError> {
    if let Some(t) = top {
        if t > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {t}"),
                Some("top_logprobs"),
            ));
        }
        if logprobs != Some(true) {
            return Err(ApiError::invalid(
                "`top_logprobs` requires `logprobs` to be true",
                Some("top_logprobs"),
            ));
        }
    }
    Ok((logprobs == Some(true)).then(|| top.unwrap_or(0)))
}
