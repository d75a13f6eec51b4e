#!/usr/bin/env python3
"""Converts a `make-model` benchmark checkpoint (random weights, no tokenizer) to GGUF with
llama.cpp's own `convert_hf_to_gguf.py`, so llama.cpp runs the very weights hetmoe runs.

All tensor mapping (expert stacking into blk.N.ffn_{gate,up,down}_exps, the router, the q/k
RoPE permutation) is llama.cpp's; this script only replaces the vocabulary step, which needs
tokenizer files the benchmark checkpoints do not have, with a dummy SentencePiece-style
vocabulary of the config's size (<unk>, <s>, </s>, 256 byte tokens, placeholders).
llama-bench feeds random token ids, so the vocabulary's contents do not matter.

Usage (LLAMA_CPP points at a llama.cpp source tree, default /tmp/baselines/llama.cpp):
  python convert_bench_to_gguf.py /tmp/mixtral-bench --outtype bf16 --outfile mixtral-bench-bf16.gguf
  python convert_bench_to_gguf.py /tmp/qwen3-moe-bench --outtype bf16 --outfile qwen3-moe-bench-bf16.gguf
"""
import os
import sys
from pathlib import Path

LLAMA_CPP = Path(os.environ.get("LLAMA_CPP", "/tmp/baselines/llama.cpp"))
sys.path.insert(0, str(LLAMA_CPP))
sys.path.insert(1, str(LLAMA_CPP / "gguf-py"))
import gguf  # noqa: E402  (llama.cpp's own gguf-py)
import convert_hf_to_gguf as conv  # noqa: E402
from conversion.llama import LlamaModel  # noqa: E402  (Mixtral converts through it)
from conversion.qwen import Qwen3MoeModel  # noqa: E402

T = gguf.TokenType


def dummy_vocab(self):
    n = self.hparams["vocab_size"]
    tokens, scores, types = [b"<unk>", b"<s>", b"</s>"], [0.0, 0.0, 0.0], [T.UNKNOWN, T.CONTROL, T.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>".encode())
        scores.append(0.0)
        types.append(T.BYTE)
    i = 0
    while len(tokens) < n:
        tokens.append(f"\u2581tok{i}".encode())
        scores.append(-float(i))
        types.append(T.NORMAL)
        i += 1
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


LlamaModel.set_vocab = dummy_vocab
Qwen3MoeModel.set_vocab = dummy_vocab

if __name__ == "__main__":
    conv.main()
