"""The continuation model: encoding, streaming equivalence, ONNX parity, the runner and its refusals.

The model under test is a tiny random ContinuationTransformer (window 16, so
the cache slides on a real chorale) exported once per session with the real
exporter, which needs torch (the ``train`` extra); without torch those tests
skip and say so.  The runner itself never imports torch, which a test checks
in a clean interpreter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coplayer.data.notes import Note
from coplayer.errors import ModelError
from coplayer.gen.data import EventPiece, bar_ticks, encode_arrays
from coplayer.gen.encoding import FIELDS, Encoding
from coplayer.gen.model import EventModel
from coplayer.gen.runner import NO_INTERVAL, OnnxEventModel, PitchContext, RingCache

REPO = Path(__file__).resolve().parents[1]
NO_TORCH = "building the test model needs torch (pip install 'coplayer[train]')"
TINY = dict(dim=32, layers=2, heads=4, window=16, mlp_ratio=2, dropout=0.0)
ENC = Encoding()
SIZES = [ENC.sizes[f] for f in FIELDS]


def random_piece(n: int, seed: int = 0) -> EventPiece:
    rng = np.random.default_rng(seed)
    events = np.stack([rng.integers(0, s, n) for s in SIZES], axis=-1)
    return EventPiece("random", "bach", events, rng.integers(0, 48, n))


def tiny_model(seed: int = 0):
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    from models.continuation import ContinuationTransformer

    torch.manual_seed(seed)
    return ContinuationTransformer(SIZES, **TINY).eval()


def real_pieces():
    """Two real test chorales (needs the chorale cache, i.e. music21 to build it)."""
    pytest.importorskip("music21", reason="the chorale corpus needs music21 (pip install 'coplayer[train]')")
    from coplayer.gen.data import chorale_pieces

    return chorale_pieces("test")[:2]


# -- the encoding ---------------------------------------------------------------------


def notes_3_4_with_pickup() -> list[Note]:
    """A 3/4 tune with a one-beat pickup, a chord in the soprano and a held bass."""
    rows = [(0.0, 1.0, 67, "soprano"), (1.0, 0.5, 72, "soprano"), (1.0, 0.5, 76, "soprano"),
            (1.0, 3.0, 48, "bass"), (1.5, 0.5, 74, "soprano"), (2.0, 1.0 / 3, 71, "alto"),
            (4.0, 12.0, 60, "tenor")]
    return [Note(pitch=p, velocity=90, onset=0.0, duration=0.0, onset_beats=o, duration_beats=d, part=part)
            for o, d, p, part in rows]


def test_encode_arrays_matches_encoding_encode():
    notes = notes_3_4_with_pickup()
    index = {p: i for i, p in enumerate(ENC.parts)}
    events, pos = encode_arrays(np.array([n.onset_beats for n in notes]),
                                np.array([n.duration_beats for n in notes]), np.array([n.pitch for n in notes]),
                                np.array([index[n.part] for n in notes]), np.array([n.velocity for n in notes]),
                                ENC, meter=(3, 4), pickup=2.0)
    expected, _ = ENC.encode(notes, start_beat=-2.0)
    np.testing.assert_array_equal(events, expected)
    # Pickup of 2 of the 3 beats missing: the first barline is at beat 1.
    assert bar_ticks((3, 4), ENC) == 36
    assert pos.tolist() == [24, 0, 0, 0, 6, 12, 0]
    assert events[1:3, 2].tolist() == [76, 72], "within one onset and part, the higher note first"
    assert events[-1, 3] == ENC.max_dur - 1, "durations are clipped to max_dur"


def test_encoding_round_trip():
    notes = notes_3_4_with_pickup()[:-1]  # the last duration is clipped
    events, _ = ENC.encode(notes, start_beat=0.0)
    back = ENC.decode(events, start_tick=0)
    order = sorted(notes, key=lambda n: (round(n.onset_beats * 12), ENC.parts.index(n.part), -n.pitch))
    assert len(back) == len(notes)
    for a, b in zip(order, back):
        assert (a.pitch, a.part) == (b.pitch, b.part)
        assert a.onset_beats == pytest.approx(b.onset_beats)
        assert a.duration_beats == pytest.approx(b.duration_beats)
        assert b.velocity // 16 == a.velocity // 16
    assert Encoding.from_dict(json.loads(json.dumps(ENC.to_dict()))) == ENC


def test_duplicate_melodies_share_a_split():
    from coplayer.gen.data import Melody, assign_melody_splits, melody_split_of

    tune = np.array([[0.0, 1.0, 60], [1.0, 0.5, 62], [1.5, 0.5, 64], [2.0, 2.0, 65]])
    keys = [f"essenFolksong/x.abc#{i}" for i in range(40)]
    melodies = {k: Melody(k, tune + [0, 0, i] if i < 20 else tune * [1, 1, 1] + [i, 0, 0], (4, 4), 0.0)
                for i, k in enumerate(keys)}  # 20 transpositions, then 20 shifts in time: one tune
    melodies["essenFolksong/y.abc#0"] = Melody("essenFolksong/y.abc#0", tune[::-1].copy(), (4, 4), 0.0)
    splits, groups = assign_melody_splits(melodies)
    assert len(groups) == 1 and len(groups[0]) == 40
    assert {splits[k] for k in keys} == {"train"}, "a duplicate of a training tune is never held out"
    assert splits["essenFolksong/y.abc#0"] == melody_split_of("essenFolksong/y.abc#0")


@pytest.mark.torch
def test_packing_targets_stay_within_a_piece():
    pytest.importorskip("torch", reason=NO_TORCH)
    from models.train_continue import bos_event, pack, to_seq

    pieces = [random_piece(5, 1), random_piece(3, 2)]
    seqs = [to_seq(p, ENC) for p in pieces]
    rows = pack(seqs, 4, ENC)  # stream: BOS a1..a5 BOS b1..b3 -> 10 events, rows of 4
    stream = np.concatenate([bos_event(ENC)[None], pieces[0].events, bos_event(ENC)[None], pieces[1].events])
    flat_in = rows.events.reshape(-1, 5)[:10]
    np.testing.assert_array_equal(flat_in, stream)
    flat_w = rows.weight.reshape(-1)[:10]
    # Every event is a target except the BOS of the second piece (index 6).
    assert flat_w.tolist() == [1, 1, 1, 1, 1, 0, 1, 1, 1, 0]
    np.testing.assert_array_equal(rows.targets.reshape(-1, 5)[:5], stream[1:6])
    np.testing.assert_array_equal(rows.anchor.reshape(-1)[:5], seqs[0].anchor)
    eval_rows = pack(seqs, 8, ENC, split_pieces=False)
    assert len(eval_rows.pos) == 2, "a piece that does not fit opens a new row"
    assert eval_rows.weight.sum() == 5 + 3


# -- streaming in torch ------------------------------------------------------------------


def stream_hidden(model, piece: EventPiece, chunks: list[int], prefill: bool = True):
    """Hidden states after every event, fed through ``decode`` and a RingCache in ``chunks``
    (the first chunk without a cache when ``prefill``, as the runtime does)."""
    torch = pytest.importorskip("torch", reason=NO_TORCH)

    h = model.hparams
    ring = RingCache(h["layers"], h["heads"], h["dim"] // h["heads"], h["window"])
    bos_e, bos_p, bos_r = model.bos()
    events = torch.cat([bos_e[0], torch.from_numpy(piece.events)])
    pos = torch.cat([bos_p[0], torch.from_numpy(piece.pos)])
    rel = torch.cat([bos_r[0], torch.from_numpy(PitchContext(4).features(piece.events)[0])])
    out, start = [], 0
    with torch.no_grad():
        for size in chunks:
            ins = {k: torch.from_numpy(v) for k, v in ring.inputs().items()}
            ks = [ins[f"k_cache_{i}"] for i in range(h["layers"])]
            vs = [ins[f"v_cache_{i}"] for i in range(h["layers"])]
            if start == 0 and prefill:
                ks = vs = ins["age"] = None
            window = slice(start, start + size)
            hidden, k_new, v_new = model.decode(events[None, window], pos[None, window], rel[None, window],
                                                ks, vs, ins["age"])
            ring.write([k.numpy() for k in k_new], [v.numpy() for v in v_new])
            out.append((start + size - 1, hidden[0]))
            start += size
    return out


@pytest.mark.torch
def test_step_by_step_equals_forward_past_the_window():
    torch = pytest.importorskip("torch", reason=NO_TORCH)

    model = tiny_model()
    piece = random_piece(50)
    n = len(piece) + 1
    with torch.no_grad():
        bos_e, bos_p, bos_r = model.bos()
        rel = PitchContext(4).features(piece.events)[0]
        full = model(torch.cat([bos_e[0], torch.from_numpy(piece.events)])[None],
                     torch.cat([bos_p[0], torch.from_numpy(piece.pos)])[None],
                     torch.cat([bos_r[0], torch.from_numpy(rel)])[None])[0]
    for chunks, prefill in (([1] * n, False), ([1] * n, True), ([16, 16, 16, 3], True), ([7, 1, 16, 2, 1, 20, 4], True)):
        for index, hidden in stream_hidden(model, piece, chunks, prefill):
            torch.testing.assert_close(hidden, full[index], atol=1e-5, rtol=0)


@pytest.mark.torch
def test_packed_pieces_do_not_see_each_other():
    torch = pytest.importorskip("torch", reason=NO_TORCH)

    model = tiny_model()
    a, b = random_piece(6, 1), random_piece(5, 2)
    rel = torch.from_numpy(PitchContext(4).features(np.concatenate([a.events, b.events]))[0])[None]
    with torch.no_grad():
        both = model(torch.from_numpy(np.concatenate([a.events, b.events]))[None],
                     torch.from_numpy(np.concatenate([a.pos, b.pos]))[None], rel,
                     torch.tensor([[0] * 6 + [1] * 5]))[0]
        alone = model(torch.from_numpy(b.events)[None], torch.from_numpy(b.pos)[None], rel[:, 6:])[0]
    torch.testing.assert_close(both[6:], alone, atol=1e-5, rtol=0)


@pytest.mark.torch
def test_heads_see_the_fields_chosen_before_them():
    torch = pytest.importorskip("torch", reason=NO_TORCH)

    model = tiny_model()
    hidden = torch.randn(1, TINY["dim"])
    a = torch.tensor([[3, 1, 60, 11, 5]])
    b = torch.tensor([[3, 1, 64, 11, 5]])  # another pitch
    anchor = torch.tensor([62])
    with torch.no_grad():
        assert torch.equal(model.field_logits(2, hidden, a, anchor), model.field_logits(2, hidden, b, anchor)), \
            "a head must not see its own field or later ones"
        assert not torch.equal(model.field_logits(3, hidden, a), model.field_logits(3, hidden, b)), \
            "the duration head sees the pitch"


@pytest.mark.torch
def test_pitch_head_is_relative_to_the_anchor():
    torch = pytest.importorskip("torch", reason=NO_TORCH)

    from models.continuation import PITCH

    model = tiny_model()
    with torch.no_grad():
        head = model.heads[PITCH].net[-1]
        head.weight.zero_()
        head.bias.zero_()
        head.bias[128 + 25 + 2] = 5.0  # "a whole tone up" in the relative part
        fields, hidden = torch.tensor([[3, 1]]), torch.randn(1, TINY["dim"])
        for anchor in (55, 67):
            logits = model.field_logits(PITCH, hidden, fields, torch.tensor([anchor]))[0]
            assert int(logits.argmax()) == anchor + 2
        assert float(model.field_logits(PITCH, hidden, fields, torch.tensor([-1]))[0].abs().max()) == 0.0


def test_pitch_context_anchors():
    ctx = PitchContext(4)
    events = np.array([[0, 0, 72, 11, 5], [0, 3, 48, 11, 5], [12, 0, 74, 11, 5], [0, 1, 67, 11, 5]])
    rel, anchors = ctx.features(events)
    assert anchors.tolist() == [-1, 72, 72, 74], "a part's first note is heard against the last event"
    assert rel[:, 0].tolist() == [NO_INTERVAL, 24 - 24, 24 + 2, 24 - 7], "intervals clipped to +-24"
    assert rel[:, 1].tolist() == [NO_INTERVAL, 0, 24 + 24, 24 - 7]
    assert ctx.anchor(3) == 48 and ctx.anchor(2) == 67


# -- ONNX --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """A tiny random model exported and parity-checked on real test chorales: the decoder path."""
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    from export.continuation import export, install, load_run

    model = tiny_model()
    root = tmp_path_factory.mktemp("continue")
    run_dir = root / "run"
    run_dir.mkdir()
    torch.save({"kind": model.kind, "hparams": model.hparams, "state_dict": model.state_dict(), "epoch": 1,
                "valid": {}, "test": {}}, run_dir / "checkpoint.pt")
    (run_dir / "encoding.json").write_text(json.dumps({**ENC.to_dict(), "pos_classes": 96, "bos_shift": SIZES[0]}))
    (run_dir / "train-args.json").write_text(json.dumps(TINY))
    stage = root / "stage"
    stage.mkdir()
    report = export(load_run(run_dir), "tiny", stage, {}, real_pieces(), prefill=20)
    assert report.ok, str(report)
    assert report.events > TINY["window"], "parity must cover the sliding window"
    install(stage, "tiny", root / "out")
    return root / "out" / "tiny.onnx"


def test_export_writes_every_graph_with_its_hash(exported):
    card = json.loads(exported.with_suffix(".json").read_text())
    assert card["task"] == "continue" and card["window"] == TINY["window"]
    assert sorted(card["graphs"]) == sorted(["decoder", "prefill", *FIELDS])
    for graph in card["graphs"].values():
        path = exported.with_name(graph["file"])
        assert path.stat().st_size == graph["size_bytes"]
    assert card["parity"]["ok"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert Encoding.from_dict(card["encoding"]) == ENC


def test_runner_is_an_event_model(exported):
    model = OnnxEventModel(exported)
    assert isinstance(model, EventModel)
    assert model.encoding == ENC and model.name == "tiny"
    logits = model.field_logits("shift", {})  # empty context: scores the first event after BOS
    assert logits.dtype == np.float64 and logits.shape == (ENC.sizes["shift"],)


def test_runner_long_context_fork_and_reset(exported):
    model = OnnxEventModel(exported)
    piece = random_piece(100)
    model.feed(piece.events, piece.pos)  # > window: fed in chunks, the oldest slide out
    partial = {"shift": 0, "part": 1}
    before = model.field_logits("pitch", partial)
    other = model.fork()
    other.feed(piece.events[:3], piece.pos[:3])
    np.testing.assert_array_equal(model.field_logits("pitch", partial), before)
    assert not np.array_equal(other.field_logits("pitch", partial), before)
    model.reset()
    fresh = OnnxEventModel(exported)
    np.testing.assert_allclose(model.field_logits("shift", {}), fresh.field_logits("shift", {}), atol=1e-6)


def test_runner_rejects_bad_inputs(exported):
    model = OnnxEventModel(exported)
    with pytest.raises(ValueError, match="needs the fields chosen before it"):
        model.field_logits("pitch", {"shift": 0})
    with pytest.raises(ValueError, match="unknown field"):
        model.field_logits("tempo", {})
    with pytest.raises(ValueError, match=r"field pitch = 130"):
        model.feed(np.array([[0, 0, 130, 0, 0]]), np.array([0]))
    with pytest.raises(ValueError, match="out of range"):
        model.field_logits("dur", {"shift": 0, "part": 9, "pitch": 60})


# -- refusals ------------------------------------------------------------------------------


def copy_model(exported: Path, to: Path) -> Path:
    to.mkdir()
    for path in exported.parent.iterdir():
        shutil.copy(path, to / path.name)
    return to / exported.name


def refusal(path, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        OnnxEventModel(path)


def edit_card(model: Path, change) -> None:
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    change(card)
    card_path.write_text(json.dumps(card))


def test_refuses_missing_card(exported, tmp_path):
    model = copy_model(exported, tmp_path / "m")
    model.with_suffix(".json").unlink()
    refusal(model, "has no model card tiny.json")


def test_refuses_another_task(exported, tmp_path):
    model = copy_model(exported, tmp_path / "m")
    edit_card(model, lambda c: c.update(task="instrument"))
    refusal(model, "is a 'instrument' model, not a 'continue' model")


def test_refuses_a_changed_decoder(exported, tmp_path):
    model = copy_model(exported, tmp_path / "m")
    with model.open("ab") as f:
        f.write(b"\0")
    refusal(model, "does not match its model card")


def test_refuses_a_changed_or_missing_head(exported, tmp_path):
    model = copy_model(exported, tmp_path / "m")
    head = model.with_name("tiny-pitch.onnx")
    with head.open("ab") as f:
        f.write(b"\0")
    refusal(model, "tiny-pitch.onnx does not match its model card")
    head.unlink()
    refusal(model, "pitch graph tiny-pitch.onnx .* is missing")


def test_refuses_another_encoding(exported, tmp_path):
    model = copy_model(exported, tmp_path / "m")
    edit_card(model, lambda c: c["encoding"].update(version=99))
    refusal(model, "encoding version 99")
    edit_card(model, lambda c: c["encoding"].update(version=ENC.version, sizes={**ENC.sizes, "pitch": 88}))
    refusal(model, "this coplayer decodes")


def test_refuses_a_card_lacking_keys_or_graphs(exported, tmp_path):
    model = copy_model(exported, tmp_path / "m")
    edit_card(model, lambda c: c["graphs"].pop("vel"))
    refusal(model, "one head per field")
    edit_card(model, lambda c: c.pop("cache"))
    refusal(model, "lacks cache")


def test_refuses_swapped_graphs(exported, tmp_path):
    model = copy_model(exported, tmp_path / "m")
    shutil.copy(model.with_name("tiny-shift.onnx"), model.with_name("tiny-part.onnx"))

    def swap(card):
        card["graphs"]["part"]["sha256"] = card["graphs"]["shift"]["sha256"]
    edit_card(model, swap)
    refusal(model, r"graph tiny-part.onnx \(part\) has inputs \['hidden'\]")


def test_shipped_name_resolves(exported, tmp_path, monkeypatch):
    from coplayer.instrument import runner

    copy_model(exported, tmp_path / "assets")
    monkeypatch.setattr(runner.resources, "files", lambda package: tmp_path)
    assert runner.shipped_models() == ["tiny"], "head and prefill graphs have no card: they are not models"
    assert OnnxEventModel("tiny").path == tmp_path / "assets" / "tiny.onnx"


@pytest.mark.subprocess
def test_runner_does_not_import_torch(exported):
    code = ("import sys; from coplayer.gen.runner import OnnxEventModel; "
            f"m = OnnxEventModel({str(exported)!r}); m.field_logits('shift', {{}}); "
            "assert 'torch' not in sys.modules, 'the runner imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
