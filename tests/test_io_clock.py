"""Tempo: the internal clock, and MIDI clock following under jitter."""

from __future__ import annotations

import random

import pytest

from coplayer.config import Tempo
from coplayer.io.clock import InternalClock, MidiClockFollower, make_clock

TICK, START, CONTINUE, STOP = [0xF8], [0xFA], [0xFB], [0xFC]
T0 = 10**12  # an arbitrary origin in ns
BEAT_120 = 500_000_000  # ns per beat at 120 BPM


def ticks(clock, first: int, count: int, beat_ns: float = BEAT_120, jitter_ns: float = 0.0,
          rng: random.Random | None = None, start_ns: int = T0) -> None:
    """Feed ticks number ``first .. first+count-1`` of a steady clock."""
    for k in range(first, first + count):
        noise = rng.uniform(-jitter_ns, jitter_ns) if rng else 0.0
        clock.feed(TICK, int(start_ns + k * beat_ns / 24 + noise))


# --- internal clock --------------------------------------------------------


def test_internal_clock_maps_time_to_beats_and_back():
    clock = InternalClock(120, start_ns=T0)
    assert clock.running and clock.bpm == 120
    assert clock.beat_at(T0 + 3 * BEAT_120) == pytest.approx(3.0)
    assert clock.time_of_beat(2.5) == T0 + int(2.5 * BEAT_120)
    assert clock.feed(TICK, T0) is False


def test_internal_tempo_change_keeps_beats_continuous():
    clock = InternalClock(120, start_ns=T0)
    clock.set_bpm(60, at_ns=T0 + 2 * BEAT_120)  # at beat 2
    assert clock.beat_at(T0 + 2 * BEAT_120) == pytest.approx(2.0)
    assert clock.beat_at(T0 + 4 * BEAT_120) == pytest.approx(3.0)  # one beat per second now
    assert clock.time_of_beat(3.0) == T0 + 4 * BEAT_120


@pytest.mark.parametrize("bpm", [0, -5, float("nan"), float("inf"), "120"])
def test_a_nonsense_tempo_is_refused(bpm):
    with pytest.raises(ValueError, match="BPM"):
        InternalClock(bpm)
    with pytest.raises(ValueError, match="BPM"):
        InternalClock(100).set_bpm(bpm)


# --- following MIDI clock ----------------------------------------------------


def test_default_smoothing_is_the_configured_one():
    assert MidiClockFollower()._window.maxlen == Tempo().clock_smoothing == 48


def test_tempo_within_half_a_bpm_and_beats_within_5ms_after_two_beats_of_jittered_clock():
    worst_bpm = worst_ms = 0.0
    for seed in range(200):
        rng = random.Random(seed)
        clock = MidiClockFollower(bpm=100, smoothing=Tempo().clock_smoothing)
        clock.feed(START, T0 - 1000)
        ticks(clock, 0, 49, jitter_ns=3e6, rng=rng)  # two beats: ticks 0..48
        worst_bpm = max(worst_bpm, abs(clock.bpm - 120))
        for beat in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):  # inside the window and one beat ahead
            t = T0 + int(beat * BEAT_120)
            worst_ms = max(worst_ms, abs(clock.beat_at(t) - beat) * 500, abs(clock.time_of_beat(beat) - t) / 1e6)
    assert worst_bpm < 0.5
    assert worst_ms < 5.0


def test_a_tempo_change_is_followed_within_one_window():
    clock = MidiClockFollower(bpm=120, smoothing=24)
    clock.feed(START, T0 - 1000)
    ticks(clock, 0, 48)
    assert clock.bpm == pytest.approx(120, abs=1e-6)
    ticks(clock, 0, 24, beat_ns=BEAT_120 * 4 / 3, start_ns=T0 + 48 * BEAT_120 // 24)  # 90 BPM
    assert clock.bpm == pytest.approx(90, abs=0.5)


def test_start_puts_beat_zero_on_the_next_tick():
    clock = MidiClockFollower(bpm=120)
    ticks(clock, 0, 30)  # clock running while the transport is stopped
    assert not clock.running and clock.beat_at(T0) == 0.0 and clock.time_of_beat(1) is None
    assert clock.feed(START, T0 + 30 * BEAT_120 // 24 - 1000)
    assert clock.running
    start = T0 + 30 * BEAT_120 // 24  # when tick 30, the first after Start, arrives
    assert clock.beat_at(start - 5_000_000) == 0.0  # not before the first tick
    assert clock.time_of_beat(0) == pytest.approx(start, abs=1000)
    ticks(clock, 30, 25)
    assert clock.beat_at(start + BEAT_120) == pytest.approx(1.0, abs=1e-6)


def test_stop_freezes_the_position_and_continue_resumes_it():
    clock = MidiClockFollower(bpm=120)
    clock.feed(START, T0 - 1000)
    ticks(clock, 0, 36)  # ticks at positions 0..35: one and a half beats
    clock.feed(STOP, T0 + 36 * BEAT_120 // 24 - 1000)
    assert not clock.running
    frozen = clock.beat_at(T0 + 100 * BEAT_120)
    assert frozen == pytest.approx(1.5)
    assert clock.time_of_beat(2) is None
    ticks(clock, 36, 24)  # the clock keeps ticking while stopped: no movement
    assert clock.beat_at(T0 + 100 * BEAT_120) == frozen
    clock.feed(CONTINUE, T0 + 60 * BEAT_120 // 24 - 1000)
    ticks(clock, 60, 12)  # position 36 is the first tick after Continue
    assert clock.beat_at(T0 + 60 * BEAT_120 // 24) == pytest.approx(1.5, abs=1e-6)
    assert clock.beat_at(T0 + 71 * BEAT_120 // 24) == pytest.approx(47 / 24, abs=1e-6)


def test_song_position_pointer_moves_the_next_start_point():
    clock = MidiClockFollower(bpm=120)
    assert clock.feed([0xF2, 16, 0], T0)  # 16 sixteenths = 4 beats
    assert clock.beat_at(T0) == 4.0
    clock.feed(CONTINUE, T0 + 1000)
    ticks(clock, 1, 24)
    assert clock.beat_at(T0 + BEAT_120 // 24) == pytest.approx(4.0, abs=1e-6)
    assert clock.beat_at(T0 + 13 * BEAT_120 // 24) == pytest.approx(4.5, abs=1e-6)
    ticks(clock, 25, 6)
    clock.feed([0xF2, 0, 1], T0 + 30 * BEAT_120 // 24 + 1000)  # 128 sixteenths, while running
    ticks(clock, 31, 1)
    assert clock.beat_at(T0 + 31 * BEAT_120 // 24) == pytest.approx(32.0, abs=1e-6)


def test_a_pause_in_the_clock_starts_a_new_fit_and_keeps_the_tempo():
    clock = MidiClockFollower(bpm=100, smoothing=24)
    clock.feed(START, T0 - 1000)
    ticks(clock, 0, 48)
    later = T0 + 60 * 10**9
    ticks(clock, 0, 2, start_ns=later)  # the sender resumes a minute later
    assert clock.bpm == pytest.approx(120, abs=1e-6)
    assert clock.beat_at(later + BEAT_120 // 24) == pytest.approx((48 + 1) / 24, abs=1e-6)


def test_only_clock_and_transport_messages_are_taken():
    clock = MidiClockFollower(bpm=97)
    assert clock.feed([0x90, 60, 100], T0) is False
    assert clock.feed([0xF2, 1], T0) is False  # a truncated song position
    assert clock.feed([], T0) is False
    assert clock.bpm == pytest.approx(97) and clock.ticks == 0
    clock.set_bpm(80)
    assert clock.bpm == pytest.approx(80)


def test_make_clock_follows_the_tempo_source():
    assert isinstance(make_clock("internal", 100), InternalClock)
    follower = make_clock("clock", 100, smoothing=12)
    assert isinstance(follower, MidiClockFollower) and follower._window.maxlen == 12
    with pytest.raises(ValueError, match="tempo source"):
        make_clock("ableton link", 100)
