#!/usr/bin/env bash
# W8A8 on a GPU (device tool), in two back-to-back calls: the real model travels as its
# GGUF in two parts (gpu/gguf.part.aa, .ab; DESIGN.md), kept in ~/qk between the calls
# (the second call leaves it joined at ~/qk/model.gguf, for scripts/gpu_bench_awq.sh too).
#
#   bash scripts/gpu_bench_w8a8.sh kernels           # call 1 (carry gpu/gguf.part.aa): GPU tests + matmul baselines
#   bash scripts/gpu_bench_w8a8.sh quality RECIPES   # call 2 (carry gpu/gguf.part.ab, gpu/gguf.sha256, gpu/gguf-*.whl):
#                                                    # quantize + perplexity on the GPU
#
# gpu/ (git-ignored) is made on the CPU machine, from the repository root with .venv active:
#   mkdir -p gpu && gguf=$(python -c "from quantkit.models.loader import default_model_path as p; print(p())")
#   split -b 50M "$gguf" gpu/gguf.part. && sha256sum < "$gguf" | cut -d' ' -f1 > gpu/gguf.sha256
#   python -m pip download --no-deps -d gpu gguf    # the GPU machine has no gguf package
set -euo pipefail
mode=$1
out=${OUT:-/tmp}
mkdir -p ~/qk
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
if [ "$mode" = kernels ]; then
    cp gpu/gguf.part.aa ~/qk/
    python3 -m pytest -q -p no:cacheprovider tests/test_w8a8.py tests/test_kernels.py > "$out/pytest.txt" 2>&1 || true
    tail -3 "$out/pytest.txt"
    PYTHONPATH=. python3 scripts/bench_w8a8_kernels.py --json-out "$out/w8a8_kernels.json" 2>&1 | tee "$out/kernels.txt"
else
    shift
    cp gpu/gguf.part.ab ~/qk/
    cat ~/qk/gguf.part.aa ~/qk/gguf.part.ab > ~/qk/model.gguf
    echo "$(cat gpu/gguf.sha256)  $HOME/qk/model.gguf" | sha256sum -c -
    python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps gpu/gguf-*.whl
    PYTHONPATH=. python3 scripts/bench_quality.py --model ~/qk/model.gguf --device cuda --backends ${BACKENDS:-auto reference} \
        --hf-windows 0 --windows 100 --recipes "$@" --json-out "$out/w8a8_quality.json" 2>"$out/quality.err" | tail -40
fi
