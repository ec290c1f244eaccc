"""MIDI files <-> note table: reading, writing, round trips, damaged files."""

from __future__ import annotations

import io
import logging
import struct
from collections import Counter

import mido
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coplayer.data.midi import (
    midifile_to_score,
    read_midi,
    read_midi_bytes,
    score_to_midifile,
    write_midi,
)
from coplayer.data.notes import Note, Score, TempoMap
from coplayer.errors import MidiFileError

TPB = 480
LOGGER = "coplayer.data.midi"


# -- helpers ---------------------------------------------------------------


def on(tick, pitch, vel=64, ch=0):
    return tick, mido.Message("note_on", note=pitch, velocity=vel, channel=ch)


def off(tick, pitch, ch=0, zero_vel_on=False):
    kind = "note_on" if zero_vel_on else "note_off"
    return tick, mido.Message(kind, note=pitch, velocity=0, channel=ch)


def meta(tick, kind, **kw):
    return tick, mido.MetaMessage(kind, **kw)


def track(events, name=None):
    """A MidiTrack from (absolute tick, message) pairs, kept in given order."""
    result = mido.MidiTrack()
    if name is not None:
        result.append(mido.MetaMessage("track_name", name=name))
    now = 0
    for tick, msg in events:
        result.append(msg.copy(time=tick - now))
        now = tick
    return result


def save(tmp_path, tracks, type=1, tpb=TPB, fname="in.mid"):
    path = tmp_path / fname
    mido.MidiFile(type=type, ticks_per_beat=tpb, tracks=tracks).save(path)
    return path


def ticks(score):
    """Every note as (part, channel, pitch, onset tick, duration ticks, velocity)."""
    tpb = score.ticks_per_beat
    return Counter(
        (n.part, n.channel, n.pitch, round(n.onset_beats * tpb),
         round(n.duration_beats * tpb), n.velocity)
        for n in score.notes
    )


def timed(score):
    """Every note's pitch and part with its onset and duration in seconds."""
    return Counter((n.part, n.pitch, n.onset, n.duration) for n in score.notes)


def roundtrip(score, **kw):
    return read_midi_bytes(_bytes(score_to_midifile(score, **kw)))


def _bytes(mid):
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def tick_note(pitch, on_tick, dur, vel=64, part="p", ch=0, tpb=TPB):
    return Note(pitch, vel, 0.0, 0.0, on_tick / tpb, dur / tpb, part, ch)


def conductor(name="song"):
    return track(
        [
            meta(0, "time_signature", numerator=4, denominator=4),
            meta(0, "set_tempo", tempo=500_000),
            meta(2 * TPB, "set_tempo", tempo=1_000_000),
            meta(6 * TPB, "time_signature", numerator=3, denominator=8),
            meta(6 * TPB, "set_tempo", tempo=400_000),
        ],
        name=name,
    )


# -- reading ---------------------------------------------------------------


def test_type1_file_reads_notes_parts_tempo_and_meter(tmp_path):
    piano = track([on(0, 60, 100), off(TPB, 60), on(4 * TPB, 64, 90), off(5 * TPB, 64)], "Piano")
    bass = track([on(0, 36, 80, ch=1), off(2 * TPB, 36, ch=1, zero_vel_on=True)], "Bass")
    score = read_midi(save(tmp_path, [conductor(), piano, bass]))

    assert score.name == "song"
    assert score.parts == ["Piano", "Bass"]
    assert score.ticks_per_beat == TPB
    assert score.tempo == TempoMap([(0, 500_000), (2, 1_000_000), (6, 400_000)])
    assert score.time_signatures == [(0.0, 4, 4), (6.0, 3, 8)]
    assert ticks(score) == Counter({
        ("Piano", 0, 60, 0, TPB, 100): 1,
        ("Piano", 0, 64, 4 * TPB, TPB, 90): 1,
        ("Bass", 1, 36, 0, 2 * TPB, 80): 1,
    })


def test_seconds_follow_the_tempo_map(tmp_path):
    # 120 BPM for two beats (1.0 s), then 60 BPM: beat 4 is at 1.0 + 2.0 s.
    piano = track([on(TPB, 62), off(3 * TPB, 62), on(4 * TPB, 60), off(5 * TPB, 60)], "Piano")
    score = read_midi(save(tmp_path, [conductor(), piano]))
    by_pitch = {n.pitch: n for n in score.notes}
    assert by_pitch[60].onset == pytest.approx(3.0)
    assert by_pitch[60].duration == pytest.approx(1.0)
    assert by_pitch[62].onset == pytest.approx(0.5)
    assert by_pitch[62].duration == pytest.approx(0.5 + 1.0)  # spans the change


def test_tempo_before_first_change_is_the_midi_default(tmp_path):
    tempo = track([meta(4 * TPB, "set_tempo", tempo=1_000_000)])
    notes = track([on(4 * TPB, 60), off(5 * TPB, 60)], "A")
    score = read_midi(save(tmp_path, [tempo, notes]))
    assert score.tempo == TempoMap([(0, 500_000), (4, 1_000_000)])
    assert score.notes[0].onset == pytest.approx(2.0)


def test_type0_file(tmp_path):
    events = [
        meta(0, "set_tempo", tempo=600_000),
        on(0, 60, 70, ch=0), on(0, 40, 50, ch=9),
        off(TPB, 60, ch=0), off(TPB // 2, 40, ch=9),
    ]
    events.sort(key=lambda e: e[0])
    score = read_midi(save(tmp_path, [track(events, "Solo")], type=0), name="x")
    assert score.name == "x"
    assert score.parts == ["Solo"]
    assert ticks(score) == Counter({
        ("Solo", 0, 60, 0, TPB, 70): 1,
        ("Solo", 9, 40, 0, TPB // 2, 50): 1,
    })
    assert {n.pitch: n.duration for n in score.notes} == pytest.approx({60: 0.6, 40: 0.3})


def test_type2_file_is_read_like_type1(tmp_path):
    tracks = [track([on(0, 60), off(10, 60)], "A"), track([on(0, 62), off(20, 62)], "B")]
    score = read_midi(save(tmp_path, tracks, type=2))
    assert ticks(score) == Counter({("A", 0, 60, 0, 10, 64): 1, ("B", 0, 62, 0, 20, 64): 1})


def test_running_status_from_raw_bytes():
    body = bytes([
        0x00, 0x90, 60, 100,  # note_on C4
        0x00, 64, 90,         # running status: note_on E4
        0x83, 0x60, 60, 0,    # delta 480, running status: velocity 0 = note-off
        0x00, 64, 0,          # running status: note-off E4
        0x00, 0xFF, 0x2F, 0x00,
    ])
    data = (
        b"MThd" + struct.pack(">LHHH", 6, 0, 1, TPB)
        + b"MTrk" + struct.pack(">L", len(body)) + body
    )
    score = read_midi_bytes(data)
    assert ticks(score) == Counter({
        ("track 0", 0, 60, 0, TPB, 100): 1,
        ("track 0", 0, 64, 0, TPB, 90): 1,
    })


def test_file_object_input(tmp_path):
    path = save(tmp_path, [track([on(0, 60), off(10, 60)], "A")])
    with open(path, "rb") as f:
        score = read_midi(f)
    assert len(score) == 1 and score.parts == ["A"]


def test_same_pitch_overlaps_pair_first_in_first_out(tmp_path):
    events = [on(0, 60, 100), on(5, 60, 50), off(10, 60), off(20, 60, zero_vel_on=True)]
    score = read_midi(save(tmp_path, [track(events, "A")]))
    assert ticks(score) == Counter({("A", 0, 60, 0, 10, 100): 1, ("A", 0, 60, 5, 15, 50): 1})


def test_note_on_before_note_off_at_the_same_tick_still_pairs(tmp_path):
    # A sloppy writer re-strikes with the new note-on before the old note-off.
    events = [on(0, 60, 100), on(10, 60, 50), off(10, 60), off(20, 60)]
    score = read_midi(save(tmp_path, [track(events, "A")]))
    assert ticks(score) == Counter({("A", 0, 60, 0, 10, 100): 1, ("A", 0, 60, 10, 10, 50): 1})


def test_same_pitch_on_other_channels_is_independent(tmp_path):
    events = [on(0, 60, 100, ch=0), on(5, 60, 50, ch=1), off(8, 60, ch=1), off(20, 60, ch=0)]
    score = read_midi(save(tmp_path, [track(events, "A")]))
    assert ticks(score) == Counter({("A", 0, 60, 0, 20, 100): 1, ("A", 1, 60, 5, 3, 50): 1})


def test_unclosed_and_stray_notes_are_repaired_with_one_warning(tmp_path, caplog):
    a = track([off(0, 50), on(0, 60), on(10, 62), off(30, 62), meta(40, "marker", text="end")], "A")
    b = track([on(0, 70), off(5, 71), on(25, 72)], "B")  # B ends right at its last note-on
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        score = read_midi(save(tmp_path, [a, b]))
    assert ticks(score) == Counter({
        ("A", 0, 60, 0, 40, 64): 1,  # closed at the end of its track
        ("A", 0, 62, 10, 20, 64): 1,
        ("B", 0, 70, 0, 25, 64): 1,
        ("B", 0, 72, 25, 1, 64): 1,  # at least one tick long
    })
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    assert "3 note(s) never released" in records[0].getMessage()
    assert "2 note-off(s) without a note-on" in records[0].getMessage()
    assert "in.mid" in records[0].getMessage()


def test_clean_file_logs_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        read_midi(save(tmp_path, [track([on(0, 60), off(1, 60)], "A")]))
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_part_names_are_unique_and_only_for_tracks_with_notes(tmp_path):
    note = [on(0, 60), off(1, 60)]
    tracks = [
        track([meta(0, "set_tempo", tempo=500_000)], "Tempo"),
        track(note, "Keys"),
        track(note),
        track(note, "Keys"),
        track([meta(0, "text", text="empty")], "Silent"),
        track(note, "Bass"),
    ]
    score = read_midi(save(tmp_path, tracks, fname="band.mid"))
    assert score.parts == ["Keys (track 1)", "track 2", "Keys (track 3)", "Bass"]
    assert score.name == "Tempo"
    assert [len(score.part_notes(p)) for p in score.parts] == [1, 1, 1, 1]


def test_name_defaults_to_file_stem_without_conductor_name(tmp_path):
    score = read_midi(save(tmp_path, [track([on(0, 60), off(1, 60)])], fname="tune.mid"))
    assert score.name == "tune"
    assert score.parts == ["track 0"]


# -- damaged files ---------------------------------------------------------


def _header(tracks=1, fmt=1, division=TPB):
    return b"MThd" + struct.pack(">LHHh", 6, fmt, tracks, division)


def _write(tmp_path, data, fname="bad.mid"):
    path = tmp_path / fname
    path.write_bytes(data)
    return path


def _mtrk(body, size=None):
    """A track chunk; ``size`` may lie about the body's length."""
    return b"MTrk" + struct.pack(">L", len(body) if size is None else size) + body


END = b"\x00\xff\x2f\x00"  # end_of_track


MALFORMED = pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"MThd\x00\x00", id="truncated-header"),
        pytest.param(b"MThd" + struct.pack(">L", 6) + b"\x00\x01", id="short-header-data"),
        pytest.param(bytes(range(256)) * 3, id="random-bytes"),
        pytest.param(_header() + _mtrk(b"\x00\x90\x3c", size=8), id="truncated-track"),
        pytest.param(_header(tracks=2) + _mtrk(END), id="missing-track"),
        pytest.param(_header() + b"XXXX" + struct.pack(">L", 0), id="no-MTrk"),
        pytest.param(_header() + _mtrk(b"\x00\x3c\x40" + END), id="running-status-no-status"),
        pytest.param(_header() + _mtrk(b"\x00\x90\xc0\x40" + END), id="data-byte-over-127"),
        pytest.param(_header() + _mtrk(b"\x00\xff\x51\x01\x07" + END), id="short-tempo-meta"),
        pytest.param(_header() + _mtrk(b"\x00\xff\x59\x02\x20\x00" + END), id="bad-key-sig"),
        pytest.param(_header(division=-0x1828) + _mtrk(END), id="smpte-division"),
    ],
)


@MALFORMED
def test_malformed_file_raises_midi_file_error(tmp_path, data):
    path = _write(tmp_path, data)
    with pytest.raises(MidiFileError) as info:
        read_midi(path)
    message = str(info.value)
    assert "bad.mid" in message and "\n" not in message
    assert isinstance(info.value, ValueError)


@MALFORMED
def test_run_input_says_why_a_file_cannot_be_read_as_arrange_does(tmp_path, data):
    """``run --input`` (file_messages) and ``arrange``/``continue`` (read_midi) read through one path."""
    from coplayer.engine.live import file_messages

    path = _write(tmp_path, data)
    with pytest.raises(MidiFileError) as by_run:
        file_messages(path)
    with pytest.raises(MidiFileError) as by_arrange:
        read_midi(path)
    assert str(by_run.value) == str(by_arrange.value)
    assert not str(by_run.value).rstrip().endswith(":")


def test_an_empty_file_is_named_empty(tmp_path):
    with pytest.raises(MidiFileError, match=r"'.*bad\.mid': the file is empty \(not a MIDI file\)$"):
        read_midi(_write(tmp_path, b""))


def test_missing_file_raises_midi_file_error(tmp_path):
    with pytest.raises(MidiFileError, match=r"nope\.mid.*no such file"):
        read_midi(tmp_path / "nope.mid")


def test_directory_raises_midi_file_error(tmp_path):
    with pytest.raises(MidiFileError, match="cannot read MIDI file"):
        read_midi(tmp_path)


def test_random_bytes_in_memory_raise():
    with pytest.raises(MidiFileError, match="<memory>"):
        read_midi_bytes(b"RIFF\x00\x00\x00\x04WAVE")


# -- writing ---------------------------------------------------------------


def _score(notes, parts=None, **kw):
    tempo = TempoMap([(0, 500_000), (2, 1_000_000), (6, 400_000)])
    sigs = [(0.0, 4, 4), (6.0, 3, 8)]
    score = Score(notes=notes, tempo=tempo, time_signatures=sigs,
                  ticks_per_beat=TPB, parts=parts or [], **kw)
    return score.fill_seconds()


def test_file_to_notes_to_file_round_trip(tmp_path):
    piano = track([
        on(0, 60, 100), on(0, 64, 90), off(TPB, 60), off(TPB, 64),
        on(TPB, 60, 80), off(3 * TPB + 7, 60, zero_vel_on=True),
        on(7 * TPB + 1, 72, 1), off(9 * TPB, 72),
    ], "Piano")
    drums = track(
        [on(3, 36, 127, ch=9), off(4, 36, ch=9), on(4, 36, 100, ch=9), off(50, 36, ch=9)], "Drums"
    )
    first = read_midi(save(tmp_path, [conductor(), piano, drums]))
    out = tmp_path / "out.mid"
    write_midi(first, out)
    second = read_midi(out)

    assert ticks(second) == ticks(first)
    assert len(first) == 6
    assert second.parts == first.parts == ["Piano", "Drums"]
    assert second.tempo == first.tempo
    assert second.time_signatures == first.time_signatures
    assert second.name == first.name == "song"
    assert timed(second) == timed(first)


def test_written_layout(tmp_path):
    notes = [
        tick_note(60, 0, 10, part="Lead", ch=3),
        tick_note(40, 0, 10, part="Bass", ch=2),
        tick_note(50, 0, 10, part="Extra", ch=4),
        tick_note(70, 5, 10, part=None, ch=5),
    ]
    score = _score(notes, parts=["Bass", "Lead"], name="demo")
    mid = score_to_midifile(score, programs={"Lead": 81, "Bass": 33}, channels={"Bass": 1})
    assert mid.type == 1 and mid.ticks_per_beat == TPB
    names = [next(m.name for m in t if m.type == "track_name") for t in mid.tracks]
    assert names == ["demo", "Bass", "Lead", "Extra", "input"]
    assert not any(m.type.startswith("note") for m in mid.tracks[0])
    assert [m.type for m in mid.tracks[0] if m.type in ("set_tempo", "time_signature")] == [
        "time_signature", "set_tempo", "set_tempo", "time_signature", "set_tempo"]
    bass, lead = mid.tracks[1], mid.tracks[2]
    programs = [(m.channel, m.program, m.time) for m in bass if m.type == "program_change"]
    assert programs == [(1, 33, 0)]
    assert [(m.channel, m.program) for m in lead if m.type == "program_change"] == [(3, 81)]
    assert {m.channel for m in bass if m.type.startswith("note")} == {1}
    assert not any(m.type == "program_change" for m in mid.tracks[3])

    back = read_midi_bytes(_bytes(mid))
    assert back.parts == ["Bass", "Lead", "Extra", "input"]
    assert {(n.part, n.channel) for n in back.notes} == {
        ("Bass", 1), ("Lead", 3), ("Extra", 4), ("input", 5)}


def test_explicit_track_order_and_input_name_clash():
    notes = [tick_note(60, 0, 10, part="input"), tick_note(61, 0, 10, part=None),
             tick_note(62, 0, 10, part="B")]
    back = roundtrip(_score(notes, parts=["input", "B"]), tracks=["B"])
    assert back.parts == ["B", "input", "input #2"]
    assert {(n.part, n.pitch) for n in back.notes} == {("B", 62), ("input", 60), ("input #2", 61)}


def test_note_offs_come_before_note_ons_at_the_same_tick():
    notes = [tick_note(60, 0, 10, vel=100), tick_note(60, 10, 10, vel=50)]
    mid = score_to_midifile(_score(notes))
    kinds = [(m.type, m.velocity) for m in mid.tracks[1] if m.type.startswith("note")]
    assert kinds == [("note_on", 100), ("note_off", 0), ("note_on", 50), ("note_off", 0)]
    assert ticks(read_midi_bytes(_bytes(mid))) == ticks(_score(notes))


def test_rounding_to_ticks_and_minimum_duration():
    notes = [tick_note(60, 0, 0), Note(62, 70, 0.0, 0.0, 1.2504, 0.4996, "p", 0)]
    back = roundtrip(_score(notes))
    assert ticks(back) == Counter({("p", 0, 60, 0, 1, 64): 1, ("p", 0, 62, 600, 240, 70): 1})


@pytest.mark.parametrize(
    "intervals",
    [
        [(0, 10), (5, 20)],            # overlap, ends in order
        [(0, 20), (0, 10)],            # same onset, different ends
        [(0, 10), (5, 10)],            # same end
        [(0, 10), (10, 20), (10, 30)],  # re-strike plus a same-onset double
        [(0, 10), (5, 15), (10, 20)],
    ],
)
def test_representable_same_pitch_overlaps_survive(intervals):
    notes = [tick_note(60, a, b - a, vel=10 + i) for i, (a, b) in enumerate(intervals)]
    score = _score(notes)
    assert ticks(roundtrip(score)) == ticks(score)


def test_nested_same_pitch_notes_are_a_documented_limitation(caplog):
    outer, inner = tick_note(60, 0, 20, vel=100), tick_note(60, 5, 5, vel=50)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        back = roundtrip(_score([outer, inner]))
    assert any("1 note(s) lie inside" in r.getMessage() for r in caplog.records)
    # Count, pitches, onsets, velocities and the end ticks are kept ...
    assert sorted((n.pitch, n.onset_beats, n.velocity) for n in back.notes) == [
        (60, 0.0, 100), (60, 5 / TPB, 50)]
    # ... but FIFO pairing gives the first note-off to the outer note.
    assert ticks(back) == Counter({("p", 0, 60, 0, 10, 100): 1, ("p", 0, 60, 5, 15, 50): 1})


def test_nested_notes_in_separate_parts_are_exact():
    notes = [tick_note(60, 0, 20, vel=100, part="a"), tick_note(60, 5, 5, vel=50, part="b")]
    score = _score(notes, parts=["a", "b"])
    assert ticks(roundtrip(score)) == ticks(score)


@pytest.mark.parametrize(
    "note, match",
    [
        (tick_note(128, 0, 1), "pitch 128"),
        (tick_note(60, 0, 1, vel=0), "velocity 0"),
        (tick_note(60, 0, 1, ch=16), "channel 16"),
        (tick_note(60, -5, 1), "negative"),
    ],
)
def test_invalid_notes_are_refused(note, match):
    with pytest.raises(MidiFileError, match=match):
        score_to_midifile(_score([note]))


def test_invalid_settings_are_refused():
    score = _score([tick_note(60, 0, 1)])
    with pytest.raises(MidiFileError, match="program 200"):
        score_to_midifile(score, programs={"p": 200})
    with pytest.raises(MidiFileError, match="channel 16"):
        score_to_midifile(score, channels={"p": 16})
    score.time_signatures = [(0.0, 3, 6)]
    with pytest.raises(MidiFileError, match="power of 2"):
        score_to_midifile(score)
    with pytest.raises(MidiFileError, match="ticks_per_beat"):
        score_to_midifile(Score(ticks_per_beat=40_000))


def test_unwritable_path_raises_midi_file_error(tmp_path):
    with pytest.raises(MidiFileError, match="cannot write MIDI file"):
        write_midi(_score([tick_note(60, 0, 1)]), tmp_path / "no" / "dir" / "x.mid")


def test_midifile_to_score_on_an_in_memory_file():
    mid = mido.MidiFile(ticks_per_beat=96, tracks=[track([on(0, 60), off(96, 60)], "A")])
    score = midifile_to_score(mid)
    assert score.ticks_per_beat == 96 and score.notes[0].duration_beats == 1.0


# -- property: write -> read is exact --------------------------------------

PARTS = ["p0", "p1", "p2"]


@st.composite
def tick_notes(draw, max_notes=40):
    """(part, channel, pitch, onset, duration, velocity) rows."""
    row = st.tuples(
        st.sampled_from(PARTS),
        st.one_of(st.just(0), st.integers(0, 15)),
        st.one_of(st.sampled_from([60, 61]), st.integers(0, 127)),  # collisions too
        st.integers(0, 5000), st.integers(1, 800), st.integers(1, 127),
    )
    return draw(st.lists(row, min_size=1, max_size=max_notes))


def _drop_overlaps(rows, *, nested_only):
    """Keep rows that do not overlap (or, if nested_only, nest in) a kept row."""
    kept, by_key = [], {}
    for row in sorted(rows, key=lambda r: (r[3], r[4])):
        part, ch, pitch, onset, dur, _ = row
        key = (part, ch, pitch)
        last_end = by_key.get(key, -1)
        end = onset + dur
        if (end < last_end) if nested_only else (onset < last_end):
            continue
        kept.append(row)
        by_key[key] = max(last_end, end)
    return kept


def _score_from_rows(rows, tpb, tempos):
    notes = [tick_note(pitch, onset, dur, vel, part, ch, tpb=tpb)
             for part, ch, pitch, onset, dur, vel in rows]
    score = Score(notes=notes, tempo=TempoMap(tempos), ticks_per_beat=tpb,
                  parts=sorted({r[0] for r in rows}))
    return score.fill_seconds()


tempo_lists = st.lists(
    st.tuples(st.integers(0, 20), st.integers(200_000, 2_000_000)), max_size=4
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tick_notes(), st.sampled_from([96, 384, 480, 960]), tempo_lists, st.booleans())
def test_property_write_read_is_exact(rows, tpb, tempos, allow_overlaps):
    rows = _drop_overlaps(rows, nested_only=allow_overlaps)
    score = _score_from_rows(rows, tpb, [(0, 500_000)] + tempos)
    back = read_midi_bytes(_bytes(score_to_midifile(score)))
    assert ticks(back) == ticks(score)
    assert back.parts == score.parts
    assert back.tempo == score.tempo
    assert timed(back) == timed(score)


@settings(max_examples=100, deadline=None)
@given(tick_notes(max_notes=20))
def test_property_nested_notes_keep_count_pitch_onset_velocity_and_ends(rows):
    score = _score_from_rows(rows, TPB, [(0, 500_000)])
    back = read_midi_bytes(_bytes(score_to_midifile(score)))

    def starts(s):
        return Counter((n.part, n.channel, n.pitch, round(n.onset_beats * TPB), n.velocity)
                       for n in s.notes)

    def ends(s):
        return Counter((n.part, n.channel, n.pitch, round(n.end_beats * TPB)) for n in s.notes)

    assert len(back) == len(score)
    assert starts(back) == starts(score)
    assert ends(back) == ends(score)
