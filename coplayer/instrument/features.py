"""The one featurizer of online instrumentation, shared by training and live play.

At each note-on the featurizer knows only the past: pitches, velocities and
onset times of earlier notes, which of them are still held, and the parts
coplayer itself chose for them.  It never sees the current note's duration
or anything later.  The flow for every note is::

    feats = featurizer.note_on(pitch, velocity, time)   # features, no state change
    part = decide(model(feats))                         # model + constraints
    featurizer.commit(part)                             # the decision becomes history
    ...
    featurizer.note_off(pitch, time)                    # a held note ends

Every feature is relative (intervals to each part's recent pitches, times
since events), plus the absolute pitch fed to an embedding, so the same
features serve live input with any tempo.  The layout of the vector is
described by :meth:`Featurizer.feature_names` and saved in the model card.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, asdict
from typing import Iterable, Iterator

import numpy as np

FEATURIZER_VERSION = 1
INTERVAL_EDGES = (0, 2, 4, 7, 12)  # |interval| buckets: 0, 1-2, 3-4, 5-7, 8-12, >12
MAX_CHORD = 4
# Notes one chord can hold: two hands play at most ten keys.  Past it, a note
# starts a new chord, so a run of 1,000 notes/s (35 notes in one chord window)
# does not make every note's work grow with it.  No chorale reaches it.
CHORD_NOTES = 12
EXACT_S = 1e-4  # onsets closer than this are simultaneous as written, not as played
PC_NOTES = 16  # FeatureSpec.pc_context: how many recent notes make the harmonic context


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that defines the features; travels in the model card."""

    n_parts: int
    chord_window: float = 0.035  # seconds: onsets this close to a chord's first note join it
    time_unit: float = 0.05  # seconds: time features are log1p(dt / time_unit) / 4
    # Voice tracking: once several notes of a chord are in, the featurizer's
    # belief of which part holds which note is re-sorted by pitch (parts are
    # listed top to bottom), so one routing mistake does not corrupt every
    # later feature.  The notes already sent stay where they were sent.
    resort_chords: bool = False
    motion: bool = False  # add each part's last melodic step as a feature
    # Quantised input (a file, a sequencer) has chord notes at exactly the same
    # time, in file order; a person's chord never does (a MIDI note-on alone
    # takes ~1 ms on the wire).  A flag lets one model serve both.
    exact_flag: bool = False
    # Harmony, in any key: how many of the last PC_NOTES notes lie each
    # number of semitones (mod 12) above this note's pitch class.
    pc_context: bool = False
    version: int = FEATURIZER_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


_NO_HISTORY = (0.0,) * (7 + len(INTERVAL_EDGES) + 1)  # a part's features before its first note


def _interval_bucket(interval: int) -> int:
    a = abs(interval)
    for i, edge in enumerate(INTERVAL_EDGES):
        if a <= edge:
            return i
    return len(INTERVAL_EDGES)


# The bucket's one-hot for each |interval| up to the last edge (a table: the
# featurizer runs before every note can leave); wider intervals share the last.
_BUCKETS = tuple(tuple(float(i == _interval_bucket(a)) for i in range(len(INTERVAL_EDGES) + 1))
                 for a in range(INTERVAL_EDGES[-1] + 2))


class _Part:
    __slots__ = ("last_pitch", "prev_pitch", "last_onset", "last_release", "held", "chord_pitch")

    def __init__(self) -> None:
        self.last_pitch: int | None = None
        self.prev_pitch: int | None = None  # the pitch before last_pitch
        self.last_onset: float | None = None
        self.last_release: float | None = None
        self.held = 0  # number of this part's notes still sounding
        self.chord_pitch: int | None = None  # its note in the current chord, if any


class Featurizer:
    """Online features for one stream of notes (one performer, one piece)."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.size = len(self.feature_names())
        self.reset()

    def reset(self) -> None:
        k = self.spec.n_parts
        self._parts = [_Part() for _ in range(k)]
        self._held: dict[int, deque[int]] = {}  # pitch -> parts of its sounding notes (FIFO)
        self._prev_pitch: int | None = None
        self._prev_part: int | None = None
        self._prev_onset: float | None = None
        self._chord_start: float | None = None
        self._chord: list[int] = []  # pitches of the current chord so far
        self._chord_notes: list[list] = []  # [pitch, believed part, time] of the current chord
        self._before: list[tuple] = []  # each part's (last_pitch, prev_pitch, last_onset) at chord start
        self._pending: tuple[int, float] | None = None  # (pitch, time) awaiting commit
        self._recent_pc: deque[int] = deque(maxlen=PC_NOTES)  # pitch classes of the last notes

    # -- the note stream -------------------------------------------------

    def note_off(self, pitch: int, time: float) -> int | None:
        """A note ends; returns the part it was in (None if it was not held)."""
        parts = self._held.get(pitch)
        if not parts:
            return None
        part = parts.popleft()
        if not parts:
            del self._held[pitch]
        state = self._parts[part]
        state.held = max(0, state.held - 1)
        state.last_release = time
        return part

    def note_on(self, pitch: int, velocity: int, time: float, vector: bool = True) -> np.ndarray | None:
        """Features of a note at its note-on (state changes only at commit);
        None with ``vector`` false (the note still needs its commit)."""
        if self._pending is not None:
            raise RuntimeError("note_on() twice without commit()")
        self._pending = (pitch, time)
        if not vector:
            return None
        return self.preview(pitch, velocity, time)

    def preview(self, pitch: int, velocity: int, time: float) -> np.ndarray:
        """The features ``note_on`` would give, with no state change at all
        (keeping the code path warm between notes)."""
        return self._vector(pitch, velocity, time, self.joins_chord(time))

    def commit(self, part: int) -> None:
        """Record the part chosen for the note of the last note_on()."""
        if self._pending is None:
            raise RuntimeError("commit() without note_on()")
        pitch, time = self._pending
        self._pending = None
        if not self.joins_chord(time):
            self._chord_start = time
            self._chord, self._chord_notes = [], []
            self._before = [(s.last_pitch, s.prev_pitch, s.last_onset) for s in self._parts]
            for s in self._parts:
                s.chord_pitch = None
        self._chord.append(pitch)
        self._chord_notes.append([pitch, part, time])
        self._recent_pc.append(pitch % 12)
        self._parts[part].held += 1
        self._held.setdefault(pitch, deque()).append(part)
        if self.spec.resort_chords and len(self._chord_notes) > 1:
            self._resort_chord()
        self._apply_chord()
        self._prev_pitch, self._prev_onset = pitch, time
        self._prev_part = self._chord_notes[-1][1]

    def joins_chord(self, time: float) -> bool:
        """Does a note at ``time`` join the chord of the notes committed so far?"""
        return (self._chord_start is not None and time - self._chord_start <= self.spec.chord_window
                and len(self._chord) < CHORD_NOTES)

    def _resort_chord(self) -> None:
        """Re-pair the chord's notes with its parts in pitch order (top part, top note)."""
        parts = sorted(note[1] for note in self._chord_notes)
        by_pitch = sorted(self._chord_notes, key=lambda note: -note[0])
        for note, part in zip(by_pitch, parts):
            if note[1] != part:
                self._move_held(note[0], note[1], part)
                note[1] = part

    def _move_held(self, pitch: int, old: int, new: int) -> None:
        held = self._held.get(pitch)
        if held and old in held:
            held[held.index(old)] = new
            self._parts[old].held -= 1
            self._parts[new].held += 1

    def _apply_chord(self) -> None:
        """Each part's pitch history from before the chord plus its chord notes."""
        mine: dict[int, list[list]] = {}
        for note in self._chord_notes:
            mine.setdefault(note[1], []).append(note)
        for k, s in enumerate(self._parts):
            last, prev, onset = self._before[k]
            notes = mine.get(k, [])
            pitches = [prev, last] + [n[0] for n in notes]
            s.last_pitch, s.prev_pitch = pitches[-1], pitches[-2]
            s.last_onset = notes[-1][2] if notes else onset
            s.chord_pitch = notes[-1][0] if notes else None

    def held_parts(self) -> list[int]:
        """How many notes each part is holding now."""
        return [s.held for s in self._parts]

    def last_pitches(self) -> list[int | None]:
        """Each part's most recent pitch (None before its first note)."""
        return [s.last_pitch for s in self._parts]

    # -- the vector ------------------------------------------------------

    def feature_names(self) -> list[str]:
        names = ["dt_prev", "no_prev", "same_chord", "velocity", "pitch", "step_prev"]
        if self.spec.exact_flag:
            names.append("exact_chord")
        names += [f"chord_size={i}" for i in range(MAX_CHORD + 1)]
        names += ["chord_above", "chord_below", "held_total"]
        names += [f"prev_part={i}" for i in range(self.spec.n_parts)] + ["prev_part=none"]
        for k in range(self.spec.n_parts):
            names += [
                f"p{k}.has_history", f"p{k}.interval", f"p{k}.holding",
                f"p{k}.in_chord", f"p{k}.chord_interval", f"p{k}.since_onset",
                f"p{k}.since_release",
            ]
            names += [f"p{k}.|interval|<={e}" for e in INTERVAL_EDGES] + [f"p{k}.|interval|>12"]
            if self.spec.motion:
                names += [f"p{k}.motion"]
        if self.spec.pc_context:
            names += [f"pc+{r}" for r in range(12)]
        return names

    def values(self, pitch: int, velocity: int, time: float) -> list[float]:
        """The features ``preview`` gives, as a plain list: the live path's
        form (an ONNX model's input buffer takes it without an array between)."""
        return self._values(pitch, velocity, time, self.joins_chord(time))

    def _vector(self, pitch: int, velocity: int, time: float, in_chord: bool) -> np.ndarray:
        return np.asarray(self._values(pitch, velocity, time, in_chord), dtype=np.float32)

    def _values(self, pitch: int, velocity: int, time: float, in_chord: bool) -> list[float]:
        # Run at every note-on before the note can leave: written for speed
        # (locals, no helper calls per part), one list grown in place.
        spec = self.spec
        unit = spec.time_unit
        log1p = math.log1p
        prev_onset = self._prev_onset
        if prev_onset is None:
            v = [0.0, 1.0, 0.0]
        else:
            dt = time - prev_onset
            v = [log1p((dt if dt > 0.0 else 0.0) / unit) / 4.0, 0.0, float(in_chord)]
        step = 0 if self._prev_pitch is None else pitch - self._prev_pitch
        v += (velocity / 127.0, (pitch - 60) / 24.0, max(-24, min(24, step)) / 12.0)
        if spec.exact_flag:
            v.append(float(prev_onset is not None and abs(time - prev_onset) < EXACT_S))
        chord = self._chord if in_chord else ()
        size = [0.0] * (MAX_CHORD + 1)
        size[min(len(chord), MAX_CHORD)] = 1.0
        v += size
        above = below = held_total = 0
        for c in chord:
            if c > pitch:
                above += 1
            elif c < pitch:
                below += 1
        parts = self._parts
        for s in parts:
            held_total += s.held
        v += (above / 4.0, below / 4.0, held_total / 4.0)
        prev = [0.0] * (len(parts) + 1)
        prev[len(parts) if self._prev_part is None else self._prev_part] = 1.0
        v += prev
        motion = spec.motion
        top = len(_BUCKETS) - 1
        for s in parts:
            last = s.last_pitch
            if last is None:
                v += _NO_HISTORY
                if motion:
                    v.append(0.0)
                continue
            interval = pitch - last
            chord_pitch = s.chord_pitch if in_chord else None
            held = s.held
            dt = time - s.last_onset
            since_release = 0.0
            if not held and s.last_release is not None:
                dr = time - s.last_release
                since_release = log1p((dr if dr > 0.0 else 0.0) / unit) / 4.0
            v += (
                1.0,
                max(-36, min(36, interval)) / 12.0,
                float(held > 0),
                float(chord_pitch is not None),
                0.0 if chord_pitch is None else max(-24, min(24, pitch - chord_pitch)) / 12.0,
                log1p((dt if dt > 0.0 else 0.0) / unit) / 4.0,
                since_release,
            )
            v += _BUCKETS[min(abs(interval), top)]
            if motion:
                prev_pitch = s.prev_pitch
                v.append(0.0 if prev_pitch is None else max(-12, min(12, last - prev_pitch)) / 12.0)
        if spec.pc_context:
            counts = [0.0] * 12
            pc = pitch % 12
            share = 1.0 / PC_NOTES
            for q in self._recent_pc:
                counts[(q - pc) % 12] += share
            v += counts
        return v


# -- turning a note list into the event stream a player would produce -------


@dataclass(frozen=True, slots=True)
class Event:
    """A note-on or note-off of note ``index`` at ``time`` seconds."""

    time: float
    on: bool
    index: int


def note_events(onsets: Iterable[float], ends: Iterable[float], order: Iterable[int] | None = None) -> list[Event]:
    """Note-ons and note-offs in time order; at equal times offs come first.

    ``order`` ranks the note-ons that share a time (default: the given order),
    so a chord's notes arrive in the order the caller chose.
    """
    onsets, ends = list(onsets), list(ends)
    rank = list(range(len(onsets))) if order is None else list(order)
    events = [Event(t, True, i) for i, t in enumerate(onsets)]
    # A note-off never precedes its own note-on, even for a zero-length note.
    events += [Event(max(e, onsets[i] + 1e-6), False, i) for i, e in enumerate(ends)]
    # Times equal to the nanosecond are simultaneous: a note ending where the
    # next begins (onset + duration in floating point) must release first.
    events.sort(key=lambda e: (round(e.time, 9), e.on, rank[e.index] if e.on else 0))
    return events


def replay(featurizer: Featurizer, events: list[Event], pitches, velocities, decide) -> Iterator[tuple[int, np.ndarray, int]]:
    """Drive a featurizer through an event stream with a decision function.

    ``decide(index, features) -> part`` is called at every note-on; yields
    ``(index, features, part)``.  A note-off of a note whose on was never
    decided (it cannot happen in a sorted stream) is ignored.
    """
    for ev in events:
        if ev.on:
            feats = featurizer.note_on(int(pitches[ev.index]), int(velocities[ev.index]), ev.time)
            part = decide(ev.index, feats)
            featurizer.commit(part)
            yield ev.index, feats, part
        else:
            featurizer.note_off(int(pitches[ev.index]), ev.time)
