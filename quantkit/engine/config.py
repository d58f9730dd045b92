"""Engine settings, checked once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPECULATIVE = ("none", "ngram", "draft")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    """block_size: tokens per KV block. kv_blocks: size of the KV pool; None sizes it from
    kv_memory_fraction of the GPU memory left after loading (CPU: enough for max_num_seqs
    sequences of max_model_len). speculative: "ngram" (prompt lookup) or "draft" (a second,
    smaller or quantized model) proposing num_draft tokens per step. async_decode (plain decoding
    only): launch each decode step before the previous step's tokens reach the host, feeding it
    those tokens on the device, so that the host's bookkeeping overlaps the GPU (quantkit.engine.
    engine.Engine._advance, Scheduler.defer_tokens). On by default: at the batch sizes where a decode
    step takes about a millisecond, the host's share of a synchronous step is a large part of it, and
    the outputs are the same either way (BENCHMARKS.md has the figures). kv_cache_dtype: "auto" keeps
    K and V in the model's dtype; "fp8" in FP8 E4M3 (half the bytes of float16: twice the sequences
    in the same memory, half the cache traffic of a decode step), each entry rounded to nearest and
    saturating at +-448, with no scale (as vLLM's fp8 cache without calibrated scales): outputs then
    differ slightly from the model's own (the tests check that they are exactly attention over
    FP8-rounded keys and values; `quantkit eval --kv-cache-dtype fp8` measures the cost, BENCHMARKS.md
    has SmolLM2's: +0.4-1.2% perplexity)."""

    block_size: int = 16
    kv_blocks: int | None = None
    kv_memory_fraction: float = 0.5
    max_num_seqs: int = 64
    max_batched_tokens: int = 4096
    max_model_len: int = 2048
    cuda_graphs: bool = True
    speculative: str = "none"
    num_draft: int = 4
    seed: int = 0
    async_decode: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_batched_tokens", "max_model_len", "num_draft"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"kv_blocks must be at least 1, got {self.kv_blocks}")
        if not 0.0 < self.kv_memory_fraction <= 0.95:
            raise ValueError(f"kv_memory_fraction must be in (0, 0.95], got {self.kv_memory_fraction}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"unknown speculative mode {self.speculative!r}; valid: {', '.join(SPECULATIVE)}")

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type for a model computing in `model_dtype`."""
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else model_dtype

    @property
    def lookahead(self) -> int:
        """Extra KV slots a decode step needs per sequence (the draft tokens it verifies)."""
        return 0 if self.speculative == "none" else self.num_draft
