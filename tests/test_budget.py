"""Mixed precision under a size budget (issue 23, part 2)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from quantkit import api
from quantkit.budget import Costs, choose
from quantkit.recipe import Recipe, RecipeError

from test_big_models import tensor_digests


def _brute_force(costs, budget_bytes):
    best = None
    for combo in itertools.product(*[list(c.options) for c in costs]):
        size = sum(c.options[k][1] for c, k in zip(costs, combo))
        err = sum(c.options[k][0] for c, k in zip(costs, combo))
        if size <= budget_bytes and (best is None or err < best[0]):
            best = (err, combo)
    return best


def test_the_choice_is_the_best_within_the_budget_on_small_cases():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        costs = []
        for i in range(4):
            errs = sorted(torch.rand(4, generator=g).tolist(), reverse=True)
            sizes = sorted(torch.randint(1, 40, (4,), generator=g).tolist())
            costs.append(Costs(f"l{i}", 8, {f"c{j}": (errs[j], sizes[j]) for j in range(4)}))
        bpw = float(torch.randint(4, 40, (1,), generator=g)) * 8 / 32  # bytes budget = bpw * 32 / 8
        budget = bpw * 32 / 8
        if sum(min(b for _, b in c.options.values()) for c in costs) > budget:
            with pytest.raises(ValueError, match="smallest candidate"):
                choose(costs, bpw)
            continue
        choice = choose(costs, bpw)
        size = sum(c.options[choice[c.name]][1] for c in costs)
        err = sum(c.options[choice[c.name]][0] for c in costs)
        best_err, _ = _brute_force(costs, budget)
        assert size <= budget and err <= best_err * 1.25 + 1e-9  # Lagrangian + greedy: near the optimum


def test_budget_keys_are_checked():
    with pytest.raises(RecipeError, match="budget"):
        Recipe.from_yaml("name: x\nscheme: W8A8-INT8\nactivations: {dynamic: true}\nweights: {group_size: null}\n"
                         "budget: {bits_per_weight: 5}\n")
    with pytest.raises(RecipeError, match="budget"):
        Recipe.from_yaml("name: x\nbudget: {bits_per_weight: 5, candidates: [w5]}\n")
    r = Recipe.from_yaml("name: x\nbudget: {bits_per_weight: 4.5}\n")
    assert Recipe.from_yaml(r.to_yaml()) == r
    r = Recipe.from_yaml("name: x\nbudget: {size_of: w4g64}\n")
    assert Recipe.from_yaml(r.to_yaml()) == r and r.budget.reference_candidate() == "w4g64"
    with pytest.raises(RecipeError, match="bits_per_weight .* or as size_of .*, one of the two"):
        Recipe.from_yaml("name: x\nbudget: {bits_per_weight: 4.5, size_of: w4g128}\n")
    with pytest.raises(RecipeError, match="one of the two"):
        Recipe.from_yaml("name: x\nbudget: {candidates: [w4g128, w8]}\n")
    with pytest.raises(RecipeError, match="size_of 'w3g128' must be one of the quantized candidates"):
        Recipe.from_yaml("name: x\nbudget: {size_of: w3g128}\n")


def test_size_of_is_the_uniform_recipes_size_with_its_scales(tiny_model_dir, tmp_path):
    """budget: {size_of: w4g128} asks for exactly the bytes uniform W4 g128 writes, counted with the
    recipe's scales (here float16 on a float32 model), and the mixed checkpoint stays within them."""
    head = ("scheme: W4A16\nweights: {group_size: 128, scale_dtype: float16}\nalgorithms: [rtn]\nignore: [lm_head]\n"
            "calibration: {num_samples: 8, seqlen: 64}\n")
    (tmp_path / "u.yaml").write_text("name: u\n" + head)
    (tmp_path / "m.yaml").write_text("name: m\n" + head + "budget: {size_of: w4g128}\n")
    uniform = api.quantize(str(tiny_model_dir), str(tmp_path / "u.yaml"), out=tmp_path / "u", show_progress=False)
    mixed = api.quantize(str(tiny_model_dir), str(tmp_path / "m.yaml"), out=tmp_path / "m", show_progress=False)
    numel = sum(r["shape"][0] * r["shape"][1] for r in uniform["layers"])
    assert mixed["budget"]["bits_per_weight_asked"] == pytest.approx(8 * uniform["bytes_quantized"] / numel, rel=1e-12)
    assert mixed["budget"]["size_of"] == "w4g128"
    assert mixed["budget"]["bits_per_weight"] <= mixed["budget"]["bits_per_weight_asked"]
    assert mixed["budget"]["predicted_error"] <= sum(c["candidates"]["w4g128"]["error"]
                                                     for c in mixed["budget"]["choice"].values())


@pytest.fixture(scope="module")
def uniform(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "uniform"
    return api.quantize(str(tiny_model_dir), "w4a16-rtn", out=out, show_progress=False), out


def test_a_budget_at_the_uniform_size_writes_a_mixed_checkpoint_within_it(tiny_model_dir, uniform, tmp_path):
    report, _ = uniform
    numel = sum(r["shape"][0] * r["shape"][1] for r in report["layers"])
    bpw = 8 * report["bytes_quantized"] / numel
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(f"name: mixed\nscheme: W4A16\nalgorithms: [rtn]\nignore: [lm_head]\n"
                      f"calibration: {{num_samples: 8, seqlen: 64}}\nbudget: {{bits_per_weight: {bpw}}}\n")
    mixed = api.quantize(str(tiny_model_dir), str(recipe), out=tmp_path / "o", show_progress=False)
    quantized = [r for r in mixed["layers"]]
    kept = [n for n, c in mixed["budget"]["choice"].items() if c["format"] == "16"]
    mixed_numel = sum(r["shape"][0] * r["shape"][1] for r in quantized)
    float_bytes = sum(mixed["budget"]["choice"][n]["candidates"]["16"]["bytes"] for n in kept)
    assert mixed["bytes_quantized"] + float_bytes <= report["bytes_quantized"]  # within the uniform size
    assert mixed_numel + sum(mixed["budget"]["choice"][n]["candidates"]["16"]["bytes"] // 4 for n in kept) == numel
    assert mixed["budget"]["predicted_error"] <= sum(c["candidates"]["w4g128"]["error"]
                                                     for c in mixed["budget"]["choice"].values())
    assert len(mixed["budget"]["linears_per_format"]) > 1
    for row in quantized:  # each row is quantized as chosen
        fmt = mixed["budget"]["choice"][row["name"]]["format"]
        assert fmt != "16" and row["bits"] == int(fmt[1])
    # the recipe copy holds the choice, not the budget: it repeats the run
    copy = (tmp_path / "o" / "quantkit_recipe.yaml").read_text()
    assert "budget" not in copy and "overrides" in copy
    again = api.quantize(str(tiny_model_dir), str(tmp_path / "o" / "quantkit_recipe.yaml"), out=tmp_path / "again",
                         show_progress=False)
    assert tensor_digests(tmp_path / "again") == tensor_digests(tmp_path / "o") and again["budget"] is None
    # transformers reads the several config groups as quantkit does
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    ours = api.load(tmp_path / "o").model(ids).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "o")(ids).logits
    assert (ours - theirs).abs().max() <= 1e-3 * ours.abs().max()
    groups = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) >= 2


def test_a_budget_below_every_format_is_one_clear_error(tiny_model_dir, tmp_path):
    from test_bad_inputs import assert_clean_error, assert_nothing_written, cli

    recipe = tmp_path / "tight.yaml"
    recipe.write_text("name: tight\nscheme: W4A16\nalgorithms: [rtn]\ncalibration: {num_samples: 4, seqlen: 32}\n"
                      "budget: {bits_per_weight: 1.5, candidates: [w4g128, w8]}\n")
    assert_clean_error(*cli("quantize", tiny_model_dir, "--recipe", recipe, "--out", tmp_path / "o"), "smallest candidate")
    assert_nothing_written(tmp_path / "o")


def test_gradient_sensitivities_are_each_output_channels_mean_squared_loss_gradient(tiny_model_dir):
    from quantkit.budget import output_sensitivities
    from quantkit.models import load_model

    loaded = load_model(str(tiny_model_dir))
    recipe = Recipe.from_yaml("name: x\nbudget: {bits_per_weight: 4.5, sensitivity: gradient}\n")
    ids = torch.randint(0, loaded.model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    got = output_sensitivities(loaded, ids, "cpu", recipe)
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert sorted(got) == sorted(names)
    # by hand: the outputs' gradients kept with retain_grad, the loss summed over every predicted token
    name = names[len(names) // 2]
    module = loaded.model.get_submodule(name)
    kept = []

    def keep(_m, _a, out):
        out.retain_grad()
        kept.append(out)

    h = module.register_forward_hook(keep)
    emb = loaded.model.get_submodule("model.embed_tokens").register_forward_hook(lambda _m, _a, o: o.requires_grad_())
    with torch.enable_grad():
        logits = loaded.model(input_ids=ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                          reduction="sum").backward()
    h.remove(), emb.remove()
    by_hand = kept[0].grad.pow(2).flatten(0, -2).sum(0) / ids.numel()
    torch.testing.assert_close(got[name], by_hand, rtol=1e-4, atol=1e-12)
    assert all((g >= 0).all() and g.shape == (loaded.model.get_submodule(n).out_features,) for n, g in got.items())


@pytest.mark.parametrize("sensitivity", ["gradient", "measured"])
def test_a_weighted_budget_writes_a_checkpoint_within_it(tiny_model_dir, tmp_path, sensitivity):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: weighted-budget\nscheme: W4A16\nweights: {bits: 4, group_size: 32}\nalgorithms: [rtn]\n"
                      f"budget: {{bits_per_weight: 4.6, sensitivity: {sensitivity}, {sensitivity}_samples: 2}}\n"
                      "calibration: {data: austen, num_samples: 4, seqlen: 32}\ncheck: {windows: 0}\n")
    report = api.quantize(str(tiny_model_dir), str(recipe), tmp_path / "out", device="cpu", show_progress=False)
    b = report["budget"]
    assert b["bits_per_weight"] <= 4.6 and b["predicted_error"] > 0
    assert len(b["linears_per_format"]) >= 2  # the weights moved bytes between layers
    # inspect shows the mix (it once named an undefined table for budget checkpoints)
    from typer.testing import CliRunner

    from quantkit.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "mixed precision" in shown.output and f"{b['bits_per_weight']:.3f} bits per weight" in shown.output


def test_measured_sensitivities_are_each_linears_kl_per_unit_of_output_error(tiny_model_dir):
    """One linear rounded alone to the reference candidate: the model's mean KL divergence from the float
    model over the windows, divided by the mean squared error the rounding added to that linear's output,
    computed here by hand from full forwards."""
    from quantkit.budget import measured_sensitivities
    from quantkit.formats import quantize_rtn
    from quantkit.models import load_model

    loaded = load_model(str(tiny_model_dir))
    recipe = Recipe.from_yaml("name: x\nweights: {bits: 4, group_size: 32}\n"
                              "budget: {bits_per_weight: 3.2, sensitivity: measured, candidates: [w2g32, w3g32, w4g32]}\n")
    assert recipe.budget.reference_candidate() == "w3g32"  # nominal 3.5 bits, nearest 3.2
    # 9 windows: three batches of up to 4 (each compared with its own float logits)
    ids = torch.randint(0, loaded.model.config.vocab_size, (9, 24), generator=torch.Generator().manual_seed(0))
    got = measured_sensitivities(loaded, ids, "cpu", recipe, "w3g32")
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert sorted(got) == sorted(names) and all(v > 0 for v in got.values())
    model = loaded.model
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    for name in (names[0], names[-1]):
        linear = model.get_submodule(name)
        w = linear.weight.data.clone()
        w_hat = quantize_rtn(w, recipe.budget.specs(recipe.weights)["w3g32"]).dequantize(w.dtype)
        seen = []
        h = linear.register_forward_pre_hook(lambda _m, a: seen.append(a[0].flatten(0, -2)))
        linear.weight.data.copy_(w_hat)
        with torch.inference_mode():
            ours = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        linear.weight.data.copy_(w)
        h.remove()
        kl = float((ref.exp() * (ref - ours)).sum(-1).mean())
        x = torch.cat(seen)
        err = float((x @ (w - w_hat).T).pow(2).sum(-1).mean())
        assert got[name] == pytest.approx(kl / err, rel=1e-3)


@pytest.mark.parametrize("reference", ["w2g64", "16"])  # not among the default candidates; not quantized
def test_a_reference_must_be_a_quantized_candidate(reference):
    with pytest.raises(RecipeError, match="reference"):
        Recipe.from_yaml(f"name: x\nbudget: {{bits_per_weight: 4.5, sensitivity: measured, reference: '{reference}'}}\n")
    assert Recipe.from_yaml("name: x\nbudget: {bits_per_weight: 4.5, sensitivity: measured}\n").budget.reference_candidate() == "w4g32"
