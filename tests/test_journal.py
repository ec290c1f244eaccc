"""The session folder, the journal and recovery: the musician's recording is
never lost (coplayer.engine.session, coplayer.engine.journal)."""

from __future__ import annotations

import json
import os
import time

import mido
import pytest

from coplayer.engine import journal as journal_module
from coplayer.engine.journal import Journal, read_journal, recover
from coplayer.engine.session import (SessionRecorder, SnapshotGate, folder_problem, prepare_folder,
                                     write_atomically)
from coplayer.errors import SessionError

PARTS = ["soprano", "alto"]
HEADER = {"parts": PARTS, "programs": {"soprano": 40, "alto": 41}, "channels": {"soprano": 0, "alto": 1},
          "bpm": 120.0}


def recorder_at(beats: list[float]) -> SessionRecorder:
    """A recorder whose clock reads ``beats[0]`` (a test moves it)."""
    return SessionRecorder(lambda t_ns: t_ns / 1e9, lambda: round(beats[0] * 1e9))


def play(recorder: SessionRecorder, track, pitch: int, on_beat: float, off_beat: float | None = None) -> None:
    recorder.message(track, (0x90, pitch, 80), round(on_beat * 1e9))
    if off_beat is not None:
        recorder.message(track, (0x80, pitch, 0), round(off_beat * 1e9))


def ons(path) -> list[tuple[str, int]]:
    mid = mido.MidiFile(path)
    return [(t.name, m.note) for t in mid.tracks for m in t if m.type == "note_on" and m.velocity]


# --- the folder ------------------------------------------------------------------------


def test_a_folder_that_cannot_be_made_is_named_with_its_reason(tmp_path):
    assert folder_problem("/proc/nope").startswith("'/proc/nope' cannot be created in '/proc': ")
    (tmp_path / "taken").write_text("")
    assert folder_problem(tmp_path / "taken") == f"{str(tmp_path / 'taken')!r} is a file, not a folder"
    assert folder_problem(tmp_path / "taken" / "sub") == f"{str(tmp_path / 'taken')!r} is a file, not a folder"


def test_a_missing_folder_is_fine_and_only_created_when_prepared(tmp_path):
    folder = tmp_path / "a" / "b"
    assert folder_problem(folder) is None and folder_problem(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # the check left nothing behind
    assert prepare_folder(folder) == folder and folder.is_dir()


@pytest.mark.parametrize("folder", ["/proc/nope", "TAKEN"])
def test_preparing_a_folder_that_cannot_be_used_is_one_session_error(tmp_path, folder):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SessionError, match=r"^session\.directory: ") as info:
        prepare_folder(folder.replace("TAKEN", str(tmp_path / "taken")))
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)


def test_a_failed_write_leaves_no_file_and_says_why(tmp_path):
    def half(f):
        f.write(b"MThd")
        raise OSError(28, "No space left on device")

    with pytest.raises(SessionError, match="cannot write the session to .*s.mid: No space left on device"):
        write_atomically(tmp_path / "s.mid", half)
    assert list(tmp_path.iterdir()) == []


# --- the recorder ----------------------------------------------------------------------


def test_the_recorder_keeps_every_note_with_its_track_channel_and_times():
    rec = recorder_at([10.0])
    play(rec, None, 60, 0.0, 1.5)
    rec.message("alto", (0x91, 64, 90), 500_000_000)
    play(rec, "soprano", 72, 1.0, 2.0)
    rec.message("alto", (0x91, 64, 0), 3_000_000_000)  # a note-on of velocity 0 ends it
    play(rec, None, 67, 4.0)  # sounding when the session is written
    rec.message(None, (0x80, 50, 0), 0)  # a note-off without its note-on: nothing
    assert len(rec) == 4
    assert [(n.part, n.channel, n.pitch, n.velocity, n.onset_beats, n.duration_beats)
            for n in rec.ended_notes()] == [(None, 0, 60, 80, 0.0, 1.5), ("soprano", 0, 72, 80, 1.0, 1.0),
                                            ("alto", 1, 64, 90, 0.5, 2.5)]
    score = rec.score(PARTS, 120.0)
    assert [(n.part, n.pitch, n.onset_beats, n.duration_beats) for n in score.notes][-1] == (None, 67, 4.0, 6.0)


def test_the_recorder_keeps_a_note_in_a_few_tens_of_bytes():
    """A Note object each took ~150 bytes: 0.33 MB a minute in a 10-minute soak."""
    import tracemalloc

    rec = recorder_at([0.0])
    for i in range(200):  # the tracks and the columns exist
        play(rec, "soprano", 60 + i % 12, i, i + 0.5)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200, 20_200):
            play(rec, "soprano" if i % 2 else None, 40 + i % 40, i / 4, i / 4 + 0.2)
        per_note = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    finally:
        tracemalloc.stop()
    assert len(rec) == 20_200 and per_note < 40


def test_a_recorder_told_not_to_keep_keeps_nothing():
    rec = SessionRecorder(lambda t_ns: t_ns / 1e9, keep=False)
    rec.keep_new()
    for i in range(100):
        play(rec, "soprano", 60, i, i + 0.5)
    assert len(rec) == 0 and rec.take_new() == ([], False) and rec.score(PARTS, 120.0).notes == []


# --- snapshots -------------------------------------------------------------------------


def test_snapshots_are_one_per_interval():
    now = [100.0]
    gate = SnapshotGate("/nonexistent", max_mb=1, interval_s=5.0, clock=lambda: now[0])
    assert gate.refusal() is None
    now[0] += 4.9
    assert "at most one every 5 s" in gate.refusal()
    now[0] += 0.2
    assert gate.refusal() is None


def test_snapshots_stop_at_the_folders_budget(tmp_path):
    (tmp_path / "old.mid").write_bytes(b"\0" * 1_500_000)
    gate = SnapshotGate(tmp_path, max_mb=1, interval_s=0)
    assert "holds 2 MB, session.max_mb is 1" in gate.refusal()
    assert gate.over_budget() and SnapshotGate(tmp_path, max_mb=2).refusal() is None


# --- the journal ---------------------------------------------------------------------


def test_the_journal_is_on_disk_within_its_interval_without_a_clean_exit(tmp_path):
    beats = [0.0]
    recorder = recorder_at(beats)
    journal = Journal.create(tmp_path, HEADER).start(recorder, lambda: 120.0, interval_s=0.1)
    try:
        play(recorder, None, 60, 0.0, 1.0)
        play(recorder, "soprano", 72, 0.5)
        deadline = time.monotonic() + 1.0  # the promise: at most a second
        while time.monotonic() < deadline and len(read_journal(journal.path).records) < 3:
            time.sleep(0.02)
        contents = read_journal(journal.path)  # read by another reader while the run goes on
    finally:
        journal.close(remove=False)
    assert contents.records == [(0.0, None, (0x90, 60, 80)), (1.0, None, (0x80, 60, 0)),
                                (0.5, "soprano", (0x90, 72, 80))]
    assert contents.header["parts"] == PARTS and contents.header["pid"] == os.getpid()


def test_the_journal_takes_nothing_before_it_starts_and_nothing_on_the_note_path(tmp_path):
    recorder = recorder_at([0.0])
    play(recorder, None, 60, 0.0, 1.0)
    assert recorder.take_new() == ([], False)  # no journal: nothing is kept twice
    journal = Journal.create(tmp_path, HEADER)
    journal.start(recorder, lambda: 120.0, interval_s=60)  # its thread sleeps through the test
    size = journal.path.stat().st_size
    play(recorder, None, 62, 2.0)
    assert journal.path.stat().st_size == size  # the message waits in memory for the thread
    journal.close(remove=False)
    assert [r[2][1] for r in read_journal(journal.path).records] == [62]


def test_a_record_cut_off_mid_write_is_ignored(tmp_path):
    recorder = recorder_at([0.0])
    journal = Journal.create(tmp_path, HEADER).start(recorder, lambda: 120.0, interval_s=60)
    play(recorder, None, 60, 0.0, 1.0)
    journal.close(remove=False)
    with open(journal.path, "ab") as f:
        f.write(b'[1.5,"alto",144,6')  # SIGKILL here
    contents = read_journal(journal.path)
    assert len(contents.records) == 2 and contents.skipped == 0


def test_a_failed_journal_write_is_written_again_whole_and_once(tmp_path, monkeypatch, caplog):
    recorder = recorder_at([0.0])
    journal = Journal.create(tmp_path, HEADER).start(recorder, lambda: 120.0, interval_s=60)
    real = journal_module._write_all

    def half_then_full_disk(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module, "_write_all", half_then_full_disk)
    play(recorder, None, 60, 0.0, 1.0)
    assert not journal.flush() and not journal.flush()
    assert caplog.text.count("cannot write the session journal") == 1
    monkeypatch.setattr(journal_module, "_write_all", real)
    play(recorder, None, 64, 2.0, 3.0)
    assert journal.flush()
    journal.close(remove=False)
    contents = read_journal(journal.path)
    assert [(b, d[1]) for b, _, d in contents.records] == [(0.0, 60), (1.0, 60), (2.0, 64), (3.0, 64)]
    assert contents.skipped == 0 and "is written again" in caplog.text


def test_a_clean_close_removes_the_journal(tmp_path):
    journal = Journal.create(tmp_path, HEADER).start(recorder_at([0.0]), lambda: 120.0, interval_s=60)
    journal.close(remove=True)
    assert list(tmp_path.iterdir()) == []


# --- recovery --------------------------------------------------------------------------


def test_a_journal_left_by_a_run_that_is_gone_becomes_a_session_file(tmp_path):
    beats = [0.0]
    recorder = recorder_at(beats)
    journal = Journal.create(tmp_path, HEADER).start(recorder, lambda: 90.0, interval_s=60)
    play(recorder, None, 60, 0.0, 1.0)
    play(recorder, "alto", 62, 0.0, 1.0)
    play(recorder, "soprano", 72, 2.0)  # still sounding when the run dies
    beats[0] = 3.0
    journal.stop()
    os.close(journal._fd)  # what the end of its process does (the lock goes with it)
    started = json.loads(journal.path.read_text().splitlines()[0])["started"]
    (found,) = recover(tmp_path)
    assert not journal.path.exists() and found.path.parent == tmp_path
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    assert found.message() == (f"recovered the session of {when} (1 note played, 2 from coplayer) "
                               f"from a run that did not finish: {found.path}")
    assert found.path.name == time.strftime("session-%Y%m%d-%H%M%S.mid", time.localtime(started))
    mid = mido.MidiFile(found.path)
    assert [t.name for t in mid.tracks][1:] == ["soprano", "alto", "input"]
    assert sorted(ons(found.path)) == [("alto", 62), ("input", 60), ("soprano", 72)]
    assert mido.tempo2bpm(next(m.tempo for m in mid.tracks[0] if m.type == "set_tempo")) == pytest.approx(90)
    soprano = [m for m in mid.tracks[1] if m.type in ("note_on", "note_off")]
    assert soprano[-1].time == mid.ticks_per_beat  # the held note lasts until the last flush
    assert recover(tmp_path) == []  # once


def test_a_live_runs_journal_is_left_alone(tmp_path):
    recorder = recorder_at([0.0])
    journal = Journal.create(tmp_path, HEADER).start(recorder, lambda: 120.0, interval_s=60)
    play(recorder, None, 60, 0.0, 1.0)
    journal.flush()
    try:
        assert recover(tmp_path) == [] and journal.path.exists()
    finally:
        journal.close(remove=True)


def test_a_journal_without_notes_is_removed_and_a_foreign_file_kept(tmp_path, caplog):
    journal = Journal.create(tmp_path, HEADER).start(recorder_at([0.0]), lambda: 120.0, interval_s=60)
    journal.close(remove=False)
    other = tmp_path / ".session-mine.journal"
    other.write_text("not a journal\n")
    assert recover(tmp_path) == []
    assert not journal.path.exists() and other.exists()
    assert "cannot read the session journal" in caplog.text and "left as it is" in caplog.text
