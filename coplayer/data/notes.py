"""The note table: the one representation of notes used by all of coplayer.

A :class:`Score` holds :class:`Note` rows plus the tempo map needed to move
between beats, seconds and MIDI ticks.  Beats are the master clock for files
(so ticks survive a round trip exactly); seconds are derived from the tempo
map.  Live input fills seconds and derives beats from the tempo it follows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

DEFAULT_TEMPO = 500_000  # microseconds per beat (120 BPM), the MIDI default


@dataclass(slots=True)
class Note:
    """One note.  ``part`` is None until a part is known or chosen."""

    pitch: int
    velocity: int
    onset: float  # seconds
    duration: float  # seconds
    onset_beats: float = 0.0
    duration_beats: float = 0.0
    part: str | None = None
    channel: int = 0  # 0..15

    @property
    def end(self) -> float:
        return self.onset + self.duration

    @property
    def end_beats(self) -> float:
        return self.onset_beats + self.duration_beats


class TempoMap:
    """Piecewise-constant tempo: converts beats <-> seconds.

    ``changes`` is a list of ``(beat, microseconds_per_beat)`` sorted by beat;
    a first entry at beat 0 is added when missing.
    """

    def __init__(self, changes: Iterable[tuple[float, int]] = ()):
        items = sorted((float(b), int(t)) for b, t in changes)
        if not items or items[0][0] > 0:
            items.insert(0, (0.0, items[0][1] if items else DEFAULT_TEMPO))
        # Drop redundant changes at the same beat: the last one wins.
        merged: list[tuple[float, int]] = []
        for beat, tempo in items:
            if merged and merged[-1][0] == beat:
                merged[-1] = (beat, tempo)
            else:
                merged.append((beat, tempo))
        self.changes = merged
        self._beats = [b for b, _ in merged]
        self._seconds = [0.0]
        for (b0, t0), (b1, _) in zip(merged, merged[1:]):
            self._seconds.append(self._seconds[-1] + (b1 - b0) * t0 / 1e6)

    def seconds(self, beat: float) -> float:
        i = max(0, bisect.bisect_right(self._beats, beat) - 1)
        return self._seconds[i] + (beat - self._beats[i]) * self.changes[i][1] / 1e6

    def beats(self, seconds: float) -> float:
        i = max(0, bisect.bisect_right(self._seconds, seconds) - 1)
        return self._beats[i] + (seconds - self._seconds[i]) * 1e6 / self.changes[i][1]

    def tempo_at(self, beat: float) -> int:
        i = max(0, bisect.bisect_right(self._beats, beat) - 1)
        return self.changes[i][1]

    def bpm_at(self, beat: float) -> float:
        return 60e6 / self.tempo_at(beat)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TempoMap) and self.changes == other.changes

    def __repr__(self) -> str:
        return f"TempoMap({self.changes!r})"


@dataclass
class Score:
    """A note table with its timing context.

    ``parts`` lists part names in their display order; notes whose ``part``
    is None belong to no part yet (for example a merged keyboard line).
    """

    notes: list[Note] = field(default_factory=list)
    tempo: TempoMap = field(default_factory=TempoMap)
    time_signatures: list[tuple[float, int, int]] = field(
        default_factory=lambda: [(0.0, 4, 4)]
    )
    ticks_per_beat: int = 480
    parts: list[str] = field(default_factory=list)
    name: str = ""

    def __iter__(self) -> Iterator[Note]:
        return iter(self.notes)

    def __len__(self) -> int:
        return len(self.notes)

    def sort(self) -> "Score":
        """Sort notes in place by onset, then pitch (Arranger's order)."""
        self.notes.sort(key=lambda n: (n.onset_beats, n.onset, n.pitch))
        return self

    def with_notes(self, notes: list[Note], parts: list[str] | None = None) -> "Score":
        """A copy of this score's timing context holding other notes."""
        return replace(self, notes=notes, parts=list(self.parts if parts is None else parts))

    def merged(self) -> "Score":
        """All notes as if played on one keyboard: parts cleared, sorted."""
        notes = [replace(n, part=None) for n in self.notes]
        return self.with_notes(notes, parts=[]).sort()

    def transposed(self, semitones: int) -> "Score":
        notes = [replace(n, pitch=n.pitch + semitones) for n in self.notes]
        return self.with_notes(notes)

    def part_notes(self, part: str) -> list[Note]:
        return [n for n in self.notes if n.part == part]

    def fill_seconds(self) -> "Score":
        """Recompute onset/duration in seconds from beats and the tempo map."""
        for n in self.notes:
            n.onset = self.tempo.seconds(n.onset_beats)
            n.duration = self.tempo.seconds(n.onset_beats + n.duration_beats) - n.onset
        return self

    @property
    def end_beats(self) -> float:
        return max((n.end_beats for n in self.notes), default=0.0)
