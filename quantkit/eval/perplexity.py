"""Perplexity over non-overlapping windows: exp(mean next-token NLL); beside a reference model,
the KL divergence of the next-token distributions too.

Perplexity ties between recipes that differ: two models can lose the same mean log-likelihood on
different tokens. With a reference (the float model), every predicted position also gives

    KL(P_ref || P) = sum_v P_ref(v) (log P_ref(v) - log P(v))      (nats)

and whether the most likely next token changed; the result carries their mean, median and
99th percentile over all predicted tokens and the fraction of changed top-1 choices (the
figures llama.cpp's perplexity tool reports as KLD and "same top p").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (windows * (seqlen - 1))
    windows: int
    seqlen: int
    seconds: float
    # beside a reference model (None without one)
    kld_mean: float | None = None  # mean KL(P_ref || P) over predicted tokens, nats
    kld_median: float | None = None
    kld_p99: float | None = None  # 99th percentile
    top1_changed: float | None = None  # fraction of predicted tokens whose most likely next token differs


def windows_of(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """tokens [T] -> [n, seqlen], the first n non-overlapping windows (the tail is dropped)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    n = tokens.numel() // seqlen
    if max_windows is not None:
        if max_windows <= 0:
            raise ValueError(f"windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].view(n, seqlen)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    label: str = "perplexity",
    reference: torch.nn.Module | None = None,
) -> PerplexityResult:
    """Each window is scored on its own (no context carried over); every
    window contributes seqlen - 1 predictions, so the mean over windows is
    the mean over tokens. reference: a model on the same device and vocabulary
    (the float model) to measure the KL divergence from (module docstring)."""
    batches = windows_of(tokens, seqlen, max_windows)
    n = batches.shape[0]
    total_nll = 0.0
    divergences, changed = [], 0
    start = time.perf_counter()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not show_progress, transient=True) as progress:
        task = progress.add_task(escape(label), total=n)  # model and data names: user text, not markup
        for i in range(0, n, batch_size):
            ids = batches[i : i + batch_size].to(device)
            logits = model(ids, use_cache=False).logits  # [b, seqlen, vocab]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            )
            total_nll += float(nll)
            if reference is not None:
                ref = reference(ids, use_cache=False).logits
                for w in range(ids.shape[0]):  # one window at a time: [seq, vocab] float32 twice
                    kl, top1 = divergence(ref[w, :-1], logits[w, :-1])
                    divergences.append(kl)
                    changed += int(top1.sum())
            progress.advance(task, ids.shape[0])
    predicted = n * (seqlen - 1)
    mean = total_nll / predicted
    result = PerplexityResult(math.exp(mean), mean, predicted, n, seqlen, time.perf_counter() - start)
    if reference is not None:
        kl = torch.cat(divergences)
        result.kld_mean, result.kld_median = float(kl.mean()), float(kl.median())
        result.kld_p99 = float(torch.quantile(kl, 0.99)) if kl.numel() <= 1 << 24 else float(kl.kthvalue(
            max(1, math.ceil(0.99 * kl.numel()))).values)
        result.top1_changed = changed / predicted
        result.seconds = time.perf_counter() - start
    return result


def divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position [t]: KL(softmax(ref) || softmax(logits)) in nats (float32, never below 0),
    and whether the argmax differs; both [t, vocab] in."""
    log_ref = torch.log_softmax(ref_logits.float(), dim=-1)
    log_q = torch.log_softmax(logits.float(), dim=-1)
    kl = (log_ref.exp() * (log_ref - log_q)).sum(-1).clamp_min(0.0)
    return kl.cpu(), (ref_logits.argmax(-1) != logits.argmax(-1)).cpu()
