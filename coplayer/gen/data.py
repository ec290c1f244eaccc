"""Training data of the continuation models: pieces as event sequences.

Two sources, both shipped with music21:

* the four-part Bach chorales (:mod:`coplayer.data.corpus`), split by the
  committed chorale manifest (:mod:`coplayer.data.splits`);
* monophonic melodies: the Essen folk songs (``essenFolksong``, abc files of
  hundreds of tunes each) and Ryan's Mammoth Collection (``ryansMammoth``),
  their melody notes played by the part ``soprano``.  Each tune is assigned
  to train/valid/test 8:1:1 by a hash of ``<corpus path>#<tune index>``
  (:func:`melody_split_of`), duplicate tunes kept together
  (:func:`assign_melody_splits`); the valid and test tunes are committed as
  ``coplayer/data/melodies_split.json`` (``python -m coplayer.gen.data``).

Every piece keeps its meter and pickup, so the position in the bar of each
event (``pos``) counts ticks from the piece's real barlines: ``pos`` =
ticks since the last barline of the piece's first time signature, clipped to
``POS_CLASSES - 1`` (bars up to 8 quarters long are exact).

Parsing the melodies takes minutes, so the parsed notes are cached as one
``.npz`` in :func:`coplayer.data.corpus.cache_dir` (music21 is needed only to
build it).  Tunes and files that fail to parse are skipped and counted in a
:class:`~coplayer.data.corpus.CorpusReport`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from coplayer.data.corpus import (CorpusReport, _music21, cache_dir, chorale_meters, corpus_key, meter_of, read_cache,
                                  write_cache)
from coplayer.data.splits import SPLITS, load_split
from coplayer.errors import DataError
from coplayer.gen.encoding import FIELDS, Encoding

log = logging.getLogger(__name__)

MELODY_CORPORA = ("essenFolksong", "ryansMammoth")
SOURCES = ("bach", *MELODY_CORPORA)
MELODY_LOADER_VERSION = 1
MELODY_MANIFEST = "melodies_split.json"
MELODY_PART = "soprano"
DEFAULT_VELOCITY = 80  # the corpora carry no dynamics
POS_CLASSES = 96  # 8 quarters of 12 ticks: the longest bar kept exactly (4/2, 12/8 fit)
MIN_NOTES = 4


@dataclass
class EventPiece:
    """One piece as events: ``events`` [N,5] int64 (fields in FIELDS order), ``pos`` [N] int64."""

    key: str
    source: str  # 'bach' or a melody corpus name
    events: np.ndarray
    pos: np.ndarray
    meter: tuple[int, int] = (4, 4)
    pickup: float = 0.0

    def __len__(self) -> int:
        return len(self.events)


# -- notes -> events ---------------------------------------------------------------


def bar_ticks(meter: tuple[int, int], encoding: Encoding) -> int:
    """Grid ticks in one bar of ``meter`` (numerator, denominator)."""
    num, den = meter
    return max(1, round(num * 4 / den * encoding.ticks_per_beat))


def encode_arrays(onset: np.ndarray, dur: np.ndarray, pitch: np.ndarray, part: np.ndarray,
                  velocity: np.ndarray | int, encoding: Encoding, meter: tuple[int, int] = (4, 4),
                  pickup: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Note columns (beats, part indices) -> (events [N,5], pos [N]), as :meth:`Encoding.encode`.

    The same order (onset, then part, then higher pitch first) and rounding as
    ``Encoding.encode(notes, start_beat=-pickup)``, vectorised; ``pos`` counts
    ticks from the barlines of ``meter`` (the first one ``pickup`` quarters of
    the bar are missing before the first note), clipped to ``POS_CLASSES - 1``.
    """
    tpb = encoding.ticks_per_beat
    ticks = np.round((np.asarray(onset, dtype=np.float64) + pickup) * tpb).astype(np.int64)
    pitch = np.asarray(pitch, dtype=np.int64)
    part = np.asarray(part, dtype=np.int64)
    order = np.lexsort((-pitch, part, ticks))
    ticks, pitch, part = ticks[order], pitch[order], part[order]
    dur_ticks = np.round(np.asarray(dur, dtype=np.float64)[order] * tpb).astype(np.int64)
    vel = np.broadcast_to(np.asarray(velocity, dtype=np.int64), order.shape)[order]
    events = np.empty((len(order), len(FIELDS)), dtype=np.int64)
    events[:, 0] = np.minimum(encoding.max_shift, np.diff(ticks, prepend=ticks[:1]))
    events[:, 1] = part
    events[:, 2] = pitch
    events[:, 3] = np.clip(dur_ticks, 1, encoding.max_dur) - 1
    events[:, 4] = np.minimum(encoding.vel_buckets - 1, vel * encoding.vel_buckets // 128)
    pos = np.minimum(ticks % bar_ticks(meter, encoding), POS_CLASSES - 1)
    return events, pos


# -- chorales ------------------------------------------------------------------------


def chorale_pieces(split: str, encoding: Encoding | None = None) -> list[EventPiece]:
    """The chorales of one split of the committed manifest, as events."""
    encoding = encoding or Encoding()
    meters = chorale_meters()
    index = {p: i for i, p in enumerate(encoding.parts)}
    pieces = []
    for score in load_split(split):
        notes = score.notes
        num, den, pickup = meters[score.name]
        events, pos = encode_arrays(
            np.array([n.onset_beats for n in notes]), np.array([n.duration_beats for n in notes]),
            np.array([n.pitch for n in notes]), np.array([index[n.part] for n in notes]),
            np.array([n.velocity for n in notes]), encoding, (num, den), pickup)
        pieces.append(EventPiece(score.name, "bach", events, pos, (num, den), pickup))
    return pieces


# -- melodies: parsing and cache ---------------------------------------------------------


def _melody_rows(score) -> tuple[list[tuple[float, float, int]], tuple[int, int, float]] | str:
    """The melody (first part, top note of any chord, ties merged) of one tune."""
    from music21 import harmony

    parts = list(score.parts)
    if not parts:
        return "no parts"
    part = parts[0]
    rows = []
    for n in part.stripTies().flatten().notes:
        if isinstance(n, harmony.Harmony) or n.duration.isGrace or float(n.quarterLength) <= 0:
            continue
        pitches = getattr(n, "pitches", ())
        if pitches:
            rows.append((float(n.offset), float(n.quarterLength), max(int(p.midi) for p in pitches)))
    if len(rows) < MIN_NOTES:
        return f"fewer than {MIN_NOTES} notes"
    # One note per onset: a melody line (unisons and double stops keep the top).
    rows.sort(key=lambda r: (r[0], -r[2]))
    mono = [r for i, r in enumerate(rows) if i == 0 or r[0] != rows[i - 1][0]]
    return mono, meter_of(part)


def _parse_melody_file(path: str) -> list[tuple[str, tuple | str]]:
    """Parse one abc file in a worker: [(tune key, (rows, meter) or reason skipped)]."""
    _, corpus = _music21()
    from music21 import stream

    key = corpus_key(Path(path))
    try:
        parsed = corpus.parse(path, forceSource=True)  # see corpus._parse_piece
    except Exception as exc:  # music21 raises many unrelated types on bad files
        return [(f"{key}#*", f"unparseable file ({type(exc).__name__})")]
    scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
    out = []
    for i, score in enumerate(scores):
        try:
            out.append((f"{key}#{i}", _melody_rows(score)))
        except Exception as exc:  # one malformed tune must not lose its file
            out.append((f"{key}#{i}", f"unreadable tune ({type(exc).__name__})"))
    return out


def _melody_cache_path() -> Path:
    music21, _ = _music21()
    return cache_dir() / f"melodies-{music21.__version__}-v{MELODY_LOADER_VERSION}.npz"


def melodies_parsed() -> bool:
    """Whether the melody corpora are parsed and cached (else the first use parses them: minutes)."""
    return _melody_cache_path().exists()


def _build_melody_cache(path: Path, workers: int) -> None:
    _, corpus = _music21()
    files = [str(p) for name in MELODY_CORPORA for p in corpus.getComposer(name)]
    # The big Essen files first, so two workers finish together.
    files.sort(key=lambda f: -os.path.getsize(f))
    log.info("parsing %d melody files with music21 (cached afterwards in %s)", len(files), path)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = [t for tunes in pool.map(_parse_melody_file, files, chunksize=1) for t in tunes]
    results.sort()
    write_cache(path, results)


@dataclass
class Melody:
    """One parsed tune: columns onset, duration (quarters), MIDI pitch; meter and pickup."""

    key: str
    rows: np.ndarray  # [N,3] float64
    meter: tuple[int, int]
    pickup: float

    @property
    def corpus(self) -> str:
        return self.key.split("/", 1)[0]


def load_melodies(workers: int | None = None) -> tuple[dict[str, Melody], CorpusReport]:
    """Every parsed melody by tune key ('essenFolksong/altdeu10.abc#3'), and what was skipped."""
    path = _melody_cache_path()
    if not path.exists():
        _build_melody_cache(path, workers or min(2, os.cpu_count() or 1))
    cache = read_cache(path, "melody")
    keys, lengths, rows, meters = cache["keys"], cache["lengths"], cache["rows"], cache["meters"]
    skipped, reasons = cache["skipped"], cache["reasons"]
    report = CorpusReport(found=len(keys) + len(skipped), kept=len(keys))
    for key, reason in zip(skipped, reasons):
        report.skip(str(key), str(reason))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    melodies = {}
    for i, key in enumerate(keys):
        m = meters[i]
        melodies[str(key)] = Melody(str(key), rows[starts[i]:starts[i + 1]], (int(m[0]), int(m[1])), float(m[2]))
    return melodies, report


# -- melodies: the split ---------------------------------------------------------------


def melody_split_of(key: str) -> str:
    """train/valid/test (8:1:1) from a hash of the tune key '<corpus path>#<index>'."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10
    return "valid" if bucket == 0 else "test" if bucket == 1 else "train"


def melody_signature(melody: Melody) -> str:
    """Identical for two tunes with the same notes up to transposition (and a shift in time)."""
    rows = melody.rows - [melody.rows[0, 0], 0.0, melody.rows[0, 2]]
    return hashlib.sha1(np.round(rows * [48, 48, 1]).astype(np.int64).tobytes()).hexdigest()


def assign_melody_splits(melodies: dict[str, Melody]) -> tuple[dict[str, str], list[list[str]]]:
    """Each tune's split, and the groups of duplicate tunes.

    A tune goes where :func:`melody_split_of` sends it, except that
    duplicates stay together: a group with a member in train goes to train
    (so no valid or test tune is a copy of a training tune), otherwise it
    follows its first member.
    """
    groups: dict[str, list[str]] = {}
    for key in sorted(melodies, key=_key_order):
        groups.setdefault(melody_signature(melodies[key]), []).append(key)
    splits = {}
    for group in groups.values():
        own = [melody_split_of(k) for k in group]
        split = "train" if "train" in own else own[0]
        splits.update((k, split) for k in group)
    return splits, [g for g in groups.values() if len(g) > 1]


def make_melody_manifest(melodies: dict[str, Melody], report: CorpusReport) -> dict:
    """The committed assignment: the valid and test tunes (per abc file, their indices); train is the rest."""
    splits, duplicates = assign_melody_splits(melodies)
    manifest: dict = {
        "corpus": "music21 corpus.getComposer(c) for c in " + ", ".join(MELODY_CORPORA)
                  + "; melody = first part, top note",
        "rule": "sha1('<corpus path>#<tune index>')[:8] as int % 10: 0 valid, 1 test, else train; "
                "duplicates (same notes up to transposition) stay together, in train if one of them is",
        "ratios": [8, 1, 1],
        "counts": {split: sum(1 for s in splits.values() if s == split) for split in SPLITS},
        "skipped": {reason: len(keys) for reason, keys in sorted(report.skipped.items())},
        "duplicate_groups": duplicates,
        "train": "every parsed tune not in valid or test",
    }
    for split in ("valid", "test"):
        files: dict[str, list[int]] = {}
        for key in sorted(melodies, key=_key_order):
            if splits[key] == split:
                path, index = key.rsplit("#", 1)
                files.setdefault(path, []).append(int(index))
        manifest[split] = files
    return manifest


def _key_order(key: str) -> tuple[str, int]:
    path, index = key.rsplit("#", 1)
    return path, int(index)


def melody_manifest_path() -> Path:
    return Path(str(resources.files("coplayer.data").joinpath(MELODY_MANIFEST)))


def load_melody_manifest(path: Path | None = None) -> dict:
    path = path or melody_manifest_path()
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"melody split manifest {path} is unreadable: {exc}; "
                        "rebuild it with python -m coplayer.gen.data") from exc
    missing = [s for s in SPLITS if s not in manifest]
    if missing:
        raise DataError(f"melody split manifest {path} lacks {', '.join(missing)}")
    return manifest


def melody_pieces(split: str, encoding: Encoding | None = None,
                  corpora: tuple[str, ...] = MELODY_CORPORA) -> list[EventPiece]:
    """The melodies of one split of the committed manifest, as events on part ``soprano``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    encoding = encoding or Encoding()
    if MELODY_PART not in encoding.parts:
        raise DataError(f"the encoding has no part {MELODY_PART!r} to play the melodies")
    part = encoding.parts.index(MELODY_PART)
    manifest = load_melody_manifest()
    melodies, _ = load_melodies()
    held_out = {split: [f"{path}#{i}" for path, indices in manifest[split].items() for i in indices]
                for split in ("valid", "test")}
    for name, keys in held_out.items():
        absent = [k for k in keys if k not in melodies]
        if absent:
            raise DataError(f"{len(absent)} tunes of the {name} melody split are not in this music21 corpus "
                            f"(first: {absent[0]}); the manifest was made with another corpus")
    if split == "train":
        excluded = set(held_out["valid"]) | set(held_out["test"])
        keys = [k for k in sorted(melodies, key=_key_order) if k not in excluded]
    else:
        keys = held_out[split]
    keys = [k for k in keys if k.split("/", 1)[0] in corpora]
    pieces = []
    for key in keys:
        m = melodies[key]
        events, pos = encode_arrays(m.rows[:, 0], m.rows[:, 1], m.rows[:, 2], np.full(len(m.rows), part),
                                    DEFAULT_VELOCITY, encoding, m.meter, m.pickup)
        pieces.append(EventPiece(key, m.corpus, events, pos, m.meter, m.pickup))
    return pieces


def load_pieces(split: str, encoding: Encoding | None = None,
                sources: tuple[str, ...] = SOURCES) -> list[EventPiece]:
    """All pieces of one split from ``sources`` ('bach' and/or melody corpora), chorales first."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown source {unknown[0]!r}: choose among {', '.join(SOURCES)}")
    pieces = chorale_pieces(split, encoding) if "bach" in sources else []
    corpora = tuple(s for s in sources if s in MELODY_CORPORA)
    if corpora:
        pieces += melody_pieces(split, encoding, corpora)
    return pieces


def dump_manifest(manifest: dict) -> str:
    """JSON with one line per abc file (a diff shows which tunes moved)."""
    lines = ["{"]
    items = list(manifest.items())
    for i, (key, value) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if key in SPLITS and isinstance(value, dict):
            files = [f"  {json.dumps(path)}: {json.dumps(indices)}" for path, indices in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(files) + f"\n }}{end}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}{end}")
    return "\n".join(lines) + "\n}\n"


def main() -> None:
    melodies, report = load_melodies()
    manifest = make_melody_manifest(melodies, report)
    path = melody_manifest_path()
    path.write_text(dump_manifest(manifest))
    print(f"wrote {path}: {manifest['counts']}, skipped {report.n_skipped} ({manifest['skipped']})")


if __name__ == "__main__":
    main()
