"""Progress of a quantization, as a callback: the driver reports, whoever calls it shows.

QuantizeProgress is silent; RichProgress draws rich bars on stderr (one for
the blocks, one for the steps of a block's transforms, which take most of a
block's time). User text (recipe names) is shown as it is, never as markup.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class QuantizeProgress:
    """What the driver reports; every method does nothing here."""

    def start(self, blocks: int, label: str) -> None:
        """The walk over `blocks` decoder blocks begins."""

    def block_done(self) -> None:
        """One more block is quantized."""

    def substeps(self, total: int, label: str) -> None:
        """A block's transforms begin: `total` steps."""

    def substep(self, label: str) -> None:
        """One of those steps is done; `label` says what comes next or what was done."""

    def __enter__(self) -> QuantizeProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


class RichProgress(QuantizeProgress):
    """Bars on stderr, left on screen when done."""

    def __init__(self) -> None:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        self._bars = Progress(*columns, console=Console(stderr=True), transient=False)
        self._blocks: TaskID | None = None
        self._steps: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.__exit__(*exc)

    def start(self, blocks: int, label: str) -> None:
        self._blocks = self._bars.add_task(escape(label), total=blocks)
        self._steps = self._bars.add_task("", total=1, visible=False)

    def block_done(self) -> None:
        self._bars.advance(self._blocks)

    def substeps(self, total: int, label: str) -> None:
        self._bars.reset(self._steps, total=total, description=escape(label), visible=True)

    def substep(self, label: str) -> None:
        self._bars.update(self._steps, advance=1, description=escape(label))
