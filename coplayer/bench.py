"""End-to-end latency through real JACK ports, beside the bare JACK loop floor.

``coplayer bench`` starts ``coplayer run --api jack`` as a separate process
and, beside it, the bare loop: ``python -m coplayer.io.thru``, a pass-through
client built on the same port layer that sends every message straight on.
It opens its own ports (an output; one input that all of coplayer's outputs
feed, as JACK merges MIDI and the default parts have channels of their own;
a "floor" input and a "hop" input) and connects them with ``jack_connect``::

    bench out --> coplayer in --> coplayer --> coplayer <part> --> bench coplayer
    bench out --> thru in -------------------> thru out -------> bench floor
    bench out ------------------------------------------------> bench hop

Both loops cross two JACK hops and the same kind of ports, so their
difference is what coplayer does between its ports; the single hop is
reported too.  Every note-on is timestamped just before it is sent and again
by the receiving input's reader (``now_ns``, the clock of
:mod:`coplayer.io`), so each note gives one end-to-end, one floor and one hop
latency in the same run, under the same pacing.  Then the rate is stepped up
(50 to 2,000 notes/s) and the highest rate with no lost note, no stuck note
and no fallback decision (coplayer's ``misses``, read from its OSC
``/coplayer/stats``) is reported.

The pieces (:class:`CoplayerProcess`, :class:`Peer`, :func:`jack_connect`,
the note schedules) are also what ``tests/test_e2e_jack.py`` plays with.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coplayer.engine.stats import summary
from coplayer.errors import CoplayerError
from coplayer.io.ports import Message, now_ns

__all__ = [
    "BenchError", "CoplayerProcess", "Peer", "SECTIONS", "StatsListener", "bench", "by_section", "chord",
    "free_udp_port", "jack_connect", "jack_ports", "main", "rate_steps", "realistic", "run_notes", "single_notes",
]

PARTS = ("soprano", "alto", "tenor", "bass")
OUTPUTS = (*PARTS, "thru", "drums")
MERGED = "coplayer"  # the bench's one input for every coplayer output (parts differ by channel)
NOTE_ON, NOTE_OFF, CC = 0x90, 0x80, 0xB0
VELOCITY = 90
RATES = (50, 100, 200, 500, 1000, 2000)  # notes/s, each for STEP_S
STEP_S = 3.0
SETTLE_S = 0.4  # after the last note-off of a section, for stragglers
PORT_WAIT_S = 20.0


class BenchError(CoplayerError, RuntimeError):
    """The benchmark could not run (no JACK server, coplayer did not start...)."""


# --- JACK and OSC helpers ---------------------------------------------------------


def jack_ports() -> list[str]:
    """Full names of every JACK port ("client:port")."""
    out = subprocess.run(["jack_lsp"], capture_output=True, text=True, timeout=10)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def find_port(short: str, ports: list[str] | None = None) -> str | None:
    """The full name of the port whose own name is ``short`` (clients vary:
    rtmidi makes one JACK client per port, "coplayer", "coplayer-01", ...)."""
    hits = [p for p in (ports if ports is not None else jack_ports()) if p.split(":", 1)[-1] == short]
    return hits[0] if len(hits) == 1 else None


def wait_ports(shorts: list[str], timeout_s: float = PORT_WAIT_S, alive=lambda: True) -> dict[str, str]:
    """{short name: full name} once every port exists."""
    deadline = time.monotonic() + timeout_s
    while True:
        ports = jack_ports()
        found = {s: find_port(s, ports) for s in shorts}
        if all(found.values()):
            return found
        if time.monotonic() > deadline or not alive():
            missing = [s for s, f in found.items() if not f]
            raise BenchError(f"JACK ports did not appear: {missing}; present: {ports}")
        time.sleep(0.1)


def jack_connect(source: str, destination: str) -> None:
    done = subprocess.run(["jack_connect", source, destination], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise BenchError(f"jack_connect {source} {destination} failed: {done.stderr.strip()}")


def jack_available() -> bool:
    if not shutil.which("jack_wait"):
        return False
    check = subprocess.run(["jack_wait", "-c"], capture_output=True, text=True, timeout=10)
    return check.stdout.strip() == "running"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StatsListener:
    """Receives coplayer's OSC feed: the latest ``/coplayer/stats`` and every
    message, (address, args)."""

    def __init__(self, port: int) -> None:
        from pythonosc.dispatcher import Dispatcher
        from pythonosc.osc_server import ThreadingOSCUDPServer

        self.messages: list[tuple[str, tuple]] = []
        self.stats: tuple | None = None
        self.stats_count = 0
        # the latest /coplayer/ports: xruns, skipped cycles, overflowed, note-offs resent,
        # note-ons dropped late (-1: unknown)
        self.ports: tuple | None = None
        self.ports_count = 0
        self._lock = threading.Lock()
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(self._handle)
        self._server = ThreadingOSCUDPServer(("127.0.0.1", port), dispatcher)
        self._thread = threading.Thread(target=self._server.serve_forever, name="bench-osc", daemon=True)
        self._thread.start()

    def _handle(self, address: str, *args) -> None:
        with self._lock:
            self.messages.append((address, args))
            if address == "/coplayer/stats":
                self.stats, self.stats_count = args, self.stats_count + 1
            elif address == "/coplayer/ports":
                self.ports, self.ports_count = args, self.ports_count + 1

    def fresh_stats(self, timeout_s: float = 3.0) -> tuple | None:
        """The first stats message sent after this call (and, in :attr:`ports`,
        the ports message sent with it)."""
        start, ports = self.stats_count, self.ports_count
        deadline = time.monotonic() + timeout_s
        while (self.stats_count == start or self.ports_count == ports) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.stats if self.stats_count > start else None

    def skipped(self) -> int | None:
        """Cycles JACK skipped coplayer's input client, per the latest ports message."""
        return self._port_count(1)

    def resent(self) -> int | None:
        """Note-offs coplayer's outputs wrote again after an xrun, per the latest ports message."""
        return self._port_count(3)

    def dropped_late(self) -> int | None:
        """Note-ons (and SysEx) coplayer dropped as too late, per the latest ports message."""
        return self._port_count(4)

    def _port_count(self, i: int) -> int | None:
        ports = self.ports
        return ports[i] if ports and len(ports) > i and ports[i] >= 0 else None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def terminate(proc: subprocess.Popen, timeout_s: float) -> str:
    """SIGTERM (if still running), wait, kill after ``timeout_s``; what it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


# --- coplayer as a separate process -------------------------------------------------


@dataclass
class CoplayerProcess:
    """``coplayer run --api jack --quiet`` with its own client name (so that
    several can run at once), OSC on free ports, no session recording."""

    name: str = field(default_factory=lambda: f"cpb{os.getpid()}x{random.randrange(10**6)}")
    mode: str = "instrument"
    backend: str = "auto"  # midi.backend: see coplayer.io.real
    settings: dict[str, object] = field(default_factory=dict)
    osc_in: int = field(default_factory=free_udp_port)
    osc_out: int = field(default_factory=free_udp_port)
    proc: subprocess.Popen | None = None
    ports: dict[str, str] = field(default_factory=dict)  # "in" / part -> full JACK name
    output: str = ""

    def short(self, what: str) -> str:
        return f"{self.name} {what}"

    def args(self) -> list[str]:
        values = {"midi.api": "jack", "midi.backend": self.backend, "midi.client_name": self.name,
                  "midi.virtual_input_name": self.short("in"), "mode": self.mode, "session.record": "false",
                  "osc.in_port": self.osc_in, "osc.out_port": self.osc_out, **self.settings}
        sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
        return [sys.executable, "-m", "coplayer", "run", "--api", "jack", "--quiet", *sets]

    def start(self) -> CoplayerProcess:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL)
        try:
            found = wait_ports([self.short(w) for w in ("in", *OUTPUTS)], alive=lambda: self.proc.poll() is None)
        except BenchError:
            self.stop()
            raise BenchError(f"coplayer did not open its ports; it said: {self.output.strip()[-2000:]}") from None
        self.ports = {w: found[self.short(w)] for w in ("in", *OUTPUTS)}
        return self

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait; returns the exit code (kills after ``timeout_s``)."""
        if self.proc is None:
            return 0
        self.output = terminate(self.proc, timeout_s)
        return self.proc.returncode

    def __enter__(self) -> CoplayerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@dataclass
class ThruProcess:
    """``python -m coplayer.io.thru``: the bare pass-through loop, as a separate process."""

    name: str = field(default_factory=lambda: f"cpbthru{os.getpid()}x{random.randrange(10**6)}")
    backend: str = "auto"
    proc: subprocess.Popen | None = None
    ports: dict[str, str] = field(default_factory=dict)  # "in" / "out" -> full JACK name

    def start(self) -> ThruProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "coplayer.io.thru", self.name, "--backend", self.backend],
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            found = wait_ports([f"{self.name} in", f"{self.name} out"], alive=lambda: self.proc.poll() is None)
        except BenchError:
            out = self.stop()
            raise BenchError(f"the pass-through did not open its ports; it said: {out.strip()[-2000:]}") from None
        self.ports = {"in": found[f"{self.name} in"], "out": found[f"{self.name} out"]}
        return self

    def stop(self) -> str:
        """SIGTERM, wait (kill after 10 s); returns what it printed."""
        return "" if self.proc is None else terminate(self.proc, 10.0)


# --- the bench's own JACK client ----------------------------------------------------


class Peer:
    """One output port and any number of input ports (virtual, JACK API,
    ``backend`` as in :mod:`coplayer.io.real`); every received message is
    kept as (input name, message, t_ns)."""

    def __init__(self, name: str | None = None, backend: str = "auto") -> None:
        from coplayer.io.real import open_output

        self.name = name or f"cpbpeer{os.getpid()}x{random.randrange(10**6)}"
        self.backend = backend
        # The output has a client of its own: one client both feeding coplayer
        # and fed by it would close a cycle in the JACK graph, which JACK
        # breaks with a period of delay (and, measured, many xruns).
        self.out = open_output(f"{self.name} out", virtual=True, backend=backend, api="jack",
                               client_name=f"{self.name}send")
        self.inputs: dict[str, object] = {}
        self.received: list[tuple[str, Message, int]] = []
        self._lock = threading.Lock()

    def listen(self, label: str) -> str:
        """Open input ``label``; returns its full JACK name."""
        from coplayer.io.real import open_input

        def keep(msg: Message, t_ns: int, label=label) -> None:
            with self._lock:
                self.received.append((label, msg, t_ns))

        self.inputs[label] = open_input(f"{self.name} {label}", virtual=True, backend=self.backend, api="jack",
                                        client_name=self.name, on_message=keep)
        return wait_ports([f"{self.name} {label}"])[f"{self.name} {label}"]

    def out_port(self) -> str:
        return wait_ports([f"{self.name} out"])[f"{self.name} out"]

    def attach(self, coplayer: CoplayerProcess, thru: ThruProcess | None = None, merge: bool = False) -> None:
        """Connect the output to coplayer's input and every coplayer output to
        an input here named after it, or with ``merge`` all of them to one
        input, :data:`MERGED` (JACK merges MIDI; the default parts have
        channels of their own); with ``thru``, also the bare loop (input
        "floor") and the single hop (input "hop")."""
        out = self.out_port()
        jack_connect(out, coplayer.ports["in"])
        merged = self.listen(MERGED) if merge else None
        for what in OUTPUTS:
            jack_connect(coplayer.ports[what], merged or self.listen(what))
        if thru is not None:
            jack_connect(out, thru.ports["in"])
            jack_connect(thru.ports["out"], self.listen("floor"))
            jack_connect(out, self.listen("hop"))

    def events(self, labels=None, since_ns: int = 0) -> list[tuple[str, Message, int]]:
        with self._lock:
            return [e for e in self.received if e[2] >= since_ns and (labels is None or e[0] in labels)]

    def xruns(self) -> int | None:
        """Xruns JACK has reported to this peer's client so far (None with
        python-rtmidi, which cannot tell)."""
        return self.out.xruns()

    def skipped(self) -> int | None:
        """Cycles of JACK's frame time this peer's sending or listening client
        did not see so far, the larger of the two (None where the backend
        cannot tell)."""
        clients = [self.out, *list(self.inputs.values())[:1]]  # the inputs share one client
        counts = [port.skipped_cycles() for port in clients]
        return None if None in counts else max(counts)

    def send(self, msg: Message) -> int:
        t = now_ns()
        self.out.send(msg)
        return t

    def play(self, schedule: list[tuple[float, Message]]) -> list[tuple[int, Message]]:
        """Send (seconds from now, message) at their times; returns (t_ns sent, message)."""
        start, sent = time.perf_counter(), []
        for at, msg in schedule:
            wait = start + at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # sleeping, not spinning: the readers need the GIL
            sent.append((self.send(msg), msg))
        return sent

    def wait_quiet(self, quiet_s: float = SETTLE_S, timeout_s: float = 5.0) -> None:
        """Until nothing has arrived for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                last = self.received[-1][2] if self.received else 0
            if (now_ns() - last) / 1e9 >= quiet_s:
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.out.close()
        for port in self.inputs.values():
            port.close()


# --- note schedules -------------------------------------------------------------------

LOW, HIGH = 48, 76  # where every part can take some notes


def _note(at: float, pitch: int, dur: float, channel: int = 0) -> list[tuple[float, Message]]:
    return [(at, (NOTE_ON | channel, pitch, VELOCITY)), (at + dur, (NOTE_OFF | channel, pitch, 0))]


def single_notes(n: int, rate: float, rng: random.Random, start: float = 0.0) -> list[tuple[float, Message]]:
    """Separate notes, ``rate`` per second, each sounding 60 % of the gap."""
    gap = 1.0 / rate
    return [m for i in range(n) for m in _note(start + i * gap, rng.randrange(LOW, HIGH), gap * 0.6)]


def chord(at: float, pitches: list[int], rng: random.Random, dur: float = 0.3) -> list[tuple[float, Message]]:
    """A chord as a person plays it: the keys a few ms apart, in any order."""
    order = rng.sample(pitches, len(pitches))
    out, t = [], at
    for p in order:
        out.append((t, (NOTE_ON, p, VELOCITY)))
        t += rng.uniform(0.002, 0.012)
    out += [(at + dur + rng.uniform(0, 0.02), (NOTE_OFF, p, 0)) for p in order]
    return out


def chords(n: int, rng: random.Random, start: float = 0.0, gap: float = 0.4) -> list[tuple[float, Message]]:
    shapes = ([0, 4, 7, 12], [0, 3, 7, 10], [0, 5, 9, 14], [0, 7, 12, 16])
    out = []
    for i in range(n):
        root = rng.randrange(40, 56)
        out += chord(start + i * gap, [root + s for s in rng.choice(shapes)], rng, dur=gap * 0.75)
    return out


def run_notes(n: int, rng: random.Random, start: float = 0.0, rate: float = 20.0) -> list[tuple[float, Message]]:
    """A scale run up and down at ``rate`` notes/s, legato."""
    scale = [0, 2, 4, 5, 7, 9, 11]
    base = rng.randrange(52, 60)
    pitches = [base + 12 * (i // 7) + scale[i % 7] for i in range(8)]
    line = (pitches + pitches[-2:0:-1]) * (n // 14 + 1)
    return [m for i, p in enumerate(line[:n]) for m in _note(start + i / rate, p, 0.9 / rate)]


def bursts(n: int, rng: random.Random, start: float = 0.0, size: int = 8) -> list[tuple[float, Message]]:
    """Groups of ``size`` notes 5 ms apart (a glissando, a flam), 0.5 s between groups."""
    out = []
    for g in range(n // size):
        at = start + g * 0.5
        pitches = rng.sample(range(LOW, HIGH), size)
        out += [m for i, p in enumerate(pitches) for m in _note(at + i * 0.005, p, 0.15)]
    return out


SECTIONS = ("single notes", "chords", "runs", "bursts")


def realistic(total: int, rng: random.Random, starts: list[float] | None = None) -> list[tuple[float, Message]]:
    """``total`` notes: a quarter each of single notes (8/s), four-note chords,
    runs at 20 notes/s and bursts (:data:`SECTIONS`), one section after
    another; the start time of each is appended to ``starts``."""
    q = total // 4
    sections, at = [], 0.0
    for make in (lambda s: single_notes(q, 8.0, rng, s), lambda s: chords(q // 4, rng, s),
                 lambda s: run_notes(q, rng, s), lambda s: bursts(q, rng, s)):
        part = make(at)
        sections += part
        if starts is not None:
            starts.append(at)
        at = max(t for t, _ in part) + 0.3
    return sorted(sections, key=lambda e: e[0])


def by_section(schedule: list[tuple[float, Message]], starts: list[float],
               ms: dict[int, float]) -> dict[str, list[float]]:
    """The latencies ``ms`` ({index in ``schedule``: ms}) of each section of :func:`realistic`."""
    out: dict[str, list[float]] = {name: [] for name in SECTIONS}
    for i, value in ms.items():
        out[SECTIONS[bisect.bisect_right(starts, schedule[i][0]) - 1]].append(value)
    return out


def rate_steps(rate: float, seconds: float, rng: random.Random) -> list[tuple[float, Message]]:
    """``rate`` notes/s for ``seconds``, each note held for two gaps (two sound at once)."""
    n = int(rate * seconds)
    gap = 1.0 / rate
    schedule = [m for i in range(n) for m in _note(i * gap, LOW + (i * 7) % (HIGH - LOW), min(0.1, 2 * gap))]
    return sorted(schedule, key=lambda e: e[0])


# --- measuring ------------------------------------------------------------------------


def is_on(msg: Message) -> bool:
    return len(msg) == 3 and msg[0] & 0xF0 == NOTE_ON and msg[2] > 0


def is_off(msg: Message) -> bool:
    return len(msg) == 3 and (msg[0] & 0xF0 == NOTE_OFF or (msg[0] & 0xF0 == NOTE_ON and msg[2] == 0))


def sounding_after(events) -> dict[tuple[str, int, int], int]:
    """(port, channel, pitch) -> note-ons not yet ended; All Notes Off (CC 123)
    and All Sound Off (CC 120) end every note of their port and channel."""
    count: dict[tuple[str, int, int], int] = defaultdict(int)
    for label, msg, _t in events:
        ch = msg[0] & 0x0F
        if is_on(msg):
            count[(label, ch, msg[1])] += 1
        elif is_off(msg) and count.get((label, ch, msg[1])):
            count[(label, ch, msg[1])] -= 1
        elif len(msg) == 3 and msg[0] & 0xF0 == CC and msg[1] in (120, 123):
            for key in [k for k in count if k[0] == label and k[1] == ch]:
                count[key] = 0
    return {k: v for k, v in count.items() if v}


def stuck_on(arrived, label: str) -> int:
    """Notes left sounding on input ``label`` (see :func:`sounding_after`)."""
    return sum(sounding_after([e for e in arrived if e[0] == label]).values())


def offs_reported(stuck: dict[tuple[str, int, int], int], osc: list[tuple[str, tuple]]) -> int:
    """How many of the ``stuck`` notes (``sounding_after`` of the merged
    input; channel n is part n) coplayer reported, on its OSC note feed, as
    ended: those note-offs left coplayer and were lost after it (in JACK)."""
    ons, offs = defaultdict(int), defaultdict(int)
    for address, args in osc:
        if address == "/coplayer/note" and len(args) == 3:
            (offs if args[2] == 0 else ons)[(args[0], args[1])] += 1
    reported = 0
    for (_label, ch, pitch), n in stuck.items():
        if ch < len(PARTS):
            key = (PARTS[ch], pitch)
            reported += min(n, max(0, offs[key] - (ons[key] - n)))
    return reported


def match(sent: list[tuple[int, Message]], arrived, labels) -> dict[int, float]:
    """{index in ``sent`` of a note-on: ms until it arrived on ``labels``}.
    An arrival matches the latest unmatched note-on of its pitch sent before
    it, so one lost note does not shift the others."""
    sends: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, (t, msg) in enumerate(sent):
        if is_on(msg):
            sends[msg[1]].append((t, i))
    found = {}
    for label, msg, t in sorted(arrived, key=lambda e: e[2]):
        if label not in labels or not is_on(msg) or not sends.get(msg[1]):
            continue
        times = sends[msg[1]]
        k = bisect.bisect_right(times, (t, len(sent))) - 1
        if k >= 0:
            t_sent, i = times.pop(k)
            found[i] = (t - t_sent) / 1e6
    return found


def latencies(sent: list[tuple[int, Message]], arrived, labels=PARTS) -> tuple[list[float], int, int]:
    """(ms to coplayer's parts of each note-on, notes lost by coplayer, notes
    lost by JACK itself).  A note the single-hop input ("hop") did not get
    either is JACK's loss (or the sender's), not coplayer's; without that
    input every missing note counts as coplayer's."""
    e2e = match(sent, arrived, labels)
    ons = [i for i, (_, m) in enumerate(sent) if is_on(m)]
    has_hop = any(e[0] == "hop" for e in arrived)
    hop = match(sent, arrived, ("hop",)) if has_hop else {i: 0.0 for i in ons}
    lost = sum(1 for i in ons if i in hop and i not in e2e)
    return list(e2e.values()), lost, sum(1 for i in ons if i not in hop)


def _skipped_text(cp: int | None, bench: int | None) -> str:
    """Cycles of JACK's frame time each side's clients did not see.  A client
    late in the graph makes the clients after it miss those cycles too, so
    both sides often show them; cycles that coplayer's client alone missed
    are ones where notes sent to it were lost in JACK."""
    if cp is None and bench is None:
        return ""
    unknown = "?"
    return (f"; cycles JACK skipped: coplayer's client {unknown if cp is None else cp}, "
            f"the bench's {unknown if bench is None else bench}")


def lost_alone(sent: list[tuple[int, Message]], arrived) -> int:
    """Note-ons that the single hop and the bare loop both delivered and
    coplayer did not: its own losses.  The bare loop takes the same two JACK
    hops; a note it lost in the same moments may have been lost in JACK."""
    got = [match(sent, arrived, labels) for labels in ((MERGED,), ("hop",), ("floor",))]
    return sum(1 for i, (_, m) in enumerate(sent) if is_on(m) and i not in got[0] and i in got[1] and i in got[2])


@dataclass
class Result:
    e2e_ms: list[float]
    floor_ms: list[float]
    notes: int
    lost: int
    stuck: int
    max_notes_per_s: int
    steps: list[dict]
    jack_lost: int = 0  # notes the single JACK hop lost too (not counted in ``lost``)
    hop_ms: list[float] = field(default_factory=list)
    floor_lost: int = 0  # notes the bare loop lost
    stuck_reported_off: int = 0  # stuck notes whose note-off coplayer reported sending (OSC)
    backend: str = ""  # "jack" (coplayer's JACK client) or "rtmidi"
    sections: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # name: (e2e, floor)
    decision: tuple | None = None  # coplayer's own /coplayer/stats after the realistic notes: p50, p99, max ms, ...
    xruns: int | None = None  # xruns JACK reported while the realistic notes played (None: cannot tell)
    max_lossless_notes_per_s: int = 0  # highest rate with no message lost or note left sounding
    # Cycles JACK skipped the callback of (coplayer's input client, the bench's
    # clients) while the realistic notes played: MIDI sent in one is lost in JACK.
    skipped: tuple = (None, None)
    floor_stuck: int = 0  # notes the bare loop left sounding
    # note-offs coplayer's outputs wrote again after xruns (the safety net) while
    # the realistic notes played (None: cannot tell)
    resent: int | None = None
    dropped_late: int | None = None  # note-ons coplayer dropped as too late meanwhile (counted in ``lost``)

    def figures(self) -> dict:
        e, f = summary(self.e2e_ms), summary(self.floor_ms)
        return {"e2e_p50_ms": round(e["p50"], 3), "e2e_p99_ms": round(e["p99"], 3), "e2e_max_ms": round(e["max"], 3),
                "floor_p50_ms": round(f["p50"], 3), "floor_p99_ms": round(f["p99"], 3), "notes": self.notes,
                "lost": self.lost, "stuck": self.stuck, "max_notes_per_s": self.max_notes_per_s,
                "jitter_ms": round(e["p99"] - e["p50"], 3), "floor_jitter_ms": round(f["p99"] - f["p50"], 3),
                "backend": self.backend, "xruns": self.xruns, "resent": self.resent, "floor_lost": self.floor_lost,
                "dropped_late": self.dropped_late,
                "floor_stuck": self.floor_stuck,
                "max_lossless_notes_per_s": self.max_lossless_notes_per_s}

    def report(self) -> list[str]:
        e, f = summary(self.e2e_ms), summary(self.floor_ms)

        def line(label: str, ms: list[float]) -> str:
            s = summary(ms)
            return (f"{label} ({len(ms)} notes): p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms, "
                    f"max {s['max']:.3f} ms, jitter {s['p99'] - s['p50']:.3f} ms")

        lines = [
            line("end to end        ", self.e2e_ms),
            line("floor (bare loop) ", self.floor_ms),
            line("one JACK hop      ", self.hop_ms),
            f"over the floor: p50 +{e['p50'] - f['p50']:.3f} ms, p99 +{e['p99'] - f['p99']:.3f} ms; "
            f"lost {self.lost}, stuck {self.stuck} of {self.notes} "
            f"({self.stuck_reported_off} of the stuck ended by coplayer, per its OSC feed: lost after it) "
            f"(and {self.jack_lost} lost by the single hop too; the bare loop lost {self.floor_lost}, "
            f"left {self.floor_stuck} sounding)",
        ]
        if self.xruns is not None:
            lines.append(f"JACK xruns while the notes played: {self.xruns} "
                         "(a client late in a cycle; JACK may drop MIDI in one)"
                         + _skipped_text(*self.skipped)
                         + ("" if self.resent is None else
                            f"; coplayer's outputs wrote {self.resent} note-offs again after them (safety net)"))
        if self.dropped_late:
            lines.append(f"of the notes lost, coplayer dropped {self.dropped_late} as too late "
                         "(they reached it past the latency budget plus one JACK period)")
        if self.decision:
            lines.append(f"coplayer's own decision time (arrival stamp to send, {self.decision[3]} notes): "
                         f"p50 {self.decision[0]:.3f} ms, p99 {self.decision[1]:.3f} ms, max {self.decision[2]:.3f} ms")
        for name, (e2e, floor) in self.sections.items():
            if e2e and floor:
                s, b = summary(e2e), summary(floor)
                lines.append(f"  {name:<13} end to end p50 {s['p50']:.3f} p99 {s['p99']:.3f} ms, "
                             f"floor p50 {b['p50']:.3f} p99 {b['p99']:.3f} ms")
        for s in self.steps:
            alone = f" ({s['lost_alone']} of them the bare loop delivered)" if s["lost"] and "lost_alone" in s else ""
            lines.append(f"  {s['rate']:>5} notes/s: {s['notes']} notes, lost {s['lost']}{alone}, stuck {s['stuck']}, "
                         f"fallback {s['misses']}, p99 {s['p99_ms']:.3f} ms"
                         + (f" (and {s['jack_lost']} lost by the single hop too)" if s.get("jack_lost") else "")
                         + (f" (the bare loop: lost {s['floor_lost']}, stuck {s['floor_stuck']})"
                            if s.get("floor_lost") or s.get("floor_stuck") else "")
                         + (f", {s['xruns']} JACK xruns" if s.get("xruns") is not None else "")
                         + (f", {s['resent']} note-offs sent again" if s.get("resent") is not None else "")
                         + (f", {s['dropped_late']} dropped as too late" if s.get("dropped_late") else "")
                         + _skipped_text(s.get("cp_skipped"), s.get("bench_skipped"))
                         + f" -> {'ok' if s['ok'] else 'FAIL'}")
        lines.append(f"highest sustained rate with no loss and no fallback: {self.max_notes_per_s} notes/s; "
                     f"with no loss: {self.max_lossless_notes_per_s} notes/s")
        return lines


def _section(peer: Peer, schedule) -> tuple[list[tuple[int, Message]], list, int | None]:
    """Play a schedule; (sent, what arrived meanwhile after the stragglers,
    JACK's xruns meanwhile or None if the backend cannot tell)."""
    since, xruns = now_ns(), peer.xruns()
    sent = peer.play(schedule)
    peer.wait_quiet()
    after = peer.xruns()
    return sent, peer.events(since_ns=since), None if xruns is None or after is None else after - xruns


def _skipped(before: tuple, after: tuple) -> tuple:
    """Cycles JACK skipped (coplayer's client, the bench's) between two
    readings of (coplayer's, the bench's) counts; None where unknown."""
    return tuple(None if a is None or b is None else b - a for a, b in zip(before, after))


def _since(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def _step(peer: Peer, stats: StatsListener, rate: int, rng: random.Random) -> dict:
    before = stats.fresh_stats()
    skipped, resent, late = (stats.skipped(), peer.skipped()), stats.resent(), stats.dropped_late()
    sent, arrived, xruns = _section(peer, rate_steps(rate, STEP_S, rng))
    after = stats.fresh_stats()
    cp_skipped, bench_skipped = _skipped(skipped, (stats.skipped(), peer.skipped()))
    resent, late = _since(resent, stats.resent()), _since(late, stats.dropped_late())
    ms, lost, jack_lost = latencies(sent, arrived, (MERGED,))
    misses = (after[4] - before[4]) if before and after else -1
    stuck = stuck_on(arrived, MERGED)
    # The bare loop hears the step too: a loss it shares in the same xruns is JACK's on this machine.
    _, floor_lost, _ = latencies(sent, arrived, ("floor",))
    floor_stuck = stuck_on(arrived, "floor")
    return {"rate": rate, "notes": sum(is_on(m) for _, m in sent), "lost": lost, "jack_lost": jack_lost, "stuck": stuck,
            "misses": misses, "xruns": xruns, "floor_lost": floor_lost, "floor_stuck": floor_stuck,
            "cp_skipped": cp_skipped, "bench_skipped": bench_skipped, "lost_alone": lost_alone(sent, arrived),
            "resent": resent, "dropped_late": late,
            "p99_ms": summary(ms)["p99"], "ok": lost == 0 and stuck == 0 and misses == 0}


def bench(notes: int = 2000, rates=RATES, seed: int = 0, progress=None, backend: str = "auto") -> Result:
    """Run the whole benchmark against a fresh coplayer process; every
    process (coplayer, the pass-through, the bench) opens its ports with
    ``backend`` (see :mod:`coplayer.io.real`)."""
    if not jack_available():
        raise BenchError("no JACK server runs: start one, e.g. `jackd --no-realtime -d dummy -r 48000 -p 64`")
    say = progress or (lambda _msg: None)
    rng = random.Random(seed)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the readers timestamp promptly while the sender works
    from coplayer.io.real import choose

    backend = choose(backend, "jack")
    say(f"ports: {'coplayer' + chr(39) + 's JACK client' if backend == 'jack' else 'python-rtmidi (JACK)'}")
    cp = CoplayerProcess(backend=backend, settings={"latency.stats_interval_s": 0.2})
    thru = ThruProcess(backend=backend)
    stats = StatsListener(cp.osc_out)
    peer = None
    try:
        cp.start()
        thru.start()
        peer = Peer(backend=backend)
        peer.attach(cp, thru, merge=True)  # 4 JACK clients, not 9: each python-rtmidi port is one
        time.sleep(0.3)
        say(f"playing {notes} notes (single notes, chords, runs at 20/s, bursts)")
        osc_from = len(stats.messages)
        stats.fresh_stats()
        skipped, resent, late = (stats.skipped(), peer.skipped()), stats.resent(), stats.dropped_late()
        starts: list[float] = []
        schedule = realistic(notes, rng, starts)
        sent, arrived, xruns = _section(peer, schedule)
        e2e, lost, jack_lost = latencies(sent, arrived, (MERGED,))
        floor = match(sent, arrived, ("floor",))
        e2e_by, floor_by = (by_section(schedule, starts, match(sent, arrived, labels))
                            for labels in ((MERGED,), ("floor",)))
        decision = stats.fresh_stats()
        skipped = _skipped(skipped, (stats.skipped(), peer.skipped()))
        resent, late = _since(resent, stats.resent()), _since(late, stats.dropped_late())
        hop = match(sent, arrived, ("hop",))
        sounding = sounding_after([e for e in arrived if e[0] == MERGED])
        stuck = sum(sounding.values())
        floor_stuck = stuck_on(arrived, "floor")
        reported = offs_reported(sounding, stats.messages[osc_from:])
        # Steps go on while nothing is lost: the highest rate with no fallback
        # either, and the highest with no loss (the fallback may route some).
        steps, best, lossless, clean = [], 0, 0, True
        for rate in rates:
            say(f"{rate} notes/s for {STEP_S:g} s")
            step = _step(peer, stats, rate, rng)
            steps.append(step)
            if step["lost"] or step["stuck"]:
                break
            lossless = rate
            clean = clean and step["ok"]
            if clean:
                best = rate
        return Result(e2e, list(floor.values()), sum(is_on(m) for _, m in sent), lost, stuck, best, steps, jack_lost,
                      list(hop.values()), sum(1 for i in hop if i not in floor), reported, backend,
                      {name: (e2e_by[name], floor_by[name]) for name in SECTIONS}, decision, xruns, lossless, skipped,
                      floor_stuck, resent, late)
    finally:
        if peer is not None:
            peer.close()
        thru.stop()
        cp.stop()
        stats.close()
        sys.setswitchinterval(switch)


# --- the histogram ------------------------------------------------------------------


def histogram_png(result: Result, path: str | os.PathLike, width: int = 640, height: int = 320) -> None:
    """Both latency distributions on one histogram (floor grey, end to end blue)."""
    from coplayer.plot import draw_text, write_png

    img = np.full((height, width, 3), 255, dtype=np.uint8)
    pad, top = 40, 30
    data = [(result.floor_ms, (150, 150, 150)), (result.e2e_ms, (40, 90, 200))]
    every = [x for ms, _ in data for x in ms]
    if not every:
        write_png(path, img)
        return
    hi = max(float(np.percentile(every, 99.9)) * 1.1, 0.5)
    bins = np.linspace(0.0, hi, 61)
    counts = [np.histogram(np.clip(ms, 0, hi), bins)[0] for ms, _ in data]
    peak = max(int(c.max()) for c in counts) or 1
    plot_w, plot_h = width - 2 * pad, height - top - pad
    bar_w = plot_w / (len(bins) - 1)
    for (_, colour), c in zip(data, counts):
        for i, n in enumerate(c):
            h = int(round(plot_h * n / peak))
            if h:
                x0 = pad + int(i * bar_w)
                x1 = max(x0 + 1, pad + int((i + 1) * bar_w) - 1)
                img[top + plot_h - h:top + plot_h, x0:x1] = colour
    img[top + plot_h, pad:pad + plot_w] = 0
    draw_text(img, pad, 8, "latency ms: floor (grey) vs end to end (blue)", 0)
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + int(frac * (plot_w - 1))
        img[top + plot_h:top + plot_h + 4, x] = 0
        draw_text(img, max(0, x - 10), top + plot_h + 8, f"{frac * hi:.2f}", 0)
    write_png(path, img)


def _exit_on_sigterm():
    """SIGTERM unwinds like Ctrl-C, so that bench() stops the coplayer and
    pass-through processes it started instead of leaving them running."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        return None


def main(notes: int = 2000, as_json: bool = False, png: str | None = None, stream=None,
         backend: str = "auto") -> int:
    """``coplayer bench``."""
    stream = stream if stream is not None else sys.stdout
    say = None if as_json else (lambda msg: print(msg, file=stream, flush=True))
    previous = _exit_on_sigterm()
    try:
        result = bench(notes, progress=say, backend=backend)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if png:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        histogram_png(result, png)
    if as_json:
        print(json.dumps(result.figures()), file=stream)
    else:
        print("\n".join(result.report()), file=stream)
        if png:
            print(f"wrote {png}", file=stream)
    return 0
