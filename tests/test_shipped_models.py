"""The shipped instrumentation model must not drop below its recorded test accuracy.

``coplayer eval instrument --record`` writes the accuracies into the model
card when a model is shipped; this test re-measures them on the committed
test split, under both protocols, through the same runtime path.
"""

from __future__ import annotations

import pytest

from coplayer.config import load_config
from coplayer.instrument.evaluate import evaluate_models, shipped_instrument_models
from coplayer.instrument.runner import read_card, resolve_model



@pytest.fixture(scope="module")
def test_split():
    pytest.importorskip("music21", reason="the chorale corpus needs music21 (the train extra)")
    from coplayer.data.splits import load_split

    return load_split("test")


@pytest.mark.slow  # 10-20 s: both protocols on the whole test split
@pytest.mark.parametrize("name", shipped_instrument_models() or ["instrument-lstm"])
def test_shipped_model_keeps_its_test_accuracy(name, test_split):
    try:
        card = read_card(resolve_model(name))
    except Exception as exc:  # noqa: BLE001 - reported as the failure reason
        pytest.fail(f"the default model {name} is not shipped or unreadable: {exc}")
    recorded = card.get("metrics", {}).get("test")
    assert recorded, f"{name}'s card has no recorded test metrics (coplayer eval instrument --record)"
    cfg = load_config(overrides=[f"instrument.mono_penalty={recorded['penalties']['mono']}",
                                 f"instrument.range_penalty={recorded['penalties']['range']}"])
    results = evaluate_models([name], cfg, test_split, seed=recorded["seed"])
    for r in results:
        assert r.notes == recorded["notes"]
        assert r.accuracy >= recorded[f"accuracy_{r.protocol}"] - 1e-6, (
            f"{name} protocol {r.protocol}: {r.accuracy:.4f} < recorded {recorded[f'accuracy_{r.protocol}']:.4f}")


# -- the continuation transformer ---------------------------------------------------------


@pytest.fixture(scope="module")
def chorale_test_events():
    pytest.importorskip("music21", reason="the chorale corpus needs music21 (the train extra)")
    from coplayer.gen.data import load_pieces
    from coplayer.gen.encoding import Encoding

    return load_pieces("test", Encoding(), ("bach",))


def _nll_bits_per_event(model, pieces) -> float:
    from coplayer.gen.markov import piece_nll_bits

    total = sum(float(piece_nll_bits(model, p.events, p.pos).sum()) for p in pieces)
    return total / sum(len(p) for p in pieces)


@pytest.mark.slow  # 30-70 s: the transformer's NLL of every test chorale
def test_shipped_transformer_keeps_its_chorale_nll_and_beats_markov(chorale_test_events):
    """Through onnxruntime, the chorale test NLL is the one recorded at export, and below the Markov model's."""
    from coplayer.gen.continue_file import load_event_model

    try:
        model = load_event_model("continue-transformer")
    except Exception as exc:  # noqa: BLE001 - reported as the failure reason
        pytest.fail(f"the shipped continue-transformer is missing or unreadable: {exc}")
    recorded = model.card["metrics"]["test_nll_bits_per_event_by_source"]["bach"]
    bits = _nll_bits_per_event(model, chorale_test_events)
    assert bits <= recorded + 1e-3, f"chorale test NLL {bits:.4f} bits/event > recorded {recorded:.4f}"
    markov = _nll_bits_per_event(load_event_model("markov"), chorale_test_events)
    assert bits < markov, f"transformer {bits:.3f} bits/event is not below the Markov model's {markov:.3f}"
