"""Note-level accuracy of online instrumentation, as Arranger measures it, and live.

Every note is decided through :meth:`Instrumenter.note_on`, in the order of
a :class:`~coplayer.instrument.protocols.Performance`, with the scorer's own
earlier decisions as history (never the true parts).  Protocol ``a`` is
Arranger's (onset then pitch, timing as written); protocol ``b`` is a
person playing (jitter, chords in random order, varied velocities), with a
fixed seed per piece so that every model hears the same performance.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from coplayer.data.notes import Score
from coplayer.errors import ModelError
from coplayer.instrument.instrumenter import Instrumenter, Scorer
from coplayer.instrument.protocols import PROTOCOLS, perform

DEFAULT_MODEL = "instrument-lstm"

# Arranger (Dong et al., ISMIR 2021), Bach chorales, note-level accuracy in %.
# The third field names our model that corresponds to the row, if any.
PUBLISHED: tuple[tuple[str, float, str | None], ...] = (
    ("zone-based, online", 73.14, "zone"),
    ("closest-pitch + entry hints, online", 68.87, "closest"),
    ("LSTM, online", 93.02, DEFAULT_MODEL),
    ("Transformer decoder, online", 91.51, None),
    ("LSTM + duration, online", 96.17, None),
    ("BiLSTM, offline", 97.13, None),
)


@dataclass
class Result:
    """Counts of one model under one protocol; ``confusion[true, predicted]``."""

    model: str
    protocol: str
    parts: tuple[str, ...]
    confusion: np.ndarray
    pieces: int = 0
    unlabelled: int = 0  # notes of parts the scorer does not know (not counted)
    piece_accuracy: list[float] = field(default_factory=list)
    # (onset size, arrival) -> [correct, notes]: size is how many notes share
    # the note's written onset (capped at MAX_GROUP), arrival its place among
    # them as played (0: first).  Protocol (b) loses most on early arrivals.
    by_arrival: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    @property
    def notes(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def accuracy(self) -> float:
        return self.correct / self.notes if self.notes else float("nan")

    @property
    def per_part(self) -> dict[str, float]:
        """Recall of each true part (share of its notes given to it)."""
        totals = self.confusion.sum(axis=1)
        return {p: (float(self.confusion[k, k] / totals[k]) if totals[k] else float("nan"))
                for k, p in enumerate(self.parts)}

    def to_row(self) -> dict:
        return {
            "model": self.model,
            "protocol": self.protocol,
            "accuracy": round(self.accuracy, 6),
            "notes": self.notes,
            "correct": self.correct,
            "pieces": self.pieces,
            "per_part": {p: round(a, 6) for p, a in self.per_part.items()},
            "parts": list(self.parts),
            "confusion": self.confusion.tolist(),
            "by_arrival": [{"onset_size": k[0], "arrival": k[1], "correct": v[0], "notes": v[1]}
                           for k, v in sorted(self.by_arrival.items())],
        }


MAX_GROUP = 4  # onsets of more notes are counted with the four-note ones


def piece_seed(seed: int, index: int) -> np.random.Generator:
    """The generator of piece ``index``: the same performance for every model."""
    return np.random.default_rng([seed, index])


def decide_piece(instrumenter: Instrumenter, score: Score, protocol: str,
                 rng: np.random.Generator, *, fair_unisons: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Play one piece through the instrumenter: (true, predicted) part indices."""
    labels, predicted, _places = _decide(instrumenter, score, protocol, rng, fair_unisons)
    return labels, predicted


def _decide(instrumenter: Instrumenter, score: Score, protocol: str, rng: np.random.Generator,
            fair_unisons: bool) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """:func:`decide_piece`, plus each note's place, the key of
    :attr:`Result.by_arrival`: (how many notes share its written onset,
    its arrival among them; 0: the first played), both capped."""
    perf = perform(score, list(instrumenter.parts), protocol, rng)
    predicted = np.full(len(score.notes), -1, dtype=np.int64)
    arrival = [0] * len(score.notes)
    arrived: Counter = Counter()
    onsets = [round(n.onset_beats, 6) for n in score.notes]
    instrumenter.reset()
    for ev in perf.events:
        pitch = int(perf.pitches[ev.index])
        if ev.on:
            decision = instrumenter.note_on(pitch, int(perf.velocities[ev.index]), ev.time)
            predicted[ev.index] = decision.part
            arrival[ev.index] = arrived[onsets[ev.index]]
            arrived[onsets[ev.index]] += 1
        else:
            instrumenter.note_off(pitch, ev.time)
    if fair_unisons:
        predicted = match_unisons(score, perf.labels, predicted)
    size = Counter(onsets)
    places = [(min(size[o], MAX_GROUP), min(a, MAX_GROUP - 1)) for o, a in zip(onsets, arrival)]
    return perf.labels, predicted, places


def match_unisons(score: Score, labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Predictions re-paired within unisons, so that their scoring is fair.

    Notes with the same written onset and pitch (two voices on one note) are
    indistinguishable at their note-on: which of them is "the alto" is an
    accident of the file's order.  Within each such group the predicted parts
    are paired with the true parts that they match (a multiset intersection);
    every other note is scored as it is.
    """
    groups: dict[tuple, list[int]] = {}
    for i, n in enumerate(score.notes):
        groups.setdefault((round(n.onset_beats, 6), n.pitch), []).append(i)
    paired = predicted.copy()
    for members in (m for m in groups.values() if len(m) > 1):
        pool = Counter(int(predicted[i]) for i in members)
        unmatched = []
        for i in members:
            if pool[int(labels[i])] > 0:
                pool[int(labels[i])] -= 1
                paired[i] = labels[i]
            else:
                unmatched.append(i)
        for i, part in zip(unmatched, pool.elements()):
            paired[i] = part
    return paired


def evaluate(scorer_factory: Callable[[], Scorer | Instrumenter], scores: Sequence[Score],
             protocol: str = "a", seed: int = 0, *, model: str = "", fair_unisons: bool = True) -> Result:
    """Accuracy of the decisions of ``scorer_factory()`` on ``scores``.

    The factory returns a scorer (wrapped in an Instrumenter without ranges
    or penalties) or a ready :class:`Instrumenter` (e.g. from
    :func:`~coplayer.instrument.baselines.make_instrumenter`, with the
    configured penalties).  It is called once; the instrumenter is reset
    before each piece.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    made = scorer_factory()
    instrumenter = made if isinstance(made, Instrumenter) else Instrumenter(made)
    k = len(instrumenter.parts)
    result = Result(model or type(instrumenter.scorer).__name__, protocol,
                    instrumenter.parts, np.zeros((k, k), dtype=np.int64))
    for i, score in enumerate(scores):
        labels, predicted, places = _decide(instrumenter, score, protocol, piece_seed(seed, i), fair_unisons)
        known = labels >= 0
        np.add.at(result.confusion, (labels[known], predicted[known]), 1)
        for j in np.flatnonzero(known):
            counts = result.by_arrival.setdefault(places[j], [0, 0])
            counts[0] += int(labels[j] == predicted[j])
            counts[1] += 1
        result.unlabelled += int((~known).sum())
        result.pieces += 1
        if known.any():
            result.piece_accuracy.append(float((labels[known] == predicted[known]).mean()))
    return result


# -- which models, and the report ----------------------------------------------


def shipped_instrument_models() -> list[str]:
    """Shipped models whose card says they instrument, the default first.

    A model whose card cannot be read is listed when its name starts with
    ``instrument``, so that evaluating it reports the problem.
    """
    from coplayer.instrument.runner import TASK, read_card, resolve_model, shipped_models

    names = []
    for name in shipped_models():
        try:
            task = read_card(resolve_model(name))["task"]
        except ModelError:
            task = TASK if name.startswith("instrument") else None
        if task == TASK:
            names.append(name)
    return sorted(names, key=lambda n: n != DEFAULT_MODEL)


def default_models() -> list[str]:
    return ["zone", "closest", *shipped_instrument_models()]


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:6.2f}"


def format_table(results: Sequence[Result]) -> str:
    """Ours under (a) and (b) beside Arranger's published figures, then details."""
    by_model: dict[str, dict[str, Result]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.protocol] = r
    published = {ours: (label, value) for label, value, ours in PUBLISHED if ours}
    width = max([len(m) for m in by_model] + [len(label) for label, _, _ in PUBLISHED] + [5])
    head = f"{'model':<{width}}  {'(a) %':>6}  {'(b) %':>6}  {'notes':>6}  published (Arranger) %"
    lines = [head, "-" * len(head)]
    for model, rows in by_model.items():
        acc = {p: rows[p].accuracy if p in rows else None for p in PROTOCOLS}
        notes = max(r.notes for r in rows.values())
        pub = published.get(model) or published.get(Path(model).stem)  # a name or a path
        pub_text = f"{pub[1]:.2f}  ({pub[0]})" if pub else "-"
        lines.append(f"{model:<{width}}  {_pct(acc['a'])}  {_pct(acc['b'])}  {notes:>6}  {pub_text}")
    shown = set(by_model) | {Path(m).stem for m in by_model}
    for label, value, ours in PUBLISHED:
        if ours not in shown:
            lines.append(f"{label:<{width}}  {'-':>6}  {'-':>6}  {'-':>6}  {value:.2f}")
    lines += ["", "(a) Arranger's protocol: onset then pitch, timing as written;",
              "(b) live: +-8 ms jitter, chord notes in random order, varied velocities.",
              "Decisions feed back as history; penalties from the configuration.",
              "Unisons (two voices on one note: same onset and pitch, alike at note-on) are",
              "scored as a set: which of them is 'the alto' is an accident of the file."]
    for r in results:
        lines += ["", f"{r.model}, protocol ({r.protocol}): {_pct(r.accuracy).strip()}% of {r.notes} notes"
                  f" in {r.pieces} pieces"]
        lines.append("  per part: " + ", ".join(f"{p} {_pct(a).strip()}%" for p, a in r.per_part.items()))
        lines.append(_confusion_text(r))
        lines += _arrival_text(r)
    return "\n".join(lines)


def _arrival_text(r: Result) -> list[str]:
    """Accuracy by how many notes share the onset and which of them came first."""
    if not r.by_arrival:
        return []
    lines = ["  by onset size and arrival (notes sharing a written onset; 1st = first played):"]
    for size in sorted({k[0] for k in r.by_arrival}):
        cells = []
        for pos in range(size):
            correct, n = r.by_arrival.get((size, pos), (0, 0))
            if n:
                cells.append(f"{pos + 1}{_ORDINAL.get(pos + 1, 'th')} {_pct(correct / n).strip()}% "
                             f"({n - correct} wrong of {n})")
        label = f"{size}+ notes" if size == MAX_GROUP else f"{size} note{'s' if size > 1 else ''}"
        lines.append(f"    {label:<9} " + ", ".join(cells))
    return lines


_ORDINAL = {1: "st", 2: "nd", 3: "rd"}


def _confusion_text(r: Result) -> str:
    corner = "true/chosen"
    first = max(len(corner), *(len(p) for p in r.parts)) + 2
    w = max(6, *(len(p) for p in r.parts)) + 1
    rows = [f"  {corner:<{first}}" + "".join(f"{p:>{w}}" for p in r.parts)]
    for k, p in enumerate(r.parts):
        rows.append(f"  {p:<{first}}" + "".join(f"{int(c):>{w}}" for c in r.confusion[k]))
    return "\n".join(rows)


def evaluate_models(models: Sequence[str], cfg, scores: Sequence[Score], *, seed: int = 0,
                    protocols: Sequence[str] = PROTOCOLS) -> list[Result]:
    """Each model (a baseline name, shipped model or path) under each protocol."""
    from coplayer.instrument.baselines import make_instrumenter, make_scorer

    results = []
    for name in models:
        scorer = make_scorer(name, cfg)  # loaded once, reset per piece
        for protocol in protocols:
            results.append(evaluate(lambda: make_instrumenter(scorer, cfg), scores, protocol,
                                    seed, model=name))
    return results


def record_metrics(results: Sequence[Result], *, seed: int, cfg) -> list[Path]:
    """Write each shipped model's test accuracies into its model card.

    The card keeps them under ``metrics.test``; ``tests/test_shipped_models.py``
    checks that the shipped model never drops below them.  Baselines and
    models given by path are skipped.
    """
    import json

    from coplayer.instrument.runner import read_card, resolve_model, shipped_models

    shipped = set(shipped_models())
    written = []
    for name in sorted({r.model for r in results} & shipped):
        path = resolve_model(name)
        card = read_card(path)
        rows = {r.protocol: r for r in results if r.model == name}
        card.setdefault("metrics", {})["test"] = {
            "split": "bach_chorales_split.json test", "seed": seed,
            "notes": max(r.notes for r in rows.values()),
            "penalties": {"mono": cfg.instrument.mono_penalty, "range": cfg.instrument.range_penalty},
            **{f"accuracy_{p}": round(r.accuracy, 6) for p, r in sorted(rows.items())},
            **{f"per_part_{p}": {k: round(v, 4) for k, v in r.per_part.items()} for p, r in sorted(rows.items())},
        }
        card_path = path.with_suffix(".json")
        card_path.write_text(json.dumps(card, indent=1) + "\n")
        written.append(card_path)
    return written
