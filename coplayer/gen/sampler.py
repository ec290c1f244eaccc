"""The sampler: a continuation of N bars after a context, under live creative control.

For each new event and each field in ``FIELDS`` order the sampler asks the
model for the field's logits given the fields already chosen, then::

    logits -> constraints (masks and biases) -> / temperature -> top-p -> sample

with a seeded :class:`numpy.random.Generator`.  Constraints act on the
logits only; no note is edited after it was sampled, except that durations
are cut at the end of the response window.

Constraints (all in :class:`Controls`, each changeable from another thread
while a response is being generated: :meth:`Controls.set` between events,
:meth:`Controls.snapshot` by the sampler before each event):

* **parts**: parts not allowed get ``-inf`` part logits;
* **ranges**: pitches outside the chosen part's ``(low, high)`` get ``-inf``;
* **key lock**: pitches outside the scale of ``key`` (or of the key detected
  from the context with the Krumhansl-Schmuckler profiles) lose
  ``key_lock`` nats; ``key_lock >= HARD_LOCK`` forbids them;
* **max polyphony**: shifts whose onset would have ``max_polyphony`` notes of
  the response already sounding get ``-inf``; so do shifts at which every
  allowed monophonic part (``monophonic``) is still sounding, and a sounding
  monophonic part gets ``-inf`` part logits.  When the parts the model
  wants at the drawn onset (more than half its part probability) still
  sound, the onset moves to when the first of them is free (a melody waits
  for its note to end instead of passing to another part).  If no shift of the
  encoding is possible, the longest shift class (whose meaning is "this long
  or longer") is taken and the note waits until a voice is free;
* **density**: the logits of shifts above 0 are tilted (``+ beta * shift``,
  their total probability kept: chords are the model's business) so that
  their mean is the model's own divided by ``density``, times a feedback factor
  (0.7..1.4) that pulls the notes per beat of the response toward ``density``
  times those of the context; durations are tilted alike (monophonic parts
  can only play more notes if they play shorter ones);
* **motif repetition**: the leading line of the context (its first
  :data:`MOTIF_NOTES` notes in the top part that has at least 4) is the motif.
  Its copy is due at the motif's own position in the bar; shifts that would
  skip the due onset, the quoting part at that onset, the pitch that repeats
  the motif's interval from the part's last pitch, and the motif's duration
  get a bias of ``motif_repetition * MOTIF_GAIN`` nats.  Each note of the
  quoting part advances the copy, whatever pitch it took: the answer quotes
  the call transposed, and varies it.

The window is ``bars`` bars from the start (the next barline after the last
context onset by default); a sampled onset at or beyond its end stops the
response, so no note starts outside it.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Sequence

import numpy as np

from coplayer.data.notes import Note
from coplayer.errors import ConfigError
from coplayer.gen.encoding import FIELDS, Encoding

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config
    from coplayer.gen.model import EventModel

HARD_LOCK = 50.0  # nats: a key lock this strong forbids pitches outside the scale
MOTIF_GAIN = 6.0  # nats of bias at motif_repetition = 1
MOTIF_NOTES = 8
MONO_INSIST = 0.5  # a note waits when the parts the model wants for it (this share) still sound
MOTIF_MIN_NOTES = 4
POS_CLASSES = 96  # positions in bar the models know (coplayer.gen.data.POS_CLASSES)
NEG_INF = -np.inf

# Krumhansl-Kessler key profiles (Krumhansl 1990), tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10, 11)  # natural minor plus the leading tone
_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_LETTERS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_KEY_RE = re.compile(r"\s*([A-Ga-g])([#b]?)\s+(major|minor)\s*", re.IGNORECASE)


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum())) if np.isfinite(m) else float(m)


# -- keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    tonic: int  # pitch class 0..11
    mode: str  # "major" or "minor"

    @classmethod
    def parse(cls, text: str) -> "Key":
        """'C major', 'F# minor', 'Bb major' (the configuration's spelling)."""
        m = _KEY_RE.fullmatch(text)
        if not m:
            raise ConfigError(f"{text!r} is not a key like 'C major', 'F# minor' or 'Bb major'")
        letter, accidental, mode = m.groups()
        tonic = _LETTERS[letter.upper()] + {"#": 1, "b": -1, "": 0}[accidental]
        return cls(tonic % 12, mode.lower())

    @property
    def scale(self) -> tuple[int, ...]:
        """Pitch classes in the key (minor: natural minor plus the leading tone)."""
        steps = MAJOR_SCALE if self.mode == "major" else MINOR_SCALE
        return tuple(sorted((self.tonic + s) % 12 for s in steps))

    def pitch_mask(self) -> np.ndarray:
        """[128] bool: True for MIDI pitches in the scale."""
        return np.isin(np.arange(128) % 12, self.scale)

    def __str__(self) -> str:
        return f"{_NAMES[self.tonic]} {self.mode}"


def detect_key(pitches: Sequence[int], weights: Sequence[float] | None = None) -> Key | None:
    """Krumhansl-Schmuckler: the key whose profile best correlates with the
    (duration-weighted) pitch-class histogram; None without notes."""
    pitches = np.asarray(pitches, dtype=np.int64)
    if not len(pitches):
        return None
    w = np.ones(len(pitches)) if weights is None else np.asarray(weights, dtype=np.float64)
    hist = np.bincount(pitches % 12, weights=w, minlength=12)
    if hist.std() == 0:
        return None
    r = _KEY_PROFILES @ ((hist - hist.mean()) / hist.std())  # Pearson r with each of the 24 keys
    best = int(np.argmax(r))
    return Key(best % 12, "major" if best < 12 else "minor")


def _standardised_profiles() -> np.ndarray:
    rows = [np.roll(profile, tonic) for profile in (MAJOR_PROFILE, MINOR_PROFILE) for tonic in range(12)]
    z = np.array([(r - r.mean()) / r.std() for r in rows])
    return z / 12  # so that z @ standardised histogram is Pearson's r


_KEY_PROFILES = _standardised_profiles()


# -- controls ---------------------------------------------------------------------


@dataclass
class Controls:
    """Everything that steers the sampler; change it with :meth:`set`, from any thread.

    ``key`` None means: detect it from the context (used when ``key_lock`` > 0).
    ``ranges`` maps part names to (low, high) MIDI pitches; ``parts`` None
    allows every part of the model; ``monophonic`` names parts that play one
    note at a time.  ``seed`` None draws fresh entropy for each response.
    """

    temperature: float = 1.0
    top_p: float = 0.95
    seed: int | None = None
    key: Key | None = None
    key_lock: float = 0.0
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    parts: tuple[str, ...] | None = None
    monophonic: frozenset[str] = frozenset()
    max_polyphony: int = 4
    density: float = 1.0
    motif_repetition: float = 0.0
    version: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        for f in fields(self):
            _check(f.name, getattr(self, f.name))

    @classmethod
    def from_config(cls, cfg: "Config", **overrides) -> "Controls":
        """The ``continuation`` section and the parts of ``cfg``; a configured
        ``key_lock`` key is locked hard; without one the key detected from the
        context is kept with ``key_strength`` nats."""
        c = cfg.continuation
        key = Key.parse(c.key_lock) if c.key_lock else None
        values = dict(
            temperature=c.temperature, top_p=c.top_p, seed=c.seed, key=key,
            key_lock=HARD_LOCK if key else c.key_strength,
            ranges={p.name: (p.low, p.high) for p in cfg.parts},
            parts=tuple(c.response_parts),
            monophonic=frozenset(p.name for p in cfg.parts if p.monophonic),
            max_polyphony=c.max_polyphony, density=c.density, motif_repetition=c.motif_repetition,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def set(self, **changes) -> None:
        """Change controls (validated); the sampler sees them from its next event."""
        names = {f.name for f in fields(self)} - {"version"}
        for name, value in changes.items():
            if name not in names:
                raise ConfigError(f"unknown control {name!r} (controls: {', '.join(sorted(names))})")
            _check(name, value)
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)
            self.version += 1

    def snapshot(self) -> "Controls":
        """A consistent copy (taken under the lock)."""
        with self._lock:
            return copy.copy(self)


def _check(name: str, value) -> None:
    bad = None
    if name == "temperature" and not value > 0:
        bad = "must be above 0"
    elif name == "top_p" and not 0 < value <= 1:
        bad = "must be in (0, 1]"
    elif name in ("key_lock", "motif_repetition", "density") and not value >= 0:
        bad = "must be 0 or more"
    elif name == "motif_repetition" and value > 1:
        bad = "must be in 0..1"
    elif name == "density" and not value > 0:
        bad = "must be above 0"
    elif name == "max_polyphony" and not (isinstance(value, int) and value >= 1):
        bad = "must be a whole number of at least 1"
    elif name == "seed" and value is not None and not (isinstance(value, int) and value >= 0):
        bad = "must be a whole number of at least 0, or None"
    elif name == "key" and value is not None and not isinstance(value, Key):
        bad = "must be a Key (Key.parse('C major')) or None"
    elif name == "ranges":
        for part, (low, high) in dict(value).items():
            if not 0 <= low <= high <= 127:
                bad = f"of {part!r} must satisfy 0 <= low <= high <= 127, got {low}..{high}"
    if bad:
        raise ConfigError(f"control {name}: {value!r} {bad}")


# -- the context ------------------------------------------------------------------


@dataclass
class Context:
    """The context's notes in the sampler's tick frame (ticks from the first event)."""

    onsets: np.ndarray
    parts: np.ndarray
    pitches: np.ndarray
    durs: np.ndarray  # ticks
    pos: np.ndarray

    @classmethod
    def from_events(cls, events: np.ndarray, pos: np.ndarray) -> "Context":
        events = np.asarray(events, dtype=np.int64).reshape(-1, len(FIELDS))
        return cls(np.cumsum(events[:, 0]), events[:, 1].copy(), events[:, 2].copy(),
                   events[:, 3] + 1, np.asarray(pos, dtype=np.int64).reshape(-1))

    def __len__(self) -> int:
        return len(self.onsets)

    def notes_per_beat(self, ticks_per_beat: int) -> float | None:
        if len(self) < 2:
            return None
        span = (np.max(self.onsets + self.durs) - self.onsets[0]) / ticks_per_beat
        return len(self) / span if span > 0 else None

    def key(self) -> Key | None:
        return detect_key(self.pitches, self.durs)


@dataclass
class Motif:
    """The leading line of the call: intervals, inter-onset ticks and durations."""

    part: int
    pitches: list[int]
    iois: list[int]  # ticks from the previous motif note (first: 0)
    durs: list[int]  # duration classes
    pos: int  # position in the bar of the first note

    @property
    def intervals(self) -> list[int]:
        return [0] + [b - a for a, b in zip(self.pitches, self.pitches[1:])]

    @classmethod
    def from_context(cls, ctx: Context, bar_ticks: int, n_parts: int) -> "Motif | None":
        """The first MOTIF_NOTES notes (within 2 bars) of the top part with >= 4 notes."""
        counts = np.bincount(ctx.parts, minlength=n_parts) if len(ctx) else np.zeros(n_parts, int)
        enough = [p for p in range(n_parts) if counts[p] >= MOTIF_MIN_NOTES]
        if not enough:
            return None
        part = enough[0]
        sel = np.flatnonzero(ctx.parts == part)
        onsets = ctx.onsets[sel]
        keep = np.concatenate([[True], np.diff(onsets) > 0])  # one note per onset (the first = top)
        sel = sel[keep][:MOTIF_NOTES]
        sel = sel[ctx.onsets[sel] < ctx.onsets[sel[0]] + 2 * bar_ticks]
        if len(sel) < MOTIF_MIN_NOTES:
            sel = np.flatnonzero(ctx.parts == part)[keep][:MOTIF_MIN_NOTES]
        on = ctx.onsets[sel]
        return cls(part, ctx.pitches[sel].tolist(), [0] + np.diff(on).tolist(),
                   (ctx.durs[sel] - 1).tolist(), int(ctx.pos[sel[0]]) % bar_ticks)


# -- the response -----------------------------------------------------------------


@dataclass
class Response:
    """A continuation: events (the first shift counts from the response start) and notes."""

    events: np.ndarray  # [M,5]
    pos: np.ndarray  # [M]
    notes: list[Note]  # onsets from the response start (beats; seconds at ``bpm``)
    start: int  # ticks from the last context onset to the response start
    bars: int
    bar_ticks: int
    key: Key | None
    motif: Motif | None
    seconds: float  # time taken to generate

    def __len__(self) -> int:
        return len(self.events)

    @property
    def notes_per_second(self) -> float:
        return len(self) / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _Run:
    """Mutable state of one response being generated (ticks of the context's frame)."""

    last: int  # onset of the last event (context or response)
    start: int  # the response window [start, end)
    end: int
    barline: int  # a barline
    bar_ticks: int
    context_last: int  # onset of the last context event
    first: bool  # the next event is the first of the response, after a context
    ends: list[int] = field(default_factory=list)  # ends of sounding response notes
    part_end: list[int] = field(default_factory=list)
    count: int = 0
    prev_out: int = 0
    # motif copy
    quote_part: int = -1
    j: int = 0
    due: int = 0
    due_pitch: int = -1
    quote_last: int = -1  # onset of the quoting part's last note


class Sampler:
    """Generates continuations from an :class:`~coplayer.gen.model.EventModel`."""

    def __init__(self, model: "EventModel", controls: Controls | None = None):
        self.model = model
        self.controls = controls if controls is not None else Controls()
        self.encoding: Encoding = model.encoding
        self._version = None
        self._c: Controls | None = None

    # -- public -------------------------------------------------------------------

    def generate(self, events: np.ndarray, pos: np.ndarray, bars: int, *, start: str | int = "bar",
                 bar_ticks: int | None = None, bpm: float = 120.0, fed: bool = False) -> Response:
        """A response of ``bars`` bars after the context ``events``/``pos``.

        ``start``: ``"bar"`` (the next barline after the last context onset),
        ``"beat"`` (the next beat), or ticks after the last context onset.
        ``bar_ticks``: ticks per bar of the piece (default: the encoding's).
        ``fed``: the model already holds exactly this context (else it is
        reset and fed).  The model's context grows by the response.
        """
        t0 = time.perf_counter()
        enc = self.encoding
        bar_ticks = int(bar_ticks or enc.ticks_per_bar)
        if bars < 1:
            raise ConfigError(f"bars must be at least 1, got {bars}")
        events = np.asarray(events, dtype=np.int64).reshape(-1, len(FIELDS))
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        if not fed:
            self.model.reset()
            if len(events):
                self.model.feed(events, pos)
        ctx = Context.from_events(events, pos)
        self._detected = ctx.key()
        c = self._refresh(force=True)
        run = self._start(ctx, bars, start, bar_ticks)
        rng = np.random.default_rng(c.seed)
        motif = Motif.from_context(ctx, bar_ticks, len(enc.parts))
        self._init_motif(run, motif)
        rate = ctx.notes_per_beat(enc.ticks_per_beat)
        out_events, out_pos = [], []
        while True:
            row = self._step(run, self._refresh(), rng, motif, rate)
            if row is None:
                break
            out_events.append(row[0])
            out_pos.append(row[1])
        ev = np.array(out_events, dtype=np.int64).reshape(-1, len(FIELDS))
        notes = enc.decode(ev, 0, bpm)
        return Response(ev, np.array(out_pos, dtype=np.int64), notes, run.start - run.context_last,
                        bars, bar_ticks, self._key, motif, time.perf_counter() - t0)

    # -- setup --------------------------------------------------------------------

    def _refresh(self, force: bool = False) -> Controls:
        """The controls; a new snapshot (and new masks) only when they changed."""
        version = self.controls.version
        if force or version != self._version or self._c is None:
            self._c, self._version = self.controls.snapshot(), version
            self._masks(self._c)
        return self._c

    def _masks(self, c: Controls) -> None:
        """The additive logit biases that depend on the controls alone."""
        names = self.encoding.parts
        allowed = names if c.parts is None else tuple(p for p in c.parts if p in names)
        if not allowed:
            raise ConfigError(f"none of the parts {', '.join(c.parts or ())} is a part of model "
                              f"{self.model.name} (its parts: {', '.join(names)})")
        self._allowed = np.array([p in allowed for p in names])
        self._part_bias = np.where(self._allowed, 0.0, NEG_INF)
        self._mono = np.array([p in c.monophonic for p in names])
        self._all_mono = not (self._allowed & ~self._mono).any()
        bias = np.zeros((len(names), 128))
        pitch = np.arange(128)
        for i, p in enumerate(names):
            if p in c.ranges:
                low, high = c.ranges[p]
                bias[i, (pitch < low) | (pitch > high)] = NEG_INF
        self._range_bias = bias
        self._key = c.key or self._detected
        self._key_bias = np.zeros(128)
        if self._key is not None and c.key_lock > 0:
            self._key_bias[~self._key.pitch_mask()] = NEG_INF if c.key_lock >= HARD_LOCK else -c.key_lock

    def _start(self, ctx: Context, bars: int, start: str | int, bar_ticks: int) -> _Run:
        tpb = self.encoding.ticks_per_beat
        if len(ctx):
            last, last_pos = int(ctx.onsets[-1]), int(ctx.pos[-1])
        else:
            last, last_pos = 0, 0
        barline = last - last_pos
        if not len(ctx):
            s = int(start) if isinstance(start, (int, np.integer)) else 0
        elif start == "bar":
            s = barline + bar_ticks * (1 + (last_pos // bar_ticks))
        elif start == "beat":
            s = last - last_pos % tpb + tpb
        elif isinstance(start, (int, np.integer)) and start >= 0:
            s = last + int(start)
        else:
            raise ConfigError(f"start must be 'bar', 'beat' or ticks >= 0 after the last onset, got {start!r}")
        return _Run(last=last if len(ctx) else s, start=s, end=s + bars * bar_ticks, barline=barline,
                    bar_ticks=bar_ticks, context_last=last, first=bool(len(ctx)),
                    part_end=[-1] * len(self.encoding.parts), prev_out=s)

    def _init_motif(self, run: _Run, motif: Motif | None) -> None:
        if motif is not None:
            self._restart_motif(run, motif, run.start)

    def _restart_motif(self, run: _Run, motif: Motif, t: int) -> None:
        """The copy starts again at the first tick >= t at the motif's position in the bar."""
        allowed = np.flatnonzero(self._allowed)
        run.quote_part = int(allowed[np.argmin(np.abs(allowed - motif.part))])
        run.j, run.due_pitch = 0, -1
        run.due = t + (motif.pos - (t - run.barline)) % run.bar_ticks

    # -- one event ----------------------------------------------------------------

    def _step(self, run: _Run, c: Controls, rng: np.random.Generator, motif: Motif | None,
              call_rate: float | None):
        enc, model = self.encoding, self.model
        max_shift = enc.max_shift
        w = c.motif_repetition * MOTIF_GAIN if motif is not None else 0.0
        if w > 0 and run.due < run.last:  # the copy's note did not come: start it again later
            self._restart_motif(run, motif, run.last)
        quoting = w > 0 and run.quote_last < run.due
        # shift
        lg = np.array(model.field_logits("shift", {}), dtype=np.float64)
        onsets = run.last + np.arange(max_shift + 1)
        gap = run.start - run.last if run.first else 0
        forced_onset = None
        if gap > max_shift:
            lg[:max_shift] = NEG_INF
            forced_onset = run.start
        else:
            if gap > 0:
                lg[:gap] = NEG_INF
            ok = self._free(run, onsets, c)
            if not ok.any():
                lg[:max_shift] = NEG_INF
                forced_onset = self._earliest_free(run, onsets[-1], c)
            else:
                lg[~ok] = NEG_INF
        if quoting:
            s_due = run.due - run.last
            if 0 <= s_due < max_shift:
                lg[s_due + 1:] -= w
        density = self._density(c, run, call_rate)
        lg = self._tilt(lg, density, first=1)  # shift 0 (a chord) is texture, not tempo
        part_end = np.array(run.part_end)
        shift = self._sample(lg, c, rng)
        onset = forced_onset if forced_onset is not None and shift == max_shift else run.last + shift
        if onset >= run.end:
            return None
        # part
        part_lg = np.array(model.field_logits("part", {"shift": shift}), dtype=np.float64) + self._part_bias
        busy = self._mono & (part_end > onset)
        if busy.any():
            p = np.exp(part_lg - part_lg.max())
            if p[busy].sum() > MONO_INSIST * p.sum():
                # the part the model wants still sounds: the note waits until it is free
                # (past the longest shift, that class: "this long or longer")
                onset = int(part_end[busy].min())
                shift = min(onset - run.last, max_shift)
                if onset >= run.end:
                    return None
                part_lg = np.array(model.field_logits("part", {"shift": shift}), dtype=np.float64) + self._part_bias
                busy = self._mono & (part_end > onset)
        lg = part_lg
        lg[busy] = NEG_INF
        if quoting and onset == run.due:
            lg[run.quote_part] += w
        part = self._sample(lg, c, rng)
        # pitch
        partial = {"shift": shift, "part": part}
        lg = np.array(model.field_logits("pitch", partial), dtype=np.float64) + self._range_bias[part]
        keyed = lg + self._key_bias
        lg = keyed if np.isfinite(keyed).any() else lg  # a range with no pitch of the key
        quote_note = w > 0 and part == run.quote_part and (run.j > 0 or onset >= run.due)
        if quote_note and 0 <= run.due_pitch < 128:
            lg[run.due_pitch] += w
        pitch = self._sample(lg, c, rng)
        # duration, velocity
        partial["pitch"] = pitch
        lg = self._tilt(np.array(model.field_logits("dur", partial), dtype=np.float64), density)
        if quote_note:
            lg[motif.durs[run.j]] += w / 2
        dur = self._sample(lg, c, rng)
        partial["dur"] = dur
        vel = self._sample(np.asarray(model.field_logits("vel", partial), dtype=np.float64), c, rng)
        # commit
        pos = min(POS_CLASSES - 1, (onset - run.barline) % run.bar_ticks)
        model.feed(np.array([[shift, part, pitch, dur, vel]]), np.array([pos]))
        end = onset + dur + 1
        run.ends = [e for e in run.ends if e > onset] + [end]
        run.part_end[part] = max(run.part_end[part], end)
        if quote_note:
            self._advance_motif(run, motif, onset, pitch)
        out = [onset - run.prev_out, part, pitch, min(dur + 1, run.end - onset) - 1, vel]
        run.prev_out, run.last, run.first = onset, onset, False
        run.count += 1
        return out, pos

    def _advance_motif(self, run: _Run, motif: Motif, onset: int, pitch: int) -> None:
        run.quote_last = onset
        run.j += 1
        if run.j < len(motif.pitches):
            run.due = onset + motif.iois[run.j]
            run.due_pitch = pitch + motif.intervals[run.j]
        else:  # again from the start, at the motif's position in a later bar
            self._restart_motif(run, motif, onset + 1)

    def _free(self, run: _Run, onsets: np.ndarray, c: Controls) -> np.ndarray:
        """Per candidate onset: under max polyphony and some allowed part free."""
        if not run.ends:
            return np.ones(len(onsets), dtype=bool)
        ends = np.sort(np.array(run.ends))
        sounding = len(ends) - np.searchsorted(ends, onsets, side="right")
        ok = sounding < c.max_polyphony
        if self._all_mono:
            part_end = np.array(run.part_end)[self._allowed]
            ok &= (part_end[None, :] <= onsets[:, None]).any(axis=1)
        return ok

    def _earliest_free(self, run: _Run, t: int, c: Controls) -> int:
        for cand in sorted({t, *[e for e in run.ends if e > t]}):
            if self._free(run, np.array([cand]), c)[0]:
                return cand
        return max(run.ends + [t])

    def _density(self, c: Controls, run: _Run, call_rate: float | None) -> float:
        """How much busier than the model the response should be: ``density``, times a
        feedback factor (sqrt of 0.5..2) toward ``density`` x the context's notes per beat."""
        factor = c.density
        if call_rate and run.count:
            elapsed = (run.last - run.start) / self.encoding.ticks_per_beat + 1.0
            wanted = c.density * call_rate * elapsed + 2.0
            factor *= min(2.0, max(0.5, wanted / (run.count + 2.0))) ** 0.5
        return factor

    @staticmethod
    def _tilt(lg: np.ndarray, factor: float, first: int = 0) -> np.ndarray:
        """Logits + beta * class for the classes from ``first`` on (their total
        probability kept), beta such that their mean class is divided by ``factor``."""
        if abs(np.log(factor)) < 0.1:
            return lg
        x = lg[first:]
        p = np.exp(x - x.max())
        support = np.flatnonzero(p > 1e-6)  # the rest cannot move the mean
        if len(support) < 2:
            return lg
        s = support.astype(np.float64)
        p = p[support]
        target = (p @ s) / p.sum() / factor
        beta = 0.0
        for _ in range(4):  # Newton on E_beta[class] = target; d/dbeta E = Var
            q = p * np.exp(beta * s)
            q /= q.sum()
            m = q @ s
            var = q @ (s * s) - m * m
            if var < 1e-9:
                break
            beta = min(1.0, max(-1.0, beta + (target - m) / var))
        out = lg.copy()
        tilted = x + beta * np.arange(len(x))
        out[first:] = tilted + (_logsumexp(x) - _logsumexp(tilted))
        return out

    @staticmethod
    def _sample(logits: np.ndarray, c: Controls, rng: np.random.Generator) -> int:
        """Temperature, then top-p (nucleus), then one draw."""
        x = logits / c.temperature
        m = x.max()
        if not np.isfinite(m):
            raise RuntimeError("every class is forbidden (the constraints leave nothing to sample)")
        p = np.exp(x - m)
        if c.top_p < 1.0:
            total = p.sum()
            if total * c.top_p <= 1.0:  # the likeliest class alone holds top_p: the nucleus is it
                return int(x.argmax())
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            k = int(np.searchsorted(cum, c.top_p * cum[-1])) + 1
            j = int(np.searchsorted(cum[:k], rng.random() * cum[k - 1], side="right"))
            return int(order[min(j, k - 1)])
        cum = np.cumsum(p)
        return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(p) - 1))
