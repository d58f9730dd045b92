"""What every GPTQ benchmark runner shares: the inputs folder, the NLL, peak RSS, the result line.

Imported by scripts/bench_gptq.py (quantkit's venv) and by the peer runners
(each in its own venv), so it needs only the standard library, torch and
safetensors, never quantkit.

The shared folder, written once by ``bench_gptq.py prepare``::

    model/                  float Hugging Face folder (save_pretrained model + tokenizer)
    calibration.safetensors {"input_ids": [N, seqlen] int64}
    eval.safetensors        {"austen-eval": [W, seqlen] int64, "pydocs-eval": [W, seqlen] int64}
    manifest.json           how they were made, and on which machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

EVAL_SETS = ("austen-eval", "pydocs-eval")


def runner_args(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The arguments every runner takes (a runner adds its own)."""
    p = argparse.ArgumentParser(description=description, add_help=add_help)
    p.add_argument("--inputs", type=Path, default=Path("runs/gptq-bench"), help="folder made by `bench_gptq.py prepare`")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point); default symmetric")
    p.add_argument("--calib-samples", type=int, default=None, help="use the first N calibration rows (default: all)")
    p.add_argument("--windows", type=int, default=None, help="use the first W evaluation windows (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward in the evaluation")
    return p


def _slice(t: torch.Tensor, n: int | None, what: str, path: Path) -> torch.Tensor:
    if n is None:
        return t
    if not 0 < n <= t.shape[0]:
        raise SystemExit(f"{what}: asked for {n} rows, {path} holds {t.shape[0]} (re-run `bench_gptq.py prepare` with more)")
    return t[:n]


def load_inputs(folder: Path, calib_samples: int | None = None, windows: int | None = None):
    """(manifest, calibration ids [N, seqlen], {eval set: windows [W, seqlen]})."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{manifest_path} not found: run `python scripts/bench_gptq.py prepare --out {folder}` first")
    manifest = json.loads(manifest_path.read_text())
    calib = _slice(load_file(folder / "calibration.safetensors")["input_ids"], calib_samples, "calibration", folder)
    evals = load_file(folder / "eval.safetensors")
    evals = {name: _slice(evals[name], windows, name, folder) for name in EVAL_SETS}
    return manifest, calib.contiguous(), {k: v.contiguous() for k, v in evals.items()}


def calibration_dicts(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """[N, seqlen] -> N dicts of input_ids / attention_mask [1, seqlen] (all ones: no padding)."""
    return [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in ids]


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(sum of next-token NLL over all windows / (W * (seqlen - 1))): the formula of
    quantkit/eval/perplexity.py; each window scored on its own, logits compared in float32."""
    total = 0.0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(next(model.parameters()).device)  # [b, seqlen]
        logits = model(input_ids=ids, use_cache=False).logits  # [b, seqlen, vocab]
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
        ))
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def peak_rss_mb() -> float:
    """The process's peak resident set so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_clock() -> tuple[float, float, float]:
    """(wall s, this process's CPU s, the whole machine's busy CPU s from /proc/stat) now."""
    busy = float("nan")
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), time.process_time(), busy


def timing(start: tuple[float, float, float], end: tuple[float, float, float]) -> dict[str, float]:
    """Wall and CPU seconds between two cpu_clock()s, and the CPU seconds other processes took
    meanwhile (others_cpu_s > 0 means the timing shared the machine; the lock keeps out only
    those who take it)."""
    wall, cpu, busy = (b - a for a, b in zip(start, end))
    return {"quantize_s": wall, "quantize_cpu_s": cpu, "others_cpu_s": max(busy - cpu, 0.0)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def emit(result: dict) -> None:
    """Print the runner's one JSON result line, last on stdout (the tools log around it)."""
    result.setdefault("machine", machine())
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The result a runner printed with emit() (the last JSON object line naming a tool), or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "tool" in obj and "ppl" in obj:
                return obj
    return None
