"""Digests of the checkpoints recipes write: proof that a refactor changed no tensor.

    python scripts/checkpoint_digest.py make --model MODEL --recipes w4a16-rtn w4a16-gptq ... \
        --num-samples 16 --out runs/digest/before.json
    python scripts/checkpoint_digest.py compare runs/digest/before.json runs/digest/after.json

`make` quantizes MODEL (the bundled SmolLM2 when left out; a folder, .gguf or
"tiny" for a 2-block random Llama built on the spot) with each recipe, then
records the sha256 of every tensor of every checkpoint, and the report's
held-back perplexities. `compare` prints, per recipe, how many tensors are
equal, which differ (with the largest absolute difference when both files
are at hand) and the two perplexities; its exit code is 1 when any differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open


def tensor_digests(folder: Path) -> dict[str, str]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                out[key] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
    return out


def _tiny_model(folder: Path) -> Path:
    """A 2-block random Llama (hidden 96, like the tests') with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from quantkit.calibration import load_texts

    words = sorted(set(load_texts("austen")[0][:200_000].split()))[:2000]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(words) + 2, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make(args) -> None:
    from quantkit import api

    digests = {}
    with tempfile.TemporaryDirectory(prefix="quantkit-digest-") as tmp:
        model = str(_tiny_model(Path(tmp) / "tiny")) if args.model == "tiny" else args.model
        for recipe in args.recipes:
            out = Path(tmp) / recipe
            report = api.quantize(model, recipe, out, num_samples=args.num_samples, seqlen=args.seqlen,
                                  device=args.device, show_progress=False)
            held = report.get("held_out") or {}
            digests[recipe] = {"tensors": tensor_digests(out), "float_perplexity": held.get("float_perplexity"),
                               "quantized_perplexity": held.get("quantized_perplexity")}
            Console(stderr=True).print(f"{recipe}: {len(digests[recipe]['tensors'])} tensors, held-back perplexity "
                                       f"{held.get('quantized_perplexity')}", highlight=False, markup=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "num_samples": args.num_samples, "seqlen": args.seqlen,
                                    "recipes": digests}, indent=1))


def compare(args) -> int:
    a, b = (json.loads(p.read_text())["recipes"] for p in (args.before, args.after))
    table = Table(title=f"{args.before.name} vs {args.after.name}")
    for col in ("recipe", "tensors equal", "differ", "held-back ppl before", "after"):
        table.add_column(col)
    failed = False
    for recipe in sorted(set(a) | set(b)):
        ta, tb = a.get(recipe, {}).get("tensors", {}), b.get(recipe, {}).get("tensors", {})
        differ = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
        failed |= bool(differ)
        ppl = [d.get(recipe, {}).get("quantized_perplexity") for d in (a, b)]
        table.add_row(recipe, f"{len(set(ta) & set(tb)) - len([k for k in differ if k in ta and k in tb])}/{len(ta)}",
                      ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else ""),
                      *[f"{p:.4f}" if isinstance(p, float) else "-" for p in ppl])
    Console().print(table)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--model", default=None, help="a model folder or .gguf, 'tiny', or left out: the bundled SmolLM2")
    m.add_argument("--recipes", nargs="+", required=True)
    m.add_argument("--num-samples", type=int, default=None)
    m.add_argument("--seqlen", type=int, default=None)
    m.add_argument("--device", default="cpu")
    m.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
