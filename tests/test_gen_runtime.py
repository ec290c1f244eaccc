"""The continuation runtime: the Markov baseline, the sampler's constraints, ``coplayer continue``
and ``coplayer eval continue``.

Everything runs on the Markov model or on a tiny fake EventModel, so no ONNX
model is needed; the tests of the shipped transformer skip until it ships.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter

import numpy as np
import pytest

from coplayer.cli import main
from coplayer.config import load_config, parse_config
from coplayer.data.midi import read_midi, write_midi
from coplayer.data.notes import Note, Score, TempoMap
from coplayer.errors import ConfigError
from coplayer.gen.encoding import FIELDS, Encoding
from coplayer.gen.markov import MarkovModel, MarkovSettings, piece_nll_bits
from coplayer.gen.model import EventModel
from coplayer.gen.sampler import HARD_LOCK, Controls, Key, Sampler, detect_key

ENC = Encoding()
TPB = ENC.ticks_per_beat
BAR = ENC.ticks_per_bar
PARTS = ENC.parts
RANGES = {"soprano": (60, 81), "alto": (53, 74), "tenor": (48, 69), "bass": (36, 64)}
C_MAJOR = (0, 2, 4, 5, 7, 9, 11)


# -- fixtures -----------------------------------------------------------------------


def chorale_notes(bars: int = 4, seed: int = 0, transpose: int = 0) -> list[Note]:
    """A made-up four-part piece in C major: a chord on every beat, some eighths."""
    rng = np.random.default_rng(seed)
    chords = [(0, 4, 7), (5, 9, 0), (7, 11, 2), (9, 0, 4)]
    base = {"soprano": 72, "alto": 64, "tenor": 55, "bass": 48}
    notes = []
    for beat in range(bars * 4):
        chord = chords[int(rng.integers(len(chords)))] if beat % 4 else chords[0]
        for part, centre in base.items():
            pcs = chord if part != "bass" else chord[:1]
            pitch = min((centre + d for d in range(-6, 7) if (centre + d) % 12 in pcs), key=lambda p: abs(p - centre))
            split = part == "soprano" and rng.random() < 0.3
            for k in range(2 if split else 1):
                p = pitch + (2 if k else 0) + transpose
                dur = 0.5 if split else 1.0
                notes.append(Note(p, 80, 0.0, 0.0, beat + 0.5 * k, dur, part))
    return notes


def piece(bars: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return ENC.encode(chorale_notes(bars, seed))


@pytest.fixture(scope="module")
def markov() -> MarkovModel:
    """The shipped counts: the model the product falls back to."""
    return MarkovModel.load()


@pytest.fixture(scope="module")
def tiny() -> MarkovModel:
    """Fitted here on made-up pieces: proves fitting works without the corpus."""
    return MarkovModel.fit([piece(8, s) for s in range(6)], ENC, MarkovSettings(order=3))


class FakeModel:
    """An EventModel with random (seeded) logits that ignore the context: it breaks every rule."""

    def __init__(self, seed: int = 0, on_feed=None):
        self.encoding = ENC
        self.name = "fake"
        self.seed = seed
        self.on_feed = on_feed
        self.fed = 0
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.fed = 0

    def feed(self, events, pos) -> None:
        self.fed += len(events)
        if self.on_feed:
            self.on_feed(self.fed)

    def field_logits(self, field: str, partial: dict[str, int]) -> np.ndarray:
        return self.rng.normal(0.0, 1.0, ENC.sizes[field])

    def fork(self):
        raise NotImplementedError


def controls(**kw) -> Controls:
    values = dict(seed=1, ranges=dict(RANGES), monophonic=frozenset(PARTS))
    values.update(kw)
    return Controls(**values)


def notes_of(resp):
    return resp.notes


def sounding_at(notes: list[Note], beat: float) -> int:
    return sum(n.onset_beats <= beat + 1e-9 < n.end_beats - 1e-9 for n in notes)


# -- the Markov model ---------------------------------------------------------------


def test_markov_is_an_event_model(markov):
    assert isinstance(markov, EventModel)
    assert markov.encoding == ENC


@pytest.mark.parametrize("model_name", ["markov", "tiny"])
def test_markov_probabilities_sum_to_one_and_never_vanish(model_name, markov, tiny):
    model = {"markov": markov, "tiny": tiny}[model_name]
    events, pos = piece(4, seed=7)
    model.reset()
    model.feed(events[:20], pos[:20])
    partial = {}
    for f, value in zip(FIELDS, events[20]):
        p = np.exp(model.field_logits(f, partial))
        assert p.shape == (ENC.sizes[f],)
        assert p.sum() == pytest.approx(1.0, abs=1e-9)
        assert p.min() > 0
        partial[f] = int(value)


def test_markov_key_collision_keeps_the_fields_classes(markov, monkeypatch):
    """A context that collides with another field's stored context (its key
    is a hash) must still give a distribution over this field's classes."""
    table = markov.table
    wide = next(i for i in range(len(table)) if table.row(i)[0].max() >= ENC.sizes["part"])
    events, pos = piece(4, seed=7)
    model = MarkovModel(ENC, table, markov.settings)
    model.feed(events[:20], pos[:20])
    monkeypatch.setattr(table, "find", lambda key: wide)
    p = np.exp(model.field_logits("part", {"shift": int(events[20][0])}))
    assert p.shape == (ENC.sizes["part"],) and p.sum() == pytest.approx(1.0) and p.min() > 0


def test_markov_nll_finite_and_lower_on_its_own_style(tiny):
    events, pos = piece(4, seed=99)
    bits = piece_nll_bits(tiny, events, pos)
    assert bits.shape == (len(events), len(FIELDS)) and np.isfinite(bits).all() and (bits >= 0).all()
    # random pitches are far less likely than the style it learned
    noise = events.copy()
    noise[:, 2] = np.random.default_rng(0).integers(30, 90, len(events))
    assert piece_nll_bits(tiny, noise, pos).sum() > bits.sum() + len(events)


def test_markov_learns_live_and_forgets(markov):
    events, pos = ENC.encode(chorale_notes(2, seed=3, transpose=1))  # C# major: unusual
    model = MarkovModel.load()
    before = piece_nll_bits(model, events, pos).sum()
    model.learn(events, pos)
    learned = piece_nll_bits(model, events, pos).sum()
    model.forget()
    assert learned < before - 10
    assert piece_nll_bits(model, events, pos).sum() == pytest.approx(before)


def test_markov_adapt_is_causal(markov):
    """Online learning may not see an event before predicting it."""
    events, pos = piece(2, seed=5)
    model = MarkovModel.load(adapt=True)
    first = piece_nll_bits(model, events[:1], pos[:1])
    model.forget()
    assert first == pytest.approx(piece_nll_bits(MarkovModel.load(), events[:1], pos[:1]))


def test_markov_fork_has_its_own_context(markov):
    events, pos = piece(2, seed=1)
    markov.reset()
    markov.feed(events[:10], pos[:10])
    twin = markov.fork()
    twin.feed(events[10:14], pos[10:14])
    assert not np.allclose(markov.field_logits("pitch", {"shift": 0, "part": 1}),
                           twin.field_logits("pitch", {"shift": 0, "part": 1}))
    markov.feed(events[10:14], pos[10:14])
    assert np.allclose(markov.field_logits("shift", {}), twin.field_logits("shift", {}))


def test_markov_save_load_round_trip(tiny, tmp_path):
    tiny.save(tmp_path / "m")
    back = MarkovModel.load(tmp_path / "m.npz")
    events, pos = piece(2, seed=11)
    assert np.allclose(piece_nll_bits(tiny, events, pos), piece_nll_bits(back, events, pos), atol=1e-5)
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["task"] == "continue" and card["kind"] == "markov" and card["encoding"]["parts"] == list(PARTS)


def test_markov_missing_file_is_a_model_error(tmp_path):
    from coplayer.errors import ModelError

    with pytest.raises(ModelError, match="missing"):
        MarkovModel.load(tmp_path / "nothing.npz")


# -- keys ----------------------------------------------------------------------------


def test_key_parse_and_detect():
    assert Key.parse("F# minor") == Key(6, "minor") and Key.parse("Bb major") == Key(10, "major")
    assert str(Key.parse("eb MAJOR")) == "Eb major"
    with pytest.raises(ConfigError):
        Key.parse("H major")
    scale = [60, 62, 64, 65, 67, 69, 71, 72, 67, 64, 60, 60]
    assert detect_key(scale) == Key(0, "major")
    assert detect_key([p + 9 for p in [60, 62, 63, 65, 67, 68, 71, 72, 67, 63, 60, 60]]) == Key(9, "minor")
    assert detect_key([]) is None


# -- the sampler: constraints --------------------------------------------------------


def generate(model, ctl: Controls, bars: int = 4, context=None, **kw):
    events, pos = context if context is not None else piece(4, seed=2)
    return Sampler(model, ctl).generate(events, pos, bars, **kw)


@pytest.mark.parametrize("make", [FakeModel, MarkovModel.load], ids=["fake", "markov"])
def test_sampler_respects_every_constraint(make):
    key = Key.parse("D major")
    ctl = controls(key=key, key_lock=HARD_LOCK, parts=("alto", "tenor", "bass"), max_polyphony=2)
    for seed in range(3):
        ctl.set(seed=seed)
        resp = generate(make(), ctl, bars=3)
        notes = resp.notes
        assert notes, "nothing generated"
        assert {n.pitch % 12 for n in notes} <= set(key.scale)
        assert {n.part for n in notes} <= {"alto", "tenor", "bass"}
        for n in notes:
            low, high = RANGES[n.part]
            assert low <= n.pitch <= high
        for n in notes:  # polyphony at every onset
            assert sounding_at(notes, n.onset_beats) <= 2
        for part in {n.part for n in notes}:  # monophonic parts never overlap
            mine = sorted((n.onset_beats, n.end_beats) for n in notes if n.part == part)
            assert all(a[1] <= b[0] + 1e-9 for a, b in zip(mine, mine[1:]))
        assert min(n.onset_beats for n in notes) >= 0
        assert max(n.end_beats for n in notes) <= 3 * 4 + 1e-9  # 3 bars of 4/4, durations cut


def test_a_melody_is_answered_by_a_melody(markov):
    """A monophonic part the model wants that still sounds makes the note wait, not change part."""
    tune = [67, 69, 71, 67, 72, 71, 69, 67, 65, 64, 62, 60, 64, 67, 72, 67]
    notes = [Note(p, 80, 0, 0, 2.0 * i, 2.0 if i % 4 else 4.0, "soprano") for i, p in enumerate(tune)]
    events, pos = ENC.encode([n for n in notes if n.onset_beats < 32])
    for seed in range(4):
        resp = generate(markov, controls(seed=seed), bars=4, context=(events, pos))
        assert {n.part for n in resp.notes} == {"soprano"}
        spans = sorted((n.onset_beats, n.end_beats) for n in resp.notes)
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))


def test_sampler_start_and_bars():
    events, pos = piece(4, seed=2)  # last onset: beat 15 of a 16-beat piece
    last = int(np.cumsum(events[:, 0])[-1])
    for start, expected in (("bar", 16 * TPB), ("beat", 16 * TPB), (30, last + 30)):
        resp = Sampler(FakeModel(), controls(density=1.0)).generate(events, pos, 2, start=start)
        assert resp.start == expected - last
        assert all(0 <= n.onset_beats < 8 for n in resp.notes)
    # a pause longer than the longest shift: the first note waits for the start
    resp = Sampler(MarkovModel.load(), controls()).generate(events, pos, 1, start=10 * TPB)
    assert resp.events[0, 0] >= 0 and resp.notes[0].onset_beats >= 0


def test_sampler_pos_follows_the_bar():
    resp = generate(FakeModel(), controls(), bars=2, bar_ticks=3 * TPB)  # 3/4
    onsets = np.cumsum(resp.events[:, 0]) + resp.start + int(np.cumsum(piece(4, 2)[0][:, 0])[-1])
    barline = int(np.cumsum(piece(4, 2)[0][:, 0])[-1]) - int(piece(4, 2)[1][-1])
    assert ((onsets - barline) % (3 * TPB) == resp.pos).all()
    assert all(n.onset_beats < 6 for n in resp.notes)


def test_sampler_empty_context():
    resp = Sampler(MarkovModel.load(), controls()).generate(np.zeros((0, 5), int), np.zeros(0, int), 1)
    assert len(resp) > 0 and resp.start == 0


def test_same_seed_same_output_and_other_seeds_differ(markov):
    a = generate(markov, controls(seed=5))
    b = generate(markov, controls(seed=5))
    c = generate(markov, controls(seed=6))
    assert np.array_equal(a.events, b.events)
    assert not np.array_equal(a.events, c.events)


def test_temperature_and_top_p_change_the_output(markov):
    def spread(**kw):
        pitches = np.concatenate([[n.pitch for n in generate(markov, controls(seed=s, **kw)).notes]
                                  for s in range(4)])
        return len(np.unique(pitches))

    assert spread(temperature=2.0, top_p=1.0) > spread(temperature=0.3, top_p=0.5)


def test_density_changes_notes_per_beat(markov):
    def count(density):
        return sum(len(generate(markov, controls(seed=s, density=density, max_polyphony=4))) for s in range(3))

    sparse, normal, busy = count(0.5), count(1.0), count(2.0)
    assert sparse < normal < busy
    assert busy > 1.3 * sparse


def test_motif_repetition_quotes_the_call(markov):
    from coplayer.gen.evaluate import motif_patterns, quotes
    from coplayer.gen.sampler import Context, Motif

    events, pos = ENC.encode(chorale_notes(4, seed=4))
    motif = Motif.from_context(Context.from_events(events, pos), BAR, len(PARTS))
    assert motif is not None and motif.part == 0 and len(motif.pitches) >= 4

    def rate(m):
        hits = 0
        for s in range(6):
            resp = generate(markov, controls(seed=s, motif_repetition=m), context=(events, pos))
            g = resp.events
            onsets = np.cumsum(g[:, 0])
            hits += quotes(motif_patterns(motif), g[:, 1], onsets, g[:, 2])
        return hits

    assert rate(1.0) > rate(0.0)
    assert rate(1.0) >= 5


def test_controls_change_between_events_from_another_thread():
    ctl = controls(seed=3, max_polyphony=4)
    changed = threading.Event()

    def flip(fed: int) -> None:  # the response's 6th event: another thread restricts the parts
        if fed == context_len + 5 and not changed.is_set():
            t = threading.Thread(target=ctl.set, kwargs={"parts": ("bass",)})
            t.start()
            t.join()
            changed.set()

    events, pos = piece(4, seed=2)
    context_len = len(events)
    resp = Sampler(FakeModel(on_feed=flip), ctl).generate(events, pos, 4)
    assert changed.is_set()
    assert {n.part for n in resp.notes[6:]} == {"bass"}
    assert {n.part for n in resp.notes[:5]} != {"bass"}


def test_controls_validate():
    with pytest.raises(ConfigError):
        Controls(temperature=0)
    with pytest.raises(ConfigError):
        controls().set(top_p=1.5)
    with pytest.raises(ConfigError, match="unknown control"):
        controls().set(tempo=3)
    with pytest.raises(ConfigError, match="none of the parts"):
        generate(FakeModel(), controls(parts=("piano",)))


def test_controls_from_config():
    cfg = parse_config("continuation:\n  key_lock: A minor\n  seed: 4\n  response_parts: [bass]\n")
    ctl = Controls.from_config(cfg, temperature=0.5)
    assert ctl.key == Key(9, "minor") and ctl.key_lock == HARD_LOCK and ctl.seed == 4
    assert ctl.parts == ("bass",) and ctl.temperature == 0.5 and ctl.ranges["bass"] == (36, 64)
    # no key named: the key detected from the playing, kept with key_strength nats
    ctl = Controls.from_config(parse_config("continuation: {key_strength: 1.5}\n"))
    assert ctl.key is None and ctl.key_lock == 1.5


# -- coplayer continue ---------------------------------------------------------------


def exact(score: Score) -> Counter:
    tpb = score.ticks_per_beat
    return Counter((n.part, n.pitch, round(n.onset_beats * tpb), round(n.duration_beats * tpb), n.velocity, n.channel)
                   for n in score.notes)


def write_piece(path, notes, meter=(4, 4), bpm=90.0):
    score = Score(notes=notes, tempo=TempoMap([(0.0, round(60e6 / bpm))]), time_signatures=[(0.0, *meter)],
                  parts=sorted({n.part for n in notes}, key=str))
    write_midi(score.fill_seconds(), path)
    return read_midi(path)


@pytest.mark.parametrize("case", ["satb", "melody", "keyboard", "three-four"])
def test_continue_keeps_the_input_and_appends_after_it(case, tmp_path):
    if case == "satb":
        notes = chorale_notes(3, seed=1)
    elif case == "melody":
        notes = [Note(p, 90, 0, 0, i * 0.5 + 0.25, 0.5, "Flute", channel=5)
                 for i, p in enumerate([67, 69, 71, 72, 74, 72, 71, 69, 67, 65, 64, 62, 60])]
    elif case == "keyboard":
        notes = [Note(n.pitch, 70, 0, 0, n.onset_beats, n.duration_beats, "Piano") for n in chorale_notes(2, seed=2)]
    else:
        notes = [n for n in chorale_notes(3, seed=3) if n.onset_beats < 8.5]
    meter = (3, 4) if case == "three-four" else (4, 4)
    src = write_piece(tmp_path / "in.mid", notes, meter)
    out_path = tmp_path / "out.mid"
    assert main(["continue", str(tmp_path / "in.mid"), "-o", str(out_path), "--bars", "2", "--seed", "1",
                 "--model", "markov"]) == 0
    out = read_midi(out_path)
    assert not exact(src) - exact(out), "an input note changed or went missing"
    added = exact(out) - exact(src)
    assert added, "no continuation"
    bar = 3 if case == "three-four" else 4
    last = max(n.onset_beats for n in src.notes)
    start = (int(last // bar) + 1) * bar * out.ticks_per_beat
    assert min(on for _, _, on, _, _, _ in added) >= start
    assert max(on + d for _, _, on, d, _, _ in added.elements()) <= start + 2 * bar * out.ticks_per_beat
    assert out.tempo == src.tempo and out.time_signatures == src.time_signatures
    assert out.parts[:len(src.parts)] == src.parts
    if case == "melody":  # the melody goes on in its own track and channel
        assert {(p, ch) for p, _, _, _, _, ch in added} >= {("Flute", 5)}


def test_continue_falls_back_with_one_warning(tmp_path, caplog):
    write_piece(tmp_path / "in.mid", chorale_notes(2, seed=1))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("continuation:\n  model: missing-model.onnx\n")
    with caplog.at_level(logging.WARNING):
        assert main(["continue", str(tmp_path / "in.mid"), "-o", str(tmp_path / "o.mid"), "--config", str(cfg),
                     "--parts", "bass", "--temperature", "0.8"]) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "missing-model" in r.getMessage()]
    assert len(warnings) == 1 and "markov" in warnings[0].getMessage()
    out = read_midi(tmp_path / "o.mid")
    assert {n.part for n in out.notes} == {"soprano", "alto", "tenor", "bass"}
    assert {n.part for n in out.notes if n.onset_beats >= 8} == {"bass"}


def test_continue_reports_bad_input(tmp_path, capsys):
    write_piece(tmp_path / "in.mid", chorale_notes(1))
    assert main(["continue", str(tmp_path / "in.mid"), "-o", str(tmp_path / "o.mid"), "--parts", "tuba",
                 "--model", "markov"]) == 2
    assert "tuba" in capsys.readouterr().err
    assert main(["continue", str(tmp_path / "nope.mid"), "-o", str(tmp_path / "o.mid")]) == 2


def test_continue_refuses_to_write_over_its_input(tmp_path, capsys):
    write_piece(tmp_path / "in.mid", chorale_notes(1))
    before = (tmp_path / "in.mid").read_bytes()
    (tmp_path / "link.mid").symlink_to(tmp_path / "in.mid")
    for out in ("in.mid", "./in.mid", "link.mid"):
        assert main(["continue", str(tmp_path / "in.mid"), "-o", str(tmp_path / out), "--model", "markov"]) == 2
        assert "is the input file" in capsys.readouterr().err
    assert (tmp_path / "in.mid").read_bytes() == before


def test_continue_bars_are_limited(tmp_path, capsys):
    from coplayer.config import MAX_CONTINUE_BARS
    from coplayer.gen.continue_file import continue_score

    write_piece(tmp_path / "in.mid", chorale_notes(1))
    args = ["continue", str(tmp_path / "in.mid"), "-o", str(tmp_path / "o.mid"), "--model", "markov", "--seed", "1"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--bars", str(MAX_CONTINUE_BARS + 1)])
    assert info.value.code == 2
    assert f"at most {MAX_CONTINUE_BARS} bars, got {MAX_CONTINUE_BARS + 1}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"1 to {MAX_CONTINUE_BARS} bars"):
        continue_score(read_midi(tmp_path / "in.mid"), load_config(), bars=10_000, model="markov")
    assert main([*args, "--bars", str(MAX_CONTINUE_BARS)]) == 0
    assert f"in {MAX_CONTINUE_BARS} bars" in capsys.readouterr().out


# -- coplayer eval continue ------------------------------------------------------------


def test_eval_runs_on_two_pieces():
    from coplayer.gen.data import EventPiece
    from coplayer.gen.evaluate import METRICS, evaluate_model, format_table

    pieces = [EventPiece(f"made-up-{s}", "bach", *piece(8, seed=s)) for s in (20, 21)]
    results = [evaluate_model(MarkovModel.load(adapt=live), name, pieces, load_config(), seed=0)
               for name, live in (("markov", False), ("markov-live", True))]
    rows = [r.to_row() for r in results]
    for row in rows:
        assert np.isfinite(row["nll_bits_per_event"]) and row["events"] == sum(len(p) for p in pieces)
        assert sum(row["nll_bits_per_field"].values()) == pytest.approx(row["nll_bits_per_event"], rel=1e-3)
        for m in METRICS:
            assert row[m] is not None and 0 <= row[m] <= 2
        assert row["pieces"] == 2
    assert rows[1]["nll_bits_per_event"] < rows[0]["nll_bits_per_event"]  # it learns the piece
    table = format_table(results)
    assert "markov-live" in table and "real 2nd half" in table


def test_eval_continue_cli_json(capsys):
    pytest.importorskip("music21", reason="the Bach chorale test split needs music21 (the train extra)")
    assert main(["eval", "continue", "--limit", "2", "--json", "--models", "markov", "--sources", "bach"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["markov"]
    assert {"nll_bits_per_event", "pc_js", "in_key", "density_ratio", "range_kept", "motif_quote"} <= set(rows[0])


# -- the shipped transformer -------------------------------------------------------------


def _shipped_transformer():
    from coplayer.gen.evaluate import shipped_continuation_models

    assert "continue-transformer" in shipped_continuation_models(), (
        "the shipped continue-transformer is missing from coplayer/assets (make train-continue)")
    from coplayer.gen.continue_file import load_event_model

    return load_event_model("continue-transformer")


def test_transformer_obeys_the_sampler():
    model = _shipped_transformer()
    key = Key.parse("G major")
    resp = generate(model, controls(key=key, key_lock=HARD_LOCK, parts=("soprano", "bass")), bars=2)
    assert resp.notes and {n.pitch % 12 for n in resp.notes} <= set(key.scale)
    assert {n.part for n in resp.notes} <= {"soprano", "bass"}


def test_transformer_nll_finite():
    model = _shipped_transformer()
    events, pos = piece(2, seed=8)
    assert np.isfinite(piece_nll_bits(model, events, pos)).all()
