"""Faults and bad input through real JACK ports: nothing lost, nothing stuck.

Each test starts ``coplayer run --api jack --quiet`` as a separate process,
plays into it from a JACK client of the test's own (a :class:`Peer` whose
input :data:`MERGED` hears every part, the parts differing by channel, as one
synth would, and input :data:`OTHERS` the pass-through and drums) and then
does one thing to it: SIGKILL and a restart, the JACK server killed, its
outputs disconnected and reconnected, an input flood, a corrupt model, a
session folder that cannot be written.  Each asserts at the
peer that no key is left sounding (a note-on without its note-off, or a
sustain pedal left down) once the fault is over; that what coplayer could
keep is kept (the session on disk holds what was played); and, where the
fault is an error, one clear line and no traceback.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mido
import pytest

from coplayer.bench import (
    CC, MERGED, NOTE_OFF, NOTE_ON, OUTPUTS, PARTS, BenchError, CoplayerProcess, Peer, StatsListener, chord, is_on,
    jack_connect, match, offs_reported, single_notes, sounding_after, wait_ports,
)
from coplayer.io.ports import now_ns
from test_e2e_jack import wait_for

pytestmark = [pytest.mark.usefixtures("jack_server"), pytest.mark.subprocess]  # coplayer and its peers run as processes

SUSTAIN = 64
ASSETS = Path(__file__).resolve().parents[1] / "coplayer" / "assets"
PERIOD_MS = 64 / 48000 * 1e3  # the jack_server fixture's period
OTHERS = "others"  # the peer's input for coplayer's pass-through and drums ports
PROBE = 40  # the key played until coplayer answers (not among the tests' notes)


# --- helpers --------------------------------------------------------------------------


@pytest.fixture
def started():
    """Start coplayer processes and peers that are stopped and closed at the end."""
    processes: list[CoplayerProcess] = []
    peers: list[Peer] = []

    def coplayer(**kwargs) -> CoplayerProcess:
        cp = CoplayerProcess(**kwargs)
        processes.append(cp)
        return cp.start()

    def peer() -> Peer:
        p = Peer()
        peers.append(p)
        return p

    yield coplayer, peer
    for cp in processes:
        cp.stop()
    for p in peers:
        p.close()


def patch(source: str, destination: str, tries: int = 3) -> None:
    """``jack_connect``, tried again after a moment if its client could not
    open: jackd2 refuses new clients for a while when it failed to notify one
    that has just died (a killed coplayer), "Cannot notify add client"."""
    for attempt in range(tries):
        try:
            return jack_connect(source, destination)
        except BenchError as exc:
            if "Cannot open" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.5)


def connect(cp: CoplayerProcess, peer: Peer) -> None:
    """Peer's output to coplayer's input, every part to the peer's merged
    input and the pass-through and drums to its other one (opened on first
    use), as a patchbay does; then until coplayer plays.  Its ports appear
    before its engine starts, and a note played meanwhile waits past the
    budget and is dropped.  (Until coplayer's first note, each output sends a
    clean start to a new connection: on the parts' synth the pass-through's
    would silence them and hide what a reconnection leaves sounding.)"""
    for label in (MERGED, OTHERS):
        if label not in peer.inputs:
            peer.listen(label)
    patch(peer.out_port(), cp.ports["in"])
    for what in OUTPUTS:
        patch(cp.ports[what], peer_input(peer, MERGED if what in PARTS else OTHERS))
    since = now_ns()
    for _ in range(40):
        play(peer, [(0.0, (NOTE_ON, PROBE, 64)), (0.05, (NOTE_OFF, PROBE, 0))])
        if wait_for(lambda: played_ons(peer, since)[PROBE], 0.25):
            peer.wait_quiet()
            return
        assert cp.proc.poll() is None, f"coplayer stopped: {cp.stop()} {cp.output}"
    pytest.fail(f"coplayer played nothing within 12 s of its ports appearing: {cp.stop()} {cp.output}")


def disconnect(source: str, destination: str) -> None:
    done = subprocess.run(["jack_disconnect", source, destination], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr


def peer_input(peer: Peer, label: str) -> str:
    return wait_ports([f"{peer.name} {label}"])[f"{peer.name} {label}"]


def heard(peer: Peer, since_ns: int = 0) -> list:
    """What the peer heard from coplayer (its two inputs: what is left
    sounding is counted on each)."""
    return peer.events((MERGED, OTHERS), since_ns)


def pedals_down(events) -> set[tuple[int, int]]:
    """(channel, value) of every channel whose last sustain message held the pedal down."""
    last: dict[int, int] = {}
    for _label, msg, _t in events:
        if len(msg) == 3 and msg[0] & 0xF0 == CC and msg[1] == SUSTAIN:
            last[msg[0] & 0x0F] = msg[2]
    return {(ch, v) for ch, v in last.items() if v >= 64}


def quiet(peer: Peer, timeout_s: float = 2.0) -> bool:
    """Nothing sounding and no pedal down at the peer, within ``timeout_s``."""
    return wait_for(lambda: not sounding_after(heard(peer)) and not pedals_down(heard(peer)), timeout_s)


def left_over(peer: Peer) -> str:
    """What is left sounding, and every message the peer got for those keys (ms from the first)."""
    events = heard(peer)
    stuck = sounding_after(events)
    keys = {(ch, pitch) for _, ch, pitch in stuck}
    start = events[0][2] if events else 0
    history = [(msg, round((t - start) / 1e6, 1)) for _, msg, t in events
               if len(msg) == 3 and msg[0] & 0xE0 == NOTE_OFF and (msg[0] & 0x0F, msg[1]) in keys]
    return f"sounding {stuck}, pedals down {pedals_down(events)}; their messages: {history}"


def played_ons(peer: Peer, since_ns: int = 0) -> Counter:
    return Counter(msg[1] for _, msg, _ in heard(peer, since_ns) if is_on(msg))


def came_through(peer: Peer, sent: list, since_ns: int, share: float = 0.75) -> None:
    """Most of the note-ons ``sent`` reach the peer from coplayer: on this
    shared 2-core machine JACK loses MIDI in cycles it skips a client, and
    coplayer drops a note-on that waited past its budget (late is worse than
    never), so not all of them; none means coplayer stopped playing."""
    expected = Counter(msg[1] for _, msg in sent if is_on(msg))

    def arrived() -> int:
        return sum((expected & played_ons(peer, since_ns)).values())

    wait_for(lambda: arrived() == sum(expected.values()), 3.0)
    print(f"{arrived()} of {sum(expected.values())} notes came through")
    assert arrived() >= share * sum(expected.values()), f"missing {expected - played_ons(peer, since_ns)}"


def routed(feed: StatsListener) -> Counter:
    """The pitches of the note-ons coplayer routed, per its OSC note feed:
    what reached it.  (The peer may hear a note twice: JACK hands on an
    output buffer again in a cycle that skipped its writer.)"""
    return Counter(args[1] for address, args in list(feed.messages) if address == "/coplayer/note" and args[2])


def input_pitches(directory: Path) -> dict[Path, Counter]:
    """{every .mid in ``directory``: the pitches of its ``input`` track}."""
    found = {}
    for path in sorted(directory.glob("*.mid")):
        tracks = {t.name: t for t in mido.MidiFile(path).tracks}
        notes = tracks.get("input", [])
        found[path] = Counter(m.note for m in notes if m.type == "note_on" and m.velocity)
    return found


def error_lines(output: str) -> list[str]:
    """Lines of coplayer's output that are neither its greeting nor its exit report."""
    normal = ("listening on", "wrote the session", "decision latency", "answers:", "coplayer: listening")
    return [line for line in output.splitlines() if line.strip() and not any(n in line for n in normal)]


def recording(directory: Path, **settings) -> dict:
    return {"session.record": "true", "session.directory": str(directory), **settings}


def play(peer: Peer, schedule) -> list:
    schedule = sorted(schedule, key=lambda e: e[0])
    return peer.play(schedule)


# --- the faults -----------------------------------------------------------------------


def test_sigkill_mid_chord_then_a_restart_leaves_nothing_sounding(started, tmp_path):
    """A crash mid-chord leaves the peer's keys sounding; the next coplayer on
    the same port names silences them as soon as it is connected, and
    recovers what the killed one had recorded."""
    coplayer, new_peer = started
    cp = coplayer(settings=recording(tmp_path))
    feed = StatsListener(cp.osc_out)
    peer = new_peer()
    connect(cp, peer)
    rng = random.Random(11)
    play(peer, single_notes(8, 8.0, rng))
    peer.wait_quiet()
    got = routed(feed)
    feed.close()
    assert got, "no note came through"
    time.sleep(1.2)  # the session's journal is flushed at least every second
    held = [48, 52, 55, 60]
    for _, msg in chord(0.0, held, rng, dur=10.0)[:len(held)]:  # the keys go down, never up
        peer.send(msg)
        time.sleep(0.005)
    assert wait_for(lambda: sounding_after(heard(peer)), 2.0), "the chord did not sound"
    cp.proc.send_signal(signal.SIGKILL)
    cp.proc.wait(timeout=5)
    assert sounding_after(heard(peer)), "the chord ended without coplayer: nothing to test"

    again = coplayer(name=cp.name, settings=recording(tmp_path))
    restarted = now_ns()
    connect(again, peer)
    assert quiet(peer, 1.0), f"after the restart: {left_over(peer)}; it said: {again.proc.poll()}"
    # the new process plays on, every note ended
    came_through(peer, play(peer, single_notes(6, 8.0, rng)), restarted)
    assert quiet(peer), left_over(peer)
    assert again.stop() == 0, again.output

    kept = {path: pitches for path, pitches in input_pitches(tmp_path).items() if not got - pitches}
    assert kept, (f"no session file holds the {sum(got.values())} notes played a second before the kill: "
                  f"{input_pitches(tmp_path)}; the restart said: {again.output}")
    assert any(path.name in again.output for path in kept), f"the recovery was not announced: {again.output}"
    print(f"SIGKILL: the recovered session holds all {sum(got.values())} notes coplayer played before the kill")


def start_jackd(log_path: Path) -> subprocess.Popen:
    """``jackd`` (dummy driver) for JACK_DEFAULT_SERVER, once it takes clients."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["jackd", "--no-realtime", "-d", "dummy", "-r", "48000", "-p", "64"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if subprocess.run(["jack_wait", "-w", "-t", "10"], capture_output=True, timeout=20).returncode != 0:
        proc.kill()
        proc.wait()
        pytest.fail(f"jackd did not start: {log_path.read_text(errors='replace')[-500:]}")
    return proc


@pytest.fixture
def own_jack_server(tmp_path, monkeypatch):
    """A JACK server of this test's own (dummy driver), made the default for
    this process and its children; the test kills it.  Then it is started
    again and stopped cleanly: a killed jackd keeps its slot in JACK's server
    registry (8 slots for the machine) until a server of the same name
    starts, so the name is fixed and the restart gives the slot back."""
    if not shutil.which("jackd"):
        pytest.skip("jackd not installed (jackd2 provides it)")
    name = f"{os.environ.get('JACK_DEFAULT_SERVER', 'default')}-killed"
    monkeypatch.setenv("JACK_DEFAULT_SERVER", name)
    proc = start_jackd(tmp_path / "jackd.log")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    again = start_jackd(tmp_path / "jackd.log")
    again.terminate()
    again.wait(timeout=10)
    for left in Path("/dev/shm").glob(f"jack_sem.*_{name}_*"):  # the killed server's clients' semaphores
        left.unlink(missing_ok=True)


class FilePlayingCoplayer(CoplayerProcess):
    """coplayer playing a MIDI file (``--input``) on its own ports: no JACK
    client of this test's process touches the server the test kills (libjack
    keeps one server's state per process: a client of this process on a
    second, killed server crashed the whole test run)."""

    def __init__(self, midi_file: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.midi_file = midi_file

    def args(self) -> list[str]:
        return [*super().args(), "--input", str(self.midi_file)]


def test_jack_server_killed_ends_run_with_one_line_and_the_session_on_disk(own_jack_server, tmp_path):
    sessions = tmp_path / "sessions"
    song = tmp_path / "long.mid"
    mid = mido.MidiFile()
    track = mido.MidiTrack()
    mid.tracks.append(track)
    for k in range(80):  # 40 s of notes, a note every half beat at 120 BPM
        track.append(mido.Message("note_on", note=48 + k % 24, velocity=90, time=0 if k == 0 else 120))
        track.append(mido.Message("note_off", note=48 + k % 24, velocity=0, time=120))
    mid.save(song)
    cp = FilePlayingCoplayer(song, settings=recording(sessions)).start()
    feed = StatsListener(cp.osc_out)
    time.sleep(3.0)
    played = routed(feed)
    feed.close()
    assert played, "no note came through"
    time.sleep(1.0)  # the journal is flushed at least every second
    own_jack_server.send_signal(signal.SIGKILL)
    own_jack_server.wait(timeout=5)
    try:
        out, _ = cp.proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        cp.proc.kill()
        out, _ = cp.proc.communicate()
        pytest.fail(f"coplayer did not stop when the JACK server died: {out}")
    cp.output = out
    assert cp.proc.returncode != 0, f"exit code 0 after losing the JACK server: {out}"
    assert "Traceback" not in out, out
    errors = error_lines(out)
    assert len(errors) == 1 and "JACK" in errors[0], f"not one clear line: {errors}"

    if not any(input_pitches(sessions).values()):
        # only a journal: the next start (no JACK needed) recovers it
        again = subprocess.run([sys.executable, "-m", "coplayer", "run", "--quiet", "--duration", "0.3",
                                "--set", "midi.backend=memory", "--set", "osc.enabled=false",
                                *(a for k, v in recording(sessions).items() for a in ("--set", f"{k}={v}"))],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
    found = input_pitches(sessions)
    print(f"JACK server killed: exit {cp.proc.returncode}, {errors[0]!r}; "
          f"the session holds {max(sum((played & p).values()) for p in found.values())} of {sum(played.values())}")
    assert any(not played - pitches for pitches in found.values()), (
        f"the session on disk lacks notes coplayer played before the server died: "
        f"{[dict(played - pitches) for pitches in found.values()]} of {dict(played)}; "
        f"files: {sorted(p.name for p in sessions.glob('*'))}")


def test_outputs_disconnected_and_reconnected_leave_nothing_sounding(started, tmp_path):
    """Keys released (and the pedal lifted) while coplayer's outputs have no
    connection: the synth must not keep them once they are reconnected; what
    was played meanwhile is in the session."""
    coplayer, new_peer = started
    # The zone baseline routes by pitch, the same way in every run.
    cp = coplayer(settings={**recording(tmp_path), "instrument.model": "zone"})
    feed = StatsListener(cp.osc_out)
    peer = new_peer()
    connect(cp, peer)
    held = [45, 55, 64, 72]  # one for each of the four parts
    for p in held:
        peer.send((NOTE_ON, p, 100))
        time.sleep(0.004)
    peer.send((CC, SUSTAIN, 127))
    assert wait_for(lambda: len(sounding_after(heard(peer))) == len(held) and pedals_down(heard(peer)), 2.0), (
        f"the keys did not sound, one on each part: {sounding_after(heard(peer))}")
    merged = peer_input(peer, MERGED)
    for what in PARTS:  # the synth is unplugged
        disconnect(cp.ports[what], merged)
    time.sleep(0.1)
    for p in held:
        peer.send((NOTE_OFF, p, 0))
    peer.send((CC, SUSTAIN, 0))
    unheard = play(peer, single_notes(4, 10.0, random.Random(5)))
    time.sleep(0.2)
    for what in PARTS:
        patch(cp.ports[what], merged)
    assert quiet(peer, 1.0), f"after reconnecting: {left_over(peer)}"
    # and it plays on: every note after the reconnection arrives and ends
    since = now_ns()
    sent = play(peer, single_notes(8, 10.0, random.Random(4)))
    came_through(peer, sent, since)
    assert quiet(peer), left_over(peer)
    assert cp.stop() == 0, cp.output
    feed.close()
    # every note coplayer routed, heard or not, is in the session
    kept = routed(feed)
    unheard = Counter(msg[1] for _, msg in unheard if is_on(msg))
    assert unheard & kept, f"none of the notes played while disconnected reached coplayer: {kept}"
    assert [not kept - pitches for pitches in input_pitches(tmp_path).values()] == [True], (
        f"the session lacks {[kept - pitches for pitches in input_pitches(tmp_path).values()]}")
    print(f"disconnected: {sum((unheard & kept).values())} of {sum(unheard.values())} notes played meanwhile "
          f"routed, unheard at the synth, all {sum(kept.values())} routed notes in the session")


def flood_messages(rng: random.Random, n: int) -> list[tuple[int, ...]]:
    """Junk for the input: SysEx, random bytes, and notes below the real
    notes' range (each note-on followed later by its note-off, some note-offs
    stray)."""
    out: list[tuple[int, ...]] = []
    down: list[tuple[int, int]] = []
    while len(out) < n:
        kind = rng.random()
        if kind < 0.15:
            out.append((0xF0, *(rng.randrange(128) for _ in range(rng.randrange(1, 64))), 0xF7))
        elif kind < 0.45:
            data = [rng.randrange(256) for _ in range(rng.randrange(1, 4))]
            if data[0] & 0xF0 in (NOTE_ON, NOTE_OFF, 0xA0) or data[0] == 0xF0:
                data[0] = rng.choice((0xF4, 0xF5, 0xF9, 0xFD, 0x7F, 0x12))  # undefined statuses, stray data
            out.append(tuple(data))
        elif kind < 0.75 or not down:
            ch, pitch = rng.randrange(16), rng.randrange(0, 40)
            if ch != 9:  # not the drums: they pass through untouched
                down.append((ch, pitch))
                out.append((NOTE_ON | ch, pitch, rng.randrange(1, 128)))
        elif kind < 0.95:
            ch, pitch = down.pop(rng.randrange(len(down)))
            out.append((NOTE_OFF | ch, pitch, 0))
        else:
            out.append((NOTE_OFF | rng.randrange(16), rng.randrange(0, 40), 0))  # a stray note-off
    return out + [(NOTE_OFF | ch, pitch, 0) for ch, pitch in down]


def pour(port, junk: list[tuple[int, ...]], rate: float = 20_000.0, batch: int = 100) -> None:
    """Send ``junk`` raw (the port layer refuses malformed messages) at ``rate`` per second."""
    start = time.perf_counter()
    for i in range(0, len(junk), batch):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        for msg in junk[i:i + batch]:
            port._send(msg)


def why_sounding(peer: Peer, stats: StatsListener) -> str:
    """What was left sounding and what may have lost its note-off: JACK
    (skipped cycles), coplayer's input (dropped), or JACK after coplayer (it
    reported the note-off sent)."""
    return (f"{left_over(peer)}; coplayer's input xruns, skipped cycles, dropped: {stats.ports}; "
            f"the peer's skipped cycles {peer.skipped()}, dropped {peer.inputs[MERGED].overflowed()}; "
            f"note-offs coplayer reported sent: {offs_reported(sounding_after(heard(peer)), stats.messages)}")


def test_input_flood_crashes_nothing_leaves_nothing_sounding_and_keeps_real_notes_on_time(started):
    from coplayer.io.real import open_output

    coplayer, new_peer = started
    cp = coplayer(settings={"latency.stats_interval_s": 0.2})
    stats = StatsListener(cp.osc_out)
    peer = new_peer()
    connect(cp, peer)
    flood = open_output(f"{peer.name} flood", virtual=True, api="jack", client_name=f"{peer.name}flood")
    try:
        patch(wait_ports([f"{peer.name} flood"])[f"{peer.name} flood"], cp.ports["in"])
        time.sleep(0.2)
        since = now_ns()
        pourer = threading.Thread(target=pour, args=(flood, flood_messages(random.Random(7), 60_000)), daemon=True)
        pourer.start()  # 3 s of junk, while 20 real notes play
        sent = play(peer, single_notes(20, 6.0, random.Random(8), start=0.1))
        pourer.join(timeout=30)
        assert not pourer.is_alive(), "the flood did not finish"
        peer.wait_quiet(timeout_s=10.0)
        quiet(peer, 3.0)
        stats.fresh_stats()
    finally:
        flood.close()
        stats.close()
    assert cp.proc.poll() is None, f"coplayer died under the flood: {cp.stop()} {cp.output}"
    assert quiet(peer, 0.0), why_sounding(peer, stats)
    ms = match(sent, heard(peer, since), (MERGED,))
    arrived = [ms[i] for i, (_, m) in enumerate(sent) if is_on(m) and i in ms]
    print(f"flood: {len(arrived)} of {sum(is_on(m) for _, m in sent)} real notes arrived, "
          f"latency max {max(arrived, default=0):.2f} ms (noisy: a shared machine); coplayer's input "
          f"xruns, skipped cycles, dropped, note-offs resent, dropped late: {stats.ports}")
    # coplayer drops a note-on older than its budget plus a period; the two
    # JACK hops around it take up to a period each, and its Python threads
    # (routing, sending) and the test's own sender some more on a loaded
    # machine: measured 6.5-8.2 ms at most, against 0.1-2.4 s without the bound
    budget_ms, slack_ms = 3.0, 2.0
    late = [round(x, 2) for x in arrived if x > budget_ms + 3 * PERIOD_MS + slack_ms]
    assert not late, f"real notes played late under the flood: {late}"
    assert cp.stop() == 0, cp.output
    assert "Traceback" not in cp.output, cp.output


def corrupt(src: Path, dst_dir: Path) -> Path:
    """A copy of a model truncated to half its size, its card copied beside it."""
    dst = dst_dir / f"broken-{src.name}"
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) // 2])
    card = src.with_suffix(".json")
    if card.exists():
        shutil.copyfile(card, dst.with_suffix(".json"))
    return dst


@pytest.mark.parametrize("key, model", [("instrument.model", "instrument-lstm.onnx"),
                                        ("continuation.model", "continue-markov.npz")])
def test_corrupt_model_plays_on_with_the_fallback_and_one_line(started, tmp_path, key, model):
    coplayer, new_peer = started
    broken = corrupt(ASSETS / model, tmp_path)
    cp = coplayer(mode="both", settings={key: str(broken), "tempo.bpm": 240, "continuation.silence_beats": 1.0,
                                         "continuation.response_bars": 1})
    peer = new_peer()
    connect(cp, peer)
    since = now_ns()
    sent = play(peer, single_notes(12, 10.0, random.Random(9)))
    came_through(peer, sent, since)
    time.sleep(1.5)  # a pause: the answer, from the fallback
    assert quiet(peer, 5.0), left_over(peer)
    assert cp.stop() == 0, cp.output
    assert "Traceback" not in cp.output, cp.output
    about = [line for line in cp.output.splitlines() if broken.name in line]
    assert len(about) == 1, f"not one line about {broken.name}: {cp.output}"


@pytest.mark.parametrize("where", ["a file", "/proc"])
def test_unwritable_session_folder_is_one_error_before_playing(tmp_path, where):
    if where == "a file":
        folder = tmp_path / "sessions"
        folder.write_text("not a folder")
    else:
        folder = Path("/proc") / "coplayer-sessions"
    cp = CoplayerProcess(settings=recording(folder))
    sets = [a for k, v in recording(folder).items() for a in ("--set", f"{k}={v}")]
    checked = subprocess.run([sys.executable, "-m", "coplayer", "config", *sets],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0, f"`coplayer config` accepted {folder}: {checked.stdout}"
    assert checked.stderr.strip().count("\n") == 0 and "session.directory" in checked.stderr, checked.stderr

    start = time.monotonic()
    ran = subprocess.run(cp.args(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert ran.returncode != 0, f"coplayer ran with {folder}: {ran.stdout} {ran.stderr}"
    assert "Traceback" not in ran.stderr, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "session.directory" in lines[0], lines
    assert "listening on" not in ran.stdout + ran.stderr, "it started playing"
    print(f"refused in {time.monotonic() - start:.1f} s: {lines[0]}")
