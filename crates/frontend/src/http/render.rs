//! Generation events → OpenAI responses: SSE chunks (`chat.completion.chunk`,
//! `text_completion`) ending in `data: [DONE]`, or one JSON body.
//!
//! A token's logprobs ride on the chunk that carries the text (or tool call, or finish) it
//! produced, so that a client reading `delta` and `logprobs` together sees them agree.
//!
//! A failure before the first event is an HTTP error status with OpenAI's envelope, for
//! either kind of client. A failure mid-stream reaches a streaming client as an SSE
//! `event: error` whose data is the envelope, and the stream ends there without `[DONE]`, so
//! no client mistakes it for a normal end; a unary client gets the error status.

use super::logprobs;
use crate::error::ApiError;
use crate::pipeline::{Endpoint, GenEvent, Generation, TokenLogprobs, execute};
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use std::convert::Infallible;
use tandem_protocols::openai::*;

pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sse_data(v: &impl serde::Serialize) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(v).unwrap_or_default()
    ))
}

fn sse_error(e: &ApiError) -> Bytes {
    Bytes::from(format!(
        "event: error\ndata: {}\n\n",
        serde_json::to_string(&e.body()).unwrap_or_default()
    ))
}

/// The first event decides the status: an error before any output is answered with its
/// status instead of a 200 stream.
async fn first<S: Stream<Item = Result<GenEvent, ApiError>> + Unpin>(
    events: &mut S,
) -> Result<Option<GenEvent>, ApiError> {
    events.next().await.transpose()
}

/// Renders a generation as the endpoint's response.
pub async fn respond(
    endpoint: Endpoint,
    g: Generation<impl Stream<Item = Result<GenEvent, ApiError>> + Send + 'static>,
) -> Result<Response, ApiError> {
    let created = now();
    if !g.stream {
        let c = execute::collect(g.events, g.n, g.logprobs).await?;
        return Ok(match endpoint {
            Endpoint::Chat | Endpoint::Responses => chat_unary(&g.request_id, &g.model, created, c),
            Endpoint::Completions => completion_unary(&g.request_id, &g.model, created, c),
        });
    }
    let mut events = Box::pin(g.events);
    let head = first(&mut events).await?;
    let mut chunks = Chunks {
        endpoint,
        id: match endpoint {
            Endpoint::Chat | Endpoint::Responses => format!("chatcmpl-{}", g.request_id),
            Endpoint::Completions => format!("cmpl-{}", g.request_id),
        },
        model: g.model,
        created,
        include_usage: g.include_usage,
        started: vec![false; g.n as usize],
        pending: vec![Vec::new(); g.n as usize],
        offsets: vec![0; g.n as usize],
    };
    let body = async_stream::stream! {
        if let Some(b) = head.and_then(|ev| chunks.render(ev)) {
            yield b
        }
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => if let Some(b) = chunks.render(ev) { yield b },
                Err(e) => { yield sse_error(&e); return; }
            }
        }
        yield Bytes::from_static(b"data: [DONE]\n\n");
    };
    let body = Body::from_stream(body.map(Ok::<_, Infallible>));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// Builds the SSE chunks of one streamed response.
struct Chunks {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Per choice: its first chat chunk (which carries the role) has gone out.
    started: Vec<bool>,
    /// Per choice: logprobs waiting for the chunk with their text.
    pending: Vec<Vec<TokenLogprobs>>,
    /// Per choice: bytes of token text so far (completions' `text_offset`).
    offsets: Vec<usize>,
}

/// What one chunk carries for one choice.
#[derive(Default)]
struct Piece {
    text: Option<String>,
    thought: Option<String>,
    call: Option<ToolCallDelta>,
    reason: Option<String>,
}

impl Chunks {
    fn render(&mut self, ev: GenEvent) -> Option<Bytes> {
        let (index, piece) = match ev {
            GenEvent::Text { index, text } => (
                index,
                Piece {
                    text: Some(text),
                    ..Piece::default()
                },
            ),
            GenEvent::Reasoning { index, text } => (
                index,
                Piece {
                    thought: Some(text),
                    ..Piece::default()
                },
            ),
            GenEvent::ToolCall { index, call } => (
                index,
                Piece {
                    call: Some(call),
                    ..Piece::default()
                },
            ),
            GenEvent::Finish { index, reason } => (
                index,
                Piece {
                    reason: Some(reason.to_string()),
                    ..Piece::default()
                },
            ),
            GenEvent::Logprobs { index, tokens } => {
                if let Some(p) = self.pending.get_mut(index as usize) {
                    p.extend(tokens);
                }
                return None;
            }
            GenEvent::Usage(u) => return self.include_usage.then(|| self.usage(u)),
        };
        let lps = self
            .pending
            .get_mut(index as usize)
            .map(std::mem::take)
            .filter(|l| !l.is_empty());
        Some(match self.endpoint {
            Endpoint::Chat | Endpoint::Responses => {
                let first = self
                    .started
                    .get_mut(index as usize)
                    .map(|s| !std::mem::replace(s, true))
                    .unwrap_or(false);
                let choice = ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: first.then(|| "assistant".to_string()),
                        content: piece.text,
                        reasoning_content: piece.thought,
                        tool_calls: piece.call.map(|c| vec![c]),
                    },
                    finish_reason: piece.reason,
                    logprobs: lps.map(logprobs::chat),
                };
                sse_data(&self.chat(vec![choice], None))
            }
            Endpoint::Completions => {
                let offset = self.offsets.get_mut(index as usize);
                let choice = CompletionChoice {
                    index,
                    text: piece.text.unwrap_or_default(),
                    finish_reason: piece.reason,
                    logprobs: lps.zip(offset).map(|(l, o)| logprobs::completion(l, o)),
                };
                sse_data(&self.completion(vec![choice], None))
            }
        })
    }

    fn usage(&self, u: Usage) -> Bytes {
        match self.endpoint {
            Endpoint::Chat | Endpoint::Responses => sse_data(&self.chat(vec![], Some(u))),
            Endpoint::Completions => sse_data(&self.completion(vec![], Some(u))),
        }
    }

    fn chat(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }

    fn completion(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }
}

fn chat_unary(request_id: &str, model: &str, created: u64, c: execute::Collected) -> Response {
    let usage = c.usage;
    let choices = c
        .texts
        .into_iter()
        .zip(c.reasons)
        .zip(c.reasoning)
        .zip(c.tool_calls)
        .zip(c.logprobs)
        .enumerate()
        .map(|(i, ((((text, reason), thought), calls), lps))| {
            // A message that only calls tools has no content (OpenAI's null).
            let content = (calls.is_empty() || !text.is_empty()).then_some(text);
            ChatChoice {
                index: i as u32,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content,
                    reasoning_content: thought,
                    tool_calls: (!calls.is_empty()).then_some(calls),
                },
                finish_reason: reason,
                logprobs: lps.map(logprobs::chat),
            }
        })
        .collect();
    axum::Json(ChatCompletionResponse {
        id: format!("chatcmpl-{request_id}"),
        object: "chat.completion".into(),
        created,
        model: model.to_string(),
        choices,
        usage,
        system_fingerprint: None,
    })
    .into_response()
}

fn completion_unary(
    request_id: &str,
    model: &str,
    created: u64,
    c: execute::Collected,
) -> Response {
    let choices = c
        .texts
        .into_iter()
        .zip(c.reasons)
        .zip(c.logprobs)
        .enumerate()
        .map(|(i, ((text, finish_reason), lps))| CompletionChoice {
            index: i as u32,
            text,
            finish_reason,
            logprobs: lps.map(|l| logprobs::completion(l, &mut 0)),
        })
        .collect();
    axum::Json(CompletionResponse {
        id: format!("cmpl-{request_id}"),
        object: "text_completion".into(),
        created,
        model: model.to_string(),
        choices,
        usage: Some(c.usage),
        system_fingerprint: None,
    })
    .into_response()
}
