"""The Bach chorale corpus shipped with music21, as note tables.

Only the four-part pieces of ``corpus.getComposer('bach')`` are kept, their
parts named soprano, alto, tenor and bass (top to bottom), each score's
``time_signatures`` set from the piece's first time signature; its pickup
(the first measure's ``paddingLeft``) is in :func:`chorale_meters`.  Parsing the
whole corpus takes ~40 s on 2 cores, so the parsed notes are cached as one
compressed ``.npz`` keyed by the music21 version and this loader's version.

music21 is only needed to build the cache (the ``train`` extra); reading
the cache needs numpy alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coplayer.data.notes import Note, Score, TempoMap
from coplayer.errors import DataError, MissingExtraError

log = logging.getLogger(__name__)

SATB = ("soprano", "alto", "tenor", "bass")
CHORALE_BPM = 100.0  # chorales carry no tempo; seconds use this one
LOADER_VERSION = 2  # 2: time signature and pickup of each piece


@dataclass
class CorpusReport:
    """What the loader kept, skipped and grouped."""

    found: int = 0
    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(path)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def cache_dir() -> Path:
    root = os.environ.get("COPLAYER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coplayer"
    )
    return Path(root)


def _music21():
    try:
        import music21  # noqa: F401
        from music21 import corpus
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingExtraError(
            "the Bach chorale corpus needs music21: pip install 'coplayer[train]'"
        ) from exc
    return music21, corpus


def corpus_key(path: Path) -> str:
    """A corpus path relative to the music21 corpus root, e.g. 'bach/bwv1.6.mxl'."""
    return f"{path.parent.name}/{path.name}"


def meter_of(part) -> tuple[int, int, float]:
    """A music21 part's first time signature (numerator, denominator; 4/4 if none) and pickup.

    The pickup is the first measure's ``paddingLeft`` in quarter lengths: the
    part of the bar *missing* before the first note (0 if the piece starts on a
    barline).
    """
    ts = next(iter(part.recurse().getElementsByClass("TimeSignature")), None)
    num, den = (int(ts.numerator), int(ts.denominator)) if ts is not None else (4, 4)
    first = next(iter(part.getElementsByClass("Measure")), None)
    pickup = float(first.paddingLeft) if first is not None else 0.0
    return num, den, pickup


def _parse_piece(path: str) -> tuple[str, tuple[list[tuple[float, float, int, int]], tuple[int, int, float]] | str]:
    """Parse one chorale in a worker: (key, (rows, meter)) or (key, reason it was skipped)."""
    _, corpus = _music21()
    key = corpus_key(Path(path))
    try:
        # forceSource: music21's own pickle cache is shared by every process
        # parsing at once (a training run beside the tests): racing on it
        # made sound chorales fail as "unparseable", and that was cached.
        score = corpus.parse(path, forceSource=True)
    except Exception as exc:  # music21 raises many unrelated types on bad files
        return key, f"unparseable ({type(exc).__name__})"
    parts = list(score.parts)
    if len(parts) != 4:
        return key, f"{len(parts)} parts, not 4"
    rows: list[tuple[float, float, int, int]] = []
    for index, part in enumerate(parts):
        for n in part.stripTies().flatten().notes:
            if n.duration.isGrace or float(n.quarterLength) <= 0:
                continue
            for p in getattr(n, "pitches", ()):  # a chord in one voice keeps all its notes
                rows.append((float(n.offset), float(n.quarterLength), int(p.midi), index))
    if not rows:
        return key, "no notes"
    return key, (rows, meter_of(parts[0]))


def _rows_to_score(key: str, rows: np.ndarray, meter: tuple[int, int] = (4, 4)) -> Score:
    tempo = TempoMap([(0.0, round(60e6 / CHORALE_BPM))])
    notes = [
        Note(
            pitch=int(p),
            velocity=80,
            onset=0.0,
            duration=0.0,
            onset_beats=float(o),
            duration_beats=float(d),
            part=SATB[int(k)],
        )
        for o, d, p, k in rows
    ]
    score = Score(notes=notes, tempo=tempo, parts=list(SATB), name=key, ticks_per_beat=480,
                  time_signatures=[(0.0, int(meter[0]), int(meter[1]))])
    return score.fill_seconds().sort()


def chorale_cache_path() -> Path:
    music21, _ = _music21()
    tag = f"{music21.__version__}-v{LOADER_VERSION}"
    return cache_dir() / f"bach-chorales-{tag}.npz"


def _build_cache(path: Path, workers: int) -> None:
    _, corpus = _music21()
    files = [str(p) for p in corpus.getComposer("bach")]
    log.info("parsing %d Bach files with music21 (cached afterwards in %s)", len(files), path)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_parse_piece, files, chunksize=4))
    write_cache(path, results)


CACHE_ARRAYS = ("keys", "lengths", "rows", "meters", "skipped", "reasons")


def write_cache(path: Path, results: list[tuple[str, str | tuple[list, tuple]]]) -> None:
    """Write parsed pieces as one npz, atomically.

    ``results`` are (key, reason skipped) or (key, (rows, (numerator,
    denominator, pickup))); the rows of every kept piece are stored back to
    back with their lengths.
    """
    keys, skipped, reasons, arrays, meters = [], [], [], [], []
    for key, result in results:
        if isinstance(result, str):
            skipped.append(key)
            reasons.append(result)
        else:
            keys.append(key)
            arrays.append(np.asarray(result[0], dtype=np.float64))
            meters.append(result[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # two builders at once must not share it
    np.savez_compressed(
        tmp,
        keys=np.array(keys),
        lengths=np.array([len(a) for a in arrays], dtype=np.int64),
        rows=np.concatenate(arrays),
        meters=np.asarray(meters, dtype=np.float64).reshape(-1, 3),  # numerator, denominator, pickup
        skipped=np.array(skipped),
        reasons=np.array(reasons),
    )
    os.replace(tmp, path)


def read_cache(path: Path, what: str) -> dict[str, np.ndarray]:
    """The arrays :func:`write_cache` wrote; DataError naming ``what`` if the file is unreadable."""
    try:
        with np.load(path) as data:
            return {k: data[k] for k in CACHE_ARRAYS}
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{what} cache {path} is unreadable ({exc}); delete it to rebuild") from exc


def _load_cache(workers: int | None = None) -> dict[str, np.ndarray]:
    path = chorale_cache_path()
    if not path.exists():
        _build_cache(path, workers or min(2, os.cpu_count() or 1))
    return read_cache(path, "corpus")


def chorale_meters(workers: int | None = None) -> dict[str, tuple[int, int, float]]:
    """Each chorale's first time signature and pickup: key -> (numerator, denominator, pickup).

    The pickup is the quarter lengths missing from the first bar (music21's
    ``paddingLeft``): the first barline falls ``bar - pickup`` quarters after
    the first note when ``pickup > 0``.
    """
    data = _load_cache(workers)
    return {str(k): (int(m[0]), int(m[1]), float(m[2])) for k, m in zip(data["keys"], data["meters"])}


def load_bach_chorales(workers: int | None = None) -> tuple[dict[str, Score], CorpusReport]:
    """All four-part Bach chorales by corpus key, and what was skipped."""
    data = _load_cache(workers)
    keys, lengths, rows, meters = data["keys"], data["lengths"], data["rows"], data["meters"]
    skipped, reasons = data["skipped"], data["reasons"]
    report = CorpusReport(found=len(keys) + len(skipped), kept=len(keys))
    for key, reason in zip(skipped, reasons):
        report.skip(str(key), str(reason))
    scores: dict[str, Score] = {}
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for i, key in enumerate(keys):
        scores[str(key)] = _rows_to_score(str(key), rows[starts[i] : starts[i + 1]], meters[i][:2])
    return scores, report


def harmonisation_signature(score: Score) -> str:
    """Identical for two pieces with the same notes up to transposition."""
    low = min(n.pitch for n in score.notes)
    rows = sorted(
        (round(n.onset_beats * 480), round(n.duration_beats * 480), n.pitch - low, n.part)
        for n in score.notes
    )
    return hashlib.sha1(repr(rows).encode()).hexdigest()
