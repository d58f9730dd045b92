"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) from quantize to checkpoint to perplexity, on
tiny random models built from transformers' own config classes (tests/conftest.py: 4 experts, top-2;
Qwen2-MoE with a shared expert; Qwen3-MoE with a dense middle layer, mlp_only_layers).
The engine's MoE path is tested in tests/test_engine_moe.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import assert_rotation_refused, make_tiny_family_model, refused_rotation
from quantkit import api
from quantkit.algorithms.folding import apply_transforms
from quantkit.checkpoint import load_checkpoint
from quantkit.checkpoint.report import layer_rows, summary_lines
from quantkit.formats import quantize_rtn
from quantkit.forwards import blocks_of, capture_block_inputs, observe, propagate
from quantkit.models import FAMILIES, load_model
from quantkit.algorithms.awq import AWQOptions
from quantkit.models.families import block_family, checkpoint_name, layer_types, num_experts, sparse_layers
from quantkit.models.moe import Experts, unfuse_experts, watching
from quantkit.nn import IntWeightLinear, W8A8Linear
from quantkit.pipeline import _input_groups, _targets, quantize_model
from quantkit.recipe import Recipe, RecipeError, list_recipes
from test_families import _FixedScales

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
# quantized linears: attention 4 per layer; Mixtral 4 experts x 3 in 2 layers; Qwen2-MoE 4 experts and
# a shared one in 2 layers; Qwen3-MoE 4 experts in layers 0 and 2, a dense MLP in layer 1
EXPERT_LINEARS = {"mixtral": 24, "qwen2_moe": 24, "qwen3_moe": 24}
LINEARS = {"mixtral": 8 + 24, "qwen2_moe": 8 + 24 + 6, "qwen3_moe": 12 + 24 + 3}
IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
_DIRS: dict[str, Path] = {}


def tiny(tmp_path_factory, family: str) -> Path:
    if family not in _DIRS:
        _DIRS[family] = make_tiny_family_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
    return _DIRS[family]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the tiny experts' small matmuls


def _recipe(algorithms=("gptq",), scheme="W4A16", weights=None, acts=None, moe=None) -> Recipe:
    return Recipe.from_dict({"name": "t", "scheme": scheme, "weights": weights or {"group_size": 32},
                             "algorithms": list(algorithms), **({"activations": acts} if acts else {}),
                             "calibration": {"num_samples": 4, "seqlen": 32, "dtype": "model", **({"moe": moe} if moe else {})}})


# --------------------------------------------------------------------------- the table and the representation

def test_the_moe_families_are_in_the_table():
    assert {f: FAMILIES[f].model_types for f in MOE} == {"mixtral": ("mixtral",), "qwen2_moe": ("qwen2_moe",),
                                                         "qwen3_moe": ("qwen3_moe",)}
    assert all(FAMILIES[f].moe is not None for f in MOE) and FAMILIES["llama"].moe is None


@pytest.mark.parametrize("family", MOE)
def test_each_layer_table_names_the_models_linears(tmp_path_factory, family):
    """Every linear of a layer's table is an nn.Linear of the block; a sparse layer's are per expert
    (its config's count), a dense layer of Qwen3-MoE keeps the dense MLP; the router is no linear."""
    loaded = load_model(tiny(tmp_path_factory, family))
    config = loaded.model.config
    assert sparse_layers(config, loaded.family) == ([True, False, True] if family == "qwen3_moe" else [True, True])
    for i, block in enumerate(blocks_of(loaded)):
        table = block_family(loaded.family, config, i)
        assert all(type(block.get_submodule(rel)) is torch.nn.Linear for rel in table.linears)
        experts = [rel for rel in table.linears if ".experts." in rel]
        assert len(experts) == (3 * num_experts(config, loaded.family) if sparse_layers(config, loaded.family)[i] else 0)
        if experts:
            assert isinstance(block.get_submodule(loaded.family.moe.experts), Experts)
            assert not isinstance(block.get_submodule(loaded.family.moe.router), torch.nn.Linear)
        else:
            assert table is loaded.family and block.get_submodule("mlp.gate_proj") is not None


@pytest.mark.parametrize("family", MOE)
def test_per_expert_linears_compute_the_models_output_under_its_names(tmp_path_factory, family):
    """The unfused model's logits are transformers' (eager and its default experts implementation),
    and its tensors, under the family's renames, are exactly those save_pretrained wrote."""
    from transformers import AutoModelForCausalLM

    src = tiny(tmp_path_factory, family)
    loaded = load_model(src)
    with torch.inference_mode():
        ours = loaded.model(IDS).logits
        for impl in ("eager", None):
            theirs = AutoModelForCausalLM.from_pretrained(src, **({"experts_implementation": impl} if impl else {}))
            torch.testing.assert_close(ours, theirs.eval()(IDS).logits, rtol=0, atol=1e-6)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    state = {checkpoint_name(loaded.family, k): t for k, t in loaded.model.state_dict().items()}
    state.pop("lm_head.weight") if loaded.model.config.tie_word_embeddings else None
    assert state.keys() == written.keys()
    assert all(torch.equal(state[k], written[k]) for k in written)
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in written


def test_unfusing_refuses_a_layout_it_does_not_know(tmp_path_factory):
    from quantkit.errors import UnsupportedModelError
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny(tmp_path_factory, "mixtral"))
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(UnsupportedModelError, match=r"layers.1.mlp.experts .*gate_up_proj \[E, 2I, H\]"):
        unfuse_experts(model, FAMILIES["mixtral"])


# --------------------------------------------------------------------------- folding keeps the routing

def _routing(block, inputs, kind):
    """Each batch's top-k experts as the block's router chooses them."""
    seen = []
    router = next(m for n, m in block.named_modules() if n.endswith("mlp.gate") and not isinstance(m, torch.nn.Linear))
    handle = router.register_forward_hook(lambda _m, _a, out: seen.append(out[2].clone()))
    out = propagate(block, inputs, None, set(), kind)
    handle.remove()
    return out, seen


@pytest.mark.parametrize("family", MOE)
def test_folding_keeps_every_block_and_its_routing(tmp_path_factory, family):
    """Random scales on every mapping of every layer, folded (the norm -> every expert's gate / up,
    the router's and the shared expert gate's columns compensated): each block computes the same
    output, and the router picks the same experts for every token."""
    loaded = load_model(tiny(tmp_path_factory, family))
    inputs = capture_block_inputs(loaded, IDS, "cpu", 4)
    kinds, config = layer_types(loaded.model.config), loaded.model.config
    recipe = Recipe.from_dict({"name": "t", "weights": {"group_size": 32}, "algorithms": ["awq", "rtn"]})
    for i, block in enumerate(blocks_of(loaded)):
        table = block_family(loaded.family, config, i)
        sparse = sparse_layers(config, loaded.family)[i]
        before, route = _routing(block, inputs, kinds[i]) if sparse else (propagate(block, inputs, None, set(), kinds[i]), None)
        targets = _targets(block, f"model.layers.{i}", table.linears, recipe)
        awq = _FixedScales(AWQOptions(clip=False))
        with watching(block, range(num_experts(config, loaded.family))):  # as the driver: every token, every expert
            observe(block, inputs, _input_groups(targets, table.shared_inputs), [awq], None, set(), kinds[i])
        router = block.mlp.gate.weight.detach().clone() if route is not None else None
        apply_transforms(block, targets, table, [awq], None, config=config)
        if route is not None:
            assert not torch.equal(block.mlp.gate.weight, router)  # compensated for real
            after, route_after = _routing(block, inputs, kinds[i])
            assert all(torch.equal(a, b) for a, b in zip(route, route_after))
        else:
            after = propagate(block, inputs, None, set(), kinds[i])
        for a, b in zip(after, before):
            torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-5)
        inputs = after


# --------------------------------------------------------------------------- calibration: no expert left behind

STARVED = 3  # the expert of layer 0 the rigged router never picks


def _starve(loaded, expert: int = STARVED):
    """Rig layer 0's router (Mixtral's: softmax, top-k, renormalized) so that it never picks `expert`."""
    router = blocks_of(loaded)[0].mlp.gate

    def forward(hidden):
        logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
        probs = torch.softmax(logits.float().index_fill(1, torch.tensor([expert]), float("-inf")), dim=-1)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    router.forward = forward
    return loaded


def _rows(loaded, recipe):
    result = quantize_model(loaded, recipe, IDS.repeat(2, 2)[:, :32])  # 4 x 32 calibration tokens
    return result, {r["name"]: r for r in layer_rows(result)}


def _expert_rows(rows, expert, layer=0):
    prefix = f"model.layers.{layer}.mlp.experts.{expert}."
    return [r for name, r in rows.items() if name.startswith(prefix)]


def test_a_starved_expert_is_rounded_to_nearest_and_reported(tmp_path_factory):
    """GPTQ, routed observation: the expert the router never picks saw no token; it is rounded to
    nearest (finite scales, the weight on its grid), its rows say so, and the summary names it."""
    loaded = _starve(load_model(tiny(tmp_path_factory, "mixtral")))
    float_w = blocks_of(loaded)[0].mlp.experts[STARVED].w1.weight.detach().clone()
    result, rows = _rows(loaded, _recipe())
    starved = _expert_rows(rows, STARVED)
    assert len(starved) == 3
    for r in starved:
        assert (r["moe_tokens_routed"], r["moe_tokens_observed"], r["algorithm"]) == (0, 0, "rtn")
        assert "rounded to nearest: its rounding observed 0 calibration tokens" in r["moe_fallback"]
        qw = result.weights[r["name"]]
        assert torch.isfinite(qw.scale).all() and r["weight_rel_error"] > 0
    name = f"model.layers.0.mlp.experts.{STARVED}.w1"
    assert torch.equal(result.weights[name].q, quantize_rtn(float_w, _recipe().weights).q)
    others = [r for e in range(4) if e != STARVED for r in _expert_rows(rows, e)]
    assert all(r["algorithm"] == "gptq" and r["moe_tokens_observed"] == r["moe_tokens_routed"] > 0 for r in others)
    assert sum(r["moe_tokens_routed"] for r in others) == 3 * 128 * 2  # top-2 of 128 tokens; 3 rows an expert
    lines = dict(summary_lines(list(rows.values()), None))
    assert f"model.layers.0.mlp.experts.{STARVED}" in lines["MoE fallback"]
    assert "min 0 (model.layers.0.mlp.experts.3)" in lines["MoE tokens routed"]


def test_observe_all_gives_a_starved_expert_every_token(tmp_path_factory):
    """calibration.moe.observe: all: every expert's rounding observes all 128 calibration tokens
    (the starved one too, which GPTQ then rounds), while the routed counts stay the router's."""
    _, rows = _rows(_starve(load_model(tiny(tmp_path_factory, "mixtral"))), _recipe(moe={"observe": "all"}))
    for e in range(4):
        for r in _expert_rows(rows, e):
            assert r["moe_tokens_observed"] == 128 and r["algorithm"] == "gptq" and "moe_fallback" not in r
    assert all(r["moe_tokens_routed"] == 0 for r in _expert_rows(rows, STARVED))
    assert sum(r["moe_tokens_routed"] for e in range(4) for r in _expert_rows(rows, e)) == 3 * 128 * 2


def test_experts_observed_on_every_token_still_output_the_routed_sum(tmp_path_factory):
    """Running experts on every token (observe_all) shows each of them every token, and the module's
    output is still the routed one; the routed counts are the router's."""
    loaded = load_model(tiny(tmp_path_factory, "mixtral"))
    block = blocks_of(loaded)[0]
    h = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, weights, index = block.mlp.gate(h)
        plain = block.mlp.experts(h, index, weights)
        seen = []
        handle = block.mlp.experts[2].w2.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
        with watching(block, range(4)) as routed:
            every = block.mlp.experts(h, index, weights)
        handle.remove()
    torch.testing.assert_close(every, plain, rtol=0, atol=1e-6)
    assert seen == [40] and routed.tolist() == torch.bincount(index.flatten(), minlength=4).tolist()
    assert block.mlp.experts.routed is None and not block.mlp.experts.observe_all  # switched off again


def test_a_starved_expert_under_static_activations_gets_a_finite_input_scale(tmp_path_factory, tmp_path):
    """W8A8-FP8 with static input scales: the starved expert's weights are rounded to nearest and its
    input ranges come from every calibration token, so the checkpoint is complete and finite."""
    loaded = _starve(load_model(tiny(tmp_path_factory, "mixtral")))
    recipe = _recipe(scheme="W8A8-FP8", weights={"strategy": "tensor"}, acts={"dynamic": False})
    result, rows = _rows(loaded, recipe)
    for r in _expert_rows(rows, STARVED):
        assert r["algorithm"] == "rtn" and r["moe_input_range"].startswith("static input range observed on every")
        assert 0 < r["input_scale"] < float("inf")
        assert torch.isfinite(result.input_scales[r["name"]]).all()


@pytest.mark.parametrize("family,observe", [("mixtral", "all"), ("qwen2_moe", "routed")])
def test_replay_changes_nothing(tmp_path_factory, family, observe):
    """Replaying the experts already rounded (and everything else final) gives the weights and the
    held-back perplexity of recomputing every sub-module, whether the stage's expert runs routed or
    on every token."""
    recipe = _recipe(("gptq",), moe={"observe": observe})
    ids = IDS.repeat(2, 2)[:, :32]
    fast, slow = (quantize_model(load_model(tiny(tmp_path_factory, family)), recipe, ids, replay=r, held_out_ids=IDS)
                  for r in (True, False))
    for name in fast.weights:
        assert torch.equal(fast.weights[name].q, slow.weights[name].q), name
    assert fast.held_out.quantized_perplexity == slow.held_out.quantized_perplexity


def test_min_tokens_decides_the_fallback(tmp_path_factory):
    """min_tokens above every expert's count: every expert falls back, the attention still GPTQ."""
    _, rows = _rows(load_model(tiny(tmp_path_factory, "qwen3_moe")), _recipe(moe={"min_tokens": 10**6}))
    experts = [r for r in rows.values() if "moe_expert" in r]
    assert len(experts) == 24 and all(r["algorithm"] == "rtn" and "moe_fallback" in r for r in experts)
    assert rows["model.layers.1.mlp.down_proj"]["algorithm"] == "gptq"  # the dense layer's MLP
    assert rows["model.layers.0.self_attn.q_proj"]["algorithm"] == "gptq"


def test_a_rounding_that_is_not_true_sequential_still_observes_one_expert_at_a_time(tmp_path_factory):
    """Stages of a sparse layer's groups: attention and shared expert together, each expert alone;
    GPTQ with true_sequential off rounds every expert on the tokens routed to it."""
    from quantkit.algorithms.folding import Target
    from quantkit.experts import split_stages

    table = block_family(FAMILIES["qwen2_moe"], type("C", (), {"num_hidden_layers": 1, "num_experts": 2})(), 0)
    groups = [[Target(rel, rel, None, None) for rel in g] for g in table.shared_inputs]
    stages = [[[t.rel for t in g] for g in stage] for stage in split_stages(table, groups)]
    assert stages == [
        [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
         ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"], ["mlp.shared_expert.down_proj"]],
        [["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"], ["mlp.experts.0.down_proj"]],
        [["mlp.experts.1.gate_proj", "mlp.experts.1.up_proj"], ["mlp.experts.1.down_proj"]],
    ]
    recipe = Recipe.from_dict({**_recipe().to_dict(), "algorithms": [{"gptq": {"true_sequential": False}}]})
    _, rows = _rows(load_model(tiny(tmp_path_factory, "qwen2_moe")), recipe)
    experts = [r for r in rows.values() if "moe_expert" in r]
    assert len(experts) == 24
    assert all(r["algorithm"] == "gptq" and r["moe_tokens_observed"] == r["moe_tokens_routed"] for r in experts)
    assert sum(r["moe_tokens_routed"] for r in experts if r["name"].startswith("model.layers.1.")) == 3 * 128 * 2


@pytest.mark.parametrize("moe,message", [
    ({"observe": "some"}, r"calibration.moe.observe: invalid value 'some'; valid values: 'routed', 'all'"),
    ({"min_tokens": 0}, r"calibration.moe: min_tokens must be in 1..2147483647 .*got 0"),
    ({"min_tokens": 1.5}, r"calibration.moe.min_tokens: expected int, got 1.5"),
    ({"observe": "all", "extra": 1}, r"unknown key 'extra' in recipe: calibration.moe; valid keys: min_tokens, observe"),
    ("all", r"calibration.moe: expected a mapping with keys min_tokens, observe"),
])
def test_bad_moe_options_are_refused_by_name(moe, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"name": "t", "calibration": {"moe": moe}})


def test_moe_options_round_trip_through_yaml():
    r = _recipe(moe={"observe": "all", "min_tokens": 3})
    assert "moe: {observe: all, min_tokens: 3}" in r.to_yaml() and Recipe.from_yaml(r.to_yaml()) == r


# --------------------------------------------------------------------------- quantize, checkpoints, eval

@pytest.mark.parametrize("name", [n for n, _ in list_recipes()])
@pytest.mark.parametrize("family", MOE)
def test_every_shipped_recipe_quantizes(tmp_path_factory, tmp_path, small_text, family, name):
    out = tmp_path / "q"
    if (why := refused_rotation(family, name)) is not None:  # a rotation this family cannot take
        assert_rotation_refused(why, lambda: api.quantize(tiny(tmp_path_factory, family), name, out, calib_data=str(small_text),
                                                          num_samples=4, seqlen=32, show_progress=False), out)
        return
    report = api.quantize(tiny(tmp_path_factory, family), name, out, calib_data=str(small_text), num_samples=4,
                          seqlen=32, show_progress=False)
    assert len(report["layers"]) == LINEARS[family] and report["held_out"]["passed"]
    experts = [r for r in report["layers"] if "moe_expert" in r]
    calibrated = report["calibration"] is not None  # plain round-to-nearest runs no calibration data
    assert len(experts) == EXPERT_LINEARS[family]
    assert all(("moe_tokens_routed" in r) == calibrated for r in experts)
    assert all(r.get("moe_fallback") is None or r["algorithm"] == "rtn" for r in experts)
    assert any(label == "MoE tokens routed" for label, _ in report["summary"])
    model = load_checkpoint(out).model
    assert sum(isinstance(m, (IntWeightLinear, W8A8Linear)) for m in model.modules()) == LINEARS[family]
    with torch.inference_mode():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("family", MOE)
def test_transformers_loads_the_w4_checkpoint_with_our_logits(tmp_path_factory, tmp_path, family):
    """W4 symmetric (pack-quantized): transformers + compressed-tensors merge the per-expert tensors
    into their fused experts (dequantized at load) and compute our reader's logits, which are the
    driver's fake-quantized model's; also with CompressedTensorsConfig(dequantize=True)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, out = tiny(tmp_path_factory, family), tmp_path / "q"
    recipe = _recipe(("rtn",), weights={"group_size": 32, "symmetric": True})
    api.quantize(src, recipe, out, show_progress=False)
    fake = load_model(src)
    quantize_model(fake, recipe)
    with torch.inference_mode():
        ours = load_checkpoint(out).model(IDS).logits
        torch.testing.assert_close(ours, fake.model(IDS).logits, rtol=1e-5, atol=1e-5)
        for extra in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
            theirs = AutoModelForCausalLM.from_pretrained(out, **extra).eval()(IDS).logits
            assert (theirs - ours).abs().max() < 1e-4


def test_transformers_loads_a_w8a8_fp8_moe_checkpoint(tmp_path_factory, tmp_path):
    """FP8 W8A8: transformers folds each expert's scale into its weight at load (its experts then
    take 16-bit inputs, ours FP8 ones): the logits agree up to the inputs' rounding."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    api.quantize(tiny(tmp_path_factory, "qwen3_moe"), _recipe(("rtn",), "W8A8-FP8", {"strategy": "channel"},
                                                               {"dynamic": True}), out, show_progress=False)
    with torch.inference_mode():
        ours = load_checkpoint(out).model(IDS).logits
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
    assert (theirs - ours).abs().max() < 0.1 and (theirs - ours).abs().mean() < 0.01


@pytest.mark.parametrize("family", MOE)
def test_eval_float_and_quantized(tmp_path_factory, tmp_path, small_text, family):
    src = tiny(tmp_path_factory, family)
    api.quantize(src, _recipe(("rtn",)), tmp_path / "q", show_progress=False)
    ppl = [api.evaluate(m, data=[str(small_text)], seqlen=64, windows=3, show_progress=False)[0]["perplexity"]
           for m in (src, tmp_path / "q")]
    assert all(0 < p < 2 * 300 for p in ppl) and ppl[0] != ppl[1]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_awq_export_holds_the_experts(tmp_path_factory, tmp_path, family):
    """The AWQ GEMM export writes each expert under transformers' names (Mixtral's block_sparse_moe),
    lists the routers with the float linears, and reads back to the source's logits."""
    src = tiny(tmp_path_factory, family)
    recipe = Recipe.from_dict({"name": "a", "weights": {"group_size": 32, "symmetric": False}, "algorithms": ["rtn"]})
    api.quantize(src, recipe, tmp_path / "ct", show_progress=False)
    api.export(tmp_path / "ct", tmp_path / "awq", "awq")
    skip = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    mlp = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert f"model.layers.1.{mlp}.gate" in skip
    with safe_open(str(tmp_path / "awq" / "model.safetensors"), "pt") as f:
        assert f"model.layers.0.{mlp}.experts.1.{'w2' if family == 'mixtral' else 'down_proj'}.qweight" in f.keys()
    with torch.inference_mode():
        a = api.load(tmp_path / "awq").model.float()(IDS).logits
        b = load_checkpoint(tmp_path / "ct").model(IDS).logits
    assert (a - b).abs().max() < 1e-2
