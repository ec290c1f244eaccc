"""One featurizer: training and live play compute the same features.

The training pipeline (``models.train_instrument.rollout``: performance ->
event stream -> featurizer, decisions fed back) and the runtime path
(``Instrumenter.note_on``/``note_off``, as ``coplayer arrange``, ``eval`` and
the engine call them) are fed the same notes and make the same decisions;
their feature vectors must be identical, note for note.
"""

from __future__ import annotations

import numpy as np
import pytest

from coplayer.data.corpus import SATB
from coplayer.instrument.features import CHORD_NOTES, PC_NOTES, Featurizer, FeatureSpec
from coplayer.instrument.instrumenter import Instrumenter
from coplayer.instrument.protocols import perform


class Replayer:
    """A scorer that records the features it is given and picks planned parts."""

    parts = SATB

    def __init__(self, spec: FeatureSpec, plan):
        self.spec, self.plan = spec, list(plan)
        self.seen: list[np.ndarray] = []

    def reset(self):
        self.seen.clear()

    def log_probs(self, pitch, feats, featurizer):
        scores = np.full(len(self.parts), -1e6)
        scores[self.plan[len(self.seen)]] = 0.0
        self.seen.append(np.asarray(feats, dtype=np.float32))  # as a model's float32 input takes it
        return scores


@pytest.mark.torch
@pytest.mark.parametrize("protocol", ["a", "b"])
def test_training_and_runtime_features_are_identical(protocol):
    torch = pytest.importorskip("torch", reason="the training pipeline needs torch (the train extra)")
    pytest.importorskip("music21", reason="the chorale corpus needs music21 (the train extra)")
    from coplayer.data.splits import load_split
    from models.instrument import InstrumentLSTM
    from models.train_instrument import rollout

    spec = FeatureSpec(n_parts=4, resort_chords=True, motion=True, exact_flag=True, pc_context=True)
    score = load_split("test")[3]
    perf = perform(score, list(SATB), protocol, np.random.default_rng(5))
    torch.manual_seed(0)
    model = InstrumentLSTM(Featurizer(spec).size, 4, hidden=8, layers=1, dropout=0.0)
    (trained,) = rollout(model, [perf], spec, q=0.5, rng=np.random.default_rng(1))

    replayer = Replayer(spec, trained.fed)
    live = Instrumenter(replayer)
    for ev in perf.events:
        pitch = int(perf.pitches[ev.index])
        if ev.on:
            live.note_on(pitch, int(perf.velocities[ev.index]), ev.time)
        else:
            live.note_off(pitch, ev.time)
    assert len(replayer.seen) == len(trained.feats) == len(score.notes)
    assert (trained.fed != trained.labels).any()  # own decisions, not only the truth, were fed back
    np.testing.assert_array_equal(np.stack(replayer.seen), trained.feats)


def test_a_chord_holds_at_most_chord_notes():
    """A very fast run (every note inside one chord window) is cut into chords
    of CHORD_NOTES, so no note's work grows with the run."""
    f = Featurizer(FeatureSpec(n_parts=4))
    sizes = []
    for i in range(3 * CHORD_NOTES):
        f.note_on(40 + i, 80, i * 0.001)  # 1,000 notes/s: all within 35 ms of the first
        f.commit(i % 4)
        sizes.append(len(f._chord))
    assert max(sizes) == CHORD_NOTES
    assert sizes[CHORD_NOTES] == 1  # the next note starts a new chord


def test_the_harmonic_context_counts_recent_pitch_classes_relative_to_the_note():
    f = Featurizer(FeatureSpec(n_parts=4, pc_context=True))
    names = f.feature_names()
    for i, pitch in enumerate([48, 64, 67, 72]):  # C E G C
        f.note_on(pitch, 80, float(i))
        f.commit(3 - i)
    context = dict(zip(names, f.preview(62, 80, 4.0)))  # D: C is 10 above mod 12, E 2, G 5
    assert [context[f"pc+{r}"] * PC_NOTES for r in range(12)] == [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 2, 0]
    for i in range(PC_NOTES):
        f.note_on(62, 80, 5.0 + i)
        f.commit(0)
    assert dict(zip(names, f.preview(62, 80, 30.0)))["pc+0"] == 1.0  # only the last PC_NOTES count
    assert len(Featurizer(FeatureSpec(n_parts=4)).feature_names()) == len(names) - 12
