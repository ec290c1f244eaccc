"""The instrumentation trainer's pipelined rollout (``--workers 1``).

The worker process must roll out exactly what the same code would roll out
in this process, from the same seed and the weights it was sent: training
then depends on the seed alone, never on the timing of two processes.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch (the train extra)")
pytest.importorskip("music21", reason="the chorale corpus needs music21 (the train extra)")

from coplayer.data.splits import load_split  # noqa: E402
from coplayer.instrument.features import Featurizer, FeatureSpec  # noqa: E402
from models.instrument import InstrumentLSTM  # noqa: E402
from models.train_instrument import Rollouts, augmented, rollout  # noqa: E402

pytestmark = pytest.mark.subprocess  # the rollout worker is a second Python process (multiprocessing)

SPEC = dict(n_parts=4, resort_chords=True, motion=True, exact_flag=True, pc_context=True)


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for name in ("pitch", "feats", "labels", "preds", "fed"):
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=name)


def test_the_rollout_worker_rolls_out_what_this_process_would_with_the_weights_it_was_sent():
    scores = load_split("test")[:2]
    spec = FeatureSpec(**SPEC)
    torch.manual_seed(0)
    model = InstrumentLSTM(Featurizer(spec).size, 4, hidden=8, layers=1, dropout=0.0)
    args = argparse.Namespace(workers=1, epochs=3, stop_after=None, p_exact=0.5, seed=7)

    def q_of(epoch):
        return (0.2, 0.6, 1.0)[epoch]

    rollouts = Rollouts(model, scores, spec, args, np.random.default_rng(0), q_of)
    try:
        first, second = rollouts.get(0), rollouts.get(1)  # both from the initial weights
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # "training" epoch 0 changes the weights
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        rollouts.trained(0)  # epoch 2 rolls out with these
        third = rollouts.get(2)
    finally:
        rollouts.close()
    assert not rollouts.proc.is_alive()

    rng = np.random.default_rng(args.seed + 1)  # the worker's seed
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(initial)
    _same(first, rollout(model, augmented(scores, rng, args.p_exact), spec, 0.2, rng))
    _same(second, rollout(model, augmented(scores, rng, args.p_exact), spec, 0.6, rng))
    model.load_state_dict(trained)
    _same(third, rollout(model, augmented(scores, rng, args.p_exact), spec, 1.0, rng))
    assert (third[0].preds != first[0].preds).any()  # the new weights were really used


def test_a_worker_that_dies_stops_training_with_a_message():
    scores = load_split("test")[:1]
    model = InstrumentLSTM(Featurizer(FeatureSpec(**SPEC)).size, 4, hidden=8, layers=1, dropout=0.0)
    args = argparse.Namespace(workers=1, epochs=1, stop_after=None, p_exact=0.5, seed=1)
    rollouts = Rollouts(model, scores, FeatureSpec(**SPEC), args, np.random.default_rng(0), lambda epoch: 1.0)
    try:
        rollouts.get(0)  # the one job sent (a single epoch)
        rollouts.proc.kill()
        rollouts.proc.join()
        with pytest.raises(SystemExit, match="rollout worker stopped"):
            rollouts.get(1)
    finally:
        rollouts.close()
