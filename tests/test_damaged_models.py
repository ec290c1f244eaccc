"""Damaged model files of every kind: one clear line naming the file, then the fallback.

Each kind of damage is written in the test's own folder: a truncated copy of
a shipped file, garbage bytes (with the card's sha256 updated, so that the
library that parses it is the one to object), a card that does not parse or
lacks what the runtime reads, a graph missing beside its card.  ``run``,
``continue`` and ``arrange`` must go on with the fallback and say why, once,
without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import mido
import pytest

from coplayer.cli import main
from coplayer.errors import ModelError
from coplayer.gen import markov as markov_module
from coplayer.gen.markov import MarkovModel

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "coplayer" / "assets"
MEMORY = ["--set", "midi.backend=memory", "--set", "osc.enabled=false"]


def copy_model(name: str, into: Path) -> Path:
    """Every file of shipped model ``name`` (graphs and card) copied into ``into``; the main file's path."""
    for path in ASSETS.glob(f"{name}*"):
        if path.name == f"{name}.json" or path.name.startswith(f"{name}-") or path.suffix in (".onnx", ".npz"):
            shutil.copy(path, into / path.name)
    main_file = into / (f"{name}.npz" if name == "continue-markov" else f"{name}.onnx")
    assert main_file.is_file()
    return main_file


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path, card: Path | None = None, key: tuple = ("sha256",)) -> None:
    """``path`` overwritten with garbage; ``card``'s sha256 at ``key`` updated to match it."""
    path.write_bytes(b"\x08\x07 not a model \xff" * 64)
    if card is not None:
        data = json.loads(card.read_text())
        node = data
        for step in key[:-1]:
            node = node[step]
        node[key[-1]] = hashlib.sha256(path.read_bytes()).hexdigest()
        card.write_text(json.dumps(data))


def edit_card(card: Path, change) -> None:
    data = json.loads(card.read_text())
    change(data)
    card.write_text(json.dumps(data))


def write_melody(path: Path, bars: int = 2) -> Path:
    """A one-track melody, 4 notes a bar at 120 BPM."""
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(120))])
    for i in range(4 * bars):
        pitch = (60, 64, 67, 72, 71, 67, 64, 62)[i % 8]
        track += [mido.Message("note_on", note=pitch, velocity=90, time=0),
                  mido.Message("note_off", note=pitch, time=480)]
    mid.tracks.append(track)
    mid.save(path)
    return path


def one_line_about(text: str, name: str) -> list[str]:
    lines = [line for line in text.splitlines() if name in line]
    assert len(lines) == 1, f"expected one line naming {name}, got: {lines}"
    assert "Traceback" not in text
    return lines


# -- the Markov model (continuation.model, and the shipped file behind every fallback) -----------


def damage_markov(kind: str, npz: Path) -> None:
    card = npz.with_suffix(".json")
    if kind == "truncated":
        truncate(npz)
    elif kind == "garbage":
        garbage(npz)
    elif kind == "card-not-json":
        card.write_text('{"format": "coplayer-continue-markov", ')
    elif kind == "card-lacks-settings":
        edit_card(card, lambda c: c.pop("settings"))
    elif kind == "card-not-a-mapping":
        card.write_text("[1, 2, 3]")
    elif kind == "member-missing":
        import numpy as np

        with np.load(npz) as data:
            kept = {k: data[k] for k in data.files if k != "lengths"}
        np.savez(npz, **kept)


MARKOV_DAMAGE = ["truncated", "garbage", "card-not-json", "card-lacks-settings", "card-not-a-mapping",
                 "member-missing"]


@pytest.mark.parametrize("kind", MARKOV_DAMAGE)
def test_a_damaged_markov_model_is_one_model_error_naming_it(kind, tmp_path):
    npz = copy_model("continue-markov", tmp_path)
    damage_markov(kind, npz)
    with pytest.raises(ModelError) as info:
        MarkovModel.load(npz)
    message = str(info.value)
    assert "continue-markov" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["truncated", "garbage", "card-lacks-settings"])
def test_continue_with_a_damaged_npz_as_its_model_falls_back_with_one_line(kind, tmp_path, caplog):
    npz = copy_model("continue-markov", tmp_path)
    damage_markov(kind, npz)
    src = write_melody(tmp_path / "in.mid")
    with caplog.at_level(logging.WARNING):
        assert main(["continue", str(src), "-o", str(tmp_path / "out.mid"), "--seed", "1",
                     "--set", f"continuation.model={npz}"]) == 0
    (line,) = one_line_about(caplog.text, "continue-markov")
    assert "markov-live" in line
    assert len(mido.MidiFile(tmp_path / "out.mid").tracks) >= 1


@pytest.mark.subprocess
def test_run_with_a_damaged_npz_as_its_model_falls_back_with_one_line(tmp_path):
    npz = copy_model("continue-markov", tmp_path)
    truncate(npz)
    src = write_melody(tmp_path / "in.mid", bars=1)
    result = subprocess.run(
        [sys.executable, "-m", "coplayer", "run", "--input", str(src), "--quiet", *MEMORY,
         "--set", f"session.directory={tmp_path}", "--set", "tempo.bpm=240",
         "--set", "continuation.response_bars=1", "--set", f"continuation.model={npz}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = one_line_about(result.stdout + result.stderr, "continue-markov")
    assert "markov-live" in line
    assert played_or_dropped(result.stdout) == 4


def both_continuation_models_damaged(tmp_path: Path, monkeypatch) -> Path:
    """The configured transformer and the shipped Markov model behind it, both truncated."""
    onnx = copy_model("continue-transformer", tmp_path)
    truncate(onnx)
    npz = copy_model("continue-markov", tmp_path)
    truncate(npz)
    monkeypatch.setattr(markov_module, "asset_path", lambda: npz)
    return onnx


def test_continue_says_once_when_no_continuation_model_loads(tmp_path, monkeypatch, capsys, caplog):
    onnx = both_continuation_models_damaged(tmp_path, monkeypatch)
    src = write_melody(tmp_path / "in.mid")
    assert main(["continue", str(src), "-o", str(tmp_path / "out.mid"),
                 "--set", f"continuation.model={onnx}"]) == 2
    err = capsys.readouterr().err
    (line,) = one_line_about(err + caplog.text, "continue-transformer.onnx")
    assert "continue-markov.npz" in line and line.startswith("coplayer: error:")
    assert not (tmp_path / "out.mid").exists()


def test_run_plays_on_instrumenting_when_no_continuation_model_loads(tmp_path, monkeypatch, capsys, caplog):
    onnx = both_continuation_models_damaged(tmp_path, monkeypatch)
    src = write_melody(tmp_path / "in.mid", bars=1)
    with caplog.at_level(logging.INFO):
        assert main(["run", "--input", str(src), "--quiet", *MEMORY, "--set", f"session.directory={tmp_path}",
                     "--set", "tempo.bpm=240", "--set", f"continuation.model={onnx}"]) == 0
    out = capsys.readouterr()
    (line,) = one_line_about(out.out + out.err + caplog.text, "continue-transformer.onnx")
    assert "continue-markov.npz" in line and "instruments only" in line
    (session,) = tmp_path.glob("session-*.mid")
    played = [m for t in mido.MidiFile(session).tracks[1:5] for m in t if m.type == "note_on" and m.velocity]
    assert len(played) == 4  # every note instrumented, no answer


# -- the continuation transformer: graphs and card ------------------------------------------------


def damage_transformer(kind: str, onnx: Path) -> str:
    """Damage one file of the copied transformer; the name of the file the line must name."""
    card = onnx.with_suffix(".json")
    head = onnx.with_name("continue-transformer-pitch.onnx")
    if kind == "decoder-truncated":
        truncate(onnx)
        return onnx.name
    if kind == "head-garbage":  # the card agrees: onnxruntime is the one to refuse it
        garbage(head, card, ("graphs", "pitch", "sha256"))
        return head.name
    if kind == "head-missing":
        head.unlink()
        return head.name
    if kind == "card-not-json":
        card.write_text("{ not json")
    elif kind == "card-lacks-graphs":
        edit_card(card, lambda c: c.pop("graphs"))
    elif kind == "card-graph-not-a-mapping":
        edit_card(card, lambda c: c["graphs"].__setitem__("prefill", "continue-transformer-prefill.onnx"))
    elif kind == "card-window-not-a-number":
        edit_card(card, lambda c: c.__setitem__("window", "long"))
    return card.name


TRANSFORMER_DAMAGE = ["decoder-truncated", "head-garbage", "head-missing", "card-not-json", "card-lacks-graphs",
                      "card-graph-not-a-mapping", "card-window-not-a-number"]


@pytest.mark.parametrize("kind", TRANSFORMER_DAMAGE)
def test_continue_with_a_damaged_transformer_falls_back_with_one_line(kind, tmp_path, caplog):
    onnx = copy_model("continue-transformer", tmp_path)
    named = damage_transformer(kind, onnx)
    src = write_melody(tmp_path / "in.mid")
    with caplog.at_level(logging.WARNING):
        assert main(["continue", str(src), "-o", str(tmp_path / "out.mid"), "--seed", "1", "--bars", "1",
                     "--set", f"continuation.model={onnx}"]) == 0
    (line,) = one_line_about(caplog.text, named)
    assert "markov-live" in line


# -- the instrumentation model: graph and card -----------------------------------------------------


def damage_instrument(kind: str, onnx: Path) -> str:
    card = onnx.with_suffix(".json")
    if kind == "truncated":
        truncate(onnx)
        return onnx.name
    if kind == "garbage":
        garbage(onnx, card)
        return onnx.name
    if kind == "card-not-json":
        card.write_text("")
    elif kind == "card-lacks-state":
        edit_card(card, lambda c: c.pop("state"))
    elif kind == "card-state-not-a-list-of-mappings":
        edit_card(card, lambda c: c.__setitem__("state", [3, 4]))
    elif kind == "card-features-not-a-mapping":
        edit_card(card, lambda c: c.__setitem__("features", "default"))
    elif kind == "card-missing":
        card.unlink()
    return card.name


INSTRUMENT_DAMAGE = ["truncated", "garbage", "card-not-json", "card-lacks-state",
                     "card-state-not-a-list-of-mappings", "card-features-not-a-mapping", "card-missing"]


@pytest.mark.parametrize("kind", INSTRUMENT_DAMAGE)
def test_arrange_with_a_damaged_instrumentation_model_falls_back_with_one_line(kind, tmp_path, caplog):
    onnx = copy_model("instrument-lstm", tmp_path)
    named = damage_instrument(kind, onnx)
    src = write_melody(tmp_path / "in.mid")
    with caplog.at_level(logging.WARNING):
        assert main(["arrange", str(src), "-o", str(tmp_path / "out.mid"),
                     "--set", f"instrument.model={onnx}"]) == 0
    (line,) = one_line_about(caplog.text, named)
    assert "'zone'" in line
    assert sum(1 for t in mido.MidiFile(tmp_path / "out.mid").tracks for m in t
               if m.type == "note_on" and m.velocity) == 8


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["truncated", "card-not-json"])
def test_run_with_a_damaged_instrumentation_model_falls_back_with_one_line(kind, tmp_path):
    onnx = copy_model("instrument-lstm", tmp_path)
    named = damage_instrument(kind, onnx)
    src = write_melody(tmp_path / "in.mid", bars=1)
    result = subprocess.run(
        [sys.executable, "-m", "coplayer", "run", "--input", str(src), "--quiet", *MEMORY,
         "--set", f"session.directory={tmp_path}", "--set", "tempo.bpm=240", "--set", "continuation.model=markov",
         "--set", f"instrument.model={onnx}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    one_line_about(result.stdout + result.stderr, named)
    assert played_or_dropped(result.stdout) == 4


def test_continue_instruments_with_the_fallback_when_the_instrumentation_model_is_damaged(tmp_path, caplog):
    """``continue`` instruments a keyboard input first: a damaged instrumentation model falls back there too."""
    onnx = copy_model("instrument-lstm", tmp_path)
    truncate(onnx)
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    for i in range(8):  # chords: not a melody, so it is instrumented first
        chord = (48, 60, 64 + i % 3)
        track += [mido.Message("note_on", note=p, velocity=80, time=0) for p in chord]
        track += [mido.Message("note_off", note=p, time=0 if j else 480) for j, p in enumerate(chord)]
    mid.tracks.append(track)
    mid.save(tmp_path / "chords.mid")
    with caplog.at_level(logging.WARNING):
        assert main(["continue", str(tmp_path / "chords.mid"), "-o", str(tmp_path / "out.mid"), "--seed", "1",
                     "--model", "markov", "--set", f"instrument.model={onnx}"]) == 0
    one_line_about(caplog.text, onnx.name)


# -- the zone baseline (the instrumentation model's fallback) --------------------------------------


def damaged_zone(kind: str, tmp_path: Path, monkeypatch) -> Path:
    """A damaged copy of the shipped zone baseline, in its place for this test."""
    from coplayer.instrument import baselines

    path = tmp_path / "zone-baseline.json"
    shutil.copy(ASSETS / "zone-baseline.json", path)
    if kind == "garbage":
        garbage(path)
    elif kind == "truncated":
        truncate(path)
    elif kind == "lacks-counts":
        edit_card(path, lambda z: z.pop("counts"))
    monkeypatch.setattr(baselines, "zone_asset_path", lambda: path)
    return path


@pytest.mark.parametrize("kind", ["garbage", "truncated", "lacks-counts"])
def test_arrange_with_a_damaged_zone_baseline_follows_the_ranges_with_one_line(kind, tmp_path, monkeypatch, caplog):
    zone = damaged_zone(kind, tmp_path, monkeypatch)
    src = write_melody(tmp_path / "in.mid")
    with caplog.at_level(logging.WARNING):
        assert main(["arrange", str(src), "-o", str(tmp_path / "out.mid"), "--model", "zone"]) == 0
    (line,) = one_line_about(caplog.text, zone.name)
    assert "configured ranges" in line


def test_run_with_the_instrumentation_model_and_its_fallback_damaged_still_plays(tmp_path, monkeypatch, caplog):
    """Both the LSTM and the zone baseline behind it: zones from the configured ranges instrument."""
    damaged_zone("garbage", tmp_path, monkeypatch)
    onnx = copy_model("instrument-lstm", tmp_path)
    truncate(onnx)
    src = write_melody(tmp_path / "in.mid", bars=1)
    with caplog.at_level(logging.INFO):
        assert main(["run", "--input", str(src), "--quiet", *MEMORY, "--set", f"session.directory={tmp_path}",
                     "--set", "tempo.bpm=240", "--set", "continuation.model=markov",
                     "--set", f"instrument.model={onnx}"]) == 0
    one_line_about(caplog.text, "instrument-lstm.onnx")
    one_line_about(caplog.text, "zone-baseline.json")
    (session,) = tmp_path.glob("session-*.mid")
    tracks = mido.MidiFile(session).tracks
    assert sum(1 for m in tracks[-1] if m.type == "note_on" and m.velocity) == 4  # the input, recorded
    assert sum(1 for t in tracks[1:5] for m in t if m.type == "note_on" and m.velocity) >= 4


def played_or_dropped(stdout: str) -> int:
    """The notes of the exit line: decided, plus those dropped as too late
    (the overload bound drops a note that waited past the budget on a busy machine)."""
    import re

    played = int(re.search(r"decision latency per note: (\d+) notes", stdout).group(1))
    dropped = re.search(r"(\d+) dropped as too late", stdout)
    return played + (int(dropped.group(1)) if dropped else 0)
