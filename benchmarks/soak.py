"""Soak: a long, realistic session through JACK, coplayer beside the bare loop.

    python benchmarks/soak.py --minutes 10 [--rate 40] [--seed 0] [--json] [--load]
                              [--bucket-s 60] [--sample-s 5] [--warmup-s 60]
                              [--mode both] [--set KEY=VALUE ...]

Starts ``coplayer run --api jack`` (mode ``both``: it instruments the notes
and answers in the rests; ``--set`` changes its configuration as ``coplayer
run --set`` does) and the bare loop (``python -m coplayer.io.thru``)
as separate processes, with the pieces of ``coplayer bench``
(:mod:`coplayer.bench`), and plays into both, for ``--minutes``, a seeded
stream of phrases at 30-50 MIDI messages a second (``--rate`` is their
mean): chords of three to five keys, the sustain pedal (CC 64) down over a
few chords, mod wheel (CC 1) sweeps and pitch bends over held chords, scale
runs, with rests between phrases, some long enough for coplayer to answer.

Every ``--sample-s`` it reads coplayer's and the bare loop's resident
memory (VmRSS, /proc/PID/status) and processor time (utime + stime,
/proc/PID/stat), the xruns JACK reported to the bench's client and to
coplayer's (its OSC ``/coplayer/ports``) and coplayer's fallback count (its
``/coplayer/stats``).  Per ``--bucket-s`` (a minute) it reports the notes
played, the end-to-end latency p50/p99 of coplayer and of the bare loop
(the bench's matching: each note-on sent, to its arrival), the notes each
lost, xruns and CPU.  At the end, once every key and the pedal are up and
nothing has arrived for a while, it counts the notes left sounding at the
listening client, per (port, channel, key), for coplayer's outputs (its
answers included) and for the bare loop, before coplayer exits (its exit
sends All Notes Off, which would hide them).

Targets (issue 21): resident memory grows less than 2 MB after the warm-up,
the last bucket's p99 is at most 10 % above the first's, no note stuck.
``--load`` adds another JACK load beside: a chain of two more bare loops fed
by the same notes.  Needs a running JACK server, e.g.
``jackd -R -P 70 -d dummy -r 48000 -p 64``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from coplayer.bench import (
    CC, OUTPUTS, BenchError, CoplayerProcess, Peer, StatsListener, ThruProcess, _exit_on_sigterm, chord, is_on,
    jack_available, jack_connect, match, offs_reported, run_notes, sounding_after, stuck_on,
)
from coplayer.engine.stats import summary
from coplayer.io.ports import Message, now_ns

PITCH_BEND = 0xE0
MOD_WHEEL, SUSTAIN = 1, 64
SHAPES = ([0, 4, 7], [0, 3, 7], [0, 4, 7, 12], [0, 3, 7, 10], [0, 5, 9, 14], [0, 4, 7, 11, 14])
PHRASE_S = (4.0, 12.0)
BREATH_S = (0.3, 1.0)  # shorter than coplayer's pause (2 beats, 1.2 s at 100 BPM): no answer
REST_S = (4.0, 7.0)  # long enough for an answer to start on the next bar line
ANSWER_EVERY = 0.4  # share of the rests that are long
PLAYED_AFTER_S = 0.3  # arrivals this long after a phrase still belong to it (the rest are answers)
QUIET_S = 5.5  # at the end: nothing arrived for this long (an answer is 2 bars, 4.8 s at 100 BPM)
QUIET_TIMEOUT_S = 40.0
EXIT_LINES = ("decision latency per note:", "answers:")  # what `coplayer run` prints as it exits
TARGET_RSS_MB = 2.0
TARGET_P99_RATIO = 1.10

Schedule = list[tuple[float, Message]]


# --- the session played ---------------------------------------------------------------


def _chord_keys(rng: random.Random) -> list[int]:
    root = rng.randrange(40, 60)
    return [root + s for s in rng.choice(SHAPES)]


def chord_gesture(at: float, rate: float, rng: random.Random) -> tuple[Schedule, float]:
    """One chord; (its messages, when the next gesture starts)."""
    keys = _chord_keys(rng)
    slot = 2 * len(keys) / rate
    return chord(at, keys, rng, dur=0.75 * slot), at + slot


def controller_gesture(at: float, rate: float, rng: random.Random) -> tuple[Schedule, float]:
    """A chord held while the mod wheel sweeps up and back to 0, or the pitch
    bends and comes back to the centre."""
    keys = _chord_keys(rng)
    n = rng.randrange(6, 13)
    slot = (2 * len(keys) + n) / rate
    if rng.random() < 0.5:
        values = [round(127 * math.sin(math.pi * (i + 1) / (n + 1))) for i in range(n - 1)] + [0]
        moves = [(CC, MOD_WHEEL, v) for v in values]
    else:
        depth = rng.choice((-1, 1)) * rng.randrange(1024, 8191)
        bends = [8192 + round(depth * math.sin(math.pi * (i + 1) / n)) for i in range(n - 1)] + [8192]
        moves = [(PITCH_BEND, b & 0x7F, b >> 7) for b in bends]
    held = chord(at, keys, rng, dur=0.8 * slot)  # released (+ up to 20 ms) before the next gesture
    return held + [(at + 0.8 * slot * (i + 1) / n, m) for i, m in enumerate(moves)], at + slot


def run_gesture(at: float, rate: float, rng: random.Random) -> tuple[Schedule, float]:
    """A legato scale run, one note every two messages' time."""
    n = rng.randrange(6, 15)
    return run_notes(n, rng, at, rate / 2), at + 2 * n / rate


def pedal_gesture(at: float, rate: float, rng: random.Random) -> tuple[Schedule, float]:
    """The sustain pedal down over two to four chords, then up."""
    out, t = [(at, (CC, SUSTAIN, 127))], at + 1 / rate
    for _ in range(rng.randrange(2, 5)):
        events, t = chord_gesture(t, rate, rng)
        out += events
    return out + [(t, (CC, SUSTAIN, 0))], t + 1 / rate


GESTURES = ((chord_gesture, 5), (pedal_gesture, 2), (controller_gesture, 2), (run_gesture, 1))


@dataclass
class Session:
    schedule: Schedule  # (seconds from the start, message), in time order
    phrases: list[tuple[float, float]]  # (start, end) of each phrase, seconds


def session(seconds: float, rate: float, rng: random.Random) -> Session:
    """Phrases of 4-12 s at 0.75-1.25 times ``rate`` messages/s, until
    ``seconds``; between them a breath (no answer) or, four times in ten, a
    rest in which coplayer answers.  Every key, the pedal, the wheel and the
    bend are released within their phrase."""
    makers, weights = zip(*GESTURES)
    out, phrases, at = [], [], 0.0
    while at < seconds - PHRASE_S[0]:
        end, pace = min(seconds, at + rng.uniform(*PHRASE_S)), rate * rng.uniform(0.75, 1.25)
        start, last = at, at
        while at < end:
            events, at = rng.choices(makers, weights)[0](at, pace, rng)
            out += events
            last = max(last, *(t for t, _ in events))
        phrases.append((start, last))
        at = phrases[-1][1] + rng.uniform(*(REST_S if rng.random() < ANSWER_EVERY else BREATH_S))
    return Session(sorted(out, key=lambda e: e[0]), phrases)


def in_phrases(t_s: float, phrases: list[tuple[float, float]]) -> bool:
    """Whether ``t_s`` falls in a phrase (or up to :data:`PLAYED_AFTER_S` after it)."""
    k = bisect.bisect_right([s for s, _ in phrases], t_s) - 1
    return k >= 0 and t_s <= phrases[k][1] + PLAYED_AFTER_S


# --- processes: memory and processor time ---------------------------------------------------


def rss_kb(status: str) -> int | None:
    """VmRSS of a /proc/PID/status text, in kB (None if absent: a kernel thread, a zombie)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def cpu_ticks(stat: str) -> int:
    """utime + stime of a /proc/PID/stat text, in clock ticks.  The command
    name (field 2, in parentheses) may hold spaces and parentheses: the
    fields are counted after its last ')'."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15; field 3 (state) is fields[0]


def read_process(pid: int) -> tuple[int | None, float | None]:
    """(resident kB, processor seconds) of a live process, else (None, None)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None, None
    return rss_kb(status), cpu_ticks(stat) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t_s: float
    rss_kb: int | None  # coplayer
    cpu_s: float | None
    thru_rss_kb: int | None  # the bare loop
    thru_cpu_s: float | None
    xruns: int | None  # reported to the bench's JACK client (None: cannot tell)
    cp_xruns: int | None  # reported to coplayer's input (its OSC feed)
    misses: int | None  # coplayer's fallback decisions (its OSC feed)


class Sampler:
    """Takes a :class:`Sample` every ``every_s`` on a thread of its own."""

    def __init__(self, coplayer_pid: int, thru_pid: int, peer: Peer, stats: StatsListener, origin_ns: int,
                 every_s: float, on_sample=None) -> None:
        self.samples: list[Sample] = []
        self._pids, self._peer, self._stats, self._origin = (coplayer_pid, thru_pid), peer, stats, origin_ns
        self._every, self._on_sample = every_s, on_sample or (lambda _s: None)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def sample(self) -> Sample:
        (rss, cpu), (thru_rss, thru_cpu) = (read_process(pid) for pid in self._pids)
        ports, stats = self._stats.ports, self._stats.stats
        s = Sample((now_ns() - self._origin) / 1e9, rss, cpu, thru_rss, thru_cpu, self._peer.xruns(),
                   ports[0] if ports and ports[0] >= 0 else None, stats[4] if stats else None)
        self.samples.append(s)
        self._on_sample(s)
        return s

    def _run(self) -> None:
        while not self._done.wait(self._every):
            self.sample()

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> Sample:
        """Stops the thread; takes and returns one last sample."""
        self._done.set()
        self._thread.join()
        return self.sample()


def change(samples: list[Sample], key: str, t0: float, t1: float) -> tuple[float, float] | None:
    """(change of ``key``, seconds) between the latest samples at or before
    ``t0`` and ``t1`` (the first sample if none is that early); None where
    ``key`` is unknown at either end or no time passed."""
    times = [s.t_s for s in samples]
    a = samples[max(0, bisect.bisect_right(times, t0) - 1)]
    z = samples[max(0, bisect.bisect_right(times, t1) - 1)]
    va, vz = getattr(a, key), getattr(z, key)
    if va is None or vz is None or z.t_s <= a.t_s:
        return None
    return vz - va, z.t_s - a.t_s


def cpu_percent(samples: list[Sample], key: str, t0: float, t1: float) -> float | None:
    """Processor time used between ``t0`` and ``t1`` per wall-clock second, in % of one core."""
    d = change(samples, key, t0, t1)
    return None if d is None else 100.0 * d[0] / d[1]


def rss_growth(samples: list[Sample], key: str, warmup_s: float) -> dict:
    """Resident memory (kB) at the first sample after the warm-up, at the end,
    its most after the warm-up, and the growth from warm-up end to end in MB."""
    after = [getattr(s, key) for s in samples if s.t_s >= warmup_s and getattr(s, key) is not None]
    if not after:
        return {"warm_kb": None, "end_kb": None, "max_kb": None, "growth_mb": None}
    return {"warm_kb": after[0], "end_kb": after[-1], "max_kb": max(after),
            "growth_mb": round((after[-1] - after[0]) / 1024, 3)}


# --- per bucket (minute) ----------------------------------------------------------------------


def bucket_of(t_s: float, width_s: float, count: int) -> int:
    """The bucket of width ``width_s`` that ``t_s`` falls in; times past the
    last bucket (the end's stragglers) belong to it."""
    return min(max(int(t_s // width_s), 0), count - 1)


def bucket_count(seconds: float, width_s: float) -> int:
    """Buckets of ``width_s`` covering ``seconds``; a last part shorter than
    half a bucket joins the one before (too few notes for a p99 of its own)."""
    whole, rest = divmod(seconds, width_s)
    return max(1, int(whole) + (1 if rest >= width_s / 2 else 0))


def _p(ms: list[float], q: str) -> float | None:
    return round(summary(ms)[q], 3) if ms else None


def per_bucket(sent: list[tuple[int, Message]], arrived, origin_ns: int, samples: list[Sample], seconds: float,
               width_s: float, phrases: list[tuple[float, float]] = ()) -> list[dict]:
    """Per bucket: note-ons sent, coplayer's and the bare loop's end-to-end
    p50/p99 (ms), the notes each lost (that the single hop delivered, as
    ``coplayer bench`` counts them), coplayer's answers (its note-ons outside
    the ``phrases``, by arrival), xruns (the bench's client, coplayer's
    input), coplayer's fallback decisions and CPU % (coplayer, bare loop).
    The last bucket's xruns and CPU run to the last message sent (the wait
    for the last answer after it is not counted)."""
    n = bucket_count(seconds, width_s)
    rows = _note_rows(sent, arrived, origin_ns, width_s, n, phrases)
    end_s = max(seconds, (sent[-1][0] - origin_ns) / 1e9) if sent else seconds
    for b, row in enumerate(rows):
        row.update(_sampled(samples, b * width_s, (b + 1) * width_s if b < n - 1 else end_s))
    return rows


def _note_rows(sent, arrived, origin_ns: int, width_s: float, n: int, phrases) -> list[dict]:
    """The note figures of :func:`per_bucket`, per bucket."""
    e2e, floor, hop = (match(sent, arrived, labels) for labels in (OUTPUTS, ("floor",), ("hop",)))
    rows = [{"bucket": b, "start_s": b * width_s, "notes": 0, "lost": 0, "floor_lost": 0, "jack_lost": 0,
             "answers": 0} for b in range(n)]
    ms = [([], []) for _ in range(n)]  # (coplayer's, the bare loop's)
    for i, (t, msg) in enumerate(sent):
        if is_on(msg):
            b = bucket_of((t - origin_ns) / 1e9, width_s, n)
            row = rows[b]
            row["notes"] += 1
            ms[b][0].extend([e2e[i]] if i in e2e else [])
            ms[b][1].extend([floor[i]] if i in floor else [])
            row["lost"] += i in hop and i not in e2e
            row["floor_lost"] += i in hop and i not in floor
            row["jack_lost"] += i not in hop
    for label, msg, t in arrived:
        t_s = (t - origin_ns) / 1e9
        if label in OUTPUTS and is_on(msg) and not in_phrases(t_s, phrases):
            rows[bucket_of(t_s, width_s, n)]["answers"] += 1
    for row, (e, f) in zip(rows, ms):
        row.update(e2e_p50_ms=_p(e, "p50"), e2e_p99_ms=_p(e, "p99"), floor_p50_ms=_p(f, "p50"),
                   floor_p99_ms=_p(f, "p99"))
    return rows


def _sampled(samples: list[Sample], t0: float, t1: float) -> dict:
    """The sampled figures of :func:`per_bucket` between ``t0`` and ``t1``."""
    out = {}
    for key in ("xruns", "cp_xruns", "misses"):
        d = change(samples, key, t0, t1)
        out[key] = None if d is None else int(d[0])
    for key, name in (("cpu_s", "cpu_pct"), ("thru_cpu_s", "thru_cpu_pct")):
        pct = cpu_percent(samples, key, t0, t1)
        out[name] = None if pct is None else round(pct, 1)
    return out


# --- targets --------------------------------------------------------------------------------


def targets(rss_growth_mb: float | None, p99_first: float | None, p99_last: float | None, stuck: int) -> dict:
    """Issue 21's targets, each True (holds), False (fails) or None (not
    measured): resident memory grows less than 2 MB after the warm-up; the
    last bucket's p99 at most 10 % above the first's (lower is fine); no
    note stuck."""
    ratio = None if not p99_first or p99_last is None else p99_last / p99_first
    return {"rss_growth": None if rss_growth_mb is None else rss_growth_mb < TARGET_RSS_MB,
            "p99_last_vs_first": None if ratio is None else ratio <= TARGET_P99_RATIO,
            "no_stuck": stuck == 0}


# --- the run ----------------------------------------------------------------------------------


class Drain:
    """Reads a process's output as it comes (a full pipe would block the
    process in a long run); :attr:`text` is what it printed."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, name="soak-drain", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            self.lines.append(line)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def stop_process(proc: subprocess.Popen | None, drain: Drain | None, timeout_s: float = 15.0) -> int | None:
    """SIGTERM, wait (kill after ``timeout_s``), read the rest of its output; the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if drain is not None:
        drain.join(5.0)
    return proc.returncode


def _load_chain(peer: Peer, out_port: str, backend: str) -> list[ThruProcess]:
    """Two more bare loops in a chain fed by the bench's output, ending at its input "load"."""
    chain = [ThruProcess(backend=backend).start() for _ in range(2)]
    jack_connect(out_port, chain[0].ports["in"])
    jack_connect(chain[0].ports["out"], chain[1].ports["in"])
    jack_connect(chain[1].ports["out"], peer.listen("load"))
    return chain


@dataclass
class Soak:
    minutes: float
    rate: float
    seed: int
    load: bool
    bucket_s: float
    mode: str
    settings: dict
    warmup_s: float
    events: int = 0  # MIDI messages sent
    notes: int = 0  # note-ons sent
    playing_s: float = 0.0  # time in phrases
    answers: int = 0  # coplayer's note-ons outside the phrases: its answers
    buckets: list[dict] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    rss: dict = field(default_factory=dict)
    thru_rss: dict = field(default_factory=dict)
    lost: int = 0
    floor_lost: int = 0
    jack_lost: int = 0
    load_lost: int | None = None
    stuck: dict = field(default_factory=dict)  # "port ch key" -> count, coplayer's outputs
    stuck_reported_off: int = 0
    floor_stuck: int = 0
    exit_code: int | None = None
    output_tail: str = ""

    def p99_first_last(self) -> tuple[float | None, float | None]:
        return self.buckets[0]["e2e_p99_ms"], self.buckets[-1]["e2e_p99_ms"]

    def targets(self) -> dict:
        return targets(self.rss.get("growth_mb"), *self.p99_first_last(), sum(self.stuck.values()))

    def exit_lines(self) -> list[str]:
        """What coplayer printed as it exited: its decision latency and its answers' counts."""
        return [line for line in self.output_tail.splitlines() if line.startswith(EXIT_LINES)]

    def figures(self) -> dict:
        first, last = self.p99_first_last()
        out = {k: v for k, v in asdict(self).items() if k not in ("samples", "output_tail")}
        out.update(stuck_total=sum(self.stuck.values()), p99_first_ms=first, p99_last_ms=last,
                   coplayer_exit=self.exit_lines(),
                   p99_ratio=None if not first or last is None else round(last / first, 3),
                   targets=self.targets(), samples=[asdict(s) for s in self.samples])
        return out

    def report(self) -> list[str]:
        seconds = self.minutes * 60
        sets = "".join(f", {k}={v}" for k, v in self.settings.items())
        lines = [f"soak: {self.minutes:g} min, seed {self.seed}, mode {self.mode}{sets}, {self.events} MIDI messages "
                 f"({self.events / seconds:.1f}/s overall, {self.events / max(self.playing_s, 1e-9):.1f}/s while "
                 f"playing, {self.playing_s / seconds:.0%} of the time), {self.notes} notes; "
                 f"coplayer answered with {self.answers} notes"
                 + ("; beside a chain of two more bare loops (--load)" if self.load else "")]
        lines.append(f"{'bucket':>6} {'notes':>6} {'coplayer p50/p99 ms':>20} {'bare loop p50/p99 ms':>21} "
                     f"{'lost':>5} {'bare lost':>9} {'answers':>7} {'xruns':>6} {'cp xruns':>8} {'fallback':>8} "
                     f"{'CPU %':>6} {'bare CPU %':>10}")
        for b in self.buckets:
            e2e, floor = _pair(b["e2e_p50_ms"], b["e2e_p99_ms"]), _pair(b["floor_p50_ms"], b["floor_p99_ms"])
            lines.append(f"{b['start_s']:>5.0f}s {b['notes']:>6} {e2e:>20} {floor:>21} {b['lost']:>5} "
                         f"{b['floor_lost']:>9} {b['answers']:>7} {_n(b['xruns']):>6} {_n(b['cp_xruns']):>8} "
                         f"{_n(b['misses']):>8} {_n(b['cpu_pct']):>6} {_n(b['thru_cpu_pct']):>10}")
        for name, r in (("coplayer", self.rss), ("bare loop", self.thru_rss)):
            if r.get("warm_kb") is not None:
                lines.append(f"RSS {name}: {r['warm_kb'] / 1024:.1f} MB after the warm-up ({self.warmup_s:g} s), "
                             f"{r['end_kb'] / 1024:.1f} MB at the end (most {r['max_kb'] / 1024:.1f} MB): "
                             f"growth {r['growth_mb']:+.2f} MB")
        first, last = self.p99_first_last()
        if first and last is not None:
            lines.append(f"coplayer p99: first bucket {first:.3f} ms, last {last:.3f} ms (ratio {last / first:.3f})")
        lines.append(f"lost: coplayer {self.lost}, bare loop {self.floor_lost} (and {self.jack_lost} lost by the "
                     "single hop too)" + ("" if self.load_lost is None else f"; the load chain lost {self.load_lost}"))
        stuck = sum(self.stuck.values())
        keys = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in list(self.stuck.items())[:12])
        lines.append(f"stuck at the listening client before coplayer exits: coplayer {stuck}"
                     + (f" ({keys}{', ...' if len(self.stuck) > 12 else ''}; coplayer reported sending the "
                        f"note-off of {self.stuck_reported_off})" if stuck else "")
                     + f", bare loop {self.floor_stuck}")
        if self.exit_code:
            lines.append(f"coplayer exited with {self.exit_code}: {self.output_tail.strip()[-600:]}")
        lines += [f"coplayer at exit (after the count): {line}" for line in self.exit_lines()]
        verdict = {True: "holds", False: "FAILS", None: "not measured"}
        t = self.targets()
        lines.append(f"targets: RSS growth < {TARGET_RSS_MB:g} MB after warm-up: {verdict[t['rss_growth']]}; "
                     f"last p99 within {TARGET_P99_RATIO - 1:.0%} of the first: {verdict[t['p99_last_vs_first']]}; "
                     f"0 stuck: {verdict[t['no_stuck']]}")
        return lines


def _n(value) -> str:
    return "?" if value is None else str(value)


def _pair(a, b) -> str:
    return "-" if a is None else f"{a:.3f}/{b:.3f}"


def soak(minutes: float, rate: float = 40.0, seed: int = 0, load: bool = False, bucket_s: float = 60.0,
         sample_s: float = 5.0, warmup_s: float = 60.0, mode: str = "both", settings: dict | None = None,
         progress=None) -> Soak:
    """Run the whole soak against fresh processes (see the module's text)."""
    if not jack_available():
        raise BenchError("no JACK server runs: start one, e.g. `jackd -R -P 70 -d dummy -r 48000 -p 64`")
    say = progress or (lambda _msg: None)
    seconds = minutes * 60
    plan = session(seconds, rate, random.Random(seed))
    settings = dict(settings or {})
    result = Soak(minutes, rate, seed, load, bucket_s, mode, settings, min(warmup_s, seconds / 3))
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # as the bench: the readers timestamp promptly while the sender works
    cp = CoplayerProcess(mode=mode, backend="auto", settings=settings)
    thru = ThruProcess(backend="auto")
    stats = StatsListener(cp.osc_out)
    peer, chain, drains = None, [], {}
    try:
        cp.start()
        thru.start()
        drains = {"cp": Drain(cp.proc), "thru": Drain(thru.proc)}
        peer = Peer()
        peer.attach(cp, thru)  # an input per coplayer output: pairs are per (port, channel, key)
        if load:
            chain = _load_chain(peer, peer.out_port(), "auto")
        time.sleep(0.3)
        say(f"playing {len(plan.schedule)} messages for {minutes:g} min "
            f"(RSS, CPU and xruns every {sample_s:g} s)")
        origin = now_ns()
        last_bucket = [0]

        def tell(s: Sample) -> None:
            if s.t_s >= (last_bucket[0] + 1) * bucket_s:
                last_bucket[0] = int(s.t_s // bucket_s)
                cpu = _n(None if s.cpu_s is None else round(s.cpu_s, 1))
                say(f"  {s.t_s:.0f} s: coplayer RSS {_n(s.rss_kb)} kB, CPU {cpu} s, xruns {_n(s.xruns)}")

        sampler = Sampler(cp.proc.pid, thru.proc.pid, peer, stats, origin, sample_s, tell).start()
        sent = peer.play(plan.schedule)
        say("released every key; waiting for the last answer and stragglers")
        peer.wait_quiet(QUIET_S, QUIET_TIMEOUT_S)
        sampler.stop()
        arrived = peer.events(since_ns=origin)
        _account(result, plan, sent, arrived, origin, sampler.samples, stats)
    finally:
        if peer is not None:
            peer.close()
        for proc in chain:
            proc.stop()
        result.exit_code = stop_process(cp.proc, drains.get("cp"))
        stop_process(thru.proc, drains.get("thru"))
        cp.stop()
        thru.stop()
        result.output_tail = drains["cp"].text[-2000:] if "cp" in drains else ""
        stats.close()
        sys.setswitchinterval(switch)
    return result


def _account(result: Soak, plan: Session, sent, arrived, origin_ns: int, samples: list[Sample],
             stats: StatsListener) -> None:
    """Fill ``result`` from what was sent, what arrived and the samples: all
    of it read before coplayer exits."""
    seconds = result.minutes * 60
    result.events, result.notes = len(sent), sum(is_on(m) for _, m in sent)
    result.playing_s = sum(end - start for start, end in plan.phrases)
    result.samples = samples
    result.buckets = per_bucket(sent, arrived, origin_ns, samples, seconds, result.bucket_s, plan.phrases)
    for key in ("lost", "floor_lost", "jack_lost", "answers"):
        setattr(result, key, sum(b[key] for b in result.buckets))
    if result.load:
        got, hop = match(sent, arrived, ("load",)), match(sent, arrived, ("hop",))
        result.load_lost = sum(1 for i in hop if i not in got)
    sounding = sounding_after([e for e in arrived if e[0] in OUTPUTS])
    result.stuck = {f"{label} ch{ch + 1} key{key}": n for (label, ch, key), n in sounding.items()}
    result.stuck_reported_off = offs_reported(sounding, list(stats.messages))
    result.floor_stuck = stuck_on(arrived, "floor")
    result.rss = rss_growth(samples, "rss_kb", result.warmup_s)
    result.thru_rss = rss_growth(samples, "thru_rss_kb", result.warmup_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to play (default 10)")
    p.add_argument("--rate", type=float, default=40.0,
                   help="mean MIDI messages/s while playing; each phrase 0.75-1.25 times it (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the session played (default 0)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--load", action="store_true", help="another JACK load beside: a chain of two more bare loops")
    p.add_argument("--bucket-s", type=float, default=60.0, help="seconds per reported bucket (default 60)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS/CPU samples (default 5)")
    p.add_argument("--warmup-s", type=float, default=60.0,
                   help="RSS growth is counted from this time (default 60; at most a third of the run)")
    p.add_argument("--mode", choices=["both", "instrument", "respond"], default="both",
                   help="coplayer's mode (default both: instruments and answers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a configuration value for coplayer, as `coplayer run --set` (repeatable)")
    args = p.parse_args(argv)
    if any("=" not in a for a in args.set):
        p.error("--set takes KEY=VALUE")
    settings = dict(a.split("=", 1) for a in args.set)
    say = None if args.json else (lambda msg: print(msg, flush=True))
    previous = _exit_on_sigterm()
    try:
        result = soak(args.minutes, args.rate, args.seed, args.load, args.bucket_s, args.sample_s, args.warmup_s,
                      args.mode, settings, progress=say)
    except BenchError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(result.figures()))
    else:
        print("\n".join(result.report()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
