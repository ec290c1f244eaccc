"""How a score becomes a performance for evaluation (and training).

Protocol ``a`` is Arranger's (Dong et al. 2021): notes ordered by onset then
pitch, timing as written.  Protocol ``b`` is a person playing: each onset and
release jittered by a few milliseconds, the notes of a chord arriving in
random order, velocities varied.  Both produce the same :class:`Performance`,
which :func:`coplayer.instrument.features.note_events` turns into a stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coplayer.data.notes import Score
from coplayer.instrument.features import Event, note_events

PROTOCOLS = ("a", "b")
JITTER_S = 0.008  # protocol b: onsets and releases move by up to +-8 ms
VELOCITY_SD = 15.0


@dataclass
class Performance:
    """One way of playing a score: arrays indexed like ``score.notes``."""

    pitches: np.ndarray
    velocities: np.ndarray
    onsets: np.ndarray
    ends: np.ndarray
    labels: np.ndarray  # part index of each note, -1 if unknown
    events: list[Event]


def perform(
    score: Score,
    parts: list[str],
    protocol: str = "a",
    rng: np.random.Generator | None = None,
    *,
    transpose: int = 0,
    tempo_scale: float = 1.0,
    jitter: float = JITTER_S,
) -> Performance:
    """A performance of ``score`` under ``protocol`` ('a' or 'b')."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    notes = score.notes
    n = len(notes)
    pitches = np.clip(np.array([x.pitch for x in notes]) + transpose, 0, 127)
    velocities = np.array([x.velocity for x in notes])
    onsets = np.array([x.onset for x in notes], dtype=np.float64) * tempo_scale
    ends = np.array([x.end for x in notes], dtype=np.float64) * tempo_scale
    index = {p: i for i, p in enumerate(parts)}
    labels = np.array([index.get(x.part, -1) for x in notes])
    if protocol == "a":
        order = np.lexsort((pitches, onsets))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
    else:
        rng = rng or np.random.default_rng(0)
        written_onsets, written_ends = onsets, ends
        onsets = onsets + rng.uniform(-jitter, jitter, n)
        ends = np.maximum(ends + rng.uniform(-jitter, jitter, n), onsets + 0.01)
        ends = _release_before_restrike(pitches, written_onsets, written_ends, onsets, ends)
        velocities = np.clip(np.round(velocities + rng.normal(0, VELOCITY_SD, n)), 1, 127).astype(int)
        rank = rng.permutation(n)
    events = note_events(onsets, ends, rank)
    return Performance(pitches, velocities, onsets, ends, labels, events)


def _release_before_restrike(pitches, written_onsets, written_ends, onsets, ends) -> np.ndarray:
    """A key is released before it is struck again: where the score has one
    pitch end as (or before) it begins again, the jittered release comes at
    least a millisecond before the jittered re-strike."""
    ends = ends.copy()
    order = np.lexsort((written_onsets, pitches))
    for a, b in zip(order[:-1], order[1:]):
        if pitches[a] == pitches[b] and written_ends[a] <= written_onsets[b] + 1e-9:
            ends[a] = max(min(ends[a], onsets[b] - 0.001), onsets[a] + 0.001)
    return ends
