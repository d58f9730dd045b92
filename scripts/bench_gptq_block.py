"""Time GPTQ on one decoder block of a given shape (random weights), e.g. Llama-2-7B:

    python scripts/bench_gptq_block.py --device cuda            # hidden 4096, MLP 11008, 32 heads
    python scripts/bench_gptq_block.py --hidden 256 --mlp 688 --heads 4 --samples 8 --seqlen 128   # CPU smoke

Builds a one-block Llama with random weights, feeds `samples` x `seqlen`
random tokens through the real driver (quantkit.pipeline.quantize_model) with
a GPTQ recipe, and reports the wall time of that block and the projection to
a 32-block model (32 x the per-block time; the capture of block 0's inputs is
counted once). Random weights: a claim about speed, not quality.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantkit.checkpoint.report import layer_rows
from quantkit.models import LoadedModel, family_for
from quantkit.pipeline import quantize_model
from quantkit.recipe import Recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="calibration forward dtype (recipe calibration.dtype)")
    p.add_argument("--blocks", type=int, default=32, help="blocks of the model the projection is for")
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=1,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seqlen)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    loaded = LoadedModel(model=model, tokenizer=None, family=family_for(config), source="random llama block")
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seqlen))
    recipe = Recipe.from_dict({"name": "gptq-block", "weights": {"group_size": args.group_size}, "algorithms": ["gptq"],
                               "calibration": {"num_samples": args.samples, "seqlen": args.seqlen, "dtype": args.dtype}})
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = quantize_model(loaded, recipe, ids, device=args.device)
    sync()
    total = time.perf_counter() - t0
    per_block = total - result.seconds["capture"]
    rows = layer_rows(result)
    out = {
        "shape": f"hidden {args.hidden}, MLP {args.mlp}, {args.heads} heads",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "tokens": args.samples * args.seqlen,
        "block_s": per_block,
        "breakdown_s": result.seconds,
        "projection_s": result.seconds["capture"] + args.blocks * per_block,
        "blocks": args.blocks,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
        "mean_output_rel_error": sum(r["output_rel_error"] for r in rows) / len(rows),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
