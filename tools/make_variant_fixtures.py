"""Variant fixtures: tiny random MoE checkpoints whose shapes differ from the main fixtures
(tied embeddings, no GQA / strong GQA, top-1 and top-3 routing, dense layers, sliding
window, clip_qkv, attention bias, renormalised and raw top-k), with the logits and greedy
tokens that Hugging Face transformers computes for them in float32.

Usage: python tools/make_variant_fixtures.py OUT_DIR   (needs torch, transformers 4.57)
Writes OUT_DIR/<name>/model/{config.json, model.safetensors} and
OUT_DIR/<name>/reference.safetensors with int64 `prompt_ids`, `generated_ids` and float32
`full_logits` (no-cache forward over prompt + generated), `gen_step_logits`.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2)

VARIANTS = {
    # Tied embeddings, no GQA, top-1 of 4 experts, head_dim set apart from hidden/heads,
    # sliding window shorter than the sequence.
    "mixtral_tied_top1_window": (MixtralForCausalLM, MixtralConfig(
        hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, num_local_experts=4, num_experts_per_tok=1,
        rope_theta=10000.0, sliding_window=7, tie_word_embeddings=True, **COMMON)),
    # Dense layers through decoder_sparse_step and mlp_only_layers, renormalised top-3,
    # GQA 8:2, shared expert with its gate.
    "qwen2_moe_dense_layers": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
        hidden_size=64, intermediate_size=80, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
        decoder_sparse_step=2, mlp_only_layers=[3], rope_theta=1e6, **COMMON)),
    # Attention bias, tied embeddings, GQA 6:3, raw top-2 probabilities.
    "qwen3_moe_bias_tied": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, head_dim=8, num_experts=5,
        num_experts_per_tok=2, norm_topk_prob=False, attention_bias=True,
        tie_word_embeddings=True, rope_theta=5e4, **COMMON)),
    # clip_qkv active, renormalised top-2, GQA 4:1.
    "olmoe_clip_norm": (OlmoeForCausalLM, OlmoeConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        clip_qkv=0.4, rope_theta=10000.0, **COMMON)),
}


def init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if not p.is_floating_point():
                continue
            if "norm" in name:
                p.copy_(1 + 0.15 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def main(out):
    torch.set_num_threads(1)
    for i, (name, (cls, cfg)) in enumerate(VARIANTS.items()):
        d = Path(out) / name
        torch.manual_seed(i)
        model = cls(cfg)
        init(model, 1000 + i)
        model = model.to(torch.bfloat16)
        model.save_pretrained(d / "model", safe_serialization=True)
        ref = cls.from_pretrained(d / "model", dtype=torch.float32, attn_implementation="eager").eval()
        prompt = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(77 + i))
        with torch.no_grad():
            gen = ref.generate(prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                               eos_token_id=None, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True, use_cache=True)
            full = gen.sequences
            full_logits = ref(full, use_cache=False).logits[0]
        save_file({
            "prompt_ids": prompt[0].contiguous(),
            "generated_ids": full[0, 20:].contiguous(),
            "full_logits": full_logits.float().contiguous(),
            "gen_step_logits": torch.stack([l[0] for l in gen.logits]).float().contiguous(),
        }, d / "reference.safetensors")
        print(name, "generated", full[0, 20:].tolist())


if __name__ == "__main__":
    main(sys.argv[1])
