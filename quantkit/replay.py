"""Compute each sub-module of a block once with its final weights, replay it after.

True-sequential calibration runs a block's calibration batches several times:
once per input group (q/k/v, then o, then gate/up, then down), each pass after
the groups before it were quantized, and once more for the block's outputs.
Between passes the earlier sub-modules see the same inputs with the same
(final) weights, so their outputs are the same: this cache records a module's
output the first time it runs with all its linears final, and replays it in
later passes instead of recomputing. Every linear's matmul then runs about once
per block instead of up to five times.

A module may also have a *tail*: a linear whose output is the module's (first)
output, e.g. attention's output projection. Once everything in the module but
the tail is final, the pass that observes the tail's input also records that
input and the module's output shell; after the tail is rounded, the module's
output is rebuilt as tail(recorded input) without running the module again
(for attention: without a second attention computation).

Nothing here knows an architecture: the driver names the candidate modules
(target linears and the family's containers such as self_attn and mlp), the
linears inside each, and the tails.
"""

from __future__ import annotations

import functools

import torch


def _restore_forward(module: torch.nn.Module, previous) -> None:
    """Put back the instance-level forward a module had before (none: the class's)."""
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def _with_first(shell, first: torch.Tensor):
    """`shell` (a tensor or a tuple whose first item is the tail's output) with `first` in place."""
    return (first, *shell[1:]) if isinstance(shell, tuple) else first


class ReplayCache:
    def __init__(self, block: torch.nn.Module, members: dict[str, set[str]], tails: dict[str, str] | None = None) -> None:
        """members: candidate module (name relative to `block`) -> the target
        linears whose rounding its output depends on (itself, for a linear;
        none for a norm of the block's input). tails: module -> its tail linear
        (one of its members)."""
        self.block = block
        self.members = members
        self.tails = {m: t for m, t in (tails or {}).items() if m in members and t in members[m]}
        self.outputs: dict[str, list] = {}  # module -> output per batch, valid for replay
        self.batch = 0  # index of the batch being run; the driver sets it
        self._recording: dict[str, list] = {}
        self._tail_recording: dict[str, tuple[list, list]] = {}  # module -> (tail inputs, module outputs)
        self._tail_records: dict[str, tuple[list, list]] = {}
        self._undo: list = []

    def stop_after(self, linear: str, final: set[str]) -> str | None:
        """The module an observation pass that ends at `linear` should run to
        the end of instead, so that the next pass can rebuild it from its tail."""
        for module, tail in self.tails.items():
            if tail == linear and module not in self.outputs and self.members[module] - {tail} <= final:
                return module
        return None

    def start_pass(self, final: set[str]) -> None:
        """Before a pass: replay what is valid, record what is final but not cached."""
        for name, (inputs, shells) in list(self._tail_records.items()):
            if self.members[name] <= final:  # the tail is rounded now: rebuild the module's outputs
                tail = self.block.get_submodule(self.tails[name])
                with torch.inference_mode():
                    self.outputs[name] = [_with_first(shell, tail(x)) for x, shell in zip(inputs, shells)]
                del self._tail_records[name]
        for name, linears in self.members.items():
            module = self.block.get_submodule(name)
            if name in self.outputs:
                self._undo.append(functools.partial(_restore_forward, module, module.__dict__.get("forward")))
                module.forward = self._replayer(name)  # instance attribute shadows the class method
            elif linears <= final:
                self._recording[name] = []
                handle = module.register_forward_hook(self._recorder(name), prepend=True)
                self._undo.append(handle.remove)
            elif name in self.tails and name not in self._tail_records and linears - {self.tails[name]} <= final:
                record = ([], [])
                self._tail_recording[name] = record
                tail = self.block.get_submodule(self.tails[name])
                pre = tail.register_forward_pre_hook(lambda _m, args, r=record: r[0].append(args[0]), prepend=True)
                post = module.register_forward_hook(lambda _m, _a, out, r=record: r[1].append(out), prepend=True)
                self._undo += [pre.remove, post.remove]

    def end_pass(self, batches: int) -> None:
        """After a pass: keep the recordings that saw every batch (an early stop may cut one short)."""
        for undo in self._undo:
            undo()
        self._undo.clear()
        for name, outs in self._recording.items():
            if len(outs) == batches:
                self.outputs[name] = outs
        self._recording.clear()
        for name, (inputs, shells) in self._tail_recording.items():
            if len(inputs) == len(shells) == batches:
                self._tail_records[name] = (inputs, shells)
        self._tail_recording.clear()

    def _replayer(self, name: str):
        def forward(*args, **kwargs):
            return self.outputs[name][self.batch]

        return forward

    def _recorder(self, name: str):
        def hook(_module, _args, output):
            self._recording[name].append(output)

        return hook
