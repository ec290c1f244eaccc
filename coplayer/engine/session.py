"""Session recording: what the player played and what every part played.

The engine hands :meth:`SessionRecorder.message` every note message it
receives (track None: the input) and every note message it sends to a part
(track: the part's name), with the message's time.  Times become beats at
once, through the clock the engine plays by (a tempo change later does not
move earlier notes).  Note-offs pair with note-ons first in, first out, per
track, channel and pitch, as everywhere in coplayer.

:meth:`SessionRecorder.write` makes a multi-track .mid: one named track per
part, then an ``input`` track; notes still sounding end at the time of
writing.  It can be called any number of times (OSC ``/coplayer/record``);
each file appears whole or not at all (written aside, then renamed).

While playing, the recorder also keeps the messages a
:class:`~coplayer.engine.journal.Journal` has not yet taken
(:meth:`SessionRecorder.take_new`): the journal appends them to disk from
its own thread, so no file is touched on the note path.

The session folder (``session.directory``): :func:`folder_problem` says why
it cannot be used, without creating anything; :func:`prepare_folder` creates
it; :class:`SnapshotGate` keeps ``/coplayer/record`` to one file every few
seconds and refuses new snapshots past the folder's budget.  coplayer never
deletes a recording.
"""

from __future__ import annotations

import itertools
from array import array
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from coplayer.data.midi import write_midi
from coplayer.data.notes import Note, Score, TempoMap
from coplayer.errors import MidiFileError, SessionError
from coplayer.io.ports import Message, now_ns

__all__ = ["SNAPSHOT_INTERVAL_S", "SessionRecorder", "SnapshotGate", "folder_bytes", "folder_problem",
           "prepare_folder", "session_path"]

SNAPSHOT_INTERVAL_S = 5.0  # /coplayer/record writes at most one file this often (a flood wrote 843 files)


def session_path(directory: str | Path, stamp: float | None = None) -> Path:
    """A new file name in ``directory``: ``session-YYYYmmdd-HHMMSS.mid``
    (``-2``, ``-3``, ... appended when taken)."""
    base = time.strftime("session-%Y%m%d-%H%M%S", time.localtime(stamp))
    directory = Path(directory)
    for n in itertools.count(1):
        path = directory / (f"{base}.mid" if n == 1 else f"{base}-{n}.mid")
        if not path.exists():
            return path
    raise AssertionError("unreachable")


# --- the folder ----------------------------------------------------------------------


def folder_problem(directory: str | Path) -> str | None:
    """Why ``directory`` cannot hold the recordings, or None; creates nothing
    that stays.  A missing folder is fine when its nearest existing parent
    is a folder coplayer can create it in."""
    path = Path(directory)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder"
    try:
        if existing == path:
            with tempfile.TemporaryFile(dir=path):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as exc:
        reason = exc.strerror or exc
        if existing == path:
            return f"cannot write in {str(path)!r}: {reason}"
        return f"{str(path)!r} cannot be created in {str(existing)!r}: {reason}"
    return None


def prepare_folder(directory: str | Path, key: str = "session.directory") -> Path:
    """Create ``directory`` if missing, after checking that it can hold files;
    :class:`SessionError` (one line, naming the setting ``key``) otherwise."""
    path = Path(directory)
    problem = folder_problem(path)
    if problem:
        raise SessionError(f"{key}: {problem}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SessionError(f"{key}: cannot create {str(path)!r}: {exc.strerror or exc}") from None
    return path


def folder_bytes(directory: str | Path) -> int:
    """The size of the files directly in ``directory`` (0 if it is missing)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    total = 0
    for entry in entries:
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:  # removed meanwhile
            pass
    return total


class SnapshotGate:
    """Whether a snapshot (``/coplayer/record``) may be written now: at most one
    every ``interval_s``, none while the folder holds ``max_mb`` or more."""

    def __init__(self, directory: str | Path, max_mb: float, interval_s: float = SNAPSHOT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory, self.max_mb, self.interval_s, self._clock = Path(directory), max_mb, interval_s, clock
        self._last: float | None = None

    def refusal(self) -> str | None:
        """None (and the snapshot counts as taken now), or why not."""
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            return f"the last one was written {now - self._last:.1f} s ago (at most one every {self.interval_s:g} s)"
        over = self.over_budget()
        if over:
            return over
        self._last = now
        return None

    def over_budget(self) -> str | None:
        """Why the folder is over its budget, or None."""
        mb = folder_bytes(self.directory) / 1e6
        if mb < self.max_mb:
            return None
        return (f"the session folder {str(self.directory)!r} holds {mb:.0f} MB, session.max_mb is "
                f"{self.max_mb:g} (coplayer deletes no recording: move or delete old ones)")


# --- the recorder ----------------------------------------------------------------------


class SessionRecorder:
    """Collects the notes of a session, thread-safe (worker and responder).

    A long session is many notes (an hour at ten notes a second is 36,000,
    each recorded twice: as played in, and as the part that played it):
    the ended notes are kept in columns (:class:`array.array`), about 20
    bytes a note, where a :class:`~coplayer.data.notes.Note` each took some
    150 bytes; :meth:`score` makes the notes when the session is written.
    ``keep=False`` (``session.record: false``) keeps nothing at all."""

    def __init__(self, beats: Callable[[int], float], now: Callable[[], int] = now_ns, *,
                 keep: bool = True) -> None:
        self._beats = beats
        self._now = now
        self.keep = keep
        self._lock = threading.Lock()
        self._tracks: list[str | None] = []  # the tracks' names, in order of their first note
        self._track_index: dict[str | None, int] = {}
        # the ended notes, one column each (ended in this order)
        self._onset, self._duration = array("d"), array("d")  # beats
        self._pitch, self._velocity, self._channel = array("B"), array("B"), array("B")
        self._track = array("H")  # index in _tracks
        self._open: dict[tuple[str | None, int, int], deque[tuple[float, int]]] = {}  # -> (onset, velocity)
        self._new: list[tuple[float, str | None, Message]] | None = None  # kept for the journal

    def message(self, track: str | None, data: Message, t_ns: int) -> None:
        """Take one message of ``track`` (None: the input); notes only."""
        kind = data[0] & 0xF0
        if not self.keep or data[0] >= 0xF0 or kind not in (0x80, 0x90):
            return
        self.add(track, data, self._beats(t_ns))

    def add(self, track: str | None, data: Message, beat: float) -> None:
        """Take one note message of ``track`` at ``beat``."""
        if not self.keep:
            return
        key = (track, data[0] & 0x0F, data[1])
        with self._lock:
            if data[0] & 0xF0 == 0x90 and data[2]:
                self._open.setdefault(key, deque()).append((beat, data[2]))
            else:
                self._close(key, beat)
            if self._new is not None:
                self._new.append((beat, track, data))

    def _close(self, key: tuple, beat: float) -> None:
        queue = self._open.get(key)
        if not queue:
            return  # a note-off without its note-on: nothing to record
        onset, velocity = queue.popleft()
        if not queue:
            del self._open[key]
        track, channel, pitch = key
        index = self._track_index.get(track)
        if index is None:
            index = self._track_index[track] = len(self._tracks)
            self._tracks.append(track)
        self._onset.append(onset)
        self._duration.append(max(0.0, beat - onset))
        self._pitch.append(pitch)
        self._velocity.append(velocity)
        self._channel.append(channel)
        self._track.append(index)

    def keep_new(self) -> None:
        """From now on, keep every message taken for :meth:`take_new`."""
        with self._lock:
            if self._new is None:
                self._new = []

    def take_new(self) -> tuple[list[tuple[float, str | None, Message]], bool]:
        """The (beat, track, message) taken since the last call, and whether a
        note is sounding now."""
        with self._lock:
            new = self._new
            if new is None:
                return [], bool(self._open)
            self._new = []
            return new, bool(self._open)

    def beat_now(self) -> float:
        return self._beats(self._now())

    def __len__(self) -> int:
        with self._lock:
            return len(self._onset) + sum(len(q) for q in self._open.values())

    def ended_notes(self) -> list[Note]:
        """The notes ended so far, in the order they ended."""
        with self._lock:
            return self._ended_locked()

    def _ended_locked(self) -> list[Note]:
        columns = (self._pitch, self._velocity, self._onset, self._duration, self._track, self._channel)
        return [Note(pitch, velocity, 0.0, 0.0, onset, duration, self._tracks[track], channel)
                for pitch, velocity, onset, duration, track, channel in zip(*columns)]

    def score(self, parts: Sequence[str], bpm: float, end_ns: int | None = None, *,
              end_beat: float | None = None) -> Score:
        """Every note so far (sounding ones end at ``end_beat``, else at
        ``end_ns``, default now) as a Score at ``bpm``; beats are shifted so
        that none is negative."""
        if end_beat is None:
            end_beat = self._beats(self._now() if end_ns is None else end_ns)
        with self._lock:
            notes = self._ended_locked()
            notes += [Note(pitch, velocity, 0.0, 0.0, onset, max(0.0, end_beat - onset), track, channel)
                      for (track, channel, pitch), q in self._open.items() for onset, velocity in q]
        shift = min([0.0, *(n.onset_beats for n in notes)])
        for n in notes:
            n.onset_beats -= shift
        score = Score(notes=notes, tempo=TempoMap([(0.0, round(60e6 / bpm))]), parts=list(parts),
                      name="coplayer session")
        return score.fill_seconds().sort()

    def write(self, path: str | Path, parts: Sequence[str], bpm: float, *,
              programs: dict[str, int] | None = None, channels: dict[str, int] | None = None,
              end_beat: float | None = None) -> Path:
        """Write the session so far to ``path`` (directories are created), whole
        or not at all; :class:`SessionError` (one line) if it cannot be written."""
        score = self.score(parts, bpm, end_beat=end_beat)
        return write_atomically(Path(path), lambda f: write_midi(score, f, programs=programs, channels=channels,
                                                                   tracks=list(parts)))


def write_atomically(path: Path, write: Callable) -> Path:
    """``write(file)`` into a file beside ``path``, synced, then renamed to ``path``."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        # os.open, not mkstemp: the file gets the umask's mode (mkstemp's is 0600), as any the user writes
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, MidiFileError) as exc:
        if tmp is not None:
            _unlink_quietly(tmp)
        cause = exc.__cause__ if isinstance(exc, MidiFileError) else exc
        reason = getattr(cause, "strerror", None) or str(cause)
        raise SessionError(f"cannot write the session to {path}: {reason}") from None
    return path


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # the folder went: nothing is left to remove
        pass
