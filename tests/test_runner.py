"""The ONNX runtime of instrumentation: loading, stepping, and every refusal.

The model under test is a tiny random InstrumentLSTM exported once per
session with the real exporter, which needs torch (the ``train`` extra);
without torch these tests skip and say so.  The runner itself never
imports torch, which the last test checks in a clean interpreter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coplayer.data.corpus import SATB
from coplayer.data.splits import load_split
from coplayer.errors import ModelError
from coplayer.instrument import runner
from coplayer.instrument.features import Featurizer, FeatureSpec
from coplayer.instrument.instrumenter import Instrumenter
from coplayer.instrument.runner import OnnxModel, OnnxScorer, check_parts, log_softmax, softmax

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_copy(exported, tmp_path) -> Path:
    """A private copy of the exported model and card, free to damage."""
    for suffix in (".onnx", ".json"):
        shutil.copy(exported.with_suffix(suffix), tmp_path / f"tiny{suffix}")
    return tmp_path / "tiny.onnx"


def edit_card(onnx_path: Path, edit) -> None:
    path = onnx_path.with_suffix(".json")
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))


def refusal(path, match: str) -> str:
    with pytest.raises(ModelError, match=match) as info:
        OnnxModel(path)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- running ------------------------------------------------------------------------


def test_step_returns_probabilities_and_reset_restarts(exported):
    model = OnnxModel(exported)
    assert model.parts == tuple(SATB)
    assert Featurizer(model.spec).feature_names() == model.card["feature_names"]
    feats = Featurizer(model.spec).note_on(60, 80, 0.0)
    first = model.step(60, feats)
    assert first.dtype == np.float64 and first.shape == (len(SATB),)
    assert first.sum() == pytest.approx(1.0) and (first > 0).all()
    second = model.step(60, feats)
    assert not np.allclose(first, second), "the state should carry the first note"
    model.reset()
    np.testing.assert_allclose(model.step(60, feats), first)


def test_threads_option(exported):
    feats = Featurizer(FeatureSpec(n_parts=4)).note_on(64, 80, 0.0)
    np.testing.assert_allclose(OnnxModel(exported, threads=2).step(64, feats),
                               OnnxModel(exported).step(64, feats), atol=1e-6)


def test_scorer_drives_an_instrumenter(exported):
    scorer = OnnxScorer(OnnxModel(exported))
    inst = Instrumenter(scorer)
    parts = [inst.note_on(p, 80, t).part for t, p in enumerate((60, 64, 67, 72))]
    assert all(0 <= p < len(SATB) for p in parts)
    inst.reset()
    feats = inst.featurizer.note_on(60, 80, 0.0)
    probs = OnnxModel(exported).step(60, feats)
    np.testing.assert_allclose(scorer.log_probs(60, feats, inst.featurizer), np.log(probs), atol=1e-9)


def test_keep_warm_changes_nothing(exported):
    """The engine's keep-warm step between notes (Instrumenter.warm) runs the
    model and the featurizer but leaves both as they were: decisions and
    scores equal those of an instrumenter that is never warmed."""
    cold, warm = (Instrumenter(OnnxScorer(OnnxModel(exported))) for _ in range(2))
    notes = [(60, 0.0), (64, 0.002), (67, 0.004), (72, 0.5), (62, 1.0), (65, 1.001)]
    for pitch, t in notes:
        before = warm.featurizer.preview(pitch, 80, t)
        warm.warm(t)
        warm.warm(t + 0.01)
        np.testing.assert_array_equal(warm.featurizer.preview(pitch, 80, t), before)
        a, b = cold.note_on(pitch, 80, t), warm.note_on(pitch, 80, t)
        assert a.part == b.part
        np.testing.assert_array_equal(a.log_probs, b.log_probs)
    model = OnnxModel(exported)
    feats = Featurizer(model.spec).note_on(60, 80, 0.0)
    np.testing.assert_array_equal(model.peek(60, feats), model.peek(60, feats))
    np.testing.assert_allclose(softmax(model.peek(60, feats)), model.step(60, feats))


def test_softmax_and_log_softmax_agree():
    logits = np.array([1000.0, 999.0, -5.0], dtype=np.float32)  # no overflow
    np.testing.assert_allclose(np.exp(log_softmax(logits)), softmax(logits))
    assert softmax(logits).sum() == pytest.approx(1.0)


def test_shipped_name_resolves_in_assets(exported, tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    assets.mkdir()
    for suffix in (".onnx", ".json"):
        shutil.copy(exported.with_suffix(suffix), assets / f"tiny{suffix}")
    monkeypatch.setattr(runner.resources, "files", lambda package: tmp_path)
    assert runner.shipped_models() == ["tiny"]
    assert OnnxModel("tiny").path == assets / "tiny.onnx"
    with pytest.raises(ModelError, match=r"no shipped model named 'nope' \(shipped: tiny\)"):
        OnnxModel("nope")


# -- refusals -----------------------------------------------------------------------


def test_missing_file(tmp_path):
    refusal(tmp_path / "absent.onnx", "does not exist")


def test_missing_card(model_copy):
    model_copy.with_suffix(".json").unlink()
    refusal(model_copy, "has no model card tiny.json")


def test_unreadable_card(model_copy):
    model_copy.with_suffix(".json").write_text("{not json")
    refusal(model_copy, "model card .* is unreadable")


def test_card_lacking_keys(model_copy):
    edit_card(model_copy, lambda card: card.pop("state"))
    refusal(model_copy, "lacks state")


def test_sha_mismatch_after_editing_the_file(model_copy):
    with model_copy.open("ab") as f:
        f.write(b"\0")
    refusal(model_copy, "does not match its model card")


def test_garbage_onnx(model_copy):
    model_copy.write_bytes(b"this is not a protobuf" * 8)
    edit_card(model_copy, lambda card: card.update(sha256=runner.file_sha256(model_copy)))
    refusal(model_copy, "is not a valid ONNX graph")


def test_feature_name_mismatch(model_copy):
    def rename(card):
        card["feature_names"][4] = "pitch_class"

    edit_card(model_copy, rename)
    message = refusal(model_copy, "was trained with another featurizer")
    assert "feature #4: card 'pitch_class', here 'pitch'" in message


def test_feature_count_mismatch(model_copy):
    edit_card(model_copy, lambda card: card["feature_names"].pop())
    refusal(model_copy, r"its card lists 70 features, this coplayer computes 71")


def test_unknown_feature_spec(model_copy):
    edit_card(model_copy, lambda card: card["features"].update(pitch_window=3))
    refusal(model_copy, "another featurizer")


def test_featurizer_version_mismatch(model_copy):
    edit_card(model_copy, lambda card: card["features"].update(version=99))
    refusal(model_copy, "featurizer version 99")


def test_graph_names_must_match_the_card(model_copy):
    def rename_state(card):
        card["state"][0]["name"] = "hidden"
        card["inputs"][2] = "hidden"
        card["outputs"][1] = "hidden_out"

    edit_card(model_copy, rename_state)
    refusal(model_copy, r"graph has inputs \['pitch', 'feats', 'h', 'c'\]")


def test_too_old_onnxruntime(model_copy):
    edit_card(model_copy, lambda card: card.update(onnxruntime_min="99.0"))
    refusal(model_copy, r"needs onnxruntime >= 99.0")


def test_wrong_task(model_copy):
    edit_card(model_copy, lambda card: card.update(task="continue"))
    refusal(model_copy, "not an 'instrument' model")


def test_check_parts():
    check_parts(SATB, list(SATB))
    with pytest.raises(ModelError, match="model instrument-lstm plays parts soprano, alto, tenor, bass; "
                                         "config.yaml has soprano, alto, bass"):
        check_parts(SATB, ["soprano", "alto", "bass"], model="instrument-lstm")
    with pytest.raises(ModelError, match="same parts in another order"):
        check_parts(SATB, ["bass", "tenor", "alto", "soprano"])


@pytest.mark.subprocess
def test_runner_never_imports_torch():
    code = ("import sys; import coplayer.instrument.runner, coplayer.instrument.instrumenter; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
