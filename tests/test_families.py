"""The dense families beside Llama (Qwen3, Gemma 2, Gemma 3, Phi-3) from quantize to checkpoint to
perplexity, on tiny random models built from transformers' own config classes (tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import assert_rotation_refused, make_tiny_family_model, refused_rotation
from quantkit import api
from quantkit.algorithms.awq import AWQ, AWQOptions
from quantkit.algorithms.base import Scales
from quantkit.algorithms.folding import apply_transforms, fold_into_previous
from quantkit.checkpoint import load_checkpoint
from quantkit.errors import UnsupportedModelError
from quantkit.eval import perplexity
from quantkit.forwards import blocks_of, capture_block_inputs, observe, propagate
from quantkit.models import FAMILIES, Mapping, family_for, load_model
from quantkit.models.families import LLAMA, attention_implementation, layer_types
from quantkit.nn import IntWeightLinear, W8A8Linear
from quantkit.pipeline import _input_groups, _targets, quantize_model
from quantkit.recipe import Recipe, list_recipes

NEW = ["qwen3", "gemma2", "gemma3", "phi3"]
LINEARS = {"qwen3": 14, "gemma2": 21, "gemma3": 21, "phi3": 8}  # quantized linears of each tiny model
IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
_DIRS: dict[tuple, Path] = {}


def tiny(tmp_path_factory, family: str, **overrides) -> Path:
    """The tiny model of `family`, built once per session (and per set of overrides)."""
    key = (family, *sorted(overrides.items()))
    if key not in _DIRS:
        _DIRS[key] = make_tiny_family_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, **overrides)
    return _DIRS[key]


def _recipe(weights: dict, scheme: str = "W4A16", acts: dict | None = None, algorithms=("rtn",)) -> Recipe:
    return Recipe.from_dict({"name": "t", "scheme": scheme, "weights": weights, "algorithms": list(algorithms),
                             **({"activations": acts} if acts else {}),
                             "calibration": {"num_samples": 4, "seqlen": 32, "dtype": "model"}})


# --------------------------------------------------------------------------- the table

def test_readme_lists_the_family_table():
    """README's table of supported families is FAMILIES: one row per family, its model types."""
    readme = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
    block = readme.split("<!-- families: -->", 1)[1].split("<!-- /families -->", 1)[0]
    rows = [r.strip() for r in block.strip().splitlines()[2:] if r.strip().startswith("|")]
    listed = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        listed[cells[0].strip("`")] = tuple(sorted(re.findall(r"`([^`]+)`", cells[1])))
    assert listed == {name: tuple(sorted(f.model_types)) for name, f in FAMILIES.items()}


def test_multimodal_gemma3_is_refused_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="multimodal Gemma 3.*gemma3_text"):
        family_for(type("C", (), {"model_type": "gemma3"})())


@pytest.mark.parametrize("family", NEW)
def test_each_tiny_model_finds_its_family(tmp_path_factory, family):
    loaded = load_model(tiny(tmp_path_factory, family))
    assert loaded.family is FAMILIES[family]
    for rel in loaded.family.linears:  # every linear the table names exists, in every block
        assert all(isinstance(b.get_submodule(rel), torch.nn.Linear) for b in blocks_of(loaded))


# --------------------------------------------------------------------------- folding

class _FixedScales(AWQ):
    """AWQ whose scale search returns fixed random scales: every mapping that can fold is folded."""

    def propose_scales(self, names, weights, specs, rounder):
        s = torch.rand(weights[0].shape[1], generator=torch.Generator().manual_seed(len(names))) * 3 + 0.2
        return Scales(scales=s, alpha=0.5)


def test_fold_into_a_one_plus_w_norm():
    """(1 + w') = (1 + w) / s: the norm's output is divided by s."""
    w, s = torch.randn(8) * 0.3, torch.rand(8) + 0.5
    folded = w.clone()
    fold_into_previous(folded, None, s, offset=1.0)
    torch.testing.assert_close(1 + folded, (1 + w) / s)


@pytest.mark.parametrize("family,kv_heads", [(f, 2) for f in NEW] + [("phi3", 4)], ids=[*NEW, "phi3-mha"])
def test_folding_keeps_the_float_block(tmp_path_factory, family, kv_heads):
    """Random scales on every mapping, folded: each block computes the same function
    (Gemma: into (1 + w) norms; Phi-3: into parts of the packed linears' rows)."""
    loaded = load_model(tiny(tmp_path_factory, family, num_key_value_heads=kv_heads))
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(loaded, ids, "cpu", 4)
    kinds = layer_types(loaded.model.config)
    recipe = Recipe.from_dict({"name": "t", "weights": {"group_size": 32}, "algorithms": ["awq", "rtn"]})
    for i, block in enumerate(blocks_of(loaded)):
        before = propagate(block, inputs, None, set(), kinds[i])
        targets = _targets(block, f"model.layers.{i}", loaded.family.linears, recipe)
        awq = _FixedScales(AWQOptions(clip=False))
        observe(block, inputs, _input_groups(targets, loaded.family.shared_inputs), [awq], None, set(), kinds[i])
        norm = block.get_submodule(loaded.family.attn_norm).weight.detach().clone()
        apply_transforms(block, targets, loaded.family, [awq], None, config=loaded.model.config)
        assert not torch.equal(block.get_submodule(loaded.family.attn_norm).weight, norm)  # scaled for real
        after = propagate(block, inputs, None, set(), kinds[i])
        for a, b in zip(after, before):
            torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-5)
        o_proj = f"model.layers.{i}.self_attn.o_proj"
        skipped = awq.report(o_proj).get("awq_skipped")
        assert (skipped is not None and "grouped-query" in skipped) == (kv_heads < 4)  # v -> o folds only without GQA
        inputs = after


def test_a_mapping_with_a_reason_is_reported_not_folded(tiny_model_dir):
    """A mapping the table marks as structurally impossible is skipped with its reason."""
    family = dataclasses.replace(LLAMA, mappings=(Mapping("mlp.up_proj", ("mlp.down_proj",), reason="fused elsewhere"),))
    loaded = load_model(tiny_model_dir)
    block = blocks_of(loaded)[0]
    recipe = Recipe.from_dict({"name": "t", "weights": {"group_size": 32}, "algorithms": ["awq", "rtn"]})
    targets = _targets(block, "model.layers.0", family.linears, recipe)
    down = block.mlp.down_proj.weight.detach().clone()
    awq = _FixedScales(AWQOptions(clip=False))
    apply_transforms(block, targets, family, [awq], None)
    assert torch.equal(block.mlp.down_proj.weight, down)
    assert awq.report("model.layers.0.mlp.down_proj")["awq_skipped"] == "fused elsewhere"


# --------------------------------------------------------------------------- the driver's forwards

@pytest.mark.parametrize("family", NEW)
def test_propagated_hidden_states_equal_the_models(tmp_path_factory, family):
    """40 tokens, beyond the tiny Gemmas' 8-token window: each block gets its attention type's
    mask and rotary cos/sin, so the driver's block-by-block outputs are the model's own."""
    loaded = load_model(tiny(tmp_path_factory, family))
    ids = torch.randint(0, 250, (3, 40), generator=torch.Generator().manual_seed(0))
    kinds = layer_types(loaded.model.config)
    with torch.inference_mode():
        want = loaded.model(ids, output_hidden_states=True, use_cache=False).hidden_states
    h = capture_block_inputs(loaded, ids, "cpu", 2)
    torch.testing.assert_close(torch.cat([x.hidden for x in h]), want[0], rtol=0, atol=0)
    blocks = blocks_of(loaded)
    for i, block in enumerate(blocks):
        if kinds[i] != kinds[0]:  # the check has teeth: block 0's mask and cos/sin would give another output
            wrong = propagate(block, [dataclasses.replace(x, by_type={}) for x in h], None, set(), kinds[i])
            assert (torch.cat([x.hidden for x in wrong]) - want[i + 1]).abs().max() > 1e-3
        h = propagate(block, h, None, set(), kinds[i])
        got = torch.cat([x.hidden for x in h])
        if i + 1 < len(blocks):  # transformers' last entry is after the final norm
            torch.testing.assert_close(got, want[i + 1], rtol=1e-5, atol=1e-5)
    final = loaded.model.get_submodule(loaded.family.final_norm)
    with torch.inference_mode():
        torch.testing.assert_close(final(got), want[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", NEW)
def test_replay_changes_nothing(tmp_path_factory, family):
    """The replay cache (norms on the attention and MLP outputs included) gives the same
    weights and the same quantized held-back perplexity as recomputing every sub-module."""
    ids = torch.randint(0, 250, (6, 24), generator=torch.Generator().manual_seed(3))
    recipe = Recipe.from_dict({"name": "g", "weights": {"group_size": 32}, "algorithms": ["awq", "gptq"],
                               "calibration": {"batch_size": 4, "dtype": "model"}})
    fast, slow = (quantize_model(load_model(tiny(tmp_path_factory, family)), recipe, ids, replay=r, held_out_ids=ids[:2])
                  for r in (True, False))
    for name in fast.weights:
        assert torch.equal(fast.weights[name].q, slow.weights[name].q), name
        assert torch.equal(fast.weights[name].scale, slow.weights[name].scale), name
    assert fast.held_out.quantized_perplexity == slow.held_out.quantized_perplexity


@pytest.mark.parametrize("family", NEW)
def test_held_back_float_perplexity_is_the_models(tmp_path_factory, family):
    """The check's float perplexity (last block -> final norm -> head -> soft-cap) equals
    quantkit.eval's perplexity of the model on the same windows."""
    loaded = load_model(tiny(tmp_path_factory, family))
    ids = torch.randint(0, 250, (3, 40), generator=torch.Generator().manual_seed(5))
    result = quantize_model(loaded, _recipe({"group_size": 32}), held_out_ids=ids)
    want = perplexity(load_model(tiny(tmp_path_factory, family)).model, ids.flatten(), 40, show_progress=False)
    assert result.held_out.float_perplexity == pytest.approx(want.perplexity, rel=1e-6)


# --------------------------------------------------------------------------- quantize, checkpoints, eval

@pytest.mark.parametrize("name", [n for n, _ in list_recipes()])
@pytest.mark.parametrize("family", NEW)
def test_every_shipped_recipe_quantizes(tmp_path_factory, tmp_path, small_text, family, name):
    out = tmp_path / "q"
    if (why := refused_rotation(family, name)) is not None:  # a rotation this family cannot take
        assert_rotation_refused(why, lambda: api.quantize(tiny(tmp_path_factory, family), name, out, calib_data=str(small_text),
                                                          num_samples=4, seqlen=32, show_progress=False), out)
        return
    report = api.quantize(tiny(tmp_path_factory, family), name, out, calib_data=str(small_text), num_samples=4,
                          seqlen=32, show_progress=False)
    assert len(report["layers"]) == LINEARS[family]
    assert report["held_out"]["passed"]
    model = load_checkpoint(out).model
    assert sum(isinstance(m, (IntWeightLinear, W8A8Linear)) for m in model.modules()) == LINEARS[family]
    with torch.inference_mode():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("scheme", ["w4-g32-sym", "w8a8-int8-dynamic"])
@pytest.mark.parametrize("family", NEW)
def test_transformers_loads_the_checkpoint_with_our_logits(tmp_path_factory, tmp_path, family, scheme):
    """Our reader computes what the driver left in the model (the fake-quantized weights);
    transformers + compressed-tensors computes the same (W8A8: every quantized linear alike
    on the same input; the logits up to a rounding flipped by summation order)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src = tiny(tmp_path_factory, family)
    recipe = (_recipe({"group_size": 32, "symmetric": True}) if scheme.startswith("w4")
              else _recipe({}, "W8A8-INT8", {"dynamic": True}))
    out = tmp_path / "q"
    api.quantize(src, recipe, out, show_progress=False)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == load_model(src).model.config.model_type
    fake = load_model(src)
    quantize_model(fake, recipe)
    ours = load_checkpoint(out)
    # Gemma 2's capped scores need eager attention; transformers < 5.18 picked sdpa and dropped the capping
    attention = attention_implementation(ours.model.config)
    theirs = AutoModelForCausalLM.from_pretrained(out, **({"attn_implementation": attention} if attention else {}))
    theirs = theirs.eval()
    seen = {}
    for n, m in ours.model.named_modules():
        if isinstance(m, (IntWeightLinear, W8A8Linear)):
            theirs.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, (a[0], o)) and None)
    with torch.inference_mode():
        a, b, f = theirs(IDS).logits, ours.model(IDS).logits, fake.model(IDS).logits
        for n, (x, y) in seen.items():
            torch.testing.assert_close(ours.model.get_submodule(n)(x), y, rtol=1e-5, atol=1e-5)
    assert len(seen) == LINEARS[family]
    if scheme.startswith("w4"):
        torch.testing.assert_close(b, f, rtol=1e-5, atol=1e-5)
        assert (a - b).abs().max() < 1e-4
    else:  # per-token int8 inputs: a rounding flipped by summation order moves a few logits a little
        diff = (a - b).abs()
        assert diff.max() < 0.05 and diff.mean() < 2e-3


@pytest.mark.parametrize("family", NEW)
def test_eval_float_and_quantized(tmp_path_factory, tmp_path, small_text, family):
    src = tiny(tmp_path_factory, family)
    api.quantize(src, _recipe({"group_size": 32}), tmp_path / "q", show_progress=False)
    rows = [api.evaluate(m, data=[str(small_text)], seqlen=64, windows=3, show_progress=False)[0]
            for m in (src, tmp_path / "q")]
    ppl = [r["perplexity"] for r in rows]
    assert all(0 < p < 2 * 300 for p in ppl) and ppl[0] != ppl[1]  # random models: about the vocabulary size


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_awq_export_reads_back(tmp_path_factory, tmp_path, family):
    """The AWQ GEMM export of a Gemma (tied embeddings, (1 + w) norms) and of Phi-3 (packed
    linears) reads back to the logits of the source with its float tensors in float16."""
    src = tiny(tmp_path_factory, family)
    recipe = Recipe.from_dict({"name": "a", "weights": {"group_size": 32, "symmetric": False}, "algorithms": ["rtn"]})
    api.quantize(src, recipe, tmp_path / "ct", show_progress=False)
    api.export(tmp_path / "ct", tmp_path / "awq", "awq")
    with torch.inference_mode():
        a = api.load(tmp_path / "awq").model.float()(IDS).logits
        b = load_checkpoint(tmp_path / "ct").model(IDS).logits
    assert (a - b).abs().max() < 1e-2
