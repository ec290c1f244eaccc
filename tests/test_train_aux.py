"""The auxiliary voicing targets of instrumentation training (``--aux-weight``)."""

from __future__ import annotations

import numpy as np
import pytest

from coplayer.data.notes import Note, Score
from coplayer.instrument.protocols import perform

torch = pytest.importorskip("torch", reason="training needs torch (the train extra)")
from models.instrument import InstrumentLSTM  # noqa: E402
from models.train_instrument import AUX_SPAN, voicings  # noqa: E402

PARTS = ["soprano", "alto", "tenor", "bass"]
NONE = 2 * AUX_SPAN + 1


def _score() -> Score:
    rows = [  # (pitch, beat, part): a chord, then the soprano alone, then two far apart
        (72, 0, "soprano"), (67, 0, "alto"), (64, 0, "tenor"), (48, 0, "bass"),
        (74, 1, "soprano"),
        (100, 2, "soprano"), (40, 2, "bass"),
    ]
    return Score(notes=[Note(p, 80, b * 0.5, 0.5, float(b), 1.0, part) for p, b, part in rows], parts=PARTS)


def test_each_note_learns_the_parts_of_its_written_onset_relative_to_itself():
    score = _score()
    perf = perform(score, PARTS, "b", np.random.default_rng(3), transpose=2)
    v = voicings(score, perf, len(PARTS))
    assert v.shape == (7, 4)
    # The alto's note of the chord: soprano +5, itself 0, tenor -3, bass -19.
    assert list(v[1] - AUX_SPAN) == [5, 0, -3, -19]
    # The soprano alone: the other parts have no note at its onset.
    assert list(v[4]) == [AUX_SPAN, NONE, NONE, NONE]
    # Intervals past the span are clipped to its ends.
    assert list(v[5]) == [AUX_SPAN, NONE, NONE, 0]
    assert list(v[6]) == [2 * AUX_SPAN, NONE, NONE, AUX_SPAN]


def test_the_voicing_head_leaves_the_streamed_logits_alone():
    torch.manual_seed(0)
    model = InstrumentLSTM(10, 4, hidden=16, aux_classes=2 * AUX_SPAN + 2).eval()
    pitch, feats = torch.randint(40, 80, (2, 5)), torch.randn(2, 5, 10)
    logits, voicing = model.forward_aux(pitch, feats)
    assert voicing.shape == (2, 5, 4, 2 * AUX_SPAN + 2)
    assert torch.allclose(logits, model(pitch, feats)[0], atol=1e-6)
