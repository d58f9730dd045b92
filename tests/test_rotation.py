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
