//! Token logprobs in OpenAI's two shapes: chat's `logprobs.content` (token, logprob, bytes,
//! top_logprobs per token) and completions' legacy columns (`tokens`, `token_logprobs`,
//! `top_logprobs` as token → logprob maps, `text_offset`).

use crate::pipeline::TokenLogprobs;
use std::collections::BTreeMap;
use tandem_protocols::openai::{ChatLogprobToken, ChatLogprobs, CompletionLogprobs, TopLogprob};

pub fn chat(tokens: Vec<TokenLogprobs>) -> ChatLogprobs {
    ChatLogprobs {
        content: Some(
            tokens
                .into_iter()
                .map(|t| ChatLogprobToken {
                    token: t.chosen.token,
                    logprob: t.chosen.logprob,
                    bytes: Some(t.chosen.bytes),
                    top_logprobs: t
                        .top
                        .into_iter()
                        .map(|a| TopLogprob {
                            token: a.token,
                            logprob: a.logprob,
                            bytes: Some(a.bytes),
                        })
                        .collect(),
                })
                .collect(),
        ),
        refusal: None,
    }
}

/// `offset`: where the first token starts in the choice's text, in bytes (a token may hold
/// part of a character, so characters would not add up); moved past them.
pub fn completion(tokens: Vec<TokenLogprobs>, offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        out.text_offset.push(*offset);
        *offset += t.chosen.bytes.len();
        out.token_logprobs.push(t.chosen.logprob);
        out.tokens.push(t.chosen.token);
        let top: BTreeMap<String, f32> = t.top.into_iter().map(|a| (a.token, a.logprob)).collect();
        out.top_logprobs.push(top);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::postprocess::TokenText;

    fn tok(token: &str, logprob: f32) -> TokenText {
        TokenText {
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob,
        }
    }

    #[test]
    fn both_shapes() {
        let tokens = vec![
            TokenLogprobs {
                chosen: tok("Hel", -0.5),
                top: vec![tok("Hel", -0.5), tok("Hi", -1.5)],
            },
            TokenLogprobs {
                chosen: tok("lo", -0.1),
                top: vec![],
            },
        ];
        let c = chat(tokens.clone());
        let content = c.content.unwrap();
        assert_eq!(content[0].token, "Hel");
        assert_eq!(content[0].bytes.as_deref(), Some(&b"Hel"[..]));
        assert_eq!(content[0].top_logprobs[1].token, "Hi");
        let mut offset = 3;
        let l = completion(tokens, &mut offset);
        assert_eq!(l.tokens, ["Hel", "lo"]);
        assert_eq!(l.token_logprobs, [-0.5, -0.1]);
        assert_eq!(l.text_offset, [3, 6]);
        assert_eq!(offset, 8);
        assert_eq!(l.top_logprobs[0]["Hi"], -1.5);
    }
}
