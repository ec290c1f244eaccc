"""The live terminal view: parts and their activity, mode, tempo, latency.

:func:`render` turns an :meth:`~coplayer.engine.engine.Engine.snapshot` into
lines of text (pure, testable); :class:`LiveView` redraws them in place with
ANSI cursor movement a few times a second from its own thread.  It draws
only on a terminal (``stream.isatty()``), never into a pipe or a file.
"""

from __future__ import annotations

import shutil
import sys
import threading
from typing import Callable, TextIO

__all__ = ["LiveView", "pitch_name", "render", "responses_text", "summary_line"]

NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
BAR_WIDTH = 8
UP, CLEAR_LINE, HIDE_CURSOR, SHOW_CURSOR = "\x1b[{}F", "\x1b[2K", "\x1b[?25l", "\x1b[?25h"


def pitch_name(pitch: int | None) -> str:
    if pitch is None:
        return "-"
    return f"{NAMES[pitch % 12]}{pitch // 12 - 1}"


def summary_line(stats: dict) -> str:
    """``N notes: p50 .. ms, p99 .. ms, max .. ms; misses M`` (also printed at exit)."""
    late = stats.get("dropped_late")
    return (f"{stats['count']} notes: p50 {stats['p50_ms']:.3f} ms, p99 {stats['p99_ms']:.3f} ms, "
            f"max {stats['max_ms']:.3f} ms (budget {stats['budget_ms']:g} ms); "
            f"misses {stats['misses']} (routed by the fallback), {stats['over_budget']} over budget"
            + (f"; {late} dropped as too late" if late else ""))


def _activity(sounding: list[int]) -> str:
    n = len(sounding)
    return "#" * min(n, BAR_WIDTH) + "." * (BAR_WIDTH - min(n, BAR_WIDTH))


def _part_line(part: dict, width: int) -> str:
    flags = " muted" if part["muted"] else ""
    flags += " solo" if part["solo"] else ""
    now = " ".join(pitch_name(p) for p in part["sounding"][:4]) or "-"
    return (f"  {part['name']:<{width}}  [{_activity(part['sounding'])}]  now {now:<15} "
            f"last {pitch_name(part['last']):<4} notes {part['notes']:>5}{flags}")


def render(snapshot: dict) -> list[str]:
    """The view's lines for one engine snapshot."""
    s = snapshot["stats"]
    clock = "" if snapshot.get("clock", True) else " (clock stopped)"
    lines = [
        f"coplayer  mode {snapshot['mode']:<10} tempo {snapshot['bpm']:6.1f} BPM{clock}",
        f"latency   p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  max {s['max_ms']:.2f} ms  "
        f"notes {s['count']}  misses {s['misses']}  over budget {s['over_budget']}",
    ]
    responses = s.get("responses") or {}
    if responses:
        lines.append("responses " + responses_text(responses, "  "))
    width = max((len(p["name"]) for p in snapshot["parts"]), default=4)
    lines += [_part_line(p, width) for p in snapshot["parts"]]
    problems = [f"{k.replace('_', ' ')} {s[k]}" for k in ("feedback", "errors", "port_errors") if s.get(k)]
    if problems:
        lines.append("warnings  " + ", ".join(problems))
    return lines


RESPONSE_KEYS = ("state", "played", "cancelled", "pushed", "notes_played", "gen_ms_p50", "gen_ms_max")


def responses_text(responses: dict, sep: str = ", ") -> str:
    """The responder's main figures, ``played 3, cancelled 1, ...``."""
    keys = [k for k in RESPONSE_KEYS if k in responses] or list(responses)
    keys = [k for k in keys if not (k == "state" and responses[k] == "stopped")]
    return sep.join(f"{k} {_short(responses[k])}" for k in keys)


def _short(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


class LiveView:
    """Redraws :func:`render` of ``snapshot()`` every ``interval_s`` on ``stream``."""

    def __init__(self, snapshot: Callable[[], dict], stream: TextIO | None = None,
                 interval_s: float = 0.25) -> None:
        self._snapshot = snapshot
        self.stream = stream if stream is not None else sys.stdout
        self.interval_s = interval_s
        self._drawn = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def wanted(quiet: bool, stream: TextIO | None = None) -> bool:
        stream = stream if stream is not None else sys.stdout
        return not quiet and hasattr(stream, "isatty") and stream.isatty()

    def start(self) -> LiveView:
        self.stream.write(HIDE_CURSOR)
        self._thread = threading.Thread(target=self._run, name="coplayer-view", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=2)
        self._thread = None
        self.draw()
        self.stream.write(SHOW_CURSOR)
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.draw()

    def draw(self) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line would break the redraw
        lines = [line[:width] for line in render(self._snapshot())]
        out = [UP.format(self._drawn)] if self._drawn else []
        out += [f"{CLEAR_LINE}{line}\n" for line in lines]
        if len(lines) < self._drawn:  # fewer lines than last time: clear the rest
            out += [f"{CLEAR_LINE}\n"] * (self._drawn - len(lines))
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = max(len(lines), self._drawn)
