//! Tokenization by segments, cached: a rendered chat prompt is the same few pieces again and
//! again (the system prompt, a conversation's earlier turns), and the frontend spent most of
//! its per-request CPU tokenizing them afresh (15 % of it under load, profiled).
//!
//! A tokenizer splits its input on added tokens (`<|im_start|>`, `<|im_end|>`) before anything
//! else, and tokenizes the text between them piece by piece; for a byte-level BPE tokenizer
//! with no normalizer and no prefix space (GPT-2, Llama 3, Qwen, SmolLM) those pieces come
//! out the same whether tokenized together or alone. So the text between added tokens is
//! tokenized once and remembered, and a prompt's ids are its pieces' ids end to end.
//! [`SegmentCache::for_tokenizer`] enables this only for tokenizers of that kind (added tokens
//! without whitespace stripping or word boundaries); for any other the cache is off and the
//! tokenizer sees the whole text, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokenizers::Tokenizer;

/// Most segments remembered; past it the cache starts again empty (cheap, and bounded).
const CAPACITY: usize = 4096;
/// Longer segments are tokenized without being remembered.
const MAX_SEGMENT: usize = 64 * 1024;

pub struct SegmentCache {
    /// Added tokens' text and id, longest first (so that a token that is a prefix of
    /// another does not cut it).
    added: Vec<(String, u32)>,
    cache: Mutex<HashMap<String, Arc<[u32]>>>,
}

impl SegmentCache {
    /// The cache for `tokenizer`, when tokenizing by segments gives the same ids.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        let json = serde_json::to_value(tokenizer).ok()?;
        if !json["normalizer"].is_null() {
            return None;
        }
        let pre = json["pre_tokenizer"].to_string();
        if !pre.contains("\"ByteLevel\"") || pre.contains("\"add_prefix_space\":true") {
            return None;
        }
        let mut added = Vec::new();
        for t in json["added_tokens"].as_array()? {
            let flag = |k: &str| t[k].as_bool().unwrap_or(true);
            if flag("lstrip") || flag("rstrip") || flag("single_word") {
                return None;
            }
            added.push((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32));
        }
        added.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Some(Self {
            added,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The ids of `text`, from the cache where its segments have been seen.
    pub fn encode(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, tokenizers::Error> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match self.next_added(rest) {
                Some((at, len, id)) => {
                    self.segment(tokenizer, &rest[..at], &mut ids)?;
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.segment(tokenizer, rest, &mut ids)?;
                    break;
                }
            }
        }
        Ok(ids)
    }

    /// The first added token in `text`: (byte offset, length, id).
    fn next_added(&self, text: &str) -> Option<(usize, usize, u32)> {
        self.added
            .iter()
            .filter_map(|(s, id)| text.find(s.as_str()).map(|at| (at, s.len(), *id)))
            // Earliest; at one offset the longest (the list is longest first, min_by_key
            // keeps the first of equals).
            .min_by_key(|(at, _, _)| *at)
    }

    fn segment(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        ids: &mut Vec<u32>,
    ) -> Result<(), tokenizers::Error> {
        if text.is_empty() {
            return Ok(());
        }
        if let Some(hit) = self.lock().get(text) {
            ids.extend_from_slice(hit);
            return Ok(());
        }
        let enc = tokenizer.encode(text, false)?;
        ids.extend_from_slice(enc.get_ids());
        if text.len() <= MAX_SEGMENT {
            let mut cache = self.lock();
            if cache.len() >= CAPACITY {
                cache.clear();
            }
            cache.insert(text.to_string(), Arc::from(enc.get_ids()));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<[u32]>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_give_the_tokenizers_own_ids() {
        let m = crate::test_model::files();
        let tok = &m.tokenizer;
        let cache = SegmentCache::for_tokenizer(tok).unwrap_or_else(|| panic!("SmolLM2 qualifies"));
        let texts = [
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "plain text without any added token, 12345 digits and  spaces ",
            "<|im_end|><|im_end|>a<|im_start|>",
            "half a tag <|im_sta and a whole <|endoftext|> héllo 東京 🙂\n\n",
            "",
            "<repo_name>x<reponame>y",
        ];
        // Twice: the second time every segment comes from the cache.
        for _ in 0..2 {
            for t in texts {
                let want = tok
                    .encode(t, false)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .get_ids()
                    .to_vec();
                let got = cache.encode(tok, t).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, want, "{t:?}");
            }
        }
        assert!(cache.lock().len() >= 5);
    }

    #[test]
    fn random_mixes_of_text_and_added_tokens_match_the_tokenizer() {
        let m = crate::test_model::files();
        let tok = &m.tokenizer;
        let cache = SegmentCache::for_tokenizer(tok).unwrap_or_else(|| panic!("SmolLM2 qualifies"));
        let pieces = [
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<",
            "|",
            ">",
            "im_start",
            " ",
            "  ",
            "\n",
            "\n\n",
            "Hello",
            " world",
            "123",
            "4567",
            "é",
            "東京",
            "🙂",
            "\t",
            "assistant",
            "'s",
            " don't",
            "...",
            "<|im",
            "_end|>",
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..500 {
            let mut text = String::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for k in 0..(x % 12) {
                let i = ((x >> (k * 5)) % pieces.len() as u64) as usize;
                text.push_str(pieces[i]);
            }
            let want = tok
                .encode(text.as_str(), false)
                .unwrap_or_else(|e| panic!("{e}"))
                .get_ids()
                .to_vec();
            assert_eq!(
                cache.encode(tok, &text).unwrap_or_else(|e| panic!("{e}")),
                want,
                "{text:?}"
            );
        }
    }
}
