"""Does quantkit's engine reproduce transformers on YOUR model? Greedy tokens of the engine against
transformers' generate on prompts cut from the two bundled evaluation texts, for the float model and
(with --recipe) its quantized checkpoint read back through our reader; both run the same modules, so
any difference is the engine's layer math, attention or cache, not the quantization.

    python scripts/check_engine_model.py --model gemma-3-270m.gguf --recipe w4a16-rtn --tokens 32

Prints a table (prompts whose greedy tokens all match, the first position where a prompt's tokens
part, tokens/s of both on this machine) and writes JSON with --json-out. On the CPU in float32 a
mismatch is a bug; in 16 bits on a GPU two near-tied logits may round apart, which the table shows
as a late first divergence.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantkit import api
from quantkit.calibration import evaluation_tokens
from quantkit.engine.config import EngineConfig
from quantkit.engine.engine import Engine
from quantkit.engine.sequence import SamplingParams
from quantkit.models import load_model


def prompts_from(tokenizer, texts: list[str], n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens, spread evenly over each text's token stream."""
    out = []
    for text in texts:
        ids = evaluation_tokens(tokenizer, text)
        step = (len(ids) - length) // max(n, 1)
        out += [ids[i * step: i * step + length].tolist() for i in range(n)]
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def compare(loaded, prompts: list[list[int]], tokens: int, device: str) -> dict:
    model = loaded.model
    t = time.perf_counter()
    expected = []
    for p in prompts:
        out = model.generate(torch.tensor([p], device=device), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
        expected.append(out[0, len(p):].tolist())
    hf_s = time.perf_counter() - t
    engine = Engine(loaded, EngineConfig(max_model_len=max(map(len, prompts)) + tokens + 8))
    t = time.perf_counter()
    seqs = engine.generate(prompts, SamplingParams(max_tokens=tokens))
    engine_s = time.perf_counter() - t
    got = [s.output_ids for s in seqs]
    parts = [first_divergence(g, e) for g, e in zip(got, expected)]
    return {"prompts": len(prompts), "equal": sum(p is None for p in parts),
            "first_divergence": [p for p in parts if p is not None],
            "hf_tokens_per_s": len(prompts) * tokens / hf_s, "engine_tokens_per_s": len(prompts) * tokens / engine_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--recipe", default=None, help="also check this recipe's checkpoint")
    p.add_argument("--data", nargs="+", default=["austen-eval", "pydocs-eval"])
    p.add_argument("--prompts", type=int, default=4, help="per text")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    base = load_model(args.model)
    prompts = prompts_from(base.tokenizer, args.data, args.prompts, args.prompt_len)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe:  # quantized from the float model before it moves: the checkpoint read back
            api.quantize(args.model, args.recipe, Path(tmp) / "q", show_progress=False)
        base.model.to(args.device)
        runs["float"] = compare(base, prompts, args.tokens, args.device)
        if args.recipe:
            q = api.load(Path(tmp) / "q")
            q.model.to(args.device)
            runs[args.recipe] = compare(q, prompts, args.tokens, args.device)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()})"
    table = Table(title=f"engine greedy vs transformers generate, {args.tokens} tokens, {where}, "
                        f"{base.model.config.model_type}")
    for col in ("model", "prompts", "all tokens equal", "first divergence", "HF tok/s", "engine tok/s"):
        table.add_column(col, justify="right")
    for name, r in runs.items():
        table.add_row(name, str(r["prompts"]), str(r["equal"]), ", ".join(map(str, r["first_divergence"])) or "-",
                      f"{r['hf_tokens_per_s']:.1f}", f"{r['engine_tokens_per_s']:.1f}")
    Console().print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": args.model, "where": where, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
