"""The benchmark's bookkeeping (no JACK needed): stuck notes and who lost them."""

from __future__ import annotations

import random
import threading
import time

from coplayer.bench import (MERGED, SECTIONS, Result, StatsListener, by_section, free_udp_port, is_on,
                            lost_alone, offs_reported, realistic, sounding_after)
from coplayer.io.osc import OscOut


def test_a_stuck_note_ended_by_coplayer_was_lost_after_it():
    arrived = [(MERGED, (0x90, 60, 90), 1), (MERGED, (0x91, 62, 90), 2), (MERGED, (0x81, 62, 0), 3),
               (MERGED, (0x92, 64, 90), 4)]  # soprano 60 and tenor 64 never ended at the peer
    stuck = sounding_after(arrived)
    assert stuck == {(MERGED, 0, 60): 1, (MERGED, 2, 64): 1}
    osc = [("/coplayer/note", ("soprano", 60, 90)), ("/coplayer/note", ("alto", 62, 90)),
           ("/coplayer/note", ("alto", 62, 0)), ("/coplayer/note", ("soprano", 60, 0)),  # sent, lost later
           ("/coplayer/note", ("tenor", 64, 90)), ("/coplayer/stats", (0.1, 0.2, 0.3, 3, 0))]
    assert offs_reported(stuck, osc) == 1  # the tenor's note-off never left coplayer


def test_each_note_of_the_realistic_schedule_falls_in_its_section():
    starts: list[float] = []
    schedule = realistic(400, random.Random(0), starts)
    assert len(starts) == len(SECTIONS) and starts == sorted(starts)
    ons = {i: float(i) for i, (_, m) in enumerate(schedule) if is_on(m)}
    split = by_section(schedule, starts, ons)
    assert [len(split[name]) for name in SECTIONS] == [100, 100, 100, 96]  # 25 four-note chords; 12 bursts of 8
    assert sorted(v for values in split.values() for v in values) == sorted(ons.values())


def test_a_rate_step_says_what_the_single_hop_and_the_bare_loop_lost_beside_coplayer():
    step = {"rate": 1000, "notes": 3000, "lost": 2, "jack_lost": 3, "stuck": 0, "misses": 5, "p99_ms": 4.0,
            "xruns": 7, "floor_lost": 4, "floor_stuck": 1, "ok": False}
    clean = {**step, "lost": 0, "jack_lost": 0, "floor_lost": 0, "floor_stuck": 0, "ok": True}
    lines = Result([1.0], [1.0], 1, 0, 0, 0, [step, clean]).report()
    steps = [line for line in lines if "1000 notes/s" in line]
    assert "lost 2, stuck 0" in steps[0] and "(and 3 lost by the single hop too)" in steps[0]
    assert "(the bare loop: lost 4, stuck 1)" in steps[0] and "7 JACK xruns -> FAIL" in steps[0]
    assert "single hop" not in steps[1] and "bare loop" not in steps[1] and steps[1].endswith("-> ok")


def test_a_rate_step_says_how_many_cycles_jack_skipped_coplayers_client_and_the_benchs():
    step = {"rate": 1000, "notes": 3000, "lost": 9, "jack_lost": 0, "stuck": 2, "misses": 5, "p99_ms": 4.0,
            "xruns": 10, "floor_lost": 0, "floor_stuck": 0, "ok": False, "cp_skipped": 12, "bench_skipped": 0,
            "lost_alone": 9}
    unknown = {**step, "rate": 2000, "cp_skipped": None, "bench_skipped": None}
    lines = Result([1.0], [1.0], 1, 0, 0, 0, [step, unknown], xruns=10, skipped=(3, None)).report()
    [line] = [x for x in lines if "1000 notes/s" in x]
    assert "lost 9 (9 of them the bare loop delivered), stuck 2" in line
    assert "10 JACK xruns; cycles JACK skipped: coplayer's client 12, the bench's 0 -> FAIL" in line
    [line] = [x for x in lines if "2000 notes/s" in x]
    assert "cycles JACK skipped" not in line  # a backend that cannot tell says nothing
    [line] = [x for x in lines if x.startswith("JACK xruns while")]
    assert line.endswith("cycles JACK skipped: coplayer's client 3, the bench's ?")


def test_the_bench_reads_coplayers_port_counts_with_its_stats():
    port = free_udp_port()
    listener = StatsListener(port)

    def send(*ports):
        time.sleep(0.1)
        with OscOut("127.0.0.1", port) as out:
            out.stats(0.5, 0.9, 1.2, 10, 0)
            time.sleep(0.1)  # the ports message comes a little later: fresh_stats waits for it too
            out.ports(*ports)

    try:
        for ports, skipped in (((4, 17, 0, 5, 0), 17), ((4, None, 0, None, 0), None)):  # None: -1 on the wire
            sender = threading.Thread(target=send, args=ports)
            sender.start()
            stats = listener.fresh_stats(timeout_s=5.0)
            sender.join()
            assert stats is not None and stats[3] == 10
            assert listener.skipped() == skipped
            assert listener.resent() == (5 if skipped else None)
    finally:
        listener.close()


def test_a_note_is_coplayers_own_loss_only_if_the_hop_and_the_bare_loop_delivered_it():
    sent = [(t * 1000, (0x90, 60 + t, 90)) for t in range(4)]
    arrived = [("hop", (0x90, 60, 90), 500), ("floor", (0x90, 60, 90), 600),  # 60: coplayer alone lost it
               ("hop", (0x90, 61, 90), 1500),  # 61: the bare loop lost it too
               ("hop", (0x90, 62, 90), 2500), ("floor", (0x90, 62, 90), 2600), (MERGED, (0x90, 62, 90), 2700),
               ("floor", (0x90, 63, 90), 3600)]  # 63: the hop lost it
    assert lost_alone(sent, arrived) == 1
