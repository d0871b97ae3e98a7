//! Incremental detokenization.
//!
//! Byte-level BPE tokens can end in the middle of a UTF-8 character, and some tokenizers
//! change how a token reads depending on what precedes it. So each step decodes a short window
//! — from `prefix` (a few tokens back) to the end — and emits only what extends the text
//! already emitted from that window, and only once it no longer ends in U+FFFD (a character
//! still waiting for its remaining bytes).

use tokenizers::Tokenizer;

pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window that gives context to the next token.
    prefix: usize,
    /// Tokens before this have been emitted.
    read: usize,
}

impl<'a> IncrementalDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
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
        let before = self.decode(&self.ids[self.prefix..self.read]);
        let now = self.decode(&self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        now.strip_prefix(&before)
            .map(str::to_string)
            .unwrap_or_default()
    }
}
