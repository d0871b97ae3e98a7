//! Reasoning parsers: a reasoning model's thinking, split from its answer.
//!
//! Models such as Qwen3 and DeepSeek-R1 write their thinking between `<think>` and `</think>`
//! before the answer. A [`ReasoningSplitter`] takes a choice's detokenized text as it streams
//! and says which part is reasoning (OpenAI-compatible servers return it as
//! `reasoning_content`) and which is the answer (`content`). Tags split across two pieces of
//! text are held back until they can be told apart from ordinary text, so no piece ever shows
//! half a tag. Which models use which convention is the worker's `--dyn-reasoning-parser`, as
//! in Dynamo; the name travels in the model card.

use std::fmt;
use std::str::FromStr;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// How a model marks its reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    /// Reasoning only between explicit `<think>` and `</think>` (Qwen3, and the generic case).
    ThinkTags,
    /// The prompt template has already opened the reasoning: everything up to `</think>` is
    /// reasoning, with or without a `<think>` in the output (DeepSeek-R1).
    StartsInside,
}

impl ReasoningParser {
    /// The names `--dyn-reasoning-parser` accepts.
    pub const NAMES: [&'static str; 4] = ["basic", "qwen3", "deepseek_r1", "deepseek-r1"];

    /// How to split output a grammar (structured output, a forced tool call) shaped from
    /// its first token: reasoning only between tags the grammar wrote, since no template
    /// opened it.
    pub fn under_grammar(self) -> Self {
        Self::ThinkTags
    }
}

impl FromStr for ReasoningParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "basic" | "qwen3" => Ok(Self::ThinkTags),
            "deepseek_r1" | "deepseek-r1" => Ok(Self::StartsInside),
            other => Err(format!(
                "unknown reasoning parser {other:?}; known: {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for ReasoningParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ThinkTags => "basic",
            Self::StartsInside => "deepseek_r1",
        })
    }
}

/// One piece of a choice's text, split.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

/// Splits one choice's streaming text.
pub struct ReasoningSplitter {
    inside: bool,
    /// Text that may be the start of a tag.
    held: String,
    /// Only the first `<think>` opens reasoning (an answer may quote the tag).
    opened_once: bool,
    /// The reasoning just closed: the newlines models write before the answer are dropped.
    after_close: bool,
}

impl ReasoningSplitter {
    pub fn new(parser: ReasoningParser) -> Self {
        Self {
            inside: parser == ReasoningParser::StartsInside,
            held: String::new(),
            opened_once: parser == ReasoningParser::StartsInside,
            after_close: false,
        }
    }

    /// Takes the next piece of text.
    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        let mut rest = std::mem::take(&mut self.held);
        rest.push_str(text);
        loop {
            let tag = if self.inside {
                CLOSE
            } else if self.opened_once {
                // After the reasoning ended, everything is answer.
                if self.after_close {
                    rest = rest.trim_start_matches('\n').to_string();
                    self.after_close = rest.is_empty();
                }
                out.content.push_str(&rest);
                return out;
            } else {
                OPEN
            };
            match rest.find(tag) {
                Some(at) => {
                    self.emit(&mut out, &rest[..at]);
                    rest = rest[at + tag.len()..].to_string();
                    if self.inside {
                        self.inside = false;
                        self.after_close = true;
                    } else {
                        self.inside = true;
                        self.opened_once = true;
                    }
                }
                None => {
                    // Hold back a suffix that could still become the tag.
                    let keep = partial_suffix(&rest, tag);
                    let (now, later) = rest.split_at(rest.len() - keep);
                    self.emit(&mut out, now);
                    self.held = later.to_string();
                    return out;
                }
            }
        }
    }

    /// The end of the choice: whatever was held back is what it looked like.
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        let held = std::mem::take(&mut self.held);
        self.emit(&mut out, &held);
        out
    }

    fn emit(&self, out: &mut Split, text: &str) {
        if self.inside {
            out.reasoning.push_str(text);
        } else {
            out.content.push_str(text);
        }
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| {
            text.len() >= n
                && text.is_char_boundary(text.len() - n)
                && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns (reasoning, content) as a client would reassemble them.
    fn run(parser: ReasoningParser, pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new(parser);
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let out = s.push(p);
            r.push_str(&out.reasoning);
            c.push_str(&out.content);
        }
        let out = s.finish();
        r.push_str(&out.reasoning);
        c.push_str(&out.content);
        (r, c)
    }

    /// A Qwen3 answer as it streamed from the model, token by token.
    const QWEN3: &[&str] = &[
        "<",
        "think",
        ">\n",
        "The user",
        " asks for",
        " 2+2.",
        " That is 4",
        ".\n",
        "</",
        "think",
        ">\n\n",
        "2 + 2",
        " = ",
        "4",
        ".",
    ];

    #[test]
    fn a_recorded_qwen3_answer_splits_at_its_tags_whatever_the_pieces() {
        let (r, c) = run(ReasoningParser::ThinkTags, QWEN3);
        assert_eq!(r, "\nThe user asks for 2+2. That is 4.\n");
        assert_eq!(c, "2 + 2 = 4.");
        // The same text in one piece, and character by character.
        let whole: String = QWEN3.concat();
        assert_eq!(
            run(ReasoningParser::ThinkTags, &[&whole]),
            (r.clone(), c.clone())
        );
        let chars: Vec<String> = whole.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(ReasoningParser::ThinkTags, &chars), (r, c));
    }

    #[test]
    fn deepseek_r1_reasons_from_the_first_token_until_its_closing_tag() {
        let (r, c) = run(
            ReasoningParser::StartsInside,
            &["Okay, so", " the question", "</thi", "nk>\n\nParis", "."],
        );
        assert_eq!(r, "Okay, so the question");
        assert_eq!(c, "Paris.");
    }

    #[test]
    fn text_without_tags_is_all_answer_and_lookalikes_are_not_swallowed() {
        assert_eq!(
            run(ReasoningParser::ThinkTags, &["a < b", " and <thin", "g>"]),
            (String::new(), "a < b and <thing>".into())
        );
        // Cut off inside the reasoning: what came is reasoning, nothing is lost.
        assert_eq!(
            run(
                ReasoningParser::ThinkTags,
                &["<think>half a thou", "ght </thi"]
            ),
            ("half a thought </thi".into(), String::new())
        );
        // A second <think> in the answer is answer.
        assert_eq!(
            run(ReasoningParser::ThinkTags, &["<think>r</think>x <think>y"]),
            ("r".into(), "x <think>y".into())
        );
    }

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        assert_eq!("qwen3".parse(), Ok(ReasoningParser::ThinkTags));
        assert_eq!("deepseek_r1".parse(), Ok(ReasoningParser::StartsInside));
        assert!(
            "gpt"
                .parse::<ReasoningParser>()
                .unwrap_err()
                .contains("known")
        );
    }
}
