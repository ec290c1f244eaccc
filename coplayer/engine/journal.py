"""The session journal: what is played reaches the disk within a second, so a
run that does not finish (SIGKILL, a power cut, a crash) loses at most the
last second of the musician's recording.

A journal is a text file in the session folder,
``.session-YYYYmmdd-HHMMSS-PID.journal``.  Its first line is a JSON object
(the parts, their programs and channels, the tempo, when the run started,
its pid); then one JSON array per line:

* ``[beat, track, status, data1, data2]``: a note message (track: the
  part's name, or null for the input), at its beat by the engine's clock;
* ``["bpm", bpm]``: the tempo changed (a recording is written at the last);
* ``["now", beat]``: notes were sounding then (a note the end of the run
  cut off ends at the last such beat).

A line is whole only with its newline: a last line without one (the process
was killed while writing it) is ignored; any other unreadable line is
skipped and counted.  Never pickle: the file is read back by a later run.

:class:`Journal` appends from a thread of its own every ``interval_s``
(``os.write``, ``fsync``), holding an exclusive lock on the file while the
run lives; the note path only appends to a list
(:meth:`~coplayer.engine.session.SessionRecorder.take_new`).
A clean exit writes the .mid and removes the journal.  :func:`recover` turns
each journal whose lock is free (its run is gone) into a .mid beside it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coplayer.engine.session import SessionRecorder, session_path
from coplayer.errors import SessionError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

__all__ = ["JOURNAL_GLOB", "Journal", "Recovered", "read_journal", "recover"]

log = logging.getLogger(__name__)

JOURNAL_GLOB = ".session-*.journal"
FORMAT = "coplayer session journal"
VERSION = 1


def _lock(fd: int) -> bool:
    """Take the journal's exclusive lock without waiting; False if a live run holds it.
    The system releases it when its process ends, however it ends."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows, untested
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _line(item: object) -> str:
    return json.dumps(item, separators=(",", ":")) + "\n"


class Journal:
    """A locked file in the session folder to which :meth:`start` appends a
    :class:`SessionRecorder`'s new messages, flushed and synced at least
    every ``interval_s``."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd
        self._size = os.fstat(fd).st_size  # the bytes known whole on disk
        self._pending: list[str] = []  # lines a failed write left to write again
        self._recorder: SessionRecorder | None = None
        self._bpm: Callable[[], float] = lambda: 0.0
        self._last_bpm: float | None = None
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def create(cls, directory: str | Path, header: dict) -> Journal:
        """A new journal in ``directory`` whose first line is ``header`` (plus
        the format, the start time and the pid), locked while this process
        lives; :class:`SessionError` (one line) if it cannot be written."""
        started = time.time()
        name = time.strftime(".session-%Y%m%d-%H%M%S", time.localtime(started)) + f"-{os.getpid()}.journal"
        path = Path(directory) / name
        head = {"format": FORMAT, "version": VERSION, "started": started, "pid": os.getpid(), **header}
        fd = -1
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            if not _lock(fd):
                raise OSError(f"{path} is locked by another process")
            _write_all(fd, _line(head).encode())
            os.fsync(fd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
                path.unlink(missing_ok=True)
            raise SessionError(f"cannot write the session journal {path}: {exc.strerror or exc}") from None
        return cls(path, fd)

    def start(self, recorder: SessionRecorder, bpm: Callable[[], float], interval_s: float) -> Journal:
        """Append what ``recorder`` takes from now on; ``bpm()`` is the tempo."""
        self._recorder, self._bpm, self._last_bpm = recorder, bpm, None  # the first flush says the tempo
        recorder.keep_new()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="coplayer-journal",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def flush(self) -> bool:
        """Append what was played since the last flush; True if it is on disk."""
        if self._recorder is None or self._fd < 0:
            return True
        records, sounding = self._recorder.take_new()
        lines = self._pending + [_line([round(beat, 6), track, *data]) for beat, track, data in records]
        bpm = self._bpm()
        if bpm != self._last_bpm:
            lines.append(_line(["bpm", bpm]))
            self._last_bpm = bpm
        if sounding and (records or not self._pending):
            lines.append(_line(["now", round(self._recorder.beat_now(), 6)]))
        if not lines:
            return True
        data = "".join(lines).encode()
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            self._failed(lines, exc)
            return False
        self._size += len(data)
        self._pending = []
        if self._failing:
            self._failing = False
            log.warning("the session journal %s is written again", self.path)
        return True

    def _failed(self, lines: list[str], exc: OSError) -> None:
        """Keep the lines for the next flush; cut a half-written one off the file."""
        self._pending = lines
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            pass  # the next flush writes its lines after the half one, which the reader skips
        if not self._failing:
            self._failing = True
            log.error("cannot write the session journal %s (%s): the session is kept in memory, "
                      "and written at the end if the disk allows", self.path, exc.strerror or exc)

    def stop(self) -> None:
        """Stop the thread after a last flush; the file stays locked."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        self.flush()

    def close(self, remove: bool) -> None:
        """:meth:`stop`, release the lock; ``remove``: delete the file (the
        session is written); else the next start recovers it."""
        self.stop()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            self.path.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- reading back ------------------------------------------------------------------


@dataclass
class Contents:
    """A journal read back: its header, the note messages, the last tempo."""

    header: dict
    records: list[tuple[float, str | None, tuple[int, ...]]] = field(default_factory=list)
    bpm: float = 120.0
    end_beat: float = 0.0
    skipped: int = 0


def read_journal(path: str | Path) -> Contents:
    """Read a journal; ValueError if its header is not a journal's."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if len(lines) < 2:  # not even the header's newline
        raise ValueError("it has no header")
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("its first line is not a coplayer journal's header")
    contents = Contents(header, bpm=float(header.get("bpm", 120.0)))
    for raw in lines[1:-1]:  # the last piece has no newline: empty, or cut off mid-write
        try:
            _take(contents, json.loads(raw))
        except (ValueError, TypeError, IndexError):
            contents.skipped += 1
    return contents


def _take(contents: Contents, item: list) -> None:
    if item[0] == "bpm":
        contents.bpm = float(item[1])
    elif item[0] == "now":
        contents.end_beat = max(contents.end_beat, float(item[1]))
    else:
        beat, track, *data = item
        if len(data) != 3 or not (track is None or isinstance(track, str)):
            raise ValueError(f"not a note record: {item!r}")
        contents.records.append((float(beat), track, tuple(int(b) for b in data)))
        contents.end_beat = max(contents.end_beat, float(beat))


@dataclass
class Recovered:
    path: Path
    started: float
    played: int  # the musician's notes
    answered: int  # coplayer's notes

    def message(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        notes = "note" if self.played == 1 else "notes"
        return (f"recovered the session of {when} ({self.played} {notes} played, {self.answered} from coplayer) "
                f"from a run that did not finish: {self.path}")


def recover(directory: str | Path) -> list[Recovered]:
    """Turn every journal in ``directory`` left by a run that is gone into a
    .mid (named by that run's start) and remove it; a journal without notes
    is removed; one that cannot be read is left as it is, with a warning."""
    found = []
    for path in sorted(Path(directory).glob(JOURNAL_GLOB)):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:  # removed meanwhile, or not ours to touch
            continue
        try:
            if _lock(fd):  # else a live run writes it
                found += _recover_one(path)
        finally:
            os.close(fd)
    return found


def _recover_one(path: Path) -> list[Recovered]:
    try:
        contents = read_journal(path)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the session journal %s (%s); it is left as it is", path, exc)
        return []
    if contents.skipped:
        log.warning("the session journal %s: %d unreadable lines skipped", path, contents.skipped)
    header = contents.header
    recorder = SessionRecorder(lambda t: t)
    for beat, track, data in contents.records:
        recorder.add(track, data, beat)
    if not len(recorder):
        path.unlink()
        return []
    parts = list(header.get("parts", []))
    started = float(header.get("started", path.stat().st_mtime))
    try:
        out = recorder.write(session_path(path.parent, started), parts, contents.bpm,
                             programs=header.get("programs"), channels=header.get("channels"),
                             end_beat=contents.end_beat)
    except SessionError as exc:
        log.warning("%s; the journal %s is kept for the next start", exc, path)
        return []
    try:
        path.unlink()
    except OSError as exc:  # the next start would recover it again
        log.warning("recovered %s, but cannot remove its journal %s (%s): remove it by hand", out, path,
                    exc.strerror or exc)
    notes = recorder.score(parts, contents.bpm, end_beat=contents.end_beat).notes
    played = sum(1 for n in notes if n.part is None)
    return [Recovered(out, started, played, len(notes) - played)]

