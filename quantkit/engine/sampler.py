"""Next tokens from logits: temperature, sampling, speculative verification.

All tensor functions are pure and free of host syncs (no .item(), no data-dependent
shapes), so a runner can put them in a CUDA graph. Greedy decoding is not a separate
path: temperature 0 turns a row into a one-hot distribution, and every sampler below
returns exactly its argmax, while drawing the same random numbers as for any other
row; a row's result thus depends only on its own distribution and the generator state.
"""

from __future__ import annotations

import torch


def probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Distributions to sample from, float32, the shape of logits.

    logits: [B, V] or [B, S, V], any float dtype (computed in float32).
    temperature: [B] float, >= 0 (SamplingParams checks it); the same for all S positions
        of a row. Rows with temperature 0 give a one-hot at argmax (the first one on ties),
        the others softmax(logits / T).
    """
    if logits.ndim not in (2, 3):
        raise ValueError(f"logits must be [B, V] or [B, S, V], got shape {tuple(logits.shape)}")
    if temperature.shape != logits.shape[:1]:
        raise ValueError(f"temperature must be [B] = [{logits.shape[0]}], got shape {tuple(temperature.shape)}")
    logits = logits.float()
    t = temperature.float().view(-1, *([1] * (logits.ndim - 1)))  # [B, 1] or [B, 1, 1]
    greedy = t == 0
    soft = torch.softmax(logits / torch.where(greedy, 1.0, t), dim=-1)
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, soft)


def sample(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of p: [..., V] -> [...] int64.

    The exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. picks i with
    probability p_i / sum(p) (E_i / p_i ~ Exp(p_i), and the least of independent
    exponentials is i with probability rate_i / sum(rates)). Chosen over torch.multinomial
    because it has no host sync and a fixed random draw (one E per entry whatever p is), so
    it is graph-friendly and deterministic per row. p need not be normalized. A one-hot row
    gives exactly its argmax (every other ratio is 0).
    """
    return race(p, torch.empty_like(p, dtype=torch.float32).exponential_(generator=generator))


def race(p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """sample()'s race with the exponentials e (the shape of p) drawn by the caller: argmax p / e."""
    # exponential_ may return 0 (-log(1 - u) at u = 0): 0 / 0 would be nan, and argmax takes nan
    return (p.float() / e.clamp(min=torch.finfo(torch.float32).tiny)).argmax(-1)


def rejection_sample(
    target_p: torch.Tensor,
    draft_p: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify k draft tokens against the target model (speculative sampling).

    Leviathan et al. 2023 (Algorithm 1) / Chen et al. 2023: with p_i the target's and q_i
    the draft's distribution at position i, accept d_i with probability min(1, p_i(d_i) /
    q_i(d_i)); at the first rejection emit a token from norm(max(0, p_i - q_i)) and stop; if
    all k are accepted emit a bonus token from p_k. Each emitted token is then distributed
    exactly as p at its position. Where max(0, p_i - q_i) is all 0 (only reachable through
    rounding) p_i is used instead.

    target_p: [B, k+1, V] the target's distributions at the k draft positions and the bonus one.
    draft_p: [B, k, V] the distributions the draft tokens were sampled from, or None for a
        deterministic proposer (n-gram lookup): q_i is then one-hot on d_i, so d_i is accepted
        with probability p_i(d_i) and a rejection samples p_i with d_i removed.
    draft_tokens: [B, k] int64 in [0, V).
    Returns (out_tokens [B, k+1] int64, the emitted tokens then -1, num_emitted [B] int64 in
    1..k+1). With a one-hot target (greedy) this is exactly: accept while d_i == argmax p_i,
    then emit argmax p_i at the first mismatch, or argmax p_k after k acceptances.
    Random draws are fixed in number (B*k uniforms, then B*(k+1)*V exponentials).
    """
    if target_p.ndim != 3:
        raise ValueError(f"target_p must be [B, k+1, V], got shape {tuple(target_p.shape)}")
    b, k1, v = target_p.shape
    k = k1 - 1
    if draft_tokens.shape != (b, k):
        raise ValueError(f"draft_tokens must be [B, k] = [{b}, {k}] for target_p {tuple(target_p.shape)}, got {tuple(draft_tokens.shape)}")
    if draft_p is not None and draft_p.shape != (b, k, v):
        raise ValueError(f"draft_p must be [B, k, V] = [{b}, {k}, {v}], got shape {tuple(draft_p.shape)}")
    p = target_p.float()
    d = draft_tokens.long().unsqueeze(-1)  # [B, k, 1]
    p_d = p[:, :k].gather(-1, d).squeeze(-1)  # [B, k]  p_i(d_i)
    if draft_p is None:
        q_d = torch.ones_like(p_d)
        residual = p[:, :k].scatter(-1, d, 0.0)  # max(0, p_i - onehot(d_i)), [B, k, V]
    else:
        q = draft_p.float()
        q_d = q.gather(-1, d).squeeze(-1)
        residual = (p[:, :k] - q).clamp_(min=0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :k])

    # accept iff u < p/q with u ~ U[0, 1), written without the division: q_d = 0 < p_d
    # accepts, p_d = 0 never does; q_d is clamped to 1 so that p_d = 1 (greedy) always
    # accepts even if rounding left q_d a hair above 1
    u = torch.rand(b, k, generator=generator, device=p.device)
    accepted = u * q_d.clamp(max=1.0) < p_d  # [B, k]
    num_accepted = accepted.long().cumprod(-1).sum(-1)  # [B], accepted before the first rejection

    # the token emitted after the accepted ones: the residual sample at the rejected position,
    # or the bonus sample from p_k; drawn for every position, picked with a gather
    last = sample(torch.cat([residual, p[:, k:]], dim=1), generator)  # [B, k+1]
    last = last.gather(-1, num_accepted.unsqueeze(-1))  # [B, 1]

    pos = torch.arange(k1, device=p.device)  # [k+1]
    padded = torch.cat([draft_tokens.long(), torch.full_like(last, -1)], dim=-1)  # [B, k+1]
    n = num_accepted.unsqueeze(-1)  # [B, 1]
    out = torch.where(pos < n, padded, torch.where(pos == n, last, -1))
    return out, num_accepted + 1

