//! Generation events → a Responses API answer: one `response` object, or its event stream
//! (`response.created` … `response.completed`, each SSE `event:` named by its `type`, with a
//! `sequence_number`).
//!
//! The answer's output is a list of items in the order the model produced them: a
//! `reasoning` item (thinking, with the model's reasoning parser), a `message` item with one
//! `output_text` part, and a `function_call` item per tool call. [`Items`] builds them from
//! the events and says, for a stream, which events each step makes; the unary answer is the
//! same items once the generation has ended. A choice cut by `max_output_tokens` ends the
//! response `incomplete` (`incomplete_details.reason: "max_output_tokens"`), as OpenAI's does.

use crate::error::ApiError;
use crate::pipeline::{GenEvent, Generation};
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use std::convert::Infallible;
use tandem_protocols::openai::Usage;

/// The kinds of output item.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reasoning,
    Message,
    Call,
}

/// One output item under construction.
struct Item {
    kind: Kind,
    id: String,
    text: String,
    call_id: String,
    name: String,
}

/// The output items of one response, built from generation events.
pub struct Items {
    items: Vec<Item>,
    /// The last item is still open (more of it may come).
    open: bool,
    reason: Option<&'static str>,
    usage: Usage,
    seq: u64,
    id: String,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

impl Items {
    pub fn new(request_id: &str) -> Self {
        Self {
            items: Vec::new(),
            open: false,
            reason: None,
            usage: Usage::default(),
            seq: 0,
            id: format!("resp_{request_id}"),
        }
    }

    /// A stream event of `kind` with `fields`, numbered.
    fn event(&mut self, kind: &str, mut fields: Value) -> (String, Value) {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.seq);
        self.seq += 1;
        (kind.to_string(), fields)
    }

    /// Takes one event; returns the stream events it makes.
    pub fn push(&mut self, ev: GenEvent) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        match ev {
            GenEvent::Reasoning { text, .. } => self.add_text(Kind::Reasoning, text, &mut out),
            GenEvent::Text { text, .. } => self.add_text(Kind::Message, text, &mut out),
            GenEvent::ToolCall { call, .. } => {
                if call.id.is_some() {
                    self.close(&mut out);
                    self.items.push(Item {
                        kind: Kind::Call,
                        id: new_id("fc"),
                        text: String::new(),
                        call_id: call.id.unwrap_or_default(),
                        name: call.function.name.unwrap_or_default(),
                    });
                    self.open = true;
                    self.added(&mut out);
                }
                if let Some(args) = call.function.arguments.filter(|a| !a.is_empty()) {
                    self.delta(args, &mut out);
                }
            }
            GenEvent::Finish { reason, .. } => {
                self.close(&mut out);
                self.reason = Some(reason);
            }
            GenEvent::Usage(u) => self.usage = u,
            GenEvent::Logprobs { .. } => {}
        }
        out
    }

    fn add_text(&mut self, kind: Kind, text: String, out: &mut Vec<(String, Value)>) {
        if !(self.open && self.items.last().is_some_and(|i| i.kind == kind)) {
            self.close(out);
            let id = new_id(if kind == Kind::Message { "msg" } else { "rs" });
            self.items.push(Item {
                kind,
                id,
                text: String::new(),
                call_id: String::new(),
                name: String::new(),
            });
            self.open = true;
            self.added(out);
        }
        self.delta(text, out);
    }

    /// Events for a newly opened item.
    fn added(&mut self, out: &mut Vec<(String, Value)>) {
        let i = self.items.len() - 1;
        let item = self.item_json(i, "in_progress");
        out.push(self.event(
            "response.output_item.added",
            json!({"output_index": i, "item": item}),
        ));
        if self.items[i].kind == Kind::Message {
            let id = self.items[i].id.clone();
            out.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": i, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": []}}),
            ));
        }
    }

    fn delta(&mut self, text: String, out: &mut Vec<(String, Value)>) {
        let i = self.items.len() - 1;
        let (kind, id) = (self.items[i].kind, self.items[i].id.clone());
        let ev = match kind {
            Kind::Message => self.event(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": i, "content_index": 0, "delta": text, "logprobs": []}),
            ),
            Kind::Reasoning => self.event(
                "response.reasoning_text.delta",
                json!({"item_id": id, "output_index": i, "content_index": 0, "delta": text}),
            ),
            Kind::Call => self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": i, "delta": text}),
            ),
        };
        out.push(ev);
        self.items[i].text.push_str(&text);
    }

    /// Ends the open item: its `done` events.
    fn close(&mut self, out: &mut Vec<(String, Value)>) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        let i = self.items.len() - 1;
        let (kind, id, text) = {
            let it = &self.items[i];
            (it.kind, it.id.clone(), it.text.clone())
        };
        match kind {
            Kind::Message => {
                out.push(self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "text": text, "logprobs": []}),
                ));
                out.push(self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0,
                           "part": {"type": "output_text", "text": text, "annotations": []}}),
                ));
            }
            Kind::Reasoning => out.push(self.event(
                "response.reasoning_text.done",
                json!({"item_id": id, "output_index": i, "content_index": 0, "text": text}),
            )),
            Kind::Call => {
                let name = self.items[i].name.clone();
                out.push(self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": i, "arguments": text, "name": name}),
                ));
            }
        }
        let item = self.item_json(i, "completed");
        out.push(self.event(
            "response.output_item.done",
            json!({"output_index": i, "item": item}),
        ));
    }

    fn item_json(&self, i: usize, status: &str) -> Value {
        let it = &self.items[i];
        let done = status == "completed";
        match it.kind {
            Kind::Message => json!({
                "type": "message", "id": it.id, "status": status, "role": "assistant",
                "content": if done {
                    json!([{"type": "output_text", "text": it.text, "annotations": [], "logprobs": []}])
                } else { json!([]) },
            }),
            Kind::Reasoning => json!({
                "type": "reasoning", "id": it.id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": if done { it.text.as_str() } else { "" }}],
            }),
            Kind::Call => json!({
                "type": "function_call", "id": it.id, "call_id": it.call_id, "name": it.name,
                "arguments": if done { it.text.as_str() } else { "" }, "status": status,
            }),
        }
    }

    /// The `response` object: `in_progress` while streaming, else as the generation ended.
    pub fn response(&self, request: &Value, model: &str, created: u64, done: bool) -> Value {
        let incomplete = self.reason == Some("length");
        let status = match (done, incomplete) {
            (false, _) => "in_progress",
            (true, true) => "incomplete",
            (true, false) => "completed",
        };
        let output: Vec<Value> = if done {
            (0..self.items.len())
                .map(|i| self.item_json(i, "completed"))
                .collect()
        } else {
            Vec::new()
        };
        let u = &self.usage;
        let field = |k: &str, default: Value| request.get(k).cloned().unwrap_or(default);
        json!({
            "id": self.id,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": null,
            "incomplete_details": if done && incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "model": model,
            "output": output,
            "instructions": field("instructions", Value::Null),
            "max_output_tokens": field("max_output_tokens", Value::Null),
            "metadata": field("metadata", json!({})),
            "parallel_tool_calls": field("parallel_tool_calls", json!(true)),
            "previous_response_id": null,
            "reasoning": null,
            "store": false,
            "temperature": field("temperature", json!(1.0)),
            "text": field("text", json!({"format": {"type": "text"}})),
            "tool_choice": field("tool_choice", json!("auto")),
            "tools": field("tools", json!([])),
            "top_p": field("top_p", json!(1.0)),
            "truncation": field("truncation", json!("disabled")),
            "user": field("user", Value::Null),
            "usage": if done { json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.map_or(0, |d| d.cached_tokens)},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            }) } else { Value::Null },
        })
    }
}

fn sse(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!(
        "event: {kind}\ndata: {}\n\n",
        serde_json::to_string(data).unwrap_or_default()
    ))
}

/// Renders a generation as a Responses answer; `request` is the client's body (echoed
/// fields).
pub async fn respond(
    g: Generation<impl Stream<Item = Result<GenEvent, ApiError>> + Send + 'static>,
    request: Value,
) -> Result<Response, ApiError> {
    let created = super::render::now();
    let mut items = Items::new(&g.request_id);
    let mut events = Box::pin(g.events);
    if !g.stream {
        while let Some(ev) = events.next().await {
            items.push(ev?);
        }
        return Ok(axum::Json(items.response(&request, &g.model, created, true)).into_response());
    }
    // An error before any output is the answer's status, as for chat.
    let head = events.next().await.transpose()?;
    let model = g.model;
    let body = async_stream::stream! {
        let start = items.response(&request, &model, created, false);
        for kind in ["response.created", "response.in_progress"] {
            let (k, v) = items.event(kind, json!({"response": start}));
            yield sse(&k, &v);
        }
        let mut next = head;
        while let Some(ev) = next {
            for (k, v) in items.push(ev) {
                yield sse(&k, &v);
            }
            next = match events.next().await {
                None => None,
                Some(Ok(ev)) => Some(ev),
                Some(Err(e)) => {
                    let body = e.body().error;
                    let (k, v) = items.event("error", json!({"code": body.code.unwrap_or(body.kind), "message": body.message, "param": body.param}));
                    yield sse(&k, &v);
                    return;
                }
            };
        }
        let last = items.response(&request, &model, created, true);
        let kind = if last["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
        let (k, v) = items.event(kind, json!({"response": last}));
        yield sse(&k, &v);
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body.map(Ok::<_, Infallible>)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocols::openai::{FunctionCallDelta, ToolCallDelta};

    fn kinds(evs: &[(String, Value)]) -> Vec<&str> {
        evs.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn items_and_their_events_in_the_order_the_model_made_them() {
        let mut it = Items::new("r1");
        let mut all = Vec::new();
        for ev in [
            GenEvent::Reasoning {
                index: 0,
                text: "think".into(),
            },
            GenEvent::Text {
                index: 0,
                text: "Hel".into(),
            },
            GenEvent::Text {
                index: 0,
                text: "lo".into(),
            },
            GenEvent::ToolCall {
                index: 0,
                call: ToolCallDelta {
                    index: 0,
                    id: Some("call_1".into()),
                    kind: Some("function".into()),
                    function: FunctionCallDelta {
                        name: Some("f".into()),
                        arguments: Some("{\"a\":".into()),
                    },
                },
            },
            GenEvent::ToolCall {
                index: 0,
                call: ToolCallDelta {
                    index: 0,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: Some("1}".into()),
                    },
                    ..Default::default()
                },
            },
            GenEvent::Finish {
                index: 0,
                reason: "tool_calls",
            },
        ] {
            all.extend(it.push(ev));
        }
        assert_eq!(
            kinds(&all),
            [
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        let seqs: Vec<u64> = all
            .iter()
            .map(|(_, v)| v["sequence_number"].as_u64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        let r = it.response(&json!({"max_output_tokens": 9}), "m", 1, true);
        assert_eq!(r["status"], "completed");
        assert_eq!(r["output"][1]["content"][0]["text"], "Hello");
        assert_eq!(r["output"][2]["arguments"], "{\"a\":1}");
        assert_eq!(r["output"][2]["call_id"], "call_1");
        assert_eq!(r["max_output_tokens"], 9);
    }

    #[test]
    fn a_length_cut_makes_the_response_incomplete() {
        let mut it = Items::new("r2");
        it.push(GenEvent::Text {
            index: 0,
            text: "a".into(),
        });
        it.push(GenEvent::Finish {
            index: 0,
            reason: "length",
        });
        let r = it.response(&json!({}), "m", 1, true);
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
    }
}
