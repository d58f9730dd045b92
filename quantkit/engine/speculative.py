"""Speculative decoding: k proposed tokens per sequence, verified in one target forward.

    spec = Speculator(k, block_size, generator, device, draft, draft_step)   # draft None: prompt lookup
    spec.prefill(chunks)                          # the draft model caches what the target does
    verified = spec.verify(batch, target_step)    # per sequence: the accepted drafts + 1 token
    finished = scheduler.postprocess(batch, verified)

A decode step feeds each sequence's last token and k proposals after it (the scheduler reserved
1 + k slots: its lookahead), so the target's distributions at all k + 1 positions come from one
forward. quantkit.engine.sampler.rejection_sample keeps the accepted prefix and draws one token
after it: the outputs follow the target's distribution, and greedy output equals plain greedy.
Proposals come from prompt lookup (propose_ngram, no model) or from k steps of a draft model that
shares the target's block tables (its own K/V cache, the same slots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantkit.engine.sampler import rejection_sample
from quantkit.engine.sequence import Sequence
from quantkit.engine.step import DecodeStep, step_inputs

if TYPE_CHECKING:  # the model's side, for annotations only: proposing n-grams needs none of it
    from quantkit.engine.engine import Stats
    from quantkit.engine.runner import ModelRunner, PrefillChunk


def propose_ngram(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Prompt-lookup drafting: up to k tokens that followed the latest earlier occurrence
    of the sequence's last n tokens, for the largest n in [min_n, max_n] that has one.

    Fewer than k when that occurrence is near the end, [] when no n matches. A backwards
    scan, O(len(tokens) * n) per n at worst.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if min_n < 1:
        raise ValueError(f"min_n must be at least 1, got {min_n}")
    if max_n < min_n:
        raise ValueError(f"max_n must be >= min_n = {min_n}, got {max_n}")
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        last = suffix[-1]
        # an occurrence at i covers tokens[i : i + n]; i <= length - n - 1 keeps it earlier
        # than the suffix itself and leaves at least one token after it
        for i in range(length - n - 1, -1, -1):
            if tokens[i + n - 1] == last and tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


class Speculator:
    """The proposer (prompt lookup, or a draft model with its decode step) and the verification."""

    def __init__(self, k: int, block_size: int, generator: torch.Generator, device: torch.device,
                 draft: ModelRunner | None = None, draft_step: DecodeStep | None = None):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if (draft is None) != (draft_step is None):
            raise ValueError("a draft model needs its decode step, and the step its model")
        self.k, self.block_size, self.generator, self.device = k, block_size, generator, device
        self.draft, self.draft_step = draft, draft_step

    def prefill(self, chunks: list[PrefillChunk]) -> None:
        """The draft model computes the K/V of what the target prefills (its logits are not needed)."""
        if self.draft is not None:
            self.draft.prefill(chunks)

    def verify(self, batch: list[Sequence], target_step: DecodeStep) -> list[list[int]]:
        """Propose k tokens per sequence, run the target over the last token and them (the slots
        are reserved), keep what rejection sampling accepts. Per sequence: the accepted drafts
        then one token of the target's, 1 .. k + 1 tokens."""
        k = self.k
        if self.draft is None:
            drafts = []
            for s in batch:  # a short proposal is padded: any token is a valid guess
                d = propose_ngram(s.token_ids, k)
                drafts.append(d + [s.last_token] * (k - len(d)))
            draft_tokens, draft_p = torch.tensor(drafts, device=self.device), None
            tokens = [[s.last_token] + d for s, d in zip(batch, drafts)]
        else:
            draft_tokens, draft_p = self._draft(batch)
            last = torch.tensor([[s.last_token] for s in batch], device=self.device)
            tokens = torch.cat([last, draft_tokens], dim=1)
        x = step_inputs(batch, [len(s) - 1 for s in batch], k + 1, tokens, self.block_size)
        p, _ = target_step(x, draw=False)  # [B, k + 1, V]
        out, emitted = rejection_sample(p, draft_p, draft_tokens, self.generator)
        return [row[:n] for row, n in zip(out.tolist(), emitted.tolist())]

    def count(self, stats: Stats, verified: list[list[int]], kept: list[int]) -> None:
        """Acceptance figures into stats: verified as verify()
        returned it, kept[i] the tokens sequence i took of it (fewer where it reached max_tokens
        or a stop token)."""
        stats.proposed += self.k * len(verified)
        stats.accepted += sum(len(v) - 1 for v in verified)
        stats.verify_rows += len(verified)
        stats.emitted += sum(kept)

    def _draft(self, batch: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """k draft tokens per sequence from the draft model [B, k] and the distributions they were
        drawn from [B, k, V]. Its first step re-reads the last two tokens: when the previous step
        accepted every draft, the draft model never saw the last one. (Position len - 2 may sit in
        a block shared through a common prefix; rewriting it touches only the draft's own cache,
        where a rounding difference can change a proposal but never an output.)"""
        bs = self.block_size
        # len >= 2 after prefill
        x = step_inputs(batch, [len(s) - 2 for s in batch], 2, [s.token_ids[-2:] for s in batch], bs)
        p, d = self.draft_step(x, self.generator)
        # copies: a graphed step returns its graph's own outputs, which the next replay overwrites
        ps, ds = [p[:, 1].clone()], [d[:, 1].clone()]
        for i in range(1, self.k):
            x = step_inputs(batch, [len(s) + i - 1 for s in batch], 1, ds[-1][:, None], bs)
            p, d = self.draft_step(x, self.generator)
            ps.append(p[:, 0].clone())
            ds.append(d[:, 0].clone())
        return torch.stack(ds, dim=1), torch.stack(ps, dim=1)
