"""Baseline scorers for online instrumentation, and the scorer factory.

Both baselines see only the past, like the models, and implement the
:class:`~coplayer.instrument.instrumenter.Scorer` protocol, so they run
through the same :class:`~coplayer.instrument.instrumenter.Instrumenter`
as an ONNX model (live, in ``coplayer arrange`` and in evaluation):

* :class:`ZoneScorer`: fixed pitch zones learned from the training split
  (Arranger's zone-based baseline).  Each part has a pitch histogram,
  smoothed by a Gaussian fitted to the same notes; the score of a part is
  its posterior log-probability ``log P(part | pitch)`` (the pitch's
  log-likelihood under the part plus the part's log prior).  The fitted
  counts ship as ``coplayer/assets/zone-baseline.json``, so the runtime
  needs no corpus; ``python -m coplayer.instrument.baselines`` refits it.
* :class:`ClosestPitchScorer`: the part whose last pitch is nearest to the
  note (Arranger's closest-pitch baseline, without entry hints: a part with
  no note yet stands at its zone's mean pitch), ties broken by the zones.

:func:`make_scorer` builds a scorer by name for the CLI: ``zone``,
``closest``, or an ONNX model name or path (loaded by
:mod:`coplayer.instrument.runner`).  :func:`make_instrumenter` wraps a
scorer with the part ranges and penalties of the configuration.
"""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

import numpy as np

from coplayer.data.notes import Score
from coplayer.errors import ModelError, one_line
from coplayer.instrument.features import Featurizer, FeatureSpec
from coplayer.instrument.instrumenter import Instrumenter, Penalties, PartRule, Scorer

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config

log = logging.getLogger(__name__)

BASELINES = ("zone", "closest")
ZONE_ASSET = "zone-baseline.json"
ZONE_FORMAT = "coplayer-zone-baseline"
ZONE_VERSION = 1
N_PITCHES = 128
SMOOTHING = 1.0  # pseudo-notes of the fitted Gaussian added to each part's histogram
CLOSEST_SCALE = 0.5  # semitones per nat (best of 0.25..8 on the valid split, config penalties)
TIE_WEIGHT = 1e-3  # weight of the zone log-probabilities that break distance ties


class _Ranged(Protocol):
    name: str
    low: int
    high: int


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x)
    return x - math.log(float(np.exp(x).sum()))


def _gauss_log_pdf(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """(K, 128) log-density of each part's Gaussian at every MIDI pitch."""
    pitches = np.arange(N_PITCHES, dtype=np.float64)
    z = (pitches[None, :] - mean[:, None]) / sd[:, None]
    return -0.5 * z**2 - np.log(sd[:, None] * math.sqrt(2 * math.pi))


class ZoneScorer:
    """Fixed pitch zones: ``log P(part | pitch)``, independent of the history.

    Build it with :meth:`fit` (from note tables), :meth:`load` (the shipped
    or a saved JSON) or :meth:`from_ranges` (from configured part ranges,
    when the parts differ from the fitted ones).
    """

    uses_features = False  # see coplayer.instrument.instrumenter.Scorer

    def __init__(self, parts: Sequence[str], counts: np.ndarray, mean: Sequence[float],
                 sd: Sequence[float], *, source: str = ""):
        self.parts = tuple(parts)
        self.counts = np.asarray(counts, dtype=np.float64).reshape(len(self.parts), N_PITCHES)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.sd = np.maximum(np.asarray(sd, dtype=np.float64), 1.0)
        self.source = source
        self.spec = FeatureSpec(n_parts=len(self.parts))
        self.table = self._posterior_table()  # (128, K): log P(part | pitch)

    # -- building --------------------------------------------------------

    @classmethod
    def fit(cls, scores: Iterable[Score], parts: Sequence[str] | None = None,
            *, source: str = "") -> "ZoneScorer":
        """Pitch histograms of each part over ``scores`` (notes of other parts ignored)."""
        scores = list(scores)
        if parts is None:
            parts = list(dict.fromkeys(p for s in scores for p in s.parts))
        index = {p: k for k, p in enumerate(parts)}
        counts = np.zeros((len(parts), N_PITCHES))
        for score in scores:
            for note in score.notes:
                k = index.get(note.part)
                if k is not None:
                    counts[k, note.pitch] += 1
        empty = [p for p, row in zip(parts, counts) if not row.sum()]
        if empty:
            raise ValueError(f"no notes to fit the zone of part(s) {', '.join(empty)}")
        pitches = np.arange(N_PITCHES)
        n = counts.sum(axis=1)
        mean = counts @ pitches / n
        sd = np.sqrt(counts @ pitches**2 / n - mean**2)
        return cls(parts, counts, mean, sd, source=source)

    @classmethod
    def from_ranges(cls, parts: Sequence[_Ranged]) -> "ZoneScorer":
        """Zones from configured ranges: a Gaussian centred on each range.

        Used when the configured parts are not the fitted ones; the mean is
        the range's centre and the standard deviation a quarter of its width.
        """
        mean = [(p.low + p.high) / 2 for p in parts]
        sd = [max(1.0, (p.high - p.low) / 4) for p in parts]
        counts = np.zeros((len(parts), N_PITCHES))
        return cls([p.name for p in parts], counts, mean, sd, source="configured part ranges")

    # -- persistence -----------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": ZONE_FORMAT,
            "version": ZONE_VERSION,
            "source": self.source,
            "parts": list(self.parts),
            "mean": [float(m) for m in self.mean],  # exact: a loaded zone equals the fitted one
            "sd": [float(s) for s in self.sd],
            # Sparse counts: {part: {pitch: notes}}, only pitches the part played.
            "counts": {
                p: {str(i): int(c) for i, c in enumerate(row) if c}
                for p, row in zip(self.parts, self.counts)
            },
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON, one top-level key per line."""
        items = [f" {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}"
                 for k, v in self.to_dict().items()]
        Path(path).write_text("{\n" + ",\n".join(items) + "\n}\n")

    @classmethod
    def from_dict(cls, data: dict, label: str = "<dict>") -> "ZoneScorer":
        try:
            if data.get("format") != ZONE_FORMAT or data.get("version") != ZONE_VERSION:
                raise ValueError(
                    f"format {data.get('format')!r} version {data.get('version')!r}, "
                    f"expected {ZONE_FORMAT!r} version {ZONE_VERSION}"
                )
            parts = [str(p) for p in data["parts"]]
            counts = np.zeros((len(parts), N_PITCHES))
            for k, p in enumerate(parts):
                for pitch, c in data["counts"][p].items():
                    counts[k, int(pitch)] = float(c)
            return cls(parts, counts, data["mean"], data["sd"], source=data.get("source", ""))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ModelError(f"zone baseline {label} is invalid ({one_line(exc)}); refit it with "
                             "python -m coplayer.instrument.baselines") from exc

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ZoneScorer":
        """The shipped zones (``coplayer/assets/zone-baseline.json``) or a saved file."""
        path = Path(path) if path is not None else zone_asset_path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
            raise ModelError(f"cannot read the zone baseline {path}: {one_line(exc)}") from exc
        return cls.from_dict(data, str(path))

    # -- the Scorer protocol ---------------------------------------------

    def reset(self) -> None:
        """Zones keep no state."""

    def log_probs(self, pitch: int, feats: np.ndarray | None = None,
                  featurizer: Featurizer | None = None) -> np.ndarray:
        return self.table[min(max(int(pitch), 0), N_PITCHES - 1)].copy()

    def _posterior_table(self) -> np.ndarray:
        k = len(self.parts)
        gauss = np.exp(_gauss_log_pdf(self.mean, self.sd))
        gauss /= gauss.sum(axis=1, keepdims=True)
        n = self.counts.sum(axis=1, keepdims=True)
        if float(n.sum()) == 0:  # from ranges: Gaussians only, equal priors
            like, prior = gauss, np.full(k, 1.0 / k)
        else:
            like = (self.counts + SMOOTHING * gauss) / (n + SMOOTHING)
            prior = n[:, 0] / n.sum()
        with np.errstate(divide="ignore"):
            logp = np.log(like).T + np.log(prior)[None, :]
        logp = np.maximum(logp, -700.0)  # far outside every zone: still finite
        return np.stack([_log_softmax(row) for row in logp])


class ClosestPitchScorer:
    """The part whose most recent pitch is closest to the note.

    A part with no note yet stands at its zone's mean pitch.  Scores are
    ``-distance / scale`` (``scale`` semitones per nat, so the penalties of
    the :class:`Instrumenter` weigh against distances) plus a tiny share of
    the zone log-probabilities to break ties, normalised to log-probabilities.
    """

    uses_features = False  # see coplayer.instrument.instrumenter.Scorer

    def __init__(self, zone: ZoneScorer, *, scale: float = CLOSEST_SCALE,
                 tie_weight: float = TIE_WEIGHT):
        self.zone = zone
        self.parts = zone.parts
        self.spec = zone.spec
        self.scale = float(scale)
        self.tie_weight = float(tie_weight)
        self.anchors = np.asarray(zone.mean, dtype=np.float64)

    def reset(self) -> None:
        """History lives in the featurizer; nothing to reset here."""

    def log_probs(self, pitch: int, feats: np.ndarray | None, featurizer: Featurizer) -> np.ndarray:
        last = featurizer.last_pitches()
        ref = np.array([a if p is None else p for a, p in zip(self.anchors, last)], dtype=np.float64)
        ties = np.maximum(self.zone.log_probs(pitch), -50.0)
        return _log_softmax(-np.abs(pitch - ref) / self.scale + self.tie_weight * ties)


# -- factories ----------------------------------------------------------------


def zone_asset_path() -> Path:
    return Path(str(resources.files("coplayer").joinpath("assets", ZONE_ASSET)))


def baseline_zone(cfg: "Config") -> ZoneScorer:
    """The shipped zones when they cover the configured parts, else (or when the
    shipped file is damaged, with a warning) zones from the configured ranges."""
    try:
        zone = ZoneScorer.load()
    except ModelError as exc:
        log.warning("%s; zones follow the configured ranges", exc)
        return ZoneScorer.from_ranges(cfg.parts)
    names = cfg.part_names
    if set(zone.parts) == set(names):
        if zone.parts != names:  # the same parts in the configured order
            order = [zone.parts.index(p) for p in names]
            zone = ZoneScorer(names, zone.counts[order], zone.mean[order], zone.sd[order],
                              source=zone.source)
        return zone
    log.info("configured parts %s are not the fitted %s: zones follow the configured ranges",
             list(names), list(zone.parts))
    return ZoneScorer.from_ranges(cfg.parts)


def make_scorer(name: str, cfg: "Config") -> Scorer:
    """A scorer for the configured parts: ``zone``, ``closest`` or an ONNX model.

    An ONNX model (a shipped name or a path) must have been trained for the
    configured parts, else :class:`~coplayer.errors.ModelError`.
    """
    if name == "zone":
        return baseline_zone(cfg)
    if name == "closest":
        return ClosestPitchScorer(baseline_zone(cfg))
    try:
        from coplayer.instrument.runner import OnnxModel, OnnxScorer, check_parts
    except ImportError as exc:
        raise ModelError(
            f"cannot load model {name!r}: the ONNX runner is unavailable ({exc}); "
            f"use a baseline: {' or '.join(BASELINES)}"
        ) from exc
    model = OnnxModel(name, threads=cfg.instrument.threads)
    check_parts(model.parts, cfg.part_names, model=model.name, source=cfg.source)
    return OnnxScorer(model)


def make_instrumenter(scorer: Scorer, cfg: "Config") -> Instrumenter:
    """An Instrumenter with the configured ranges, monophony and penalties."""
    try:
        rules = [_rule(cfg.part(name)) for name in scorer.parts]
    except KeyError as exc:
        raise ModelError(f"the scorer's parts {list(scorer.parts)} are not configured: {exc}") from exc
    penalties = Penalties(mono=cfg.instrument.mono_penalty, range=cfg.instrument.range_penalty,
                          chord=cfg.instrument.chord_penalty)
    return Instrumenter(scorer, rules, penalties)


def _rule(part) -> PartRule:
    return PartRule(part.name, part.low, part.high, part.monophonic)


def main() -> None:
    """Refit the shipped zones on the training split (needs the corpus)."""
    from coplayer.data.splits import load_split

    zone = ZoneScorer.fit(load_split("train"), source="bach chorales, train split")
    path = zone_asset_path()
    zone.save(path)
    n = int(zone.counts.sum())
    print(f"wrote {path}: {n} notes, means " + ", ".join(
        f"{p} {m:.1f}±{s:.1f}" for p, m, s in zip(zone.parts, zone.mean, zone.sd)))


if __name__ == "__main__":
    main()
