"""Call and response: when the player pauses, answer with a continuation, on the beat.

The engine hands every routed input note to :meth:`Responder.note_on` /
:meth:`Responder.note_off` and gives the responder a ``play(part, msg, t_ns)``
function that sends one message on a part's port.  Everything else happens on
the responder's own two threads, never on the input path.

Threads
-------
* **input path** (the engine's worker): ``note_on``/``note_off``/``trigger``
  append under a lock and wake the generation thread.  A note-on during a
  response also releases it at once: a few ``play`` calls, so call
  ``note_on`` *before* sending the player's own note (a response note of the
  same part and pitch is then released first, never the player's).
* **generation thread** (``coplayer-respond-gen``): feeds the model the
  player's notes as soon as they are final (released, and no later note can
  still land on an earlier grid tick), so at a phrase end only the answer is
  left to compute; watches for the phrase end; generates; plans the start.
  In mode ``instrument`` no answer can come: the input path does not wake
  it, the last :data:`HISTORY` notes wait, and they are fed in one go when
  the mode changes (so it takes no processor time from routing).
* **scheduler thread** (``coplayer-respond-play``): sends the answer's
  note-ons and note-offs at their times: ``threading.Event.wait`` until the
  next one is due (waits of at most :data:`MAX_WAIT_S`), on the
  :func:`~coplayer.io.ports.now_ns` (``perf_counter``) timebase.

``play`` is always called under the responder's lock, so that a cancel can
never cross a note-on in flight: never call the responder from inside
``play``, nor while holding a lock that ``play`` takes.

Timing
------
The player's notes live on the clock's beat grid (``clock.beat_at(t_ns)``,
quantised to the model encoding's ticks); positions in the bar use
``tempo.beats_per_bar`` (beat 0 of the clock is a barline).  A phrase ends
when no note-on came for ``continuation.silence_beats`` beats and no key is
held (a :meth:`~Responder.trigger` ends it at once; keys then held count with
their duration so far).  A key is held from its note-on to its note-off; a
note-off lost on the way in (a JACK xrun drops a cycle's messages) must not
hold the answers back for good, so a key struck again ends its earlier note
there (a key goes down only once: the model hears one note end where the next
begins, and the new note-off ends the new note), and a key held longer than
:data:`STUCK_BEATS` no longer holds back the answer (nor does it end the
phrase: the pause still counts from the last note-on).  The answer is planned (and composed) to start on the first beat at
least ``estimate + lookahead_ms`` after the phrase end; the estimate is
:data:`ESTIMATE_MARGIN` times the slowest of the last generations per bar
(at least :data:`MIN_BAR_ESTIMATE_NS`; the first from a warm-up at start),
times the bars.  When generation overruns and that beat is less than
``lookahead_ms`` away, the answer is *pushed* by whole bars (``push="bar"``,
the default: it keeps the metric positions the model composed for; Magenta
pushes a whole bar too) or beats (``push="beat"``), never played off the grid.
``play`` gets each message's due time as ``t_ns`` (a release: the time of
the release); the scheduler sends within a few hundred microseconds of it.

What the engine reads: :attr:`Responder.stats` (counts and generation
times, for the exit summary and OSC), :attr:`Responder.state` and
:attr:`Responder.last_answer`.

Note hygiene
------------
Every response note-on sent has its note-off on the same part: at its end,
or when the answer is cancelled (a new note-on, a mode change,
:meth:`~Responder.cancel`, :meth:`~Responder.stop`).  A note that would
re-strike a (part, pitch) still sounding first releases it.  A generation
that fails is logged and dropped before anything was sent; one that is no
longer wanted (the player went on) is abandoned at its next event.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from coplayer.config import MODES
from coplayer.errors import ConfigError
from coplayer.gen.encoding import FIELDS
from coplayer.gen.sampler import Controls, Sampler
from coplayer.io.clock import InternalClock
from coplayer.io.ports import now_ns

log = logging.getLogger(__name__)

NOTE_ON, NOTE_OFF = 0x90, 0x80
MAX_WAIT_S = 0.02  # the longest single wait of the scheduler while an answer is due
IDLE_S = 0.25  # the generation thread's check when nothing is due (it is woken by input)
LATE_NOTE_NS = 40_000_000  # a note-on this late (a stalled machine) is skipped, not played off time
HISTORY = 256  # the player's events kept (for the call and to rebuild a model without fork)
CALL_MIN, CALL_MAX = 8, 64  # events of the call the sampler analyses (key, motif, density)
STUCK_BEATS = 16  # a key held longer no longer holds back the answer (a lost note-off)
COMMIT_MARGIN = 2  # grid ticks: a note is final once the clock is this far past its onset
GEN_HISTORY = 4  # generations the start estimate looks back on
BUSY_BAR_NOTES = 16  # four parts in quarter notes: the bar the warm-up's estimate assumes
ESTIMATE_MARGIN = 1.5  # the start is planned this many times the slowest of them ahead
MIN_BAR_ESTIMATE_NS = 40_000_000  # but never less than this per bar (a busy machine varies)
MAX_BARS = 16
STATS_WINDOW = 1000  # answers the generation-time percentiles cover

Play = Callable[[str, tuple, int], None]


class _Abandoned(Exception):
    """The answer being generated is no longer wanted."""


@dataclass
class _Heard:
    """One note of the player, until the model has been fed it."""

    pitch: int
    velocity: int
    part: str
    on_ns: int
    off_ns: int | None = None


class _Msg(NamedTuple):
    t_ns: int
    on: int  # 0 note-off, 1 note-on (at one time, offs first)
    note: int  # the note's index in the answer
    part: str
    pitch: int
    velocity: int


@dataclass
class _Playback:
    """An answer on its way out."""

    messages: list[_Msg]
    start_ns: int
    index: int = 0
    sounding: dict[tuple[str, int], int] = field(default_factory=dict)  # (part, pitch) -> note


class _Watched:
    """The model as the sampler sees it during one generation: stops when the answer
    is no longer wanted, and notes when the first event is ready."""

    def __init__(self, model, wanted: Callable[[], bool], clock: Callable[[], int]):
        self._model, self._wanted, self._clock = model, wanted, clock
        self.first_ns: int | None = None

    def field_logits(self, field_name: str, partial: dict[str, int]) -> np.ndarray:
        if field_name == FIELDS[0] and not self._wanted():
            raise _Abandoned
        return self._model.field_logits(field_name, partial)

    def feed(self, events: np.ndarray, pos: np.ndarray) -> None:
        if self.first_ns is None:
            self.first_ns = self._clock()
        self._model.feed(events, pos)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _percentile_ms(samples, q: float) -> float:
    return round(float(np.percentile(np.asarray(samples, dtype=np.float64), q)) / 1e6, 2) if samples else 0.0


class Responder:
    """Answers the player's phrases through ``play``; see the module docstring."""

    def __init__(self, cfg, clock, play: Play, *, model=None, now: Callable[[], int] = now_ns,
                 push: str = "bar", warm_up: bool = True):
        if push not in ("bar", "beat"):
            raise ConfigError(f"push must be 'bar' or 'beat', got {push!r}")
        c = cfg.continuation
        self.cfg, self.clock, self._play, self._now = cfg, clock, play, now
        if model is None:
            from coplayer.gen.continue_file import choose_event_model  # logs the fallback, if any

            model, _ = choose_event_model(cfg)
        self.model = model
        self.encoding = enc = model.encoding
        self.controls = Controls.from_config(cfg)
        self._tpb = enc.ticks_per_beat
        self._bar_beats = cfg.tempo.beats_per_bar
        self._bar_ticks = self._bar_beats * self._tpb
        self._push_beats = self._bar_beats if push == "bar" else 1
        self._silence = float(c.silence_beats)
        self._lookahead_ns = int(c.lookahead_ms * 1e6)
        self._warm = warm_up
        self._to_model, self._from_model = self._part_maps(cfg.part_names, enc.parts)
        self._free_clock: InternalClock | None = None  # while a followed MIDI clock is stopped

        self._lock = threading.Lock()
        self._gen_wake, self._play_wake = threading.Event(), threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # input state (under the lock)
        self._mode = cfg.mode
        self._bars = c.response_bars
        self._pending: list[_Heard] = []
        self._open: dict[int, _Heard] = {}  # pitch -> the key held down
        self._last_on_ns: int | None = None
        self._answered = True  # nothing to answer yet
        self._trigger = False
        self._epoch = 0  # +1 whenever an answer being made or played stops being wanted
        self._playback: _Playback | None = None
        self._state = "stopped"
        # generation thread only
        self._history: deque[tuple[list[int], int, int]] = deque(maxlen=HISTORY)  # (event, pos, tick)
        self._committed = 0
        self._last_tick: int | None = None
        self._call_from = 0
        self._rebuild = False  # the model was generated on in place: feed it the history again
        self._per_bar_ns: deque[int] = deque(maxlen=GEN_HISTORY)
        # statistics (under the lock)
        self._counts = dict.fromkeys(("generated", "played", "cancelled", "pushed", "dropped", "failed",
                                      "notes_played", "late_notes"), 0)
        self._gen_ns: deque[int] = deque(maxlen=STATS_WINDOW)
        self._first_ns: deque[int] = deque(maxlen=STATS_WINDOW)
        self._last_answer: dict | None = None

    # -- the engine's interface ---------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._stopping.clear()
        self._state = "starting"
        self._threads = [threading.Thread(target=self._gen_loop, name="coplayer-respond-gen", daemon=True),
                         threading.Thread(target=self._play_loop, name="coplayer-respond-play", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Cancel and release everything, then end the threads."""
        self._stopping.set()
        self.cancel()
        self._gen_wake.set()
        self._play_wake.set()
        for t in self._threads:
            t.join(timeout=5.0)
            if t.is_alive():
                log.error("responder: thread %s did not stop within 5 s", t.name)
        self._threads = []
        with self._lock:
            self._release_locked("cancelled")  # an answer installed while stopping
            self._state = "stopped"

    def yield_to_player(self) -> None:
        """The player plays a note: the answer being played ends now, its
        notes' note-offs sent, before the player's note goes out (an answer's
        note of the same part and pitch would otherwise end the player's).
        Nothing to do, and no lock taken, while no answer plays: the engine
        calls it before every note-on it sends, and :meth:`note_on` after."""
        if self._playback is None:  # read without the lock: note_on releases under it anyway
            return
        with self._lock:
            self._release_locked("cancelled")

    def note_on(self, pitch: int, velocity: int, part: str, t_ns: int) -> None:
        if velocity <= 0:
            self.note_off(pitch, t_ns)
            return
        heard = _Heard(int(pitch), int(velocity), part, int(t_ns))
        with self._lock:
            self._pending.append(heard)
            lost = self._open.get(heard.pitch)
            if lost is not None:  # a key goes down only once: its note-off was lost (an xrun), it ended here
                lost.off_ns = max(lost.on_ns, heard.on_ns)
            self._open[heard.pitch] = heard
            self._last_on_ns = heard.on_ns
            self._answered = False
            self._epoch += 1  # an answer being made now answers a phrase that goes on
            self._release_locked("cancelled")
            listening = self._mode != "instrument"
            if not listening and len(self._pending) > 2 * HISTORY:
                del self._pending[:-HISTORY]  # older notes would leave the history anyway
        if listening:
            self._gen_wake.set()

    def note_off(self, pitch: int, t_ns: int) -> None:
        with self._lock:
            held = self._open.pop(int(pitch), None)
            if held is None:
                return
            held.off_ns = int(t_ns)
            listening = self._mode != "instrument"
        if listening:
            self._gen_wake.set()

    def trigger(self) -> None:
        """Answer now (keys held count with their duration so far)."""
        with self._lock:
            self._trigger = True
        self._gen_wake.set()

    def cancel(self) -> None:
        """Stop the answer being made or played; its sounding notes get their note-offs."""
        with self._lock:
            self._epoch += 1
            self._answered = True  # this phrase is done with
            self._trigger = False
            self._release_locked("cancelled")
        self._play_wake.set()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        with self._lock:
            changed, self._mode = mode != self._mode, mode
        if changed:
            self.cancel()
            self._gen_wake.set()  # feeds the notes that waited

    def set_response_bars(self, bars: int) -> None:
        if not (isinstance(bars, int) and 1 <= bars <= MAX_BARS):
            raise ConfigError(f"response length {bars!r} is not a whole number of bars from 1 to {MAX_BARS}")
        with self._lock:
            self._bars = bars

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def response_bars(self) -> int:
        return self._bars

    @property
    def state(self) -> str:
        """stopped | starting (warming up) | listening | generating | waiting (an answer is due) | playing."""
        return self._state

    @property
    def last_answer(self) -> dict | None:
        """The last answer scheduled: planned and actual start (clock beats), pushes, notes, ms."""
        with self._lock:
            return dict(self._last_answer) if self._last_answer else None

    @property
    def stats(self) -> dict:
        """Counts of answers (generated, played to the end, cancelled, pushed, dropped unwanted,
        failed), notes played and skipped late, and generation times in ms from the phrase end
        to the whole answer (gen_ms_*) and to its first note (first_note_ms_*)."""
        with self._lock:
            out = dict(self._counts)
            gen, first = list(self._gen_ns), list(self._first_ns)
            out["state"] = self._state
        out.update(model=self.model.name, gen_ms_p50=_percentile_ms(gen, 50),
                   gen_ms_max=round(max(gen) / 1e6, 2) if gen else 0.0,
                   first_note_ms_p50=_percentile_ms(first, 50),
                   first_note_ms_max=round(max(first) / 1e6, 2) if first else 0.0)
        return out

    # -- parts ----------------------------------------------------------------------------

    @staticmethod
    def _part_maps(names: tuple[str, ...], model_parts: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
        """Configured part -> model part index, model part -> configured part: by name, else
        by position (the configuration lists parts top down, as the models do)."""
        last = len(model_parts) - 1
        to_model = {n: model_parts.index(n) if n in model_parts else min(i, last) for i, n in enumerate(names)}
        from_model = [p if p in names else names[min(j, len(names) - 1)] for j, p in enumerate(model_parts)]
        return to_model, from_model

    # -- time -----------------------------------------------------------------------------

    def _timeline(self):
        """The clock while it runs; a free-running clock at its tempo while it is stopped."""
        if self.clock.running:
            self._free_clock = None
            return self.clock
        if self._free_clock is None:
            self._free_clock = InternalClock(self.clock.bpm, start_ns=self._now())
        return self._free_clock

    def _beat_ns(self) -> float:
        return 60e9 / self._timeline().bpm

    # -- the generation thread -------------------------------------------------------------

    def _gen_loop(self) -> None:
        if self._warm:
            self._warm_up()
        with self._lock:
            if self._state == "starting":
                self._state = "listening"
        while not self._stopping.is_set():
            self._gen_wake.clear()
            timeout = IDLE_S
            try:
                if self._mode != "instrument":
                    self._commit()
                reason, timeout = self._phrase_end()
                if reason:
                    self._respond(reason)
                    timeout = 0.0
            except Exception as exc:  # never let the thread die silently: log, go on listening
                log.error("responder: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                with self._lock:
                    self._state = "listening" if self._playback is None else self._state
            if timeout > 0:
                self._gen_wake.wait(timeout)

    def _warm_up(self) -> None:
        """Two one-bar answers from silence: the first loads caches and sessions, the second
        gives the first estimate of the generation time (per note, times a busy bar)."""
        for _ in range(2):
            t0 = self._now()
            try:
                scratch, _ = self._scratch()
                response = Sampler(scratch, self.controls).generate(
                    np.zeros((0, len(FIELDS)), np.int64), np.zeros(0, np.int64), 1, start=0,
                    bar_ticks=self._bar_ticks, fed=True)
            except Exception as exc:
                log.warning("responder: warm-up generation failed (%s: %s); answers will be tried anyway",
                            type(exc).__name__, exc)
                return
            finally:
                if self._rebuild:
                    self.model.reset()
                    self._rebuild = False
        self._per_bar_ns.append((self._now() - t0) * BUSY_BAR_NOTES // max(1, len(response)))

    def _commit(self) -> None:
        """Feed the model the player's notes that are final, in the encoding's order."""
        tl = self._timeline()
        now = self._now()
        now_tick = tl.beat_at(now) * self._tpb
        long_ns = self.encoding.max_dur_beats * self._beat_ns()
        with self._lock:
            ready = []
            for tick, part, h in self._ordered(self._pending, tl):
                if tick > now_tick - COMMIT_MARGIN or (h.off_ns is None and now - h.on_ns < long_ns):
                    break  # the rest may still move (a later note, a longer one)
                ready.append((tick, part, h, now if h.off_ns is None else h.off_ns))
            if not ready:
                return
            done = {id(r[2]) for r in ready}
            self._pending = [h for h in self._pending if id(h) not in done]
        events = self._events(ready, self._last_tick, tl)
        if self._rebuild:
            self._refeed()
        self.model.feed(*self._arrays(events))
        self._history.extend(events)
        self._committed += len(events)
        self._last_tick = events[-1][2]

    def _ordered(self, notes: list[_Heard], tl) -> list[tuple[int, int, _Heard]]:
        """(tick, model part, note) in the encoding's order: onset, part, higher pitch first."""
        rows = [(round(tl.beat_at(h.on_ns) * self._tpb), self._to_model.get(h.part, 0), -h.pitch, i, h)
                for i, h in enumerate(notes)]
        return [(tick, part, h) for tick, part, _, _, h in sorted(rows, key=lambda r: r[:4])]

    def _events(self, notes: list[tuple[int, int, _Heard, int]], prev: int | None,
                tl) -> list[tuple[list[int], int, int]]:
        """(event row, position in bar, tick) per (tick, part, note, end ns); the first shift
        counts from ``prev`` (the last note the model heard), each next from the one before."""
        enc, out = self.encoding, []
        for tick, part, h, off_ns in notes:
            shift = 0 if prev is None else min(enc.max_shift, max(0, tick - prev))
            dur = min(enc.max_dur, max(1, round((tl.beat_at(off_ns) - tl.beat_at(h.on_ns)) * self._tpb)))
            vel = min(enc.vel_buckets - 1, h.velocity * enc.vel_buckets // 128)
            out.append(([shift, part, h.pitch, dur - 1, vel], tick % self._bar_ticks, tick))
            prev = tick
        return out

    @staticmethod
    def _arrays(events) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([e[0] for e in events], dtype=np.int64).reshape(-1, len(FIELDS)),
                np.array([e[1] for e in events], dtype=np.int64))

    def _refeed(self) -> None:
        self.model.reset()
        if self._history:
            self.model.feed(*self._arrays(self._history))
        self._rebuild = False

    def _phrase_end(self) -> tuple[str | None, float]:
        """('trigger' or 'silence', 0) when an answer is due, else (None, seconds to wait)."""
        now = self._now()
        with self._lock:
            if self._mode == "instrument":
                self._trigger = False
                return None, IDLE_S
            wait = IDLE_S if not self._pending else min(IDLE_S, COMMIT_MARGIN * self._beat_ns() / self._tpb / 1e9)
            if self._trigger:
                self._trigger = False
                self._answered = True
                self._epoch += 1
                self._release_locked("cancelled")
                return "trigger", 0.0
            if self._answered or self._last_on_ns is None:
                return None, wait
            stuck = now - STUCK_BEATS * self._beat_ns()
            if any(h.on_ns > stuck for h in self._open.values()):
                return None, wait  # a note-off wakes us
            deadline = self._last_on_ns + self._silence * self._beat_ns()
            if now < deadline:
                return None, min(wait, (deadline - now) / 1e9)
            self._answered = True
            return "silence", 0.0

    def _scratch(self):
        """A copy of the model's context to generate on (the model itself when it cannot fork)."""
        model = self.model
        try:
            return (model.fork(learning=False) if getattr(model, "adapt", False) else model.fork()), False
        except NotImplementedError:
            self._rebuild = True
            return model, True

    def _call(self, pending: list[_Heard], t0: int, tl) -> tuple[list, list]:
        """The call the sampler analyses (this phrase, at least CALL_MIN events) and the notes
        the model has not heard yet (keys held at a trigger, with their duration so far)."""
        n = min(max(self._committed - self._call_from, CALL_MIN), CALL_MAX, len(self._history))
        self._call_from = self._committed
        heard = list(self._history)[len(self._history) - n:]
        notes = [(tick, part, h, t0 if h.off_ns is None else h.off_ns) for tick, part, h in self._ordered(pending, tl)]
        extra = self._events(notes, self._last_tick, tl)
        return heard + extra, extra

    def _respond(self, reason: str) -> None:
        t0 = self._now()
        with self._lock:
            epoch, bars, pending = self._epoch, self._bars, list(self._pending)
            self._state = "generating"
        tl = self._timeline()
        scratch, in_place = self._scratch()
        watched = _Watched(scratch, lambda: self._epoch == epoch and not self._stopping.is_set(), self._now)
        try:
            call, extra = self._call(pending, t0, tl)
            if extra:
                scratch.feed(*self._arrays(extra))
            # planned on the first beat the answer should be ready for, lookahead included
            est = ESTIMATE_MARGIN * max(MIN_BAR_ESTIMATE_NS, *self._per_bar_ns) * bars
            start_beat = math.ceil(tl.beat_at(t0 + est + self._lookahead_ns) - 1e-9)
            ev, pos = self._arrays(call)
            if call:
                ev[0, 0] = 0
                start = start_beat * self._tpb - call[-1][2]  # ticks after the call's last onset
                if start < 0:
                    raise RuntimeError("the clock jumped back before the phrase's last note")
            else:
                start = start_beat * self._tpb % self._bar_ticks  # from a barline
            response = Sampler(watched, self.controls).generate(
                ev, pos, bars, start=int(start), bar_ticks=self._bar_ticks, bpm=tl.bpm, fed=True)
        except _Abandoned:
            self._finish_failed("dropped")
            return
        except Exception as exc:
            log.error("responder: no answer (%s): %s: %s", reason, type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            self._finish_failed("failed")
            return
        finally:
            if in_place:
                self._refeed()
        self._schedule(response, start_beat, epoch, t0, watched.first_ns, bars, tl)

    def _finish_failed(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1
            if self._playback is None:
                self._state = "listening"

    def _schedule(self, response, start_beat: int, epoch: int, t0: int, first_ns: int | None, bars: int,
                  tl) -> None:
        done = self._now()
        self._per_bar_ns.append((done - t0) // bars)
        if tl.time_of_beat(start_beat) is None:  # the clock followed stopped meanwhile
            self._finish_failed("dropped")
            return
        planned, pushes = start_beat, 0
        while tl.time_of_beat(start_beat) < done + self._lookahead_ns:
            start_beat += self._push_beats
            pushes += 1
        messages = []
        for i, n in enumerate(response.notes):
            part = self._from_model[self.encoding.parts.index(n.part)]
            on = tl.time_of_beat(start_beat + n.onset_beats)
            off = tl.time_of_beat(start_beat + n.end_beats)
            messages += [_Msg(on, 1, i, part, n.pitch, n.velocity), _Msg(off, 0, i, part, n.pitch, 0)]
        messages.sort()
        with self._lock:
            self._counts["generated"] += 1
            self._gen_ns.append(done - t0)
            if first_ns is not None:
                self._first_ns.append(first_ns - t0)
            if epoch != self._epoch or self._stopping.is_set() or self._mode == "instrument" or not messages:
                self._counts["dropped"] += 1
                if self._playback is None:
                    self._state = "listening"
                return
            self._counts["pushed"] += pushes > 0
            self._last_answer = dict(planned_beat=planned, start_beat=start_beat, pushes=pushes,
                                     notes=len(response.notes), gen_ms=round((done - t0) / 1e6, 2))
            if pushes:
                log.info("responder: generation took %.0f ms; answer pushed by %d %s",
                         (done - t0) / 1e6, pushes, "bar(s)" if self._push_beats > 1 else "beat(s)")
            self._release_locked("cancelled")
            self._playback = _Playback(messages, tl.time_of_beat(start_beat))
            self._state = "waiting"
        self._play_wake.set()

    # -- the scheduler thread -----------------------------------------------------------------

    def _play_loop(self) -> None:
        while not self._stopping.is_set():
            self._play_wake.clear()
            try:
                with self._lock:
                    timeout = self._play_due_locked()
            except Exception as exc:  # a port error: release what sounds, keep the thread alive
                log.error("responder: playing the answer failed: %s: %s", type(exc).__name__, exc)
                with self._lock:
                    self._release_locked("cancelled")
                timeout = IDLE_S
            self._play_wake.wait(timeout)

    def _play_due_locked(self) -> float:
        """Send every message that is due; seconds until the next one."""
        pb = self._playback
        if pb is None:
            return IDLE_S
        now = self._now()
        msgs = pb.messages
        while pb.index < len(msgs) and msgs[pb.index].t_ns <= now:
            m = msgs[pb.index]
            pb.index += 1
            key = (m.part, m.pitch)
            if m.on:
                if now - m.t_ns > LATE_NOTE_NS:
                    self._counts["late_notes"] += 1
                    continue
                if key in pb.sounding:  # re-strike: release the earlier note first
                    del pb.sounding[key]
                    self._play(m.part, (NOTE_OFF, m.pitch, 0), m.t_ns)
                pb.sounding[key] = m.note
                self._play(m.part, (NOTE_ON, m.pitch, m.velocity), m.t_ns)
                self._counts["notes_played"] += 1
                self._state = "playing"
            elif pb.sounding.get(key) == m.note:
                del pb.sounding[key]
                self._play(m.part, (NOTE_OFF, m.pitch, 0), m.t_ns)
        if pb.index >= len(msgs):
            self._playback = None
            self._counts["played"] += 1
            self._state = "listening"
            return IDLE_S
        return min(MAX_WAIT_S, max(0.0, (msgs[pb.index].t_ns - now) / 1e9))

    def _release_locked(self, outcome: str) -> None:
        """Drop the answer being played; note-offs for its sounding notes (every one is tried)."""
        pb, self._playback = self._playback, None
        if pb is None:
            return
        now = self._now()
        for part, pitch in list(pb.sounding):
            try:
                self._play(part, (NOTE_OFF, pitch, 0), now)
            except Exception as exc:
                log.error("responder: note-off %d on %s failed: %s", pitch, part, exc)
        pb.sounding.clear()
        self._counts[outcome] += 1
        if not self._stopping.is_set():
            self._state = "listening"
        self._play_wake.set()
