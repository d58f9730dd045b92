#!/usr/bin/env bash
# AWQ / GPTQ / RTN of quantkit, and llm-compressor's AWQModifier, on the real SmolLM2 on a GPU
# (device tool), same calibration ids and windows as the CPU benchmark (runs/gptq-bench, made by
# `python scripts/bench_gptq.py prepare` on the CPU machine and carried). The model travels as its
# GGUF (DESIGN.md: joined from two carried parts, as scripts/gpu_bench_w8a8.sh does: GGUF is then
# ~/qk/model.gguf), llm-compressor as wheels installed to ~/llmc, not into the image.
#
#   bash scripts/gpu_bench_awq.sh GGUF BITS "ours recipes" [llmc]      # JSON lines to $OUT/gpu.jsonl
#
# Carried from gpu/ (git-ignored; see scripts/gpu_bench_w8a8.sh for the GGUF parts and the gguf wheel):
# gpu/gguf-*.whl and, for llmc, gpu/wheels/: llm-compressor 0.14.0.1's wheel and the wheels of
# those of its requirements the GPU image lacks, for the image's Python (cp312).
set -euo pipefail
gguf=$1 bits=$2 recipes=$3 peer=${4:-}
out=${OUT:-/tmp}
trap 'tail -5 "$out"/*.err' ERR
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps gpu/gguf-*.whl
common=(--inputs runs/gptq-bench --bits "$bits" --group-size 64 --asym --batch-size 16)
show() { python3 -c "
import json, sys
for r in map(json.loads, sys.stdin):
    print(r.get('recipe', r['tool'] + ' ' + r.get('algorithm', '')), r['bits'], round(r['quantize_s'], 1), {k: round(v, 2) for k, v in r['ppl'].items()})"; }
for r in $recipes; do
    PYTHONPATH=. python3 scripts/bench_gptq.py run-ours --recipe "$r" "${common[@]}" --device cuda --model "$gguf" \
        --calib-dtype float32 2>>"$out/ours.err" | grep '^{' | tee -a "$out/gpu.jsonl" | show
done
if [ "$peer" = llmc ]; then
    [ -d ~/llmc ] || python3 -m pip install -q --no-deps --target ~/llmc gpu/wheels/*.whl
    hf=$(dirname "$gguf")/hf  # llm-compressor wants a Hugging Face folder (config, tokenizer): the same weights, saved once
    [ -f "$hf/config.json" ] || PYTHONPATH=. python3 -c "
from quantkit.models import load_model
m = load_model('$gguf', dtype='float32'); m.model.save_pretrained('$hf'); m.tokenizer.save_pretrained('$hf')" 2>>"$out/llmc.err"
    PYTHONPATH=~/llmc python3 scripts/peers/run_llmcompressor.py --algo awq "${common[@]}" --model "$hf" \
        2>>"$out/llmc.err" | grep '^{' | tee -a "$out/gpu.jsonl" | show || tail -20 "$out/llmc.err"
fi
