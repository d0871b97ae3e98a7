//! Incremental detokenization.
//!
//! Byte-level BPE tokens can end in the middle of a UTF-8 character, and some tokenizers
//! change how a token reads depending on what precedes it. So each step decodes a short window
//! — from `prefix` (a few tokens back) to the end — and emits only what extends the text
//! already emitted from that window, and only once it no longer ends in U+FFFD (a character
//! still waiting for its remaining bytes).
//!
//! When the tokenizer's decoder is byte-level alone (GPT-2, Llama 3, Qwen, SmolLM), decoding
//! is only joining the tokens' bytes, so the decoder keeps the bytes not yet emitted and emits
//! each step the complete UTF-8 characters among them: no decode call per token, which was
//! the frontend's largest cost per streamed token. Invalid bytes read as U+FFFD, as the
//! tokenizer's lossy decode reads them.

use crate::token_bytes::TokenBytes;
use tokenizers::Tokenizer;

pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// The vocabulary's bytes, when decoding is joining them.
    bytes: Option<&'a TokenBytes>,
    /// Byte path: bytes not yet emitted (at most an incomplete character between steps).
    pending: Vec<u8>,
    ids: Vec<u32>,
    /// Start of the window that gives context to the next token.
    prefix: usize,
    /// Tokens before this have been emitted.
    read: usize,
}

impl<'a> IncrementalDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, bytes: Option<&'a TokenBytes>) -> Self {
        Self {
            tokenizer,
            bytes,
            pending: Vec::new(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Adds tokens; returns the text they complete (possibly empty).
    pub fn push(&mut self, new: &[u32]) -> String {
        if let Some(bytes) = self.bytes {
            for &id in new {
                bytes.push_decoded(id, &mut self.pending);
            }
            return self.take_complete(false);
        }
        self.ids.extend_from_slice(new);
        let before = self.decode(&self.ids[self.prefix..self.read]);
        let now = self.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let delta = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back at the end of the stream (an incomplete character is
    /// emitted as U+FFFD rather than dropped).
    pub fn finish(&mut self) -> String {
        if self.bytes.is_some() {
            return self.take_complete(true);
        }
        let before = self.decode(&self.ids[self.prefix..self.read]);
        let now = self.decode(&self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        now.strip_prefix(&before)
            .map(str::to_string)
            .unwrap_or_default()
    }

    /// Byte path: the pending bytes up to the last complete character as text (an invalid
    /// sequence as U+FFFD); at the `end`, an incomplete last character too, as U+FFFD.
    fn take_complete(&mut self, end: bool) -> String {
        let mut out = String::new();
        let mut at = 0;
        while at < self.pending.len() {
            match std::str::from_utf8(&self.pending[at..]) {
                Ok(s) => {
                    out.push_str(s);
                    at = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[at..at + valid]).unwrap_or(""));
                    at += valid;
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            at += n;
                        }
                        None if end => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            at = self.pending.len();
                        }
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..at);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Streams `ids` through both decoders in random-sized steps.
    fn both(
        m: &tandem_model::ModelFiles,
        tb: &TokenBytes,
        ids: &[u32],
        seed: u64,
    ) -> (Vec<String>, Vec<String>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut fast = IncrementalDecoder::new(&m.tokenizer, Some(tb));
        let mut slow = IncrementalDecoder::new(&m.tokenizer, None);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < ids.len() {
            let n = rng.random_range(1..=3).min(ids.len() - i);
            a.push(fast.push(&ids[i..i + n]));
            b.push(slow.push(&ids[i..i + n]));
            i += n;
        }
        a.push(fast.finish());
        b.push(slow.finish());
        (a, b)
    }

    #[test]
    fn joining_bytes_gives_the_tokenizers_text() {
        let m = crate::test_model::files();
        let tb = TokenBytes::new(&m.tokenizer);
        assert!(tb.decodes_as_bytes(), "SmolLM2's decoder is byte-level");
        let texts = [
            "The capital of France is Paris.",
            "héllo wörld ✓ 東京 🙂 — «quotes» and\ttabs\n\nnew lines",
            "<|im_start|>assistant\nSpecial tokens are skipped<|im_end|>",
        ];
        for (k, text) in texts.iter().enumerate() {
            let ids = m
                .tokenizer
                .encode(*text, false)
                .unwrap_or_else(|e| panic!("{e}"));
            let ids = ids.get_ids();
            let whole = m
                .tokenizer
                .decode(ids, true)
                .unwrap_or_else(|e| panic!("{e}"));
            let (fast, slow) = both(m, &tb, ids, k as u64);
            assert_eq!(fast.concat(), whole, "{text}");
            assert_eq!(slow.concat(), whole, "{text}");
            assert!(fast.iter().all(|c| !c.contains('\u{FFFD}')), "{fast:?}");
        }
        // Random ids: partial characters, stray continuation bytes, special tokens. Both
        // paths agree on the text (the byte path may emit a character a step earlier).
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let vocab = m.tokenizer.get_vocab_size(true) as u32;
        for seed in 0..200 {
            let ids: Vec<u32> = (0..rng.random_range(1..40))
                .map(|_| rng.random_range(0..vocab))
                .collect();
            let whole = m
                .tokenizer
                .decode(&ids, true)
                .unwrap_or_else(|e| panic!("{e}"));
            let (fast, slow) = both(m, &tb, &ids, seed);
            assert_eq!(fast.concat(), whole, "{ids:?}");
            assert_eq!(slow.concat(), whole, "{ids:?}");
        }
        // A character split across tokens waits for its last byte.
        let cat = "🙂".as_bytes();
        let byte_ids: Vec<u32> = cat
            .iter()
            .map(|b| {
                (0..vocab)
                    .find(|id| tb.get(*id) == [*b])
                    .unwrap_or_else(|| panic!("no token for byte {b:#x}"))
            })
            .collect();
        let mut d = IncrementalDecoder::new(&m.tokenizer, Some(&tb));
        assert_eq!(d.push(&byte_ids[..2]), "");
        assert_eq!(d.push(&byte_ids[2..]), "🙂");
        assert_eq!(d.push(&byte_ids[..1]), "");
        assert_eq!(d.finish(), "\u{FFFD}", "an unfinished character at the end");
    }
}
