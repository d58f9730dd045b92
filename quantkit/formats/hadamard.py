"""Orthogonal matrices for rotations (quantkit.algorithms.rotation): Hadamard where one exists.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal
and spreads every input channel evenly over all outputs: a channel far larger than the rest
(an activation outlier) ends up as n channels of 1/sqrt(n) its size. Orders built here:

    2^k                      Sylvester: H_2k = [[H, H], [H, -H]]
    q + 1, q prime = 3 mod 4 Paley I:  I + [[0, 1^T], [-1, Q]]       (12, 20, 24, 32, 44, 48, 60, ...)
    2 (q + 1), q prime = 1 mod 4   Paley II: the conference matrix [[0, 1^T], [1, Q]] (x) [[1, 1], [1, -1]]
                                   + I (x) [[1, -1], [-1, -1]]        (28, 36, 60, 76, 108, ...)
    and the Kronecker product of a power of two with one of those (576 = 16 x 36, 1536 = 128 x 12,
    14336 = 512 x 28),

where Q is the Jacobsthal matrix Q[i, j] = chi(j - i), chi the quadratic character mod q. Where
no such order fits (11008 = 64 x 172), `rotation_matrix` falls back to a seeded random orthogonal
matrix (QR of a Gaussian one), which spreads outliers too, in expectation.
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n from one Paley construction, or None."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    if n % 2 == 0:
        q = n // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@functools.cache
def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (float64, entries +-1), or None when none is built here."""
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    for two in [power >> k for k in range(power.bit_length())]:  # the largest power-of-two factor first
        rest = n // two
        base = torch.ones(1, 1, dtype=torch.float64) if rest == 1 else _paley(rest)
        if base is None:
            continue
        h = base
        sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range(two.bit_length() - 1):
            h = torch.kron(sylvester, h)
        return h
    return None


def rotation_matrix(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix (float64) and its kind: a Hadamard matrix with its columns'
    signs drawn at random (seeded), scaled by 1/sqrt(n); else a seeded random orthogonal one."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return h * signs[None, :] / math.sqrt(n), "random-hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random-orthogonal"


def online_block(n: int) -> int:
    """The block of the online rotation of an n-wide input: the largest power of two dividing n."""
    return n & -n


@functools.cache
def _sylvester(b: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (hadamard(b) / math.sqrt(b)).to(dtype=dtype, device=device)


def rotate_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] times the block-diagonal matrix of n / block Sylvester Hadamard matrices of
    order `block`, each scaled by 1/sqrt(block) (orthogonal and symmetric): compressed-tensors'
    "hadamard" transform with head_dim = block. Computed in float32 (float64 for float64 x),
    returned in x's dtype. Applied to a weight's rows it gives W H (H is symmetric)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = _sylvester(block, compute, str(x.device))
    shape = x.shape
    y = x.to(compute).reshape(*shape[:-1], shape[-1] // block, block) @ h
    return y.reshape(shape).to(x.dtype)


def online_hook(block: int):
    """A forward pre-hook rotating a linear's input by rotate_blocks(x, block), on the fastest
    backend of op "hadamard" (quantkit.kernels.hadamard: a CUDA Walsh-Hadamard transform on a GPU)."""
    from quantkit.kernels.hadamard import hadamard_rows  # the kernels import the formats

    def hook(_module, args):
        return (hadamard_rows(args[0], block), *args[1:])

    return hook
