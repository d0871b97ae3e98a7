//! The bytes each token stands for, as logprobs report them (`bytes`, and `token` as their
//! text): a byte-level BPE token (GPT-2, Llama 3, Qwen, SmolLM) may hold part of a UTF-8
//! character, which no decoded string can show, so the bytes come from the vocabulary itself.
//!
//! Byte-level vocabularies spell each byte as one printable character (GPT-2's table: the
//! printable Latin-1 bytes stand for themselves, the others for U+0100 onwards, in order);
//! SentencePiece vocabularies spell a space as `▁` and raw bytes as `<0xHH>`. Added tokens
//! (`<|im_end|>`) are their own text.

use std::collections::HashMap;
use tokenizers::Tokenizer;

/// Bytes of every token id, built once from the tokenizer.
pub struct TokenBytes {
    table: Vec<Vec<u8>>,
    /// Special added tokens: what decoding with `skip_special_tokens` leaves out.
    special: Vec<bool>,
    /// The tokenizer's decoder is byte-level alone, so decoding ids is exactly joining their
    /// bytes (special tokens left out) and reading them as UTF-8.
    decodes_as_bytes: bool,
}

/// GPT-2's byte ↔ character table, character → byte.
fn byte_level_chars() -> HashMap<char, u8> {
    let mut map = HashMap::new();
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
        && hex.len() == 2
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

impl TokenBytes {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let decoder = serde_json::to_value(tokenizer.get_decoder()).unwrap_or_default();
        let byte_level = decoder.to_string().contains("\"ByteLevel\"");
        let decodes_as_bytes = decoder["type"] == "ByteLevel";
        let chars = byte_level.then(byte_level_chars);
        let added: HashMap<u32, (String, bool)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, (t.content, t.special)))
            .collect();
        let n = tokenizer.get_vocab_size(true) as u32;
        let special = (0..n)
            .map(|id| added.get(&id).is_some_and(|(_, s)| *s))
            .collect();
        let table = (0..n)
            .map(|id| {
                if let Some((text, _)) = added.get(&id) {
                    return text.clone().into_bytes();
                }
                let Some(piece) = tokenizer.id_to_token(id) else {
                    return Vec::new();
                };
                match &chars {
                    // A character outside the table is itself (never in a byte-level vocabulary).
                    Some(map) => piece
                        .chars()
                        .flat_map(|c| match map.get(&c) {
                            Some(b) => vec![*b],
                            None => c.to_string().into_bytes(),
                        })
                        .collect(),
                    None => sentencepiece_bytes(&piece),
                }
            })
            .collect();
        Self {
            table,
            special,
            decodes_as_bytes,
        }
    }

    /// Whether decoding is joining bytes ([`TokenBytes::push_decoded`] then gives the
    /// tokenizer's own text).
    pub fn decodes_as_bytes(&self) -> bool {
        self.decodes_as_bytes
    }

    /// Appends what `id` adds to a decoded text (nothing for a special token).
    pub fn push_decoded(&self, id: u32, out: &mut Vec<u8>) {
        if !self.special.get(id as usize).copied().unwrap_or(false) {
            out.extend_from_slice(self.get(id));
        }
    }

    /// The bytes of token `id`; empty for an id the vocabulary does not have.
    pub fn get(&self, id: u32) -> &[u8] {
        self.table.get(id as usize).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_join_into_the_text_even_mid_character() {
        let m = crate::test_model::files();
        let tb = TokenBytes::new(&m.tokenizer);
        for text in ["The capital of France is Paris.", "héllo wörld ✓ 東京 🙂"] {
            let ids = m
                .tokenizer
                .encode(text, false)
                .unwrap_or_else(|e| panic!("{e}"));
            let bytes: Vec<u8> = ids
                .get_ids()
                .iter()
                .flat_map(|id| tb.get(*id).to_vec())
                .collect();
            assert_eq!(String::from_utf8(bytes).ok().as_deref(), Some(text));
        }
        let eos = m.prompt.eos_token_ids[0];
        assert_eq!(
            tb.get(eos),
            m.tokenizer.id_to_token(eos).unwrap_or_default().as_bytes()
        );
        assert!(tb.get(u32::MAX).is_empty());
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_bytes("\u{2581}Paris"), b" Paris");
    }
}
