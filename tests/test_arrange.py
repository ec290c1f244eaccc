"""coplayer arrange: every note kept exactly, one named track per part."""

from __future__ import annotations

from collections import Counter

import mido
import pytest

from coplayer.cli import main
from coplayer.config import load_config
from coplayer.data.midi import read_midi, write_midi
from coplayer.data.notes import Note, Score, TempoMap
from coplayer.errors import ModelError
from coplayer.instrument.arrange import arrange, arrange_file, choose_instrumenter, nested_same_pitch
from coplayer.instrument.baselines import make_instrumenter, make_scorer
from coplayer.instrument.instrumenter import Instrumenter

TPB = 480


def exact(score: Score) -> Counter:
    """Every note as (pitch, onset tick, duration ticks, velocity)."""
    tpb = score.ticks_per_beat
    return Counter((n.pitch, round(n.onset_beats * tpb), round(n.duration_beats * tpb), n.velocity)
                   for n in score.notes)


def note(pitch, beat, beats, velocity=80, channel=0, part=None):
    return Note(pitch, velocity, 0.0, 0.0, beat, beats, part, channel)


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def chorale():
    pytest.importorskip("music21", reason="the Bach chorale corpus needs music21 (the train extra)")
    from coplayer.data.splits import load_split

    return load_split("test")[0]


def tempo_score() -> Score:
    """Chords, repeated pitches, overlaps, odd velocities, and three tempo changes."""
    notes = [
        note(48, 0, 2, 60), note(55, 0, 1, 61), note(64, 0, 1, 62), note(72, 0, 0.5, 127),
        note(71, 0.5, 0.5, 1), note(60, 1, 1, 90), note(67, 1, 1.5, 91), note(76, 1, 0.25, 92),
        note(76, 1.25, 0.25, 93), note(43, 2, 4, 40), note(59, 2.5, 1 / 3, 50),
        note(62, 2 + 5 / 6, 1 / 3, 51), note(65, 3 + 1 / 6, 1 / 3, 52), note(79, 3.5, 2.5, 100),
        note(64, 4, 1, 70), note(64, 5, 1, 71),
    ]
    tempo = TempoMap([(0, 500_000), (1.5, 300_000), (3, 900_000), (4.25, 250_000)])
    score = Score(notes=notes, tempo=tempo, ticks_per_beat=TPB, parts=[], name="tempo test")
    return score.fill_seconds().sort()


# -- the online stream --------------------------------------------------------


class Spy(Instrumenter):
    """Records what the instrumenter hears."""

    def reset(self):
        super().reset()
        self.heard = []

    def note_on(self, pitch, velocity, time, force=None):
        self.heard.append(("on", pitch, velocity, time))
        return super().note_on(pitch, velocity, time, force)

    def note_off(self, pitch, time):
        self.heard.append(("off", pitch, time))
        return super().note_off(pitch, time)


def test_stream_is_in_time_order_with_chords_low_to_high_and_seconds(cfg):
    score = tempo_score()
    spy = Spy(make_scorer("zone", cfg))
    result = arrange(score, spy)
    ons = [h for h in spy.heard if h[0] == "on"]
    assert len(ons) == len(score.notes)
    # Onset times in seconds from the tempo map, ascending; equal onsets by pitch.
    expected = sorted((round(score.tempo.seconds(n.onset_beats), 9), n.pitch, n.velocity)
                      for n in score.notes)
    assert [(round(t, 9), p, v) for _, p, v, t in ons] == expected
    times = [round(h[-1], 9) for h in spy.heard]  # equal to the nanosecond = simultaneous
    assert times == sorted(times)
    assert sum(h[0] == "off" for h in spy.heard) == len(score.notes)
    assert score.tempo.seconds(4.25) != pytest.approx(4.25 * 0.5)  # the tempo map mattered
    assert {n.part for n in result.notes} <= set(cfg.part_names)


def test_arrange_keeps_every_note_and_does_not_touch_the_input(cfg):
    score = tempo_score()
    before = [(n.pitch, n.part) for n in score.notes]
    for model in ("zone", "closest"):
        result = arrange(score, make_instrumenter(make_scorer(model, cfg), cfg))
        assert exact(result) == exact(score)
        assert len(result.notes) == len(score.notes)
        assert result.parts == list(cfg.part_names)
        assert all(n.part in cfg.part_names for n in result.notes)
        assert result.tempo == score.tempo and result.ticks_per_beat == score.ticks_per_beat
    assert [(n.pitch, n.part) for n in score.notes] == before


def test_drum_channel_passes_through(cfg):
    score = tempo_score()
    score.notes += [note(36, b, 0.25, 100, channel=9) for b in range(4)]
    score.sort()
    result = arrange(score, make_instrumenter(make_scorer("zone", cfg), cfg), passthrough_channel=9)
    assert exact(result) == exact(score)
    drums = [n for n in result.notes if n.channel == 9]
    assert len(drums) == 4 and all(n.part is None for n in drums)


# -- files ---------------------------------------------------------------------


def check_tracks(path, cfg):
    """One named track per part after the conductor track, with its program and channel."""
    mid = mido.MidiFile(path)
    names = [next((m.name for m in t if m.type == "track_name"), None) for t in mid.tracks[1:]]
    assert names == list(cfg.part_names)
    for track, part in zip(mid.tracks[1:], cfg.parts):
        programs = [(m.channel, m.program) for m in track if m.type == "program_change"]
        assert programs == [(part.channel - 1, part.program)]
        assert {m.channel for m in track if m.type == "note_on"} <= {part.channel - 1}


def test_arrange_file_keeps_a_real_chorale_exactly(tmp_path, cfg, chorale):
    src, dst = tmp_path / "chorale.mid", tmp_path / "arranged.mid"
    write_midi(chorale, src)
    result = arrange_file(src, dst, cfg, model="zone")
    assert result.notes == len(chorale.notes) and result.nested == 0
    assert sum(result.per_part.values()) == len(chorale.notes)
    back = read_midi(dst)
    assert len(back.notes) == len(chorale.notes)
    assert exact(back) == exact(chorale)
    assert back.parts == list(cfg.part_names)
    assert Counter(n.part for n in back.notes) == Counter(result.per_part)
    check_tracks(dst, cfg)


def test_arrange_file_with_tempo_changes(tmp_path, cfg):
    score = tempo_score()
    src, dst = tmp_path / "tempo.mid", tmp_path / "out.mid"
    write_midi(score, src)
    result = arrange_file(src, dst, cfg, model="closest")
    back = read_midi(dst)
    assert result.nested == 0
    assert exact(back) == exact(score)
    assert back.tempo == score.tempo
    for got, want in zip(sorted(back.notes, key=lambda n: (n.onset, n.pitch)),
                         sorted(score.notes, key=lambda n: (n.onset, n.pitch))):
        assert got.onset == pytest.approx(want.onset) and got.duration == pytest.approx(want.duration)
    check_tracks(dst, cfg)


def test_nested_same_pitch_notes_are_counted():
    notes = [note(60, 0, 4, part="a"), note(60, 1, 1, part="a"), note(60, 1, 1, part="b"),
             note(62, 0, 2, part="a"), note(62, 1, 2, part="a")]  # overlapping, not nested
    assert nested_same_pitch(Score(notes=notes)) == 1


def test_configured_model_falls_back_when_missing(cfg, caplog):
    broken = load_config(overrides=["instrument.model=/nowhere/none.onnx", "instrument.fallback=zone"])
    inst, name = choose_instrumenter(broken)
    assert name == "zone" and "fallback" in caplog.text
    with pytest.raises(ModelError, match="none.onnx"):
        choose_instrumenter(broken, "/nowhere/none.onnx")  # asked for by name: no fallback


# -- the command -----------------------------------------------------------------


def test_cli_arrange_with_plot(tmp_path, capsys):
    src, dst, png = tmp_path / "in.mid", tmp_path / "out.mid", tmp_path / "roll.png"
    write_midi(tempo_score(), src)
    assert main(["arrange", str(src), "-o", str(dst), "--model", "zone", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "arranged 16 notes with zone" in out and str(dst) in out
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert len(read_midi(dst).notes) == 16


def test_cli_arrange_errors_are_one_line(tmp_path, capsys):
    assert main(["arrange", str(tmp_path / "missing.mid"), "-o", str(tmp_path / "o.mid")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coplayer: error:") and "\n" not in err
    src = tmp_path / "in.mid"
    write_midi(tempo_score(), src)
    assert main(["arrange", str(src), "-o", str(tmp_path / "o.mid"), "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_cli_arrange_refuses_to_write_over_its_input(tmp_path, capsys):
    src = tmp_path / "good.mid"
    write_midi(tempo_score(), src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.mid").symlink_to(src)
    for out in (src, tmp_path / "sub" / ".." / "good.mid", tmp_path / "link.mid"):
        assert main(["arrange", str(src), "-o", str(out), "--model", "zone"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("coplayer: error: the output") and "is the input file" in err and "\n" not in err
    assert src.read_bytes() == before
    assert main(["arrange", str(tmp_path / "link.mid"), "-o", str(tmp_path / "new.mid"), "--model", "zone"]) == 0
