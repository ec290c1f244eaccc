"""Session recording: what the player played and what every part played.

The engine hands :meth:`SessionRecorder.message` every note message it
receives (track None: the input) and every note message it sends to a part
(track: the part's name), with the message's time.  Times become beats at
once, through the clock the engine plays by (a tempo change later does not
move earlier notes).  Note-offs pair with note-ons first in, first out, per
track, channel and pitch, as everywhere in coplayer.

:meth:`SessionRecorder.write` makes a multi-track .mid: one named track per
part, then an ``input`` track; notes still sounding end at the time of
writing.  It can be called any number of times (OSC ``/coplayer/record``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from coplayer.data.midi import write_midi
from coplayer.data.notes import Note, Score, TempoMap
from coplayer.io.ports import Message, now_ns

__all__ = ["SessionRecorder", "session_path"]


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


class SessionRecorder:
    """Collects the notes of a session, thread-safe (worker and responder)."""

    def __init__(self, beats: Callable[[int], float], now: Callable[[], int] = now_ns) -> None:
        self._beats = beats
        self._now = now
        self._lock = threading.Lock()
        self._notes: list[Note] = []
        self._open: dict[tuple[str | None, int, int], deque[Note]] = {}

    def message(self, track: str | None, data: Message, t_ns: int) -> None:
        """Take one message of ``track`` (None: the input); notes only."""
        kind = data[0] & 0xF0
        if data[0] >= 0xF0 or kind not in (0x80, 0x90):
            return
        beat = self._beats(t_ns)
        key = (track, data[0] & 0x0F, data[1])
        with self._lock:
            if kind == 0x90 and data[2]:
                note = Note(data[1], data[2], 0.0, 0.0, onset_beats=beat, part=track, channel=key[1])
                self._open.setdefault(key, deque()).append(note)
            else:
                self._close(key, beat)

    def _close(self, key: tuple, beat: float) -> None:
        queue = self._open.get(key)
        if not queue:
            return  # a note-off without its note-on: nothing to record
        note = queue.popleft()
        if not queue:
            del self._open[key]
        note.duration_beats = max(0.0, beat - note.onset_beats)
        self._notes.append(note)

    def __len__(self) -> int:
        with self._lock:
            return len(self._notes) + sum(len(q) for q in self._open.values())

    def score(self, parts: Sequence[str], bpm: float, end_ns: int | None = None) -> Score:
        """Every note so far (sounding ones end at ``end_ns``, default now) as
        a Score at ``bpm``; beats are shifted so that none is negative."""
        end = self._beats(self._now() if end_ns is None else end_ns)
        with self._lock:
            notes = [_copy(n) for n in self._notes]
            notes += [_copy(n, max(0.0, end - n.onset_beats)) for q in self._open.values() for n in q]
        shift = min([0.0, *(n.onset_beats for n in notes)])
        for n in notes:
            n.onset_beats -= shift
        score = Score(notes=notes, tempo=TempoMap([(0.0, round(60e6 / bpm))]), parts=list(parts),
                      name="coplayer session")
        return score.fill_seconds().sort()

    def write(self, path: str | Path, parts: Sequence[str], bpm: float, *,
              programs: dict[str, int] | None = None, channels: dict[str, int] | None = None) -> Path:
        """Write the session so far to ``path`` (directories are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_midi(self.score(parts, bpm), path, programs=programs, channels=channels, tracks=list(parts))
        return path


def _copy(note: Note, duration_beats: float | None = None) -> Note:
    beats = note.duration_beats if duration_beats is None else duration_beats
    return Note(note.pitch, note.velocity, 0.0, 0.0, note.onset_beats, beats, note.part, note.channel)
