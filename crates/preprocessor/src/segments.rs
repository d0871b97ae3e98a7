//! Tokenization by segments, cached: a rendered chat prompt is the same few pieces again and
//! again (the system prompt, a conversation's earlier turns), and the frontend spent most of
//! its per-request CPU tokenizing them afresh (15 % of it under load, profiled).
//!
//! A tokenizer splits its input on added tokens (`<|im_start|>`, `<|im_end|>`) before anything
//! else, and tokenizes the text between them piece by piece; for a byte-level BPE tokenizer
//! with no normalizer and no prefix space (GPT-2, Llama 3, Qwen, SmolLM) those pieces come
//! out the same whether tokenized together or alone. So the text between added tokens is
//! tokenized once and remembered, and a prompt's ids are its pieces' ids end to end. The
//! added tokens are found in one pass (Aho–Corasick); the cache is bounded by bytes, not by a
//! cap on a segment's length (a 10 000-word system prompt, ~75 KB, is exactly what it is for).
//! [`SegmentCache::for_tokenizer`] enables this only for tokenizers of that kind (added tokens
//! without whitespace stripping or word boundaries); for any other the cache is off and the
//! tokenizer sees the whole text, as before.

use aho_corasick::{AhoCorasick, MatchKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokenizers::Tokenizer;

/// Bytes the cache may hold (segment text, its ids and [`ENTRY_OVERHEAD`] each); past it the
/// cache starts again empty (cheap, and bounded). 64 MiB holds ~550 system prompts of 10 000
/// words (~120 KB each with their ids), or ~60 of a book's length.
const BUDGET: usize = 64 << 20;
/// What an entry costs beyond its text and ids: the table slot, the two allocations' headers
/// and rounding. Counted so that many short segments (every user turn is one) stay within
/// the budget too.
const ENTRY_OVERHEAD: usize = 96;

pub struct SegmentCache {
    /// Added tokens' ids, by pattern index of `finder`.
    ids: Vec<u32>,
    /// Finds the added tokens in one pass: leftmost match, and of those starting there the
    /// longest (so that a token that is a prefix of another does not cut it), as the
    /// tokenizer's own split does.
    finder: AhoCorasick,
    cache: Mutex<Segments>,
    /// [`BUDGET`]; a segment costing more than a sixteenth of it is tokenized without being
    /// remembered, so that one huge document cannot empty the cache for everyone else.
    budget: usize,
}

#[derive(Default)]
struct Segments {
    map: HashMap<String, Arc<[u32]>>,
    /// Bytes of text and ids in `map`.
    bytes: usize,
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
        let (mut texts, mut ids) = (Vec::new(), Vec::new());
        let tokens = json["added_tokens"].as_array()?;
        // The tokenizer matches tokens with `normalized: false` first and the others in the
        // gaps left; one pass over all of them finds the same only when they are all alike.
        let normalized = |t: &serde_json::Value| t["normalized"].as_bool();
        if tokens
            .windows(2)
            .any(|w| normalized(&w[0]) != normalized(&w[1]))
        {
            return None;
        }
        for t in tokens {
            let flag = |k: &str| t[k].as_bool().unwrap_or(true);
            if flag("lstrip") || flag("rstrip") || flag("single_word") {
                return None;
            }
            texts.push(t["content"].as_str()?.to_string());
            ids.push(t["id"].as_u64()? as u32);
        }
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .ok()?;
        Some(Self {
            ids,
            finder,
            cache: Mutex::new(Segments::default()),
            budget: BUDGET,
        })
    }

    /// The ids of `text`, from the cache where its segments have been seen.
    pub fn encode(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, tokenizers::Error> {
        let mut ids = Vec::new();
        let mut from = 0;
        for m in self.finder.find_iter(text) {
            self.segment(tokenizer, &text[from..m.start()], &mut ids)?;
            ids.push(self.ids[m.pattern().as_usize()]);
            from = m.end();
        }
        self.segment(tokenizer, &text[from..], &mut ids)?;
        Ok(ids)
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
        if let Some(hit) = self.lock().map.get(text) {
            ids.extend_from_slice(hit);
            return Ok(());
        }
        let enc = tokenizer.encode(text, false)?;
        let got = enc.get_ids();
        ids.extend_from_slice(got);
        let cost = ENTRY_OVERHEAD + text.len() + std::mem::size_of_val(got);
        if cost <= self.budget / 16 {
            let mut cache = self.lock();
            // Freed after the lock is let go: a full cache is many small entries.
            let old = (cache.bytes + cost > self.budget).then(|| std::mem::take(&mut *cache));
            if cache.map.insert(text.to_string(), Arc::from(got)).is_none() {
                cache.bytes += cost;
            }
            drop(cache);
            drop(old);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Segments> {
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
        assert!(cache.lock().map.len() >= 5);
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

    #[test]
    fn long_segments_are_remembered_within_the_budget() {
        let m = crate::test_model::files();
        let tok = &m.tokenizer;
        let mut cache =
            SegmentCache::for_tokenizer(tok).unwrap_or_else(|| panic!("SmolLM2 qualifies"));
        // A system prompt of 10 000 words, ~75 KB: the router benchmark's size, which a
        // 64 KiB cap on segments used to leave uncached (12 ms of tokenizing per request).
        let words = [
            "orchard", "canvas", "thunder", "marble", "whisper", "garden",
        ];
        let long: String = (0..10_000)
            .map(|i| words[(i * 7 + i / 3) % 6])
            .collect::<Vec<_>>()
            .join(" ");
        let prompt = |s: &str| {
            format!("<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
        };
        let text = prompt(&long);
        let want = tok
            .encode(text.as_str(), false)
            .unwrap_or_else(|e| panic!("{e}"))
            .get_ids()
            .to_vec();
        for _ in 0..2 {
            assert_eq!(
                cache.encode(tok, &text).unwrap_or_else(|e| panic!("{e}")),
                want
            );
        }
        let key = format!("system\n{long}");
        let alone = tok
            .encode(key.as_str(), false)
            .unwrap_or_else(|e| panic!("{e}"));
        let held = cache.lock().map.get(&key).map(|ids| ids.to_vec());
        assert_eq!(
            held.as_deref(),
            Some(alone.get_ids()),
            "the long segment is in the cache"
        );
        let bytes = cache.lock().bytes;
        assert!(bytes > key.len(), "{bytes}");

        // A segment costing over a sixteenth of the budget is not kept (and evicts nothing).
        let check = |cache: &SegmentCache, text: &str| {
            let want = tok.encode(text, false).unwrap_or_else(|e| panic!("{e}"));
            let got = cache.encode(tok, text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, want.get_ids());
        };
        cache.budget = bytes + bytes / 32;
        let half = format!("system\n{}", &long[..long.len() / 2]);
        check(&cache, &prompt(&long[..long.len() / 2]));
        assert!(!cache.lock().map.contains_key(&half));
        assert!(cache.lock().map.contains_key(&key));
        // One that fits the share but not what is left: the cache starts again with it.
        let small = format!("system\n{}", &long[..long.len() / 20]);
        check(&cache, &prompt(&long[..long.len() / 20]));
        assert!(
            !cache.lock().map.contains_key(&key),
            "the cache started again"
        );
        assert!(cache.lock().map.contains_key(&small));
        assert!(cache.lock().bytes <= cache.budget);
    }
}
