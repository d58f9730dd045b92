"""The check after quantizing: perplexity of the float and the quantized model on
a few calibration windows held back from calibration.

The driver carries two extra streams of hidden states through the blocks, one
through each block as it was before anything changed it and one through the
block as the checkpoint will compute it (quantized weights and, W8A8, quantized
inputs), so the check costs two forwards of a few windows per block, on the
device the block is on, and never needs the whole model at once. The last
hidden states go through the final norm and the output head here.

A quantized model whose perplexity is NaN, or blew up beyond a bound against
the float model's, is not written unless the user asks to keep it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quantkit.models import LoadedModel
from quantkit.models.families import final_logit_softcap


@dataclass(frozen=True)
class HeldOutResult:
    windows: int
    seqlen: int
    disjoint: bool  # the windows overlap no calibration window (False: the text was too short)
    float_perplexity: float
    quantized_perplexity: float

    @property
    def ratio(self) -> float:
        """quantized / float perplexity; NaN when either is not finite."""
        if not (math.isfinite(self.float_perplexity) and math.isfinite(self.quantized_perplexity)):
            return math.nan
        return self.quantized_perplexity / self.float_perplexity

    def passes(self, max_ratio: float) -> bool:
        return math.isfinite(self.ratio) and self.ratio <= max_ratio

    def to_report(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


@torch.inference_mode()
def nll_of_hidden(loaded: LoadedModel, hidden: list[torch.Tensor], ids: torch.Tensor, device) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of `ids` [n, seq] from the last block's outputs
    `hidden` (batches of [b, seq, d], in order), through the final norm and the
    output head (and the soft-capping the config asks for, as the model's own
    forward does: Gemma 2 / 3); one window at a time, so the logits stay [seq, vocab].
    Sums, so that processes holding shares of the windows can add theirs up."""
    model, family = loaded.model, loaded.family
    norm, head = model.get_submodule(family.final_norm), model.get_submodule(family.lm_head)
    cap = final_logit_softcap(model.config)
    dtype = head.weight.dtype
    norm.to(device), head.to(device)
    total, count, row = 0.0, 0, 0
    try:
        for h in hidden:
            for window in h:
                logits = head(norm(window.to(dtype)))  # [seq, vocab]
                if cap is not None:
                    logits = torch.tanh(logits / cap) * cap
                target = ids[row].to(logits.device)
                total += float(torch.nn.functional.cross_entropy(logits[:-1].float(), target[1:], reduction="sum"))
                count += target.numel() - 1
                row += 1
    finally:
        norm.to("cpu"), head.to("cpu")
    return total, count


def perplexity_from(total: float, count: int) -> float:
    """exp(mean NLL); inf past what a float holds, NaN from NaN."""
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 700 else (math.nan if math.isnan(mean) else math.inf)  # nan < 700 is False


def perplexity_of_hidden(loaded: LoadedModel, hidden: list[torch.Tensor], ids: torch.Tensor, device) -> float:
    """exp(mean next-token NLL) of `ids` from the last block's outputs `hidden` (nll_of_hidden)."""
    return perplexity_from(*nll_of_hidden(loaded, hidden, ids, device))
