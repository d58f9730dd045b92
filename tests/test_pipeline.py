"""The block-by-block driver on a tiny random Llama."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from quantkit.algorithms import ALGORITHMS, Rounding
from quantkit.checkpoint.report import layer_rows
from quantkit.errors import NumericalError
from quantkit.formats import IntSpec, QuantizedWeight, quantize_rtn
from quantkit.models import load_model
from quantkit.pipeline import quantize_model
from quantkit.recipe import Recipe, RecipeError


@dataclass(frozen=True)
class _RecordOptions:
    scale: float = 1.0


class _Record(Rounding):
    """Test double: rounds like RTN and keeps every activation it observes."""

    name = "record"
    Options = _RecordOptions
    observes = True
    seen: dict[str, list[torch.Tensor]] = {}

    def observe(self, names, x):
        for name in names:
            _Record.seen.setdefault(name, []).append(x.clone())

    def round_group(self, names, weights, specs) -> list[QuantizedWeight]:
        return [quantize_rtn(w, s) for w, s in zip(weights, specs)]


@pytest.fixture
def record_algorithm():
    ALGORITHMS["record"] = _Record
    _Record.seen = {}
    yield _Record
    del ALGORITHMS["record"]


def _recipe(*algorithms, dtype="model") -> Recipe:
    return Recipe.from_dict({"name": "t", "weights": {"group_size": 32}, "algorithms": list(algorithms),
                             "calibration": {"batch_size": 4, "dtype": dtype}})


def test_next_block_is_calibrated_on_the_quantized_blocks_outputs(tiny_model_dir, record_algorithm):
    loaded = load_model(tiny_model_dir)
    ids = torch.randint(0, 250, (6, 20), generator=torch.Generator().manual_seed(0))
    quantize_model(loaded, _recipe("record"), ids)
    seen = record_algorithm.seen
    # 2 batches (4 + 2 samples) per linear, flattened to [tokens, in]
    assert [x.shape for x in seen["model.layers.0.self_attn.q_proj"]] == [(80, 96), (40, 96)]
    # The model now holds the dequantized weights: its hidden state after
    # block 0 is what block 1 must have been calibrated on.
    model = loaded.model
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states
        expected_l0 = model.model.layers[0].input_layernorm(hidden[0]).reshape(-1, 96)
        expected_l1 = model.model.layers[1].input_layernorm(hidden[1]).reshape(-1, 96)
    torch.testing.assert_close(torch.cat(seen["model.layers.0.self_attn.q_proj"]), expected_l0)
    torch.testing.assert_close(torch.cat(seen["model.layers.1.self_attn.q_proj"]), expected_l1, rtol=1e-4, atol=1e-4)
    # and NOT on the float model's: the float block-0 output differs
    float_model = load_model(tiny_model_dir).model
    with torch.inference_mode():
        float_l1 = float_model.model.layers[1].input_layernorm(float_model(ids, output_hidden_states=True).hidden_states[1]).reshape(-1, 96)
    assert (float_l1 - expected_l1).abs().max() > 1e-4


def test_rtn_needs_no_calibration_and_quantizes_every_target(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    before = loaded.model.model.layers[0].mlp.down_proj.weight.clone()
    result = quantize_model(loaded, _recipe("rtn"), None)
    rows = layer_rows(result)
    assert len(result.weights) == 14 and len(rows) == 14
    after = loaded.model.model.layers[0].mlp.down_proj.weight
    qw = result.weights["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(after, qw.dequantize())
    assert not torch.equal(before, after)
    row = next(r for r in rows if r["name"] == "model.layers.0.mlp.down_proj")
    assert 0 < row["weight_rel_error"] < 0.2 and row["bytes_quantized"] < row["bytes_float"] / 4


def test_spec_per_layer_follows_overrides_and_shrinks_groups(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    recipe = Recipe.from_dict({
        "name": "t", "weights": {"group_size": 64},
        "overrides": [{"pattern": r"down_proj$", "weights": {"bits": 8, "group_size": None}}],
    })
    result = quantize_model(loaded, recipe, None)
    assert result.weights["model.layers.1.mlp.down_proj"].spec == IntSpec(8, True, None)
    assert result.weights["model.layers.1.mlp.up_proj"].spec == IntSpec(4, True, 32)  # 96 % 64 != 0 -> 32


def test_nan_weight_names_the_layer(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    loaded.model.model.layers[1].self_attn.v_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        quantize_model(loaded, _recipe("rtn"), None)


def test_recipe_must_end_with_one_rounding_step(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    with pytest.raises(RecipeError, match="unknown algorithm 'gptqq'"):
        quantize_model(loaded, _recipe("gptqq"), None)
    with pytest.raises(RecipeError, match="exactly one rounding step"):
        quantize_model(loaded, _recipe("rtn", "rtn"), None)


def test_bf16_calibration_forwards_round_the_float32_weights(tiny_model_dir, record_algorithm):
    """Calibration may run in bf16 (fast on the CPU), but the weights rounded
    and written are the model's own float32 ones."""
    loaded = load_model(tiny_model_dir)
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    original = loaded.model.model.layers[1].mlp.up_proj.weight.detach().clone()
    result = quantize_model(loaded, _recipe("record", dtype="bfloat16"), ids)
    assert all(x.dtype == torch.bfloat16 for x in record_algorithm.seen["model.layers.1.mlp.up_proj"])
    assert loaded.model.model.layers[1].mlp.up_proj.weight.dtype == torch.float32
    expected = quantize_rtn(original, IntSpec(4, True, 32))
    assert torch.equal(result.weights["model.layers.1.mlp.up_proj"].q, expected.q)


@pytest.mark.parametrize("sequential", [True, False])
def test_replaying_finished_submodules_changes_nothing(tiny_model_dir, sequential):
    """The replay cache skips recomputation of sub-modules whose weights are
    final; the quantized weights and the propagated inputs must be identical."""
    ids = torch.randint(0, 250, (6, 24), generator=torch.Generator().manual_seed(3))
    recipe = Recipe.from_dict({"name": "g", "weights": {"group_size": 32}, "algorithms": [{"gptq": {"true_sequential": sequential}}],
                               "calibration": {"batch_size": 4, "dtype": "model"}})
    results = []
    for replay in (True, False):
        loaded = load_model(tiny_model_dir)
        results.append(quantize_model(loaded, recipe, ids, replay=replay))
    fast, slow = results
    assert fast.weights.keys() == slow.weights.keys()
    for name in fast.weights:
        assert torch.equal(fast.weights[name].q, slow.weights[name].q), name
        assert torch.equal(fast.weights[name].scale, slow.weights[name].scale), name


def _count_calls(monkeypatch, owner, attr: str) -> dict:
    """Replace owner.attr with a wrapper counting its calls; returns {"n": count}."""
    calls = {"n": 0}
    original = getattr(owner, attr)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, counting)
    return calls


def test_recipe_can_turn_replay_off(tiny_model_dir, monkeypatch):
    calls = _count_calls(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(4))
    recipe = Recipe.from_dict({"name": "g", "weights": {"group_size": 32}, "algorithms": ["gptq"],
                               "calibration": {"batch_size": 2, "dtype": "model", "replay": False}})
    quantize_model(load_model(tiny_model_dir), recipe, ids)
    # per batch: the o, gate/up and down passes, plus the outputs of block 0 (the last block's are not needed)
    assert calls["n"] == 2 * (4 + 3)


def test_replay_computes_each_linear_about_once(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(4))
    recipe = Recipe.from_dict({"name": "g", "weights": {"group_size": 32}, "algorithms": ["gptq"],
                               "calibration": {"batch_size": 2, "dtype": "model"}})
    calls = _count_calls(monkeypatch, torch.nn.Linear, "forward")
    counts = {}
    for replay in (True, False):
        calls["n"] = 0
        quantize_model(load_model(tiny_model_dir), recipe, ids, replay=replay)
        counts[replay] = calls["n"]
    # 2 batches x 2 blocks: each of the 7 linears once, o_proj twice (in float
    # while the attention output is recorded, then rounded to rebuild it);
    # block 0's inputs capture runs through no linear at all
    assert counts[True] <= 2 * 2 * 8
    assert counts[False] >= 2 * counts[True]


def test_replay_runs_attention_and_norms_once_per_batch(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(4))
    recipe = Recipe.from_dict({"name": "g", "weights": {"group_size": 32}, "algorithms": ["gptq"],
                               "calibration": {"batch_size": 2, "dtype": "model"}})
    calls = _count_calls(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
    loaded = load_model(tiny_model_dir)
    assert loaded.model.config._attn_implementation == "sdpa"
    norms = _count_calls(monkeypatch, type(loaded.model.model.layers[0].input_layernorm), "forward")
    quantize_model(loaded, recipe, ids)
    assert calls["n"] == 2 * 2  # 2 batches x 2 blocks
    assert norms["n"] == 2 * 2 * 2  # and the block's two norms

