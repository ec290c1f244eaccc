"""``coplayer arrange``: instrument a MIDI file as if it were played live.

All notes of the file are merged as if played on one keyboard (their parts
forgotten) and streamed, note-on and note-off in time order with the file's
timing in seconds, through an :class:`~coplayer.instrument.instrumenter.Instrumenter`:
the same online decision the live engine makes, seeing only the past.
Notes with the same onset arrive lowest pitch first.  The result has one
track per configured part; every note keeps its pitch, velocity, onset and
duration exactly, and none is dropped.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coplayer.data.midi import check_not_input, read_midi, write_midi
from coplayer.data.notes import Note, Score
from coplayer.errors import ModelError
from coplayer.instrument.features import note_events
from coplayer.instrument.instrumenter import Instrumenter

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config

log = logging.getLogger(__name__)


def arrange(score: Score, instrumenter: Instrumenter, *, passthrough_channel: int | None = None) -> Score:
    """A copy of ``score`` whose notes carry the parts the instrumenter chose.

    Notes on ``passthrough_channel`` (0-15, e.g. drums) are not instrumented
    and keep no part.  The input score is not modified.
    """
    merged = score.merged()  # parts cleared; sorted by onset, then pitch
    notes = merged.notes
    played = [n for n in notes if n.channel != passthrough_channel]
    # Equal onsets keep the merged order, i.e. ascending pitch.
    events = note_events([n.onset for n in played], [n.end for n in played])
    instrumenter.reset()
    for ev in events:
        note = played[ev.index]
        if ev.on:
            note.part = instrumenter.note_on(note.pitch, note.velocity, ev.time).name
        else:
            instrumenter.note_off(note.pitch, ev.time)
    result = merged.with_notes(notes, parts=list(instrumenter.parts))
    _check_kept(score.notes, result.notes)
    return result


def _key(note: Note) -> tuple:
    return (note.pitch, note.velocity, note.onset_beats, note.duration_beats, note.channel)


def _check_kept(before: list[Note], after: list[Note]) -> None:
    """Every note is still there, unchanged but for its part (an internal invariant)."""
    if len(before) != len(after) or Counter(map(_key, before)) != Counter(map(_key, after)):
        raise RuntimeError(f"arrange changed the notes: {len(before)} in, {len(after)} out")


@dataclass
class Arrangement:
    """What ``coplayer arrange`` did."""

    score: Score
    model: str
    notes: int
    per_part: dict[str, int]
    passthrough: int
    nested: int  # notes MIDI cannot keep exact (see nested_same_pitch)

    def summary(self) -> str:
        counts = ", ".join(f"{p} {n}" for p, n in self.per_part.items())
        extra = f"; {self.passthrough} drum-channel notes passed through" if self.passthrough else ""
        if self.nested:
            extra += (f"; {self.nested} note(s) sound inside a longer note of the same pitch and part: "
                      "their ends read back swapped (a MIDI limitation)")
        return f"arranged {self.notes} notes with {self.model}: {counts}{extra}"


def nested_same_pitch(score: Score) -> int:
    """Notes starting after and ending before another note of the same pitch and part.

    One MIDI channel cannot tell such a pair from two overlapping notes, so
    in the written file their ends read back swapped (the notes, onsets and
    the set of ends stay).  The in-memory arrangement is always exact.
    """
    tpb = score.ticks_per_beat
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for n in score.notes:
        on = round(n.onset_beats * tpb)
        end = on + max(1, round(n.duration_beats * tpb))
        channel = n.channel if n.part is None else None  # a part plays on its configured channel
        groups.setdefault((n.part, channel, n.pitch), []).append((on, end))
    nested = 0
    for spans in groups.values():
        latest = -1
        for on, end in sorted(spans):
            nested += end < latest
            latest = max(latest, end)
    return nested


def choose_instrumenter(cfg: "Config", model: str | None = None) -> tuple[Instrumenter, str]:
    """The configured model (falling back when it cannot load) or ``model`` (no fallback)."""
    from coplayer.instrument.baselines import make_instrumenter, make_scorer

    name = model or cfg.instrument.model
    try:
        scorer = make_scorer(name, cfg)
    except ModelError as exc:
        if model is not None:
            raise
        log.warning("%s (arranging with the fallback %r)", exc, cfg.instrument.fallback)
        name = cfg.instrument.fallback
        scorer = make_scorer(name, cfg)
    return make_instrumenter(scorer, cfg), name


def arrange_file(src: str | os.PathLike, dst: str | os.PathLike, cfg: "Config", *,
                 model: str | None = None, plot: str | os.PathLike | None = None) -> Arrangement:
    """Read ``src``, arrange it for the configured parts, write ``dst`` (and a PNG)."""
    check_not_input(src, dst)
    score = read_midi(src)
    instrumenter, name = choose_instrumenter(cfg, model)
    drums = cfg.midi.drum_channel
    result = arrange(score, instrumenter, passthrough_channel=None if drums is None else drums - 1)
    write_midi(
        result,
        dst,
        programs={p.name: p.program for p in cfg.parts},
        channels={p.name: p.channel - 1 for p in cfg.parts},
        tracks=list(cfg.part_names),
    )
    if plot is not None:
        from coplayer.plot import piano_roll_png

        piano_roll_png(result, plot, parts=list(cfg.part_names))
    counts = Counter(n.part for n in result.notes)
    return Arrangement(
        score=result,
        model=name,
        notes=len(result.notes),
        per_part={p: counts.get(p, 0) for p in cfg.part_names},
        passthrough=counts.get(None, 0),
        nested=nested_same_pitch(result),
    )
