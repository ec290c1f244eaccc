"""coplayer end to end through real JACK ports, as a separate process.

Each test starts ``coplayer run --api jack --quiet`` (its own JACK client
name, free OSC ports, no session file), plays into its virtual input from a
JACK client of its own and reads every virtual output back; peers no one
here wrote (``jack_midi_dump``, ``oscdump``, ``oscsend``) check the same
from outside.  They need a JACK server: the ``jack_server`` fixture skips
with the reason, or fails on CI.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from collections import Counter

import pytest

from coplayer.bench import (
    CC, NOTE_OFF, NOTE_ON, OUTPUTS, PARTS, CoplayerProcess, Peer, chords, is_on, jack_connect, jack_ports,
    run_notes, single_notes, sounding_after, wait_ports,
)
from coplayer.io.ports import now_ns

pytestmark = [pytest.mark.usefixtures("jack_server"), pytest.mark.subprocess]  # coplayer and its peers run as processes

SUSTAIN = 64
ALL_NOTES_OFF = 123


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (liblo-tools / jackd2 provide them)")


def wait_for(predicate, timeout_s: float = 5.0, step_s: float = 0.02):
    """The first truthy value of ``predicate()``, or its last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step_s)


@pytest.fixture
def coplayer_factory():
    started: list[tuple[CoplayerProcess, Peer]] = []

    def start(mode: str = "instrument", **settings) -> tuple[CoplayerProcess, Peer]:
        cp = CoplayerProcess(mode=mode, settings=settings).start()
        peer = Peer()
        started.append((cp, peer))
        peer.attach(cp)
        time.sleep(0.2)  # connections settle
        return cp, peer

    yield start
    for cp, peer in started:
        cp.stop()
        peer.close()


def part_events(peer: Peer, since_ns: int = 0):
    return peer.events(PARTS, since_ns)


def note_ons(events) -> list[tuple[str, int, int]]:
    return [(label, msg[0] & 0x0F, msg[1]) for label, msg, _ in events if is_on(msg)]


def sustained(rng: random.Random, start: float) -> list:
    """Keys released while the sustain pedal holds them, then the pedal up."""
    out = [(start, (CC, SUSTAIN, 127))]
    for i, p in enumerate(rng.sample(range(55, 72), 6)):
        out += [(start + 0.05 + i * 0.06, (NOTE_ON, p, 80)), (start + 0.1 + i * 0.06, (NOTE_OFF, p, 0))]
    return [*out, (start + 0.8, (CC, SUSTAIN, 0))]


def test_every_note_on_exactly_one_part_with_its_note_off(coplayer_factory):
    need("jack_midi_dump")
    cp, peer = coplayer_factory()
    dump_name = f"{peer.name}dump"
    dump = subprocess.Popen(["stdbuf", "-oL", "jack_midi_dump", dump_name], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: f"{dump_name}:input" in jack_ports(), 10.0), "jack_midi_dump did not start"
        jack_connect(cp.ports["soprano"], f"{dump_name}:input")
        rng = random.Random(5)
        schedule = single_notes(8, 6.0, rng)
        schedule += chords(4, rng, start=1.5)
        schedule += run_notes(24, rng, start=3.3, rate=20.0)
        schedule += sustained(rng, start=4.7)
        schedule.sort(key=lambda e: e[0])
        played = Counter(msg[1] for _, msg in schedule if is_on(msg))

        since = now_ns()
        peer.play(schedule)
        got = wait_for(lambda: sum(Counter(p for *_, p in note_ons(part_events(peer, since))).values())
                       >= sum(played.values()) and not sounding_after(part_events(peer, since)))
        events = part_events(peer, since)
        ons = note_ons(events)
        assert got, (f"{len(ons)} of {sum(played.values())} notes reached the parts; "
                     f"sounding after the end: {sounding_after(events)}")
        # every input note on exactly one part: the same pitches, as many times
        assert Counter(p for *_, p in ons) == played
        # ... on its part's channel, and ended there
        assert all(ch == PARTS.index(label) for label, ch, _ in ons)
        assert sounding_after(events) == {}
        assert not note_ons(peer.events(("thru", "drums"), since)), "a note went to pass-through"

        # jack_midi_dump, reading the soprano port, saw the soprano's note-ons
        soprano = sorted(p for label, _, p in ons if label == "soprano")
        assert soprano, "the soprano played nothing"

        def dumped() -> list[int]:  # "   0: 90 3c 5a note on  (channel  0): ..."
            found = []
            for line in lines:
                tokens = line.split(":", 1)[1].split()[:3] if ":" in line else []
                data = [int(b, 16) for b in tokens if len(b) == 2 and all(c in "0123456789abcdef" for c in b)]
                if len(data) == 3 and is_on(tuple(data)):
                    found.append(data[1])
            return sorted(found)

        dump.terminate()
        lines = dump.communicate(timeout=5)[0].splitlines()
        assert dumped() == soprano
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.communicate()


def test_sigterm_leaves_no_note_sounding(coplayer_factory):
    cp, peer = coplayer_factory()
    held = [45, 55, 64, 72]  # one for each of the four (monophonic) parts
    for p in held:  # keys held down, never released
        peer.send((NOTE_ON, p, 100))
        time.sleep(0.004)
    assert wait_for(lambda: len(note_ons(part_events(peer))) >= len(held))
    assert sounding_after(part_events(peer)), "nothing sounded before SIGTERM"
    assert cp.stop() == 0, cp.output
    wait_for(lambda: not sounding_after(part_events(peer)), 2.0)
    events = part_events(peer)
    assert sounding_after(events) == {}, cp.output
    # and All Notes Off on every port and channel that played
    offs = {(label, msg[0] & 0x0F) for label, msg, _ in events
            if msg[0] & 0xF0 == CC and msg[1] == ALL_NOTES_OFF}
    assert {(label, ch) for label, ch, _ in note_ons(events)} <= offs


def test_a_run_after_a_killed_one_first_silences_every_channel_of_every_port():
    """SIGKILL mid-chord leaves the chord sounding (no process is left to end
    it); a new run on the same ports silences every channel of every output
    before anything else, and the chord stops."""
    name = f"cpk{random.randrange(10**6)}"
    first = CoplayerProcess(name=name).start()
    peer = Peer()
    second = None
    try:
        peer.attach(first)
        listening = wait_ports([f"{peer.name} {what}" for what in OUTPUTS])
        time.sleep(0.2)
        for p in (45, 55, 64, 72):  # a chord, held
            peer.send((NOTE_ON, p, 100))
            time.sleep(0.004)
        assert wait_for(lambda: len(note_ons(part_events(peer))) >= 4)
        first.proc.kill()
        first.proc.wait(10)
        killed = now_ns()
        time.sleep(0.2)
        assert sum(sounding_after(peer.events()).values()) == 4, "the chord sounds on after the kill"
        second = CoplayerProcess(name=name).start()
        for what in OUTPUTS:  # as a session manager would: the same ports, connected again
            jack_connect(second.ports[what], listening[f"{peer.name} {what}"])
        clean = {(CC | ch, n, 0) for ch in range(16) for n in (SUSTAIN, ALL_NOTES_OFF, 120)}
        def controllers(what: str) -> set:
            return {m for _, m, _ in peer.events((what,), killed) if m[0] & 0xF0 == CC}

        wait_for(lambda: all(controllers(w) == clean for w in OUTPUTS))
        for what in OUTPUTS:  # the clean start sent at start and the one for the new connection may interleave
            assert controllers(what) == clean, (what, sorted(controllers(what)), second.output)
            assert not [m for _, m, _ in peer.events((what,), killed) if is_on(m)]
        assert sounding_after(peer.events()) == {}
    finally:
        peer.close()
        first.stop()
        if second is not None:
            second.stop()


def test_a_connection_made_after_the_first_note_gets_no_clean_start():
    """The clean start greets a synth connected before coplayer plays; once a
    note has played, a new connection (a synth shared with the parts, plugged
    into the pass-through mid-set) hears no All Notes Off that would silence it."""
    cp = CoplayerProcess(name=f"cpc{random.randrange(10**6)}").start()
    peer = Peer()
    try:
        peer.attach(cp)
        wait_ports([f"{peer.name} {what}" for what in OUTPUTS])
        time.sleep(0.2)
        peer.send((NOTE_ON, 60, 100))
        assert wait_for(lambda: len(note_ons(part_events(peer))) >= 1)
        peer.send((NOTE_OFF, 60, 0))
        since = now_ns()
        late = peer.listen("late")
        for what in OUTPUTS:
            jack_connect(cp.ports[what], late)
        time.sleep(0.5)
        assert [m for _, m, _ in peer.events(("late",), since) if m[0] & 0xF0 == CC] == []
    finally:
        peer.close()
        cp.stop()


def test_response_after_a_pause_is_cancelled_when_playing_resumes(coplayer_factory):
    # 240 BPM: an answer after one beat (0.25 s) of silence, on the next bar
    cp, peer = coplayer_factory(mode="both", **{"tempo.bpm": 240, "continuation.silence_beats": 1.0,
                                                "continuation.response_bars": 4,
                                                "continuation.seed": 1})
    rng = random.Random(2)
    phrase = run_notes(16, rng, rate=8.0)
    played = sum(is_on(m) for _, m in phrase)
    since = now_ns()
    peer.play(phrase)
    ended = wait_for(lambda: len(note_ons(part_events(peer, since))) >= played, 3.0)
    assert ended, "the phrase did not come through"

    def answer() -> int:
        return len(note_ons(part_events(peer, since))) - played

    assert wait_for(lambda: answer() >= 2, 6.0), f"no answer after the pause: {cp.stop()} {cp.output}"
    assert sounding_after(part_events(peer, since)) or wait_for(
        lambda: sounding_after(part_events(peer, since)), 1.0), "the answer sounds nothing"
    # playing resumes: the answer's notes end at once, and while the player
    # plays on, the parts play only the player's notes
    resumed = now_ns()
    again = single_notes(8, 10.0, rng)
    peer.play(again)
    expected = Counter(m[1] for _, m in again if is_on(m))
    assert wait_for(lambda: not sounding_after(part_events(peer, since))
                    and len(note_ons(part_events(peer, resumed))) >= sum(expected.values()), 3.0), (
        sounding_after(part_events(peer, since)), note_ons(part_events(peer, resumed)))
    during = note_ons(part_events(peer, resumed))
    assert Counter(p for *_, p in during) == expected, (
        f"the answer played on after the player resumed, or notes went missing: {cp.output}")


def test_osc_peers_see_notes_and_control_temperature_mode_panic(coplayer_factory):
    need("oscdump", "oscsend")
    from coplayer.bench import free_udp_port

    out_port = free_udp_port()
    dump = subprocess.Popen(["stdbuf", "-oL", "oscdump", str(out_port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        cp, peer = coplayer_factory(**{"osc.out_port": out_port})

        def osc(address: str, types: str = "", *args) -> None:
            sent = subprocess.run(["oscsend", "localhost", str(cp.osc_in), address, types, *map(str, args)],
                                  capture_output=True, text=True, timeout=5)
            assert sent.returncode == 0, sent.stderr

        peer.send((NOTE_ON, 60, 100))  # held through the panic
        assert wait_for(lambda: note_ons(part_events(peer)))
        osc("/coplayer/temperature", "f", 0.5)
        osc("/coplayer/mode", "s", "respond")
        time.sleep(0.2)
        osc("/coplayer/panic")
        # the panic ends the held note on its part while the key is still down
        assert wait_for(lambda: not sounding_after(part_events(peer)), 2.0), sounding_after(part_events(peer))
        peer.send((NOTE_OFF, 60, 0))
        time.sleep(0.5)  # for the OSC feed's thread to send the rest
    finally:
        dump.terminate()
        text = dump.communicate(timeout=5)[0]
    lines = [line.split(" ", 1)[1] for line in text.splitlines() if " /coplayer/" in line]
    assert any(line.startswith('/coplayer/note sii') and " 60 100" in line for line in lines), text
    assert any(line.startswith('/coplayer/state') and '"temperature"' in line and '"0.5"' in line
               for line in lines), text
    assert any(line.startswith('/coplayer/state') and '"mode" "respond"' in line for line in lines), text
    assert any(line.startswith('/coplayer/state') and '"panic"' in line for line in lines), text


def test_outputs_are_all_real_jack_ports(coplayer_factory):
    cp, _peer = coplayer_factory()
    assert set(cp.ports) == {"in", *OUTPUTS}
    assert all(":" in name for name in cp.ports.values())


def test_bare_loop_passes_everything_through():
    """The bench's floor: ``python -m coplayer.io.thru`` forwards every message."""
    from coplayer.bench import ThruProcess, match

    thru = ThruProcess().start()
    peer = Peer()
    try:
        out = peer.out_port()
        jack_connect(out, thru.ports["in"])
        jack_connect(thru.ports["out"], peer.listen("floor"))
        time.sleep(0.2)
        sent = peer.play(single_notes(40, 40.0, random.Random(3)))
        peer.wait_quiet()
        got = peer.events(["floor"])
        heard = [m for _, m, _ in got]
        # everything, in order; a note-off may come twice (the JACK outputs' safety net, after an xrun)
        assert [m for m in heard if is_on(m)] == [m for _, m in sent if is_on(m)]
        assert set(heard) == {m for _, m in sent} and sounding_after(got) == {}
        assert len(match(sent, got, ("floor",))) == 40
    finally:
        peer.close()
        thru.stop()
    assert thru.proc.returncode == 0


@pytest.mark.parametrize("backend", ["jack", "rtmidi"])
def test_bench_measures_both_loops(backend):
    """``coplayer bench`` end to end, shortened: both distributions, every figure,
    with coplayer's JACK client and with python-rtmidi's ports."""
    from coplayer.bench import bench

    result = bench(notes=120, rates=(50,), backend=backend)
    if backend == "rtmidi" and not result.e2e_ms:
        # python-rtmidi's JACK clients (one per port) now and then are never
        # scheduled again: nothing comes back from coplayer (README, Latency
        # through real ports).  Once more, with fresh processes; twice is a failure.
        result = bench(notes=120, rates=(50,), backend=backend)
    figures = result.figures()
    assert set(figures) == {"e2e_p50_ms", "e2e_p99_ms", "e2e_max_ms", "floor_p50_ms", "floor_p99_ms", "notes",
                            "lost", "stuck", "max_notes_per_s", "jitter_ms", "floor_jitter_ms", "backend", "xruns",
                            "max_lossless_notes_per_s", "resent", "floor_lost", "floor_stuck", "dropped_late"}
    assert figures["backend"] == backend
    assert (figures["resent"] >= 0) if backend == "jack" else figures["resent"] is None
    # coplayer's JACK client counts JACK's xruns; python-rtmidi cannot tell
    assert (figures["xruns"] >= 0) if backend == "jack" else figures["xruns"] is None
    assert all((s["xruns"] is None) == (backend == "rtmidi") for s in result.steps)
    n = figures["notes"]  # the sections round 120 down to whole chords
    assert 100 <= n <= 120
    # Every note arrived, or is counted lost, or the single hop lost it too (the
    # hop may lose a note that coplayer got: the bounds, not an equality).
    for arrived, lost in ((result.e2e_ms, result.lost), (result.floor_ms, result.floor_lost)):
        assert len(arrived) + lost <= n <= len(arrived) + lost + result.jack_lost
    assert 0 < figures["floor_p50_ms"] and 0 < figures["e2e_p50_ms"]
    assert [s["rate"] for s in result.steps] == [50]
    step = result.steps[0]
    assert figures["max_notes_per_s"] == (50 if step["ok"] else 0)
    assert figures["max_lossless_notes_per_s"] == (0 if step["lost"] or step["stuck"] else 50)
