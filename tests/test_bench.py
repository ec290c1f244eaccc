"""The benchmark's bookkeeping (no JACK needed): stuck notes and who lost them."""

from __future__ import annotations

import random

from coplayer.bench import MERGED, SECTIONS, by_section, is_on, offs_reported, realistic, sounding_after


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
