//! Choosing the next token from a row of logits, per request.
//!
//! Order of operations (as vLLM applies them): repetition penalty over prompt and output
//! tokens, then OpenAI's frequency and presence penalties over output tokens; with no
//! temperature (or 0) the highest logit wins; otherwise logits are divided by the temperature,
//! turned into probabilities, cut by top-k, top-p and min-p, renormalised and sampled with the
//! request's own random generator, so the same seed gives the same tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use tandem_protocols::llm::SamplingOptions;

pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
    /// Output tokens so far and how often each occurred.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// `stream` distinguishes the choices of one request (`n` > 1) that share a seed.
    pub fn new(opts: SamplingOptions, stream: u64) -> Self {
        let rng = match opts.seed {
            Some(seed) => {
                StdRng::seed_from_u64(seed.wrapping_add(stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            }
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Self {
            opts,
            rng,
            counts: HashMap::new(),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.opts.temperature.is_none_or(|t| t <= 0.0)
    }

    /// Records a generated token (penalties count output tokens).
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Continues after `token`, which another sampler with the same options picked (a prefill
    /// worker's first token): counted for penalties, and the random stream moved past the
    /// draw that picked it, so that a seeded request samples what it would have in one piece.
    pub fn resume_after(&mut self, token: u32) {
        self.observe(token);
        if !self.is_greedy() {
            let _: f32 = self.rng.random();
        }
    }

    /// Picks the next token. `prompt` feeds the repetition penalty; `logits` is modified.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32]) -> u32 {
        self.apply_penalties(logits, prompt);
        if self.is_greedy() {
            return argmax(logits);
        }
        let t = self.opts.temperature.unwrap_or(1.0);
        let mut probs = softmax(logits, t);
        self.filter(&mut probs);
        let total: f32 = probs.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return argmax(logits);
        }
        let mut x = self.rng.random::<f32>() * total;
        let mut last = 0;
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                last = i;
                if x < *p {
                    return i as u32;
                }
                x -= p;
            }
        }
        last as u32
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32]) {
        if let Some(r) = self
            .opts
            .repetition_penalty
            .filter(|r| *r != 1.0 && *r > 0.0)
        {
            let seen = prompt.iter().copied().chain(self.counts.keys().copied());
            let mut done = std::collections::HashSet::new();
            for t in seen {
                if done.insert(t)
                    && let Some(l) = logits.get_mut(t as usize)
                {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        let freq = self.opts.frequency_penalty.unwrap_or(0.0);
        let pres = self.opts.presence_penalty.unwrap_or(0.0);
        if freq != 0.0 || pres != 0.0 {
            for (t, c) in &self.counts {
                if let Some(l) = logits.get_mut(*t as usize) {
                    *l -= freq * *c as f32 + pres;
                }
            }
        }
    }

    /// Zeroes probabilities outside top-k, top-p and min-p.
    fn filter(&self, probs: &mut [f32]) {
        let top_k = self.opts.top_k.filter(|k| *k > 0).map(|k| k as usize);
        let top_p = self.opts.top_p.filter(|p| *p < 1.0);
        if top_k.is_some() || top_p.is_some() {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_unstable_by(|a, b| probs[*b].total_cmp(&probs[*a]));
            let mut keep = top_k.unwrap_or(probs.len()).min(probs.len());
            if let Some(p) = top_p {
                let mut acc = 0.0;
                for (rank, i) in order.iter().enumerate().take(keep) {
                    acc += probs[*i];
                    if acc >= p {
                        keep = rank + 1;
                        break;
                    }
                }
            }
            for i in &order[keep..] {
                probs[*i] = 0.0;
            }
        }
        if let Some(min_p) = self.opts.min_p.filter(|m| *m > 0.0) {
            let max = probs.iter().copied().fold(0.0f32, f32::max);
            for p in probs.iter_mut() {
                if *p < min_p * max {
                    *p = 0.0;
                }
            }
        }
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<f32> = logits
        .iter()
        .map(|l| ((l - max) / temperature).exp())
        .collect();
    let sum: f32 = out.iter().sum();
    if sum > 0.0 {
        for p in &mut out {
            *p /= sum;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SamplingOptions {
        SamplingOptions {
            n: 1,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_highest_logit_after_penalties() {
        let mut s = Sampler::new(opts(), 0);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[]), 1);
        let mut s = Sampler::new(
            SamplingOptions {
                repetition_penalty: Some(1.2),
                ..opts()
            },
            0,
        );
        assert_eq!(
            s.sample(&mut [0.1, 3.0, 2.9], &[1]),
            2,
            "token 1 was in the prompt"
        );
        let mut s = Sampler::new(
            SamplingOptions {
                frequency_penalty: Some(0.5),
                ..opts()
            },
            0,
        );
        s.observe(1);
        assert_eq!(
            s.sample(&mut [0.1, 3.0, 2.9], &[]),
            2,
            "token 1 was generated before"
        );
        let mut s = Sampler::new(
            SamplingOptions {
                presence_penalty: Some(-1.0),
                ..opts()
            },
            0,
        );
        s.observe(0);
        assert_eq!(
            s.sample(&mut [2.5, 3.0, 2.9], &[]),
            0,
            "a negative presence penalty favours it"
        );
    }

    #[test]
    fn same_seed_same_tokens_and_streams_differ() {
        let o = SamplingOptions {
            temperature: Some(1.0),
            seed: Some(42),
            ..opts()
        };
        let logits = [1.0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let run = |stream| {
            let mut s = Sampler::new(o.clone(), stream);
            (0..32)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(0), run(0));
        assert_ne!(run(0), run(1));
    }

    #[test]
    fn a_sampler_resumed_after_the_first_token_continues_the_same_sequence() {
        let o = SamplingOptions {
            temperature: Some(1.0),
            seed: Some(7),
            frequency_penalty: Some(0.3),
            ..opts()
        };
        let logits = [1.0f32, 1.2, 0.8, 1.1, 0.9, 1.0, 1.3, 0.7];
        // One piece: the sampler sees its own tokens.
        let mut whole = Sampler::new(o.clone(), 0);
        let all: Vec<u32> = (0..16)
            .map(|_| {
                let t = whole.sample(&mut logits.clone(), &[]);
                whole.observe(t);
                t
            })
            .collect();
        // Two legs: the first token from one sampler, the rest from a fresh one resumed.
        let mut rest = Sampler::new(o, 0);
        rest.resume_after(all[0]);
        let tail: Vec<u32> = (1..16)
            .map(|_| {
                let t = rest.sample(&mut logits.clone(), &[]);
                rest.observe(t);
                t
            })
            .collect();
        assert_eq!(tail, all[1..]);
    }

    #[test]
    fn filters_restrict_the_candidates() {
        let logits = [5.0f32, 4.0, 1.0, 0.0, -1.0];
        for (o, allowed) in [
            (
                SamplingOptions {
                    temperature: Some(1.0),
                    top_k: Some(2),
                    seed: Some(1),
                    ..opts()
                },
                vec![0, 1],
            ),
            (
                SamplingOptions {
                    temperature: Some(1.0),
                    top_p: Some(0.5),
                    seed: Some(1),
                    ..opts()
                },
                vec![0],
            ),
            (
                SamplingOptions {
                    temperature: Some(1.0),
                    min_p: Some(0.3),
                    seed: Some(1),
                    ..opts()
                },
                vec![0, 1],
            ),
        ] {
            let mut s = Sampler::new(o, 0);
            for _ in 0..200 {
                let t = s.sample(&mut logits.clone(), &[]);
                assert!(allowed.contains(&t), "{t} not in {allowed:?}");
            }
        }
    }

    #[test]
    fn temperature_sampling_follows_the_softmax() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let mut s = Sampler::new(
            SamplingOptions {
                temperature: Some(1.0),
                seed: Some(7),
                ..opts()
            },
            0,
        );
        let n = 4000;
        let zeros = (0..n)
            .filter(|_| s.sample(&mut [3f32.ln(), 0.0], &[]) == 0)
            .count();
        let share = zeros as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        // A low temperature sharpens it.
        let mut s = Sampler::new(
            SamplingOptions {
                temperature: Some(0.25),
                seed: Some(7),
                ..opts()
            },
            0,
        );
        let zeros = (0..n)
            .filter(|_| s.sample(&mut [3f32.ln(), 0.0], &[]) == 0)
            .count();
        assert!(zeros as f64 / n as f64 > 0.97);
    }
}
