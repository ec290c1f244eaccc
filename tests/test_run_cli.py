"""``coplayer run`` and ``coplayer demo`` end to end, on in-memory ports."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mido
import pytest

from coplayer.config import load_config, packaged_config
from coplayer.demo import demo_piece
from coplayer.engine import live as live_module
from coplayer.engine.engine import Engine
from coplayer.engine.journal import recover
from coplayer.engine.live import MemoryPorts, run
from coplayer.errors import SessionError

REPO = Path(__file__).resolve().parents[1]
MEMORY = ["--set", "midi.backend=memory", "--set", "osc.enabled=false"]


def write_piece(path: Path, notes: list[tuple[int, float, float]], bpm: float = 120) -> Path:
    """A one-track file of (pitch, onset s, duration s), plus a pedal press."""
    tpb = 480
    per_s = tpb * bpm / 60
    events = [(round(on * per_s), mido.Message("note_on", note=p, velocity=90)) for p, on, _ in notes]
    events += [(round((on + d) * per_s), mido.Message("note_off", note=p)) for p, on, d in notes]
    events.append((0, mido.Message("control_change", control=64, value=127)))
    events.sort(key=lambda e: e[0])
    mid = mido.MidiFile(ticks_per_beat=tpb)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))])
    last = 0
    for tick, msg in events:
        track.append(msg.copy(time=tick - last))
        last = tick
    mid.tracks.append(track)
    mid.save(path)
    return path


def coplayer(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coplayer", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.subprocess
def test_run_replays_a_file_and_writes_the_session(tmp_path):
    piece = write_piece(tmp_path / "piece.mid", [(72, 0.0, 0.3), (60, 0.0, 0.3), (48, 0.4, 0.3), (76, 0.8, 0.2)])
    result = coplayer("run", "--input", str(piece), "--quiet", *MEMORY, "--set", f"session.directory={tmp_path}",
                      "--set", "tempo.bpm=240", "--set", "continuation.response_bars=1")
    assert result.returncode == 0, result.stderr
    assert "decision latency per note: 4 notes: p50" in result.stdout
    sessions = list(tmp_path.glob("session-*.mid"))
    assert len(sessions) == 1 and f"wrote the session to {sessions[0]}" in result.stdout
    mid = mido.MidiFile(sessions[0])
    names = [t.name for t in mid.tracks]
    assert names[1:] == ["soprano", "alto", "tenor", "bass", "input"]
    played = [m.note for m in mid.tracks[-1] if m.type == "note_on" and m.velocity]
    assert sorted(played[:2]) == [60, 72] and played[2:] == [48, 76]  # the chord's order is the arrival's
    routed = sum(1 for t in mid.tracks[1:5] for m in t if m.type == "note_on" and m.velocity)
    assert routed >= 4  # every input note, plus the answer's notes if there was one


@pytest.mark.subprocess
def test_run_stops_on_sigterm_and_reports(tmp_path):
    piece = write_piece(tmp_path / "long.mid", [(60, 0.0, 30.0), (67, 0.1, 30.0)])
    args = [sys.executable, "-m", "coplayer", "run", "--input", str(piece), "--quiet", "--set", "midi.backend=memory",
            "--set", f"osc.in_port={free_udp_port()}", "--set", f"osc.out_port={free_udp_port()}",
            "--set", f"session.directory={tmp_path}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "Ctrl-C to stop" in line or not line:
            break
    assert any("OSC in 127.0.0.1" in line for line in lines), lines
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "decision latency per note: 2 notes" in out
    assert len(list(tmp_path.glob("session-*.mid"))) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_releases_every_note(tmp_path, monkeypatch, signum):
    """In-process, to look at the ports afterwards: notes held when SIGTERM
    (or Ctrl-C, SIGINT) comes are released by the engine."""
    piece = write_piece(tmp_path / "long.mid", [(60, 0.0, 30.0), (67, 0.0, 30.0), (76, 0.1, 30.0)])
    ports = MemoryPorts()
    monkeypatch.setattr(live_module, "ports_for", lambda cfg: ports)
    cfg = load_config(str(packaged_config()), ["midi.backend=memory", "osc.enabled=false", "session.record=false",
                                               "mode=instrument"])
    def signal_once_all_sound() -> None:  # not after a fixed time: a busy machine starts slower
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(
                1 for p in list(ports.hub.outputs.values()) for m in p.sent() if m[0] & 0xF0 == 0x90 and m[2]) < 3:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    timer = threading.Thread(target=signal_once_all_sound, daemon=True)
    timer.start()
    previous = signal.getsignal(signal.SIGTERM)
    assert run(cfg, input_file=str(piece), quiet=True, model="zone") == 0
    timer.join(5)
    assert signal.getsignal(signal.SIGTERM) == previous
    parts = [ports.hub.output(f"coplayer {p}") for p in cfg.part_names]
    ons = [m for p in parts for m in p.sent() if m[0] & 0xF0 == 0x90 and m[2]]
    offs = [m for p in parts for m in p.sent() if m[0] & 0xF0 == 0x80]
    assert len(ons) == 3 and len(offs) == 3  # paired by the engine itself
    assert all(not p.sounding() and not p._pedal and p.closed for p in ports.hub.outputs.values())


@pytest.mark.subprocess
def test_run_for_a_duration_without_input(tmp_path):
    result = coplayer("run", "--quiet", "--duration", "0.5", *MEMORY, "--set", "session.record=false")
    assert result.returncode == 0, result.stderr
    assert "decision latency per note: 0 notes" in result.stdout


@pytest.mark.subprocess
def test_run_says_why_an_empty_input_cannot_be_read(tmp_path):
    empty = tmp_path / "empty.mid"
    empty.write_bytes(b"")
    result = coplayer("run", "--input", str(empty), "--quiet", *MEMORY, "--set", "session.record=false")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == f"coplayer: error: cannot read MIDI file {str(empty)!r}: the file is empty (not a MIDI file)"


@pytest.mark.subprocess
def test_osc_open_to_the_network_without_an_allow_list_does_not_start():
    ports = ["--set", f"osc.in_port={free_udp_port()}", "--set", f"osc.out_port={free_udp_port()}"]
    base = ["run", "--quiet", "--duration", "0.3", "--set", "midi.backend=memory", "--set", "session.record=false",
            "--set", "osc.host=0.0.0.0", *ports]
    refused = coplayer(*base)
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("coplayer: error: OSC would listen on 0.0.0.0") and "osc.allow=[" in line
    allowed = coplayer(*base, "--set", "osc.allow=[192.168.1.20, 10.0.0.0/24]")
    assert allowed.returncode == 0, allowed.stderr
    assert "OSC in 0.0.0.0:" in allowed.stderr


@pytest.mark.subprocess
@pytest.mark.skipif(os.path.exists("/dev/snd/seq"), reason="this machine has an ALSA sequencer")
def test_an_unavailable_api_is_one_line_suggesting_jack():
    result = coplayer("run", "--api", "alsa", "--quiet", "--duration", "0.1", "--set", "osc.enabled=false")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("coplayer: error: ALSA sequencer unavailable") and "--api jack" in lines[-1]


@pytest.mark.subprocess
def test_demo_writes_session_and_roll_and_prints_the_statistics(tmp_path):
    result = coplayer("demo", "--out", str(tmp_path), "--speed", "8", "--set", "osc.enabled=false")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "session.mid").stat().st_size > 0
    assert (tmp_path / "roll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    played = sum(1 for m in mido.MidiFile(demo_piece()) if m.type == "note_on" and m.velocity)
    # a note that waited past the budget (a busy machine) is dropped, not played late
    routed_now = int(re.search(r"decision latency per note: (\d+) notes: p50", result.stdout)[1])
    late = re.search(r"; (\d+) dropped as too late", result.stdout)
    assert routed_now + (int(late[1]) if late else 0) == played, result.stdout
    assert "misses" in result.stdout
    mid = mido.MidiFile(tmp_path / "session.mid")
    assert [t.name for t in mid.tracks][1:] == ["soprano", "alto", "tenor", "bass", "input"]
    assert sum(1 for m in mid.tracks[-1] if m.type == "note_on" and m.velocity) == played
    routed = sum(1 for t in mid.tracks[1:5] for m in t if m.type == "note_on" and m.velocity)
    assert routed >= routed_now  # every note routed, plus the answers


@pytest.mark.subprocess
def test_demo_rejects_a_speed_beyond_the_clock():
    result = coplayer("demo", "--out", "/nonexistent/never", "--speed", "50", *MEMORY)
    assert result.returncode == 2 and "--speed 50" in result.stderr


def test_run_stops_with_one_message_when_its_midi_server_goes(caplog):
    """A JACK server that shuts down takes coplayer's ports: `coplayer run`
    says so and ends (releasing its notes) instead of waiting forever."""
    gone = []
    live = SimpleNamespace(input=SimpleNamespace(lost=lambda: gone[0] if gone else None))
    threading.Timer(0.1, gone.append, ("the JACK server shut down",)).start()
    start = time.monotonic()
    live_module.wait_for_end(live, threading.Event(), None, duration=10.0)
    assert time.monotonic() - start < 2.0
    assert "the JACK server shut down: coplayer's ports are gone" in caplog.text


# --- the session is never lost ----------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.parametrize("folder", ["/proc/nope", "TAKEN"])
def test_run_refuses_a_session_folder_it_cannot_write_before_playing(tmp_path, folder):
    (tmp_path / "taken").write_text("a file")
    folder = folder.replace("TAKEN", str(tmp_path / "taken"))
    result = coplayer("run", "--quiet", "--duration", "5", *MEMORY, "--set", f"session.directory={folder}")
    assert result.returncode == 2
    assert result.stderr.startswith("coplayer: error: session.directory: ") and len(result.stderr.splitlines()) == 1
    assert "listening" not in result.stderr + result.stdout  # no port was opened


@pytest.mark.subprocess
def test_run_creates_a_missing_session_folder(tmp_path):
    folder = tmp_path / "new" / "sessions"
    result = coplayer("run", "--quiet", "--duration", "0.3", *MEMORY, "--set", f"session.directory={folder}")
    assert result.returncode == 0, result.stderr
    assert [p.suffix for p in folder.iterdir()] == [".mid"]  # and its journal is gone


@pytest.mark.subprocess
def test_a_killed_run_loses_at_most_the_last_second_and_the_next_start_recovers_it(tmp_path):
    onsets = [i * 0.1 for i in range(200)]  # a note every 0.1 s for 20 s
    pitches = [60 + i % 24 for i in range(len(onsets))]
    piece = write_piece(tmp_path / "long.mid", [(p, t, 0.05) for p, t in zip(pitches, onsets)])
    folder = tmp_path / "sessions"
    args = [sys.executable, "-m", "coplayer", "run", "--input", str(piece), "--quiet", *MEMORY, "--set", "mode=instrument",
            "--set", f"session.directory={folder}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = "-"
        while line and "Ctrl-C to stop" not in line:
            line = proc.stderr.readline()
        started = time.monotonic()  # the feeder starts just after this line
        time.sleep(3.0)
        killed_after = time.monotonic() - started
        proc.kill()
    finally:
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and list(folder.glob("*.mid")) == []
    assert len(list(folder.glob(".session-*.journal"))) == 1

    result = coplayer("run", "--quiet", "--duration", "0.3", *MEMORY, "--set", f"session.directory={folder}")
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("recovered the session of ")]
    assert "from a run that did not finish: " in line and not list(folder.glob(".session-*.journal"))
    recovered = Path(line.rsplit(": ", 1)[1])
    mid = mido.MidiFile(recovered)
    played = [m.note for m in mid.tracks[-1] if m.type == "note_on" and m.velocity]
    routed = sum(1 for t in mid.tracks[1:-1] for m in t if m.type == "note_on" and m.velocity)
    sure = sum(1 for t in onsets if t < killed_after - 1.25)  # a second, and the load of a shared machine
    assert sure <= len(played) <= sum(1 for t in onsets if t < killed_after + 0.1), (len(played), killed_after)
    assert played == pitches[:len(played)] and routed == len(played)
    assert f"{len(played)} notes played" in line


def test_a_session_that_cannot_be_written_at_the_end_is_one_line_exit_1_and_kept(tmp_path, monkeypatch, caplog):
    """Disk full at exit: the journal stays, and the next start recovers it."""
    piece = write_piece(tmp_path / "short.mid", [(60, 0.0, 0.2), (64, 0.3, 0.2)])
    cfg = load_config(str(packaged_config()), ["midi.backend=memory", "osc.enabled=false", "mode=instrument",
                                               f"session.directory={tmp_path / 's'}"])

    def disk_full(self, path, bpm=None):
        raise SessionError(f"cannot write the session to {path}: No space left on device")

    monkeypatch.setattr(Engine, "write_session", disk_full)
    out = io.StringIO()
    assert run(cfg, input_file=str(piece), quiet=True, model="zone", stream=out) == 1
    (journal,) = (tmp_path / "s").glob(".session-*.journal")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and re.fullmatch(
        rf"cannot write the session to {re.escape(str(tmp_path / 's'))}/session-[\d-]+\.mid: No space left on "
        rf"device; what was played is kept in {re.escape(str(journal))} and recovered at the next start", errors[0])
    assert "wrote the session" not in out.getvalue() and "Traceback" not in caplog.text
    monkeypatch.undo()
    (found,) = recover(tmp_path / "s")
    assert (found.played, found.answered) == (2, 2)


def test_run_whose_ports_are_lost_says_so_once_writes_the_session_once_and_exits_1(tmp_path, monkeypatch, caplog):
    """The JACK server dying used to end `run` with exit code 0 and 'wrote the session' twice."""
    ports = MemoryPorts()
    gone: list[str] = []
    real_input = ports.input

    def input_that_loses_its_server(name, virtual):
        port = real_input(name, virtual)
        port.lost = lambda: gone[0] if gone else None
        return port

    monkeypatch.setattr(ports, "input", input_that_loses_its_server)
    monkeypatch.setattr(live_module, "ports_for", lambda cfg: ports)
    cfg = load_config(str(packaged_config()), ["midi.backend=memory", "osc.enabled=false", "mode=instrument",
                                               f"session.directory={tmp_path}"])
    threading.Timer(0.5, gone.append, ("the JACK server shut down",)).start()
    out = io.StringIO()
    with caplog.at_level(logging.INFO):
        assert run(cfg, quiet=True, model="zone", stream=out, duration=30) == 1
    text = out.getvalue() + caplog.text
    assert text.count("wrote the session") == 1 and text.count("coplayer's ports are gone") == 1
    assert len(list(tmp_path.glob("session-*.mid"))) == 1 and not list(tmp_path.glob(".session-*"))


def test_the_session_is_written_past_the_budget_with_a_warning(tmp_path, caplog):
    """A snapshot is refused past session.max_mb; the whole session never is."""
    (tmp_path / "session-old.mid").write_bytes(b"\0" * 1_200_000)
    cfg = load_config(str(packaged_config()), ["midi.backend=memory", "osc.enabled=false", "session.max_mb=1",
                                               f"session.directory={tmp_path}"])
    out = io.StringIO()
    assert run(cfg, quiet=True, model="zone", stream=out, duration=0.2) == 0
    assert len(list(tmp_path.glob("session-*.mid"))) == 2 and "wrote the session to" in out.getvalue()
    assert "holds 1 MB, session.max_mb is 1 (coplayer deletes no recording" in caplog.text


def test_a_session_folder_removed_while_playing_is_made_again_at_the_end(tmp_path):
    folder = tmp_path / "sessions"
    piece = write_piece(tmp_path / "short.mid", [(60, 0.0, 0.2), (64, 0.3, 0.2)])
    cfg = load_config(str(packaged_config()), ["midi.backend=memory", "osc.enabled=false", "mode=instrument",
                                               f"session.directory={folder}"])
    removed = []

    def remove_once_made() -> None:
        while not list(folder.glob(".session-*.journal")):
            time.sleep(0.005)
        shutil.rmtree(folder)
        removed.append(True)

    remover = threading.Thread(target=remove_once_made, daemon=True)
    remover.start()
    assert run(cfg, input_file=str(piece), quiet=True, model="zone", stream=io.StringIO(), duration=5.0) == 0
    remover.join(timeout=5)
    assert removed
    (session,) = folder.iterdir()
    assert sum(1 for m in mido.MidiFile(session).tracks[-1] if m.type == "note_on" and m.velocity) == 2
