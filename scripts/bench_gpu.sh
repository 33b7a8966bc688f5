#!/usr/bin/env bash
# The GPU point of the benchmark: Phi-3-mini's shape with random weights (nothing downloaded),
# 4-bit NF4 QLoRA, sequences of 512 tokens, bf16 autocast, ours against TRL, MFU over the card's
# measured bf16 peak. Needs a CUDA GPU and TRL (pip install -e '.[bench]').
#   bash scripts/bench_gpu.sh [results dir]
# Writes <dir>/phi3-mini-random_4bit_<gpu>_{sft,dpo}.json (SFT first: it carries the MFU).
set -euo pipefail
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
work=${QOD_BENCH_WORKDIR:-/tmp/qod-bench-gpu}
gpu=$("$py" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
name="$out/phi3-mini-random_4bit_$gpu"
# --prompt-repeat: each request written 30 times over, cut from the left, so every row is 512 tokens.
common=(--model phi3-mini --device cuda --quant 4bit --max-length 512 --prompt-repeat 30
  --steps 32 --warmup-steps 2 --threads 8 --workdir "$work" --compare trl)
"$py" -m qod_lightning bench "${common[@]}" --stages sft --batch-size 8 --out "${name}_sft.json"
"$py" -m qod_lightning bench "${common[@]}" --stages dpo --batch-size 4 --trl-dpo default --out "${name}_dpo.json"
