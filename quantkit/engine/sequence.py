"""A request as the engine sees it: its tokens, sampling settings and KV blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; generation stops after max_tokens new tokens or at a stop token.
    Sampling draws from the engine's one generator (EngineConfig.seed): a run is reproducible as a
    whole, a request's tokens depend on what else ran beside it."""

    temperature: float = 0.0
    max_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


class Status(enum.Enum):
    WAITING = "waiting"  # not yet prefilled, or preempted (its KV is gone; it is recomputed)
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    """token_ids holds the prompt then the generated tokens. block_table[i] is the KV block
    holding positions [i * block_size, (i + 1) * block_size). num_cached is how many leading
    positions have their K/V in the cache (prefix hits and computed tokens)."""

    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    num_prompt: int = -1
    # metrics (time.perf_counter seconds): arrival set by the engine, token_times by the scheduler's postprocess
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a request needs at least one prompt token")
        if self.num_prompt < 0:
            self.num_prompt = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def is_done(self) -> bool:
        """max_tokens reached, or the last token generated is a stop token."""
        if self.num_output >= self.params.max_tokens:
            return True
        return self.num_output > 0 and self.token_ids[-1] in self.params.stop_token_ids
