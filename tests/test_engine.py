"""The live engine with in-memory ports: routing, note-off pairing, controllers,
pass-through, controls, the latency budget, the feedback guard, safety, session."""

from __future__ import annotations

import logging
import threading
import time

import mido
import numpy as np
import pytest

from coplayer.config import load_config, packaged_config, value_range
from coplayer.engine.controls import (CcControls, cc_key_strength, cc_mode, cc_response_bars, cc_temperature,
                                      osc_handlers)
from coplayer.engine.engine import Decider, Engine
from coplayer.engine.live import MemoryPorts, open_outputs
from coplayer.engine.router import ControllerMirror, FeedbackGuard, Router, Target
from coplayer.engine.session import session_path
from coplayer.engine.view import render
from coplayer.gen.sampler import HARD_LOCK, Controls
from coplayer.instrument.baselines import make_instrumenter, make_scorer
from coplayer.instrument.features import FeatureSpec
from coplayer.instrument.instrumenter import Instrumenter
from coplayer.io.clock import InternalClock
from coplayer.io.memory import MemoryOutput
from coplayer.io.osc import OscControl
from coplayer.io.ports import now_ns

PARTS = ("soprano", "alto", "tenor", "bass")
ON, OFF, CC, BEND = 0x90, 0x80, 0xB0, 0xE0
# What an engine sends first on each output: sustain off, All Notes Off, All Sound Off on every channel.
CLEAN_START = [(CC | channel, number, 0) for channel in range(16) for number in (64, 123, 120)]


def config(*overrides: str):
    return load_config(str(packaged_config()), ["midi.backend=memory", "osc.enabled=false", *overrides])


def by_register(pitch: int) -> int:
    """soprano from C5, alto from C4, tenor from C3, bass below."""
    return 0 if pitch >= 72 else 1 if pitch >= 60 else 2 if pitch >= 48 else 3


class RuleScorer:
    """A scorer that picks ``rule(pitch)`` (optionally slowly, or failing)."""

    def __init__(self, rule=by_register, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.parts, self.rule, self.delay_s, self.fail_on = PARTS, rule, delay_s, fail_on
        self.spec = FeatureSpec(n_parts=len(PARTS))
        self.calls = 0

    def reset(self) -> None:
        pass

    def log_probs(self, pitch, feats, featurizer):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if pitch == self.fail_on:
            raise RuntimeError(f"model exploded on pitch {pitch}")
        out = np.full(len(PARTS), -100.0)
        out[self.rule(pitch)] = 0.0
        return out


class FakeResponder:
    """The responder's contract: answers with one note per trigger, releases on cancel/stop."""

    def __init__(self, cfg, play) -> None:
        self.play = play
        self.controls = Controls.from_config(cfg)
        self.heard: list[tuple] = []
        self.events: list[str] = []
        self.sounding: list[tuple[str, int]] = []
        self.bars = None
        self.mode = None
        self.stats = {"played": 0, "cancelled": 0}
        self.lock = threading.Lock()

    def start(self):
        self.events.append("start")

    def stop(self):
        self.events.append("stop")
        self._release()

    def yield_to_player(self):
        self.events.append("yield")
        self._release()

    def note_on(self, pitch, velocity, part, t_ns):
        self.heard.append(("on", pitch, velocity, part))

    def note_off(self, pitch, t_ns):
        self.heard.append(("off", pitch))

    def answer(self, part: str, pitch: int) -> None:
        with self.lock:
            self.sounding.append((part, pitch))
            self.play(part, (0x90, pitch, 70), now_ns())

    def trigger(self):
        self.events.append("trigger")
        self.answer("alto", 64)
        self.stats["played"] += 1

    def cancel(self):
        self.events.append("cancel")
        self._release()

    def _release(self):
        with self.lock:
            for part, pitch in self.sounding:
                self.play(part, (0x80, pitch, 0), now_ns())
            self.sounding.clear()

    def set_mode(self, mode):
        self.mode = mode

    def set_response_bars(self, bars):
        self.bars = bars


class Rig:
    """An engine on memory ports, with its hub, input and fake responder."""

    def __init__(self, *overrides: str, scorer=None, fallback: bool = False, responder: bool = True,
                 clock=None) -> None:
        self.cfg = config(*overrides)
        self.ports = MemoryPorts()
        self.hub = self.ports.hub
        self.outputs = open_outputs(self.cfg, self.ports)
        self.input = self.ports.input("coplayer in", True)
        self.scorer = scorer or RuleScorer()
        inst = Instrumenter(self.scorer)
        fb = make_instrumenter(make_scorer("zone", self.cfg), self.cfg) if fallback else None
        self.engine = Engine(self.cfg, self.outputs, inst, fallback=fb, clock=clock, input=self.input)
        self.responder = FakeResponder(self.cfg, self.engine.play) if responder else None
        self.engine.attach_responder(self.responder)

    def __enter__(self) -> Rig:
        self.engine.start()
        if self.cfg.midi.clean_start:  # checked here, then out of every test's way
            for port in self.outputs.ports():
                assert port.sent()[:len(CLEAN_START)] == CLEAN_START, port.name
                del port.messages[:len(CLEAN_START)]
        return self

    def __exit__(self, *exc) -> None:
        self.engine.stop()

    def send(self, *messages, t: int | None = None) -> None:
        for msg in messages:
            self.input.inject(msg, t)
        assert self.engine.flush()

    def port(self, name: str) -> MemoryOutput:
        return self.hub.output(name)

    def sent(self, name: str, kinds=(ON, OFF)) -> list[tuple]:
        """Messages on a port of the given kinds (high nibble)."""
        return [m for m in self.port(name).sent() if m[0] & 0xF0 in kinds]

    def notes(self, name: str) -> list[tuple]:
        return self.sent(name, (ON, OFF))

    def all_silent(self) -> bool:
        return all(not p.sounding() for p in self.hub.outputs.values())


# --- routing and note-off pairing ----------------------------------------------------


def test_note_ons_go_to_the_chosen_part_on_its_port_and_channel():
    with Rig() as rig:
        rig.send((ON, 76, 100), (ON, 40, 90), (OFF, 76, 0), (ON, 40, 0))
        assert rig.port("coplayer soprano").sent()[0] == (0xC0, 40)  # program change at start
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100), (0x80, 76, 0)]
        assert rig.notes("coplayer bass") == [(0x93, 40, 90), (0x83, 40, 0)]
        assert rig.notes("coplayer alto") == rig.notes("coplayer tenor") == []
        assert rig.responder.heard[:2] == [("on", 76, 100, "soprano"), ("on", 40, 90, "bass")]
    stats = rig.engine.stats()
    assert stats["count"] == 2 and stats["parts"] == {"soprano": 1, "alto": 0, "tenor": 0, "bass": 1}
    assert stats["p50_ms"] > 0 and stats["misses"] == 0


def test_channels_mode_uses_one_port_and_a_channel_per_part():
    with Rig("midi.output_mode=channels") as rig:
        rig.send((ON, 76, 100), (ON, 50, 90), (OFF, 50, 0), (OFF, 76, 0))
        assert set(rig.hub.outputs) == {"coplayer out", "coplayer in"} - {"coplayer in"}
        assert rig.notes("coplayer out") == [(0x90, 76, 100), (0x92, 50, 90), (0x82, 50, 0), (0x80, 76, 0)]


def test_note_off_follows_its_note_on_across_mode_changes():
    with Rig() as rig:
        rig.send((ON, 76, 100))
        rig.engine.set_mode("respond")
        rig.send((ON, 50, 90, ), (OFF, 76, 0))
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100), (0x80, 76, 0)]
        assert rig.notes("coplayer thru") == [(0x90, 50, 90)]  # untouched, its own channel
        rig.engine.set_mode("both")
        rig.send((0x80, 50, 10))
        assert rig.notes("coplayer thru") == [(0x90, 50, 90), (0x80, 50, 10)]
        assert rig.notes("coplayer tenor") == []
        assert rig.responder.mode == "both" and rig.all_silent()


def test_repeated_note_ons_pair_first_in_first_out():
    with Rig() as rig:
        rig.send((ON, 76, 100), (ON, 76, 90))  # the same key twice: a second part takes it
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100)]
        assert rig.notes("coplayer alto") == [(0x91, 76, 90)]
        rig.send((OFF, 76, 0))
        assert rig.notes("coplayer soprano")[-1] == (0x80, 76, 0)
        assert rig.port("coplayer alto").sounding() == {(1, 76): 1}
        rig.send((OFF, 76, 0))
        assert rig.all_silent()


def test_note_off_without_note_on_is_ignored():
    with Rig() as rig:
        rig.send((OFF, 70, 0), (ON, 70, 0))
        assert all(rig.notes(name) == [] for name in rig.hub.outputs)


def test_mute_releases_at_once_and_pairs_later_note_offs():
    with Rig() as rig:
        rig.send((ON, 76, 100))
        rig.engine.mute("soprano")
        rig.send((ON, 77, 100), (OFF, 76, 0), (OFF, 77, 0))
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100), (0x80, 76, 0)]  # one note-off, no 77
        assert rig.engine.stats()["count"] == 2  # decided anyway
        rig.engine.mute("soprano", False)
        rig.send((ON, 78, 100))
        assert rig.notes("coplayer soprano")[-1] == (0x90, 78, 100)


def test_solo_silences_the_other_parts():
    with Rig() as rig:
        rig.send((ON, 76, 100), (ON, 40, 100))
        rig.engine.solo("bass")
        assert rig.engine.flush()
        assert rig.port("coplayer soprano").sounding() == {}
        assert rig.port("coplayer bass").sounding() == {(3, 40): 1}
        rig.send((ON, 79, 100))
        assert (0x90, 79, 100) not in rig.notes("coplayer soprano")
        rig.engine.solo("bass", False)
        rig.send((OFF, 76, 0), (OFF, 79, 0), (OFF, 40, 0))
        assert rig.all_silent()
    with pytest.raises(KeyError, match="parts: soprano"):
        rig.engine.mute("violin")


# --- controllers ---------------------------------------------------------------------


def test_sustain_pedal_reaches_sounding_parts_new_parts_and_lifts_everywhere():
    with Rig() as rig:
        rig.send((ON, 76, 100), (CC, 64, 127))
        assert rig.sent("coplayer soprano", (CC,)) == [(0xB0, 64, 127)]
        assert rig.sent("coplayer bass", (CC,)) == []
        rig.send((OFF, 76, 0), (ON, 40, 90))  # bass starts under the pedal: told first
        assert rig.port("coplayer bass").sent()[-2:] == [(0xB3, 64, 127), (0x93, 40, 90)]
        rig.send((OFF, 40, 0), (CC, 64, 0))  # nothing sounds: pedal-up reaches both
        assert rig.sent("coplayer soprano", (CC,))[-1] == (0xB0, 64, 0)
        assert rig.sent("coplayer bass", (CC,))[-1] == (0xB3, 64, 0)
        assert rig.sent("coplayer alto", (CC,)) == rig.sent("coplayer tenor", (CC,)) == []


def test_pitch_bend_and_modulation_go_to_sounding_parts_and_poly_pressure_to_the_holder():
    with Rig() as rig:
        rig.send((ON, 50, 100), (BEND, 0, 80), (CC, 1, 30), (0xA0, 50, 40), (0xA0, 76, 40))
        assert rig.port("coplayer tenor").sent()[-3:] == [(0xE2, 0, 80), (0xB2, 1, 30), (0xA2, 50, 40)]
        for name in ("coplayer soprano", "coplayer alto", "coplayer bass"):
            assert rig.sent(name, (CC, BEND, 0xA0)) == []
        rig.send((0xD0, 99))  # channel pressure
        assert rig.port("coplayer tenor").sent()[-1] == (0xD2, 99)


def test_sequenced_controllers_with_nothing_sounding_go_to_every_part():
    with Rig() as rig:
        rig.send((CC, 0, 1))  # bank select
        assert all(rig.sent(f"coplayer {p}", (CC,)) for p in PARTS)


def test_controllers_are_not_forwarded_when_switched_off():
    with Rig("midi.forward_controllers=false") as rig:
        rig.send((ON, 76, 100), (CC, 64, 127), (BEND, 0, 70), (0xA0, 76, 3))
        assert rig.sent("coplayer soprano", (CC, BEND, 0xA0)) == []


def test_mirror_tracks_what_each_target_was_told():
    a, b = (Target(p, MemoryOutput(p), i) for i, p in enumerate("ab"))
    mirror = ControllerMirror()
    assert mirror.targets((0xB0, 64, 127), {a}, [a, b]) == [a]
    mirror.told(a, (0xB0, 64, 127))
    assert mirror.catch_up(0, b) == [(0xB0, 64, 127)] and mirror.catch_up(0, a) == []
    assert mirror.targets((0xB0, 64, 0), {b}, [a, b]) == [b, a]


# --- pass-through and clock ----------------------------------------------------------


def test_drum_channel_passes_through_untouched():
    with Rig() as rig:
        rig.send((0x99, 36, 110), (0x89, 36, 0))
        assert rig.notes("coplayer drums") == [(0x99, 36, 110), (0x89, 36, 0)]
        assert all(rig.notes(f"coplayer {p}") == [] for p in PARTS)
        assert rig.scorer.calls == 0 and rig.responder.heard == []


def test_other_messages_pass_through_only_when_configured():
    with Rig() as rig:
        rig.send((0xC0, 5), (0xF0, 1, 2, 0xF7), (0xF6,))
        assert rig.port("coplayer thru").sent() == [(0xC0, 5), (0xF0, 1, 2, 0xF7), (0xF6,)]
    with Rig("midi.passthrough_other=false") as rig:
        rig.send((0xC0, 5), (0xF0, 1, 2, 0xF7))
        assert rig.port("coplayer thru").sent() == []


def test_midi_clock_is_followed_through_the_engine():
    with Rig("tempo.source=clock") as rig:
        period = round(60e9 / (132 * 24))
        t0 = now_ns()
        rig.send((0xFA,), t=t0)
        for i in range(97):
            rig.input.inject((0xF8,), t0 + i * period)
        assert rig.engine.flush()
        assert rig.engine.clock.running
        assert rig.engine.clock.bpm == pytest.approx(132, abs=0.1)
        assert rig.engine.beat_at(t0 + 96 * period) == pytest.approx(4.0, abs=0.01)
        assert rig.port("coplayer thru").sent() == []  # clock is consumed, not passed on


# --- controls ------------------------------------------------------------------------


def test_cc_value_mappings():
    assert cc_temperature(0) == pytest.approx(0.1) and cc_temperature(127) == pytest.approx(2.0)
    assert [cc_mode(v) for v in (0, 42, 43, 85, 86, 127)] == ["instrument"] * 2 + ["respond"] * 2 + ["both"] * 2
    assert cc_response_bars(0) == 1 and cc_response_bars(127) == 16 and cc_response_bars(64) == 8
    assert cc_key_strength(0) == 0 and cc_key_strength(126) == pytest.approx(4.0)
    assert cc_key_strength(127) == HARD_LOCK


def test_cc_controls_steer_the_engine_and_are_not_forwarded():
    with Rig() as rig:
        rig.send((ON, 76, 100))
        rig.send((CC, 21, 127), (CC, 22, 50), (CC, 24, 0), (CC, 25, 63), (CC, 20, 127))
        assert rig.responder.controls.temperature == pytest.approx(2.0)
        assert rig.responder.controls.key_lock == pytest.approx(2.0)
        assert rig.engine.mode == "respond" and rig.responder.mode == "respond"
        assert rig.responder.bars == 1 and "trigger" in rig.responder.events
        assert rig.sent("coplayer soprano", (CC,)) == []
        rig.send((CC, 23, 127))  # panic
        assert rig.all_silent() and "cancel" in rig.responder.events
    assert 99 not in CcControls(rig.cfg.controls, rig.engine)


def test_an_input_with_its_own_thread_is_handled_in_it_in_order():
    """BaseInput.own_thread (coplayer's JACK input): the engine decides in the
    input's thread; a mode change by CC applies to the very next note, and the
    worker's keep-warm steps share the model safely."""
    scorer = WarmedScorer()
    rig = Rig("latency.keep_warm_ms=0.5", scorer=scorer)
    rig.input.own_thread = True
    with rig:
        assert rig.input.on_message == rig.engine._handle_here
        for i in range(200):
            rig.input.inject((ON, 76, 100))
            rig.input.inject((OFF, 76, 0))
            if i % 50 == 0:
                time.sleep(0.01)  # rests: keep-warm steps run on the worker
        rig.input.inject((CC, 22, 50))  # mode respond: the next note goes through
        rig.input.inject((ON, 40, 90))
        rig.input.inject((OFF, 40, 0))
        assert rig.engine.mode == "respond"
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100), (0x80, 76, 0)] * 200
        assert rig.notes("coplayer thru") == [(0x90, 40, 90), (0x80, 40, 0)]
        assert rig.notes("coplayer bass") == []
    assert scorer.warmed > 0 and rig.all_silent()


def test_a_message_from_the_inputs_own_thread_after_stop_sends_nothing():
    """The JACK reader may still deliver a note-on while the engine stops:
    once the notes are released, it is ignored, not left sounding."""
    rig = Rig()
    rig.input.own_thread = True
    with rig:
        rig.input.inject((ON, 76, 100))
    calls, counts = rig.scorer.calls, dict(rig.engine.counts)
    rig.engine._handle_here((ON, 40, 90), 0)  # as if delivered just after the input closed
    assert rig.scorer.calls == calls and dict(rig.engine.counts) == counts  # not decided, not sent
    assert rig.notes("coplayer bass") == []
    assert rig.all_silent()


def test_panic_releases_everything_and_later_note_offs_stay_quiet():
    with Rig() as rig:
        rig.send((ON, 76, 100), (ON, 40, 100), (CC, 64, 127))
        rig.responder.answer("alto", 62)
        rig.engine.panic()
        assert rig.engine.flush() and rig.all_silent()
        assert (0xB3, 123, 0) in rig.port("coplayer bass").sent()
        assert (0xB0, 64, 0) in rig.port("coplayer soprano").sent()
        before = len(rig.port("coplayer soprano").sent())
        rig.send((OFF, 76, 0))
        assert len(rig.port("coplayer soprano").sent()) == before
        assert rig.engine.stats()["panics"] == 1


def test_osc_handlers_reach_the_engine(tmp_path):
    with Rig(f"session.directory={tmp_path}") as rig:
        osc = OscControl(osc_handlers(rig.engine))
        assert osc.dispatch("/coplayer/mode", ["instrument"])
        assert osc.dispatch("/coplayer/temperature", [0.5])
        assert osc.dispatch("/coplayer/top_p", [0.8])
        assert osc.dispatch("/coplayer/tempo", [90])
        assert osc.dispatch("/coplayer/key", ["D minor"])
        assert osc.dispatch("/coplayer/key_strength", [1.5])
        assert osc.dispatch("/coplayer/part/alto/mute", [1])
        assert osc.dispatch("/coplayer/part/bass/solo", [1.0])
        assert osc.dispatch("/coplayer/trigger")
        assert rig.engine.flush()
        assert rig.engine.mode == "instrument" and rig.engine.clock.bpm == 90
        c = rig.responder.controls
        assert (c.temperature, c.top_p, str(c.key), c.key_lock) == (0.5, 0.8, "D minor", 1.5)
        snap = rig.engine.snapshot()
        assert [(p["muted"], p["solo"]) for p in snap["parts"]][1:] == [(True, False), (False, False),
                                                                        (False, True)]
        assert not osc.dispatch("/coplayer/part/violin/mute", [1])  # unknown part: logged, ignored
        assert not osc.dispatch("/coplayer/mode", ["loud"])
        assert not osc.dispatch("/coplayer/key", ["H major"])
        assert osc.ignored["handler error"] == 3
        rig.send((ON, 76, 100), (OFF, 76, 0))
        assert osc.dispatch("/coplayer/record")
        assert osc.dispatch("/coplayer/panic")
        assert rig.engine.flush()
        assert len(list(tmp_path.glob("session-*.mid"))) == 1


@pytest.mark.parametrize("address, sent, key, attribute", [
    ("/coplayer/temperature", 3e38, "continuation.temperature", "temperature"),
    ("/coplayer/temperature", 0.0, "continuation.temperature", "temperature"),
    ("/coplayer/top_p", 7.0, "continuation.top_p", "top_p"),
    ("/coplayer/key_strength", -1.0, "continuation.key_strength", "key_lock"),
    ("/coplayer/key_strength", 1e9, "continuation.key_strength", "key_lock"),
    ("/coplayer/tempo", 5000, "tempo.bpm", None),
    ("/coplayer/tempo", 1, "tempo.bpm", None),
])
def test_a_live_value_is_clamped_to_its_configuration_range_with_one_warning(address, sent, key, attribute, caplog):
    low, high = value_range(key)
    expected = low if sent < low else high
    with Rig() as rig, caplog.at_level(logging.WARNING, logger="coplayer.engine.engine"):
        osc = OscControl(osc_handlers(rig.engine))
        for _ in range(100):  # a flood warns once
            assert osc.dispatch(address, [sent])
        assert rig.engine.flush()
        found = rig.engine.clock.bpm if attribute is None else getattr(rig.responder.controls, attribute)
    assert found == expected
    warnings = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(warnings) == 1 and f"using {expected:g}" in warnings[0]


def test_a_live_value_that_is_not_a_number_is_refused():
    with Rig() as rig:
        before = rig.responder.controls.temperature
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="not a number"):
                rig.engine.set_temperature(value)
            with pytest.raises(ValueError, match="not a number"):
                rig.engine.set_tempo(value)
        assert rig.responder.controls.temperature == before


def test_a_cc_response_length_stays_in_the_configuration_range():
    assert (cc_response_bars(0), cc_response_bars(127)) == value_range("continuation.response_bars")
    with Rig() as rig:
        rig.engine.set_response_bars(10_000)
        assert rig.engine.response_bars == value_range("continuation.response_bars")[1]


def test_osc_feed_reports_routed_notes():
    class Out:
        def __init__(self):
            self.calls = []
            self.target = ("127.0.0.1", 9)

        def note(self, *a):
            self.calls.append(("note", *a))

        def state(self, *a):
            self.calls.append(("state", *a))

        def stats(self, *a):
            self.calls.append(("stats", *a))

        def ports(self, *a):
            self.calls.append(("ports", *a))

        def close(self):
            pass

    from coplayer.engine.controls import OscFeed

    rig = Rig()
    out = Out()
    rig.engine.osc = OscFeed(out, lambda: rig.engine.stats(recent=True), interval_s=0.1)
    with rig:
        rig.send((ON, 76, 100), (OFF, 76, 0))
        rig.engine.set_mode("respond")
        assert rig.engine.flush()
        time.sleep(0.3)
    assert ("note", "soprano", 76, 100) in out.calls and ("note", "soprano", 76, 0) in out.calls
    assert ("state", "mode", "respond") in out.calls
    assert any(c[0] == "stats" and c[4] == 1 for c in out.calls)
    # Memory ports cannot tell the MIDI server's xruns, skipped cycles, drops or resends.
    assert ("ports", None, None, None, None, 0) in out.calls  # and nothing dropped late


# --- the latency budget --------------------------------------------------------------


def test_slow_model_falls_back_and_counts_misses():
    slow = RuleScorer(rule=lambda p: 3, delay_s=0.006)  # 6 ms > the 3 ms budget; would say bass
    with Rig(scorer=slow, fallback=True) as rig:
        assert rig.engine.flush()  # the worker has warmed the model up
        warmed = slow.calls
        rig.send((ON, 76, 100), (ON, 79, 100), (OFF, 76, 0), (OFF, 79, 0))
        assert slow.calls == warmed  # never asked: its p99 alone breaks the budget
        assert [m for m in rig.notes("coplayer soprano") if m[0] == 0x90] == [(0x90, 76, 100), (0x90, 79, 100)]
        s = rig.engine.stats()
        assert s["misses"] == 2 and s["model_p99_ms"] > 3
        model = rig.engine.decider.model
        assert model.featurizer.last_pitches()[0] == 79  # the model's history holds what was played


def test_queue_delay_counts_against_the_budget():
    lazy = RuleScorer(delay_s=0.0008)
    with Rig(scorer=lazy, fallback=True) as rig:
        assert rig.engine.flush()
        t = now_ns()
        burst = [(ON, 40 + i, 100) for i in range(40)]
        rig.send(*burst, t=t)  # forty notes arriving at once
        s = rig.engine.stats()
        assert s["count"] + s["dropped_late"] == 40 and 0 < s["misses"] < s["count"]
        rig.send(*[(OFF, 40 + i, 0) for i in range(40)])
        assert rig.all_silent()


def test_a_burst_loses_no_note_off():
    """A thousand notes at once: those that waited past the budget are dropped
    (late is worse than never), every note played is ended."""
    with Rig("latency.budget_ms=100") as rig:
        t = now_ns()
        for i in range(1000):
            rig.input.inject((ON, 36 + i % 48, 1 + i % 127), t)
            rig.input.inject((OFF, 36 + i % 48, 0), t)
        assert rig.engine.flush(timeout=30)
        ons = sum(1 for n in rig.hub.outputs for m in rig.notes(n) if m[0] & 0xF0 == ON)
        offs = sum(1 for n in rig.hub.outputs for m in rig.notes(n) if m[0] & 0xF0 == OFF)
        assert ons == offs > 0 and rig.all_silent()
        s = rig.engine.stats()
        assert s["count"] == ons and s["count"] + s["dropped_late"] == 1000


def test_a_note_on_that_waited_past_the_budget_is_dropped_counted_and_its_note_off_sends_nothing(tmp_path):
    with Rig() as rig:
        stale = now_ns() - 2 * rig.engine._stale_ns
        rig.send((ON, 76, 100), (0xF0, 1, 2, 0xF7), t=stale)
        rig.send((OFF, 76, 0))
        assert rig.notes("coplayer soprano") == [] and rig.engine.stats()["dropped_late"] == 2
        assert rig.port("coplayer thru").sent() == []  # the SysEx was not passed through late either
        rig.send((ON, 76, 100), (0xF0, 1, 2, 0xF7))  # on time: played
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100)]
        assert rig.engine.stats()["count"] == 1
    played = mido.MidiFile(rig.engine.write_session(tmp_path / "s.mid")).tracks[-1]
    assert sum(1 for m in played if m.type == "note_on" and m.velocity) == 2  # the player's, dropped or not


def test_a_note_on_whose_decision_ends_past_the_bound_is_not_played_nor_its_note_off():
    with Rig(scorer=RuleScorer(delay_s=0.02)) as rig:  # a model step of 20 ms, no fallback
        rig.send((ON, 76, 100), (OFF, 76, 0))
        assert rig.notes("coplayer soprano") == [] and rig.all_silent()
        s = rig.engine.stats()
        assert s["dropped_late"] == 1 and s["count"] == 0


def test_a_note_off_of_a_sounding_note_passes_however_late():
    with Rig() as rig:
        rig.send((ON, 76, 100), (ON, 40, 90), (CC, 64, 127))
        long_ago = now_ns() - 10_000_000_000
        rig.send((OFF, 76, 0), (ON, 40, 0), (CC, 64, 0), t=long_ago)
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100), (0x80, 76, 0)]
        assert rig.notes("coplayer bass") == [(0x93, 40, 90), (0x83, 40, 0)]
        assert rig.all_silent() and rig.engine.stats()["dropped_late"] == 0


def test_the_stale_time_is_the_budget_plus_the_input_period():
    with Rig("latency.budget_ms=2") as rig:  # memory ports have no period: a millisecond of slack
        assert rig.engine._stale_ns == 3_000_000


def test_failing_model_hands_over_to_the_fallback():
    broken = RuleScorer(fail_on=90)  # a pitch the warm-up does not play
    with Rig(scorer=broken, fallback=True) as rig:
        rig.send((ON, 89, 100), (ON, 90, 100), (ON, 91, 100))
        assert rig.engine.decider.broken and rig.engine.stats()["misses"] == 2
        assert len([m for n in rig.hub.outputs for m in rig.notes(n) if m[0] & 0xF0 == ON]) == 3


def test_decider_retries_a_model_that_was_slow():
    clock = [0]
    model = Instrumenter(RuleScorer())
    fallback = Instrumenter(RuleScorer(rule=lambda p: 3))
    d = Decider(model, fallback, budget_ns=3_000_000, now=lambda: clock[0], t0_ns=0, retry_ns=10_000_000_000)
    d.steps.add(5_000_000, 0)
    assert d.decide(76, 100, 0) == ("bass", True)
    d.commit()
    clock[0] = 11_000_000_000  # the estimate is stale: the model gets a chance
    assert d.decide(77, 100, clock[0]) == ("soprano", False)


# --- safety --------------------------------------------------------------------------


class WarmedScorer(RuleScorer):
    """A RuleScorer that counts the engine's keep-warm steps."""

    def __init__(self) -> None:
        super().__init__()
        self.warmed = 0

    def warm(self, pitch, feats) -> None:
        self.warmed += 1


@pytest.mark.parametrize("keep_warm_ms", [2.0, 0.0])
def test_a_rest_keeps_the_model_warm_unless_switched_off(keep_warm_ms):
    scorer = WarmedScorer()
    with Rig(f"latency.keep_warm_ms={keep_warm_ms}", scorer=scorer) as rig:
        rig.send((ON, 76, 100), (OFF, 76, 0))
        time.sleep(0.1)
        rig.send((ON, 40, 90), (OFF, 40, 0))
        assert rig.notes("coplayer bass") == [(0x93, 40, 90), (0x83, 40, 0)]
    assert (scorer.warmed > 5) if keep_warm_ms else (scorer.warmed == 0)


def test_keep_warm_stops_after_a_long_rest_and_resumes_with_the_next_note():
    scorer = WarmedScorer()
    with Rig("latency.keep_warm_ms=2", "latency.keep_warm_for_s=0.1", scorer=scorer) as rig:
        rig.send((ON, 76, 100), (OFF, 76, 0))
        time.sleep(0.3)
        rested = scorer.warmed
        assert rested > 5  # warm through the first 0.1 s of the rest
        time.sleep(0.2)
        assert scorer.warmed == rested  # then nothing: a long rest costs nothing
        rig.send((ON, 40, 90), (OFF, 40, 0))
        time.sleep(0.05)
        assert scorer.warmed > rested
        assert rig.notes("coplayer bass") == [(0x93, 40, 90), (0x83, 40, 0)]


def test_under_jack_the_idle_ticks_stop_after_a_long_rest_and_resume_with_the_next_note(jack_server):
    """The same with coplayer's JACK input, whose idle ticks (not the worker)
    keep the model warm: they are switched off and on again."""
    import os
    import subprocess

    from coplayer.io import jack_backend

    if not jack_backend.available():
        pytest.skip("coplayer's JACK client is not built (no C compiler at install time)")
    scorer = WarmedScorer()
    cfg = config("latency.keep_warm_ms=2", "latency.keep_warm_for_s=0.1")
    name = f"cpwarm{os.getpid()}"
    inp = jack_backend.JackInput("in", virtual=True, client_name=name)
    out = jack_backend.JackOutput("play", virtual=True, client_name=name + "p")
    subprocess.run(["jack_connect", f"{name}p:play", f"{name}:in"], check=True, timeout=10)
    ports = MemoryPorts()
    engine = Engine(cfg, open_outputs(cfg, ports), Instrumenter(scorer), input=inp).start()
    try:
        assert engine._warm_s is None  # the input's ticks do it
        out.send((ON, 76, 100))
        out.send((OFF, 76, 0))
        time.sleep(0.3)
        rested = scorer.warmed
        assert rested > 5
        time.sleep(0.2)
        assert scorer.warmed == rested
        out.send((ON, 40, 90))
        out.send((OFF, 40, 0))
        time.sleep(0.05)
        assert scorer.warmed > rested
    finally:
        engine.stop()
        inp.close()
        out.close()
    assert [m for m in ports.hub.output("coplayer bass").sent() if m[0] & 0xF0 in (ON, OFF)] == [
        (0x93, 40, 90), (0x83, 40, 0)]


def test_a_note_is_sent_before_its_decision_becomes_history():
    """The featurizer's bookkeeping (Instrumenter.commit) runs after the send,
    and runs even if the send fails: the next note is decided as usual."""
    with Rig(scorer=RuleScorer()) as rig:
        featurizer = rig.engine.decider.model.featurizer
        port = rig.port("coplayer soprano")
        pending_at_send, send = [], port.send

        def spy(msg):
            if msg[0] & 0xF0 == ON:
                pending_at_send.append(featurizer._pending is not None)
            return send(msg)

        port.send = spy
        rig.send((ON, 76, 100), (OFF, 76, 0))
        assert pending_at_send == [True] and featurizer._pending is None
        assert featurizer.last_pitches()[0] == 76

        def broken(msg):
            raise RuntimeError("the port broke")

        port.send = broken
        rig.send((ON, 77, 100))  # the engine logs the error and goes on
        port.send = send
        rig.send((OFF, 77, 0), (ON, 79, 100), (OFF, 79, 0))
        assert featurizer._pending is None and featurizer.last_pitches()[0] == 79
        assert rig.notes("coplayer soprano")[-2:] == [(0x90, 79, 100), (0x80, 79, 0)]


def test_an_exception_in_the_worker_is_logged_and_the_engine_goes_on(caplog):
    with Rig(scorer=RuleScorer(fail_on=61)) as rig:
        with caplog.at_level(logging.ERROR):
            rig.send((ON, 61, 100), (ON, 76, 100), (OFF, 61, 0), (OFF, 76, 0))
        assert "model exploded on pitch 61" in caplog.text and "90 3D 64" in caplog.text
        assert rig.notes("coplayer soprano") == [(0x90, 76, 100), (0x80, 76, 0)]
        assert rig.engine.stats()["errors"] == 1


def test_a_failing_port_is_logged_once_and_the_others_go_on(caplog):
    rig = Rig()
    with rig, caplog.at_level(logging.ERROR):
        rig.port("coplayer alto").fail = True
        rig.send((ON, 64, 100), (ON, 65, 100), (ON, 76, 100), (ON, 40, 100))
        assert caplog.text.count("'coplayer alto' failed") == 1
        rig.engine.panic()
        assert rig.engine.flush()
    assert all(not rig.port(f"coplayer {p}").sounding() for p in ("soprano", "tenor", "bass"))
    assert all(p.closed for p in rig.hub.outputs.values())


def test_stop_releases_every_note_and_sends_all_notes_off():
    rig = Rig()
    with rig:
        rig.send((ON, 76, 100), (ON, 64, 100), (ON, 50, 100), (ON, 40, 100), (CC, 64, 127), (0x99, 36, 100))
        rig.send((ON, 50, 0))
        rig.responder.answer("tenor", 55)
        rig.input.inject((ON, 77, 100))  # still queued when stop comes: routed, then released
    assert "stop" in rig.responder.events
    assert rig.all_silent() and all(p.closed for p in rig.hub.outputs.values())
    for i, part in enumerate(PARTS):
        sent = rig.port(f"coplayer {part}").sent()
        assert (0xB0 | i, 123, 0) in sent
    assert (0xB0, 64, 0) in rig.port("coplayer soprano").sent()
    assert rig.input.closed


def test_responder_notes_obey_mute_and_are_released():
    with Rig() as rig:
        rig.engine.mute("tenor")
        assert rig.engine.flush()
        rig.responder.answer("tenor", 55)
        rig.responder.answer("alto", 62)
        rig.engine.play("tenor", (0x80, 55, 0), now_ns())
        assert rig.notes("coplayer tenor") == []
        rig.engine.mute("alto")
        assert rig.engine.flush() and rig.notes("coplayer alto") == [(0x91, 62, 70), (0x81, 62, 0)]
        rig.responder.cancel()  # its note-off for alto 62: already sent, not again
        assert rig.notes("coplayer alto") == [(0x91, 62, 70), (0x81, 62, 0)]
        rig.engine.play("violin", (0x90, 60, 1), now_ns())  # not a part: ignored
        assert rig.engine.stats()["bad_responder_messages"] == 1


def test_an_answer_stops_before_the_players_note_of_its_pitch_goes_out():
    with Rig() as rig:
        rig.responder.answer("alto", 62)
        rig.send((ON, 62, 100))  # the player takes the same part and pitch
        assert rig.notes("coplayer alto") == [(0x91, 62, 70), (0x81, 62, 0), (0x91, 62, 100)]
        assert rig.responder.events[-1] == "yield" and rig.responder.heard == [("on", 62, 100, "alto")]
        rig.send((OFF, 62, 0))
        assert rig.notes("coplayer alto")[-1] == (0x81, 62, 0) and rig.all_silent()


# --- the feedback guard --------------------------------------------------------------


def test_feedback_from_a_monitored_part_is_dropped_with_one_warning(caplog):
    with Rig() as rig, caplog.at_level(logging.WARNING):
        rig.hub.connect("coplayer alto", rig.input)  # a DAW track monitoring the alto
        rig.hub.connect("coplayer soprano", rig.input)  # soprano plays on the input's own channel
        rig.send((ON, 64, 100), (ON, 76, 100), (CC, 64, 127))
        assert rig.engine.flush()
        rig.send((OFF, 64, 0), (OFF, 76, 0), (CC, 64, 0))
        assert rig.engine.flush()
        assert [m for m in rig.notes("coplayer alto")] == [(0x91, 64, 100), (0x81, 64, 0)]
        assert [m for m in rig.notes("coplayer soprano")] == [(0x90, 76, 100), (0x80, 76, 0)]
        assert rig.engine.stats()["count"] == 2
        assert rig.engine.stats()["feedback"] >= 4
        assert caplog.text.count("came back on its input") == 1
        rig.send((ON, 76, 100))  # the player plays the key again: not an echo
        assert rig.notes("coplayer soprano")[-1] == (0x90, 76, 100)
        rig.send((OFF, 76, 0))
    assert rig.all_silent()


def test_feedback_guard_unit():
    guard = FeedbackGuard(window_ns=30_000_000)
    guard.sent((0x91, 60, 100), 1000, source=(0, 60), source_ns=900)  # the alto's copy of the player's C4
    assert guard.is_echo((0x91, 60, 100), 2000, lambda c, p: True)
    assert not guard.is_echo((0x91, 60, 100), 500, lambda c, p: True)  # arrived before it was sent
    assert not guard.is_echo((0x91, 60, 100), 40_000_000, lambda c, p: True)  # too late to be an echo
    guard.sent((0x90, 62, 100), 50_000_000, source=(0, 62), source_ns=49_999_000)  # on the player's own channel
    assert guard.is_echo((0x90, 62, 100), 50_001_000, lambda c, p: True)
    assert not guard.is_echo((0x80, 62, 0), 50_002_000, lambda c, p: True)  # the player lets go
    guard.sent((0x80, 62, 0), 50_002_100, source=None)
    assert guard.is_echo((0x80, 62, 0), 50_002_200, lambda c, p: False)  # the echo's note-off
    guard.sent((0x90, 64, 100), 60_000_000, source=(0, 64), source_ns=59_999_000)
    assert not guard.is_echo((0x80, 64, 0), 60_001_000, lambda c, p: True)
    assert not guard.is_echo((0x90, 64, 100), 60_002_000, lambda c, p: False)  # struck again
    # a backlog: the copy of a key struck at 70 ms left at 75 ms; the key was released at
    # 72 ms and struck again at 76 ms (arrival times): a new strike, not an echo
    guard.sent((0x90, 65, 100), 75_000_000, source=(0, 65), source_ns=70_000_000)
    assert not guard.is_echo((0x80, 65, 0), 72_000_000, lambda c, p: True)
    assert not guard.is_echo((0x90, 65, 100), 76_000_000, lambda c, p: False)
    assert guard.dropped == 3


def test_router_pairs_and_silences():
    router, port = Router(), MemoryOutput("x")
    a, b = Target("a", port, 0), Target("b", port, 1)
    router.note_on(0, 60, a, True)
    router.note_on(0, 60, b, True)
    assert router.sounding() == {a, b}
    assert [h.target for h in router.silence(lambda t: t is a)] == [b]
    assert router.note_off(0, 60).target is a and not router.note_off(0, 60).sounded
    assert router.note_off(0, 60) is None and len(router) == 0


# --- session and view ----------------------------------------------------------------


def test_session_file_has_a_named_track_per_part_and_the_input(tmp_path):
    clock = InternalClock(120)
    with Rig(clock=clock) as rig:
        t = now_ns()
        rig.send((ON, 76, 100), t=t)
        rig.send((ON, 40, 90), t=t + 250_000_000)
        rig.send((OFF, 76, 0), t=t + 500_000_000)
        rig.responder.answer("alto", 62)
        rig.send((0x99, 36, 100), t=t + 600_000_000)
    path = rig.engine.write_session(tmp_path / "s.mid")
    mid = mido.MidiFile(path)
    names = [t.name for t in mid.tracks]
    assert names == ["coplayer session", "soprano", "alto", "tenor", "bass", "input"]

    def ons(track):
        return [(m.channel, m.note) for m in track if m.type == "note_on" and m.velocity]

    tracks = dict(zip(names, mid.tracks))
    assert ons(tracks["soprano"]) == [(0, 76)] and ons(tracks["bass"]) == [(3, 40)]
    assert ons(tracks["alto"]) == [(1, 62)]  # the answer
    assert ons(tracks["input"]) == [(0, 76), (0, 40), (9, 36)]
    on = off = 0
    for m in tracks["soprano"]:
        on += m.time if m.type == "note_on" and not off and not on else 0
        if m.type == "note_off" or (m.type == "note_on" and not m.velocity):
            off = m.time
    assert off == pytest.approx(mid.ticks_per_beat, abs=2)  # held for half a second at 120 BPM


def test_record_writes_at_most_one_file_per_interval_and_says_so_once(tmp_path, caplog):
    """1,000 /coplayer/record a second for 5 s once wrote 843 files."""
    states = []
    with Rig(f"session.directory={tmp_path}") as rig:
        rig.engine._state = lambda key, value: states.append((key, value))
        rig.send((ON, 76, 100), (OFF, 76, 0))
        first = rig.engine.record()
        assert [rig.engine.record() for _ in range(200)] == [None] * 200
    assert list(tmp_path.glob("session-*.mid")) == [first]
    assert caplog.text.count("no snapshot written") == 1 and "at most one every 5 s" in caplog.text
    assert states[0] == ("record", str(first)) and len(states) == 201
    assert states[-1][1].startswith("refused: the last one was written")
    assert rig.engine.stats()["records_refused"] == 200


def test_record_false_keeps_no_note_and_record_says_so_once(tmp_path, caplog):
    with Rig(f"session.directory={tmp_path}", "session.record=false") as rig:
        for pitch in range(60, 72):
            rig.send((ON, pitch, 100), (OFF, pitch, 0))
        assert rig.engine.record() is None and rig.engine.record() is None
    assert len(rig.engine.recorder) == 0 and list(tmp_path.iterdir()) == []
    assert caplog.text.count("session.record is false: coplayer keeps no recording") == 1


def test_record_refuses_a_new_file_past_the_folders_budget(tmp_path, caplog):
    (tmp_path / "session-old.mid").write_bytes(b"\0" * 1_200_000)
    with Rig(f"session.directory={tmp_path}", "session.max_mb=1") as rig:
        assert rig.engine.record() is None
    assert [p.name for p in tmp_path.iterdir()] == ["session-old.mid"]  # nothing written, nothing deleted
    assert "holds 1 MB, session.max_mb is 1 (coplayer deletes no recording" in caplog.text


def test_record_into_a_folder_that_cannot_be_written_is_one_line(tmp_path, caplog):
    (tmp_path / "taken").write_text("")
    with Rig(f"session.directory={tmp_path / 'taken'}") as rig:
        assert rig.engine.record() is None
    assert "is a file, not a folder" in caplog.text and "Traceback" not in caplog.text
    assert rig.engine.stats()["records_failed"] == 1


def test_session_path_is_new_each_time(tmp_path):
    first = session_path(tmp_path, stamp=0)
    first.write_bytes(b"")
    second = session_path(tmp_path, stamp=0)
    assert first != second and second.name.endswith("-2.mid")


def test_live_view_renders_parts_and_latency():
    with Rig() as rig:
        rig.send((ON, 76, 100), (ON, 60, 80))
        lines = render(rig.engine.snapshot())
    text = "\n".join(lines)
    assert "mode both" in text and "p99" in text and "misses 0" in text
    assert any(line.strip().startswith("soprano") and "E5" in line for line in lines)
    assert "responses played 0" in text and "gen_ms" not in text


def test_one_slow_step_does_not_bench_the_model():
    clock = [0]
    model = Instrumenter(RuleScorer())
    fallback = Instrumenter(RuleScorer(rule=lambda p: 3))
    d = Decider(model, fallback, budget_ns=3_000_000, now=lambda: clock[0], t0_ns=0)
    for i in range(20):
        d.steps.add(200_000, i)
    d.steps.add(5_000_000, 20)  # preempted once
    assert d.decide(77, 100, clock[0]) == ("soprano", False)
    for i in range(20):  # slow on every step now: benched
        d.steps.add(5_000_000, 21 + i)
    assert d.decide(78, 100, clock[0]) == ("bass", True)


def test_notes_the_fallback_routed_keep_the_model_estimate_current():
    clock = [0]

    class Ticking(RuleScorer):  # each model step takes 0.1 ms of the fake clock
        def log_probs(self, *args):
            clock[0] += 100_000
            return super().log_probs(*args)

    model = Instrumenter(Ticking())
    fallback = Instrumenter(RuleScorer(rule=lambda p: 3))
    d = Decider(model, fallback, budget_ns=3_000_000, now=lambda: clock[0], t0_ns=0)
    for i in range(4):  # slow while the system was busy
        d.steps.add(5_000_000, 0)
    assert d.decide(76, 100, clock[0]) == ("bass", True)
    misses = 0
    for i in range(40):  # the model hears each note the fallback routed: 0.1 ms steps, timed
        misses += d.decide(50 + i % 20, 100, clock[0])[1]
        d.commit()
    assert d.steps.estimate_ns == 100_000 and d.decide(77, 100, clock[0]) == ("soprano", False)
    assert misses < 40


def test_a_clean_start_comes_first_on_every_output_and_can_be_switched_off():
    with Rig() as rig:  # Rig checks the clean start of every output, then clears it
        assert rig.port("coplayer soprano").sent() == [(0xC0, 40)]
        assert rig.port("coplayer thru").sent() == []
    with Rig("midi.clean_start=false") as rig:
        assert rig.port("coplayer soprano").sent() == [(0xC0, 40)]
        assert rig.port("coplayer drums").sent() == []


class NoVirtualMemoryPorts(MemoryPorts):
    """In-memory ports on a MIDI system without virtual ports (Windows' WinMM):
    only ports that exist (here: any name not asked for as virtual) open."""

    def output(self, name: str, virtual: bool):
        from coplayer.io.ports import NoVirtualPorts

        if virtual:
            raise NoVirtualPorts(f"cannot open virtual output {name!r}")
        return super().output(name, virtual)


def test_without_virtual_ports_named_parts_play_and_thru_and_drums_are_left_out_with_one_line(caplog):
    named = [f"parts[{i}].port=loopMIDI {i}" for i in range(4)]
    outputs = open_outputs(config(*named), NoVirtualMemoryPorts())
    assert [t.port.name for t in outputs.parts.values()] == [f"loopMIDI {i}" for i in range(4)]
    assert outputs.thru is None and outputs.drums is None
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelno == logging.WARNING] == [
        "no coplayer thru port", "no coplayer drums port"]


def test_without_virtual_ports_channels_mode_plays_into_the_named_existing_port():
    outputs = open_outputs(config("midi.output_mode=channels", "midi.output_port=loopMIDI Port"),
                           NoVirtualMemoryPorts())
    assert {t.port.name for t in outputs.parts.values()} == {"loopMIDI Port"}
    assert outputs.thru.port is outputs.parts["soprano"].port


def test_without_virtual_ports_an_unnamed_part_is_refused():
    from coplayer.io.ports import NoVirtualPorts

    with pytest.raises(NoVirtualPorts):
        open_outputs(config(), NoVirtualMemoryPorts())
