"""Statistics of the linears' calibration inputs, kept for the algorithms that observe them.

GPTQ rounds against, and AWQ scores its candidates with, the Hessian of a
linear's inputs X [n, in]:

    H = 2/n * X^T X                                        (in x in)

SmoothQuant wants each input channel's max |x| and a sample of tokens; AWQ
also wants each channel's mean |x|. InputStatistics keeps what its owner asks
for, one entry per input group (q, k and v see one input: one entry serves all
three), and follows a transform's folding: once the driver has divided a
group's input by s, every statistic describes x / s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def make_hessian(in_features: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.zeros(in_features, in_features, dtype=torch.float32, device=device)


def accumulate_hessian(H: torch.Tensor, n_seen: int, x: torch.Tensor) -> int:
    """Fold a batch x [t, in] into the running H = 2/n sum x x^T, in place.

    Returns the new sample count. H stays float32 whatever x's dtype.
    """
    t = x.shape[0]
    if t == 0:
        return n_seen
    n = n_seen + t
    x = x.to(torch.float32)
    H.mul_(n_seen / n)
    H.addmm_(x.T, x, alpha=2.0 / n)
    return n


def equalize_tokens(x: torch.Tensor) -> torch.Tensor:
    """Rows of x [t, in] scaled to unit norm (all-zero rows stay zero), in float32.

    Plain GPTQ weighs each calibration token by its squared norm. In most LLMs
    a few tokens (the first of every sequence, the "attention sink") carry
    activations hundreds of times larger than the rest (Sun et al. 2024,
    "Massive Activations in Large Language Models"); their outer products then
    make up nearly all of H, and GPTQ fits those few tokens at the expense of
    every other one, which generalizes badly beyond the calibration text.
    Accumulating unit rows gives every token the same say in the Hessian.
    """
    x = x.to(torch.float32)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def scale_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """H of the scaled input x / s: diag(1/s) H diag(1/s)."""
    inv = 1.0 / s.to(H.dtype)
    return H * inv[:, None] * inv[None, :]


@dataclass
class GroupStatistics:
    """What was kept of one input group's calibration inputs; None: not asked for."""

    tokens: int = 0
    hessian: torch.Tensor | None = None  # [in, in] float32, H = 2/n X^T X (rows equalized when asked)
    abs_sum: torch.Tensor | None = None  # [in] float64: sum over tokens of |x| per channel
    absmax: torch.Tensor | None = None  # [in] float32: max over tokens of |x| per channel
    samples: list[torch.Tensor] = field(default_factory=list)  # [t, in] float32 token rows of the first batches
    # [in] float32, absmax and sample_tokens both asked for: the max over every token but the sampled rows,
    # a range those rows did not set (SmoothQuant validates a static scale on them against it)
    absmax_unsampled: torch.Tensor | None = None

    @property
    def abs_mean(self) -> torch.Tensor:
        """[in] float32: mean |x| per channel."""
        return (self.abs_sum / max(self.tokens, 1)).to(torch.float32)


class InputStatistics:
    """Per input group statistics of the calibration inputs, shared by the group's linears.

    hessian: H (rows scaled to unit norm first when `equalize`); abs_mean: the
    per-channel sum of |x| (of the unit rows when `equalize_abs_mean`); absmax: the
    per-channel max |x| (inputs must be finite); sample_tokens: up to that many token
    rows: every batch gives sample_tokens / 8 evenly spaced rows (each window's first token
    among them) until the budget is full, so the sample comes from the first 8 batches. With a
    calibration mix in part order that is its first parts only; a uniform sample of every batch
    was tried and measured worse for SmoothQuant's search (branch dropped/smoothquant-bottom-k-sample).
    `owner` names the algorithm in errors.
    """

    def __init__(self, owner: str, hessian: bool = False, equalize: bool = True, abs_mean: bool = False,
                 absmax: bool = False, sample_tokens: int = 0, equalize_abs_mean: bool = False) -> None:
        self.owner = owner
        self.hessian, self.equalize, self.abs_mean, self.absmax = hessian, equalize, abs_mean, absmax
        self.equalize_abs_mean = equalize_abs_mean  # abs_mean of unit rows: every token the same say
        self.sample_tokens = sample_tokens
        self._groups: dict[str, GroupStatistics] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        """x [tokens, in]: one batch of the input the linears `names` share."""
        group = self._groups.get(names[0])
        if group is None:
            group = GroupStatistics()
            for name in names:
                self._groups[name] = group
        taken = self._sample(group, x) if self.sample_tokens else None
        if self.absmax:
            a = x.detach().abs().flatten(0, -2)
            batch_max = a.amax(dim=0).to(torch.float32)
            if not torch.isfinite(batch_max).all():
                raise ValueError(f"{self.owner}: the calibration input of {names[0]} is not finite")
            group.absmax = batch_max if group.absmax is None else torch.maximum(group.absmax, batch_max)
            if self.sample_tokens:
                rest = batch_max  # a batch that gave no sample rows: all of it
                if taken is not None:
                    keep = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
                    keep[taken] = False
                    rest = a[keep].amax(dim=0).to(torch.float32) if bool(keep.any()) else None
                if rest is not None:
                    group.absmax_unsampled = rest if group.absmax_unsampled is None else torch.maximum(group.absmax_unsampled, rest)
        if self.abs_mean:
            # float32 within a batch, float64 across batches
            rows = equalize_tokens(x) if self.equalize_abs_mean else x.to(torch.float32)
            batch_sum = rows.abs().sum(dim=0).to(torch.float64)
            group.abs_sum = batch_sum if group.abs_sum is None else group.abs_sum + batch_sum
        if self.hessian:
            if group.hessian is None:
                group.hessian = make_hessian(x.shape[-1], x.device)
            rows = equalize_tokens(x) if self.equalize else x
            group.tokens = accumulate_hessian(group.hessian, group.tokens, rows)
        else:
            group.tokens += x.shape[0]

    def _sample(self, group: GroupStatistics, x: torch.Tensor) -> slice | None:
        """Keep this batch's share of the sample; the rows taken (None: none)."""
        have = sum(t.shape[0] for t in group.samples)
        if have >= self.sample_tokens:
            return None
        rows = x.detach().flatten(0, -2)  # evenly spaced rows of each batch, up to the budget
        step = max(1, rows.shape[0] // max(1, self.sample_tokens // 8))
        taken = slice(0, step * (self.sample_tokens - have), step)
        group.samples.append(rows[taken].to(torch.float32).clone())
        return taken

    def sync(self, groups: list[tuple[tuple[str, ...], int]], comm, device) -> None:
        """Combine what every rank observed of these input groups ((names, input width), in the
        same order on every rank; quantkit.distributed): token counts and sums added, Hessians
        weighted by their token counts, maxima taken, sampled rows in rank order up to the
        budget. A group no rank observed stays unobserved."""
        if comm.alone:
            return
        for names, width in groups:
            mine = self._groups.get(names[0])
            group = mine or GroupStatistics()
            tokens = int(comm.sum_(torch.tensor([group.tokens], dtype=torch.float64, device=device)).item())
            if self.hessian:
                h = group.hessian if group.hessian is not None else make_hessian(width, device)
                h = comm.sum_(h.to(torch.float64) * group.tokens)
                group.hessian = (h / max(tokens, 1)).to(torch.float32)
            if self.abs_mean:
                a = group.abs_sum if group.abs_sum is not None else torch.zeros(width, dtype=torch.float64, device=device)
                group.abs_sum = comm.sum_(a.clone())
            if self.absmax:
                m = group.absmax if group.absmax is not None else torch.zeros(width, dtype=torch.float32, device=device)
                group.absmax = comm.max_(m.clone())
                if self.sample_tokens:  # rows another rank sampled were never in this rank's maxima
                    m = group.absmax_unsampled
                    m = m if m is not None else torch.zeros(width, dtype=torch.float32, device=device)
                    group.absmax_unsampled = comm.max_(m.clone())
            if self.sample_tokens:
                rows = [t for ranks in comm.gather([t.cpu() for t in group.samples]) for t in ranks]
                group.samples, have = [], 0
                for t in rows:
                    if have >= self.sample_tokens:
                        break
                    group.samples.append(t[: self.sample_tokens - have].to(device))
                    have += group.samples[-1].shape[0]
            group.tokens = tokens
            if tokens == 0:
                for name in names:
                    self._groups.pop(name, None)
            else:
                for name in names:
                    self._groups[name] = group

    def __contains__(self, name: str) -> bool:
        return name in self._groups

    def __getitem__(self, name: str) -> GroupStatistics:
        if name not in self._groups:
            raise RuntimeError(f"{self.owner} saw no calibration input for {name}")
        return self._groups[name]

    def fold(self, name: str, s: torch.Tensor) -> None:
        """The driver divided the input of `name`'s group by s [in]: the statistics now describe x / s."""
        group = self[name]
        if group.hessian is not None:
            group.hessian = scale_hessian(group.hessian, s)
        if group.absmax is not None:
            group.absmax = group.absmax / s.to(group.absmax.device)
        if group.absmax_unsampled is not None:
            group.absmax_unsampled = group.absmax_unsampled / s.to(group.absmax_unsampled.device)
        if group.abs_sum is not None:
            group.abs_sum = group.abs_sum / s.to(group.abs_sum.device)
        group.samples[:] = [t / s.to(t.device) for t in group.samples]

    def free(self, name: str) -> None:
        self._groups.pop(name, None)
