"""Rotations of the residual stream and of the value heads (issue 23): the rotated float model
computes the same function, and quantizes better where outliers hurt."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_family_model, make_tiny_model
from quantkit.algorithms import build
from quantkit.errors import UnsupportedModelError
from quantkit.formats.hadamard import hadamard, rotation_matrix
from quantkit.models import load_lazily, load_model
from quantkit.recipe import AlgorithmStep


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 1536, 4096])
def test_hadamard_matrices(n):
    h = hadamard(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert set(h.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("n", [576, 172])  # a Hadamard order, and one where none is built (random orthogonal)
def test_rotation_matrices_are_orthogonal(n):
    q, kind = rotation_matrix(n, 3)
    assert kind == ("random-hadamard" if n == 576 else "random-orthogonal")
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(n, 3)[0]) and not torch.equal(q, rotation_matrix(n, 4)[0])


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).logits.double()


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("lazy", [False, True])
def test_the_rotated_model_computes_the_same_function(family, lazy, tmp_path):
    folder = make_tiny_model(tmp_path / "m") if family == "llama" else make_tiny_family_model(tmp_path / "m", family)
    plain = load_model(str(folder))
    ids = torch.randint(0, plain.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    rotated = load_lazily(str(folder))[0] if lazy else load_model(str(folder))
    step = build(AlgorithmStep("rotate", (("seed", 1),)))
    step.prepare(rotated)
    if lazy:
        for name, _ in list(rotated.model.named_children()):
            for sub, _ in list(rotated.model.get_submodule(name).named_children()):
                full = f"{name}.{sub}"
                if full == "model.layers":
                    for i in range(len(rotated.model.model.layers)):
                        rotated.materialize(f"model.layers.{i}")
                elif next(rotated.model.get_submodule(full).parameters(), None) is not None:
                    rotated.materialize(full)
            if next(rotated.model.get_submodule(name).parameters(recurse=False), None) is not None:
                rotated.materialize(name)
    expected, got = _logits(plain, ids), _logits(rotated, ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.equal(rotated.model.model.layers[0].self_attn.o_proj.weight,
                           plain.model.model.layers[0].self_attn.o_proj.weight)
    assert rotated.model.config.tie_word_embeddings is False


def test_gemma_is_refused_with_the_reason(tmp_path):
    loaded = load_model(str(make_tiny_family_model(tmp_path / "g", "gemma2")))
    with pytest.raises(UnsupportedModelError, match="do not commute"):
        build(AlgorithmStep("rotate")).prepare(loaded)


def test_online_rotation_computes_the_same_function_and_is_recorded(tiny_model_dir, tmp_path):
    import json

    from quantkit import api

    plain, rotated = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    build(AlgorithmStep("rotate", (("online", True),))).prepare(rotated)
    ids = torch.randint(0, plain.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = _logits(plain, ids)
    assert (_logits(rotated, ids) - expected).abs().max() <= 1e-4 * expected.abs().max()

    api.quantize(str(tiny_model_dir), "w8a8-int8-rotate-online", out=tmp_path / "o", show_progress=False)
    qconfig = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    (scheme,) = qconfig["transform_config"]["config_groups"].values()
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 32  # 160 = 5 x 32
    assert scheme["apply"][0]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    ours = api.load(tmp_path / "o")
    assert [n for n, m in ours.model.named_modules() if getattr(m, "_quantkit_online_block", None) == 32] == \
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # the quantized model is the rotated one: without the run-time rotation it would be far off
    close = (_logits(ours, ids) - expected).abs().max()
    for m in ours.model.modules():
        m._forward_pre_hooks.clear()
    assert close < 0.1 * (_logits(ours, ids) - expected).abs().max()


def test_a_transform_quantkit_does_not_read_is_refused(tiny_model_dir, tmp_path):
    import json

    from quantkit import api
    from quantkit.errors import CheckpointError

    api.quantize(str(tiny_model_dir), "w8a8-int8-rotate-online", out=tmp_path / "o", show_progress=False)
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    (scheme,) = config["quantization_config"]["transform_config"]["config_groups"].values()
    scheme["randomize"] = True
    (tmp_path / "o" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not-randomized"):
        api.load(tmp_path / "o")


def test_the_engine_applies_online_rotations(tiny_model_dir, tmp_path):
    """The engine calls down_proj as a module, so its input rotation (a pre-hook) runs there too."""
    from conftest import verification_distributions
    from quantkit import api
    from quantkit.engine.config import EngineConfig

    api.quantize(str(tiny_model_dir), "w8a8-int8-rotate-online", out=tmp_path / "o", show_progress=False)
    loaded = api.load(tmp_path / "o")
    p, reference = verification_distributions(loaded, EngineConfig(block_size=4, max_model_len=64, cuda_graphs=False),
                                              [1, 5, 9, 13, 2])
    assert (p - reference).abs().sum(-1).max() < 1e-4
