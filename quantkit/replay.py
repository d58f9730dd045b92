"""Compute each sub-module of a block once with its final weights, replay it after.

True-sequential calibration runs a block's calibration batches several times:
once per input group (q/k/v, then o, then gate/up, then down), each pass after
the groups before it were quantized, and once more for the block's outputs.
Between passes the earlier sub-modules see the same inputs with the same
(final) weights, so their outputs are the same: this cache records a module's
output the first time it runs with all its linears final, and replays it in
later passes instead of recomputing. Every linear's matmul then runs about once
per block instead of up to five times.

Nothing here knows an architecture: the driver names the candidate modules
(target linears and the family's containers such as self_attn and mlp) and the
linears inside each.
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


class ReplayCache:
    def __init__(self, block: torch.nn.Module, members: dict[str, set[str]]) -> None:
        """members: candidate module (name relative to `block`) -> the target
        linears inside it (itself, for a linear)."""
        self.block = block
        self.members = members
        self.outputs: dict[str, list] = {}  # module -> output per batch, valid for replay
        self.batch = 0  # index of the batch being run; the driver sets it
        self._recording: dict[str, list] = {}
        self._undo: list = []

    def start_pass(self, final: set[str]) -> None:
        """Before a pass: replay what is valid, record what is final but not cached."""
        for name, linears in self.members.items():
            module = self.block.get_submodule(name)
            if name in self.outputs:
                self._undo.append(functools.partial(_restore_forward, module, module.__dict__.get("forward")))
                module.forward = self._replayer(name)  # instance attribute shadows the class method
            elif linears <= final:
                self._recording[name] = []
                handle = module.register_forward_hook(self._recorder(name))
                self._undo.append(handle.remove)

    def end_pass(self, batches: int) -> None:
        """After a pass: keep the recordings that saw every batch (an early stop may cut one short)."""
        for undo in self._undo:
            undo()
        self._undo.clear()
        for name, outs in self._recording.items():
            if len(outs) == batches:
                self.outputs[name] = outs
        self._recording.clear()

    def _replayer(self, name: str):
        def forward(*args, **kwargs):
            return self.outputs[name][self.batch]

        return forward

    def _recorder(self, name: str):
        def hook(_module, _args, output):
            self._recording[name].append(output)

        return hook
