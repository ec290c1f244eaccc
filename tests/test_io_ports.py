"""Ports: the in-memory backend and note hygiene, then real ports over JACK.

The JACK tests take the ``jack_server`` fixture (tests/conftest.py): they
skip where no JACK server can start and fail instead when CI is set.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import mido
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coplayer.errors import PortNotFoundError
from coplayer.io.memory import MemoryHub, MemoryInput, MemoryOutput, split_stream
from coplayer.io.ports import PortError, is_valid

NOTE_ON, NOTE_OFF, CC = 0x90, 0x80, 0xB0
REPO = Path(__file__).resolve().parents[1]


class Synth:
    """What a receiving synthesizer keeps sounding, to check for stuck notes."""

    def __init__(self) -> None:
        self.notes: dict[tuple[int, int], int] = {}
        self.pedal: set[int] = set()

    def play(self, messages) -> Synth:
        for data in messages:
            kind, ch = data[0] & 0xF0, data[0] & 0x0F
            if kind == NOTE_ON and data[2]:
                self.notes[ch, data[1]] = self.notes.get((ch, data[1]), 0) + 1
            elif kind in (NOTE_ON, NOTE_OFF) and self.notes.get((ch, data[1])):
                self.notes[ch, data[1]] -= 1
            elif kind == CC and data[1] == 64:
                (self.pedal.add if data[2] >= 64 else self.pedal.discard)(ch)
            elif kind == CC and data[1] in (120, 123):
                self.notes = {k: v for k, v in self.notes.items() if k[0] != ch}
        self.notes = {k: v for k, v in self.notes.items() if v}
        return self


# --- messages --------------------------------------------------------------


@pytest.mark.parametrize("data, ok", [
    ((0x90, 60, 100), True), ((0xC3, 5), True), ((0xF8,), True), ((0xF0, 1, 2, 0xF7), True),
    ((0xF2, 0, 1), True), ((), False), ((60, 100), False), ((0x90, 60), False),
    ((0x90, 60, 128), False), ((0xF0, 1, 2), False), ((0xF4,), False), ((0x90, 60, 100, 1), False),
])
def test_is_valid(data, ok):
    assert is_valid(data) is ok


def test_split_stream_handles_running_status_realtime_and_sysex():
    stream = [0x90, 60, 100, 62, 90, 0xF8, 64, 80, 0xF0, 1, 2, 0xF7, 5, 0xC1, 3, 4, 0x92, 0xB0, 7, 1]
    assert split_stream(stream) == [
        (0x90, 60, 100), (0x90, 62, 90), (0xF8,), (0x90, 64, 80), (0xF0, 1, 2, 0xF7),
        (0xC1, 3), (0xC1, 4), (0xB0, 7, 1),
    ]


# --- the memory backend ----------------------------------------------------


def test_send_accepts_bytes_lists_and_mido_messages_and_refuses_fragments():
    out = MemoryOutput("out")
    out.send(bytes([0x90, 60, 100]))
    out.send([0x80, 60, 0])
    out.send(mido.Message("control_change", channel=2, control=7, value=90))
    assert out.sent() == [(0x90, 60, 100), (0x80, 60, 0), (0xB2, 7, 90)]
    with pytest.raises(ValueError, match="not a complete MIDI message: 90 3C"):
        out.send([0x90, 60])
    with pytest.raises(TypeError):
        out.send("note_on")
    assert all(isinstance(t, int) for t, _ in out.messages)


def test_sounding_counts_repeated_note_ons_exactly():
    out = MemoryOutput("out")
    for _ in range(3):
        out.send([0x90, 60, 100])
    out.send([0x91, 60, 100])
    assert out.sounding() == {(0, 60): 3, (1, 60): 1}
    out.send([0x80, 60, 0])
    out.send([0x90, 60, 0])  # velocity 0 is a note-off
    assert out.sounding() == {(0, 60): 1, (1, 60): 1}
    out.send([0x80, 61, 0])  # a note-off without its note-on changes nothing
    out.send([0x81, 60, 0])
    out.send([0x81, 60, 0])
    assert out.sounding() == {(0, 60): 1}


def test_close_releases_every_sounding_note_on_its_own_channel():
    out = MemoryOutput("out")
    for data in ([0x90, 60, 100], [0x90, 60, 100], [0x93, 48, 90], [0x93, 52, 90], [0x83, 52, 0]):
        out.send(data)
    sent_before = len(out.messages)
    out.close()
    release = out.sent()[sent_before:]
    assert release == [(0x80, 60, 0), (0x80, 60, 0), (0x83, 48, 0), (0xB0, 123, 0), (0xB3, 123, 0)]
    assert out.sounding() == {}
    assert Synth().play(out.sent()).notes == {}
    out.close()  # a second close does nothing
    assert len(out.messages) == sent_before + len(release)
    with pytest.raises(PortError, match="closed"):
        out.send([0x90, 60, 100])


def test_panic_lifts_the_pedal_and_sends_all_sound_off_on_used_channels():
    out = MemoryOutput("out")
    out.send([0xB5, 64, 127])
    out.send([0x95, 70, 100])
    out.send([0xC7, 3])  # channel 7 used, no note
    out.panic()
    assert out.sent()[3:] == [
        (0x85, 70, 0), (0xB5, 64, 0),
        (0xB5, 123, 0), (0xB5, 120, 0), (0xB7, 123, 0), (0xB7, 120, 0),
    ]
    assert out.sounding() == {} and not out.closed
    synth = Synth().play(out.sent())
    assert synth.notes == {} and synth.pedal == set()


def test_reset_releases_notes_and_resets_controllers():
    out = MemoryOutput("out")
    out.send([0x90, 60, 100])
    out.reset()
    assert out.sent()[1:] == [(0x80, 60, 0), (0xB0, 123, 0), (0xB0, 121, 0)]
    assert out.sounding() == {}


def test_all_notes_off_sent_by_the_owner_clears_that_channel():
    out = MemoryOutput("out")
    out.send([0x90, 60, 100])
    out.send([0x91, 62, 100])
    out.send([0xB0, 123, 0])
    assert out.sounding() == {(1, 62): 1}


def test_close_completes_when_the_port_has_vanished(caplog):
    out = MemoryOutput("out")
    out.send([0x90, 60, 100])
    out.fail = True
    with pytest.raises(PortError, match="gone"):
        out.panic()
    out.close()
    assert out.closed
    assert "could not release the notes" in caplog.text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x80, 0x90, 0xB0]), st.integers(0, 3),
                          st.integers(58, 62), st.integers(0, 127)), max_size=60))
def test_close_leaves_nothing_sounding_whatever_was_sent(events):
    out = MemoryOutput("out")
    for kind, channel, key, value in events:
        if kind == 0xB0:
            key = 64  # sustain pedal up or down
        out.send([kind | channel, key, value])
    out.close()
    synth = Synth().play(out.sent())
    assert synth.notes == {} and synth.pedal == set()


def test_input_delivers_valid_messages_with_their_timestamp_and_drops_the_rest():
    got = []
    port = MemoryInput("in", on_message=lambda data, t: got.append((data, t)))
    port.inject([0x90, 60, 100], t=123)
    port.inject(bytes([0xF8]))
    port.inject([0x90, 60])  # a fragment
    port.inject([60, 100, 0x90])  # no status first
    assert got[0] == ((0x90, 60, 100), 123)
    assert got[1][0] == (0xF8,) and got[1][1] > 123
    assert port.dropped == 2
    port.inject_stream([0x90, 61, 1, 62, 2])
    assert [d for d, _ in got[2:]] == [(0x90, 61, 1), (0x90, 62, 2)]


def test_a_failing_handler_is_counted_and_does_not_escape(caplog):
    port = MemoryInput("in", on_message=lambda data, t: 1 / 0)
    port.inject([0x90, 60, 100])
    port.inject([0x90, 61, 100])
    assert port.handler_errors == 2
    assert caplog.text.count("ZeroDivisionError") == 1


def test_hub_loops_an_output_into_an_input_and_names_missing_ports():
    hub = MemoryHub()
    out = hub.open_output("coplayer soprano")
    got = []
    hub.open_input("coplayer in", on_message=lambda data, t: got.append((data, t)))
    hub.connect("coplayer soprano", "coplayer in")
    out.send([0x90, 60, 100])
    assert got == [((0x90, 60, 100), out.messages[0][0])]
    hub.disconnect(out, "coplayer in")
    out.send([0x80, 60, 0])
    assert len(got) == 1
    assert hub.list_ports() == {"inputs": ["coplayer in"], "outputs": ["coplayer soprano"]}
    with pytest.raises(PortNotFoundError, match="available ports: 'coplayer in'"):
        hub.input("keyboard")
    with pytest.raises(PortError, match="already open"):
        hub.open_output("coplayer soprano")
    hub.close_all()
    assert hub.list_ports() == {"inputs": [], "outputs": []}


def test_context_manager_closes_and_releases():
    with MemoryOutput("out") as out:
        out.send([0x90, 60, 100])
    assert out.closed and out.sent()[-2:] == [(0x80, 60, 0), (0xB0, 123, 0)]


# --- rtmidi, without a MIDI system ------------------------------------------


def test_unknown_or_missing_apis_are_refused_clearly():
    from coplayer.io import rtmidi_backend

    with pytest.raises(PortError, match="unknown MIDI API 'pipewire'"):
        rtmidi_backend.resolve_api("pipewire")
    missing = [a for a in ("alsa", "jack", "coremidi", "winmm") if a not in rtmidi_backend.compiled_apis()]
    if missing:
        with pytest.raises(PortError, match=f"the {missing[0]} MIDI API is not compiled"):
            rtmidi_backend.resolve_api(missing[0])


def test_windows_has_no_virtual_ports_and_the_error_names_loopmidi(monkeypatch):
    from coplayer.io import rtmidi_backend

    class FakeClient:
        deleted = False

        def delete(self):
            FakeClient.deleted = True

    monkeypatch.setattr(rtmidi_backend, "resolve_api", lambda name: "winmm")
    monkeypatch.setattr(rtmidi_backend, "_client", lambda cls, api, client, **kw: FakeClient())
    with pytest.raises(PortError, match="loopMIDI"):
        rtmidi_backend.RtMidiOutput("coplayer soprano", virtual=True, api="winmm")
    assert FakeClient.deleted


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.path.exists("/dev/snd/seq"),
                    reason="needs Linux without an ALSA sequencer device")
def test_ports_command_says_in_one_line_that_alsa_is_unavailable():
    run = subprocess.run([sys.executable, "-m", "coplayer", "ports", "--api", "alsa"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "coplayer: error: ALSA sequencer unavailable: no /dev/snd/seq; "
        "try --api jack (midi.api: jack) with a JACK server running"
    ]


# --- rtmidi over JACK ---------------------------------------------------------


def _client_name(tag: str) -> str:
    return f"cpt{os.getpid()}{tag}"


def _wait_for(got: list, count: int, timeout: float = 3.0) -> list:
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    return got


def _backend(name: str):
    """(Input, Output) classes of a real-port backend over JACK."""
    if name == "jack":
        from coplayer.io import jack_backend

        if not jack_backend.available():
            if os.environ.get("CI"):
                pytest.fail("coplayer's JACK client is not built (a C compiler at install time)")
            pytest.skip("coplayer's JACK client is not built (no C compiler at install time)")
        return jack_backend.JackInput, jack_backend.JackOutput
    from coplayer.io.rtmidi_backend import RtMidiInput, RtMidiOutput

    return RtMidiInput, RtMidiOutput


@pytest.fixture(params=["rtmidi", "jack"])
def jack_pair(jack_server, request):
    """A virtual output connected to a virtual input, both over JACK, through
    python-rtmidi or coplayer's own JACK client."""
    Input, Output = _backend(request.param)
    got: list = []
    a, b = _client_name("a"), _client_name("b")
    out = Output("notes", virtual=True, api="jack", client_name=a)
    inp = Input("listen", virtual=True, api="jack", client_name=b,
                on_message=lambda data, t: got.append((data, t)))
    subprocess.run(["jack_connect", f"{a}:notes", f"{b}:listen"], check=True, timeout=10)
    time.sleep(0.05)
    yield out, inp, got, (a, b), (Input, Output)
    out.close()
    inp.close()


def test_list_ports_sees_the_virtual_ports(jack_pair):
    from coplayer.io.real import list_ports

    out, _, _, (a, b), _ = jack_pair
    ports = list_ports("jack" if out.__module__.endswith("jack_backend") else "rtmidi", "jack")
    assert f"{a}:notes" in ports["inputs"]  # coplayer could listen to our output
    assert f"{b}:listen" in ports["outputs"]  # and play to our input


def test_notes_cross_jack_in_order_with_monotonic_timestamps(jack_pair):
    from coplayer.io.ports import now_ns

    out, _, got, _, _ = jack_pair
    sent_at = []
    for pitch in range(60, 72):
        sent_at.append(now_ns())
        out.send([0x90, pitch, 100])
        out.send([0x80, pitch, 0])
        time.sleep(0.003)
    _wait_for(got, 24)
    assert [d for d, _ in got] == [m for p in range(60, 72) for m in ((0x90, p, 100), (0x80, p, 0))]
    times = [t for _, t in got]
    assert times == sorted(times)
    hops_ms = [(t - s) / 1e6 for s, (_, t) in zip(sent_at, got[::2])]
    assert all(0 < h < 50 for h in hops_ms), hops_ms


def test_a_burst_of_3000_messages_arrives_whole_and_in_order(jack_pair):
    out, _, got, _, _ = jack_pair
    sent = [(0x90 | (i % 16), i % 128, 1 + i % 127) for i in range(3000)]
    for msg in sent:
        out.send(msg)
    assert [d for d, _ in _wait_for(got, 3000, timeout=10.0)] == sent


def test_the_callback_reader_delivers_too(jack_server):
    from coplayer.io.rtmidi_backend import RtMidiInput, RtMidiOutput

    a = _client_name("cbo")
    got = []
    with RtMidiOutput("notes", virtual=True, api="jack", client_name=a) as out, \
            RtMidiInput(f"{a}:notes", api="jack", client_name=_client_name("cb"), poll_interval_s=None,
                        on_message=lambda data, t: got.append(data)) as listener:
        assert listener.poll_interval_s is None
        time.sleep(0.05)
        for pitch in (60, 64, 67):
            out.send([0x90, pitch, 100])
        assert _wait_for(got, 3) == [(0x90, 60, 100), (0x90, 64, 100), (0x90, 67, 100)]


def test_clock_and_sysex_pass_and_active_sensing_is_filtered(jack_pair):
    out, _, got, _, _ = jack_pair
    for data in ([0xFE], [0xFA], [0xF8], [0xF0, 0x7D, 1, 2, 0xF7], [0xFC]):
        out.send(data)
    _wait_for(got, 4)
    time.sleep(0.05)
    assert [d for d, _ in got] == [(0xFA,), (0xF8,), (0xF0, 0x7D, 1, 2, 0xF7), (0xFC,)]


def test_close_releases_sounding_notes_through_jack(jack_pair):
    out, _, got, _, _ = jack_pair
    out.send([0x92, 64, 90])
    out.send([0x92, 64, 90])
    out.send([0xB2, 64, 127])
    out.close()
    _wait_for(got, 7)
    synth = Synth().play([d for d, _ in got])
    assert synth.notes == {} and synth.pedal == set()
    assert [d for d, _ in got][-4:] == [(0x82, 64, 0), (0x82, 64, 0), (0xB2, 64, 0), (0xB2, 123, 0)]


def test_a_named_existing_port_opens_by_unique_substring(jack_pair):
    out, _, _, (a, _), (Input, _) = jack_pair
    got = []
    with Input(f"{a}:NOT", api="jack", client_name=_client_name("c"),
               on_message=lambda data, t: got.append(data)) as listener:
        assert listener.name == f"{a}:notes"
        time.sleep(0.05)
        out.send([0x90, 60, 100])
        assert _wait_for(got, 1) == [(0x90, 60, 100)]


def test_a_missing_port_lists_the_available_ones(jack_pair):
    _, _, _, (a, b), (Input, Output) = jack_pair
    with pytest.raises(PortNotFoundError, match=rf"no MIDI input port 'Launchkey'; available ports: .*'{a}:notes'"):
        Input("Launchkey", api="jack", client_name=_client_name("d"))
    with pytest.raises(PortNotFoundError, match=f"'{b}:listen'"):
        Output("Launchkey", api="jack", client_name=_client_name("e"))
    with Output("more notes", virtual=True, api="jack", client_name=_client_name("f")):
        with pytest.raises(PortNotFoundError, match="matches 2 ports; give more of the name"):
            Input(f"cpt{os.getpid()}", api="jack", client_name=_client_name("g"))


def test_an_open_input_is_not_collected_when_its_owner_drops_it(jack_pair):
    out, _, _, (a, _), (Input, _) = jack_pair
    got = []
    ref = weakref.ref(Input(f"{a}:notes", api="jack", client_name=_client_name("h"),
                            on_message=lambda data, t: got.append(data)))
    gc.collect()
    assert ref() is not None
    time.sleep(0.05)
    out.send([0x90, 61, 100])
    assert _wait_for(got, 1) == [(0x90, 61, 100)]
    ref().close()
    gc.collect()
    assert ref() is None


# --- coplayer's JACK client ---------------------------------------------------


def test_one_jack_client_holds_every_port_of_a_name(jack_server):
    Input, Output = _backend("jack")
    name = _client_name("one")
    ports = [Output(f"part {i}", virtual=True, client_name=name) for i in range(4)]
    ports.append(Input("in", virtual=True, client_name=name))
    clients = {p.split(":", 1)[0] for p in subprocess.run(["jack_lsp"], capture_output=True, text=True,
                                                          timeout=10).stdout.split() if name in p}
    assert clients == {name}
    for port in ports:
        port.close()
    time.sleep(0.1)
    left = subprocess.run(["jack_lsp"], capture_output=True, text=True, timeout=10).stdout
    assert name not in left  # the client went with its last port


_STALLED_CLIENT = """
import sys, time
from coplayer.io.jack_backend import JackInput
port = JackInput("stall", virtual=True, client_name=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.05)  # cycles after the stall: the callback runs again and sees the gap
print(port.skipped_cycles(), port.xruns(), port.overflowed(), flush=True)
port.close()
"""


@pytest.mark.subprocess
def test_a_jack_client_counts_the_cycles_jack_skipped_it(jack_server):
    """A process stopped for 0.1 s misses ~75 cycles of 64 frames at 48 kHz:
    its client counts them from the gap in JACK's frame time (what tells a
    note lost in JACK's graph from one coplayer lost).  Running freely
    before and after, it misses none of its own accord."""
    name = _client_name("stall")
    child = subprocess.Popen([sys.executable, "-c", _STALLED_CLIENT, name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.05)
        child.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        child.send_signal(signal.SIGCONT)
        child.stdin.write("report\n")
        child.stdin.flush()
        skipped, xruns, overflowed = (int(x) for x in child.stdout.readline().split())
    finally:
        child.kill()
        child.wait(timeout=10)
    assert 40 <= skipped <= 200, skipped
    assert overflowed == 0


def test_a_jack_port_name_taken_is_one_clear_error(jack_server):
    _, Output = _backend("jack")
    name = _client_name("dup")
    with Output("same", virtual=True, client_name=name):
        with pytest.raises(PortError, match="already has a port 'same'"):
            Output("same", virtual=True, client_name=name)


def test_jack_idle_ticks_come_in_rests_just_after_a_cycle_and_never_while_notes_stream(jack_server):
    """JackInput.set_idle: the engine's keep-warm hook.  Ticks come every
    ``every_s`` of silence, in the input's own thread, soon after a cycle
    began; none while messages come closer together than that; none after
    set_idle(None)."""
    from coplayer.io import jack_backend
    from coplayer.io.ports import now_ns

    Input, Output = _backend("jack")
    a, b = _client_name("ia"), _client_name("ib")
    got, ticks = [], []
    out = Output("notes", virtual=True, client_name=a)
    inp = Input("listen", virtual=True, client_name=b, on_message=lambda data, t: got.append(threading.get_ident()))
    subprocess.run(["jack_connect", f"{a}:notes", f"{b}:listen"], check=True, timeout=10)
    try:
        assert inp.set_idle(lambda: ticks.append((now_ns(), threading.get_ident())), 0.005)
        time.sleep(0.3)
        rest = len(ticks)
        assert 20 <= rest <= 70, rest  # every 5 ms of silence (a tick is skipped if the reader woke late)
        streaming = now_ns()
        for i in range(100):  # a message every ~2 ms for 0.2 s: no tick
            out.send((0x90, 60, 1 + i))
            time.sleep(0.002)
        streamed = now_ns()
        _wait_for(got, 100)
        during = [t for t, _ in ticks if streaming + 10_000_000 < t < streamed]
        assert not during, f"{len(during)} ticks came while messages streamed"
        assert {ident for _, ident in ticks} == set(got[:1]), "ticks and messages come from one thread"
        inp.set_idle(None, 0.0)
        time.sleep(0.05)
        before = len(ticks)
        time.sleep(0.1)
        assert len(ticks) == before
    finally:
        out.close()
        inp.close()
    assert jack_backend.IDLE_FRESH_S < 0.0013  # well inside one cycle at 48 kHz / 64 frames


def test_a_jack_input_tells_when_messages_wait_for_its_reader(jack_server):
    """JackInput.waiting(): the engine then skips optional work after a note."""
    Input, Output = _backend("jack")
    a, b = _client_name("wa"), _client_name("wb")
    release, seen, waited = threading.Event(), [], []

    def slow(data, t):
        seen.append(data)
        if len(seen) == 1:
            release.wait(5)

    out = Output("notes", virtual=True, client_name=a)
    inp = Input("listen", virtual=True, client_name=b, on_message=slow)
    subprocess.run(["jack_connect", f"{a}:notes", f"{b}:listen"], check=True, timeout=10)
    try:
        assert not inp.waiting()
        out.send((0x90, 60, 1))
        _wait_for(seen, 1)
        out.send((0x90, 61, 1))
        deadline = time.monotonic() + 2
        while not waited and time.monotonic() < deadline:
            if inp.waiting():
                waited.append(True)
            time.sleep(0.001)
        release.set()
        _wait_for(seen, 2)
        assert waited and not inp.waiting()
    finally:
        release.set()
        out.close()
        inp.close()


def test_a_jack_port_counts_the_xruns_jack_reports(jack_server):
    """A JACK client stopped for a moment is late in its cycles: JACK reports
    xruns to every client, and the bench prints them beside its losses."""
    Input, Output = _backend("jack")
    out = Output("notes", virtual=True, client_name=_client_name("xr"))
    late = subprocess.Popen(["jack_midi_dump"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # jack_midi_dump's client is up
        before = out.xruns()
        late.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        late.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 3
        while out.xruns() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert out.xruns() > before
    finally:
        late.send_signal(signal.SIGCONT)
        late.terminate()
        late.wait(5)
        out.close()
    assert MemoryOutput("m").xruns() is None  # a backend that cannot tell says so


def _stuck_reader(tag: str):
    """A JACK output connected to an input whose handler sticks on the first
    message until ``release`` is set: (out, inp, seen, release)."""
    Input, Output = _backend("jack")
    a, b = _client_name(f"{tag}a"), _client_name(f"{tag}b")
    release, seen = threading.Event(), []

    def stuck(data, t):
        seen.append(data)
        release.wait(10)

    out = Output("notes", virtual=True, client_name=a)
    inp = Input("listen", virtual=True, client_name=b, on_message=stuck)
    subprocess.run(["jack_connect", f"{a}:notes", f"{b}:listen"], check=True, timeout=10)
    return out, inp, seen, release


def test_messages_dropped_while_the_jack_reader_is_stuck_are_reported_at_close(jack_server, caplog):
    out, inp, seen, release = _stuck_reader("d")
    try:
        out.send((0x90, 60, 1))
        _wait_for(seen, 1)
        for k in range(15000):  # more than the input ring holds (256 KiB, 19 bytes each)
            out.send((0xA0, k % 128, 1))  # poly aftertouch: nothing left sounding
        deadline = time.monotonic() + 5
        while out._client_obj.lib.cp_pending(out._client_obj.handle, out._index) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        release.set()
        out.close()
        with caplog.at_level(logging.WARNING, logger="coplayer.io.jack_backend"):
            inp.close()
    assert any("were dropped" in r.getMessage() for r in caplog.records)


def test_backend_choice():
    from coplayer.io.real import choose

    assert choose("rtmidi", "jack") == "rtmidi"
    with pytest.raises(PortError, match="unknown MIDI backend 'alsa'"):
        choose("alsa")
    with pytest.raises(PortError, match="JACK ports only, not alsa"):
        choose("jack", "alsa")


# --- the stuck-note safety net of coplayer's JACK outputs (_jackmidi.c) ---------------

NET_WINDOW = 4800  # frames: 0.1 s at 48 kHz, as a client opened on such a server uses


class Net:
    """One output's net, driven by hand: what its port wrote in which cycle
    (``written``), and what a cycle after a gap writes again (``due``)."""

    def __init__(self) -> None:
        from coplayer.io import jack_backend

        if not jack_backend.available():
            pytest.skip("coplayer's JACK client is not built (no C compiler at install time)")
        self.lib = jack_backend._load()
        self.handle = self.lib.cp_net_create()

    def written(self, frame: int, *messages) -> None:
        for m in messages:
            self.lib.cp_net_written(self.handle, bytes(m), len(m), frame)

    def due(self, frame: int, window: int = NET_WINDOW) -> list[tuple[int, ...]]:
        import ctypes

        buf = ctypes.create_string_buffer(3 * 256)
        n = self.lib.cp_net_due(self.handle, frame, window, buf, 256)
        return [tuple(buf.raw[i:i + 3]) for i in range(0, 3 * n, 3)]

    def close(self) -> None:
        self.lib.cp_net_destroy(self.handle)


@pytest.fixture
def net():
    n = Net()
    yield n
    n.close()


def test_after_a_gap_the_net_writes_again_the_recent_note_offs_of_silent_keys_only(net):
    net.written(1000, (NOTE_ON, 60, 90), (NOTE_ON, 62, 90), (NOTE_ON | 1, 64, 90))
    net.written(1064, (NOTE_OFF, 60, 0), (NOTE_OFF, 62, 0), (NOTE_ON | 1, 64, 90))
    net.written(1128, (NOTE_ON, 62, 90), (NOTE_OFF | 1, 64, 0))  # 62 struck again; 64 held twice, ended once
    assert net.due(1192) == [(NOTE_OFF, 60, 0)]
    net.written(1256, (NOTE_ON, 62, 0), (NOTE_OFF | 1, 64, 0))  # both ended now (a note-on of velocity 0 too)
    assert net.due(1320) == [(NOTE_OFF, 60, 0), (NOTE_OFF, 62, 0), (NOTE_OFF | 1, 64, 0)]


def test_the_net_reaches_back_only_its_window_and_repeats_a_note_off_a_few_times(net):
    net.written(0, (NOTE_ON, 60, 90), (NOTE_OFF, 60, 0), (NOTE_ON, 61, 90), (NOTE_OFF, 61, 0), (NOTE_OFF, 61, 0))
    assert net.due(NET_WINDOW + 64) == []  # written too long ago
    net.written(10_000, (NOTE_ON, 62, 90), (NOTE_OFF, 62, 0), (NOTE_OFF, 62, 0))
    sends = [net.due(10_064 + 64 * k) for k in range(6)]
    assert sends[0] == [(NOTE_OFF, 62, 0)]  # once per key and gap
    assert sum(map(len, sends)) == 4  # an xrun storm does not repeat it forever
    assert net.due(10_064 + 10 * NET_WINDOW) == []


def test_the_net_lifts_the_pedal_again_unless_it_went_down_since(net):
    net.written(100, (CC, 64, 127), (CC, 64, 0), (CC | 2, 64, 127), (CC | 2, 64, 0), (CC | 2, 64, 100))
    assert net.due(164) == [(CC, 64, 0)]


def test_all_notes_off_ends_the_held_notes_of_its_channel_and_comes_again_unless_one_is_struck_since(net):
    net.written(100, (NOTE_ON, 60, 90), (NOTE_ON, 60, 90), (NOTE_OFF, 60, 0), (CC, 123, 0), (CC | 1, 120, 0))
    assert net.due(164) == [(NOTE_OFF, 60, 0), (CC, 123, 0), (CC | 1, 120, 0)]
    net.written(228, (NOTE_ON, 60, 90), (NOTE_ON | 1, 40, 90), (NOTE_OFF | 1, 40, 0))
    assert net.due(292) == [(CC | 1, 120, 0), (NOTE_OFF | 1, 40, 0)]  # channel 0 holds 60 again


MARK = (CC, 20, 1)  # sent before the last note-offs of a test, to tell what came before them
_LISTENER = """
import sys, time
from coplayer.io.jack_backend import JackInput
port = JackInput("listen", virtual=True, client_name=sys.argv[1],
                 on_message=lambda data, t: print(*data, flush=True))
print("ready", flush=True)
sys.stdin.readline()
port.close()
"""


def _freeze_a_listener() -> tuple[int, list]:
    """One try of the test below: (note-offs resent, what the listener heard)."""
    _, Output = _backend("jack")
    a, b = _client_name("na"), _client_name("nb")
    child = subprocess.Popen([sys.executable, "-c", _LISTENER, b], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    out = Output("notes", virtual=True, client_name=a)
    late = None
    try:
        assert child.stdout.readline().strip() == "ready"
        subprocess.run(["jack_connect", f"{a}:notes", f"{b}:listen"], check=True, timeout=10)
        time.sleep(0.05)
        out.send((NOTE_ON, 50, 90))  # a note the listener hears: the connection works
        time.sleep(0.05)
        xruns = out.xruns()
        child.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 2
        while out.xruns() == xruns and time.monotonic() < deadline:  # JACK noticed the frozen client
            time.sleep(0.002)
        for msg in [(NOTE_ON, 60, 90), (NOTE_OFF, 60, 0), (NOTE_ON, 62, 90), (NOTE_OFF, 62, 0), (NOTE_ON, 62, 90)]:
            out.send(msg)
        time.sleep(0.01)  # written into JACK's cycles, unread
        child.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 3
        while not out.resent() and time.monotonic() < deadline:
            if late is None:  # an xrun of another client also tells the net to write again
                time.sleep(0.01)
                late = subprocess.Popen(["jack_midi_dump"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
                late.send_signal(signal.SIGSTOP)
                time.sleep(0.02)
                late.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        time.sleep(0.1)  # the resend's echo, 16 cycles (21 ms) later, for a listener that missed the first
        resent = out.resent()
        out.send(MARK)
        out.send((NOTE_OFF, 62, 0))
        out.send((NOTE_OFF, 50, 0))
        time.sleep(0.1)
        child.stdin.write("done\n")
        child.stdin.flush()
        heard = [tuple(int(x) for x in line.split()) for line in child.stdout.read().splitlines()]
    finally:
        child.kill()
        child.wait(timeout=10)
        if late is not None:
            late.send_signal(signal.SIGCONT)
            late.terminate()
            late.wait(5)
        out.close()
    return resent, heard


@pytest.mark.subprocess
def test_note_offs_lost_in_a_frozen_listener_are_sent_again_but_a_key_struck_since_is_not_ended(jack_server):
    """The listening client is frozen (SIGSTOP) while coplayer's output writes
    a note, a note-off, and a key struck, released and struck again: JACK
    drops all of it unread.  After the freeze (an xrun tells the writer),
    the note-off of the silent key comes again; the key held is never ended
    until its own note-off.  A listener just thawed can miss the resends too
    (it failed 2 of about 10 suite runs on 3 December), so the note-off must
    come again in one of three tries; the held key must hold in every one."""
    recovered = []
    for _ in range(3):
        resent, heard = _freeze_a_listener()
        assert heard[0] == (NOTE_ON, 50, 90), heard
        before = heard[:heard.index(MARK)]
        assert not [m for m in before if m[1] == 62], heard  # held: never ended by the net
        assert (NOTE_OFF, 62, 0) in heard[heard.index(MARK):]  # (later xruns may repeat this one: harmless)
        recovered.append(resent >= 1 and (NOTE_OFF, 60, 0) in before)  # lost in the freeze, sent again
        if recovered[-1]:
            break
    assert any(recovered), recovered


def test_a_jack_reader_sheds_stale_note_ons_and_junk_but_never_what_ends_a_note(jack_server):
    """set_stale: while the reader is stuck, note-ons and SysEx wait past the
    stale time and are dropped in C, counted; note-offs and controllers
    (sustain off, All Notes Off) are delivered however late."""
    out, inp, seen, release = _stuck_reader("s")
    try:
        assert inp.set_stale(5_000_000) and 0 < inp.period_ns() < 100_000_000
        time.sleep(0.05)
        out.send((0xA0, 1, 1))  # the reader takes it and is stuck
        _wait_for(seen, 1)
        late = [(NOTE_ON, 60, 90), (0xF0, 1, 2, 0xF7), (NOTE_OFF, 61, 0), (NOTE_ON, 62, 0), (CC, 64, 0),
                (CC, 123, 0), (NOTE_ON, 63, 90)]
        for msg in late:
            out._send(msg)  # not send(): nothing is sounding here to track
        time.sleep(0.1)  # all of them wait 20 times the stale time
        release.set()
        _wait_for(seen, 5)
        time.sleep(0.05)
        shed, got = inp.shed(), list(seen)
    finally:
        release.set()
        out.close()
        inp.close()
    # each once, in order (the sender's safety net may repeat a note-off after an xrun)
    assert list(dict.fromkeys(got[1:])) == [(NOTE_OFF, 61, 0), (NOTE_ON, 62, 0), (CC, 64, 0), (CC, 123, 0)]
    assert shed == 3
