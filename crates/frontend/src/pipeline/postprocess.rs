//! Stage 4, `postprocess`: engine outputs → text per choice.
//!
//! Each choice has its own incremental detokenizer (never splits a UTF-8 character) and stop
//! matcher (holds back text that may still become a stop string). A choice ends with the
//! engine's finish reason, or with `stop` when one of its stop strings appears; in that case
//! [`Step::stop_choice`] asks the caller to stop the choice on the worker too, since the engine
//! cannot see stop strings and would otherwise go on generating it until every choice ends.
//! Pure: unit-tested without NATS.

use tandem_preprocessor::Preprocessor;
use tandem_preprocessor::detokenize::IncrementalDecoder;
use tandem_preprocessor::reasoning::{ReasoningParser, ReasoningSplitter};
use tandem_preprocessor::stop::StopMatcher;
use tandem_protocols::llm::EngineOutput;
use tandem_protocols::openai::{PromptTokensDetails, Usage};

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
    finished: bool,
}

pub struct Postprocessor<'a> {
    choices: Vec<Choice<'a>>,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: Option<u32>,
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
                    finished: false,
                })
                .collect(),
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: 0,
            cached_tokens: None,
        }
    }

    /// Takes one engine output. Outputs of unknown or finished choices are ignored (a stopped
    /// choice's last tokens may still be on their way).
    pub fn push(&mut self, out: EngineOutput) -> Step {
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
        if !thought.is_empty() {
            step.events.push(GenEvent::Reasoning {
                index,
                text: thought,
            });
        }
        if !text.is_empty() {
            step.events.push(GenEvent::Text { index, text });
        }
        if let Some(reason) = reason {
            c.finished = true;
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
                    GenEvent::Reasoning { .. } | GenEvent::Usage(_) => {}
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
                    GenEvent::Finish { .. } | GenEvent::Usage(_) => {}
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
}
