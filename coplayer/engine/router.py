"""Where each played message goes: note pairing, controller mirroring, feedback.

Pure bookkeeping, no threads and no I/O; the engine's worker owns a
:class:`Router` and a :class:`ControllerMirror` (one thread, no locks), the
:class:`FeedbackGuard` is shared with the responder's thread (it locks).

* :class:`Router`: every routed note-on is remembered under its *input*
  (channel, pitch), first in first out, with the :class:`Target` (port and
  channel) it went to.  The note-off of that key goes to the same target,
  whatever happened in between (a mode change, a mute, a new model).
* :class:`ControllerMirror`: the player's controllers (sustain pedal, pitch
  bend, modulation, aftertouch, ...) are sent to the targets that are
  sounding, and to every target that was told another value of the same
  controller (so pedal-up reaches every part that got pedal-down).  A
  target that starts a note first gets the player's current values it
  lacks (a pedal pressed before the first note still holds it).
* :class:`FeedbackGuard`: coplayer's own output coming back on its input
  (a DAW track armed with monitoring) is recognised and dropped.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coplayer.io.ports import BaseOutput, Message

__all__ = ["ControllerMirror", "FeedbackGuard", "Held", "Router", "Target", "note_off_of"]

NOTE_OFF, NOTE_ON, POLY_PRESSURE, CONTROL, PROGRAM, PRESSURE, BEND = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0
RESET_CONTROLLERS = 121
# Controllers whose meaning depends on the messages around them (bank select,
# data entry and (N)RPN numbers) or that act on the channel (120-127): sent
# as they come, never replayed to a target that starts a note later.
_SEQUENCED = frozenset({0, 6, 32, 38, 96, 97, 98, 99, 100, 101, *range(120, 128)})


@dataclass(frozen=True)
class Target:
    """One destination: ``part`` (None for pass-through), a port, a channel.

    ``channel`` None keeps the channel of each message (pass-through).
    """

    part: str | None
    port: BaseOutput
    channel: int | None

    def address(self, data: Message) -> Message:
        """``data`` with this target's channel (system messages unchanged)."""
        if self.channel is None or data[0] >= 0xF0:
            return data
        return ((data[0] & 0xF0) | self.channel, *data[1:])

    def __repr__(self) -> str:
        channel = "thru" if self.channel is None else self.channel + 1
        return f"<Target {self.part or '-'} {self.port.name!r} ch {channel}>"


def note_off_of(data: Message) -> bool:
    """True for a note-off, including a note-on with velocity 0."""
    kind = data[0] & 0xF0
    return kind == NOTE_OFF or (kind == NOTE_ON and data[2] == 0)


class Held:
    """A note the player holds: where its note-on went, and whether it sounds
    (False when its part was muted, or the note was released by a panic)."""

    __slots__ = ("target", "pitch", "sounded")

    def __init__(self, target: Target, pitch: int, sounded: bool) -> None:
        self.target, self.pitch, self.sounded = target, pitch, sounded

    def note_off(self, velocity: int = 0) -> Message:
        return self.target.address((NOTE_OFF, self.pitch, velocity))


class Router:
    """The routing table of held notes, keyed by input (channel, pitch)."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int], deque[Held]] = {}

    def note_on(self, channel: int, pitch: int, target: Target, sounded: bool) -> Held:
        held = Held(target, pitch, sounded)
        self._held.setdefault((channel, pitch), deque()).append(held)
        return held

    def note_off(self, channel: int, pitch: int) -> Held | None:
        """The oldest held note of this key, removed; None if none is held."""
        queue = self._held.get((channel, pitch))
        if not queue:
            return None
        held = queue.popleft()
        if not queue:
            del self._held[channel, pitch]
        return held

    def holder(self, channel: int, pitch: int) -> Held | None:
        """The oldest held note of this key (poly aftertouch goes there)."""
        queue = self._held.get((channel, pitch))
        return queue[0] if queue else None

    def sounding(self) -> set[Target]:
        """Targets holding at least one sounding note."""
        return {h.target for queue in self._held.values() for h in queue if h.sounded}

    def silence(self, keep: Callable[[Target], bool] = lambda t: False) -> list[Held]:
        """Mark sounding notes of targets not kept as silent; returns them
        (the caller sends their note-offs).  Their keys stay held, so the
        player's note-offs are still paired, and not sent twice."""
        released = []
        for queue in self._held.values():
            for held in queue:
                if held.sounded and not keep(held.target):
                    held.sounded = False
                    released.append(held)
        return released

    def __len__(self) -> int:
        return sum(len(q) for q in self._held.values())


def _controller_key(data: Message) -> tuple[int, int] | None:
    """(kind, number) of a controller the mirror tracks, else None."""
    kind = data[0] & 0xF0
    if kind == CONTROL:
        return None if data[1] in _SEQUENCED else (CONTROL, data[1])
    if kind in (BEND, PRESSURE):
        return (kind, 0)
    return None


def _value(data: Message) -> tuple[int, ...]:
    return data[2:] if data[0] & 0xF0 == CONTROL else data[1:]


class ControllerMirror:
    """What each target has been told of the player's controllers."""

    def __init__(self) -> None:
        self._current: dict[int, dict[tuple[int, int], Message]] = {}  # input channel -> key -> last message
        self._told: dict[Target, dict[tuple[int, int], tuple[int, ...]]] = {}

    def targets(self, data: Message, sounding: set[Target], everyone: Iterable[Target]) -> list[Target]:
        """Where a controller message from the player goes, and remember it."""
        channel, key = data[0] & 0x0F, _controller_key(data)
        if key is None:  # sequenced controllers: to the sounding targets, else to all
            if data[0] & 0xF0 == CONTROL and data[1] == RESET_CONTROLLERS:
                return self._reset(channel, sounding) or list(everyone)
            return list(sounding) or list(everyone)
        self._current.setdefault(channel, {})[key] = data
        value = _value(data)
        stale = [t for t, told in self._told.items() if key in told and told[key] != value]
        return list(dict.fromkeys([*sounding, *stale]))

    def told(self, target: Target, data: Message) -> None:
        """``data`` was sent to ``target``."""
        key = _controller_key(data)
        if key is not None:
            self._told.setdefault(target, {})[key] = _value(data)

    def catch_up(self, channel: int, target: Target) -> list[Message]:
        """The player's current controllers of ``channel`` that ``target`` lacks."""
        current = self._current.get(channel)
        if not current:  # the usual case, before every note-on: nothing to catch up
            return []
        told = self._told.get(target, {})
        return [m for key, m in current.items() if told.get(key) != _value(m)]

    def forget(self) -> None:
        """Targets were reset (a panic): they know nothing any more."""
        self._told.clear()

    def _reset(self, channel: int, sounding: set[Target]) -> list[Target]:
        """Reset All Controllers: to every target told anything, which then
        knows nothing; the channel's current values are forgotten."""
        targets = list(dict.fromkeys([*sounding, *self._told]))
        self._current.pop(channel, None)
        self._told.clear()
        return targets


class FeedbackGuard:
    """Recognises coplayer's own output arriving back on its input.

    Every message sent is remembered with its send time and its *source*
    (the input (channel, pitch) of a routed note, or None) with the source's
    arrival time.  A message that arrives at most ``window_ns`` after an
    equal one was sent is an echo, except a note-on whose source is on its
    own channel when the player released that key after the source arrived
    (the player struck the key again).  The note-off of a dropped note-on is
    dropped too.  Releases and sources compare arrival times, so a backlog
    in the engine's queue changes nothing (comparing the release with the
    send time dropped fast repeated notes as echoes: 812 of 3,000 at 1,000
    notes/s through JACK).
    """

    KEEP_NS = 10_000_000_000  # records kept at least this long (longer than any backlog)

    def __init__(self, window_ns: int = 30_000_000) -> None:
        self.window_ns = window_ns
        self.dropped = 0
        self._recent: dict[tuple, deque[tuple[int, tuple[int, int] | None, int]]] = {}
        self._order: deque[tuple[int, tuple]] = deque()
        self._pending: Counter = Counter()  # (channel, pitch) -> echo note-offs still to come
        self._released: dict[tuple[int, int], int] = {}  # input key -> arrival of its last note-off
        self._lock = threading.Lock()

    @staticmethod
    def _key(data: Message) -> tuple:
        if data[0] < 0xF0 and note_off_of(data):
            return ("off", data[0] & 0x0F, data[1])
        return data

    def sent(self, data: Message, t_ns: int, source: tuple[int, int] | None = None, source_ns: int = 0) -> None:
        """``data`` was sent at ``t_ns``; ``source`` (channel, pitch) arrived at ``source_ns``."""
        key = self._key(data)
        with self._lock:
            self._prune(t_ns - self.KEEP_NS)
            self._recent.setdefault(key, deque()).append((t_ns, source, source_ns))
            self._order.append((t_ns, key))

    def _prune(self, before_ns: int) -> None:
        order, recent = self._order, self._recent
        while order and order[0][0] < before_ns:
            _, key = order.popleft()
            entries = recent[key]
            entries.popleft()
            if not entries:
                del recent[key]

    def is_echo(self, data: Message, t_ns: int, held: Callable[[int, int], bool]) -> bool:
        """True if ``data``, arrived at ``t_ns``, is an echo (and count it).
        ``held(channel, pitch)``: does the player hold that input key?"""
        key = self._key(data)
        with self._lock:
            self._prune(t_ns - self.window_ns)
            records = self._recent.get(key)  # usually none: then no comprehension to run (every note waits for this)
            sent = [(source, source_ns) for sent_ns, source, source_ns in records if sent_ns <= t_ns] if records else ()
            if key[0] == "off":
                echo = self._echo_off(key[1:], bool(sent), held)
                if not echo:
                    self._released[key[1:]] = t_ns
            elif data[0] & 0xF0 == NOTE_ON:
                echo = bool(sent) and any(self._echo_on(data, source, source_ns) for source, source_ns in sent)
                if echo:
                    self._pending[data[0] & 0x0F, data[1]] += 1
            else:
                echo = bool(sent)
            self.dropped += echo
        return echo

    def _echo_on(self, data: Message, source: tuple[int, int] | None, source_ns: int) -> bool:
        if source is None or source[0] != data[0] & 0x0F:
            return True
        return self._released.get(source, -1) < source_ns  # not released since: the key was not struck again

    def _echo_off(self, key: tuple[int, int], recent: bool, held: Callable[[int, int], bool]) -> bool:
        if not self._pending[key]:
            return False
        if recent or not held(*key):
            self._pending[key] -= 1
            return True
        return False
