"""AWQ math: scale search, clipping, folding."""

from __future__ import annotations

import torch

from quantkit.algorithms.awq_math import (
    fake_quantize_grouped,
    output_error,
    scale_hessian,
    search_clip,
    search_scales,
)
from quantkit.algorithms.gptq_math import accumulate_hessian, make_hessian
from quantkit.formats import IntSpec


def _inputs(n=2048, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g)
    X[:, :4] *= 20  # salient input channels, as AWQ finds in LLMs
    H = make_hessian(in_f)
    accumulate_hessian(H, 0, X)
    return X, H, X.abs().mean(dim=0)


def _err(X, W, W_hat):
    return float(((X @ (W - W_hat).T) ** 2).sum())


def test_scale_search_beats_plain_rounding_where_channels_are_salient():
    X, H, x_mag = _inputs()
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)]
    spec = IntSpec(4, True, 32)
    found = search_scales(weights, H, x_mag, spec)
    assert found.alpha is not None and found.error < 0.9 * found.error_rtn
    s = found.scales
    for W in weights:  # the reported error is what the scaled rounding really does on the tokens
        awq = fake_quantize_grouped(W * s, spec) / s
        assert _err(X, W, awq) < 0.9 * _err(X, W, fake_quantize_grouped(W, spec))


def test_scale_search_never_does_worse_than_plain_rounding():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(1024, 64, generator=g)  # no salient channels
    H = make_hessian(64)
    accumulate_hessian(H, 0, X)
    found = search_scales([torch.randn(16, 64, generator=g)], H, X.abs().mean(0), IntSpec(4, False, 32))
    assert found.error <= found.error_rtn
    if found.alpha is None:
        assert torch.all(found.scales == 1)


def test_clip_search_lowers_each_groups_output_error():
    X, H, _ = _inputs(seed=3)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(4))
    W[:, 7] *= 6  # an outlier weight column stretches its group's range
    spec = IntSpec(3, True, 32)
    clipped, mean_shrink = search_clip(W, H, spec)
    assert 0.5 <= mean_shrink < 1.0
    assert torch.all(clipped.abs() <= W.abs() + 1e-6)
    assert _err(X, W, fake_quantize_grouped(clipped, spec)) < _err(X, W, fake_quantize_grouped(W, spec))


def test_output_error_and_scaled_hessian_agree_with_the_tokens():
    X, H, _ = _inputs(n=512, in_f=32, seed=5)
    dW = torch.randn(8, 32)
    torch.testing.assert_close(output_error(dW, H).sum(), torch.tensor(2 * _err(X, dW, 0 * dW) / X.shape[0]), rtol=1e-4, atol=1e-3)
    s = torch.rand(32) + 0.5
    Hs = make_hessian(32)
    accumulate_hessian(Hs, 0, X / s)
    torch.testing.assert_close(scale_hessian(H, s), Hs, rtol=1e-4, atol=1e-4)
