"""Building a running engine from the configuration, and ``coplayer run``.

* :class:`MemoryPorts` / :class:`RealPorts` open ports by name (the
  ``midi.backend``); :func:`open_outputs` opens one port per part (or one
  port, parts told apart by channel), the pass-through and drums ports;
* :func:`build_live` wires ports, clock, instrumenter and its fallback,
  responder and OSC into a :class:`Live` (an :class:`Engine` and what
  surrounds it);
* :class:`Feeder` replays a MIDI file into the input port's callback path,
  as if played live;
* :func:`run` is ``coplayer run``: until Ctrl-C, SIGTERM, ``--duration``,
  the end of ``--input`` and of the last answer, or the loss of its ports;
  then the session file and the latency statistics.  Before a port opens,
  it checks the session folder, recovers the sessions of runs that did not
  finish and starts the journal of this one (:mod:`coplayer.engine.journal`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from coplayer.engine.controls import OscFeed, osc_handlers
from coplayer.engine.engine import Engine, Outputs, session_tracks
from coplayer.engine.journal import Journal, recover
from coplayer.engine.router import Target
from coplayer.engine.session import prepare_folder, session_path
from coplayer.engine.view import LiveView, responses_text, summary_line
from coplayer.errors import CoplayerError, SessionError
from coplayer.io.memory import MemoryHub
from coplayer.io.ports import BaseInput, BaseOutput, Message, NoVirtualPorts, PortError, now_ns

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config
    from coplayer.io.clock import Clock
    from coplayer.io.osc import OscServer

__all__ = ["Feeder", "Live", "MemoryPorts", "RealPorts", "build_live", "open_outputs", "ports_for", "run"]

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005  # the GIL's switch interval while the engine runs (see Live.start)
TAIL_MARGIN_S = 5.0  # after the last answer, pushed by a bar, could have ended


# --- ports -------------------------------------------------------------------------


class MemoryPorts:
    """In-memory ports on a :class:`MemoryHub` (tests, demo, ``midi.backend: memory``)."""

    def __init__(self, hub: MemoryHub | None = None) -> None:
        self.hub = hub if hub is not None else MemoryHub()

    def output(self, name: str, virtual: bool) -> BaseOutput:
        return self.hub.open_output(name)

    def input(self, name: str, virtual: bool) -> BaseInput:
        return self.hub.open_input(name)


class RealPorts:
    """Real ports: coplayer's JACK client or python-rtmidi (see :mod:`coplayer.io.real`)."""

    def __init__(self, backend: str = "auto", api: str = "auto", client_name: str = "coplayer") -> None:
        self.backend, self.api, self.client_name = backend, api, client_name

    def output(self, name: str, virtual: bool) -> BaseOutput:
        from coplayer.io.real import open_output

        return open_output(name, virtual=virtual, backend=self.backend, api=self.api, client_name=self.client_name)

    def input(self, name: str, virtual: bool) -> BaseInput:
        from coplayer.io.real import open_input

        return open_input(name, virtual=virtual, backend=self.backend, api=self.api, client_name=self.client_name)


def ports_for(cfg: "Config") -> MemoryPorts | RealPorts:
    if cfg.midi.backend == "memory":
        return MemoryPorts()
    return RealPorts(cfg.midi.backend, cfg.midi.api, cfg.midi.client_name)


def open_outputs(cfg: "Config", maker) -> Outputs:
    """A target per part, and the pass-through and drums targets.

    ``output_mode: ports``: a virtual port ``"<client> <part>"`` per part
    (or the part's own ``port``), ``"<client> thru"`` and ``"<client> drums"``;
    ``channels``: everything on ``midi.output_port``, parts by channel.

    Where the MIDI system has no virtual ports (Windows), ``output_port``
    names an existing one (a loopMIDI port), and in mode ``ports`` the
    pass-through and drums ports are left out, with one line: the parts,
    each named in ``parts[N].port``, still play.
    """
    midi, opened = cfg.midi, {}

    def port(name: str, virtual: bool = True) -> BaseOutput:
        if name not in opened:
            opened[name] = maker.output(name, virtual)
        return opened[name]

    def own(suffix: str) -> BaseOutput:  # "coplayer soprano", or the one shared port
        if midi.output_mode != "channels":
            return port(f"{midi.client_name} {suffix}")
        try:
            return port(midi.output_port)
        except NoVirtualPorts:
            return port(midi.output_port, False)

    def extra(suffix: str) -> Target | None:  # the pass-through and drums ports: not where none can be made
        try:
            return Target(None, own(suffix), None)
        except NoVirtualPorts:
            log.warning("no %s %s port: this MIDI system has no virtual ports (%s)", midi.client_name, suffix,
                        "the drum channel is not played" if suffix == "drums" else
                        "in mode respond your notes go to the parts; nothing else is passed through")
            return None

    try:
        parts = {p.name: Target(p.name, port(p.port, False) if p.port else own(p.name), p.channel - 1)
                 for p in cfg.parts}
        thru = extra("thru")
        drums = None if midi.drum_channel is None else extra("drums")
    except BaseException:
        _close(opened.values())
        raise
    return Outputs(parts, thru, drums)


def _close(ports) -> None:
    for port in ports:
        if port is not None:
            port.close()


def open_input(cfg: "Config", maker) -> BaseInput:
    """The configured input port, or a virtual one named ``virtual_input_name``."""
    if cfg.midi.input:
        return maker.input(cfg.midi.input, False)
    return maker.input(cfg.midi.virtual_input_name, True)


# --- the running whole -------------------------------------------------------------


@dataclass
class Live:
    """An engine with its input port and OSC server."""

    engine: Engine
    input: BaseInput
    model: str
    osc_server: "OscServer | None" = None

    _switch_interval: float | None = field(default=None, init=False, repr=False)
    _frozen: bool = field(default=False, init=False, repr=False)

    def start(self) -> Live:
        # A thread waiting for the GIL (the worker, woken by a note) waits until
        # the running thread yields it: at most the switch interval, 5 ms by
        # default, while the responder generates.  Shorter while playing.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self.engine.start()
        # Everything loaded so far (models, tables, configuration) lives as long
        # as the engine: out of the garbage collector's sight, its oldest
        # generation scans only what playing creates (measured with gc.callbacks
        # in the engine benchmark: full collections of 5-30 ms, each a note late).
        self.engine.flush()  # the worker's warm-up is done
        gc.collect()
        gc.freeze()
        self._frozen = True
        if self.osc_server is not None:
            self.osc_server.start()
        return self

    def stop(self) -> None:
        if self.osc_server is not None:
            self.osc_server.stop()
        self.engine.stop()
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None


def _instrumenters(cfg: "Config", model: str | None):
    """(the instrumenter, its fallback or None, the model's name)."""
    from coplayer.instrument.arrange import choose_instrumenter
    from coplayer.instrument.baselines import BASELINES, make_instrumenter, make_scorer

    instrumenter, name = choose_instrumenter(cfg, model)
    fallback = None
    if name not in BASELINES:
        fallback = make_instrumenter(make_scorer(cfg.instrument.fallback, cfg), cfg)
    return instrumenter, fallback, name


def make_responder(cfg: "Config", engine: Engine):
    """The responder of coplayer.engine.responder, or None where it is not built."""
    try:
        from coplayer.engine.responder import Responder
    except ModuleNotFoundError as exc:
        if exc.name != "coplayer.engine.responder":
            raise
        log.info("call and response is not available in this version: coplayer instruments only")
        return None
    try:
        return Responder(cfg, engine.clock, engine.play)
    except CoplayerError as exc:  # no continuation model at all: play on, instrumenting
        log.warning("call and response is unavailable (%s); coplayer instruments only", exc)
        return None


def _osc_feed(cfg: "Config", engine: Engine) -> OscFeed | None:
    if not cfg.osc.enabled:
        return None
    from coplayer.io.osc import OscOut

    out = OscOut(cfg.osc.out_host, cfg.osc.out_port)
    return OscFeed(out, lambda: engine.stats(recent=True), cfg.latency.stats_interval_s)


def build_live(cfg: "Config", maker=None, *, input_maker=None, clock: "Clock | None" = None,
               model: str | None = None, respond: bool = True) -> Live:
    """Open the ports and build the engine, its responder and OSC (not started).
    ``maker`` opens the outputs (default: by ``midi.backend``), ``input_maker``
    the input (default: ``maker``)."""
    from coplayer.io.clock import make_clock

    maker = maker if maker is not None else ports_for(cfg)
    instrumenter, fallback, name = _instrumenters(cfg, model)
    clock = clock if clock is not None else make_clock(cfg.tempo.source, cfg.tempo.bpm, cfg.tempo.clock_smoothing)
    outputs = open_outputs(cfg, maker)
    port_in = None
    try:
        port_in = open_input(cfg, input_maker or maker)
        engine = Engine(cfg, outputs, instrumenter, fallback=fallback, clock=clock, input=port_in)
        engine.osc = _osc_feed(cfg, engine)
        if respond:
            engine.attach_responder(make_responder(cfg, engine))
        server = _osc_server(cfg, engine) if engine.osc is not None else None
    except BaseException:
        _close([*outputs.ports(), port_in])
        raise
    return Live(engine, port_in, name, server)


def _osc_server(cfg: "Config", engine: Engine) -> "OscServer":
    from coplayer.io.osc import OscControl, OscServer

    return OscServer(OscControl(osc_handlers(engine)), cfg.osc.host, cfg.osc.in_port, cfg.osc.allow)


# --- replaying a file as if played live --------------------------------------------


def file_messages(path: str | Path) -> list[tuple[float, Message]]:
    """(seconds from the start, message) of every MIDI message of a file;
    :class:`MidiFileError` says why a file cannot be read (as ``arrange`` does)."""
    from coplayer.data.midi import open_midifile

    timeline, t = [], 0.0
    for msg in open_midifile(path):
        t += msg.time
        if not msg.is_meta:
            timeline.append((t, tuple(msg.bytes())))
    return timeline


class Feeder:
    """Delivers a file's messages at their real times (divided by ``speed``)
    through ``deliver(message, t_ns)``, the input port's callback path."""

    def __init__(self, messages: list[tuple[float, Message]], deliver: Callable[[Message, int], None],
                 speed: float = 1.0) -> None:
        self.messages, self.deliver, self.speed = messages, deliver, speed
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coplayer-feeder", daemon=True)

    @property
    def duration_s(self) -> float:
        return (self.messages[-1][0] if self.messages else 0.0) / self.speed

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        start = now_ns()
        try:
            for offset, data in self.messages:
                wait = (start + offset / self.speed * 1e9 - now_ns()) / 1e9
                if wait > 0 and self._stop.wait(wait):
                    return
                self.deliver(data, now_ns())
        except PortError:  # the input closed under us: the run is ending
            pass
        finally:
            self.done.set()


def wait_for_end(live: Live, stop: threading.Event, feeder: Feeder | None, duration: float | None) -> bool:
    """Until ``stop`` is set, ``duration`` seconds pass, the feeder is done
    and the answer to its last phrase has been played (True), or the ports
    are lost (False, said in one line)."""
    deadline = None if duration is None else time.monotonic() + duration
    ended_at = None
    while not stop.wait(0.05):
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return True
        lost = live.input.lost()
        if lost:
            log.error("%s: coplayer's ports are gone, so it stops (start the server, then coplayer again)", lost)
            return False
        if feeder is None or not feeder.done.is_set():
            continue
        ended_at = ended_at or now
        if _answered(live.engine, now - ended_at):
            return True
    return True


def _answered(engine: Engine, since_end_s: float) -> bool:
    """After the input ended: has the last answer had time to come and go?"""
    cfg = engine.cfg
    if engine.responder is None or engine.mode == "instrument":
        return since_end_s >= TAIL_MARGIN_S or not engine.sounding()  # a file may end with keys held
    beat_s = 60.0 / engine.clock.bpm
    bar_s = beat_s * cfg.tempo.beats_per_bar
    start_s = (cfg.continuation.silence_beats + 1) * beat_s + cfg.continuation.lookahead_ms / 1e3
    longest_s = start_s + bar_s * (engine.response_bars + 2) + TAIL_MARGIN_S
    if since_end_s >= longest_s:
        return True
    state = getattr(engine.responder, "state", None)
    idle = state == "listening" if state is not None else (now_ns() - engine.last_output_ns) / 1e9 >= bar_s
    return since_end_s >= start_s and idle and not engine.sounding()


# --- coplayer run ------------------------------------------------------------------


def _with_api(cfg: "Config", api: str | None) -> "Config":
    if api is None:
        return cfg
    return dataclasses.replace(cfg, midi=dataclasses.replace(cfg.midi, api=api))


def _describe(live: Live) -> str:
    outputs = live.engine.outputs
    names = ", ".join(dict.fromkeys(repr(p.name) for p in outputs.ports()))
    osc = ""
    if live.osc_server is not None:
        host, port = live.osc_server.address
        osc = f"; OSC in {host}:{port}, out {live.engine.osc.out.target[0]}:{live.engine.osc.out.target[1]}"
    return f"listening on {live.input.name!r}; playing to {names}{osc}; model {live.model}"


def _on_sigterm(stop: threading.Event):
    """Install a SIGTERM handler that sets ``stop``; returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    except ValueError:  # not the main thread (e.g. called from a test's thread)
        return None


def run(cfg: "Config", *, input_file: str | None = None, quiet: bool = False, api: str | None = None,
        duration: float | None = None, model: str | None = None, stream: TextIO | None = None) -> int:
    """``coplayer run``; returns the exit code: 1 if the ports were lost or
    the session could not be written (its journal is then kept)."""
    stream = stream if stream is not None else sys.stdout
    cfg = _with_api(cfg, api)
    messages = file_messages(input_file) if input_file else None
    journal = open_session(cfg)
    live = _build_journalled(cfg, model, journal)
    stop = threading.Event()
    previous = _on_sigterm(stop)
    feeder = view = None
    ended_well = True
    try:
        live.start()
        log.info("coplayer: %s; Ctrl-C to stop", _describe(live))
        if messages is not None:
            feeder = Feeder(messages, live.input._deliver).start()
        if LiveView.wanted(quiet, stream):
            view = LiveView(live.engine.snapshot, stream).start()
        ended_well = wait_for_end(live, stop, feeder, duration)
    except KeyboardInterrupt:
        pass
    finally:
        _finish(live, feeder, view)
        if journal is not None:
            journal.stop()  # on disk up to the last note; should anything below fail, the next start recovers it
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    saved = _report(live, journal, stream)
    return 0 if ended_well and saved else 1


def open_session(cfg: "Config") -> Journal | None:
    """Before playing: the session folder is created (else
    :class:`SessionError`), the sessions of runs that did not finish are
    recovered, and this run's journal is opened (None: no recording)."""
    if not cfg.session.record:
        return None
    folder = prepare_folder(cfg.session.directory)
    for found in recover(folder):
        log.warning("%s", found.message())
    return Journal.create(folder, {**session_tracks(cfg), "bpm": cfg.tempo.bpm})


def _build_journalled(cfg: "Config", model: str | None, journal: Journal | None) -> Live:
    """:func:`build_live`, its recorder followed by ``journal`` (removed if the ports do not open)."""
    try:
        live = build_live(cfg, model=model)
    except BaseException:
        if journal is not None:
            journal.close(remove=True)
        raise
    if journal is not None:
        engine = live.engine
        journal.start(engine.recorder, lambda: engine.clock.bpm, cfg.session.journal_interval_s)
    return live


def _finish(live: Live, feeder: Feeder | None, view: LiveView | None) -> None:
    if feeder is not None:
        feeder.stop()
    if view is not None:
        view.stop()
    live.stop()


def _report(live: Live, journal: Journal | None, stream: TextIO) -> bool:
    """Write the session, print the statistics; False if the session could not be written."""
    engine = live.engine
    saved = journal is None or save_session(engine, journal, stream)
    print(f"decision latency per note: {summary_line(engine.stats())}", file=stream)
    responses = engine.stats()["responses"]
    if responses:
        print(f"answers: {responses_text(responses)}", file=stream)
    return saved


def save_session(engine: Engine, journal: Journal, stream: TextIO) -> bool:
    """The session to a new file in the folder (created again if it went),
    then the journal removed; else one line, and the journal kept."""
    try:
        path = engine.write_session(session_path(prepare_folder(engine.cfg.session.directory)))
    except SessionError as exc:
        kept = journal.path.exists()
        journal.close(remove=False)
        log.error("%s; %s", exc, f"what was played is kept in {journal.path} and recovered at the next start"
                  if kept else "the journal went with the folder: this session is lost")
        return False
    journal.close(remove=True)
    print(f"wrote the session to {path}", file=stream)
    over = engine.snapshots.over_budget()
    if over:
        log.warning("%s", over)
    return True
