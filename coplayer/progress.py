"""How far a long job has got, on stderr: units done / total, time elapsed, time left.

On a terminal one line is redrawn in place; into a pipe or a log file a plain
line is written now and then (every :data:`EVERY_S`) and at the end, so a log
stays short.  Nothing goes to stdout: a command's results (``--json``) stay
clean.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

REDRAW_S = 0.2  # a terminal line redrawn more often than this flickers and costs time
EVERY_S = 30.0  # a line per half-minute keeps a 10-minute job's log to a screenful


def clock_text(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour)."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """Counts units of work of known total and reports them on ``stream``.

    Units may weigh differently (pieces of different lengths): the time left
    is the elapsed time scaled by the weight still to do over the weight
    done, so it is a fair estimate once the units done are typical.
    """

    def __init__(self, total: int, unit: str, *, total_weight: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.unit = total, unit
        self.total_weight = float(total if total_weight is None else total_weight)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self.done = 0
        self.weight_done = 0.0
        self.start = clock()
        self._shown = -float("inf")
        self._width = 0

    def line(self, note: str = "") -> str:
        """``12/111 pieces, 0:42 elapsed, about 5:40 left (note)``."""
        elapsed = self.clock() - self.start
        text = f"{self.done}/{self.total} {self.unit}, {clock_text(elapsed)} elapsed"
        if self.done >= self.total:
            text += ", done"
        elif self.weight_done > 0:
            left = elapsed * (self.total_weight - self.weight_done) / self.weight_done
            text += f", about {clock_text(left)} left"
        return text + (f" ({note})" if note else "")

    def advance(self, weight: float = 1.0, note: str = "") -> None:
        """One unit more is done."""
        self.done += 1
        self.weight_done += weight
        now = self.clock()
        if self.done >= self.total or now - self._shown >= (REDRAW_S if self.tty else EVERY_S):
            self._shown = now
            self._show(self.line(note), final=self.done >= self.total)

    def _show(self, text: str, final: bool) -> None:
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
