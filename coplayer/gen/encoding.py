"""Multi-field note events: the representation of the continuation models.

One event per note, in onset order (within one onset: top voice first).
Each event has five fields, decoded in this order, each conditioned on the
ones before it within the same event:

====== ========================================================= ==========
field  meaning                                                   classes
====== ========================================================= ==========
shift  onset minus the previous event's onset, in grid ticks     0..MAX_SHIFT
       (``ticks_per_beat`` per beat; MAX_SHIFT = 4 beats, longer
       silences are clipped)
part   the part that plays it (``parts``; index)                 len(parts)
pitch  MIDI pitch                                                0..127
dur    duration in grid ticks, 1..MAX_DUR (clipped), class d-1   MAX_DUR
vel    velocity bucket (velocity // 16), decoded to the centre   8
====== ========================================================= ==========

Besides the fields, every event carries its position in the bar (``pos``,
grid ticks from the last barline, 0..ticks_per_bar-1) as an input, never
predicted: it follows from the shifts and the meter.  The encoding is a
plain dataclass saved as JSON beside the weights (``Encoding.to_dict``),
and the runtime rebuilds it from the model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from coplayer.data.notes import Note

FIELDS = ("shift", "part", "pitch", "dur", "vel")
ENCODING_VERSION = 1


@dataclass(frozen=True)
class Encoding:
    parts: tuple[str, ...] = ("soprano", "alto", "tenor", "bass")
    ticks_per_beat: int = 12  # 16ths (3) and eighth triplets (4) are exact
    beats_per_bar: int = 4
    max_shift_beats: int = 4
    max_dur_beats: int = 8
    vel_buckets: int = 8
    version: int = ENCODING_VERSION

    @property
    def max_shift(self) -> int:
        return self.max_shift_beats * self.ticks_per_beat

    @property
    def max_dur(self) -> int:
        return self.max_dur_beats * self.ticks_per_beat

    @property
    def ticks_per_bar(self) -> int:
        return self.beats_per_bar * self.ticks_per_beat

    @property
    def sizes(self) -> dict[str, int]:
        """Number of classes of each field."""
        return {"shift": self.max_shift + 1, "part": len(self.parts), "pitch": 128,
                "dur": self.max_dur, "vel": self.vel_buckets}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts"] = list(self.parts)
        d["fields"] = list(FIELDS)
        d["sizes"] = self.sizes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Encoding":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["parts"] = tuple(known.get("parts", cls.parts))
        return cls(**known)

    # -- notes <-> events --------------------------------------------------

    def encode(self, notes: list[Note], start_beat: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Notes (with ``part`` among ``parts`` and beats) -> (events [N,5] int64, pos [N] int64).

        Onsets are quantised to the grid; ``start_beat`` is the beat of the
        first barline (pickups: a negative offset is fine).  Notes of unknown
        parts raise ValueError.
        """
        tpb = self.ticks_per_beat
        index = {p: i for i, p in enumerate(self.parts)}
        rows = sorted(
            ((round((n.onset_beats - start_beat) * tpb), index[n.part], n) for n in notes),
            key=lambda r: (r[0], r[1], -r[2].pitch),
        )  # onset, then part (top voice first), then the higher note of a chord in one part
        events = np.zeros((len(rows), len(FIELDS)), dtype=np.int64)
        pos = np.zeros(len(rows), dtype=np.int64)
        prev = rows[0][0] if rows else 0
        for i, (onset, part, n) in enumerate(rows):
            dur = min(self.max_dur, max(1, round(n.duration_beats * tpb)))
            events[i] = (min(self.max_shift, onset - prev), part, n.pitch, dur - 1,
                         min(self.vel_buckets - 1, n.velocity * self.vel_buckets // 128))
            pos[i] = onset % self.ticks_per_bar
            prev = onset
        return events, pos

    def decode(self, events: np.ndarray, start_tick: int = 0, bpm: float = 120.0) -> list[Note]:
        """Events -> notes; the first event's onset is ``start_tick`` plus its shift."""
        tpb = self.ticks_per_beat
        notes, tick = [], start_tick
        for shift, part, pitch, dur, vel in np.asarray(events, dtype=np.int64):
            tick += int(shift)
            beats, dbeats = tick / tpb, (int(dur) + 1) / tpb
            velocity = int(min(127, int(vel) * (128 // self.vel_buckets) + 64 // self.vel_buckets))
            notes.append(Note(pitch=int(pitch), velocity=max(1, velocity), onset=beats * 60 / bpm,
                              duration=dbeats * 60 / bpm, onset_beats=beats, duration_beats=dbeats,
                              part=self.parts[int(part)]))
        return notes

    def position(self, tick: int) -> int:
        return tick % self.ticks_per_bar
