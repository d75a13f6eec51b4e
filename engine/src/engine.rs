//! [`Engine`]: a loaded model, its tokenizer and its compute threads.

use std::path::{Path, PathBuf};

use hetmoe_cpu_kernels::parallel::Team;
use hetmoe_storage::{open_model_dir, ModelSpec};

use crate::error::{EngineError, EngineResult};
use crate::experts::{ExpertAccess, Resident};
use crate::forward::{self, BatchItem, ForwardObserver, LogitsMode, NoObserver};
use crate::kv_cache::{KvCacheDtype, Sequence};
use crate::offload::{CachedExperts, ExpertLayout};
use crate::tokenizer::TextTokenizer;
use crate::weights::{self, ModelWeights, WeightFormat};
use hetmoe_offload::{CacheConfig, CacheMetrics, ExpertCache, ExpertSource};

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Compute threads (default: all cores).
    pub threads: Option<usize>,
    /// How matrices are held in memory (default: as stored).
    pub weights: WeightFormat,
    /// Element type of the KV cache (default: f32, exact).
    pub kv_cache: KvCacheDtype,
    /// With offloaded experts, prefetch the experts layer l+1 will probably use (layer
    /// l+1's router applied to layer l's output) while layer l+1's attention runs. Off by
    /// default: a wrong guess costs disk bandwidth (see the notes in docs/design.md).
    pub prefetch: bool,
}

/// Spec and weights: everything the forward pass reads. Immutable once loaded.
#[derive(Debug)]
pub(crate) struct Model {
    pub spec: ModelSpec,
    pub weights: ModelWeights,
    /// RoPE inverse frequencies, `rotary_dim / 2`.
    pub inv_freq: Vec<f32>,
    /// Where routed experts' weights come from.
    pub experts: Box<dyn ExpertAccess>,
    /// Guess layer l+1's experts after layer l and prefetch them (offloaded experts only).
    pub prefetch_next_layer: bool,
}

/// A loaded model, ready to run sequences.
///
/// `Engine` is `Send + Sync`: weights are immutable after loading and all per-sequence
/// state lives in [`Sequence`], so one engine can serve several threads (forward passes
/// from different threads share its compute threads: one drives the spinning team, the
/// others run on a rayon pool of the same size, built when first needed).
#[derive(Debug)]
pub struct Engine {
    model: Model,
    tokenizer: Option<TextTokenizer>,
    /// The compute threads of forward passes (see [`hetmoe_cpu_kernels::parallel`]).
    team: Team,
    /// A rayon pool of the team's size, built the first time a forward pass finds the team
    /// busy with another thread's (`None` inside if it could not be built).
    fallback_pool: std::sync::OnceLock<Option<rayon::ThreadPool>>,
    dir: PathBuf,
    kv_cache: KvCacheDtype,
}

impl Engine {
    /// Loads a Hugging Face model folder (`config.json`, safetensors, optional `tokenizer.json`).
    pub fn load(dir: impl AsRef<Path>, options: EngineOptions) -> EngineResult<Self> {
        Self::build(dir.as_ref(), options, |_| Ok(Box::new(Resident)))
    }

    /// Loads a model whose routed experts come from `source` through a byte-budgeted
    /// [`ExpertCache`] configured by `cache`, instead of from the checkpoint. The expert
    /// tensors of the checkpoint are not read. Results are bit-identical to [`Engine::load`]
    /// with the same weight format.
    pub fn load_offloaded<S: ExpertSource + ExpertLayout>(
        dir: impl AsRef<Path>,
        options: EngineOptions,
        source: S,
        cache: CacheConfig,
    ) -> EngineResult<Self> {
        Self::build(dir.as_ref(), options, move |spec| {
            let (ffn, hidden) = source.dims();
            if (ffn, hidden) != (spec.moe.expert_ffn, spec.hidden) {
                return Err(EngineError::InvalidOption {
                    option: "offload",
                    reason: format!(
                        "the expert source holds experts of {ffn}x{hidden}, the model's are {}x{}",
                        spec.moe.expert_ffn, spec.hidden
                    ),
                });
            }
            let total = spec.moe.n_experts * spec.moe_layers().len();
            let cache = cache.with_max_slots(total.max(spec.moe.top_k));
            let cache = ExpertCache::new(source, CacheConfig { top_k: spec.moe.top_k, ..cache })?;
            Ok(Box::new(CachedExperts { cache }))
        })
    }

    /// Loads a model whose routed experts are read from the expert store at `store`
    /// (made by `hetmoe::storage::repack` from this model folder) through a byte-budgeted
    /// cache. The store must come from this checkpoint (checked).
    pub fn load_with_store(
        dir: impl AsRef<Path>,
        options: EngineOptions,
        store: impl AsRef<Path>,
        cache: CacheConfig,
    ) -> EngineResult<Self> {
        let store = hetmoe_storage::ExpertStore::open(store)?;
        store.check_source(dir.as_ref())?;
        tracing::info!(
            store = %store.path().display(),
            encoding = store.encoding().name(),
            budget_mb = cache.budget_bytes >> 20,
            policy = %cache.policy,
            "experts offloaded to the expert store"
        );
        Self::load_offloaded(dir, options, hetmoe_offload::StoreSource::new(store), cache)
    }

    fn build(
        dir: &Path,
        options: EngineOptions,
        experts: impl FnOnce(&ModelSpec) -> EngineResult<Box<dyn ExpertAccess>>,
    ) -> EngineResult<Self> {
        let (spec, ckpt) = open_model_dir(dir)?;
        let experts = experts(&spec)?;
        let weights = weights::load(&spec, &ckpt, options.weights, experts.is_resident())?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() { Some(TextTokenizer::from_file(&tok_path)?) } else { None };
        if options.threads == Some(0) {
            return Err(EngineError::InvalidOption {
                option: "threads",
                reason: "must be at least 1".into(),
            });
        }
        let threads = options
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
        let team = Team::new(threads).map_err(|e| EngineError::ThreadPool(e.to_string()))?;
        let inv_freq = hetmoe_cpu_kernels::rope::inv_freq(spec.rope.theta, spec.rope.rotary_dim);
        tracing::info!(arch = spec.arch.model_type(), layers = spec.n_layers, threads, "model loaded");
        Ok(Engine {
            model: Model { spec, weights, inv_freq, experts, prefetch_next_layer: options.prefetch },
            tokenizer,
            team,
            fallback_pool: std::sync::OnceLock::new(),
            dir: dir.to_path_buf(),
            kv_cache: options.kv_cache,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on the fallback rayon pool (on the global one if it cannot be built).
    fn run_on_fallback_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let pool = self.fallback_pool.get_or_init(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(self.team.threads())
                .thread_name(|i| format!("hetmoe-fallback-{i}"))
                .build()
                .ok()
        });
        match pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    pub fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tokenizer.as_ref()
    }

    /// Text → token ids with the folder's tokenizer.
    pub fn encode(&self, text: &str) -> EngineResult<Vec<u32>> {
        self.tokenizer.as_ref().ok_or(EngineError::NoTokenizer)?.encode(text)
    }

    /// Token ids → text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> EngineResult<String> {
        self.tokenizer.as_ref().ok_or(EngineError::NoTokenizer)?.decode(ids)
    }

    /// An empty sequence (KV cache) for this model.
    pub fn new_sequence(&self) -> Sequence {
        Sequence::new(&self.model.spec, self.kv_cache)
    }

    /// Feeds `tokens` to `seq` and returns logits (`[n, vocab]`, see [`LogitsMode`]).
    pub fn forward(&self, seq: &mut Sequence, tokens: &[u32], mode: LogitsMode) -> EngineResult<Vec<f32>> {
        let mut items = [BatchItem { seq, tokens }];
        let mut out = self.forward_batch(&mut items, mode, &mut NoObserver)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Feeds each item's tokens to its sequence in one batched pass; returns each item's
    /// logits. Each sequence gets exactly the numbers it would get alone.
    pub fn forward_batch(
        &self,
        items: &mut [BatchItem<'_>],
        mode: LogitsMode,
        observer: &mut (dyn ForwardObserver + Send),
    ) -> EngineResult<Vec<Vec<f32>>> {
        for item in items.iter() {
            self.check_tokens(item.tokens, item.seq.len())?;
            if item.tokens.is_empty() {
                return Err(EngineError::EmptyPrompt);
            }
        }
        for item in items.iter_mut() {
            item.seq.reserve(item.tokens.len());
        }
        // The batch borrows the first sequence's scratch buffers for the step.
        let mut scratch = items.first_mut().map(|i| std::mem::take(&mut i.seq.scratch)).unwrap_or_default();
        let step = || forward::forward(&self.model, items, mode, observer, &mut scratch);
        let result = self.team.try_install(step).unwrap_or_else(|step| self.run_on_fallback_pool(step));
        if let Some(first) = items.first_mut() {
            first.seq.scratch = scratch;
        }
        if result.is_err() {
            // A failed step (an expert that could not be read) leaves no half-written KV.
            for item in items.iter_mut() {
                item.seq.rollback();
            }
        }
        result
    }

    /// Bytes one decode step of one sequence must read from memory at `context` cached
    /// positions: every non-expert weight, the `top_k` routed experts of each MoE layer,
    /// one embedding row and the KV cache. The roofline of decode is this divided by the
    /// memory bandwidth.
    pub fn decode_bytes_per_token(&self, context: usize) -> u64 {
        let expert_bytes = self.model.experts.expert_bytes();
        self.model.weights.decode_bytes(&self.model.spec, context, expert_bytes, self.kv_cache.size_bytes())
    }

    /// Metrics of the expert cache, when experts are offloaded.
    pub fn expert_cache_metrics(&self) -> Option<CacheMetrics> {
        self.model.experts.metrics()
    }

    /// Zeroes the expert cache metrics (no-op when experts are resident).
    pub fn reset_expert_cache_metrics(&self) {
        self.model.experts.reset_metrics()
    }

    /// Checks ids against the vocabulary and the positions against the model's maximum.
    pub(crate) fn check_tokens(&self, tokens: &[u32], already: usize) -> EngineResult<()> {
        let spec = &self.model.spec;
        if let Some((position, &token)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= spec.vocab) {
            return Err(EngineError::TokenOutOfRange {
                token,
                position: already + position,
                vocab: spec.vocab,
            });
        }
        let needed = already + tokens.len();
        if needed > spec.max_positions {
            return Err(EngineError::ContextTooLong { needed, max: spec.max_positions });
        }
        Ok(())
    }
}

// The API promises this; a field that breaks it must fail the build.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
    send_sync::<Sequence>();
};
