"""The real-time engine: one worker thread between the input port and the parts.

The input port's callback only enqueues ``(message, arrival time)`` on an
unbounded :class:`queue.SimpleQueue` (:meth:`Engine.on_message`); the
worker takes each message in order and decides.  An input that calls back
from a thread of its own doing nothing else (``BaseInput.own_thread``:
coplayer's JACK client) is handled in that thread instead, in turn with the
worker's items (one lock), sparing a thread hop per note:

* **note-on**: the :class:`Decider` picks the part (the model, or within
  the latency budget's reach the fallback), the note goes to the part's
  port and channel (mode ``respond``: through, untouched), and the
  :class:`~coplayer.engine.router.Router` remembers where it went.  The
  time from the callback to the send is the note's *decision latency*.
  Under overload, a note-on (or SysEx) that waited longer than the budget
  plus one input period (JACK's cycle) is dropped and counted instead of
  played late; the input's reader sheds such messages before Python sees
  them where it can (:meth:`BaseInput.set_stale`);
* **note-off**: to the port and channel of its note-on, always, never
  subject to the budget;
* **controllers** (sustain, other CCs, pitch bend, channel pressure): to
  the sounding parts (see :class:`~coplayer.engine.router.ControllerMirror`);
  poly aftertouch to the part holding the key; CC numbers configured as
  controls steer coplayer instead (:mod:`coplayer.engine.controls`);
* **drum channel**: through to the drums port, untouched; MIDI clock and
  transport to the clock; anything else through when ``passthrough_other``.

Controls (mode, mute, panic, ...) may be called from any thread: those that
touch the routing run on the worker, in order with the notes.  The
responder plays through :meth:`Engine.play` from its own threads.

Note hygiene: every note-on that leaves has its note-off on the same port
and channel, on every path.  A mute or a panic sends the note-offs at once
and keeps the player's keys paired, so their later note-offs are not sent
twice; a failing port is logged once and skipped; an exception while
handling a message is logged and the worker goes on; :meth:`Engine.stop`
stops the responder, drains the queue, sends the note-offs of every
sounding note and closes the ports (which send All Notes Off on every
channel they used).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from coplayer.config import MODES, value_range
from coplayer.engine.controls import CcControls
from coplayer.engine.router import (BEND, CONTROL, NOTE_OFF, NOTE_ON, POLY_PRESSURE, PRESSURE,
                                    ControllerMirror, FeedbackGuard, Router, Target, note_off_of)
from coplayer.engine.session import SessionRecorder, SnapshotGate, prepare_folder, session_path
from coplayer.engine.stats import LatencyStats
from coplayer.errors import SessionError
from coplayer.io.clock import InternalClock, make_clock
from coplayer.io.ports import BaseInput, BaseOutput, Message, PortError, is_valid, now_ns, raise_priority, sheddable
from coplayer.logs import RateLimitedLog

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config
    from coplayer.engine.controls import OscFeed
    from coplayer.instrument.instrumenter import Instrumenter
    from coplayer.io.clock import Clock

__all__ = ["Decider", "Engine", "Outputs", "session_tracks"]

log = logging.getLogger(__name__)

SUSTAIN, ALL_SOUND_OFF, ALL_NOTES_OFF = 64, 120, 123
WARM_UP_NOTES = 16  # model steps timed at start, so the first notes have a latency estimate
WARM_UP_SKIPPED = 4
WORKER_RT_PRIORITY = 10  # SCHED_FIFO priority of the worker, below JACK's (usually 70+)
RECENT = 4096  # latency samples behind the live statistics (view, OSC)
FEEDBACK_WINDOW_NS = 30_000_000
CLAMP_LOG_INTERVAL_S = 10.0  # a fader swept past its end warns once per control in this time
# How late an input may stamp a message after it came, where it cannot say
# (BaseInput.period_ns: JACK's cycle): rtmidi stamps on arrival, so this is
# slack for the hand-over between threads.
STAMP_SLACK_NS = 1_000_000


class Responder(Protocol):
    """What the engine needs of call and response (coplayer.engine.responder)."""

    controls: Any
    stats: dict

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def yield_to_player(self) -> None: ...
    def note_on(self, pitch: int, velocity: int, part: str, t_ns: int) -> None: ...
    def note_off(self, pitch: int, t_ns: int) -> None: ...
    def trigger(self) -> None: ...
    def cancel(self) -> None: ...
    def set_mode(self, mode: str) -> None: ...
    def set_response_bars(self, bars: int) -> None: ...


@dataclass
class Outputs:
    """Where coplayer plays: a target per part, and pass-through targets
    (``thru``: respond-mode notes and other messages; ``drums``)."""

    parts: dict[str, Target]
    thru: Target | None = None
    drums: Target | None = None

    def ports(self) -> list[BaseOutput]:
        """Every distinct port, parts first."""
        targets = [*self.parts.values(), self.thru, self.drums]
        return list({id(t.port): t.port for t in targets if t is not None}.values())


# --- the decision inside the budget ----------------------------------------------


class _StepTimes:
    """Recent model step durations: the estimate a decision budgets for, their
    99th percentile (reported), and when the model last ran (``at_ns``).

    The estimate is the 90th percentile of the last ``size`` steps, not
    their maximum: one step the operating system happened to preempt says
    nothing about the next, and budgeting for it sent every note to the
    fallback until it left the window (measured: 148 of 150 notes at 50
    notes/s through JACK).  A model slow on one step in ten or more is still
    benched.
    """

    def __init__(self, size: int = 64, every: int = 8) -> None:
        self._times: deque[int] = deque(maxlen=size)
        self._every = every
        self._since = 0
        self.estimate_ns = 0
        self.p99_ns = 0
        self.at_ns = 0

    def add(self, ns: int, at_ns: int) -> None:
        self._times.append(ns)
        self.at_ns = at_ns
        self._since += 1
        if self._since >= self._every or len(self._times) < self._every:
            self._since = 0
            ordered = sorted(self._times)
            self.estimate_ns = ordered[int(0.9 * (len(ordered) - 1))]
            self.p99_ns = ordered[int(0.99 * (len(ordered) - 1))]


@dataclass
class Decider:
    """Chooses the part of each note-on within the latency budget.

    When the time the note has already waited (callback to now) plus the
    model's recent step time (its 90th percentile) would exceed the budget, or the model
    failed, the ``fallback`` instrumenter decides and the note counts as a
    miss.  An estimate older than ``retry_ns`` (the model has not run for
    that long) is dropped, so a model that was slow for a while gets tried
    again.  Both instrumenters see every note: after the send,
    :meth:`commit` records the decision into the one that did not decide
    (``note_on(..., force=part)``), so each history is what was played.
    """

    model: "Instrumenter"
    fallback: "Instrumenter | None"
    budget_ns: int
    now: Callable[[], int] = now_ns
    t0_ns: int = field(default_factory=now_ns)
    retry_ns: int = 2_000_000_000
    misses: int = 0
    steps: _StepTimes = field(default_factory=_StepTimes)
    broken: bool = False
    _pending: tuple | None = None
    _deciding: "Instrumenter | None" = None  # decided the last note; its history waits for commit()
    _timed: tuple[int, int] | None = None  # the model's last decision: (its time, its start) for the estimate

    def warm_up(self) -> None:
        """Time a few model steps (then forget them) to seed the estimate."""
        if self.fallback is None:
            return
        try:
            for i in range(WARM_UP_NOTES):
                start = self.now()
                self.model.note_on(48 + (7 * i) % 36, 80, 0.1 * i)
                if i >= WARM_UP_SKIPPED:  # the first runs pay for allocations
                    self.steps.add(self.now() - start, start)
        except Exception as exc:
            self._broke(exc)
        self.model.reset()

    def keep_warm(self) -> None:
        """Between notes: a model step thrown away (Instrumenter.warm), so
        that the next note does not pay for cold caches."""
        if not self.broken:
            try:
                self.model.warm((self.now() - self.t0_ns) / 1e9)
            except Exception as exc:  # the next real note will tell
                log.debug("keep-warm step failed: %s", exc)

    def decide(self, pitch: int, velocity: int, t_ns: int) -> tuple[str, bool]:
        """(part name, whether the fallback chose) for a note-on received at
        ``t_ns``; :meth:`commit` follows after the send (here, if a caller
        did not)."""
        if self._deciding is not None or self._pending is not None:
            self.commit()
        time_s = (t_ns - self.t0_ns) / 1e9
        if self.fallback is not None and (self.broken or self._late(t_ns)):
            return self._fall_back(pitch, velocity, time_s), True
        start = self.now()
        try:
            part = self.model.decide(pitch, velocity, time_s).name
            self._deciding = self.model
        except Exception as exc:
            _unwedge(self.model)
            if self.fallback is None:
                raise
            self._broke(exc)
            return self._fall_back(pitch, velocity, time_s), True
        self._timed = (self.now() - start, start)  # into the estimate at commit(), after the send
        if self.fallback is not None:
            self._pending = (self.fallback, pitch, velocity, time_s, part)
        return part, False

    def _broke(self, exc: Exception) -> None:
        self.broken = True
        log.error("the instrumentation model failed (%s: %s); the fallback routes every note from now on",
                  type(exc).__name__, exc)

    def _late(self, t_ns: int) -> bool:
        now = self.now()
        estimate = self.steps.estimate_ns if now - self.steps.at_ns < self.retry_ns else 0
        return now - t_ns + estimate > self.budget_ns

    def _fall_back(self, pitch: int, velocity: int, time_s: float) -> str:
        self.misses += 1
        part = self.fallback.decide(pitch, velocity, time_s).name
        self._deciding = self.fallback
        if not self.broken:
            self._pending = (self.model, pitch, velocity, time_s, part)
        return part

    def commit(self, idle: bool = True) -> None:
        """After the send: make the last decision history in the instrumenter
        that decided (:meth:`Instrumenter.commit`), then record it into the
        other one.

        The model hears a note the fallback routed (its state then misses
        none) only when nothing waits in the queue (``idle``): a model that
        was too slow must not delay the next note again.
        """
        deciding, self._deciding = self._deciding, None
        if deciding is not None:  # the decider's own history first: the note is out
            deciding.commit()
        timed, self._timed = self._timed, None
        if timed is not None:
            self.steps.add(*timed)
        pending, self._pending = self._pending, None
        if pending is not None:
            inst, pitch, velocity, time_s, part = pending
            listen = idle and not (inst is self.model and self.broken)
            timed = listen and inst is self.model  # a full model step: it keeps the estimate current
            start = self.now() if timed else 0
            inst.note_on(pitch, velocity, time_s, force=inst.parts.index(part), listen=listen)
            if timed:
                self.steps.add(self.now() - start, start)

    def note_off(self, pitch: int, t_ns: int) -> None:
        time_s = (t_ns - self.t0_ns) / 1e9
        if not self.broken:
            self.model.note_off(pitch, time_s)
        if self.fallback is not None:
            self.fallback.note_off(pitch, time_s)


def _unwedge(instrumenter: "Instrumenter") -> None:
    """After a failed step, end the note the featurizer has open, so that the
    next note can start (it is committed to part 0, and ends at its note-off)."""
    try:
        instrumenter.featurizer.commit(0)
    except RuntimeError:  # the failure came before the featurizer opened the note
        pass


# --- the engine -------------------------------------------------------------------


class _Call:
    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __repr__(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}{self.args}"


_STOP = object()


def session_tracks(cfg: "Config") -> dict:
    """The tracks of a session file: the parts in order, their programs and (0-based) channels."""
    return {"parts": list(cfg.part_names), "programs": {p.name: p.program for p in cfg.parts},
            "channels": {p.name: p.channel - 1 for p in cfg.parts}}


class Engine:
    """Routes a player's MIDI to the parts; see the module docstring.

    Everything is injected: ``outputs`` (ports per part), ``instrumenter``
    and its ``fallback``, the ``clock``, the ``input`` port (its
    ``on_message`` is set at :meth:`start`), an :class:`OscFeed`, a
    responder (:meth:`attach_responder`).  The engine owns the ports from
    :meth:`start` on and closes them at :meth:`stop`.
    """

    def __init__(self, cfg: "Config", outputs: Outputs, instrumenter: "Instrumenter", *,
                 fallback: "Instrumenter | None" = None, clock: "Clock | None" = None,
                 input: BaseInput | None = None, osc: "OscFeed | None" = None,
                 now: Callable[[], int] = now_ns) -> None:
        self.cfg = cfg
        self.outputs = outputs
        self.clock = clock if clock is not None else make_clock(cfg.tempo.source, cfg.tempo.bpm,
                                                                 cfg.tempo.clock_smoothing)
        self.input = input
        self.osc = osc
        self.responder: Responder | None = None
        self.controls = None  # the sampler's Controls (the responder's once attached)
        self._now = now
        self.mode = cfg.mode
        self.response_bars = cfg.continuation.response_bars
        self.decider = Decider(instrumenter, fallback, round(cfg.latency.budget_ms * 1e6), now, now())
        self.router = Router()
        self.mirror = ControllerMirror()
        self.guard = FeedbackGuard(FEEDBACK_WINDOW_NS) if cfg.midi.feedback_guard else None
        self.cc = CcControls(cfg.controls, self)
        self._clamp_log = RateLimitedLog(log, CLAMP_LOG_INTERVAL_S)
        self.latency = LatencyStats(budget_ms=cfg.latency.budget_ms)
        self._free_clock = InternalClock(self.clock.bpm, now())
        self.recorder = SessionRecorder(self.beat_at, now, keep=cfg.session.record)
        self.snapshots = SnapshotGate(cfg.session.directory, cfg.session.max_mb)
        self._refusals = 0  # snapshots refused since the last one written
        drums = cfg.midi.drum_channel
        self._drum_channel = None if drums is None else drums - 1
        self._muted: set[str] = set()
        self._soloed: set[str] = set()
        self._response_notes: Counter = Counter()  # (part, pitch) -> response notes sounding
        self._channels: dict[int, set[int]] = {}  # id(port) -> channels sent on
        self._failed: set[int] = set()  # id(port) of outputs that failed
        self._lock = threading.RLock()  # response notes vs mute and panic
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._work = threading.Lock()  # one message or item at a time: the worker's, or the input's own thread's
        self._working = 0  # threading.get_ident() of the thread holding _work
        self._warm_s: float | None = None  # the worker's keep-warm period (None: the input's idle ticks do it)
        # Keep-warm runs only this long after the last message played in: a
        # long rest costs no processor time (the next note may then be slower).
        self._warm_for_ns = round(cfg.latency.keep_warm_for_s * 1e9)
        self._last_in_ns = now()
        self._tick_s = 0.0  # the period of the input's idle ticks, when they keep the model warm
        self._ticks_off = False  # the input's idle ticks were switched off for a long rest
        self._closed = False
        # A note-on (or SysEx) that waited longer than this is dropped, not played
        # late (see _handle); set at start from the input's period.
        self._stale_ns = self.decider.budget_ns + STAMP_SLACK_NS
        self.counts: Counter = Counter()  # feedback, errors, panics, port errors, ...
        self.notes_out: Counter = Counter()  # notes sent per part
        self._last_pitch: dict[str, int] = {}
        self._max_ns = 0
        self.last_output_ns = 0  # when a part last sent a note-on or note-off
        self._dispatch = {NOTE_OFF: self._note_off, NOTE_ON: self._note_on, POLY_PRESSURE: self._poly_pressure,
                          CONTROL: self._control_change, 0xC0: self._other, PRESSURE: self._controller,
                          BEND: self._controller}

    # --- lifecycle -----------------------------------------------------------------

    def attach_responder(self, responder: Responder | None) -> None:
        """Call and response: built with :meth:`play`, attached before :meth:`start`."""
        self.responder = responder
        if responder is not None:
            self.controls = responder.controls

    def start(self) -> Engine:
        if self._thread is not None:
            return self
        if self.cfg.midi.clean_start:
            self._clean_start()
        self._program_changes()
        if self.input is not None:
            self._stale_ns = self.decider.budget_ns + (self.input.period_ns() or STAMP_SLACK_NS)
            self.input.set_stale(self._stale_ns)
        warm_s = self.cfg.latency.keep_warm_ms / 1e3
        if self.input is not None and self.input.own_thread and warm_s and self.input.set_idle(self._warm_here, warm_s):
            self._tick_s, warm_s = warm_s, 0.0  # the input's idle ticks keep the model warm, never as a note comes
        self._warm_s = warm_s or None
        self._thread = threading.Thread(target=self._run, name="coplayer-engine", daemon=True)
        self._thread.start()
        if self.responder is not None:
            self.responder.set_mode(self.mode)
            self.responder.set_response_bars(self.response_bars)
            self.responder.start()
        if self.osc is not None:
            self.osc.start()
            self._state("mode", self.mode)
        if self.input is not None:
            self.input.on_message = self._handle_here if self.input.own_thread else self.on_message
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the input, the responder and the worker (after it has handled
        every message received), release every note, close the ports."""
        if self._closed:
            return
        if self.input is not None:
            self.input.close()
        self._stop_responder()
        self._stop_worker(timeout)
        # An input with its own thread may be handling a message still (its
        # close does not wait for that thread, which serves other ports too):
        # the notes are released after it, and it handles nothing after them.
        got = self._work.acquire(timeout=timeout)
        try:
            self._closed = True
            self._release_all()
        finally:
            if got:
                self._work.release()
        for port in self.outputs.ports():
            port.close()  # note-offs for anything left, All Notes Off on each channel used
        if self.osc is not None:
            self.osc.stop()

    def _stop_responder(self) -> None:
        if self.responder is None:
            return
        try:
            self.responder.stop()
        except Exception:
            log.exception("the responder failed to stop; its notes are released by the engine")

    def _stop_worker(self, timeout: float) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout)
        if thread.is_alive():
            log.error("the engine's worker did not finish within %g s; releasing the notes anyway", timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the worker has handled everything enqueued so far."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(_Call(done.set, ()))
        return done.wait(timeout)

    def _clean_start(self) -> None:
        """Silence every channel of every output before the first note: a
        coplayer that crashed (or was killed) may have left notes sounding
        at the synth on these very ports.  Not remembered by the feedback
        guard: the player's own pedal-up just after start is no echo (an
        echo of these, through a mis-wired loop, is forwarded once and only
        silences).  Where the port can tell (JACK), a synth connected later,
        before the port's first note, hears the same first."""
        for port in self.outputs.ports():
            port.clean_on_connect()
            for channel in range(16):
                for number in (SUSTAIN, ALL_NOTES_OFF, ALL_SOUND_OFF):
                    self._send(port, (CONTROL | channel, number, 0), guarded=False)

    def _program_changes(self) -> None:
        seen = set()
        for name, target in self.outputs.parts.items():
            if (id(target.port), target.channel) not in seen:
                seen.add((id(target.port), target.channel))
                self._send(target.port, target.address((0xC0, self.cfg.part(name).program)))

    # --- the input path ----------------------------------------------------------

    def on_message(self, data: Message, t_ns: int) -> None:
        """The input port's callback: enqueue and return."""
        self._queue.put((data, t_ns))

    def _handle_here(self, data: Message, t_ns: int) -> None:
        """The callback of an input with its own thread: handle the message
        in that thread, in turn with the worker's items."""
        if self._ticks_off:  # playing again after a long rest: keep warm again
            self._ticks_off = False
            self.input.set_idle(self._warm_here, self._tick_s)
        self._do((data, t_ns))

    def _do(self, item: tuple | _Call) -> None:
        """Handle one message ``(data, t_ns)`` or run one call, holding
        ``_work``: one at a time, whichever thread (worker or input) it is."""
        with self._work:
            if self._closed:
                return
            self._working = threading.get_ident()
            try:
                if item.__class__ is tuple:
                    self._handle(*item)
                else:
                    item.fn(*item.args)
            except Exception as exc:  # the thread must survive any one message
                self._worker_error(exc, item)
            finally:
                self._working = 0

    def _resting(self) -> bool:
        """Nothing played in for longer than ``latency.keep_warm_for_s``."""
        return self._now() - self._last_in_ns > self._warm_for_ns

    def _warm_here(self) -> None:
        """The input's idle tick (BaseInput.set_idle): a keep-warm step,
        skipped if the worker is busy; after a long rest the ticks stop
        until the next message (``_handle_here``)."""
        if self._resting():
            self._ticks_off = True
            self.input.set_idle(None, 0.0)
            return
        if self._work.acquire(blocking=False):
            try:
                self.decider.keep_warm()
            finally:
                self._work.release()

    def _run(self) -> None:
        raise_priority(WORKER_RT_PRIORITY, "the engine's worker")
        work, do = self._work, self._do
        with work:
            self.decider.warm_up()  # here: timed at the worker's priority
        get, keep_warm, warm_s, resting = self._queue.get, self.decider.keep_warm, self._warm_s, self._resting
        while True:
            try:
                item = get(timeout=None if warm_s is None or resting() else warm_s)
            except queue.Empty:  # a rest: keep the model warm for the next note
                with work:
                    keep_warm()
                continue
            if item is _STOP:
                return
            do(item)

    def _worker_error(self, exc: Exception, item: object) -> None:
        self.counts["errors"] += 1
        n = self.counts["errors"]
        if n <= 5 or n % 1000 == 0:
            what = " ".join(f"{b:02X}" for b in item[0]) if item.__class__ is tuple else repr(item)
            log.error("engine: %s: %s, while handling %s (error %d; the engine goes on)",
                      type(exc).__name__, exc, what, n, exc_info=n == 1)

    def _handle(self, data: Message, t_ns: int) -> None:
        status = data[0]
        if self._now() - t_ns > self._stale_ns and sheddable(data):
            # Overload: it waited past the budget (plus the input's stamp
            # slack).  Late is worse than never; its note-off finds nothing
            # held and sends nothing.  The player's note stays in the session.
            self.counts["dropped late"] += 1
            if status & 0xF0 == NOTE_ON:
                self.recorder.message(None, data, t_ns)
            return
        self._last_in_ns = t_ns
        if self.guard is not None and self.guard.is_echo(data, t_ns, self._holds):
            return self._feedback()
        if status >= 0xF0:
            return self._system(data, t_ns)
        channel = status & 0x0F
        if channel == self._drum_channel:
            self.recorder.message(None, data, t_ns)
            return self._pass(self.outputs.drums, data)
        self._dispatch[status & 0xF0](data, channel, t_ns)

    def _holds(self, channel: int, pitch: int) -> bool:
        return self.router.holder(channel, pitch) is not None

    def _feedback(self) -> None:
        self.counts["feedback"] += 1
        if self.counts["feedback"] == 1:
            log.warning("feedback: coplayer's own output came back on its input (a DAW track armed "
                        "with monitoring, or a MIDI loop); such messages are dropped and counted")

    # --- notes -------------------------------------------------------------------

    def _note_on(self, data: Message, channel: int, t_ns: int) -> None:
        if data[2] == 0:
            return self._note_off(data, channel, t_ns)
        pitch, velocity = data[1], data[2]
        part, _ = self.decider.decide(pitch, velocity, t_ns)
        responder = self.responder
        try:
            if responder is not None:  # an answer playing stops first (a note of this part and pitch)
                responder.yield_to_player()
            target = self._note_target(part)
            late = self._now() - t_ns > self._stale_ns  # the decision took it past the bound: not played
            held = self.router.note_on(channel, pitch, target, self._audible(target) and not late)
            if held.sounded:
                self._catch_up(channel, target)
                self._emit(target, (NOTE_ON, pitch, velocity), t_ns, source=(channel, pitch))
            if late:
                self.counts["dropped late"] += 1
            else:
                self._latency(self._now() - t_ns)
            # After the send, as everything below: hearing the note may wake
            # the responder's thread, which would then compete for the GIL.
            if responder is not None:
                responder.note_on(pitch, velocity, part, t_ns)
            self.recorder.message(None, data, t_ns)
        finally:  # the decision becomes history even if the send failed
            self.decider.commit(idle=self._queue.empty() and not (self.input is not None and self.input.waiting()))

    def _note_target(self, part: str) -> Target:
        if self.mode == "respond" and self.outputs.thru is not None:
            return self.outputs.thru
        return self.outputs.parts[part]

    def _latency(self, ns: int) -> None:
        self.latency.add(ns)
        self._max_ns = max(self._max_ns, ns)

    def _note_off(self, data: Message, channel: int, t_ns: int) -> None:
        pitch = data[1]
        held = self.router.note_off(channel, pitch)
        if held is not None and held.sounded:
            velocity = data[2] if data[0] & 0xF0 == NOTE_OFF else 0
            self._emit(held.target, (NOTE_OFF, pitch, velocity), t_ns)
        self.recorder.message(None, data, t_ns)
        self.decider.note_off(pitch, t_ns)
        if self.responder is not None:
            self.responder.note_off(pitch, t_ns)

    # --- controllers -------------------------------------------------------------

    def _control_change(self, data: Message, channel: int, t_ns: int) -> None:
        if not self.cc.handle(data[1], data[2]):
            self._controller(data, channel, t_ns)

    def _controller(self, data: Message, channel: int, t_ns: int) -> None:
        if not self.cfg.midi.forward_controllers:
            return
        for target in self.mirror.targets(data, self.router.sounding(), self._everyone()):
            if self._emit(target, data, t_ns):
                self.mirror.told(target, data)

    def _everyone(self) -> list[Target]:
        targets = list(self.outputs.parts.values())
        if self.mode == "respond" and self.outputs.thru is not None:
            targets.append(self.outputs.thru)
        return targets

    def _catch_up(self, channel: int, target: Target) -> None:
        if self.cfg.midi.forward_controllers:
            for data in self.mirror.catch_up(channel, target):
                if self._emit(target, data, self._now()):
                    self.mirror.told(target, data)

    def _poly_pressure(self, data: Message, channel: int, t_ns: int) -> None:
        held = self.router.holder(channel, data[1])
        if self.cfg.midi.forward_controllers and held is not None and held.sounded:
            self._emit(held.target, data, t_ns)

    # --- everything else ---------------------------------------------------------

    def _system(self, data: Message, t_ns: int) -> None:
        if not self.clock.feed(data, t_ns):
            self._other(data, None, t_ns)

    def _other(self, data: Message, channel: int | None, t_ns: int) -> None:
        if self.cfg.midi.passthrough_other:
            self._pass(self.outputs.thru, data)

    def _pass(self, target: Target | None, data: Message) -> None:
        if target is not None:
            self._send(target.port, data)

    # --- sending -------------------------------------------------------------------

    def _send(self, port: BaseOutput, data: Message, source: tuple[int, int] | None = None,
              source_ns: int = 0, guarded: bool = True) -> bool:
        """Send on ``port``; a failing port is logged once and skipped after.
        ``source``: the input (channel, pitch) ``data`` copies, arrived at ``source_ns``;
        ``guarded``: the feedback guard remembers it (to know its echo)."""
        if id(port) in self._failed:
            return False
        if self.guard is not None and guarded:
            self.guard.sent(data, self._now(), source, source_ns)
        try:
            port.send(data)
        except PortError as exc:
            self._port_failed(port, exc)
            return False
        if data[0] < 0xF0:
            self._channels.setdefault(id(port), set()).add(data[0] & 0x0F)
        return True

    def _port_failed(self, port: BaseOutput, exc: Exception) -> None:
        with self._lock:
            if id(port) in self._failed:
                return
            self._failed.add(id(port))
        self.counts["port errors"] += 1
        log.error("MIDI output %r failed (%s); it is skipped from now on, the other outputs go on",
                  port.name, exc)

    def _emit(self, target: Target, data: Message, t_ns: int, source: tuple[int, int] | None = None) -> bool:
        """Send ``data`` to ``target`` (its channel) and account for it."""
        data = target.address(data)
        if not self._send(target.port, data, source, t_ns):
            return False
        part = target.part
        if part is not None and data[0] & 0xE0 == NOTE_OFF:  # note-on or note-off
            self.last_output_ns = self._now()
            self.recorder.message(part, data, t_ns)
            on = data[0] & 0xF0 == NOTE_ON and data[2] > 0
            if on:
                with self._lock:
                    self.notes_out[part] += 1
                self._last_pitch[part] = data[1]
            if self.osc is not None:
                self.osc.note(part, data[1], data[2] if on else 0)
        return True

    def play(self, part: str, msg: Message, t_ns: int) -> None:
        """Send a responder's message on ``part``'s port and channel
        (thread-safe).  A note-on of a silent part is not sent, nor its note-off."""
        target = self.outputs.parts.get(part)
        data = None if target is None else target.address(tuple(msg))
        if data is None or not is_valid(data):
            self._bad_play(part, msg)
            return
        with self._lock:
            if self._closed:
                return
            if data[0] & 0xE0 == NOTE_OFF and not self._response_note(target, data):
                return
            self._emit(target, data, t_ns)

    def _response_note(self, target: Target, data: Message) -> bool:
        """Account for a response note; False if it must not be sent."""
        key = (target.part, data[1])
        if not note_off_of(data):
            if not self._audible(target):
                return False
            self._response_notes[key] += 1
            return True
        if not self._response_notes[key]:
            return False
        self._response_notes[key] -= 1
        if not self._response_notes[key]:
            del self._response_notes[key]
        return True

    def _bad_play(self, part: str, msg: object) -> None:
        self.counts["bad responder messages"] += 1
        if self.counts["bad responder messages"] == 1:
            log.error("the responder played %r on part %r: not a part or not a MIDI message (ignored)", msg, part)

    # --- silence -----------------------------------------------------------------

    def _audible(self, target: Target) -> bool:
        part = target.part
        if part is None:
            return True
        return part not in self._muted and (not self._soloed or part in self._soloed)

    def _silence(self, keep: Callable[[Target], bool]) -> None:
        """Note-offs now for every sounding note of a target not kept."""
        now = self._now()
        for held in self.router.silence(keep):
            self._emit(held.target, held.note_off(), now)
        with self._lock:
            for (part, pitch), count in list(self._response_notes.items()):
                target = self.outputs.parts[part]
                if not keep(target):
                    for _ in range(count):
                        self._emit(target, (NOTE_OFF, pitch, 0), now)
                    del self._response_notes[part, pitch]

    def _release_all(self) -> None:
        self._silence(lambda target: False)

    def _panic(self) -> None:
        if self.responder is not None:
            self.responder.cancel()
        self._release_all()
        self.mirror.forget()
        for port in self.outputs.ports():
            self._panic_port(port)
        self.counts["panics"] += 1
        self._state("panic", self.counts["panics"])
        log.info("panic: every note released")

    def _panic_port(self, port: BaseOutput) -> None:
        """What ``port.panic()`` does, through :meth:`_send` (so the feedback
        guard knows these messages when they come back)."""
        for (channel, pitch), count in sorted(port.sounding().items()):
            for _ in range(count):
                self._send(port, (NOTE_OFF | channel, pitch, 0))
        for channel in sorted(self._channels.get(id(port), ())):
            for number, value in ((SUSTAIN, 0), (ALL_NOTES_OFF, 0), (ALL_SOUND_OFF, 0)):
                self._send(port, (CONTROL | channel, number, value))

    # --- controls (any thread) ---------------------------------------------------

    def _on_worker(self, fn: Callable, *args) -> None:
        """Run ``fn`` on the worker, in order with the notes (at once if this
        thread is handling a message, or if the engine is not running)."""
        if self._closed:
            return
        if self._thread is None or threading.get_ident() == self._working:
            fn(*args)
        else:
            self._queue.put(_Call(fn, args))

    def _state(self, key: str, value: object) -> None:
        if self.osc is not None:
            self.osc.state(key, value)

    def set_mode(self, mode: str) -> None:
        """``instrument``, ``respond`` or ``both``; notes held keep their routes."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self._on_worker(self._set_mode, mode)

    def _set_mode(self, mode: str) -> None:
        if mode == self.mode:
            return
        self.mode = mode
        if self.responder is not None:
            self.responder.set_mode(mode)
        self._state("mode", mode)
        log.info("mode: %s", mode)

    def panic(self) -> None:
        """Silence every note now: responses cancelled, note-offs, All Notes Off."""
        self._on_worker(self._panic)

    def mute(self, part: str, on: bool = True) -> None:
        self.cfg.part(part)  # KeyError names the parts
        self._on_worker(self._set_silent, self._muted, part, on, "mute")

    def solo(self, part: str, on: bool = True) -> None:
        self.cfg.part(part)
        self._on_worker(self._set_silent, self._soloed, part, on, "solo")

    def _set_silent(self, group: set[str], part: str, on: bool, what: str) -> None:
        with self._lock:
            (group.add if on else group.discard)(part)
        self._silence(self._audible)
        self._state(f"{what}/{part}", int(on))

    def _within(self, key: str, value: float) -> float:
        """``value`` clamped to the range the configuration allows for ``key``
        (a live control must not reach where the file could not), with a
        rate-limited warning; a value that is not a finite number is refused."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{key}: {value} is not a number")
        low, high = value_range(key)
        clamped = max(low, value if high is None else min(value, high))
        if clamped != value:
            self._clamp_log.warning(key, "%s %g is outside %g..%g, the range of its configuration key: using %g",
                                    key, value, low, high, clamped)
        return clamped

    def set_tempo(self, bpm: float) -> None:
        bpm = self._within("tempo.bpm", bpm)
        self.clock.set_bpm(bpm)
        self._free_clock.set_bpm(bpm)
        self._state("tempo", round(self.clock.bpm, 2))

    def trigger(self) -> None:
        """Answer now, without waiting for a pause."""
        if self.responder is not None:
            self.responder.trigger()

    def set_temperature(self, value: float) -> None:
        self._set_control("temperature", self._within("continuation.temperature", value))

    def set_top_p(self, value: float) -> None:
        self._set_control("top_p", self._within("continuation.top_p", value))

    def set_key(self, text: str) -> None:
        """A key ("C major") locks the answer to it; "auto" locks it to the
        key detected from the playing; "off" frees it."""
        from coplayer.gen.sampler import HARD_LOCK, Key

        word = text.strip().lower()
        if word in ("off", "none"):
            self._set_control("key", None, key_lock=0.0)
        elif word == "auto":
            self._set_control("key", None, key_lock=HARD_LOCK)
        else:
            self._set_control("key", Key.parse(text.strip()), key_lock=HARD_LOCK)

    def set_key_strength(self, nats: float) -> None:
        """How firmly the answer keeps to the key (named, or detected from the
        playing): notes outside it lose ``nats`` of log-probability; 0 frees
        them, :data:`~coplayer.gen.sampler.HARD_LOCK` (the top of the range) forbids them."""
        self._set_control("key_lock", self._within("continuation.key_strength", nats), state="key_strength")

    def _set_control(self, name: str, value: object, state: str | None = None, **more: object) -> None:
        if self.controls is None:
            raise ValueError(f"cannot set {state or name}: call and response is not available")
        self.controls.set(**{name: value}, **more)
        self._state(state or name, "auto" if name == "key" and value is None and more.get("key_lock") else value)

    def set_response_bars(self, bars: int) -> None:
        bars = round(self._within("continuation.response_bars", bars))
        self.response_bars = bars
        if self.responder is not None:
            self.responder.set_response_bars(bars)
        self._state("response_bars", bars)

    def record(self) -> Path | None:
        """Write the session so far to a new file in ``session.directory``
        (OSC ``/coplayer/record``): at most one every few seconds, none past
        ``session.max_mb``; a refusal or a failure is one line (the first of
        a flood), and the OSC ``record`` state says it."""
        refused = None if self.recorder.keep else "session.record is false: coplayer keeps no recording"
        refused = refused or self.snapshots.refusal()
        if refused:
            return self._not_recorded("refused", refused)
        try:
            path = self.write_session(session_path(prepare_folder(self.cfg.session.directory)))
        except SessionError as exc:
            return self._not_recorded("failed", str(exc))
        self._refusals = 0
        log.info("wrote a snapshot of the session to %s", path)
        self._state("record", str(path))
        return path

    def _not_recorded(self, what: str, why: str) -> None:
        self.counts[f"records {what}"] += 1
        self._refusals += 1
        if self._refusals == 1:
            log.warning("/coplayer/record: no snapshot written: %s", why)
        self._state("record", f"{what}: {why}")

    # --- time, session, statistics ---------------------------------------------------

    def beat_at(self, t_ns: int) -> float:
        """Beats by the clock; while a followed MIDI clock is stopped, by a
        free clock at its tempo."""
        if self.clock.running:
            return self.clock.beat_at(t_ns)
        return self._free_clock.beat_at(t_ns)

    def write_session(self, path: str | Path, bpm: float | None = None) -> Path:
        """The input and every part so far, one named track each, to ``path``
        (whole or not at all; :class:`SessionError` if it cannot be written)."""
        return self.recorder.write(path, bpm=bpm or self.clock.bpm, **session_tracks(self.cfg))

    def stats(self, recent: bool = False) -> dict:
        """Decision latency (count, p50/p99/max ms), misses (notes the fallback
        routed), over_budget (notes slower than the budget), notes per part,
        feedback drops, errors, the responder's statistics, the input's
        xruns, skipped cycles and dropped messages, the note-offs the outputs
        sent again, the note-ons (and SysEx) dropped because they waited
        longer than the budget allows (``dropped_late``).  ``recent``: the
        percentiles of the last few thousand notes only (cheap, for live use)."""
        if recent:
            window = LatencyStats(self.cfg.latency.budget_ms, self.latency.samples_ns[-RECENT:])
            s = window.summary()
            s.update(count=len(self.latency.samples_ns), max_ms=self._max_ns / 1e6)
        else:
            s = self.latency.summary()
        s.update(over_budget=self.latency.misses, misses=self.decider.misses,
                 budget_ms=self.cfg.latency.budget_ms, model_p99_ms=self.decider.steps.p99_ns / 1e6)
        s["parts"] = {p: self.notes_out[p] for p in self.cfg.part_names}
        s.update({k.replace(" ", "_"): v for k, v in dict(self.counts).items()})  # a copy: the worker counts on
        s["responses"] = dict(getattr(self.responder, "stats", None) or {})
        # The input client's view of the MIDI server, where the backend can tell
        # (None otherwise): xruns, cycles the server skipped it, messages its reader dropped.
        port = self.input
        s["xruns"], s["skipped_cycles"], s["dropped_in"] = (
            (port.xruns(), port.skipped_cycles(), port.overflowed()) if port is not None else (None, None, None))
        # Note-offs the outputs wrote again after an xrun (the JACK safety net; None elsewhere).
        resent = [n for n in (p.resent() for p in self.outputs.ports()) if n is not None]
        s["resent"] = sum(resent) if resent else None
        shed = port.shed() if port is not None else None
        s["dropped_late"] = s.get("dropped_late", 0) + (shed or 0)
        return s

    def sounding(self) -> bool:
        """Is any note sounding on any output?"""
        return any(port.sounding() for port in self.outputs.ports())

    def snapshot(self) -> dict:
        """What the live view shows: mode, tempo, parts, live statistics."""
        parts = []
        for name, target in self.outputs.parts.items():
            channel = target.channel
            sounding = [p for (ch, p), n in target.port.sounding().items() if ch == channel for _ in range(n)]
            parts.append({"name": name, "sounding": sorted(sounding), "last": self._last_pitch.get(name),
                          "notes": self.notes_out[name], "muted": name in self._muted,
                          "solo": name in self._soloed})
        return {"mode": self.mode, "bpm": self.clock.bpm, "clock": self.clock.running, "parts": parts,
                "stats": self.stats(recent=True)}
