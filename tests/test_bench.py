"""The benchmark's bookkeeping (no JACK needed): stuck notes and who lost them."""

from __future__ import annotations

from coplayer.bench import MERGED, offs_reported, sounding_after


def test_a_stuck_note_ended_by_coplayer_was_lost_after_it():
    arrived = [(MERGED, (0x90, 60, 90), 1), (MERGED, (0x91, 62, 90), 2), (MERGED, (0x81, 62, 0), 3),
               (MERGED, (0x92, 64, 90), 4)]  # soprano 60 and tenor 64 never ended at the peer
    stuck = sounding_after(arrived)
    assert stuck == {(MERGED, 0, 60): 1, (MERGED, 2, 64): 1}
    osc = [("/coplayer/note", ("soprano", 60, 90)), ("/coplayer/note", ("alto", 62, 90)),
           ("/coplayer/note", ("alto", 62, 0)), ("/coplayer/note", ("soprano", 60, 0)),  # sent, lost later
           ("/coplayer/note", ("tenor", 64, 90)), ("/coplayer/stats", (0.1, 0.2, 0.3, 3, 0))]
    assert offs_reported(stuck, osc) == 1  # the tenor's note-off never left coplayer
