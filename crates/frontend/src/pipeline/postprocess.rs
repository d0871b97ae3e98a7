//! Stage 4, `postprocess`: engine outputs → text, reasoning, tool calls and logprobs per
//! choice.
//!
//! Each choice has its own incremental detokenizer (never splits a UTF-8 character) and stop
//! matcher (holds back text that may still become a stop string). A choice ends with the
//! engine's finish reason, or with `stop` when one of its stop strings appears; in that case
//! [`Step::stop_choice`] asks the caller to stop the choice on the worker too, since the engine
//! cannot see stop strings and would otherwise go on generating it until every choice ends.
//! After stop strings, a chat choice's text is split into reasoning and answer (with the
//! model's reasoning parser), and the answer read for tool calls ([`ToolMode`]): a choice that
//! called tools and stopped ends with `tool_calls`. Each token's logprobs (when asked for) go
//! out with the token's bytes and text.
//! Pure: unit-tested without NATS.

use tandem_preprocessor::Preprocessor;
use tandem_preprocessor::detokenize::IncrementalDecoder;
use tandem_preprocessor::reasoning::{ReasoningParser, ReasoningSplitter};
use tandem_preprocessor::stop::StopMatcher;
use tandem_preprocessor::tools::{
    ParsedCall, ToolCallSplitter, ToolMode, ToolPiece, parse_required,
};
use tandem_protocols::llm::{EngineOutput, TokenLogprob};
use tandem_protocols::openai::{FunctionCallDelta, PromptTokensDetails, ToolCallDelta, Usage};

/// A token as logprobs show it: its text, its bytes, its logprob.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// One generated token's logprobs: the token and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub chosen: TokenText,
    pub top: Vec<TokenText>,
}

/// What generation produces, whatever the response format.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Text {
        index: u32,
        text: String,
    },
    /// Thinking of a reasoning model (`--dyn-reasoning-parser`), apart from its answer.
    Reasoning {
        index: u32,
        text: String,
    },
    /// A tool call's first piece (id, name) or more of its arguments.
    ToolCall {
        index: u32,
        call: ToolCallDelta,
    },
    /// Logprobs of tokens of choice `index`, in order (before the text they produced).
    Logprobs {
        index: u32,
        tokens: Vec<TokenLogprobs>,
    },
    Finish {
        index: u32,
        reason: &'static str,
    },
    Usage(Usage),
}

/// The outcome of one engine output.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    pub events: Vec<GenEvent>,
    /// This output ended its choice on a stop string: stop it on the worker.
    pub stop_choice: Option<u32>,
    /// Tokens of this output that count (those of a choice still open).
    pub tokens: usize,
}

struct Choice<'a> {
    decoder: IncrementalDecoder<'a>,
    stops: StopMatcher,
    /// Chat with a reasoning parser: the answer's text, split.
    reasoning: Option<ReasoningSplitter>,
    /// Chat with tools: how the answer is read for calls.
    tools: Option<ToolReader>,
    finished: bool,
}

/// Reads one choice's answer for tool calls.
enum ToolReader {
    /// The answer is this function's arguments; `started` once its first piece went out.
    Named { name: String, started: bool },
    /// The answer is a JSON list of calls, read when complete.
    Required { text: String },
    /// The model's own format, read as it streams; `parallel: false` keeps the first call.
    Auto {
        splitter: ToolCallSplitter,
        parallel: bool,
    },
}

/// What the answer's text became: text and tool-call deltas, in the order written.
enum Answer {
    Text(String),
    Call(ToolCallDelta),
}

impl ToolReader {
    fn new(mode: &ToolMode) -> Self {
        match mode {
            ToolMode::Named(name) => Self::Named {
                name: name.clone(),
                started: false,
            },
            ToolMode::Required => Self::Required {
                text: String::new(),
            },
            ToolMode::Auto { parser, parallel } => Self::Auto {
                splitter: ToolCallSplitter::new(*parser),
                parallel: *parallel,
            },
        }
    }

    /// `text` of the answer (`end`: the choice's last); `calls`: calls already sent.
    fn push(&mut self, text: String, end: bool, calls: u32) -> Vec<Answer> {
        match self {
            Self::Named { name, started } => {
                if text.is_empty() {
                    return Vec::new();
                }
                let mut d = ToolCallDelta {
                    index: 0,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: Some(text),
                    },
                    ..Default::default()
                };
                if !std::mem::replace(started, true) {
                    d.id = Some(call_id());
                    d.kind = Some("function".into());
                    d.function.name = Some(name.clone());
                }
                vec![Answer::Call(d)]
            }
            Self::Required { text: all } => {
                all.push_str(&text);
                if !end {
                    return Vec::new();
                }
                let all = std::mem::take(all);
                match parse_required(&all) {
                    Some(parsed) => parsed
                        .into_iter()
                        .enumerate()
                        .map(|(i, c)| Answer::Call(whole_call(c, calls + i as u32)))
                        .collect(),
                    // Cut short (a length limit): the text as it is, nothing lost.
                    None => vec![Answer::Text(all)],
                }
            }
            Self::Auto { splitter, parallel } => {
                let mut split = splitter.push(&text);
                if end {
                    split.extend(splitter.finish());
                }
                let mut next = calls;
                let mut out = Vec::new();
                for piece in split.pieces {
                    match piece {
                        ToolPiece::Text(t) => out.push(Answer::Text(t)),
                        // Asked for one call at most: later ones are not calls to make.
                        ToolPiece::Call(c) if !*parallel && next > 0 => {
                            tracing::debug!(name = %c.name, "dropping a second tool call: parallel_tool_calls is false");
                        }
                        ToolPiece::Call(c) => {
                            out.push(Answer::Call(whole_call(c, next)));
                            next += 1;
                        }
                    }
                }
                out
            }
        }
    }
}

/// A tool call id, as OpenAI's look.
fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

/// A complete call as one delta, call number `index`.
fn whole_call(c: ParsedCall, index: u32) -> ToolCallDelta {
    ToolCallDelta {
        index,
        id: Some(call_id()),
        kind: Some("function".into()),
        function: FunctionCallDelta {
            name: Some(c.name),
            arguments: Some(c.arguments),
        },
    }
}

pub struct Postprocessor<'a> {
    choices: Vec<Choice<'a>>,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: Option<u32>,
    /// Token bytes for logprobs, when the request asked for them.
    vocab: Option<&'a Preprocessor>,
    /// Tool calls sent so far, per choice.
    calls: Vec<u32>,
}

impl<'a> Postprocessor<'a> {
    pub fn new(pre: &'a Preprocessor, n: u32, stops: &[String], prompt_tokens: usize) -> Self {
        Self::with_reasoning(pre, n, stops, prompt_tokens, None)
    }

    /// As [`Self::new`], splitting each choice's reasoning from its answer with `reasoning`.
    pub fn with_reasoning(
        pre: &'a Preprocessor,
        n: u32,
        stops: &[String],
        prompt_tokens: usize,
        reasoning: Option<ReasoningParser>,
    ) -> Self {
        Self {
            choices: (0..n.max(1))
                .map(|_| Choice {
                    decoder: pre.decoder(),
                    stops: StopMatcher::new(stops.to_vec()),
                    reasoning: reasoning.map(ReasoningSplitter::new),
                    tools: None,
                    finished: false,
                })
                .collect(),
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: 0,
            cached_tokens: None,
            vocab: None,
            calls: vec![0; n.max(1) as usize],
        }
    }

    /// Reads every choice's answer for tool calls as `mode` says.
    pub fn with_tools(mut self, mode: Option<&ToolMode>) -> Self {
        for c in &mut self.choices {
            c.tools = mode.map(ToolReader::new);
        }
        self
    }

    /// Renders the logprobs the engine sends, with each token's bytes from `pre`.
    pub fn with_logprobs(mut self, pre: &'a Preprocessor) -> Self {
        self.vocab = Some(pre);
        self
    }

    fn token_text(&self, id: u32, logprob: f32) -> TokenText {
        let bytes = self
            .vocab
            .map(|v| v.token_bytes(id).to_vec())
            .unwrap_or_default();
        TokenText {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    }

    fn logprobs(&self, ids: &[u32], lps: Vec<TokenLogprob>) -> Vec<TokenLogprobs> {
        ids.iter()
            .zip(lps)
            .map(|(id, lp)| TokenLogprobs {
                chosen: self.token_text(*id, lp.logprob),
                top: lp
                    .top
                    .iter()
                    .map(|(t, l)| self.token_text(*t, *l))
                    .collect(),
            })
            .collect()
    }

    /// Takes one engine output. Outputs of unknown or finished choices are ignored (a stopped
    /// choice's last tokens may still be on their way).
    pub fn push(&mut self, mut out: EngineOutput) -> Step {
        let mut step = Step::default();
        let index = out.index;
        let Some(c) = self.choices.get_mut(index as usize) else {
            return step;
        };
        if c.finished {
            return step;
        }
        if self.cached_tokens.is_none() {
            self.cached_tokens = out.cached_tokens;
        }
        step.tokens = out.token_ids.len();
        self.completion_tokens += out.token_ids.len() as u32;
        if let Some(lps) = out.logprobs.take().filter(|_| self.vocab.is_some()) {
            let tokens = self.logprobs(&out.token_ids, lps);
            step.events.push(GenEvent::Logprobs { index, tokens });
        }
        let Some(c) = self.choices.get_mut(index as usize) else {
            return step;
        };
        let mut text = c.decoder.push(&out.token_ids);
        if out.finish_reason.is_some() {
            text.push_str(&c.decoder.finish());
        }
        let matched = c.stops.push(&text);
        let mut text = matched.text;
        let reason = if matched.stopped {
            if out.finish_reason.is_none() {
                step.stop_choice = Some(index);
            }
            Some("stop")
        } else if let Some(r) = out.finish_reason {
            text.push_str(&c.stops.finish());
            Some(r.as_openai())
        } else {
            None
        };
        let (thought, text) = match &mut c.reasoning {
            None => (String::new(), text),
            Some(r) => {
                let mut split = r.push(&text);
                if reason.is_some() {
                    let last = r.finish();
                    split.reasoning.push_str(&last.reasoning);
                    split.content.push_str(&last.content);
                }
                (split.reasoning, split.content)
            }
        };
        let answer = match &mut c.tools {
            None => vec![Answer::Text(text)],
            Some(t) => t.push(text, reason.is_some(), self.calls[index as usize]),
        };
        if !thought.is_empty() {
            step.events.push(GenEvent::Reasoning {
                index,
                text: thought,
            });
        }
        for a in answer {
            match a {
                Answer::Text(text) if text.is_empty() => {}
                Answer::Text(text) => step.events.push(GenEvent::Text { index, text }),
                Answer::Call(call) => {
                    self.calls[index as usize] = self.calls[index as usize].max(call.index + 1);
                    step.events.push(GenEvent::ToolCall { index, call });
                }
            }
        }
        if let Some(mut reason) = reason {
            c.finished = true;
            if reason == "stop" && self.calls[index as usize] > 0 {
                reason = "tool_calls";
            }
            step.events.push(GenEvent::Finish { index, reason });
        }
        step
    }

    /// Whether choice `index` has ended (an index the request does not have counts as ended).
    pub fn finished(&self, index: u32) -> bool {
        self.choices.get(index as usize).is_none_or(|c| c.finished)
    }

    pub fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finished)
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details: self
                .cached_tokens
                .map(|c| PromptTokensDetails { cached_tokens: c }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::test_model::preprocessor;
    use tandem_protocols::llm::FinishReason;

    fn out(index: u32, ids: Vec<u32>, finish: Option<FinishReason>) -> EngineOutput {
        EngineOutput {
            index,
            token_ids: ids,
            finish_reason: finish,
            ..Default::default()
        }
    }

    /// Feeds `text` one token at a time to choice `index`; returns the text sent and the
    /// finish reason seen.
    fn feed(
        p: &mut Postprocessor,
        pre: &Preprocessor,
        index: u32,
        text: &str,
    ) -> (String, Option<&'static str>, Option<u32>) {
        let ids = pre.encode(text).unwrap();
        let (mut sent, mut reason, mut stop) = (String::new(), None, None);
        let last = ids.len() - 1;
        for (i, id) in ids.into_iter().enumerate() {
            let finish = (i == last).then_some(FinishReason::Length);
            let step = p.push(out(index, vec![id], finish));
            stop = stop.or(step.stop_choice);
            for e in step.events {
                match e {
                    GenEvent::Text { text, .. } => sent.push_str(&text),
                    GenEvent::Finish { reason: r, .. } => reason = Some(r),
                    _ => {}
                }
            }
        }
        (sent, reason, stop)
    }

    #[test]
    fn stop_strings_across_token_boundaries() {
        let pre = preprocessor();
        // (generated text, stop strings, text the client gets, finish reason, worker told)
        let table: &[(&str, &[&str], &str, &str, bool)] = &[
            (
                "The capital of France is Paris.",
                &[],
                "The capital of France is Paris.",
                "length",
                false,
            ),
            (
                "The capital of France is Paris.",
                &["Paris"],
                "The capital of France is ",
                "stop",
                true,
            ),
            // A stop string spanning several tokens, and one that starts mid-token.
            ("one two three four", &["o thr"], "one tw", "stop", true),
            (
                "one two three four",
                &["ee fo", "two"],
                "one ",
                "stop",
                true,
            ),
            // A prefix of a stop string is held back, then released when it does not match.
            (
                "one two three",
                &["three!"],
                "one two three",
                "length",
                false,
            ),
            ("héllo wörld", &["ö"], "héllo w", "stop", true),
        ];
        for (text, stops, want, want_reason, told) in table {
            let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
            let mut p = Postprocessor::new(pre, 1, &stops, 5);
            let (sent, reason, stop) = feed(&mut p, pre, 0, text);
            assert_eq!(&sent, want, "{text:?} / {stops:?}");
            assert_eq!(reason, Some(*want_reason), "{text:?} / {stops:?}");
            assert_eq!(stop.is_some(), *told, "{text:?} / {stops:?}");
            assert!(p.all_finished());
        }
    }

    #[test]
    fn a_reasoning_parser_splits_thinking_from_the_answer_token_by_token() {
        let pre = preprocessor();
        let ids = pre
            .encode("<think>\nTwo and two make four.\n</think>\n\nThe answer is 4.")
            .unwrap();
        let stops = vec!["never".to_string()];
        let mut p =
            Postprocessor::with_reasoning(pre, 1, &stops, 3, Some(ReasoningParser::ThinkTags));
        let (mut thought, mut text) = (String::new(), String::new());
        for (i, id) in ids.iter().enumerate() {
            let finish = (i == ids.len() - 1).then_some(FinishReason::Stop);
            for e in p.push(out(0, vec![*id], finish)).events {
                match e {
                    GenEvent::Reasoning { text: t, .. } => thought.push_str(&t),
                    GenEvent::Text { text: t, .. } => text.push_str(&t),
                    _ => {}
                }
            }
        }
        assert_eq!(thought, "\nTwo and two make four.\n");
        assert_eq!(text, "The answer is 4.");
        assert_eq!(
            p.usage().completion_tokens as usize,
            ids.len(),
            "every token counted once"
        );
        // Without a parser the tags are text.
        let mut plain = Postprocessor::new(pre, 1, &stops, 3);
        let last = ids.len() - 1;
        let events: Vec<GenEvent> = ids
            .iter()
            .enumerate()
            .flat_map(|(i, id)| {
                plain
                    .push(out(0, vec![*id], (i == last).then_some(FinishReason::Stop)))
                    .events
            })
            .collect();
        assert!(
            events
                .iter()
                .all(|e| !matches!(e, GenEvent::Reasoning { .. }))
        );
    }

    #[test]
    fn n_choices_end_on_their_own_and_late_tokens_are_dropped() {
        let pre = preprocessor();
        let stops = vec!["STOP".to_string()];
        let mut p = Postprocessor::new(pre, 2, &stops, 7);
        let a = pre.encode("alpha STOP beta").unwrap();
        let b = pre.encode("gamma delta").unwrap();
        let mut told = Vec::new();
        let mut texts = [String::new(), String::new()];
        let mut counted = 0;
        for i in 0..a.len().max(b.len()) {
            for (index, ids) in [(0u32, &a), (1u32, &b)] {
                let Some(&id) = ids.get(i) else { continue };
                let finish = (index == 1 && i == b.len() - 1).then_some(FinishReason::Stop);
                let step = p.push(out(index, vec![id], finish));
                counted += step.tokens;
                told.extend(step.stop_choice);
                for e in step.events {
                    if let GenEvent::Text { index, text } = e {
                        texts[index as usize].push_str(&text);
                    }
                }
            }
        }
        assert_eq!(texts[0], "alpha ");
        assert_eq!(texts[1], "gamma delta");
        assert_eq!(told, vec![0], "only choice 0 is stopped on the worker");
        assert!(p.all_finished());
        // Choice 0's tokens after its stop string are not counted.
        let stop_at = (1..=a.len())
            .find(|k| pre.decode(&a[..*k]).unwrap().contains("STOP"))
            .unwrap();
        assert_eq!(counted, stop_at + b.len());
        let u = p.usage();
        assert_eq!(u.prompt_tokens, 7);
        assert_eq!(u.completion_tokens as usize, counted);
        assert_eq!(u.total_tokens, 7 + u.completion_tokens);
        // Unknown choices are ignored.
        assert_eq!(p.push(out(5, vec![1], None)), Step::default());
    }

    /// Feeds `text` token by token to choice 0 (ending with `finish`); gathers what comes out.
    fn events(p: &mut Postprocessor, text: &str, finish: FinishReason) -> Vec<GenEvent> {
        let ids = preprocessor().encode(text).unwrap();
        let last = ids.len() - 1;
        ids.iter()
            .enumerate()
            .flat_map(|(i, id)| {
                p.push(out(0, vec![*id], (i == last).then_some(finish)))
                    .events
            })
            .collect()
    }

    fn calls(events: &[GenEvent]) -> Vec<ToolCallDelta> {
        events
            .iter()
            .filter_map(|e| match e {
                GenEvent::ToolCall { call, .. } => Some(call.clone()),
                _ => None,
            })
            .collect()
    }

    fn finish(events: &[GenEvent]) -> Option<&'static str> {
        events.iter().find_map(|e| match e {
            GenEvent::Finish { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    #[test]
    fn a_named_call_streams_its_arguments_and_ends_with_tool_calls() {
        let pre = preprocessor();
        let mode = ToolMode::Named("get_weather".into());
        let mut p = Postprocessor::new(pre, 1, &[], 3).with_tools(Some(&mode));
        let ev = events(&mut p, r#"{"city": "Paris"}"#, FinishReason::Stop);
        let c = calls(&ev);
        assert!(c.len() > 1, "argument pieces as they come");
        assert_eq!(c[0].function.name.as_deref(), Some("get_weather"));
        assert!(c[0].id.as_deref().unwrap().starts_with("call_"));
        assert!(
            c[1..]
                .iter()
                .all(|d| d.id.is_none() && d.function.name.is_none())
        );
        let args: String = c
            .iter()
            .filter_map(|d| d.function.arguments.clone())
            .collect();
        assert_eq!(args, r#"{"city": "Paris"}"#);
        assert!(!ev.iter().any(|e| matches!(e, GenEvent::Text { .. })));
        assert_eq!(finish(&ev), Some("tool_calls"));
    }

    #[test]
    fn required_and_auto_calls_come_whole_and_cut_short_output_stays_text() {
        let pre = preprocessor();
        let mut p = Postprocessor::new(pre, 1, &[], 3).with_tools(Some(&ToolMode::Required));
        let ev = events(
            &mut p,
            r#"[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]"#,
            FinishReason::Stop,
        );
        let c = calls(&ev);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].index, c[1].index), (0, 1));
        assert_eq!(c[0].function.arguments.as_deref(), Some(r#"{"x":1}"#));
        assert_eq!(finish(&ev), Some("tool_calls"));
        // A length limit cut the list: the text is the answer, the reason `length`.
        let mut p = Postprocessor::new(pre, 1, &[], 3).with_tools(Some(&ToolMode::Required));
        let ev = events(&mut p, r#"[{"name": "a", "param"#, FinishReason::Length);
        assert!(calls(&ev).is_empty());
        assert_eq!(finish(&ev), Some("length"));
        assert!(ev.iter().any(|e| matches!(e, GenEvent::Text { .. })));
        // Auto with the Hermes parser: the answer around the call is content.
        let mode = ToolMode::Auto {
            parser: tandem_preprocessor::tools::ToolCallParser::Hermes,
            parallel: true,
        };
        let mut p = Postprocessor::new(pre, 1, &[], 3).with_tools(Some(&mode));
        let ev = events(
            &mut p,
            "Checking.<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
            FinishReason::Stop,
        );
        assert_eq!(calls(&ev).len(), 1);
        assert_eq!(finish(&ev), Some("tool_calls"));
        let text: String = ev
            .iter()
            .filter_map(|e| match e {
                GenEvent::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "Checking.");
    }

    #[test]
    fn logprobs_go_out_with_the_tokens_text_and_bytes() {
        let pre = preprocessor();
        let mut p = Postprocessor::new(pre, 1, &[], 3).with_logprobs(pre);
        let ids = pre.encode(" Paris").unwrap();
        let alt = pre.encode(" London").unwrap()[0];
        let step = p.push(EngineOutput {
            token_ids: vec![ids[0]],
            logprobs: Some(vec![TokenLogprob {
                logprob: -0.25,
                top: vec![(ids[0], -0.25), (alt, -2.0)],
            }]),
            ..Default::default()
        });
        let GenEvent::Logprobs { tokens, .. } = &step.events[0] else {
            panic!("{:?}", step.events)
        };
        assert_eq!(tokens[0].chosen.token, pre.decode(&[ids[0]]).unwrap());
        assert_eq!(tokens[0].chosen.bytes, tokens[0].chosen.token.as_bytes());
        assert_eq!(tokens[0].top[1].token, pre.decode(&[alt]).unwrap());
        assert_eq!(tokens[0].top[1].logprob, -2.0);
    }
}
