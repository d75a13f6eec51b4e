//! Choosing the next token from logits: greedy, or seeded temperature / top-k / top-p.

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, EngineResult};

/// How the next token is chosen. `temperature == 0` is greedy (argmax, lowest id on ties).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub(crate) fn validate(&self) -> EngineResult<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(EngineError::InvalidOption {
                option: "temperature",
                reason: format!("must be >= 0, got {}", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidOption {
                option: "top_p",
                reason: format!("must be in (0, 1], got {}", self.top_p),
            });
        }
        Ok(())
    }
}

/// A sampler with its own random stream, one per sequence.
#[derive(Debug)]
pub(crate) struct Sampler {
    cfg: Sampling,
    rng: ChaCha8Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub(crate) fn new(cfg: &Sampling) -> Self {
        Sampler { cfg: cfg.clone(), rng: ChaCha8Rng::seed_from_u64(cfg.seed), scratch: Vec::new() }
    }

    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.cfg.temperature;
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (l / t, i as u32)));
        // Most likely first; ties by id so the order is deterministic.
        c.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if self.cfg.top_k > 0 {
            c.truncate(self.cfg.top_k);
        }
        let max = c[0].0;
        let mut sum = 0f64;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
            sum += e.0 as f64;
        }
        if self.cfg.top_p < 1.0 {
            let mut acc = 0f64;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.0 as f64 / sum;
                if acc >= self.cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            sum = c.iter().map(|e| e.0 as f64).sum();
        }
        let mut u = self.rng.gen::<f64>() * sum;
        for e in c.iter() {
            u -= e.0 as f64;
            if u < 0.0 {
                return e.1;
            }
        }
        c[c.len() - 1].1
    }
}

/// Index of the largest logit; the lowest index wins ties (as `torch.argmax`).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(&Sampling::greedy());
        assert_eq!(s.sample(&[0.1, 0.9, 0.9, 0.2]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = Sampling { temperature: 0.8, top_k: 5, top_p: 1.0, seed: 7 };
        let (mut a, mut b) = (Sampler::new(&cfg), Sampler::new(&cfg));
        let mut top5: Vec<u32> = (0..50).collect();
        top5.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        top5.truncate(5);
        for _ in 0..100 {
            let x = a.sample(&logits);
            assert_eq!(x, b.sample(&logits));
            assert!(top5.contains(&x));
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        let mut s = Sampler::new(&Sampling { temperature: 1.0, top_k: 0, top_p: 1e-6, seed: 3 });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(Sampling { temperature: -1.0, ..Sampling::default() }.validate().is_err());
        assert!(Sampling { top_p: 0.0, ..Sampling::default() }.validate().is_err());
    }
}
