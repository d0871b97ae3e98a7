//! Generation events → OpenAI responses: SSE chunks (`chat.completion.chunk`,
//! `text_completion`) ending in `data: [DONE]`, or one JSON body.
//!
//! A failure before the first event is an HTTP error status with OpenAI's envelope, for
//! either kind of client. A failure mid-stream reaches a streaming client as an SSE
//! `event: error` whose data is the envelope, and the stream ends there without `[DONE]`, so
//! no client mistakes it for a normal end; a unary client gets the error status.

use crate::error::ApiError;
use crate::pipeline::{Endpoint, GenEvent, Generation, execute};
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use std::convert::Infallible;
use tandem_protocols::openai::*;

fn now() -> u64 {
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
        let c = execute::collect(g.events, g.n).await?;
        return Ok(match endpoint {
            Endpoint::Chat => chat_unary(&g.request_id, &g.model, created, c),
            Endpoint::Completions => completion_unary(
                &g.request_id,
                &g.model,
                created,
                c.texts,
                c.reasons,
                c.usage,
            ),
        });
    }
    let mut events = Box::pin(g.events);
    let head = first(&mut events).await?;
    let mut chunks = Chunks {
        endpoint,
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{}", g.request_id),
            Endpoint::Completions => format!("cmpl-{}", g.request_id),
        },
        model: g.model,
        created,
        include_usage: g.include_usage,
        started: vec![false; g.n as usize],
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
}

impl Chunks {
    fn render(&mut self, ev: GenEvent) -> Option<Bytes> {
        let (index, text, thought, reason) = match ev {
            GenEvent::Text { index, text } => (index, Some(text), None, None),
            GenEvent::Reasoning { index, text } => (index, None, Some(text), None),
            GenEvent::Finish { index, reason } => (index, None, None, Some(reason.to_string())),
            GenEvent::Usage(u) => return self.include_usage.then(|| self.usage(u)),
        };
        Some(match self.endpoint {
            Endpoint::Chat => {
                let first = self
                    .started
                    .get_mut(index as usize)
                    .map(|s| !std::mem::replace(s, true))
                    .unwrap_or(false);
                let choice = ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: first.then(|| "assistant".to_string()),
                        content: text,
                        reasoning_content: thought,
                    },
                    finish_reason: reason,
                    logprobs: None,
                };
                sse_data(&self.chat(vec![choice], None))
            }
            Endpoint::Completions => {
                let choice = CompletionChoice {
                    index,
                    text: text.unwrap_or_default(),
                    finish_reason: reason,
                    logprobs: None,
                };
                sse_data(&self.completion(vec![choice], None))
            }
        })
    }

    fn usage(&self, u: Usage) -> Bytes {
        match self.endpoint {
            Endpoint::Chat => sse_data(&self.chat(vec![], Some(u))),
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

/// One value per choice from its text and finish reason, in choice order.
fn per_choice<T>(
    texts: Vec<String>,
    reasons: Vec<Option<String>>,
    mut make: impl FnMut(u32, String, Option<String>) -> T,
) -> Vec<T> {
    texts
        .into_iter()
        .zip(reasons)
        .enumerate()
        .map(|(i, (text, reason))| make(i as u32, text, reason))
        .collect()
}

fn chat_unary(request_id: &str, model: &str, created: u64, c: execute::Collected) -> Response {
    let usage = c.usage;
    let mut reasoning = c.reasoning.into_iter();
    let choices = per_choice(c.texts, c.reasons, |index, content, finish_reason| {
        ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant".into(),
                content,
                reasoning_content: reasoning.next().flatten(),
            },
            finish_reason,
            logprobs: None,
        }
    });
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
    texts: Vec<String>,
    reasons: Vec<Option<String>>,
    usage: Usage,
) -> Response {
    let choices = per_choice(texts, reasons, |index, text, finish_reason| {
        CompletionChoice {
            index,
            text,
            finish_reason,
            logprobs: None,
        }
    });
    axum::Json(CompletionResponse {
        id: format!("cmpl-{request_id}"),
        object: "text_completion".into(),
        created,
        model: model.to_string(),
        choices,
        usage: Some(usage),
        system_fingerprint: None,
    })
    .into_response()
}
