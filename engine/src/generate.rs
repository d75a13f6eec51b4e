//! Generation: prefill, then one decode step per new token, streaming each token out.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::engine::Engine;
use crate::error::{EngineError, EngineResult};
use crate::forward::{BatchItem, LogitsMode, NoObserver};
use crate::kv_cache::Sequence;
use crate::sampling::{Sampler, Sampling};
use crate::tokenizer::StreamDecoder;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop after emitting one of these ids (defaults to the config's `eos_token_id`).
    /// Empty: never stop early.
    pub stop_tokens: Option<Vec<u32>>,
    /// Keep the logits of every prompt position and of every step.
    pub keep_logits: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            sampling: Sampling::greedy(),
            stop_tokens: None,
            keep_logits: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated (it is included in `generated_ids`).
    Eos,
    MaxTokens,
    /// The callback asked to stop.
    Stopped,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub finish: FinishReason,
    /// `[n_prompt, vocab]` when `keep_logits`.
    pub prompt_logits: Option<Vec<f32>>,
    /// `[n_new, vocab]` when `keep_logits`: row t is what token t was chosen from.
    pub step_logits: Option<Vec<f32>>,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Generation {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_ids.len(), self.prefill_s)
    }
    /// Decode steps per second (the first token comes from the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.generated_ids.len().saturating_sub(1), self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

struct Running {
    seq: Sequence,
    sampler: Sampler,
    gen: Generation,
    done: bool,
}

impl Engine {
    fn validate(&self, prompt: &[u32], opts: &GenerateOptions) -> EngineResult<()> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        opts.sampling.validate()?;
        self.check_tokens(prompt, 0)?;
        let needed = prompt.len() + opts.max_new_tokens;
        if needed > self.spec().max_positions {
            return Err(EngineError::ContextTooLong { needed, max: self.spec().max_positions });
        }
        Ok(())
    }

    /// Generates from token ids, calling `on_token` with each new id as soon as it is
    /// chosen; return `ControlFlow::Break(())` from it to stop.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> EngineResult<Generation> {
        let mut out = self.generate_batch_with(&[prompt.to_vec()], opts, |_, id| on_token(id))?;
        Ok(out.remove(0))
    }

    /// Generates from text, calling `on_text` with each completed piece of decoded text.
    pub fn generate_text(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> EngineResult<Generation> {
        let tok = self.tokenizer().ok_or(EngineError::NoTokenizer)?;
        let ids = tok.encode(prompt)?;
        let mut dec = StreamDecoder::default();
        let mut err = None;
        let gen = self.generate(&ids, opts, |id| match dec.push(tok, id) {
            Ok(Some(piece)) => {
                on_text(&piece);
                ControlFlow::Continue(())
            }
            Ok(None) => ControlFlow::Continue(()),
            Err(e) => {
                err = Some(e);
                ControlFlow::Break(())
            }
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(gen),
        }
    }

    /// Generates for several prompts of any lengths at once: every step feeds all unfinished
    /// sequences in one batched forward pass. Each result equals that prompt run alone.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
    ) -> EngineResult<Vec<Generation>> {
        self.generate_batch_with(prompts, opts, |_, _| ControlFlow::Continue(()))
    }

    /// [`Engine::generate_batch`] with a callback `(prompt index, new id)`.
    pub fn generate_batch_with(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
    ) -> EngineResult<Vec<Generation>> {
        for p in prompts {
            self.validate(p, opts)?;
        }
        let stop = opts.stop_tokens.clone().unwrap_or_else(|| self.spec().eos_token_ids.clone());
        let mode = if opts.keep_logits { LogitsMode::All } else { LogitsMode::Last };
        let vocab = self.spec().vocab;
        let mut runs: Vec<Running> = prompts
            .iter()
            .map(|p| {
                let mut seq = self.new_sequence();
                seq.reserve(p.len() + opts.max_new_tokens);
                Running {
                    seq,
                    sampler: Sampler::new(&opts.sampling),
                    gen: Generation {
                        prompt_ids: p.clone(),
                        generated_ids: Vec::new(),
                        finish: FinishReason::MaxTokens,
                        prompt_logits: None,
                        step_logits: opts.keep_logits.then(Vec::new),
                        prefill_s: 0.0,
                        decode_s: 0.0,
                    },
                    done: opts.max_new_tokens == 0,
                }
            })
            .collect();
        if runs.is_empty() {
            return Ok(Vec::new());
        }

        // Prefill.
        let t0 = Instant::now();
        let logits = {
            let mut items: Vec<BatchItem<'_>> =
                runs.iter_mut().zip(prompts).map(|(r, p)| BatchItem { seq: &mut r.seq, tokens: p }).collect();
            self.forward_batch(&mut items, mode, &mut NoObserver)?
        };
        let prefill_s = t0.elapsed().as_secs_f64();
        for (i, (r, l)) in runs.iter_mut().zip(logits).enumerate() {
            r.gen.prefill_s = prefill_s;
            let last = &l[l.len() - vocab..];
            if opts.keep_logits {
                r.gen.prompt_logits = Some(l.clone());
            }
            if !r.done {
                Self::emit(r, last, &stop, opts, i, &mut on_token);
            }
        }

        // Decode: feed each unfinished sequence its last token.
        let t1 = Instant::now();
        loop {
            let active: Vec<usize> = (0..runs.len()).filter(|&i| !runs[i].done).collect();
            if active.is_empty() {
                break;
            }
            let feed: Vec<[u32; 1]> =
                active.iter().map(|&i| [*runs[i].gen.generated_ids.last().unwrap_or(&0)]).collect();
            let logits = {
                let mut items: Vec<BatchItem<'_>> = runs
                    .iter_mut()
                    .filter(|r| !r.done)
                    .zip(&feed)
                    .map(|(r, f)| BatchItem { seq: &mut r.seq, tokens: f })
                    .collect();
                self.forward_batch(&mut items, LogitsMode::Last, &mut NoObserver)?
            };
            for (&i, l) in active.iter().zip(logits) {
                Self::emit(&mut runs[i], &l, &stop, opts, i, &mut on_token);
            }
        }
        let decode_s = t1.elapsed().as_secs_f64();
        Ok(runs
            .into_iter()
            .map(|mut r| {
                r.gen.decode_s = decode_s;
                r.gen
            })
            .collect())
    }

    /// Samples the next token of `r` from `logits` and records it.
    fn emit(
        r: &mut Running,
        logits: &[f32],
        stop: &[u32],
        opts: &GenerateOptions,
        index: usize,
        on_token: &mut impl FnMut(usize, u32) -> ControlFlow<()>,
    ) {
        let id = r.sampler.sample(logits);
        r.gen.generated_ids.push(id);
        if let Some(s) = r.gen.step_logits.as_mut() {
            s.extend_from_slice(logits);
        }
        if stop.contains(&id) {
            r.gen.finish = FinishReason::Eos;
            r.done = true;
        } else if r.gen.generated_ids.len() >= opts.max_new_tokens {
            r.gen.finish = FinishReason::MaxTokens;
            r.done = true;
        }
        if on_token(index, id).is_break() {
            r.gen.finish = FinishReason::Stopped;
            r.done = true;
        }
    }
}
