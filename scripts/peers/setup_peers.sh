#!/usr/bin/env bash
# Create the peer tools' virtual environments for scripts/bench_gptq.py, each in its own venv
# under /tmp (never in the repo), CPU torch first and pinned, as /work/shared/PEERS.md says:
#
#   /tmp/peer-llmc       llmcompressor==0.14.0.1
#   /tmp/peer-gptqmodel  gptqmodel==7.6.0   (7.7.0 needs torch >= 2.14.1 and pulls a CUDA build)
#
# Idempotent: a venv whose python already imports its tool at the pinned version is left alone;
# a half-made one is removed and made again.
#
#   bash scripts/peers/setup_peers.sh              # both
#   bash scripts/peers/setup_peers.sh gptqmodel    # one (llmc | gptqmodel)
set -euo pipefail

PY=${PYTHON:-python3}
TORCH=${PEER_TORCH:-2.13.0}
PIN=$(mktemp /tmp/peer-torch-pin.XXXXXX.txt)
trap 'rm -f "$PIN"' EXIT
echo "torch==$TORCH" > "$PIN"

# name -> venv, pip requirement, import name, expected version
declare -A VENV=([llmc]=/tmp/peer-llmc [gptqmodel]=/tmp/peer-gptqmodel)
declare -A REQ=([llmc]=llmcompressor==0.14.0.1 [gptqmodel]=gptqmodel==7.6.0)
declare -A MOD=([llmc]=llmcompressor [gptqmodel]=gptqmodel)

works() {  # venv module version
  [ -x "$1/bin/python" ] && GPTQMODEL_CPU_WORKERS=2 "$1/bin/python" - "$2" "$3" "$TORCH" <<'PY' >/dev/null 2>&1
import importlib, importlib.metadata as md, sys
mod, want, torch_want = sys.argv[1:]
assert md.version(mod) == want, md.version(mod)
import torch
assert torch.__version__.split("+")[0] == torch_want and torch.version.cuda is None, torch.__version__
importlib.import_module(mod)
PY
}

setup() {
  local name=$1 venv=${VENV[$1]} req=${REQ[$1]} mod=${MOD[$1]}
  local version=${req#*==}
  if works "$venv" "$mod" "$version"; then
    echo "[$name] $venv already has $req on torch $TORCH: skipped"
    return
  fi
  echo "[$name] creating $venv with $req"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "torch==$TORCH"
  "$venv/bin/pip" install -q -c "$PIN" "$req"
  if ! works "$venv" "$mod" "$version"; then
    echo "[$name] $venv was installed but does not import $req on CPU torch $TORCH" >&2
    exit 1
  fi
  echo "[$name] ok: $("$venv/bin/pip" list 2>/dev/null | grep -iE "^(torch|transformers|$mod|compressed-tensors) " | tr -s ' ' | paste -sd, -)"
}

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(llmc gptqmodel)
for n in "${names[@]}"; do
  [ -n "${VENV[$n]:-}" ] || { echo "unknown peer '$n' (choose: ${!VENV[*]})" >&2; exit 2; }
  setup "$n"
done
