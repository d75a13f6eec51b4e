#!/bin/bash
# One sitting against llama.cpp: for each model and format, hetmoe, llama.cpp, hetmoe again,
# back to back (this VM's memory bandwidth drifts within minutes; compare neighbours only).
#
#   BIN=target/release/examples/bench-decode DEPTH=0    bash tools/llama-baseline/sitting.sh
#   BIN=target/release/examples/bench-decode DEPTH=1024 bash tools/llama-baseline/sitting.sh
#
# DEPTH=0: prefill of 128 tokens and 64 decoded (`llama-bench -p 128 -n 64`). DEPTH=N: 64
# tokens decoded after an N-token context (`llama-bench -p 0 -n 64 -d N`; hetmoe
# `--prompt-len N`), hetmoe once with the exact f32 KV cache and once with bf16 (llama.cpp's
# cache is f16). Models are `make-model` presets in /tmp/MODEL, GGUFs in
# $GGUF/MODEL-{bf16,q8_0,q4_0-pure}.gguf: Q4_0 made with `llama-quantize --pure`, every matrix
# Q4_0 as in hetmoe q4 (by default llama-quantize keeps lm_head Q6_K and attn_k/v Q8_0,
# about 8% more bytes per mixtral-bench token; Q4_GGUF=q4_0 selects that file)
# (README.md here). MODELS and WEIGHTS override the lists.
LB=${LLAMA_BENCH:-/tmp/baselines/llama.cpp/build/bin/llama-bench}
GGUF=${GGUF:-/tmp/baselines/gguf}
BIN=${BIN:-target/release/examples/bench-decode}
DEPTH=${DEPTH:-0}
declare -A F=([bf16]=bf16 [q8]=q8_0 [q4]=${Q4_GGUF:-q4_0-pure})
hetmoe() { # weights kv-cache prompt-len
  $BIN --model /tmp/$M --weights $1 --kv-cache $2 --threads 2 --prompt-len $3 --gen-len 64 2>/dev/null | tail -1 |
    python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("decode %.1f (%s) prefill %.1f bw %.1f roof %.1f%%" % (d["decode_tok_s"], ", ".join("%.1f" % x for x in d["decode_tok_s_runs"]), d["prefill_tok_s"], d["mem_bw_gbs"], 100 * d["roofline_fraction"]))'
}
llama() { # llama-bench arguments
  LD_LIBRARY_PATH=$(dirname $LB) $LB -m $GGUF/$M-${F[$W]}.gguf -t 2 -r 3 -o csv "$@" 2>/dev/null |
    python3 -c 'import csv,sys
for r in csv.DictReader(sys.stdin):
    print("%s %.1f +- %.1f" % ("pp" + r["n_prompt"] if r["n_prompt"] != "0" else "tg" + r["n_gen"], float(r["avg_ts"]), float(r["stddev_ts"])), end="  ")'
  echo
}
for M in ${MODELS:-mixtral-bench qwen3-moe-bench}; do for W in ${WEIGHTS:-bf16 q8 q4}; do
  if [ "$DEPTH" = 0 ]; then
    echo "$(date +%H:%M:%S) hetmoe $M $W: $(hetmoe $W f32 128)"
    echo "$(date +%H:%M:%S) llama.cpp $M $W: $(llama -p 128 -n 64)"
    echo "$(date +%H:%M:%S) hetmoe $M $W: $(hetmoe $W f32 128)"
  else
    echo "$(date +%H:%M:%S) hetmoe f32 KV $M $W p$DEPTH: $(hetmoe $W f32 $DEPTH)"
    echo "$(date +%H:%M:%S) llama.cpp $M $W d$DEPTH: $(llama -p 0 -n 64 -d $DEPTH)"
    echo "$(date +%H:%M:%S) hetmoe bf16 KV $M $W p$DEPTH: $(hetmoe $W bf16 $DEPTH)"
  fi
done; done
