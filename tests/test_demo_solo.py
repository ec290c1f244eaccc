"""The bundled demo solo: phrases with room for answers, bar positions kept, one key per note."""

from __future__ import annotations

from coplayer.data.demo_solo import demo_solo_path, keyboard, solo
from coplayer.data.midi import read_midi
from coplayer.data.notes import Note, Score


def n(pitch, onset, dur, part):
    return Note(pitch, 80, 0.0, 0.0, onset, dur, part)


def test_solo_cuts_phrases_at_fermatas_and_inserts_whole_bars():
    # a pickup (beat 0), then phrase 1 to beat 5 and phrase 2 to beat 9
    notes = [n(67, 0, 1, "soprano"), n(55, 0, 1, "tenor"), n(69, 1, 4, "soprano"), n(60, 1, 2, "alto"),
             n(60, 3, 2, "tenor"),  # a unison with the alto for beat 3..4: one key, re-struck
             n(71, 5, 4, "soprano"), n(43, 5, 6, "bass")]  # the bass runs past the last fermata
    out = solo(Score(notes=notes, name="bach/bwv999.mxl"), [5.0, 9.0, 13.0], pickup=3.0, phrases=2, gap_bars=3)
    onsets = sorted({x.onset_beats for x in out.notes})
    assert onsets == [3.0, 4.0, 6.0, 20.0]  # the pickup on beat 3; phrase 2 moved by 3 bars (8 -> 20)
    assert all(x.part is None for x in out.notes) and out.time_signatures == [(0.0, 4, 4)]
    c4 = sorted((x for x in out.notes if x.pitch == 60), key=lambda x: x.onset_beats)
    assert [(x.onset_beats, x.duration_beats) for x in c4] == [(4.0, 2.0), (6.0, 2.0)]
    assert max(x.end_beats for x in out.notes) == 24.0  # cut at the fermata's end
    assert out.name.startswith("BWV 999")


def test_keyboard_keeps_one_note_per_key_at_a_time():
    merged = keyboard([n(60, 0, 2, "alto"), n(60, 0, 1, "tenor"), n(60, 1, 2, "soprano")])
    assert [(x.onset_beats, x.duration_beats) for x in merged] == [(0, 1), (1, 2)]


def test_the_shipped_solo_has_pauses_for_the_answers():
    score = read_midi(demo_solo_path())
    notes = sorted(score.notes, key=lambda x: x.onset_beats)
    assert 20 <= max(x.end for x in notes) <= 32  # seconds
    pauses, end = [], 0.0
    for x in notes:
        if x.onset_beats - end >= 2:
            pauses.append(x.onset_beats - end)
        end = max(end, x.end_beats)
    assert len(pauses) >= 3 and sorted(pauses)[-2:] == [12.0, 12.0]  # a lead-in, then 3 bars after each phrase
