//! Eviction policies: which resident, unpinned expert makes room for a new one.
//!
//! The cache calls a policy under its bookkeeping lock, so a policy is plain
//! single-threaded code. It sees the routing of every step ([`EvictionPolicy::on_step`]),
//! every use by compute ([`EvictionPolicy::on_access`]), every insertion and eviction, and
//! picks a victim among candidates the cache has already filtered (unpinned, loaded, and in
//! the least protected windowing class, see the crate docs).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use hetmoe_storage::{ExpertId, ExpertKey, LayerId};

/// What one MoE layer did for one batch of tokens (one decode token, or a prefill chunk).
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    pub layer: LayerId,
    /// Tokens in this step (1 in decode).
    pub n_tokens: usize,
    /// `[n_tokens, n_experts]` router softmax probabilities (before top-k renormalisation);
    /// may be empty when the caller does not have them.
    pub router_probs: &'a [f32],
    /// The experts this step runs (each once), any order.
    pub used: &'a [ExpertId],
}

impl Step<'_> {
    /// Experts per layer implied by `router_probs`, if they are consistent.
    pub fn n_experts(&self) -> Option<usize> {
        if self.n_tokens == 0 || self.router_probs.is_empty() || self.router_probs.len() % self.n_tokens != 0
        {
            None
        } else {
            Some(self.router_probs.len() / self.n_tokens)
        }
    }
}

/// An eviction policy. Calls arrive in program order under the cache's lock.
pub trait EvictionPolicy: Send + fmt::Debug {
    /// Short name (`"lru"`, `"lfu"`, `"score"`).
    fn name(&self) -> &'static str;
    /// A layer's routing for one step, before its experts are acquired.
    fn on_step(&mut self, _step: &Step<'_>) {}
    /// Compute used `key` (one [`acquire`](crate::ExpertCache::acquire), hit or miss).
    fn on_access(&mut self, _key: ExpertKey) {}
    /// `key` started loading into a slot (demand miss or prefetch).
    fn on_insert(&mut self, _key: ExpertKey) {}
    /// `key` left the cache (evicted, or its load failed).
    fn on_evict(&mut self, _key: ExpertKey) {}
    /// Index into `candidates` (non-empty, ascending by key) of the expert to evict.
    fn victim(&self, candidates: &[ExpertKey]) -> usize;
}

/// The built-in policies, by name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PolicyKind {
    Lru,
    Lfu,
    /// HybriMoE's score-based policy; `top_p: None` means `2 · top_k`.
    Score {
        alpha: f32,
        top_p: Option<usize>,
    },
}

impl PolicyKind {
    /// The score policy with its defaults (α = 0.5, p = 2 · top_k).
    pub const SCORE: Self = Self::Score { alpha: 0.5, top_p: None };

    /// A fresh policy of this kind for a model routing `top_k` experts per token.
    pub fn build(self, top_k: usize) -> Box<dyn EvictionPolicy> {
        match self {
            Self::Lru => Box::new(Lru::default()),
            Self::Lfu => Box::new(Lfu::default()),
            Self::Score { alpha, top_p } => {
                Box::new(ScorePolicy::new(alpha, top_p.unwrap_or(2 * top_k.max(1))))
            }
        }
    }
}

impl Default for PolicyKind {
    fn default() -> Self {
        Self::SCORE
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    /// `lru`, `lfu` or `score` (score with its defaults).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(Self::Lru),
            "lfu" => Ok(Self::Lfu),
            "score" => Ok(Self::SCORE),
            other => Err(format!("unknown cache policy {other:?} (expected score, lru or lfu)")),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lru => f.write_str("lru"),
            Self::Lfu => f.write_str("lfu"),
            Self::Score { .. } => f.write_str("score"),
        }
    }
}

/// Least recently used: evicts the expert whose last access (or insertion) is oldest;
/// ties (never touched) by key.
#[derive(Debug, Default)]
pub struct Lru {
    tick: u64,
    last: HashMap<ExpertKey, u64>,
}

impl Lru {
    fn touch(&mut self, key: ExpertKey) {
        self.tick += 1;
        self.last.insert(key, self.tick);
    }
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn on_access(&mut self, key: ExpertKey) {
        self.touch(key);
    }
    fn on_insert(&mut self, key: ExpertKey) {
        self.touch(key);
    }
    fn victim(&self, candidates: &[ExpertKey]) -> usize {
        argmin_by_key(candidates, |k| (self.last.get(k).copied().unwrap_or(0), *k))
    }
}

/// Least frequently used: evicts the expert with the fewest accesses since the cache was
/// built (counts survive eviction: they estimate each expert's popularity); ties by least
/// recent access, then by key.
#[derive(Debug, Default)]
pub struct Lfu {
    tick: u64,
    stats: HashMap<ExpertKey, (u64, u64)>, // (count, last access tick)
}

impl EvictionPolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }
    fn on_access(&mut self, key: ExpertKey) {
        self.tick += 1;
        let e = self.stats.entry(key).or_insert((0, 0));
        e.0 += 1;
        e.1 = self.tick;
    }
    fn victim(&self, candidates: &[ExpertKey]) -> usize {
        argmin_by_key(candidates, |k| {
            let (count, last) = self.stats.get(k).copied().unwrap_or((0, 0));
            (count, last, *k)
        })
    }
}

/// HybriMoE's score-based policy. Per layer, after each step with (token-averaged) router
/// probabilities `s`: `S ← α·s + (1−α)·S` for the `p` experts with the highest `s` (ties:
/// lower id), `S ← (1−α)·S` for the others. Evicts the lowest `S`; ties by key.
///
/// A step without router probabilities counts each used expert with `s = 1/|used|`.
#[derive(Debug)]
pub struct ScorePolicy {
    alpha: f32,
    top_p: usize,
    scores: Vec<Vec<f32>>, // [layer][expert]
    mean: Vec<f32>,
    order: Vec<usize>,
}

impl ScorePolicy {
    pub fn new(alpha: f32, top_p: usize) -> Self {
        Self { alpha, top_p, scores: Vec::new(), mean: Vec::new(), order: Vec::new() }
    }

    /// Current score of `key` (0 before any step mentioned it).
    pub fn score(&self, key: ExpertKey) -> f32 {
        self.scores
            .get(key.layer.0 as usize)
            .and_then(|l| l.get(key.expert.0 as usize))
            .copied()
            .unwrap_or(0.0)
    }
}

impl EvictionPolicy for ScorePolicy {
    fn name(&self) -> &'static str {
        "score"
    }

    fn on_step(&mut self, step: &Step<'_>) {
        let l = step.layer.0 as usize;
        // s: token-averaged router probabilities (or 1/|used| on the used experts).
        self.mean.clear();
        match step.n_experts() {
            Some(e) => {
                self.mean.resize(e, 0.0);
                for row in step.router_probs.chunks_exact(e) {
                    for (m, &p) in self.mean.iter_mut().zip(row) {
                        *m += p;
                    }
                }
                let inv = 1.0 / step.n_tokens as f32;
                self.mean.iter_mut().for_each(|m| *m *= inv);
            }
            None => {
                let e = step.used.iter().map(|x| x.0 as usize + 1).max().unwrap_or(0);
                self.mean.resize(e, 0.0);
                let s = 1.0 / step.used.len().max(1) as f32;
                for x in step.used {
                    self.mean[x.0 as usize] = s;
                }
            }
        }
        if self.scores.len() <= l {
            self.scores.resize_with(l + 1, Vec::new);
        }
        let scores = &mut self.scores[l];
        if scores.len() < self.mean.len() {
            scores.resize(self.mean.len(), 0.0);
        }
        let a = self.alpha;
        scores.iter_mut().for_each(|s| *s *= 1.0 - a);
        self.order.clear();
        self.order.extend(0..self.mean.len());
        let mean = &self.mean;
        self.order.sort_by(|&i, &j| mean[j].total_cmp(&mean[i]).then(i.cmp(&j)));
        for &e in self.order.iter().take(self.top_p) {
            scores[e] += a * mean[e];
        }
    }

    fn victim(&self, candidates: &[ExpertKey]) -> usize {
        let mut best = 0;
        for (i, k) in candidates.iter().enumerate().skip(1) {
            let (s, b) = (self.score(*k), self.score(candidates[best]));
            if s.total_cmp(&b).then(k.cmp(&candidates[best])).is_lt() {
                best = i;
            }
        }
        best
    }
}

fn argmin_by_key<T: Ord>(candidates: &[ExpertKey], f: impl Fn(&ExpertKey) -> T) -> usize {
    candidates.iter().enumerate().min_by_key(|(_, k)| f(k)).map(|(i, _)| i).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(l: usize, e: usize) -> ExpertKey {
        ExpertKey::new(l, e)
    }

    /// Evicts from `resident` one at a time and returns the order.
    fn eviction_order(p: &mut dyn EvictionPolicy, mut resident: Vec<ExpertKey>) -> Vec<ExpertKey> {
        let mut out = Vec::new();
        while !resident.is_empty() {
            resident.sort();
            let v = resident.remove(p.victim(&resident));
            p.on_evict(v);
            out.push(v);
        }
        out
    }

    #[test]
    fn lru_order() {
        let mut p = Lru::default();
        for key in [k(0, 0), k(0, 1), k(0, 2), k(0, 3)] {
            p.on_insert(key);
        }
        // Accesses: 2, 0, 2, 1  → recency (old → new): 3, 0, 2, 1.
        for key in [k(0, 2), k(0, 0), k(0, 2), k(0, 1)] {
            p.on_access(key);
        }
        let all = vec![k(0, 0), k(0, 1), k(0, 2), k(0, 3)];
        assert_eq!(eviction_order(&mut p, all), vec![k(0, 3), k(0, 0), k(0, 2), k(0, 1)]);
        // Never-touched experts go first, by key.
        let mut p = Lru::default();
        p.on_access(k(0, 0));
        assert_eq!(eviction_order(&mut p, vec![k(0, 0), k(1, 5), k(1, 2)]), vec![k(1, 2), k(1, 5), k(0, 0)]);
    }

    #[test]
    fn lfu_order() {
        let mut p = Lfu::default();
        // counts: e0 ×3, e1 ×1, e2 ×2, e3 ×1 (e3 accessed after e1), e4 never.
        for key in [k(0, 0), k(0, 1), k(0, 0), k(0, 2), k(0, 3), k(0, 2), k(0, 0)] {
            p.on_access(key);
        }
        let all = vec![k(0, 0), k(0, 1), k(0, 2), k(0, 3), k(0, 4)];
        assert_eq!(eviction_order(&mut p, all), vec![k(0, 4), k(0, 1), k(0, 3), k(0, 2), k(0, 0)]);
        // Counts survive eviction.
        p.on_evict(k(0, 0));
        p.on_access(k(0, 1));
        p.on_access(k(0, 1)); // e1: 3 accesses, but later than e0's last
        assert_eq!(eviction_order(&mut p, vec![k(0, 0), k(0, 1), k(0, 2)]), vec![k(0, 2), k(0, 0), k(0, 1)]);
    }

    #[test]
    fn score_updates_and_order() {
        // α = 0.5, p = 2, 4 experts, one token per step.
        let mut p = ScorePolicy::new(0.5, 2);
        let step = |probs: &'static [f32], used: &'static [ExpertId]| Step {
            layer: LayerId(0),
            n_tokens: 1,
            router_probs: probs,
            used,
        };
        // Step 1: top-2 = e1 (0.5), e2 (0.3). S = [0, .25, .15, 0]
        p.on_step(&step(&[0.1, 0.5, 0.3, 0.1], &[ExpertId(1), ExpertId(2)]));
        let s: Vec<f32> = (0..4).map(|e| p.score(k(0, e))).collect();
        assert_eq!(s, vec![0.0, 0.25, 0.15, 0.0]);
        // Step 2: top-2 = e3 (0.6), e0 (0.2; ties with e2 at 0.2 → lower id wins).
        // S = [.1, .125, .075, .3]
        p.on_step(&step(&[0.2, 0.0, 0.2, 0.6], &[ExpertId(3), ExpertId(0)]));
        let s: Vec<f32> = (0..4).map(|e| p.score(k(0, e))).collect();
        assert_eq!(s, vec![0.1, 0.125, 0.075, 0.3]);
        // Another layer: only e1 seen; everything else there scores 0.
        p.on_step(&Step { layer: LayerId(1), n_tokens: 1, router_probs: &[0.0, 0.9, 0.05, 0.05], used: &[] });
        // layer 1: S = [0, .45, .025, 0] (top-2: e1, e2 (tie with e3 → lower id)).
        let all = vec![k(0, 0), k(0, 1), k(0, 2), k(0, 3), k(1, 0), k(1, 1), k(1, 2), k(1, 3)];
        // Order by (S, key): (1,0)=0, (1,3)=0, then .025 (1,2), .075 (0,2), .1 (0,0),
        // .125 (0,1), .3 (0,3), .45 (1,1).
        assert_eq!(
            eviction_order(&mut p, all),
            vec![k(1, 0), k(1, 3), k(1, 2), k(0, 2), k(0, 0), k(0, 1), k(0, 3), k(1, 1)]
        );
    }

    #[test]
    fn score_averages_tokens_and_falls_back_to_used() {
        let mut p = ScorePolicy::new(0.5, 1);
        // Two tokens: mean = [0.5, 0.5] → tie, p = 1 → e0 only.
        p.on_step(&Step { layer: LayerId(0), n_tokens: 2, router_probs: &[1.0, 0.0, 0.0, 1.0], used: &[] });
        assert_eq!((p.score(k(0, 0)), p.score(k(0, 1))), (0.25, 0.0));
        // No probabilities: used experts get s = 1/|used|, top-1 among them by id.
        p.on_step(&Step { layer: LayerId(0), n_tokens: 1, router_probs: &[], used: &[ExpertId(1)] });
        assert_eq!((p.score(k(0, 0)), p.score(k(0, 1))), (0.125, 0.5));
    }

    #[test]
    fn parse_kinds() {
        assert_eq!("lru".parse::<PolicyKind>(), Ok(PolicyKind::Lru));
        assert_eq!("score".parse::<PolicyKind>(), Ok(PolicyKind::SCORE));
        assert!("mru".parse::<PolicyKind>().is_err());
        assert_eq!(PolicyKind::SCORE.build(2).name(), "score");
    }
}
