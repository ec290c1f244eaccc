"""Standard MIDI files <-> the note table (:class:`~coplayer.data.notes.Score`).

Reading accepts type 0, 1 and 2 files (type 2 tracks are read as if they
were type 1).  Ticks are converted to beats exactly (``tick / ticks_per_beat``)
and seconds are derived from the merged tempo map, so writing a score read
from a file gives back the same ticks.

Note-on/note-off pairing is first-in, first-out per track, channel and pitch:
the first pending note-on of a pitch is closed by the next note-off of that
pitch (a note-on with velocity 0 is a note-off).  Writing orders events so
that this pairing reads every note back unchanged, with one exception:

**Limitation.**  A note that starts after and ends before another note of the
same pitch on the same track and channel (strict nesting, e.g. ``[0, 20)``
and ``[5, 10)``) cannot be told apart from two notes ``[0, 10)`` and
``[5, 20)`` in a MIDI stream.  Such notes are written as they are; reading
them back keeps the number of notes, their pitches, onsets, velocities and
the set of end ticks, but each note-off goes to the oldest sounding note.
:func:`score_to_midifile` logs a warning with the number of nested notes.
Put such notes in different parts (tracks) or channels to keep them exact.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, NamedTuple

import mido
from mido.midifiles.meta import KeySignatureError

from coplayer.data.notes import DEFAULT_TEMPO, Note, Score, TempoMap
from coplayer.errors import MidiFileError

log = logging.getLogger(__name__)

INPUT_TRACK = "input"  # track name for notes whose part is None

# What mido's parser raises on damaged files (KeySignatureError is a bare
# Exception subclass; IndexError/struct.error come from short meta data).
_PARSE_ERRORS = (
    OSError, EOFError, ValueError, KeyError, IndexError, struct.error, KeySignatureError,
)


# --------------------------------------------------------------------------
# Reading


def read_midi(
    path_or_file: str | os.PathLike[str] | BinaryIO, *, name: str | None = None
) -> Score:
    """Read a standard MIDI file (a path or a binary file object) into a Score.

    Raises :class:`MidiFileError` when the file is missing or malformed.
    """
    return midifile_to_score(open_midifile(path_or_file), name=name, label=_label(path_or_file))


def open_midifile(path_or_file: str | os.PathLike[str] | BinaryIO) -> mido.MidiFile:
    """The parsed :class:`mido.MidiFile`; :class:`MidiFileError` says why it cannot be read."""
    try:
        if hasattr(path_or_file, "read"):
            mid = mido.MidiFile(file=path_or_file)
        else:
            mid = mido.MidiFile(os.fspath(path_or_file))
    except _PARSE_ERRORS as error:
        reason = "the file is empty (not a MIDI file)" if _is_empty(path_or_file) else _reason(error)
        raise MidiFileError(f"cannot read MIDI file {_label(path_or_file)}: {reason}") from error
    _check_division(mid, _label(path_or_file))
    return mid


def read_midi_bytes(data: bytes, *, name: str | None = None) -> Score:
    """Read a standard MIDI file held in memory."""
    return read_midi(io.BytesIO(data), name=name)


def midifile_to_score(
    mid: mido.MidiFile, *, name: str | None = None, label: str | None = None
) -> Score:
    """Convert a parsed :class:`mido.MidiFile` into a Score.

    ``name`` defaults to the name of a note-less first track (the conductor
    track of a type 1 file), else to the file's stem, else ``""``.
    """
    label = label or _label(mid.filename or "<memory>")
    tpb = _check_division(mid, label)
    scans = [_scan_track(track) for track in mid.tracks]
    _warn_pairing(label, scans)
    parts = _part_names(scans)
    notes = []
    for scan, part in zip(scans, parts):
        for note in scan.notes:
            note.part = part
            note.onset_beats /= tpb
            note.duration_beats /= tpb
            notes.append(note)
    score = Score(
        notes=notes,
        tempo=_tempo_map(scans, tpb, label),
        time_signatures=_time_signatures(scans, tpb),
        ticks_per_beat=tpb,
        parts=[p for p in parts if p is not None],
        name=name if name is not None else _default_name(mid, scans),
    )
    return score.fill_seconds().sort()


@dataclass
class _TrackScan:
    """What one track holds; note times are still in ticks."""

    name: str = ""
    notes: list[Note] = field(default_factory=list)
    tempos: list[tuple[int, int]] = field(default_factory=list)  # (tick, us/beat)
    time_signatures: list[tuple[int, int, int]] = field(default_factory=list)
    stray_offs: int = 0
    unclosed: int = 0


def _scan_track(track: mido.MidiTrack) -> _TrackScan:
    """Collect notes (FIFO-paired per channel and pitch), tempos and meters."""
    scan = _TrackScan()
    pending: dict[tuple[int, int], deque[tuple[int, int]]] = defaultdict(deque)
    tick = 0
    for msg in track:
        tick += msg.time
        kind = msg.type
        if kind == "note_on" and msg.velocity > 0:
            pending[msg.channel, msg.note].append((tick, msg.velocity))
        elif kind in ("note_on", "note_off"):
            queue = pending.get((msg.channel, msg.note))
            if queue:
                onset, velocity = queue.popleft()
                scan.notes.append(_tick_note(msg.note, velocity, onset, tick, msg.channel))
            else:
                scan.stray_offs += 1
        elif kind == "set_tempo":
            scan.tempos.append((tick, msg.tempo))
        elif kind == "time_signature":
            scan.time_signatures.append((tick, msg.numerator, msg.denominator))
        elif kind == "track_name" and not scan.name:
            scan.name = msg.name.strip()
    for (channel, pitch), queue in pending.items():
        for onset, velocity in queue:
            end = max(tick, onset + 1)  # close at the track's end, >= 1 tick
            scan.notes.append(_tick_note(pitch, velocity, onset, end, channel))
            scan.unclosed += 1
    return scan


def _tick_note(pitch: int, velocity: int, onset: int, end: int, channel: int) -> Note:
    """A note whose beat fields still hold ticks (divided later)."""
    return Note(pitch, velocity, 0.0, 0.0, float(onset), float(end - onset), None, channel)


def _warn_pairing(label: str, scans: list[_TrackScan]) -> None:
    """One warning for the whole file when note pairing needed repairs."""
    unclosed = sum(s.unclosed for s in scans)
    stray = sum(s.stray_offs for s in scans)
    if unclosed or stray:
        log.warning(
            "%s: %d note(s) never released (closed at the end of their track), "
            "%d note-off(s) without a note-on (ignored)",
            label, unclosed, stray,
        )


def _part_names(scans: list[_TrackScan]) -> list[str | None]:
    """A unique part name per track with notes, None for the others.

    A track keeps its own name when no other track with notes shares it;
    otherwise it becomes ``"<name> (track N)"``, or ``"track N"`` if unnamed
    (N is the track's index in the file).
    """
    counts = Counter(s.name for s in scans if s.notes)
    used: set[str] = set()
    names: list[str | None] = []
    for index, scan in enumerate(scans):
        if not scan.notes:
            names.append(None)
            continue
        if scan.name and counts[scan.name] == 1:
            part = scan.name
        else:
            part = f"{scan.name} (track {index})" if scan.name else f"track {index}"
        part = _unique(part, used)
        used.add(part)
        names.append(part)
    return names


def _unique(name: str, used: set[str]) -> str:
    candidate, k = name, 2
    while candidate in used:
        candidate, k = f"{name} #{k}", k + 1
    return candidate


def _tempo_map(scans: list[_TrackScan], tpb: int, label: str) -> TempoMap:
    """All tracks' tempo changes; 120 BPM until the first one (MIDI default)."""
    by_tick: dict[int, int] = {}
    for tick, tempo in sorted(
        (t for s in scans for t in s.tempos), key=lambda item: item[0]
    ):
        if tempo <= 0:
            raise MidiFileError(f"cannot read MIDI file {label}: tempo 0 at tick {tick}")
        by_tick[tick] = tempo  # the last change at a tick wins
    if 0 not in by_tick:
        by_tick[0] = DEFAULT_TEMPO
    return TempoMap((tick / tpb, tempo) for tick, tempo in by_tick.items())


def _time_signatures(scans: list[_TrackScan], tpb: int) -> list[tuple[float, int, int]]:
    by_tick: dict[int, tuple[int, int]] = {}
    for tick, num, den in sorted(
        (t for s in scans for t in s.time_signatures), key=lambda item: item[0]
    ):
        by_tick[tick] = (num, den)
    if not by_tick:
        return [(0.0, 4, 4)]
    return [(tick / tpb, num, den) for tick, (num, den) in sorted(by_tick.items())]


def _default_name(mid: mido.MidiFile, scans: list[_TrackScan]) -> str:
    if scans and not scans[0].notes and scans[0].name:
        return scans[0].name
    return Path(mid.filename).stem if mid.filename else ""


def _label(path_or_file: object) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return repr(os.fspath(path_or_file))
    return repr(getattr(path_or_file, "name", "<memory>"))


def _check_division(mid: mido.MidiFile, label: str) -> int:
    """The file's ticks per beat, or MidiFileError for a time division coplayer cannot time."""
    tpb = mid.ticks_per_beat
    if tpb <= 0:
        raise MidiFileError(
            f"cannot read MIDI file {label}: SMPTE or zero time division ({tpb}) "
            "is not supported; re-save it with ticks per beat"
        )
    return tpb


def _is_empty(path_or_file: object) -> bool:
    if not isinstance(path_or_file, (str, os.PathLike)):
        return False
    try:
        return os.path.getsize(path_or_file) == 0
    except OSError:
        return False


def _reason(error: BaseException) -> str:
    """A short, one-line reason for a parse failure."""
    if isinstance(error, EOFError):
        return "the file ends too early (truncated?)"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, (IndexError, struct.error)):
        return "an event's data is too short (not a valid standard MIDI file)"
    if isinstance(error, KeySignatureError):
        return "invalid key signature (not a valid standard MIDI file)"
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{text} (not a valid standard MIDI file)"


# --------------------------------------------------------------------------
# Writing


def check_not_input(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """MidiFileError if writing ``dst`` would overwrite the input ``src``: the same
    file by another spelling of its path, a symbolic or a hard link."""
    try:
        same = os.path.samefile(src, dst)
    except OSError:  # either is missing: dst cannot be src (a missing src is reported on reading)
        same = False
    if same:
        raise MidiFileError(f"the output {os.fspath(dst)!r} is the input file {os.fspath(src)!r}; "
                            "writing it would destroy the input: choose another -o")


class _Row(NamedTuple):
    """One note in ticks, ready to become a note-on/note-off pair."""

    on: int
    end: int
    pitch: int
    channel: int
    velocity: int


def write_midi(
    score: Score,
    path: str | os.PathLike[str] | BinaryIO,
    *,
    programs: dict[str, int] | None = None,
    channels: dict[str, int] | None = None,
    tracks: list[str] | None = None,
) -> None:
    """Write ``score`` as a type 1 MIDI file; see :func:`score_to_midifile`."""
    mid = score_to_midifile(score, programs=programs, channels=channels, tracks=tracks)
    try:
        if hasattr(path, "write"):
            mid.save(file=path)
        else:
            mid.save(os.fspath(path))
    except OSError as error:
        raise MidiFileError(f"cannot write MIDI file {_label(path)}: {_reason(error)}") from error


def score_to_midifile(
    score: Score,
    *,
    programs: dict[str, int] | None = None,
    channels: dict[str, int] | None = None,
    tracks: list[str] | None = None,
) -> mido.MidiFile:
    """Build a type 1 :class:`mido.MidiFile` from ``score``.

    Track 0 holds the tempo map and time signatures (named ``score.name``).
    Then one track per part, in the order of ``tracks`` (default
    ``score.parts``), then parts only found in notes, then notes without a
    part in a track named ``"input"``.  ``programs[part]`` adds a program
    change at tick 0; ``channels[part]`` overrides the notes' channels.
    """
    tpb = score.ticks_per_beat
    if not 1 <= tpb <= 0x7FFF:
        raise MidiFileError(f"cannot write MIDI: ticks_per_beat must be 1..32767, got {tpb}")
    programs, channels = programs or {}, channels or {}
    mid = mido.MidiFile(type=1, ticks_per_beat=tpb)
    mid.tracks.append(_conductor_track(score, tpb))
    nested = 0
    for part, notes in _group_by_track(score.notes, tracks or score.parts):
        rows = _note_rows(notes, tpb, part, _checked(channels.get(part), 15, "channel", part))
        nested += _nested_count(rows)
        program = _checked(programs.get(part), 127, "program", part)
        mid.tracks.append(_part_track(part, rows, program, channels.get(part)))
    if nested:
        log.warning(
            "%d note(s) lie inside a longer note of the same pitch, track and "
            "channel; MIDI pairs note-offs first-in-first-out, so their ends "
            "will read back swapped (put them in another part or channel)",
            nested,
        )
    return mid


def _conductor_track(score: Score, tpb: int) -> mido.MidiTrack:
    events: list[tuple[int, int, mido.MetaMessage]] = []
    try:
        for beat, num, den in score.time_signatures:
            msg = mido.MetaMessage("time_signature", numerator=num, denominator=den)
            events.append((round(beat * tpb), 0, msg))
        for beat, tempo in score.tempo.changes:
            if tempo <= 0:
                raise ValueError("tempo must be positive")
            events.append((round(beat * tpb), 1, mido.MetaMessage("set_tempo", tempo=tempo)))
    except ValueError as error:
        raise MidiFileError(f"cannot write MIDI: bad tempo or time signature: {error}") from error
    events.sort(key=lambda e: (e[0], e[1]))
    head = [mido.MetaMessage("track_name", name=score.name)] if score.name else []
    return _to_track(head, [(tick, msg) for tick, _, msg in events])


def _group_by_track(
    notes: Iterable[Note], order: Iterable[str]
) -> list[tuple[str, list[Note]]]:
    """(track name, notes) in track order; part-less notes go last."""
    groups: dict[str, list[Note]] = {part: [] for part in order}
    loose: list[Note] = []
    for note in notes:
        if note.part is None:
            loose.append(note)
        else:
            groups.setdefault(note.part, []).append(note)
    result = list(groups.items())
    if loose:
        result.append((_unique(INPUT_TRACK, set(groups)), loose))
    return result


def _note_rows(notes: list[Note], tpb: int, part: str, channel: int | None) -> list[_Row]:
    """Notes in ticks, sorted by (onset, end): the order note-ons are written."""
    rows = []
    for note in notes:
        _check_note(note, part)
        on = round(note.onset_beats * tpb)
        end = on + max(1, round(note.duration_beats * tpb))
        ch = note.channel if channel is None else channel
        rows.append(_Row(on, end, note.pitch, ch, note.velocity))
    rows.sort()
    return rows


def _check_note(note: Note, part: str) -> None:
    problem = None
    if not 0 <= note.pitch <= 127:
        problem = f"pitch {note.pitch} is outside 0..127"
    elif not 1 <= note.velocity <= 127:
        problem = f"velocity {note.velocity} is outside 1..127 (0 would mean note-off)"
    elif not 0 <= note.channel <= 15:
        problem = f"channel {note.channel} is outside 0..15"
    elif note.onset_beats < 0:
        problem = f"onset {note.onset_beats} beats is negative"
    if problem:
        raise MidiFileError(f"cannot write MIDI: a note in track {part!r}: {problem}")


def _checked(value: int | None, high: int, what: str, part: str) -> int | None:
    if value is not None and not 0 <= value <= high:
        raise MidiFileError(f"cannot write MIDI: {what} {value} for {part!r} is outside 0..{high}")
    return value


def _nested_count(rows: list[_Row]) -> int:
    """Notes that end before an earlier note of the same pitch and channel."""
    latest_end: dict[tuple[int, int], int] = {}
    nested = 0
    for row in rows:
        key = (row.channel, row.pitch)
        if row.end < latest_end.get(key, -1):
            nested += 1
        latest_end[key] = max(row.end, latest_end.get(key, -1))
    return nested


def _part_track(
    part: str, rows: list[_Row], program: int | None, channel: int | None
) -> mido.MidiTrack:
    """A part's track: name, program changes, then notes.

    At equal ticks note-offs come before note-ons (a repeated pitch
    re-strikes), and both follow the rows' order, so FIFO pairing on
    reading matches every note-off to its own note-on.
    """
    head: list[mido.Message | mido.MetaMessage] = [mido.MetaMessage("track_name", name=part)]
    if program is not None:
        used = [channel] if channel is not None else sorted({r.channel for r in rows}) or [0]
        head += [mido.Message("program_change", channel=c, program=program) for c in used]
    events = []
    for seq, row in enumerate(rows):
        on = mido.Message("note_on", channel=row.channel, note=row.pitch, velocity=row.velocity)
        off = mido.Message("note_off", channel=row.channel, note=row.pitch, velocity=0)
        events.append((row.end, 0, seq, off))
        events.append((row.on, 1, seq, on))
    events.sort(key=lambda e: e[:3])
    return _to_track(head, [(tick, msg) for tick, _, _, msg in events])


def _to_track(head: list, timed: list[tuple[int, object]]) -> mido.MidiTrack:
    """A track from messages at tick 0 and (absolute tick, message) pairs."""
    track = mido.MidiTrack(head)
    now = 0
    for tick, msg in timed:
        track.append(msg.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track
