"""Property: whatever MIDI arrives, nothing escapes the engine and nothing is left sounding.

Hypothesis streams random and malformed input through the engine's input
port: random byte streams (split by :func:`~coplayer.io.memory.split_stream`
with running status, stray data bytes, unfinished messages, SysEx),
note-offs without note-ons, repeated note-ons, out-of-range data, bursts,
controllers, the drum channel, the control CCs (panic, mode, ...), mutes
and mode changes from another thread, answers from a fake responder, and a
feedback loop from one output back into the input.  At the end no note is
left sounding on any output, the pedal is up everywhere, and the worker
never met an exception.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_engine import PARTS, Rig

byte = st.integers(0, 255)
data7 = st.integers(0, 127)
channel = st.integers(0, 15)

note = st.tuples(st.sampled_from([0x80, 0x90]), channel, st.integers(36, 90), data7).map(
    lambda t: (t[0] | t[1], t[2], t[3]))
controller = st.one_of(
    st.tuples(channel, st.sampled_from([1, 7, 64, 66, 0, 6, 101, 121, 123, 20, 21, 22, 23, 24]), data7).map(
        lambda t: (0xB0 | t[0], t[1], t[2])),
    st.tuples(channel, data7, data7).map(lambda t: (0xE0 | t[0], t[1], t[2])),
    st.tuples(channel, data7, data7).map(lambda t: (0xA0 | t[0], t[1], t[2])),
    st.tuples(channel, data7).map(lambda t: (0xD0 | t[0], t[1])),
)
system = st.sampled_from([(0xF8,), (0xFA,), (0xFC,), (0xFE,), (0xF0, 1, 2, 3, 0xF7), (0xF2, 3, 1), (0xC3, 9)])
malformed = st.lists(st.integers(-5, 300), min_size=0, max_size=6).map(tuple)  # out of range, short, long

step = st.one_of(
    note.map(lambda m: ("msg", m)),
    note.map(lambda m: ("burst", m)),
    controller.map(lambda m: ("msg", m)),
    system.map(lambda m: ("msg", m)),
    malformed.map(lambda m: ("msg", m)),
    st.lists(byte, max_size=24).map(lambda b: ("stream", b)),
    st.sampled_from(["instrument", "respond", "both"]).map(lambda m: ("mode", m)),
    st.tuples(st.sampled_from(PARTS), st.booleans()).map(lambda t: ("mute", t)),
    st.tuples(st.sampled_from(PARTS), st.booleans()).map(lambda t: ("solo", t)),
    st.tuples(st.sampled_from(PARTS), st.integers(40, 80)).map(lambda t: ("answer", t)),
    st.just(("panic", None)),
    st.just(("cancel", None)),
)


def apply(rig: Rig, kind: str, arg) -> None:
    engine, port = rig.engine, rig.input
    if kind == "msg":
        port.inject(arg)
    elif kind == "burst":
        for i in range(20):
            port.inject((arg[0], (arg[1] + i) % 128, arg[2]))
    elif kind == "stream":
        port.inject_stream(arg)
    elif kind == "mode":
        engine.set_mode(arg)
    elif kind in ("mute", "solo"):
        getattr(engine, kind)(*arg)
    elif kind == "answer":
        rig.responder.answer(*arg)
    elif kind == "panic":
        engine.panic()
    else:
        rig.responder.cancel()


class Tap:
    """Counts the note-ons and note-offs the engine receives, per (channel, pitch)."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.held: dict[tuple[int, int], int] = {}

    def __call__(self, data, t_ns) -> None:
        kind = data[0] & 0xF0
        if kind in (0x80, 0x90) and data[0] < 0xF0:
            key = (data[0] & 0x0F, data[1])
            self.held[key] = max(0, self.held.get(key, 0) + (1 if kind == 0x90 and data[2] else -1))
        self.forward(data, t_ns)


def release_everything(rig: Rig, tap: Tap) -> None:
    """The player lets go of every key and every pedal; the answer is cancelled."""
    for (ch, pitch), count in list(tap.held.items()):
        for _ in range(max(0, count)):
            rig.input.inject((0x80 | ch, pitch, 0))
    for ch in range(16):
        rig.input.inject((0xB0 | ch, 64, 0))
        rig.input.inject((0xB0 | ch, 66, 0))
    rig.responder.cancel()
    assert rig.engine.flush(timeout=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=40), loop=st.booleans(), channels=st.booleans())
def test_random_midi_leaves_nothing_sounding(steps, loop, channels):
    rig = Rig(*(["midi.output_mode=channels"] if channels else []))
    if loop:  # a DAW track monitoring one output, echoing it into the input
        rig.hub.connect(rig.outputs.parts["alto"].port, rig.input)
    with rig:
        tap = rig.input.on_message = Tap(rig.input.on_message)
        for kind, arg in steps:
            apply(rig, kind, arg)
        assert rig.engine.flush(timeout=10)
        release_everything(rig, tap)
        for out in rig.hub.outputs.values():  # released by the engine's pairing, before any clean-up
            assert out.sounding() == {}, out.name
            assert not out._pedal, out.name
    for out in rig.hub.outputs.values():
        assert out.sounding() == {} and out.closed, out.name
    assert rig.engine.counts["errors"] == 0
    assert rig.input.handler_errors == 0
