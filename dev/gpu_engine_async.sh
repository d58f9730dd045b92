#!/bin/bash
# dev (next GPU session): asynchronous decoding measured. Call after dev/gpu_engine_a.sh parked the first GGUF
# part (carry gpu/gguf.part.ab gpu/gguf.sha256 gpu/gguf-0.19.0-py3-none-any.whl): the engine GPU tests, the 7B
# shape with async off / on, SmolLM2 through `quantkit eval --speed` with async off / on.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
cat ~/qk/gguf.part.aa gpu/gguf.part.ab > ~/qk/model.gguf && (cd ~/qk && sha256sum -c $OLDPWD/gpu/gguf.sha256) || echo "MODEL MISSING"
python -m pip install -q --no-deps gpu/gguf-0.19.0-py3-none-any.whl 2>&1 | tail -1
timeout 200 python -m pytest -x -q tests/test_engine_gpu.py tests/test_engine_ops.py 2>&1 | tail -2
PDL_MODES=1 ASYNC_MODES="0 1" timeout 200 python dev/engine7b_ab.py 2>&1 | grep -v Warn | tee $OUT/ab.txt
for a in "" "--async-decode"; do
  timeout 150 python -m quantkit.cli eval ~/qk/model.gguf --speed --batch-sizes 1,8,64 $a --json > $OUT/smol$a.json 2>/dev/null
  python -c "import json,sys; [print(sys.argv[1] or 'sync', r['batch'], round(r['decode_tokens_per_s'],1), round(r['tpot_ms_mean'],3), round(r['ttft_ms_p50'],1)) for r in json.load(open(sys.argv[2]))['results']]" "$a" $OUT/smol$a.json
done
