"""InstrumentTransformer: streaming with a sliding-window KV cache equals ``forward``.

The models are small and randomly initialised, with a short window so that
every sequence runs several windows past the start (T = 3W).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the models need torch (pip install 'coplayer[train]')")

from models.instrument import InstrumentTransformer  # noqa: E402

F, K, W = 12, 4, 16
TINY = dict(n_features=F, n_parts=K, hidden=32, layers=2, heads=4, window=W, pitch_dim=8, dropout=0.1)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **overrides) -> InstrumentTransformer:
    torch.manual_seed(seed)
    return InstrumentTransformer(**{**TINY, **overrides}).eval()


def notes(batch: int, t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(21, 109, (batch, t), generator=g), torch.randn(batch, t, F, generator=g)


@torch.no_grad()
def stream(model, pitch, feats, state=None, lengths=None):
    """Step through [B,T] notes as the training rollout does; finished rows keep their state."""
    b, t = pitch.shape
    state = tuple(model.initial_state(b)) if state is None else state
    outs = []
    for i in range(t):
        logits, *new = model.step(pitch[:, i], feats[:, i], *state)
        state = new if lengths is None else model.select_state(lengths > i, tuple(new), state)
        outs.append(logits)
    return torch.stack(outs, dim=1), tuple(state)


def test_streaming_equals_forward_past_the_window():
    model = tiny()
    pitch, feats = notes(3, 3 * W)
    with torch.no_grad():
        full, _ = model(pitch, feats)
    streamed, state = stream(model, pitch, feats)
    assert full.shape == streamed.shape == (3, 3 * W, K)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=0)
    assert [tuple(s.shape) for s in state] == [tuple(s.shape) for s in model.initial_state(3)]


def test_forward_state_continues_with_step():
    model = tiny()
    pitch, feats = notes(2, 3 * W)
    cut = W + 5
    with torch.no_grad():
        full, _ = model(pitch, feats)
        head, state = model(pitch[:, :cut], feats[:, :cut])
    tail, _ = stream(model, pitch[:, cut:], feats[:, cut:], state)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, atol=1e-5, rtol=0)


def test_short_prefix_state_is_padded_and_partly_valid():
    model = tiny()
    pitch, feats = notes(2, 5)
    with torch.no_grad():
        _, (k, v, valid) = model(pitch, feats)
    assert k.shape == v.shape == (2, 2, 4, W - 1, 8)
    assert valid.tolist() == [[0.0] * (W - 6) + [1.0] * 5] * 2
    assert not k[:, :, :, : W - 6].any()


def test_batch_of_different_lengths():
    model = tiny()
    lengths = torch.tensor([7, 3 * W, 2 * W + 3])
    pitch, feats = notes(3, 3 * W)
    with torch.no_grad():
        padded, _ = model(pitch, feats)  # right padding never leaks into earlier notes
        alone = [model(pitch[i:i + 1, :n], feats[i:i + 1, :n]) for i, n in enumerate(lengths.tolist())]
    streamed, state = stream(model, pitch, feats, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        logits, own_state = alone[i]
        torch.testing.assert_close(padded[i, :n], logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(streamed[i, :n], logits[0], atol=1e-5, rtol=0)
        # A finished row's state stays as it was at its last note.
        row = model.index_state(state, torch.tensor([i]))
        for s, own in zip(row, own_state, strict=True):
            torch.testing.assert_close(s, own, atol=1e-5, rtol=0)


def test_context_is_the_last_window_notes_per_layer():
    model = tiny()
    reach = model.hparams["layers"] * (W - 1)  # each layer looks W-1 notes further back
    pitch, feats = notes(1, 4 * W)
    changed = feats.clone()
    changed[0, 3] += 5.0
    with torch.no_grad():
        diff = (model(pitch, feats)[0] - model(pitch, changed)[0]).abs().amax(dim=-1)[0]
    assert diff[:3].max() == 0
    assert diff[3:4 + reach].min() > 0
    assert diff[4 + reach:].max() == 0


def test_hparams_rebuild_the_model():
    model = tiny()
    clone = InstrumentTransformer(**model.hparams).eval()
    clone.load_state_dict(model.state_dict())
    pitch, feats = notes(1, W)
    with torch.no_grad():
        torch.testing.assert_close(clone(pitch, feats)[0], model(pitch, feats)[0], atol=0, rtol=0)
    assert model.kind == "transformer"
    assert len(model.state_names) == len(model.initial_state(1)) == len(model.state_batch_dims)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of heads"):
        InstrumentTransformer(F, K, hidden=30, heads=4)
    with pytest.raises(ValueError, match="window"):
        InstrumentTransformer(F, K, window=1)


class _Step(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pitch, feats, *state):
        return self.model.step(pitch, feats, *state)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_step_matches_torch_for_300_notes(tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime", reason="the parity check needs onnxruntime")
    pytest.importorskip("onnx", reason="export needs onnx (pip install 'coplayer[train]')")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    model = tiny(window=32)
    names = list(model.state_names)
    initial = tuple(model.initial_state(1))
    args = (torch.tensor([60]), torch.zeros(1, F), *initial)
    path = tmp_path / "step.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated and says so
        # The wrapper must be in eval mode too: the TorchScript exporter would bake dropout in.
        torch.onnx.export(_Step(model).eval(), args, str(path), input_names=["pitch", "feats", *names],
                          output_names=["logits", *(n + "_out" for n in names)], opset_version=18,
                          dynamo=dynamo, **({"external_data": False} if dynamo else {}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pitch", "feats", *names]
    pitch, feats = notes(1, 300, seed=7)
    state, ort_state, worst = initial, [s.numpy() for s in initial], 0.0
    with torch.no_grad():
        for i in range(300):
            logits, *state = model.step(pitch[:, i], feats[:, i], *state)
            out = session.run(None, {"pitch": pitch[:, i].numpy(), "feats": feats[:, i].numpy(),
                                     **dict(zip(names, ort_state))})
            ort_state = out[1:]
            worst = max(worst, float(np.abs(out[0] - logits.numpy()).max()))
    assert worst <= 1e-4
    for s, o in zip(state, ort_state):
        assert tuple(o.shape) == tuple(s.shape)
