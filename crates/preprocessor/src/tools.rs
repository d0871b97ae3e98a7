//! Tool calls in generated text: the parsers for the formats model families write, and how a
//! forced call (`tool_choice` `required` or a named function) is read back.
//!
//! With `tool_choice: "auto"` the model decides, and writes calls in its family's format;
//! which format is the worker's `--dyn-tool-call-parser` (Dynamo's flag), carried in the
//! model card:
//! - `hermes` (Hermes, Qwen2.5, Qwen3): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
//!   blocks, anywhere in the text, text around them being the answer;
//! - `llama3_json` (Llama 3.1+): the whole answer is one or more `{"name": …, "parameters":
//!   {…}}` objects (separated by `;`), after an optional `<|python_tag|>`;
//! - `mistral`: `[TOOL_CALLS]` followed by a JSON list of `{"name": …, "arguments": {…}}`.
//!
//! A [`ToolCallSplitter`] reads one choice's text as it streams: text that cannot be part of a
//! call goes out as content at once; a call goes out whole once its end is seen. Text that
//! looks like a call but does not parse is returned as content, never dropped.
//!
//! Forced calls are generated under a grammar (structured output), so their text is known
//! JSON: the named function's arguments object ([`ToolMode::Named`]), or a list of
//! `{"name", "parameters"}` objects ([`ToolMode::Required`], vLLM's shape), read by
//! [`parse_required`].

use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// A model family's tool-call format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallParser {
    Hermes,
    Llama3Json,
    Mistral,
}

impl ToolCallParser {
    /// The names `--dyn-tool-call-parser` accepts.
    pub const NAMES: [&'static str; 4] = ["hermes", "qwen", "llama3_json", "mistral"];
}

impl FromStr for ToolCallParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hermes" | "qwen" => Ok(Self::Hermes),
            "llama3_json" => Ok(Self::Llama3Json),
            "mistral" => Ok(Self::Mistral),
            other => Err(format!(
                "unknown tool-call parser {other:?}; known: {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for ToolCallParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
        })
    }
}

/// How a request's output is read for tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// The model may call tools, in its parser's format; more than one only if `parallel`
    /// (`parallel_tool_calls`, true by default).
    Auto {
        parser: ToolCallParser,
        parallel: bool,
    },
    /// The output is a JSON list of calls (at most one unless parallel calls are allowed).
    Required,
    /// The output is the named function's arguments.
    Named(String),
}

/// One call read from the text; `arguments` is JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// A piece of a choice's answer, in the order the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolPiece {
    Text(String),
    Call(ParsedCall),
}

/// What one piece of text settled: answer text and calls, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ToolSplit {
    pub pieces: Vec<ToolPiece>,
}

impl ToolSplit {
    fn text(&mut self, t: &str) {
        if t.is_empty() {
            return;
        }
        match self.pieces.last_mut() {
            Some(ToolPiece::Text(s)) => s.push_str(t),
            _ => self.pieces.push(ToolPiece::Text(t.to_string())),
        }
    }

    fn call(&mut self, c: ParsedCall) {
        self.pieces.push(ToolPiece::Call(c));
    }

    /// Appends `other`'s pieces.
    pub fn extend(&mut self, other: ToolSplit) {
        for p in other.pieces {
            match p {
                ToolPiece::Text(t) => self.text(&t),
                ToolPiece::Call(c) => self.call(c),
            }
        }
    }

    /// All the text, calls left out.
    pub fn content(&self) -> String {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                ToolPiece::Text(t) => Some(t.as_str()),
                ToolPiece::Call(_) => None,
            })
            .collect()
    }

    /// The calls, in order.
    pub fn calls(&self) -> Vec<ParsedCall> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                ToolPiece::Call(c) => Some(c.clone()),
                ToolPiece::Text(_) => None,
            })
            .collect()
    }
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_TAG: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

/// Splits one choice's streaming text into content and calls (`tool_choice: "auto"`).
pub struct ToolCallSplitter {
    parser: ToolCallParser,
    /// Text not yet settled: a possible tag start, an open call, or (whole-answer formats)
    /// everything so far once the answer looks like calls.
    held: String,
    inside: bool,
    /// Whole-answer formats: decided whether the answer is calls (Some(true)) or text.
    whole: Option<bool>,
}

impl ToolCallSplitter {
    pub fn new(parser: ToolCallParser) -> Self {
        Self {
            parser,
            held: String::new(),
            inside: false,
            whole: None,
        }
    }

    pub fn push(&mut self, text: &str) -> ToolSplit {
        self.held.push_str(text);
        match self.parser {
            ToolCallParser::Hermes => self.hermes(false),
            ToolCallParser::Llama3Json | ToolCallParser::Mistral => self.whole_answer(false),
        }
    }

    /// The choice ended: whatever is held is settled.
    pub fn finish(&mut self) -> ToolSplit {
        match self.parser {
            ToolCallParser::Hermes => self.hermes(true),
            ToolCallParser::Llama3Json | ToolCallParser::Mistral => self.whole_answer(true),
        }
    }

    fn hermes(&mut self, end: bool) -> ToolSplit {
        let mut out = ToolSplit::default();
        loop {
            if self.inside {
                let Some(at) = self.held.find(HERMES_CLOSE) else {
                    if end {
                        // Ended inside a call (a stop token before the closing tag).
                        let body = std::mem::take(&mut self.held);
                        call_or_text(&body, false, &mut out);
                        self.inside = false;
                    }
                    return out;
                };
                let body: String = self.held[..at].to_string();
                self.held.drain(..at + HERMES_CLOSE.len());
                self.inside = false;
                call_or_text(&body, true, &mut out);
                continue;
            }
            if let Some(at) = self.held.find(HERMES_OPEN) {
                out.text(&self.held[..at]);
                self.held.drain(..at + HERMES_OPEN.len());
                self.inside = true;
                continue;
            }
            let keep = if end {
                0
            } else {
                partial_tag_len(&self.held, HERMES_OPEN)
            };
            let cut = self.held.len() - keep;
            out.text(&self.held[..cut]);
            self.held.drain(..cut);
            return out;
        }
    }

    fn whole_answer(&mut self, end: bool) -> ToolSplit {
        let mut out = ToolSplit::default();
        if self.whole.is_none() {
            let start = self.held.trim_start();
            let (marker, opener) = match self.parser {
                ToolCallParser::Mistral => (MISTRAL_TAG, '['),
                _ => (PYTHON_TAG, '{'),
            };
            // Nothing yet, or a marker that may still be arriving: wait.
            if !end
                && (start.is_empty() || (start.len() < marker.len() && marker.starts_with(start)))
            {
                return out;
            }
            self.whole = Some(start.starts_with(marker) || start.starts_with(opener));
        }
        if self.whole == Some(false) {
            out.text(&std::mem::take(&mut self.held));
            return out;
        }
        if !end {
            return out;
        }
        let text = std::mem::take(&mut self.held);
        let calls = match self.parser {
            ToolCallParser::Mistral => mistral_calls(&text),
            _ => llama3_calls(&text),
        };
        match calls {
            Some(calls) if !calls.is_empty() => calls.into_iter().for_each(|c| out.call(c)),
            _ => out.text(&text),
        }
        out
    }
}

/// A Hermes call body: the call, or (malformed) the text as the model wrote it, tags
/// included (`closed`: the closing tag was there).
fn call_or_text(body: &str, closed: bool, out: &mut ToolSplit) {
    match call_object(body.trim()) {
        Some(call) => out.call(call),
        None => {
            out.text(HERMES_OPEN);
            out.text(body);
            if closed {
                out.text(HERMES_CLOSE);
            }
        }
    }
}

/// How much of the end of `text` is a proper prefix of `tag` (held back: it may become it).
fn partial_tag_len(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|n| text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// `{"name": …, "arguments"|"parameters": {…}}` → a call.
fn call_object(text: &str) -> Option<ParsedCall> {
    let v: Value = serde_json::from_str(text).ok()?;
    call_value(&v)
}

fn call_value(v: &Value) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    // Some models write the arguments as JSON text.
    let args = match args {
        Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
        other => other,
    };
    if !args.is_object() {
        return None;
    }
    Some(ParsedCall {
        name,
        arguments: serde_json::to_string(&args).ok()?,
    })
}

/// Llama 3: JSON objects separated by `;` (or whitespace), after an optional python tag.
fn llama3_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let body = text.trim_start();
    let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body);
    let mut calls = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = it.next()?.ok()?;
        calls.push(call_value(&v)?);
        rest = rest[it.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    Some(calls)
}

/// Mistral: `[TOOL_CALLS]` then a JSON list of calls.
fn mistral_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let body = text.trim_start();
    let body = body.strip_prefix(MISTRAL_TAG).unwrap_or(body).trim();
    let list: Vec<Value> = serde_json::from_str(body).ok()?;
    list.iter().map(call_value).collect()
}

/// The text of a `required` call: a JSON list of `{"name", "parameters"}`.
pub fn parse_required(text: &str) -> Option<Vec<ParsedCall>> {
    let list: Vec<Value> = serde_json::from_str(text.trim()).ok()?;
    list.iter().map(call_value).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a split holds, gathered.
    struct Gathered {
        content: String,
        calls: Vec<ParsedCall>,
        pieces: Vec<ToolPiece>,
    }

    /// Streams `text` in pieces of `step` bytes (on char boundaries) and gathers the split.
    fn run(parser: ToolCallParser, text: &str, step: usize) -> Gathered {
        let mut s = ToolCallSplitter::new(parser);
        let mut all = ToolSplit::default();
        let mut add = |p: ToolSplit| all.extend(p);
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            add(s.push(&text[i..j]));
            i = j;
        }
        add(s.finish());
        Gathered {
            content: all.content(),
            calls: all.calls(),
            pieces: all.pieces,
        }
    }

    fn call(name: &str, args: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    /// Hermes format as Qwen2.5-Instruct's chat template asks for it (each call on its own
    /// lines between the tags), two parallel calls after a sentence.
    const HERMES: &str = "Let me check both cities.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tōkyō\"}}\n</tool_call>";

    /// Llama 3.1's JSON-based tool calling, as its chat template asks for it.
    const LLAMA3: &str =
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"days\": 3}}";

    #[test]
    fn hermes_calls_are_read_from_any_split_of_the_text() {
        for step in [1, 2, 3, 7, 1000] {
            let s = run(ToolCallParser::Hermes, HERMES, step);
            assert_eq!(s.content.trim(), "Let me check both cities.", "step {step}");
            assert_eq!(
                s.calls,
                vec![
                    call("get_weather", r#"{"city":"Paris","unit":"celsius"}"#),
                    call("get_weather", r#"{"city":"Tōkyō"}"#),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn hermes_text_without_calls_and_malformed_calls_stay_text() {
        let plain = "A < b and <tool_ is not a tag";
        assert_eq!(run(ToolCallParser::Hermes, plain, 1).content, plain);
        let bad = "x<tool_call>{\"name\": oops}</tool_call>y";
        let s = run(ToolCallParser::Hermes, bad, 2);
        assert!(s.calls.is_empty());
        assert_eq!(s.content, bad, "returned as written");
        // Ended before the closing tag (a stop token): still a call.
        let open = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n";
        assert_eq!(
            run(ToolCallParser::Hermes, open, 4).calls,
            vec![call("f", "{}")]
        );
    }

    #[test]
    fn hermes_content_before_a_call_is_not_held_back_and_order_is_kept() {
        let mut s = ToolCallSplitter::new(ToolCallParser::Hermes);
        assert_eq!(s.push("Hello wor").content(), "Hello wor");
        assert_eq!(
            s.push("ld <tool").content(),
            "ld ",
            "a possible tag start waits"
        );
        let p = s.push("_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call> ok");
        assert_eq!(
            p.pieces,
            vec![
                ToolPiece::Call(call("f", r#"{"a":1}"#)),
                ToolPiece::Text(" ok".into())
            ],
            "text after a call comes after it"
        );
        let s = run(ToolCallParser::Hermes, HERMES, 3);
        assert!(matches!(&s.pieces[0], ToolPiece::Text(t) if t.starts_with("Let me")));
        assert!(matches!(s.pieces[1], ToolPiece::Call(_)));
    }

    #[test]
    fn llama3_json_calls_and_plain_answers() {
        for step in [1, 5, 1000] {
            let s = run(ToolCallParser::Llama3Json, LLAMA3, step);
            assert_eq!(
                s.calls,
                vec![call("get_weather", r#"{"city":"Paris","days":3}"#)]
            );
            assert!(s.content.is_empty());
        }
        let two = "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": [1]}}";
        assert_eq!(
            run(ToolCallParser::Llama3Json, two, 3).calls,
            vec![call("a", "{}"), call("b", r#"{"x":[1]}"#)]
        );
        let plain = "The weather in Paris is mild.";
        let s = run(ToolCallParser::Llama3Json, plain, 4);
        assert!(s.calls.is_empty());
        assert_eq!(s.content, plain);
        // Looks like JSON but is not a call: text.
        let s = run(ToolCallParser::Llama3Json, "{\"temperature\": 20}", 4);
        assert!(s.calls.is_empty());
        assert_eq!(s.content, "{\"temperature\": 20}");
    }

    #[test]
    fn mistral_calls() {
        let text = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"now\", \"arguments\": \"{}\"}]";
        let s = run(ToolCallParser::Mistral, text, 3);
        assert_eq!(
            s.calls,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("now", "{}")
            ]
        );
        let s = run(ToolCallParser::Mistral, "Sure, Paris.", 3);
        assert_eq!(s.content, "Sure, Paris.");
    }

    #[test]
    fn required_output_is_a_list_of_calls() {
        let text = r#"[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]"#;
        assert_eq!(
            parse_required(text).unwrap(),
            vec![call("f", r#"{"a":1}"#), call("g", "{}")]
        );
        assert!(parse_required("[{\"name\": \"f\", \"parameters\": {\"a\"").is_none());
        assert_eq!(
            "qwen".parse::<ToolCallParser>().unwrap(),
            ToolCallParser::Hermes
        );
        assert!("nope".parse::<ToolCallParser>().is_err());
    }
}
