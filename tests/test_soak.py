"""The soak benchmark's bookkeeping (no JACK needed): the session played,
/proc parsing, per-minute buckets and the targets of issue 21."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

from coplayer.bench import CC, is_off, is_on

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
MODULE = "benchmarks_soak"


def load_soak():
    """benchmarks/soak.py as a module (benchmarks/ is scripts, not a package)."""
    if MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(MODULE, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[MODULE]


@pytest.fixture(scope="module")
def soak():
    return load_soak()


STATUS = """Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t  912340 kB
VmSize:\t  850112 kB
VmHWM:\t  101204 kB
VmRSS:\t   98765 kB
RssAnon:\t   60000 kB
"""


def test_rss_is_read_from_vmrss_not_the_other_vm_lines(soak):
    assert soak.rss_kb(STATUS) == 98765
    assert soak.rss_kb(STATUS.replace("VmRSS", "VmXXX")) is None  # a zombie has none


def test_cpu_time_is_utime_plus_stime_even_with_a_command_name_holding_spaces_and_parentheses(soak):
    rest = "S 1 2 3 0 -1 4194560 100 0 0 0 1234 567 8 9 20 0 3 0 55 1000 200"
    assert soak.cpu_ticks(f"4242 (python3) {rest}") == 1234 + 567
    assert soak.cpu_ticks(f"4242 (a (b) c) {rest}") == 1234 + 567


def test_this_process_has_memory_and_processor_time(soak):
    rss, cpu = soak.read_process(os.getpid())
    assert rss > 1000 and cpu > 0
    assert soak.read_process(2**22 + 12345) == (None, None)  # above pid_max: no such process


def test_a_time_falls_in_its_minute_and_the_end_stragglers_in_the_last(soak):
    assert [soak.bucket_of(t, 60.0, 3) for t in (0.0, 59.9, 60.0, 179.0, 185.0, -0.001)] == [0, 0, 1, 2, 2, 0]
    assert soak.bucket_count(600.0, 60.0) == 10
    assert soak.bucket_count(620.0, 60.0) == 10  # 20 s too few for a p99 of their own: in the last minute
    assert soak.bucket_count(640.0, 60.0) == 11
    assert soak.bucket_count(12.0, 60.0) == 1


def sample(soak, t, rss=None, cpu=None, xruns=None):
    return soak.Sample(t, rss, cpu, rss, cpu, xruns, xruns, 0)


def test_cpu_percent_and_xruns_per_minute_come_from_the_samples_at_its_edges(soak):
    samples = [sample(soak, t, 1000, cpu, x) for t, cpu, x in ((0, 0.0, 0), (30, 3.0, 1), (60, 6.0, 4),
                                                                (90, 21.0, 4), (120, 36.0, 9))]
    assert soak.cpu_percent(samples, "cpu_s", 0, 60) == pytest.approx(10.0)
    assert soak.cpu_percent(samples, "cpu_s", 60, 120) == pytest.approx(50.0)
    assert soak.change(samples, "xruns", 60, 120) == (5, 60)
    assert soak.change([sample(soak, 0), sample(soak, 5)], "xruns", 0, 60) is None  # unknown


def test_rss_growth_counts_from_the_first_sample_after_the_warm_up(soak):
    kb = [50_000, 80_000, 90_000, 90_500, 93_000, 91_000]
    samples = [sample(soak, 10.0 * i, v, 0.0) for i, v in enumerate(kb)]
    got = soak.rss_growth(samples, "rss_kb", 20.0)
    assert got == {"warm_kb": 90_000, "end_kb": 91_000, "max_kb": 93_000, "growth_mb": round(1000 / 1024, 3)}
    assert soak.rss_growth(samples, "rss_kb", 100.0)["growth_mb"] is None


def test_targets_hold_and_fail_each_on_its_own(soak):
    assert soak.targets(1.9, 2.0, 2.2, 0) == {"rss_growth": True, "p99_last_vs_first": True, "no_stuck": True}
    assert soak.targets(2.0, 2.0, 1.0, 0)["rss_growth"] is False
    assert soak.targets(0.0, 2.0, 2.21, 0)["p99_last_vs_first"] is False
    assert soak.targets(0.0, 2.0, 2.0, 1)["no_stuck"] is False
    assert soak.targets(None, None, 2.0, 0) == {"rss_growth": None, "p99_last_vs_first": None, "no_stuck": True}


def test_per_minute_figures_count_each_note_in_its_minute(soak):
    origin = 1_000_000_000
    ms = 1_000_000
    sent = [(origin + 10_000 * ms, (0x90, 60, 90)), (origin + 10_200 * ms, (0x80, 60, 0)),
            (origin + 70_000 * ms, (0x90, 62, 90)), (origin + 70_100 * ms, (0x90, 64, 90)),
            (origin + 70_200 * ms, (0x90, 65, 90))]  # lost by everyone: JACK's loss, not coplayer's
    arrived = [("hop", (0x90, 60, 90), origin + 10_000 * ms + 100_000),
               ("soprano", (0x90, 60, 90), origin + 10_000 * ms + 2 * ms),
               ("floor", (0x90, 60, 90), origin + 10_000 * ms + ms),
               ("hop", (0x90, 62, 90), origin + 70_000 * ms + 100_000),
               ("floor", (0x90, 62, 90), origin + 70_000 * ms + ms),  # coplayer lost 62
               ("alto", (0x91, 64, 90), origin + 70_100 * ms + 3 * ms),  # the hop and the bare loop lost 64
               ("tenor", (0x92, 50, 70), origin + 100_000 * ms), ("tenor", (0x82, 50, 0), origin + 100_500 * ms)]
    samples = [sample(soak, t, 1000, cpu, x) for t, cpu, x in ((0, 0.0, 0), (60, 12.0, 2), (120, 18.0, 2))]
    rows = soak.per_bucket(sent, arrived, origin, samples, 120.0, 60.0, [(5.0, 15.0), (65.0, 75.0)])
    assert [r["notes"] for r in rows] == [1, 3]
    assert rows[0]["e2e_p99_ms"] == pytest.approx(2.0) and rows[0]["floor_p99_ms"] == pytest.approx(1.0)
    assert rows[1]["e2e_p99_ms"] == pytest.approx(3.0)
    assert [(r["lost"], r["floor_lost"], r["jack_lost"]) for r in rows] == [(0, 0, 0), (1, 0, 2)]
    assert [r["answers"] for r in rows] == [0, 1]  # the tenor's 50 came in a rest
    assert [r["cpu_pct"] for r in rows] == [20.0, 10.0] and [r["xruns"] for r in rows] == [2, 0]


def test_the_session_is_chords_pedal_and_controllers_at_30_to_50_messages_a_second_with_rests(soak):
    plan = soak.session(300.0, 40.0, random.Random(3))
    msgs = [m for _, m in plan.schedule]
    assert plan.schedule == sorted(plan.schedule, key=lambda e: e[0])
    playing = sum(end - start for start, end in plan.phrases)
    assert 30 <= len(msgs) / playing <= 50
    assert 0.5 < playing / 300.0 < 0.9  # rests between phrases
    rests = [b[0] - a[1] for a, b in zip(plan.phrases, plan.phrases[1:])]
    assert sum(r > 3.0 for r in rests) >= 3 and sum(r < 1.1 for r in rests) >= 3  # answers, and breaths
    starts = sorted(t for t, m in plan.schedule if is_on(m))
    assert sum(b - a < 0.015 for a, b in zip(starts, starts[1:])) > len(starts) / 3  # keys of one chord
    assert {(m[0], m[2]) for m in msgs if m[0] == CC and m[1] == 64} == {(CC, 127), (CC, 0)}
    assert any(m[0] == CC and m[1] == 1 for m in msgs) and any(m[0] & 0xF0 == 0xE0 for m in msgs)


def test_every_key_pedal_wheel_and_bend_is_released_within_its_phrase(soak):
    plan = soak.session(200.0, 50.0, random.Random(8))
    down: dict = {}
    for t, m in plan.schedule:
        assert soak.in_phrases(t, plan.phrases)
        if is_on(m):
            assert m[1] not in down, "a key pressed again before its release"
            down[m[1]] = t
        elif is_off(m):
            del down[m[1]]
    assert not down
    last = {}
    for _, m in plan.schedule:
        last[(m[0], m[1]) if m[0] == CC else m[0]] = m
    assert last[(CC, 64)][2] == 0 and last[(CC, 1)][2] == 0 and last[0xE0][1:] == (0, 64)


def test_notes_between_phrases_are_answers(soak):
    phrases = [(0.0, 5.0), (10.0, 15.0)]
    assert [soak.in_phrases(t, phrases) for t in (-1.0, 0.0, 5.2, 5.4, 9.9, 12.0, 15.5)] == [
        False, True, True, False, False, True, False]
