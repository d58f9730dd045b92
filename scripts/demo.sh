#!/usr/bin/env bash
# The main job on the bundled defaults: set up, quantize SmolLM2-135M-Instruct
# with the default recipe, and evaluate it beside the float model on the three
# bundled held-out texts (Austen, the Python docs and the King James Bible).
#   WINDOWS=100 bash scripts/demo.sh    # more windows = tighter numbers, longer run
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${QUANTKIT_VENV:-.venv}/bin/activate"
out="${OUT:-out/smollm2-w4a16-rtn}"
quantkit quantize --recipe "${RECIPE:-w4a16-rtn}" --out "$out" --force
quantkit eval "$out" --baseline default --windows "${WINDOWS:-40}"
