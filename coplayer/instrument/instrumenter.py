"""The online instrumentation decision: one code path for live play, files and eval.

An :class:`Instrumenter` owns a featurizer and a scorer (an ONNX model or a
baseline).  At each note-on it computes the features, asks the scorer for
log-probabilities over the parts, adds the symbolic knowledge of the parts
(a soft penalty for a monophonic part that is already sounding and for a
pitch outside a part's range), picks the best part and commits it to the
featurizer's history.  ``coplayer arrange``, ``coplayer eval instrument``
and the live engine all call :meth:`Instrumenter.note_on` and
:meth:`Instrumenter.note_off`; nothing else decides parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from coplayer.instrument.features import Featurizer, FeatureSpec


@dataclass(frozen=True)
class PartRule:
    """What the decision knows about a part besides the model."""

    name: str
    low: int = 0
    high: int = 127
    monophonic: bool = True


@dataclass(frozen=True)
class Penalties:
    """Soft constraints, in nats subtracted from a part's log-probability."""

    mono: float = 0.0  # a monophonic part already holds a note
    range: float = 0.0  # the pitch lies outside the part's range
    chord: float = 0.0  # a monophonic part already got a note of this chord


# A part already sounding this very pitch cannot take it again: two note-ons
# of one pitch on one channel would merge into one note in any synth or DAW.
SAME_PITCH = 1e3


class Scorer(Protocol):
    """Anything that scores parts for a note: an ONNX model or a baseline.

    A scorer without the attribute ``uses_features`` = False gets the
    feature vector (a list: :meth:`Featurizer.values`); one that has it
    (the baselines, which look only at the pitch and the featurizer's state)
    gets None and saves its cost: about half of a fallback's time per note,
    and the fallback hears every note.
    """

    parts: tuple[str, ...]
    spec: FeatureSpec

    def reset(self) -> None: ...

    def log_probs(self, pitch: int, feats: list[float] | None,
                  featurizer: Featurizer) -> Sequence[float] | np.ndarray:
        """Log-probabilities over ``parts`` for the note whose features are given."""
        ...


@dataclass(frozen=True)
class Decision:
    part: int  # index into Instrumenter.parts
    name: str
    log_probs: list[float]  # after penalties


class Instrumenter:
    """Decides, at each note-on, which part plays it; keeps its own history."""

    def __init__(self, scorer: Scorer, rules: Sequence[PartRule] | None = None,
                 penalties: Penalties = Penalties()):
        self.scorer = scorer
        self.parts = tuple(scorer.parts)
        rules = list(rules) if rules is not None else [PartRule(p) for p in self.parts]
        if [r.name for r in rules] != list(self.parts):
            raise ValueError(f"part rules {[r.name for r in rules]} do not match the scorer's {list(self.parts)}")
        self.rules = rules
        self.penalties = penalties
        self._ranges = [(r.low, r.high) for r in rules]
        self._mono = [r.monophonic for r in rules]
        self.featurizer = Featurizer(scorer.spec)
        self._vector = getattr(scorer, "uses_features", True)
        self.reset()

    def reset(self) -> None:
        self.featurizer.reset()
        self.scorer.reset()
        self._sounding: dict[int, list[int]] = {}  # pitch -> parts it was routed to, oldest first
        self._chord_parts: set[int] = set()  # parts routed in the current chord
        self._open: tuple[int, int] | None = None  # (pitch, part) decided, not yet committed

    def note_on(self, pitch: int, velocity: int, time: float, force: int | None = None,
                listen: bool = True) -> Decision:
        """Decide the part of a note at its note-on and make it history.

        ``force`` (a part index) records a decision made elsewhere, e.g. by a
        fallback when the model missed its latency budget, so that the
        history stays what was really played.  The scorer still hears a
        forced note (a stateful model then misses none) unless ``listen`` is
        false: a caller short of time records the decision alone.
        """
        decision = self.decide(pitch, velocity, time, force, listen)
        self.commit()
        return decision

    def decide(self, pitch: int, velocity: int, time: float, force: int | None = None,
               listen: bool = True) -> Decision:
        """:meth:`note_on` up to the decision: the live engine sends the note
        first and then calls :meth:`commit` (the history's bookkeeping), which
        must come before the next note."""
        if self._open is not None:
            raise RuntimeError("decide() twice without commit()")
        featurizer = self.featurizer
        if not featurizer.joins_chord(time):
            self._chord_parts = set()
        featurizer.note_on(pitch, velocity, time, vector=False)
        if force is None or listen:
            feats = featurizer.values(pitch, velocity, time) if self._vector else None
            scores = self.scorer.log_probs(pitch, feats, featurizer)
            scores = self._constrain(pitch, scores.tolist() if isinstance(scores, np.ndarray) else list(scores))
        else:
            scores = [0.0 if k == force else -math.inf for k in range(len(self.parts))]
        part = max(range(len(scores)), key=scores.__getitem__) if force is None else force
        self._open = (pitch, part)
        return Decision(part, self.parts[part], scores)

    def commit(self) -> None:
        """Make the last :meth:`decide` history (nothing if there is none)."""
        if self._open is None:
            return
        (pitch, part), self._open = self._open, None
        self.featurizer.commit(part)
        self._sounding.setdefault(pitch, []).append(part)
        self._chord_parts.add(part)

    def warm(self, time: float) -> None:
        """Run the decision's code on a dummy note and forget it: nothing
        changes, but the next real note finds the model in the caches.  Only
        scorers with a ``warm`` method (the ONNX models) take part."""
        warm = getattr(self.scorer, "warm", None)
        if warm is not None:  # the features as a decision computes them (a list)
            warm(60, self.featurizer.values(60, 64, time))

    def note_off(self, pitch: int, time: float) -> int | None:
        """A played note ends; returns the part index its note-on was routed to."""
        self.featurizer.note_off(pitch, time)
        routed = self._sounding.get(pitch)
        if not routed:
            return None
        part = routed.pop(0)
        if not routed:
            del self._sounding[pitch]
        return part

    def _constrain(self, pitch: int, scores: list[float]) -> list[float]:
        # Plain Python on a few floats: numpy's per-call cost is larger than
        # the work here, and this runs before every note can leave.
        for part in self._sounding.get(pitch, ()):
            scores[part] -= SAME_PITCH
        p = self.penalties
        if p.mono:
            for k, (held, mono) in enumerate(zip(self.featurizer.held_parts(), self._mono)):
                if held and mono:
                    scores[k] -= p.mono
        if p.range:
            for k, (low, high) in enumerate(self._ranges):
                if pitch < low or pitch > high:
                    scores[k] -= p.range
        if p.chord and self._chord_parts:
            for k in self._chord_parts:
                if self._mono[k]:
                    scores[k] -= p.chord
        return scores
