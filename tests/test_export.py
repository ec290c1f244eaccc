"""Export to ONNX: the model card, parity with PyTorch on real music, and refusals.

Every model here is small and randomly initialised, so the tests stay fast;
parity streams real test-split pieces (protocol b) through both sides.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export needs torch (pip install 'coplayer[train]')")
onnx = pytest.importorskip("onnx", reason="export needs onnx (pip install 'coplayer[train]')")

from torch import nn  # noqa: E402

import export.instrument as exporter  # noqa: E402
from coplayer.data.corpus import SATB  # noqa: E402
from coplayer.data.splits import load_split  # noqa: E402
from coplayer.errors import ModelError  # noqa: E402
from coplayer.instrument.features import Featurizer, FeatureSpec  # noqa: E402
from coplayer.instrument.runner import OnnxModel, file_sha256  # noqa: E402
from export.parity import ParityReport, check_parity  # noqa: E402
from tests.tiny_models import TINY_LSTM, write_tiny_run  # noqa: E402

N_FEATURES = len(Featurizer(FeatureSpec(n_parts=len(SATB))).feature_names())


@pytest.fixture(scope="module")
def pieces():
    """The first two pieces of the test split (loading the split takes a second or two)."""
    return load_split("test")[:2]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory) -> tuple[Path, Path]:
    """``python -m export.instrument RUN --name tiny-lstm --out OUT`` on a tiny run: (run, out)."""
    root = tmp_path_factory.mktemp("cli")
    run, out = write_tiny_run(root / "run", **TINY_LSTM), root / "assets"
    assert exporter.main([str(run), "--name", "tiny-lstm", "--out", str(out), "--pieces", "1"]) == 0
    return run, out


def read_card(out: Path) -> dict:
    return json.loads((out / "tiny-lstm.json").read_text())


def test_card_describes_the_export(cli_export):
    _, out = cli_export
    card, onnx_path = read_card(out), out / "tiny-lstm.onnx"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-lstm.json", "tiny-lstm.onnx"]
    assert (card["name"], card["task"], card["kind"]) == ("tiny-lstm", "instrument", "lstm")
    assert card["parts"] == list(SATB)
    spec = FeatureSpec(**card["features"])
    assert card["feature_names"] == Featurizer(spec).feature_names()
    assert card["n_features"] == N_FEATURES
    assert card["inputs"] == ["pitch", "feats", "h", "c"]
    assert card["outputs"] == ["logits", "h_out", "c_out"]
    assert card["state"] == [{"name": n, "shape": [1, 1, 16], "dtype": "float32"} for n in ("h", "c")]
    assert card["hparams"]["hidden"] == 16
    assert card["training"]["epoch"] == 1 and card["training"]["args"]["model"] == "lstm"
    assert card["metrics"] == {}
    assert card["sha256"] == file_sha256(onnx_path) and card["size_bytes"] == onnx_path.stat().st_size
    assert card["opset"] >= 17 and card["parity"]["ok"]
    assert b"stack_trace" not in onnx_path.read_bytes(), "debug metadata (source paths) should be stripped"
    graph = onnx.load(str(onnx_path))
    assert [i.name for i in graph.graph.input] == card["inputs"]
    assert [o.name for o in graph.graph.output] == card["outputs"]


def test_parity_on_two_test_pieces(cli_export, pieces):
    run, out = cli_export
    report = check_parity(exporter.load_run(run).model, OnnxModel(out / "tiny-lstm.onnx"), pieces)
    assert report.ok, report
    assert report.pieces == 2 and report.notes > 100
    assert report.max_abs_diff <= 1e-4 and report.argmax_mismatches == 0


def test_reexport_keeps_the_metrics(cli_export, capsys):
    run, out = cli_export
    card = read_card(out)
    card["metrics"] = {"test_b_accuracy": 0.5}
    (out / "tiny-lstm.json").write_text(json.dumps(card))
    assert exporter.main([str(run), "--name", "tiny-lstm", "--out", str(out), "--pieces", "1"]) == 0
    assert read_card(out)["metrics"] == {"test_b_accuracy": 0.5}
    assert read_card(out)["sha256"] == card["sha256"], "export should be deterministic"
    assert "parity OK" in capsys.readouterr().out


def test_failed_parity_leaves_out_unchanged(cli_export, monkeypatch, capsys):
    run, out = cli_export
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    failing = ParityReport(pieces=1, notes=1, max_abs_diff=1.0)
    monkeypatch.setattr(exporter, "check_parity", lambda *args, **kwargs: failing)
    assert exporter.main([str(run), "--name", "tiny-lstm", "--out", str(out)]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    stage = Path(capsys.readouterr().err.strip().rsplit(" ", 1)[-1])
    assert (stage / "tiny-lstm.onnx").is_file()
    shutil.rmtree(stage)


def test_transformer_exports_with_parity(tmp_path, pieces):
    if "transformer" not in {getattr(c, "kind", None) for c in vars(exporter.models.instrument).values()}:
        pytest.skip("models.instrument has no transformer yet")
    run = exporter.load_run(write_tiny_run(tmp_path / "run", "transformer", hidden=16, layers=1, heads=2,
                                           window=4, dropout=0.0))
    report = exporter.export(run, "tiny-transformer", tmp_path, {}, pieces[:1])
    assert report.ok, report
    assert OnnxModel(tmp_path / "tiny-transformer.onnx").card["kind"] == "transformer"


class GrowingCache(nn.Module):
    """A toy attention model whose cache grows by one note per step (a dynamic ONNX axis)."""

    kind = "toy"
    state_names = ("keys", "values")

    def __init__(self, n_features: int, n_parts: int, dim: int = 8):
        super().__init__()
        self.hparams = dict(n_features=n_features, n_parts=n_parts, dim=dim)
        self.pitch = nn.Embedding(128, dim)
        self.inp = nn.Linear(n_features + dim, dim)
        self.out = nn.Linear(dim, n_parts)

    def initial_state(self, batch: int):
        return torch.zeros(batch, 0, self.hparams["dim"]), torch.zeros(batch, 0, self.hparams["dim"])

    def step(self, pitch, feats, keys, values):
        x = torch.tanh(self.inp(torch.cat([self.pitch(pitch), feats], dim=-1)))  # [B,D]
        keys, values = torch.cat([keys, x[:, None]], 1), torch.cat([values, 2 * x[:, None]], 1)
        attn = torch.softmax((keys @ x[:, :, None]).squeeze(-1), dim=-1)  # [B,T]
        return self.out((attn[:, :, None] * values).sum(1)), keys, values


def test_growing_state_becomes_a_dynamic_axis(tmp_path, pieces):
    torch.manual_seed(0)
    model = GrowingCache(N_FEATURES, len(SATB)).eval()
    spec = FeatureSpec(n_parts=len(SATB))
    encoding = {"parts": list(SATB), "features": spec.to_dict(),
                "feature_names": Featurizer(spec).feature_names()}
    path = tmp_path / "toy.onnx"
    state = exporter.export_graph(model, N_FEATURES, path)
    assert [s["shape"] for s in state] == [[1, 0, 8], [1, 0, 8]]
    dims = onnx.load(str(path)).graph.input[2].type.tensor_type.shape.dim
    assert dims[1].dim_param and not dims[1].dim_value
    run = exporter.Run(tmp_path, model, encoding, {}, 0, {})
    exporter.write_card(tmp_path / "toy.json", exporter.make_card(run, "toy", path, state, {}))
    report = check_parity(model, OnnxModel(path), pieces[:1])
    assert report.ok, report


# -- refusals (no export needed) ---------------------------------------------------------


def test_unknown_kind(tmp_path):
    run = write_tiny_run(tmp_path, **TINY_LSTM)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "kind": "gru"}, run / "checkpoint.pt")
    with pytest.raises(ModelError, match="checkpoint is a 'gru' model; models.instrument has .*lstm"):
        exporter.load_run(run)


def test_initial_state_must_be_zeros():
    model = GrowingCache(N_FEATURES, len(SATB))
    model.initial_state = lambda batch: (torch.ones(batch, 0, 8) + 1, torch.ones(batch, 1, 8))
    with pytest.raises(ModelError, match="initial_state is not all zeros"):
        exporter.example_inputs(model, N_FEATURES)


def test_run_with_another_featurizer_is_refused_before_export(tmp_path, capsys):
    run = write_tiny_run(tmp_path / "run", **TINY_LSTM)
    encoding = json.loads((run / "encoding.json").read_text())
    encoding["feature_names"][0] = "dt_previous"
    (run / "encoding.json").write_text(json.dumps(encoding))
    assert exporter.main([str(run), "--name", "x", "--out", str(tmp_path / "out")]) == 1
    assert "another featurizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_run(tmp_path, capsys):
    assert exporter.main([str(tmp_path / "nowhere"), "--name", "x", "--out", str(tmp_path)]) == 1
    assert "export failed: cannot load" in capsys.readouterr().err


def test_dynamic_shapes_only_for_growing_axes():
    fixed = (torch.zeros(2, 1, 4),)
    assert exporter.dynamic_shapes(fixed, fixed) is None
    spec = exporter.dynamic_shapes((torch.zeros(1, 0, 4),), (torch.zeros(1, 2, 4),))
    assert list(spec[2][0]) == [1]


@pytest.mark.parametrize("layers", [1, 3])
def test_lean_lstm_graph_computes_the_models_step(layers):
    import onnxruntime as ort

    from export.lstm_graph import lstm_step_graph
    from models.instrument import InstrumentLSTM

    torch.manual_seed(layers)
    model = InstrumentLSTM(12, 4, hidden=24, layers=layers, pitch_dim=5, dropout=0.0).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    names = (["pitch", "feats", "h", "c"], ["logits", "h_out", "c_out"])
    session = ort.InferenceSession(lstm_step_graph(state, model.hparams, names).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    h, c = (s.numpy() for s in model.initial_state(1))
    th, tc = model.initial_state(1)
    rng = np.random.default_rng(layers)
    for _ in range(20):
        pitch, feats = rng.integers(0, 128, 1), rng.normal(size=(1, 12)).astype(np.float32)
        logits, h, c = session.run(None, {"pitch": pitch, "feats": feats, "h": h, "c": c})
        with torch.no_grad():
            expected, th, tc = model.step(torch.from_numpy(pitch), torch.from_numpy(feats), th, tc)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)
        np.testing.assert_allclose(h, th.numpy(), atol=1e-5)
        np.testing.assert_allclose(c, tc.numpy(), atol=1e-5)


def test_lean_lstm_graph_refuses_another_models_weights():
    from export.lstm_graph import lstm_step_graph

    with pytest.raises(ValueError, match="missing .*lstm.weight_ih_l0"):
        lstm_step_graph({"pitch.weight": np.zeros((128, 4), np.float32)}, {"layers": 1, "hidden": 8,
                        "n_features": 3}, (["p", "f", "h", "c"], ["l", "ho", "co"]))
