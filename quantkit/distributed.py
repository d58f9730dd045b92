"""Quantizing with several processes (GPUs or CPU processes) through torch.distributed.

Every rank walks the same blocks (quantkit.pipeline) with the same weights:

    its share of the calibration batches   each rank captures and propagates a
                                           contiguous slice of the batches;
    statistics, reduced after each pass    Hessians (weighted by token counts),
                                           sums and counts all-reduced, maxima
                                           max-reduced, sampled token rows
                                           gathered in rank order (each
                                           observer's sync: algorithms.base);
    solves, shared out by cost             a stage of few input groups (a dense
                                           block's: q/k/v, o, gate/up, down) has
                                           each group's output rows split over
                                           the ranks (GPTQ's rows are independent
                                           given the Hessian, which every rank
                                           factors) and the rows gathered; a stage
                                           of many (experts) runs each group on
                                           one rank (the largest first, on the
                                           least loaded) and broadcasts it; which,
                                           by a cost model (rows_beat_jobs), so
                                           every rank holds the same quantized
                                           block before propagating;
    one writer                             rank 0 writes the checkpoint and the
                                           journal, each rank keeps its own share
                                           of the calibration streams for resume.

The held-out check's windows are shared out like the calibration batches, and their
summed log-likelihoods added up. The result equals one process's up to the order of
float additions in the reduced statistics (a Hessian summed in two halves rounds
differently in its last bits).

Launch: `quantkit quantize ... --devices N` spawns N processes on this machine
(NCCL on GPUs, one GPU each; gloo on the CPU), or run quantkit under torchrun,
which sets RANK / WORLD_SIZE / MASTER_ADDR (quantkit then joins that group).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Group:
    """This process among `world` (rank 0 writes); world 1 is a process alone, and then every
    operation returns its input."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives run: NCCL's GPU, or the CPU (gloo)
    # seconds this rank spent in collectives (waiting for the others included; an NCCL reduction
    # returns once queued, so there its seconds land in the next phase that waits for the GPU) and
    # the bytes it reduced: the report's per-process figures, from which more GPUs are projected
    collective_s: float = field(default=0.0, compare=False)
    collective_bytes: int = field(default=0, compare=False)

    @property
    def alone(self) -> bool:
        return self.world == 1

    @contextlib.contextmanager
    def _timed(self, nbytes: int = 0):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.collective_s += time.perf_counter() - t
            self.collective_bytes += nbytes

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.alone:
            return t
        with self._timed(t.numel() * t.element_size()):
            if self.device != "cpu" and t.device.type == "cpu":  # NCCL reduces GPU tensors only
                there = t.to(self.device)
                torch.distributed.all_reduce(there, op)
                t.copy_(there)
            else:
                torch.distributed.all_reduce(t, op)
        return t

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (batches), the earlier ranks one longer when
        n does not divide."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over every rank, in place; returned."""
        return self._reduce(t, torch.distributed.ReduceOp.SUM)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """t's elementwise max over every rank, in place; returned."""
        return self._reduce(t, torch.distributed.ReduceOp.MAX)

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order (pickled: small things only)."""
        if self.alone:
            return [obj]
        out = [None] * self.world
        with self._timed():
            torch.distributed.all_gather_object(out, obj)
        return out

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """The whole [n, ...] tensor on every rank, from each rank's share(n) of its rows
        (`part`, this rank's), carried as bytes whatever its dtype (gloo and NCCL know few)."""
        if self.alone:
            return part
        sizes = [Group(r, self.world).share(n) for r in range(self.world)]
        longest = max(s.stop - s.start for s in sizes)
        here = part.device if self.device == "cpu" and part.device.type == "cpu" else torch.device(self.device)
        row_bytes = math.prod(part.shape[1:]) * part.element_size()
        padded = torch.zeros(longest, row_bytes, dtype=torch.uint8, device=here)
        padded[: part.shape[0]] = part.contiguous().view(torch.uint8).reshape(part.shape[0], row_bytes).to(here)
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        with self._timed(padded.numel() * self.world):
            torch.distributed.all_gather(pieces, padded)
        whole = torch.cat([p[: s.stop - s.start] for p, s in zip(pieces, sizes)])
        return whole.view(part.dtype).reshape(n, *part.shape[1:]).to(part.device)

    def broadcast(self, obj, src: int):
        """`src`'s obj on every rank (pickled; tensors travel through the CPU)."""
        if self.alone:
            return obj
        box = [obj if self.rank == src else None]
        with self._timed():
            torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if not self.alone:
            with self._timed():
                torch.distributed.barrier()


ALONE = Group()
BACKEND_VARIABLE = "QUANTKIT_DIST_BACKEND"  # gloo: CPU collectives even between GPU ranks (two ranks on one GPU)


def assign(costs: list[float], world: int) -> list[int]:
    """The rank that does each job: the costliest first, each to the least loaded rank
    (ties to the lower rank), so a deterministic plan every rank computes alike."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def rows_beat_jobs(jobs: list[tuple[float, float]], world: int) -> bool:
    """Whether splitting every job's rows over all ranks finishes sooner than giving each job
    whole to one rank (assign). A job costs (fixed, rows): fixed is paid by every rank that takes
    part in it (GPTQ's factorizations of the Hessian), rows divides among them (its column loop)."""
    owner = assign([f + r for f, r in jobs], world)
    whole = max(sum(f + r for (f, r), o in zip(jobs, owner) if o == k) for k in range(world))
    return sum(f + r / world for f, r in jobs) < whole


def from_environment() -> Group | None:
    """The group torchrun (or --devices) started this process in, joined; None outside one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        return None
    nccl = torch.cuda.is_available() and os.environ.get(BACKEND_VARIABLE, "nccl") == "nccl"
    if nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if nccl else "gloo")
    return Group(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                 f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")


def device_for(group: Group, device: str) -> str:
    """One GPU per rank (cuda -> cuda:LOCAL_RANK); the CPU stays the CPU."""
    if device.startswith("cuda") and not group.alone:
        local = int(os.environ.get("LOCAL_RANK", group.rank))
        return f"cuda:{local % max(torch.cuda.device_count(), 1)}"
    return device


def spawn(n: int, target, kwargs: dict):
    """Run target(**kwargs) in n fresh processes of one group on this machine (rank 0's return
    value is returned); an exception in any rank is raised here as a DistributedError
    carrying its message."""
    import multiprocessing
    import socket

    from quantkit.errors import DistributedError

    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, n, port, target, kwargs, results), daemon=False) for r in range(n)]
    for p in procs:
        p.start()
    outcome, errors = None, []
    try:
        for _ in procs:
            rank, ok, value = results.get()
            if ok and rank == 0:
                outcome = value
            elif not ok:
                errors.append((rank, value))
                break  # one rank failed: the others may wait on it forever
    finally:
        if errors:
            for p in procs:
                p.terminate()
        for p in procs:
            p.join()
    if errors:
        rank, (kind, message) = errors[0]
        raise DistributedError(f"{message}" if rank == 0 else f"rank {rank} of {n}: {message}", kind)
    return outcome


def _rank_main(rank: int, world: int, port: int, target, kwargs: dict, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        value = target(**kwargs)
        results.put((rank, True, value if rank == 0 else None))
    except BaseException as e:  # reported to the parent, which raises it with its message
        results.put((rank, False, (type(e).__name__, str(e))))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
