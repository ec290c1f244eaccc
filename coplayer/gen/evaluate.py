"""``coplayer eval continue``: continuation models against the Markov baseline, on the test split.

Two measures, for every model through the same :class:`~coplayer.gen.model.EventModel`
interface and the same :class:`~coplayer.gen.sampler.Sampler`:

**Likelihood.**  The negative log-likelihood of each real test piece, event
by event, each field given the events before it and the fields of its own
event before it (FIELDS order), in bits per event (the sum over the five
fields) and per field.  ``markov-live`` learns every event after predicting
it (the Continuator listening), so its NLL is online and causal.

**Continuations.**  Each test piece is cut at the barline nearest its middle
(at least :data:`MIN_CALL` events before it); the first half is the call.
The model continues it for as many bars as the real second half lasts (at
most :data:`MAX_BARS`), starting at that barline, with the configured
controls, ``samples`` times with the seeds ``seed + piece index * samples +
j`` (the same for every model; one continuation on 37 chorales is too few
to tell models apart: a motif quote more or less moves ``motif_quote`` by
0.027).  Per continuation:

``pc_js``
    Jensen-Shannon divergence (bits, 0..1) between the pitch-class
    histograms (note counts) of the continuation and of the real second half
    over the same bars; 1 when the continuation is empty.  Lower is better.
``in_key``
    Share of continuation notes whose pitch class is in the scale of the key
    detected (Krumhansl-Schmuckler, duration-weighted) from the call; minor
    scales count the leading tone.  Pooled over notes.  Closer to the real
    second half's is better (higher, for tonal music).
``density_ratio``
    Continuation notes / real second-half notes over the same bars;
    geometric mean over pieces (empty continuations are counted in
    ``empty``, not in the mean).  Closer to 1 is better.
``range_kept``
    Share of continuation notes within their part's pitch range in the
    call widened by :data:`RANGE_SLACK` semitones each side (a part absent
    from the call: the call's whole range).  Pooled over notes.  Higher.
``motif_quote``
    Share of continuations that quote the call's motif: some part of the
    continuation (its notes in onset order, the top one per onset) holds
    three consecutive melodic intervals (4 notes, exact semitones, any
    transposition) equal to three consecutive intervals of the motif, the
    first 8 notes of the call's top part with at least 4 notes (as
    :class:`~coplayer.gen.sampler.Motif`); all-unison patterns do not count.
    Higher shows long-term reuse; the real second half gives the composer's rate.

The ``real second half`` column gives the same measures for the true second
half (its ``pc_js`` compares the call with the second half: what repeating
the call's pitch classes would score).

**--quick.**  The same measures on a fixed draw of :data:`QUICK_PIECES` test
pieces per corpus (seeded by the corpus name) with :data:`QUICK_SAMPLES`
continuations each, and a melody corpus only once it is parsed: the headline
figures in a minute or two.  Its rows say ``protocol: quick``; they indicate,
they are not comparable with the full protocol's figures, which stays the
default (the one ``make eval``, the model cards and the README report).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from coplayer.errors import CoplayerError
from coplayer.gen.encoding import FIELDS, Encoding
from coplayer.gen.markov import MarkovModel, piece_nll_bits
from coplayer.gen.sampler import Context, Controls, Motif, Sampler, detect_key

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config
    from coplayer.gen.data import EventPiece
    from coplayer.gen.model import EventModel
    from coplayer.progress import Progress

MIN_CALL = 8  # events
MAX_BARS = 8
RANGE_SLACK = 3  # semitones
METRICS = ("pc_js", "in_key", "density_ratio", "range_kept", "motif_quote")
# --quick: the headline figures in a minute or two (2 cores), an indication only.
QUICK_PIECES = 8  # per corpus
QUICK_SAMPLES = 2  # continuations per piece
QUICK_SEED = 19  # fixed: every quick run measures the same pieces
QUICK_WARNING = ("QUICK: a fixed draw of a few test pieces per corpus and fewer continuations, an indication "
                 "only:\nnot comparable with the full protocol's figures (coplayer eval continue), which are "
                 "the ones to report.")
BETTER = {"nll_bits_per_event": "lower", "pc_js": "lower", "in_key": "closer to real",
          "density_ratio": "closer to 1", "range_kept": "higher", "motif_quote": "higher"}


# -- cutting a piece ----------------------------------------------------------------


@dataclass
class Cut:
    """A test piece cut at a barline: the call, the real continuation and its length."""

    call: slice
    real: slice
    start: int  # ticks from the last call onset to the cut
    bars: int
    bar_ticks: int


def cut_piece(events: np.ndarray, pos: np.ndarray, bar_ticks: int) -> Cut | None:
    """The barline nearest the middle with at least MIN_CALL events before it and one after."""
    onsets = np.cumsum(events[:, 0])
    ends = onsets + events[:, 3] + 1
    barlines = np.unique(onsets - pos)
    first, last = onsets[0], int(ends.max())
    candidates = [b for b in barlines.tolist()
                  if np.count_nonzero(onsets < b) >= MIN_CALL and np.count_nonzero(onsets >= b) >= 1]
    if not candidates:
        return None
    middle = (first + last) / 2
    cut = min(candidates, key=lambda b: (abs(b - middle), b))
    n_call = int(np.count_nonzero(onsets < cut))
    bars = int(min(MAX_BARS, max(1, math.ceil((last - cut) / bar_ticks))))
    n_real = int(np.count_nonzero(onsets < cut + bars * bar_ticks))
    return Cut(slice(0, n_call), slice(n_call, n_real), int(cut - onsets[n_call - 1]), bars, bar_ticks)


# -- measures of one piece ------------------------------------------------------------


def js_divergence(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two histograms (1 if either is empty)."""
    if a.sum() <= 0 or b.sum() <= 0:
        return 1.0
    p, q = a / a.sum(), b / b.sum()
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return (kl(p) + kl(q)) / 2


def lines(parts: np.ndarray, onsets: np.ndarray, pitches: np.ndarray) -> list[np.ndarray]:
    """Each part's pitches in onset order, the top one per onset."""
    out = []
    for p in np.unique(parts):
        sel = np.flatnonzero(parts == p)
        order = sel[np.lexsort((-pitches[sel], onsets[sel]))]
        on = onsets[order]
        keep = np.concatenate([[True], np.diff(on) > 0])
        out.append(pitches[order][keep])
    return out


def motif_patterns(motif: Motif | None) -> set[tuple[int, int, int]]:
    if motif is None:
        return set()
    iv = motif.intervals[1:]
    pats = {tuple(iv[i:i + 3]) for i in range(len(iv) - 2)}
    return {p for p in pats if any(p)}


def quotes(patterns: set[tuple[int, int, int]], parts, onsets, pitches) -> bool:
    for line in lines(parts, onsets, pitches):
        iv = np.diff(line).tolist()
        if any(tuple(iv[i:i + 3]) in patterns for i in range(len(iv) - 2)):
            return True
    return False


@dataclass
class Tally:
    """Sums over pieces of one model (or of the real second halves)."""

    pieces: int = 0
    notes: int = 0
    js: float = 0.0
    in_key: int = 0
    in_range: int = 0
    log_density: float = 0.0
    dense_pieces: int = 0
    empty: int = 0
    with_motif: int = 0
    quoting: int = 0
    seconds: float = 0.0

    def add(self, notes: tuple[np.ndarray, np.ndarray, np.ndarray], real_pc: np.ndarray,
            real_count: int, key, patterns, ranges, js: float | None = None) -> None:
        parts, onsets, pitches = notes
        self.pieces += 1
        self.notes += len(pitches)
        hist = np.bincount(pitches % 12, minlength=12).astype(float)
        self.js += js_divergence(hist, real_pc) if js is None else js
        if key is not None:
            self.in_key += int(np.isin(pitches % 12, key.scale).sum())
        low, high = ranges
        self.in_range += int(((pitches >= low[parts]) & (pitches <= high[parts])).sum())
        if len(pitches) and real_count:
            self.log_density += math.log(len(pitches) / real_count)
            self.dense_pieces += 1
        elif not len(pitches):
            self.empty += 1
        if patterns:
            self.with_motif += 1
            self.quoting += quotes(patterns, parts, onsets, pitches)

    def metrics(self) -> dict:
        n = max(self.notes, 1)
        return {
            "pc_js": self.js / max(self.pieces, 1),
            "in_key": self.in_key / n,
            "density_ratio": math.exp(self.log_density / self.dense_pieces) if self.dense_pieces else float("nan"),
            "range_kept": self.in_range / n,
            "motif_quote": self.quoting / self.with_motif if self.with_motif else float("nan"),
            "empty": self.empty,
            "continuation_notes": self.notes,
            "pieces": self.pieces,
        }


def call_ranges(call: Context, n_parts: int) -> tuple[np.ndarray, np.ndarray]:
    low = np.full(n_parts, call.pitches.min() - RANGE_SLACK)
    high = np.full(n_parts, call.pitches.max() + RANGE_SLACK)
    for p in np.unique(call.parts):
        sel = call.pitches[call.parts == p]
        low[p], high[p] = sel.min() - RANGE_SLACK, sel.max() + RANGE_SLACK
    return low, high


# -- evaluation of models ---------------------------------------------------------------


@dataclass
class SourceResult:
    nll_bits: np.ndarray = field(default_factory=lambda: np.zeros(len(FIELDS)))
    events: int = 0
    pieces: list[Tally] = field(default_factory=list)  # one per test piece, over its samples


BOOTSTRAP = 200  # resamples of the test pieces behind each standard error


def stderr(pieces: Sequence[Tally], draws: int = BOOTSTRAP, seed: int = 0) -> dict[str, float]:
    """Standard error of each measure in METRICS: the spread of the measure
    over bootstrap resamples of the test pieces (with all their samples), so
    two models whose difference is within it are not told apart."""
    if len(pieces) < 2:
        return {m: float("nan") for m in METRICS}
    rng = np.random.default_rng(seed)
    rows = [_merge([pieces[i] for i in rng.integers(0, len(pieces), len(pieces))]).metrics() for _ in range(draws)]
    out = {}
    for m in METRICS:
        v = np.array([r[m] for r in rows], dtype=float)
        v = v[np.isfinite(v)]
        out[m] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return out


@dataclass
class Result:
    """One model on the test pieces, per source ('bach', 'essenFolksong', ...)."""

    model: str
    protocol: str = "full"  # or "quick": a few pieces and samples, an indication only
    by_source: dict[str, SourceResult] = field(default_factory=dict)
    reference: dict[str, Tally] = field(default_factory=dict)

    def _nll(self, sources: Sequence[str]) -> tuple[np.ndarray, int]:
        bits = sum((self.by_source[s].nll_bits for s in sources), np.zeros(len(FIELDS)))
        return bits, sum(self.by_source[s].events for s in sources)

    @staticmethod
    def _row(bits: np.ndarray, events: int, pieces: list[Tally]) -> dict:
        n = max(events, 1)
        tally = _merge(pieces)
        row = {"nll_bits_per_event": float(bits.sum() / n),
               "nll_bits_per_field": {f: float(b / n) for f, b in zip(FIELDS, bits)},
               "events": events, **tally.metrics()}
        row["notes_per_second"] = tally.notes / tally.seconds if tally.seconds else float("nan")
        row["stderr"] = stderr(pieces)
        return row

    def to_row(self) -> dict:
        sources = list(self.by_source)
        bits, events = self._nll(sources)
        pieces = [t for s in sources for t in self.by_source[s].pieces]
        row = {"model": self.model, "protocol": self.protocol, **self._row(bits, events, pieces)}
        row["by_source"] = {s: self._row(r.nll_bits, r.events, r.pieces) for s, r in self.by_source.items()}
        ref = _merge(list(self.reference.values()))
        row["reference"] = {k: v for k, v in ref.metrics().items() if k in METRICS or k == "pieces"}
        return _rounded(row)


def _merge(tallies: Sequence[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        for name in out.__dataclass_fields__:
            setattr(out, name, getattr(out, name) + getattr(t, name))
    return out


def _rounded(x):
    if isinstance(x, float):
        return None if x != x else round(x, 5)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


class _Evaluation:
    """One model's running totals, a test piece at a time."""

    def __init__(self, model: "EventModel", name: str, cfg: "Config", seed: int, samples: int,
                 protocol: str = "full") -> None:
        self.model, self.result = model, Result(name, protocol)
        self.live = isinstance(model, MarkovModel) and model.adapt
        self.controls = Controls.from_config(cfg)
        self.sampler = Sampler(model, self.controls)
        self.seed, self.samples = seed, samples

    def add(self, i: int, piece: "EventPiece") -> None:
        """Test piece number ``i``: its NLL, and ``samples`` continuations of its first half."""
        from coplayer.gen.continue_file import respond
        from coplayer.gen.data import bar_ticks as ticks_in_bar

        enc: Encoding = self.model.encoding
        src = self.result.by_source.setdefault(piece.source, SourceResult())
        ref = self.result.reference.setdefault(piece.source, Tally())
        if self.live:
            self.model.forget()
        src.nll_bits += piece_nll_bits(self.model, piece.events, piece.pos).sum(axis=0)
        src.events += len(piece)
        cut = cut_piece(piece.events, piece.pos, ticks_in_bar(piece.meter, enc))
        if cut is None:
            return
        call_ev, call_pos = piece.events[cut.call], piece.pos[cut.call]
        call = Context.from_events(call_ev, call_pos)
        real = Context.from_events(piece.events[cut.real], piece.pos[cut.real])
        key = detect_key(call.pitches, call.durs)
        patterns = motif_patterns(Motif.from_context(call, cut.bar_ticks, len(enc.parts)))
        ranges = call_ranges(call, len(enc.parts))
        real_pc = np.bincount(real.pitches % 12, minlength=12).astype(float)
        tally = Tally()
        for j in range(self.samples):
            self.controls.set(seed=self.seed + i * self.samples + j)
            resp = respond(self.sampler, call_ev, call_pos, cut.bars, start=cut.start, bar_ticks=cut.bar_ticks)
            gen = Context.from_events(resp.events, resp.pos)
            tally.add((gen.parts, gen.onsets, gen.pitches), real_pc, len(real), key, patterns, ranges)
            tally.seconds += resp.seconds
        src.pieces.append(tally)
        call_pc = np.bincount(call.pitches % 12, minlength=12).astype(float)
        ref.add((real.parts, real.onsets, real.pitches), real_pc, len(real), key, patterns, ranges,
                js=js_divergence(call_pc, real_pc))


def evaluate_model(model: "EventModel", name: str, pieces: Sequence["EventPiece"], cfg: "Config",
                   seed: int = 0, *, samples: int = 1) -> Result:
    """NLL and continuation measures of one model on ``pieces``."""
    evaluation = _Evaluation(model, name, cfg, seed, samples)
    for i, piece in enumerate(pieces):
        evaluation.add(i, piece)
    return evaluation.result


# -- which models and pieces -------------------------------------------------------------


def shipped_continuation_models() -> list[str]:
    """Shipped ONNX continuation models (cards with task 'continue' beside an .onnx)."""
    import json
    from importlib import resources

    assets = resources.files("coplayer").joinpath("assets")
    names = []
    if assets.is_dir():
        for p in assets.iterdir():
            if p.name.endswith(".json") and assets.joinpath(p.name[:-5] + ".onnx").is_file():
                try:
                    card = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(card, dict) and card.get("task") == "continue":
                    names.append(p.name[:-5])
    return sorted(names)


def default_models() -> list[str]:
    return ["markov", "markov-live", *shipped_continuation_models()]


def test_pieces(encoding: Encoding, limit: int | None = None, sources: Sequence[str] | None = None,
                parse: bool = True) -> tuple[list["EventPiece"], list[str]]:
    """Chorale test pieces, then melody test pieces when their corpus is available; notes on what is missing.

    ``sources`` picks corpora (default: the chorales and every melody corpus;
    the first use of a melody corpus parses it, minutes, then it is cached;
    with ``parse`` false a melody corpus not parsed yet is left out instead).
    """
    from coplayer.gen.data import MELODY_CORPORA, load_pieces, melodies_parsed

    sources = ("bach", *MELODY_CORPORA) if sources is None else tuple(sources)
    pieces = load_pieces("test", encoding, ("bach",))[:limit] if "bach" in sources else []
    notes = []
    for corpus in (c for c in MELODY_CORPORA if c in sources):
        try:
            if not parse and not melodies_parsed():
                notes.append(f"{corpus} left out: its melodies are not parsed yet (the full protocol "
                             "parses them once, minutes, then --quick includes them)")
                continue
            pieces += load_pieces("test", encoding, (corpus,))[:limit]
        except CoplayerError as exc:
            notes.append(f"{corpus} left out: {exc}")
    return pieces, notes


def quick_subset(pieces: Sequence["EventPiece"], per_source: int | None = None) -> list["EventPiece"]:
    """``--quick``'s pieces: a fixed draw of ``per_source`` pieces of each corpus, in their order.

    Seeded by the corpus name, so every quick run measures the same pieces of
    a corpus, whichever other corpora it includes (``per_source``: QUICK_PIECES)."""
    per_source = per_source or QUICK_PIECES
    out = []
    for source in dict.fromkeys(p.source for p in pieces):
        mine = [p for p in pieces if p.source == source]
        rng = np.random.default_rng([QUICK_SEED, zlib.crc32(source.encode())])
        out += [mine[k] for k in sorted(rng.choice(len(mine), size=min(per_source, len(mine)), replace=False))]
    return out


def evaluate_models(names: Sequence[str], cfg: "Config", pieces: Sequence["EventPiece"], seed: int = 0,
                    samples: int = 1, progress: "Progress | None" = None, protocol: str = "full") -> list[Result]:
    """Every model on every piece.  The models take each piece in turn, so the
    pace (and ``progress``'s estimate of the time left) stays even throughout:
    ``progress`` advances once per piece, weighted by the piece's events.
    ``protocol`` labels the results ('full', or 'quick' for --quick)."""
    from coplayer.gen.continue_file import load_event_model

    evaluations = [_Evaluation(load_event_model(name), name, cfg, seed, samples, protocol) for name in names]
    for i, piece in enumerate(pieces):
        for evaluation in evaluations:
            evaluation.add(i, piece)
        if progress:
            progress.advance(len(piece), note=piece.source)
    return [e.result for e in evaluations]


# -- the report --------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def format_table(results: Sequence[Result]) -> str:
    """Per source and overall: metric rows, one column per model, then the real second half."""
    rows = [r.to_row() for r in results]
    if not rows:
        return "no models"
    sections = [("all test pieces", [r for r in rows], lambda r: r, rows[0]["reference"])]
    sources = list(rows[0]["by_source"])
    if len(sources) > 1:
        for s in sources:
            ref = _merge([results[0].reference[s]]).metrics()
            sections.append((s, rows, lambda r, s=s: r["by_source"][s], ref))
    width = max(14, *(len(r["model"]) for r in rows))
    metric_names = ["nll_bits_per_event", *(f"  {f}" for f in FIELDS), *METRICS, "empty",
                    "continuation_notes", "notes_per_second"]
    out = []
    if any(r["protocol"] == "quick" for r in rows):
        out += [QUICK_WARNING, ""]
    for title, rs, pick, ref in sections:
        head = f"{title:<22}" + "".join(f"{r['model']:>{width + 2}}" for r in rs) + f"{'real 2nd half':>{width + 2}}  better"
        out += [head, "-" * len(head)]
        for m in metric_names:
            values = []
            for r in rs:
                d = pick(r)
                v = _fmt(d["nll_bits_per_field"][m.strip()] if m.startswith("  ") else d.get(m))
                se = d["stderr"].get(m) if m in METRICS else None
                values.append(v if se is None or se != se else f"{v}\u00b1{se:.3f}")
            refv = ref.get(m) if m in METRICS else None
            line = f"{m:<22}" + "".join(f"{v:>{width + 2}}" for v in values) + f"{_fmt(refv):>{width + 2}}"
            out.append(line + (f"  {BETTER[m]}" if m in BETTER else ""))
        out.append(f"{'pieces / events':<22}" + "".join(
            f"{str(pick(r)['pieces']) + ' / ' + str(pick(r)['events']):>{width + 2}}" for r in rs))
        out.append("")
    out.append("NLL: bits per event (sum of the fields) of the real test pieces; markov-live learns each")
    out.append("event after predicting it.  Continuations: from the first half of each piece, as many bars")
    out.append("as the real second half (at most 8), configured controls, --samples per piece, "
               "seeds = --seed + piece index * samples + j.")
    out.append("real 2nd half: the same measures of the true second half (pc_js: first vs second half).")
    out.append(f"\u00b1: standard error, from {BOOTSTRAP} bootstrap resamples of the test pieces; a difference "
               "within it is noise.")
    return "\n".join(out)
