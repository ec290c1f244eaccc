"""The solo that ``coplayer demo`` plays: chorale phrases on one keyboard, with room for the answers.

    python -m coplayer.data.demo_solo [--out coplayer/assets/demo-solo.mid]

(needs music21, the ``[train]`` extra, for the corpus and its fermatas).

The piece is :data:`PIECE`, a chorale of the held-out **test** split, so no
shipped model was trained on it.  Its four voices are merged into one
keyboard part (a unison becomes one key; a voice arriving on a key another
voice holds re-strikes it), and its first :data:`PHRASES` phrases are cut at
the soprano's fermatas.  After each phrase come :data:`GAP_BARS` bars of
rest: with the default configuration the phrase end is heard 2 beats after
the last note-on (when the fermata is released) and a 2-bar answer starts on
the next beat, so it ends before the next phrase.  Only whole bars are
inserted, so every note keeps its place in the bar; beat 0 is a barline (the
one-beat pickup starts on beat 3).  4/4 at :data:`BPM`, the configuration's
default tempo, so the engine's internal clock and the file agree.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from importlib import resources
from pathlib import Path

from coplayer.data.notes import Note, Score, TempoMap

ASSET = "demo-solo.mid"
PIECE = "bach/bwv332.mxl"  # G major, phrases of 8 beats after a one-beat pickup
PHRASES = 3
GAP_BARS = 3
BPM = 100.0
VELOCITY = {"soprano": 84, "alto": 66, "tenor": 66, "bass": 74}  # the tune a little on top


def demo_solo_path() -> Path:
    """The shipped solo (``coplayer/assets/demo-solo.mid``)."""
    return Path(str(resources.files("coplayer.assets").joinpath(ASSET)))


def keyboard(notes: list[Note]) -> list[Note]:
    """Voices merged for two hands: per key, a unison is one note and a note struck while the
    key is held cuts the held one (one note-on and one note-off per key at a time)."""
    out: list[Note] = []
    by_pitch: dict[int, list[Note]] = {}
    for n in sorted(notes, key=lambda n: (n.onset_beats, -n.duration_beats)):
        same = by_pitch.setdefault(n.pitch, [])
        if same and same[-1].onset_beats == n.onset_beats:
            continue  # a unison: the longer note (sorted first) stays
        if same and same[-1].end_beats > n.onset_beats:
            same[-1].duration_beats = n.onset_beats - same[-1].onset_beats
        same.append(n)
        out.append(n)
    return sorted(out, key=lambda n: (n.onset_beats, n.pitch))


def solo(score: Score, fermata_ends: list[float], pickup: float, *, phrases: int = PHRASES,
         gap_bars: int = GAP_BARS, beats_per_bar: int = 4, bpm: float = BPM) -> Score:
    """The first ``phrases`` phrases of ``score`` (ending at ``fermata_ends``, in beats of the
    score), ``gap_bars`` bars of rest after each, on one keyboard, beat 0 a barline."""
    if len(fermata_ends) < phrases:
        raise ValueError(f"{score.name} has {len(fermata_ends)} fermatas, {phrases} phrases are wanted")
    bounds = [0.0] + list(fermata_ends[:phrases])
    notes = []
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        move = pickup + k * gap_bars * beats_per_bar
        for n in score.notes:
            if start <= n.onset_beats < end:
                notes.append(replace(n, onset_beats=n.onset_beats + move, part=None, channel=0,
                                     duration_beats=min(n.end_beats, end) - n.onset_beats,
                                     velocity=VELOCITY.get(n.part, 72)))
    out = Score(notes=keyboard(notes), tempo=TempoMap([(0.0, round(60e6 / bpm))]),
                time_signatures=[(0.0, beats_per_bar, 4)], ticks_per_beat=480, parts=[],
                name=f"{_title(score.name)} (Bach chorale, test split): "
                     f"{phrases} phrases on one keyboard, {gap_bars} bars of rest after each")
    return out.fill_seconds()


def _title(key: str) -> str:
    """'bach/bwv332.mxl' -> 'BWV 332'."""
    stem = Path(key).stem
    return f"BWV {stem[3:]}" if stem.startswith("bwv") else stem


def fermatas(key: str) -> list[float]:
    """Where the soprano's fermata notes end, in beats from the first note (music21)."""
    from coplayer.data.corpus import _music21

    _, corpus = _music21()
    from music21 import expressions

    soprano = corpus.parse(key).parts[0].stripTies().flatten()
    return [float(n.offset + n.quarterLength) for n in soprano.notes
            if any(isinstance(e, expressions.Fermata) for e in n.expressions)]


def make_demo_solo(out: str | Path | None = None, piece: str = PIECE) -> Score:
    from coplayer.data.corpus import chorale_meters, load_bach_chorales
    from coplayer.data.midi import write_midi
    from coplayer.data.splits import load_manifest

    if piece not in load_manifest()["test"]:
        raise ValueError(f"{piece} is not in the test split: the demo must play music no model was trained on")
    scores, _ = load_bach_chorales()
    num, den, pickup = chorale_meters()[piece]
    if (num, den) != (4, 4):
        raise ValueError(f"{piece} is in {num}/{den}; the demo solo wants 4/4")
    score = solo(scores[piece], fermatas(piece), pickup)
    write_midi(score, out or demo_solo_path())
    return score


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help=f"default: coplayer/assets/{ASSET}")
    p.add_argument("--piece", default=PIECE, help="corpus key of a 4/4 chorale of the test split")
    args = p.parse_args(argv)
    score = make_demo_solo(args.out, args.piece)
    seconds = max(n.end for n in score.notes)
    print(f"wrote {args.out or demo_solo_path()}: {score.name}; {len(score.notes)} notes, "
          f"{score.end_beats:g} beats, {seconds:.1f} s at {BPM:g} BPM")


if __name__ == "__main__":
    main()
