"""Live controls: OSC addresses and MIDI CC numbers mapped to engine methods,
and the OSC feed that reports notes, state and statistics.

The mapping is plain functions (python-osc ``Dispatcher`` style): the OSC
server (:mod:`coplayer.io.osc`) only feeds datagrams to an
:class:`~coplayer.io.osc.OscControl` built from :func:`osc_handlers`; the
engine's worker asks :class:`CcControls` about every control change and
forwards it only when no control claims it.

MIDI CC values (0-127) map as follows:

==================  =======================================================
temperature         0.1 (value 0) to 2.0 (value 127), linearly
mode                0-42 instrument, 43-85 respond, 86-127 both
panic               value 64 or more: silence every note
response_length     1 (value 0) to 16 bars (value 127)
key_strength        0 (value 0: the key is free) to 4 nats (value 126),
                    linearly; 127 keeps every note in the key
trigger             value 64 or more: answer now
==================  =======================================================

:class:`OscFeed` sends over OSC from its own thread: the worker only puts
tuples on a queue, so OSC never delays routing.  It also sends the latency
statistics every ``interval_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from coplayer.config import value_range

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Controls as ControlNumbers
    from coplayer.engine.engine import Engine
    from coplayer.io.osc import OscOut

__all__ = ["CcControls", "OscFeed", "cc_key_strength", "cc_mode", "cc_response_bars", "cc_temperature",
           "osc_handlers"]

log = logging.getLogger(__name__)

TEMPERATURE_RANGE = (0.1, 2.0)
MODE_BY_THIRD = ("instrument", "respond", "both")
MAX_SOFT_KEY_NATS = 4.0  # CC 126; 127 is the hard lock


def cc_temperature(value: int) -> float:
    low, high = TEMPERATURE_RANGE
    return low + (high - low) * value / 127


def cc_mode(value: int) -> str:
    return MODE_BY_THIRD[0 if value <= 42 else 1 if value <= 85 else 2]


def cc_response_bars(value: int) -> int:
    low, high = value_range("continuation.response_bars")
    return low + value * (high - low) // 127


def cc_key_strength(value: int) -> float:
    from coplayer.gen.sampler import HARD_LOCK

    return HARD_LOCK if value >= 127 else MAX_SOFT_KEY_NATS * value / 126


class CcControls:
    """The configured control CC numbers, each mapped to an engine method."""

    def __init__(self, numbers: "ControlNumbers", engine: "Engine") -> None:
        actions: dict[str, Callable[[int], None]] = {
            "temperature": lambda v: engine.set_temperature(cc_temperature(v)),
            "mode": lambda v: engine.set_mode(cc_mode(v)),
            "panic": lambda v: engine.panic() if v >= 64 else None,
            "response_length": lambda v: engine.set_response_bars(cc_response_bars(v)),
            "trigger": lambda v: engine.trigger() if v >= 64 else None,
            "key_strength": lambda v: engine.set_key_strength(cc_key_strength(v)),
        }
        self._by_number = {getattr(numbers, name): fn for name, fn in actions.items()
                           if getattr(numbers, name) is not None}

    def __contains__(self, number: int) -> bool:
        return number in self._by_number

    def handle(self, number: int, value: int) -> bool:
        """Act on a control change; True if it was a control (consumed)."""
        action = self._by_number.get(number)
        if action is None:
            return False
        action(value)
        return True


def osc_handlers(engine: "Engine") -> dict[str, Callable[..., object]]:
    """The OSC input address space (see :mod:`coplayer.io.osc`) -> engine methods."""
    return {
        "/coplayer/temperature": engine.set_temperature,
        "/coplayer/top_p": engine.set_top_p,
        "/coplayer/mode": engine.set_mode,
        "/coplayer/tempo": engine.set_tempo,
        "/coplayer/panic": engine.panic,
        "/coplayer/part/<name>/mute": lambda name, on: engine.mute(name, bool(on)),
        "/coplayer/part/<name>/solo": lambda name, on: engine.solo(name, bool(on)),
        "/coplayer/key": engine.set_key,
        "/coplayer/key_strength": engine.set_key_strength,
        "/coplayer/trigger": engine.trigger,
        "/coplayer/record": engine.record,
    }


_STOP = object()


class OscFeed:
    """Sends notes, state changes and statistics over OSC from one thread.

    ``stats()`` returns the engine's live statistics (p50_ms, p99_ms,
    max_ms, count, misses); it is sent every ``interval_s``.
    """

    def __init__(self, out: "OscOut", stats: Callable[[], dict], interval_s: float = 1.0) -> None:
        self.out = out
        self._stats = stats
        self.interval_s = interval_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def note(self, part: str, pitch: int, velocity: int) -> None:
        self._queue.put(("note", part, pitch, velocity))

    def state(self, key: str, value: Any) -> None:
        self._queue.put(("state", key, value))

    def start(self) -> OscFeed:
        self._thread = threading.Thread(target=self._run, name="coplayer-osc-out", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=2)
            self._thread = None
        self.out.close()

    def _run(self) -> None:
        due = time.monotonic() + self.interval_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                self._send(item)
            if time.monotonic() >= due:
                due = time.monotonic() + self.interval_s
                self._send_stats()

    def _send(self, item: tuple) -> None:
        kind, *args = item
        if kind == "note":
            self.out.note(*args)
        else:
            self.out.state(*args)

    def _send_stats(self) -> None:
        try:
            s = self._stats()
        except Exception:  # a statistics bug must not end the feed
            log.exception("cannot compute the statistics for OSC")
            return
        self.out.stats(s["p50_ms"], s["p99_ms"], s["max_ms"], s["count"], s["misses"])
        self.out.ports(s.get("xruns"), s.get("skipped_cycles"), s.get("dropped_in"), s.get("resent"),
                       s.get("dropped_late"))
