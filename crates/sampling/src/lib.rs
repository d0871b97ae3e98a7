//! Choosing the next token from a row of logits, per request.
//!
//! Order of operations (as vLLM applies them): the structured-output [`Constraint`]'s mask
//! (tokens the grammar forbids get −∞), repetition penalty over prompt and output tokens,
//! then OpenAI's frequency and presence penalties over output tokens; with no temperature
//! (or 0) the highest logit wins; otherwise logits are divided by the temperature, turned
//! into probabilities, cut by top-k, top-p and min-p, renormalised and sampled with the
//! request's own random generator, so the same seed gives the same tokens.
//!
//! Logprobs, when asked for, are read from the distribution after the mask, the penalties
//! and the temperature (temperature 1 for greedy requests) and before top-k/top-p/min-p
//! truncation — the distribution the sampler drew from, without the cut that would make most
//! alternatives −∞.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use tandem_protocols::llm::{SamplingOptions, TokenLogprob};

/// A per-choice rule over which tokens may come next (a structured-output grammar).
pub trait Constraint: Send {
    /// Sets the logits of tokens that may not come next to −∞.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Moves past `token`, which the sampler (or an earlier worker) chose.
    fn advance(&mut self, token: u32) -> Result<(), String>;
}

/// The chosen token and, when asked for, its logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
}

/// Why no token could be chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("structured output: {0}")]
    Constraint(String),
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
    /// Output tokens so far and how often each occurred.
    counts: HashMap<u32, u32>,
    /// `Some(k)`: report each token's logprob with the `k` most likely alternatives.
    logprobs: Option<u32>,
    constraint: Option<Box<dyn Constraint>>,
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
            logprobs: None,
            constraint: None,
        }
    }

    /// Reports each chosen token's logprob with the `top` most likely alternatives.
    pub fn with_logprobs(mut self, top: Option<u32>) -> Self {
        self.logprobs = top;
        self
    }

    /// Restricts every choice to what `constraint` allows.
    pub fn with_constraint(mut self, constraint: Box<dyn Constraint>) -> Self {
        self.constraint = Some(constraint);
        self
    }

    pub fn is_greedy(&self) -> bool {
        self.opts.temperature.is_none_or(|t| t <= 0.0)
    }

    /// Records a generated token: penalties count output tokens, and the constraint moves
    /// past it. Fails when the constraint does not allow it.
    pub fn observe(&mut self, token: u32) -> Result<(), SampleError> {
        *self.counts.entry(token).or_insert(0) += 1;
        match &mut self.constraint {
            Some(c) => c.advance(token).map_err(SampleError::Constraint),
            None => Ok(()),
        }
    }

    /// Continues after `token`, which another sampler with the same options picked (a prefill
    /// worker's first token): observed, and the random stream moved past the draw that
    /// picked it, so that a seeded request samples what it would have in one piece.
    pub fn resume_after(&mut self, token: u32) -> Result<(), SampleError> {
        self.observe(token)?;
        if !self.is_greedy() {
            let _: f32 = self.rng.random();
        }
        Ok(())
    }

    /// Picks the next token (not yet observed). `prompt` feeds the repetition penalty;
    /// `logits` is modified.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32]) -> Result<Sampled, SampleError> {
        if let Some(c) = &mut self.constraint {
            c.mask(logits).map_err(SampleError::Constraint)?;
        }
        self.apply_penalties(logits, prompt);
        let t = self.opts.temperature.filter(|t| *t > 0.0).unwrap_or(1.0);
        let token = self.pick(logits, t);
        if self.constraint.is_some()
            && logits
                .get(token as usize)
                .is_none_or(|l| *l == f32::NEG_INFINITY)
        {
            return Err(SampleError::Constraint(
                "the grammar allows no token next".to_string(),
            ));
        }
        let logprob = self.logprobs.map(|k| logprobs(logits, t, token, k));
        Ok(Sampled { token, logprob })
    }

    fn pick(&mut self, logits: &[f32], t: f32) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
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

/// `token`'s logprob under softmax(`logits` / `t`), and the `top` most likely tokens, most
/// likely first (ties by lower id).
fn logprobs(logits: &[f32], t: f32, token: u32, top: u32) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from((l - max) / t).exp()).sum();
    let lse = f64::from(max / t) + sum.ln();
    let lp = |i: usize| (f64::from(logits[i] / t) - lse) as f32;
    let k = (top as usize).min(logits.len());
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_logit);
    }
    ids.truncate(k);
    ids.sort_unstable_by(by_logit);
    TokenLogprob {
        logprob: lp(token as usize),
        // Tokens a constraint forbids are not alternatives.
        top: ids
            .into_iter()
            .filter(|i| logits[*i] > f32::NEG_INFINITY)
            .map(|i| (i as u32, lp(i)))
            .collect(),
    }
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
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[]).unwrap().token, 1);
        let mut s = Sampler::new(
            SamplingOptions {
                repetition_penalty: Some(1.2),
                ..opts()
            },
            0,
        );
        assert_eq!(
            s.sample(&mut [0.1, 3.0, 2.9], &[1]).unwrap().token,
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
        s.observe(1).unwrap();
        assert_eq!(
            s.sample(&mut [0.1, 3.0, 2.9], &[]).unwrap().token,
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
        s.observe(0).unwrap();
        assert_eq!(
            s.sample(&mut [2.5, 3.0, 2.9], &[]).unwrap().token,
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
                .map(|_| s.sample(&mut logits.clone(), &[]).unwrap().token)
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
                let t = whole.sample(&mut logits.clone(), &[]).unwrap().token;
                whole.observe(t).unwrap();
                t
            })
            .collect();
        // Two legs: the first token from one sampler, the rest from a fresh one resumed.
        let mut rest = Sampler::new(o, 0);
        rest.resume_after(all[0]).unwrap();
        let tail: Vec<u32> = (1..16)
            .map(|_| {
                let t = rest.sample(&mut logits.clone(), &[]).unwrap().token;
                rest.observe(t).unwrap();
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
                let t = s.sample(&mut logits.clone(), &[]).unwrap().token;
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
            .filter(|_| s.sample(&mut [3f32.ln(), 0.0], &[]).unwrap().token == 0)
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
            .filter(|_| s.sample(&mut [3f32.ln(), 0.0], &[]).unwrap().token == 0)
            .count();
        assert!(zeros as f64 / n as f64 > 0.97);
    }

    #[test]
    fn logprobs_come_from_the_distribution_sampled_from() {
        let logits = [1.0f32, 3.0, 2.0, -1.0, 0.5];
        // Greedy: temperature 1, the chosen token is the most likely one.
        let mut s = Sampler::new(opts(), 0).with_logprobs(Some(3));
        let got = s.sample(&mut logits.clone(), &[]).unwrap();
        let lp = got.logprob.unwrap();
        assert_eq!(got.token, 1);
        let ids: Vec<u32> = lp.top.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![1, 2, 0], "most likely first");
        assert_eq!(lp.logprob, lp.top[0].1);
        let lse = logits.iter().map(|l| (*l as f64).exp()).sum::<f64>().ln();
        assert!((lp.logprob as f64 - (3.0 - lse)).abs() < 1e-5);
        let mass: f64 = lp.top.iter().map(|(_, l)| (*l as f64).exp()).sum();
        assert!(mass <= 1.0 && mass > 0.9, "{mass}");
        // Sampled at temperature 0.5: logits halved in temperature means doubled.
        let mut s = Sampler::new(
            SamplingOptions {
                temperature: Some(0.5),
                seed: Some(3),
                ..opts()
            },
            0,
        )
        .with_logprobs(Some(0));
        let got = s.sample(&mut logits.clone(), &[]).unwrap();
        let lp = got.logprob.unwrap();
        assert!(lp.top.is_empty());
        let lse = logits
            .iter()
            .map(|l| (*l as f64 * 2.0).exp())
            .sum::<f64>()
            .ln();
        let want = logits[got.token as usize] as f64 * 2.0 - lse;
        assert!((lp.logprob as f64 - want).abs() < 1e-5);
        // Penalties change the distribution logprobs are read from.
        let mut s = Sampler::new(
            SamplingOptions {
                repetition_penalty: Some(3.0),
                ..opts()
            },
            0,
        )
        .with_logprobs(Some(1));
        let got = s.sample(&mut logits.clone(), &[1]).unwrap();
        assert_eq!(got.token, 2, "token 1 penalised from 3.0 to 1.0");
        assert_eq!(got.logprob.unwrap().top[0].0, 2);
    }

    /// Allows only even tokens and records what it was told.
    struct EvenOnly(std::sync::Arc<std::sync::Mutex<Vec<u32>>>);

    impl Constraint for EvenOnly {
        fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
            for (i, l) in logits.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *l = f32::NEG_INFINITY;
                }
            }
            Ok(())
        }
        fn advance(&mut self, token: u32) -> Result<(), String> {
            if token % 2 == 1 {
                return Err(format!("{token} is odd"));
            }
            self.0.lock().unwrap().push(token);
            Ok(())
        }
    }

    #[test]
    fn a_constraint_masks_before_sampling_and_sees_every_token() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let logits = [1.0f32, 5.0, 2.0, 6.0, 0.0, 1.5];
        for temperature in [None, Some(1.5)] {
            let mut s = Sampler::new(
                SamplingOptions {
                    temperature,
                    seed: Some(9),
                    ..opts()
                },
                0,
            )
            .with_constraint(Box::new(EvenOnly(seen.clone())))
            .with_logprobs(Some(5));
            for _ in 0..50 {
                let got = s.sample(&mut logits.clone(), &[]).unwrap();
                assert_eq!(got.token % 2, 0);
                let lp = got.logprob.unwrap();
                assert!(lp.logprob.is_finite());
                assert_eq!(lp.top.len(), 3, "forbidden tokens are no alternatives");
                let mass: f32 = lp.top.iter().map(|(_, l)| l.exp()).sum();
                assert!(
                    (mass - 1.0).abs() < 1e-4,
                    "the allowed tokens hold all the mass"
                );
                s.observe(got.token).unwrap();
            }
        }
        assert_eq!(seen.lock().unwrap().len(), 100);
        let mut s = Sampler::new(opts(), 0).with_constraint(Box::new(EvenOnly(seen)));
        assert!(
            s.resume_after(3).is_err(),
            "a resumed token the grammar refuses"
        );
    }
}
