//! Offloading never changes the numbers: experts served through the byte-budgeted cache,
//! under every policy, budget and window, give logits bit-identical to the all-in-memory
//! run. This uses an in-memory source of row-column bundles (a test aid); the disk-backed
//! store is tested in `tests/offload_disk.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;

use half::bf16;
use hetmoe::cpu_kernels::moe::ExpertRef;
use hetmoe::cpu_kernels::WeightsRef;
use hetmoe::offload::{ExpertSource, MemSourceError};
use hetmoe::storage::{Checkpoint, ExpertKey, WeightKey};
use hetmoe::{
    CacheConfig, Engine, EngineError, EngineOptions, EngineResult, ExpertLayout, GenerateOptions, PolicyKind,
};

/// Experts of a bf16 checkpoint as `[ffn][gate | up | down column][hidden]` bundles.
struct BundleSource {
    experts: HashMap<ExpertKey, Vec<bf16>>,
    ffn: usize,
    hidden: usize,
}

/// A slot buffer with bf16 alignment.
struct Buf(Vec<bf16>);
impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}
impl AsMut<[u8]> for Buf {
    fn as_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

impl BundleSource {
    fn from_checkpoint(dir: &Path) -> Self {
        let spec = hetmoe::storage::open_model_dir(dir).unwrap().0;
        let ckpt = Checkpoint::open(dir).unwrap();
        let (h, f) = (spec.hidden, spec.moe.expert_ffn);
        let read = |k: WeightKey| -> Vec<bf16> {
            bytemuck::pod_collect_to_vec(ckpt.tensor(&k.name(spec.arch)).unwrap().bytes())
        };
        let mut experts = HashMap::new();
        for l in spec.moe_layers() {
            for e in 0..spec.moe.n_experts {
                let (g, u, d) = (
                    read(WeightKey::ExpertGate(l, e)),
                    read(WeightKey::ExpertUp(l, e)),
                    read(WeightKey::ExpertDown(l, e)),
                );
                let mut b = Vec::with_capacity(3 * f * h);
                for j in 0..f {
                    b.extend_from_slice(&g[j * h..(j + 1) * h]);
                    b.extend_from_slice(&u[j * h..(j + 1) * h]);
                    b.extend((0..h).map(|i| d[i * f + j]));
                }
                experts.insert(ExpertKey::new(l, e), b);
            }
        }
        BundleSource { experts, ffn: f, hidden: h }
    }
}

impl ExpertSource for BundleSource {
    type Buf = Buf;
    type Error = MemSourceError;
    fn slot_bytes(&self) -> usize {
        3 * self.ffn * self.hidden * 2
    }
    fn alloc_slot(&self) -> Result<Buf, MemSourceError> {
        Ok(Buf(vec![bf16::ZERO; 3 * self.ffn * self.hidden]))
    }
    fn read(&self, key: ExpertKey, buf: &mut Buf) -> Result<usize, MemSourceError> {
        let src = self.experts.get(&key).ok_or(MemSourceError::Missing(key))?;
        buf.0.copy_from_slice(src);
        Ok(src.len() * 2)
    }
}

impl ExpertLayout for BundleSource {
    fn dims(&self) -> (usize, usize) {
        (self.ffn, self.hidden)
    }
    fn expert_bytes(&self) -> usize {
        self.slot_bytes()
    }
    fn expert_ref<'a>(&self, bytes: &'a [u8]) -> EngineResult<ExpertRef<'a>> {
        let w: &[bf16] = bytemuck::cast_slice(bytes);
        ExpertRef::bundled(WeightsRef::Bf16(w), self.ffn, self.hidden)
            .map_err(|e| EngineError::InvalidOption { option: "offload", reason: e.to_string() })
    }
}

fn greedy(max_new: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: max_new,
        stop_tokens: Some(vec![]),
        keep_logits: true,
        ..Default::default()
    }
}

/// Every policy × budget × window against the resident run, on `dir` with `prompts`.
fn check_model(dir: &Path, prompts: &[Vec<u32>], max_new: usize) {
    let resident = Engine::load(dir, EngineOptions::default()).unwrap();
    let want = resident.generate_batch(prompts, &greedy(max_new)).unwrap();
    let spec = resident.spec().clone();
    let total = spec.moe.n_experts * spec.moe_layers().len();
    let slot = BundleSource::from_checkpoint(dir).slot_bytes() as u64;
    for policy in ["score", "lru", "lfu"] {
        for slots in [spec.moe.top_k, total / 4, total] {
            for window in [0, 2] {
                let cfg = CacheConfig::new(slots.max(spec.moe.top_k) as u64 * slot, spec.moe.top_k)
                    .with_policy(policy.parse::<PolicyKind>().unwrap())
                    .with_window(window);
                let e = Engine::load_offloaded(
                    dir,
                    EngineOptions::default(),
                    BundleSource::from_checkpoint(dir),
                    cfg,
                )
                .unwrap();
                // One prompt at a time, then all together: both must match the resident run.
                for (p, w) in prompts.iter().zip(&want) {
                    let g = e.generate(p, &greedy(max_new), |_| std::ops::ControlFlow::Continue(())).unwrap();
                    let what = format!("{} {policy} slots={slots} window={window}", dir.display());
                    assert_eq!(g.generated_ids, w.generated_ids, "{what}: tokens");
                    assert_eq!(g.prompt_logits, w.prompt_logits, "{what}: prompt logits not bit-identical");
                    assert_eq!(g.step_logits, w.step_logits, "{what}: step logits not bit-identical");
                }
                let batched = e.generate_batch(prompts, &greedy(max_new)).unwrap();
                for (g, w) in batched.iter().zip(&want) {
                    assert_eq!(g.step_logits, w.step_logits, "{policy} slots={slots}: batched offload");
                }
                let m = e.expert_cache_metrics().unwrap();
                assert!(m.hits + m.misses > 0);
                if slots == total {
                    // Everything fits: each expert is loaded at most once.
                    assert!(m.loads <= total as u64, "{policy}: {} loads with room for all", m.loads);
                }
            }
        }
    }
}

#[test]
fn offloaded_fixtures_are_bit_identical_for_every_policy_and_budget() {
    for arch in ["mixtral", "qwen2_moe"] {
        let r = common::Reference::load(arch);
        let p = r.get("prompt_ids").ids();
        check_model(&common::fixture(arch).join("model"), &[p.clone(), p[..9].to_vec()], 6);
    }
}

#[test]
fn offloaded_bundled_model_is_bit_identical() {
    let dir = common::bundled_model();
    let e = Engine::load(&dir, EngineOptions::default()).unwrap();
    let prompts = vec![e.encode("The borrow checker").unwrap(), e.encode("KING RICHARD.\n").unwrap()];
    check_model(&dir, &prompts, 8);
}

#[test]
fn budget_below_top_k_experts_is_rejected_with_the_minimum() {
    let dir = common::fixture("mixtral").join("model");
    let src = BundleSource::from_checkpoint(&dir);
    let one_slot = src.slot_bytes() as u64;
    match Engine::load_offloaded(&dir, EngineOptions::default(), src, CacheConfig::new(one_slot, 2)) {
        Err(EngineError::Offload(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("minimum"), "{msg}");
        }
        other => panic!("expected a budget error, got {other:?}"),
    }
}
