//! Grammars against the bundled model's real vocabulary: what they let through, where they
//! end, and which ones are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use tandem_sampling::Constraint;

fn model() -> &'static (Guides, Tokenizer) {
    static G: OnceLock<(Guides, Tokenizer)> = OnceLock::new();
    G.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let m = tandem_model::ModelFiles::load(&path)
            .unwrap_or_else(|e| panic!("{e}: run scripts/fetch-model.sh"));
        (
            Guides::new(m.tokenizer.clone(), m.prompt.eos_token_ids.clone()),
            m.tokenizer,
        )
    })
}

/// A tiny deterministic generator (xorshift), so that the walk below is the same each run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 10_000) as f32 / 1000.0
    }
}

/// Generates under `g` from random logits (the most likely allowed token each step) until an
/// end-of-sequence token; returns the text.
fn walk(g: &GuidedDecoding, seed: u64) -> String {
    let (guides, tok) = model();
    let eos = &guides.eos;
    let mut guide = guides.guide(g).unwrap();
    let vocab = tok.get_vocab_size(true);
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for _ in 0..400 {
        let mut logits: Vec<f32> = (0..vocab).map(|_| rng.next()).collect();
        guide.mask(&mut logits).unwrap();
        let next = tandem_sampling::argmax(&logits);
        assert!(logits[next as usize].is_finite(), "some token is allowed");
        if eos.contains(&next) {
            assert!(guide.is_finished() || !out.is_empty());
            return tok.decode(&out, false).unwrap();
        }
        guide.advance(next).unwrap();
        out.push(next);
    }
    panic!(
        "no end after 400 tokens: {:?}",
        tok.decode(&out, false).unwrap()
    );
}

#[test]
fn random_logits_under_a_schema_give_a_valid_document() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["cat", "dog"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
            "owner": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"],
                "additionalProperties": false
            }
        },
        "required": ["name", "kind", "age", "owner"],
        "additionalProperties": false
    });
    for seed in 1..=5 {
        let text = walk(&GuidedDecoding::JsonSchema(schema.clone()), seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 12, "{text}");
        assert!(
            ["cat", "dog"].contains(&v["kind"].as_str().unwrap()),
            "{text}"
        );
        assert!((0..=30).contains(&v["age"].as_i64().unwrap()), "{text}");
        assert!(v["owner"]["city"].is_string(), "{text}");
        assert!(!text.contains("\n"), "no free whitespace: {text}");
    }
}

#[test]
fn json_object_regex_choice_and_lark() {
    // Any object: every token allowed first starts one, and a whole one completes it.
    let (guides, tok) = model();
    let mut guide = guides.guide(&GuidedDecoding::JsonObject).unwrap();
    let mut logits = vec![0.0f32; tok.get_vocab_size(true)];
    guide.mask(&mut logits).unwrap();
    let allowed: Vec<u32> = (0..logits.len() as u32)
        .filter(|i| logits[*i as usize].is_finite())
        .collect();
    assert!(!allowed.is_empty());
    for id in allowed {
        assert!(tok.decode(&[id], false).unwrap().starts_with('{'), "{id}");
    }
    for id in tok
        .encode("{\"k\": [1, {\"x\": null}]}", false)
        .unwrap()
        .get_ids()
    {
        guide.advance(*id).unwrap();
    }
    assert!(guide.is_finished());
    let text = walk(&GuidedDecoding::Regex("[0-9]{3}-[a-z]{2}".into()), 3);
    assert_eq!(text.len(), 6, "{text}");
    assert!(text.as_bytes()[3] == b'-', "{text}");
    let choices = vec!["red".to_string(), "green \"light\"".to_string()];
    for seed in 1..5 {
        let text = walk(&GuidedDecoding::Choice(choices.clone()), seed);
        assert!(choices.contains(&text), "{text}");
    }
    let lark = r#"start: "yes" | "no" | "maybe " NUM
NUM: /[1-9]/"#;
    let text = walk(&GuidedDecoding::Grammar(lark.into()), 2);
    assert!(
        text == "yes" || text == "no" || (text.starts_with("maybe ") && text.len() == 7),
        "{text}"
    );
}

#[test]
fn a_document_written_out_is_accepted_and_then_only_eos_may_follow() {
    let (guides, tok) = model();
    let schema =
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let mut guide = guides.guide(&GuidedDecoding::JsonSchema(schema)).unwrap();
    for id in tok.encode("{\"a\": 42}", false).unwrap().get_ids() {
        guide.advance(*id).unwrap();
    }
    assert!(guide.is_finished());
    let mut logits = vec![0.0f32; tok.get_vocab_size(true)];
    guide.mask(&mut logits).unwrap();
    let allowed: Vec<u32> = (0..logits.len() as u32)
        .filter(|i| logits[*i as usize].is_finite())
        .collect();
    assert_eq!(allowed, guides.eos);
    // A token the grammar does not allow is refused.
    let mut guide = guides.guide(&GuidedDecoding::JsonObject).unwrap();
    let x = tok.encode("x", false).unwrap().get_ids()[0];
    assert!(guide.advance(x).is_err());
}

#[test]
fn bad_grammars_are_refused_with_a_reason() {
    let (guides, _) = model();
    for g in [
        GuidedDecoding::JsonSchema(json!({"type": "nonsense"})),
        GuidedDecoding::JsonSchema(json!("not a schema")),
        GuidedDecoding::JsonSchema(
            json!({"type": "object", "required": ["a"], "properties": {"a": false}}),
        ),
        GuidedDecoding::Regex("(unclosed".into()),
        GuidedDecoding::Grammar("start: ???".into()),
        GuidedDecoding::Choice(vec![]),
    ] {
        match guides.check(&g) {
            Err(GuideError::Invalid(msg)) => assert!(!msg.is_empty()),
            other => panic!("{g:?}: {other:?}"),
        }
    }
}
