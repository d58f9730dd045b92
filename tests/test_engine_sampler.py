"""The sampler: temperature, sampling, speculative verification (exact for greedy, in
distribution for sampling) and n-gram drafting."""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.engine.sampler import probs, rejection_sample, sample
from quantkit.engine.speculative import propose_ngram


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tv(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Total variation between the empirical distribution of tokens and p [V]."""
    assert tokens.numel() > 0
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    return 0.5 * (counts / counts.sum() - p.double()).abs().sum().item()


def _tol(n: int, v: int) -> float:
    """0.01, or twice the bound 0.5 * sqrt(V / n) on the expected TV of n draws when fewer."""
    return max(0.01, (v / n) ** 0.5)


def _one_hot(ids: list[int], v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), v).float()


# ---- probs


def test_probs_greedy_rows_are_one_hot_and_temperature_scales():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.0, 2.0, 1.0], [1.0, 3.0, 2.0, -1.0]])
    p = probs(logits, torch.tensor([0.0, 2.0, 0.5]))
    assert p.dtype == torch.float32
    assert torch.equal(p[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    for row, t in ((1, 2.0), (2, 0.5)):
        e = [math.exp(x / t) for x in logits[row].tolist()]
        expected = torch.tensor([x / sum(e) for x in e])
        torch.testing.assert_close(p[row], expected, rtol=1e-6, atol=1e-7)


def test_probs_bf16_and_3d_broadcast_temperature():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7).bfloat16()
    p = probs(logits, torch.tensor([0.0, 0.7]))
    assert p.dtype == torch.float32 and p.shape == (2, 3, 7)
    assert torch.equal(p[0], _one_hot(logits[0].float().argmax(-1).tolist(), 7))
    torch.testing.assert_close(p[1], torch.softmax(logits[1].float() / 0.7, -1))


def test_probs_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"temperature must be \[B\]"):
        probs(torch.zeros(2, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="logits must be"):
        probs(torch.zeros(5), torch.zeros(1))


# ---- sample


def test_sample_greedy_rows_give_argmax():
    torch.manual_seed(1)
    logits = torch.randn(64, 50)
    p = probs(logits, torch.zeros(64))
    for seed in range(3):
        assert torch.equal(sample(p, _gen(seed)), logits.argmax(-1))


def test_sample_matches_distribution():
    p = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1])
    tokens = sample(p.expand(200_000, 6), _gen(0))
    assert tokens.dtype == torch.int64 and tokens.shape == (200_000,)
    assert not (tokens == 2).any()
    assert _tv(tokens, p) < 0.01


def test_sample_row_depends_only_on_its_own_distribution():
    # the same generator state gives row 1 the same token whether row 0 is greedy or not
    p1 = torch.tensor([0.2, 0.3, 0.5])
    a = sample(torch.stack([torch.tensor([0.0, 1.0, 0.0]), p1]), _gen(7))
    b = sample(torch.stack([torch.tensor([0.6, 0.2, 0.2]), p1]), _gen(7))
    assert a[0] == 1 and a[1] == b[1]
    assert torch.equal(sample(p1.expand(100, 3), _gen(3)), sample(p1.expand(100, 3), _gen(3)))


# ---- rejection_sample, greedy: exact


def test_rejection_sample_greedy_reduces_exactly():
    v, k = 10, 3
    target_argmax = [[4, 2, 7, 1], [4, 2, 7, 1], [4, 2, 7, 1], [4, 2, 7, 1], [0, 0, 0, 9]]
    drafts = [[4, 2, 7], [4, 2, 5], [4, 3, 7], [6, 2, 7], [0, 0, 0]]
    expected = [[4, 2, 7, 1], [4, 2, 7, -1], [4, 2, -1, -1], [4, -1, -1, -1], [0, 0, 0, 9]]
    target_p = torch.stack([_one_hot(r, v) for r in target_argmax])  # [5, 4, V]
    draft_tokens = torch.tensor(drafts)
    torch.manual_seed(2)
    draft_p = torch.softmax(torch.randn(5, k, v), -1)  # a sampling draft; greedy target decides
    draft_p[0, 0] = _one_hot([4], v)[0]  # a draft certain of the right token
    for dp in (None, draft_p):
        for seed in range(5):
            out, num = rejection_sample(target_p, dp, draft_tokens, _gen(seed))
            assert out.dtype == torch.int64 and num.dtype == torch.int64
            assert out.tolist() == expected
            assert num.tolist() == [4, 3, 2, 1, 4]


def test_rejection_sample_k0_emits_bonus_only():
    target_p = _one_hot([3, 1], 5).unsqueeze(1)  # [2, 1, V]
    out, num = rejection_sample(target_p, None, torch.zeros(2, 0, dtype=torch.long), _gen(0))
    assert out.tolist() == [[3], [1]] and num.tolist() == [1, 1]


def test_rejection_sample_rejects_bad_shapes():
    target_p = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="draft_tokens must be"):
        rejection_sample(target_p, None, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="draft_p must be"):
        rejection_sample(target_p, torch.full((2, 2, 5), 0.2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target_p must be"):
        rejection_sample(target_p[0], None, torch.zeros(2, 2, dtype=torch.long))


# ---- rejection_sample, sampling: every emitted token ~ the target at its position


def _distribution_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (p [3, V], q [2, V]): target at 2 draft positions + bonus, draft at 2."""
    g = _gen(123)
    v = 6

    def dirichlet(n: int) -> torch.Tensor:
        x = torch.empty(n, v).exponential_(generator=g)
        return x / x.sum(-1, keepdim=True)

    p = dirichlet(3)
    far = torch.tensor([[0.01, 0.01, 0.01, 0.01, 0.48, 0.48], [0.7, 0.1, 0.1, 0.04, 0.03, 0.03]])
    p_far = torch.cat([torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.02, 0.02], [0.02, 0.03, 0.05, 0.1, 0.3, 0.5]]), dirichlet(1)])
    zero = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.2, 0.2, 0.2, 0.2, 0.2]])
    return {
        "random": (p, dirichlet(2)),
        "equal": (p, p[:2].clone()),
        "very_different": (p_far, far),  # acceptance rate ~0.1 at position 0
        "q_zero_where_p_has_mass": (p, zero),
    }


@pytest.mark.parametrize("case", list(_distribution_cases()))
def test_rejection_sample_emits_target_distribution(case: str):
    p, q = _distribution_cases()[case]
    b, v = 200_000, p.shape[-1]
    g = _gen(0)
    draft_tokens = torch.stack([torch.multinomial(q[i], b, replacement=True, generator=g) for i in range(2)], 1)
    out, num = rejection_sample(p.expand(b, 3, v), q.expand(b, 2, v), draft_tokens, g)
    assert ((num >= 1) & (num <= 3)).all()
    assert ((out >= 0).sum(-1) == num).all()  # emitted tokens, then only -1
    assert _tv(out[:, 0], p[0]) < 0.01
    # the chain: given d_0 accepted, the next token ~ p_1; given d_0, d_1 accepted, the bonus ~ p_2
    for i in (1, 2):
        rows = num >= i + 1
        assert _tv(out[rows, i], p[i]) < _tol(int(rows.sum()), v)  # 3k rows at worst (very_different)
    if case == "equal":
        assert (num == 3).all()  # q = p: every draft accepted


def test_rejection_sample_deterministic_draft_emits_target_distribution():
    b = 200_000
    p = torch.tensor([[0.1, 0.25, 0.05, 0.3, 0.2, 0.1], [0.3, 0.0, 0.2, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.2, 0.2, 0.3]])
    draft_tokens = torch.tensor([3, 1]).expand(b, 2)  # an n-gram draft: position 1's draft has p = 0
    out, num = rejection_sample(p.expand(b, 3, 6), None, draft_tokens, _gen(5))
    assert _tv(out[:, 0], p[0]) < 0.01
    assert abs((num >= 2).double().mean().item() - 0.3) < 0.01  # accepted with probability p_0(d_0)
    second = out[num >= 2, 1]
    assert not (second == 1).any()  # p_1(d_1) = 0: always rejected
    assert _tv(second, p[1]) < 0.01


def test_rejection_sample_falls_back_to_target_when_residual_is_zero():
    # a draft q = 1.5 p (rounding taken to the extreme) is >= p everywhere: max(0, p - q) = 0,
    # yet d is rejected with probability 1/3; the emitted token must still be ~ p
    b = 200_000
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = _gen(9)
    draft_tokens = torch.multinomial(p, b, replacement=True, generator=g).unsqueeze(1)
    out, num = rejection_sample(p.expand(b, 2, 4), (1.5 * p).expand(b, 1, 4), draft_tokens, g)
    assert abs((num == 1).double().mean().item() - 1 / 3) < 0.01
    assert _tv(out[:, 0], p) < 0.01


# ---- propose_ngram


def test_propose_ngram_latest_match_and_longer_n_first():
    # [1, 2] occurs at 0 and 4; the latest (4) is followed by 7 8
    assert propose_ngram([1, 2, 5, 6, 1, 2, 7, 8, 9, 1, 2], k=2) == [7, 8]
    # n=1 alone would pick the latest 3 (followed by 9), n=2 finds [4, 3] earlier
    tokens = [4, 3, 5, 6, 3, 9, 4, 3]
    assert propose_ngram(tokens, k=2, max_n=2) == [5, 6]
    assert propose_ngram(tokens, k=2, max_n=1) == [9, 4]
    assert propose_ngram(tokens, k=2, max_n=3, min_n=3) == []


def test_propose_ngram_short_and_empty():
    assert propose_ngram([5, 6, 7, 5], k=4) == [6, 7, 5]  # fewer than k: the sequence ends
    assert propose_ngram([1, 1, 1, 1], k=3) == [1]  # latest match overlaps the suffix
    assert propose_ngram([1, 2, 3, 4], k=3) == []
    assert propose_ngram([1], k=3) == []
    assert propose_ngram([], k=3) == []


def test_propose_ngram_long_sequence():
    # the match is near the start of 4,000 tokens: the scan walks back over all of them
    tokens = list(range(4000)) + [17, 18]
    assert propose_ngram(tokens, k=4, max_n=3) == [19, 20, 21, 22]


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=2, min_n=0), dict(k=2, max_n=1, min_n=2)])
def test_propose_ngram_bad_arguments(kwargs: dict):
    with pytest.raises(ValueError, match="must be"):
        propose_ngram([1, 2, 1], **kwargs)
