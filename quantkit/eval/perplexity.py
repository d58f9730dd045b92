"""Perplexity over non-overlapping windows: exp(mean next-token NLL)."""

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
) -> PerplexityResult:
    """Each window is scored on its own (no context carried over); every
    window contributes seqlen - 1 predictions, so the mean over windows is
    the mean over tokens."""
    batches = windows_of(tokens, seqlen, max_windows)
    n = batches.shape[0]
    total_nll = 0.0
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
            progress.advance(task, ids.shape[0])
    predicted = n * (seqlen - 1)
    mean = total_nll / predicted
    return PerplexityResult(math.exp(mean), mean, predicted, n, seqlen, time.perf_counter() - start)
