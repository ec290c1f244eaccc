"""The port interface: what the engine sees of a MIDI input or output.

Modelled on mido's ``ports.py``: :class:`BaseInput` and :class:`BaseOutput`
own every public method (``send``, ``close``, ``panic``, ``reset``, the
context manager); a backend overrides only ``_open``, ``_send`` and
``_close``.  Messages are plain tuples of ints as on the wire, e.g.
``(0x90, 60, 100)``; ``send`` also takes bytes, lists and ``mido.Message``.

Note hygiene lives here.  An output counts its note-ons per (channel, pitch)
and its note-offs decrement them, so :meth:`BaseOutput.sounding` is exact;
``panic``, ``reset`` and ``close`` send a note-off for every note still
sounding, lift a held sustain pedal, and send All Notes Off on every channel
the port used.  Channels here are 0-15, as on the wire.

An input calls ``on_message(data, t_ns)`` for every valid message, from the
backend's thread; ``t_ns`` is :func:`now_ns` taken on arrival.  The owner's
handler must be quick (enqueue and return).  Invalid bytes are dropped and
counted in ``dropped``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from coplayer.errors import CoplayerError, PortNotFoundError

__all__ = [
    "BaseInput",
    "BasePort",
    "BaseOutput",
    "Message",
    "OpenPorts",
    "NoVirtualPorts",
    "PortError",
    "PortNotFoundError",
    "as_message",
    "find_port",
    "is_valid",
    "sheddable",
    "not_found",
    "now_ns",
    "raise_priority",
]

log = logging.getLogger(__name__)

Message = tuple[int, ...]
"""One complete MIDI message as on the wire: a status byte, then data bytes."""

now_ns: Callable[[], int] = time.perf_counter_ns
"""The clock of every timestamp in coplayer: monotonic, high resolution on
every platform (``time.monotonic`` ticks at ~15 ms on Windows before 3.13)."""

def raise_priority(priority: int, what: str) -> bool:
    """Best effort, as JACK clients do: real-time scheduling (SCHED_FIFO at
    ``priority``, below JACK's own, usually 70+) for the calling thread, so
    other programs' work does not delay a note.  Without the privilege (no
    CAP_SYS_NICE, rtprio limit 0) or off Linux nothing changes; returns
    whether it did."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, OSError) as exc:
        log.debug("%s runs without real-time priority (%s)", what, exc)
        return False
    return True


# Length of each message by status (channel messages by their high nibble).
_CHANNEL_LENGTH = {0x80: 3, 0x90: 3, 0xA0: 3, 0xB0: 3, 0xC0: 2, 0xD0: 2, 0xE0: 3}
_SYSTEM_LENGTH = {0xF1: 2, 0xF2: 3, 0xF3: 2, 0xF6: 1, 0xF8: 1, 0xFA: 1, 0xFB: 1, 0xFC: 1, 0xFE: 1, 0xFF: 1}

# Controllers that end every note on their channel (120 All Sound Off,
# 123 All Notes Off, 124-127 mode changes); 121 resets controllers.
_ENDS_NOTES = frozenset({120, 123, 124, 125, 126, 127})
SUSTAIN, RESET_CONTROLLERS, ALL_SOUND_OFF, ALL_NOTES_OFF = 64, 121, 120, 123


class PortError(CoplayerError, OSError):
    """A MIDI backend failed: it cannot open, a port vanished, a send failed."""


class NoVirtualPorts(PortError):
    """This computer's MIDI system cannot make virtual ports (Windows' WinMM)."""


def not_found(kind: str, wanted: str, available: Iterable[str], matches: int = 0) -> PortNotFoundError:
    """The error for a port name that matches no port, or ``matches`` > 1 ports."""
    names = list(available)
    listing = ", ".join(repr(n) for n in names) if names else "none"
    if matches > 1:
        head = f"MIDI {kind} port name {wanted!r} matches {matches} ports; give more of the name"
    else:
        head = f"no MIDI {kind} port {wanted!r}"
    return PortNotFoundError(f"{head}; available ports: {listing}")


def find_port(names: Sequence[str], wanted: str, kind: str) -> int:
    """Index in ``names`` of the port called ``wanted`` (its full name, or
    its name after ``client:``), else of the only one containing it
    (ignoring case); :class:`PortNotFoundError` otherwise."""
    for i, n in enumerate(names):
        if wanted in (n, n.split(":", 1)[-1]):
            return i
    hits = [i for i, n in enumerate(names) if wanted.casefold() in n.casefold()]
    if len(hits) == 1:
        return hits[0]
    raise not_found(kind, wanted, names, len(hits))


class OpenPorts:
    """A backend's ports still open: closed at interpreter exit (outputs
    first, releasing their notes) if their owner did not close them."""

    def __init__(self) -> None:
        self._ports: set[BasePort] = set()
        self._lock = threading.Lock()
        self._atexit = False

    def add(self, port: "BasePort") -> None:
        with self._lock:
            self._ports.add(port)
            if not self._atexit:
                atexit.register(self.close_all)
                self._atexit = True

    def discard(self, port: "BasePort") -> None:
        with self._lock:
            self._ports.discard(port)

    def close_all(self) -> None:
        """Close every port still open, outputs first."""
        with self._lock:
            ports = sorted(self._ports, key=lambda p: isinstance(p, BaseInput))
        for port in ports:
            port.close()


def is_valid(data: Sequence[int]) -> bool:
    """True if ``data`` is exactly one complete, well-formed MIDI message."""
    if not data:
        return False
    status = data[0]
    if not 0x80 <= status <= 0xFF:
        return False
    if status == 0xF0:  # SysEx: F0, data bytes, F7
        return len(data) >= 2 and data[-1] == 0xF7 and all(0 <= b < 0x80 for b in data[1:-1])
    want = _CHANNEL_LENGTH[status & 0xF0] if status < 0xF0 else _SYSTEM_LENGTH.get(status)
    if want == 3 and len(data) == 3:  # notes: checked in line (every note in and out passes here)
        return 0 <= data[1] < 0x80 and 0 <= data[2] < 0x80
    return len(data) == want and all(0 <= b < 0x80 for b in data[1:])


def sheddable(data: Message) -> bool:
    """A message dropped rather than handled late: a note-on (late is worse
    than never) or SysEx.  Note-offs, controllers (sustain off, All Notes
    Off, coplayer's controls), bends and clock are handled however late."""
    status = data[0]
    return status == 0xF0 or (status & 0xF0 == 0x90 and data[2] > 0)


def as_message(msg: object) -> Message:
    """``msg`` (bytes, a sequence of ints or a ``mido.Message``) as a tuple."""
    if hasattr(msg, "bytes"):  # mido.Message, without importing mido
        return tuple(msg.bytes())
    if isinstance(msg, (bytes, bytearray, memoryview, list, tuple)):
        return tuple(msg)
    raise TypeError(f"expected MIDI bytes or a mido.Message, got {type(msg).__name__}")


def _show(data: Sequence[int]) -> str:
    return " ".join(f"{b:02X}" if isinstance(b, int) and 0 <= b < 256 else repr(b) for b in data[:12])


class BasePort:
    """Name, open/closed state and the context manager of every port."""

    def __init__(self, name: str, **kwargs) -> None:
        self.name = name
        self.closed = True
        self._lock = threading.RLock()  # re-entrant: a memory loop may send from a handler
        self._open(**kwargs)
        self.closed = False

    def _open(self, **kwargs) -> None:
        pass

    def _close(self) -> None:
        pass

    def close(self) -> None:
        """Close the port; calling it again does nothing."""
        with self._lock:
            if self.closed:
                return
            try:
                self._close()
            finally:
                self.closed = True

    def lost(self) -> str | None:
        """Why the port stopped working for good (its MIDI server went
        away), or None while it works.  Backends that can tell override it."""
        return None

    def xruns(self) -> int | None:
        """Xruns the MIDI server reported since this port's client opened
        (messages in the graph may be lost in one), or None if the backend
        cannot tell."""
        return None

    def skipped_cycles(self) -> int | None:
        """The MIDI server's cycles in which this port's client was not run
        (messages sent to it then are lost), or None if the backend cannot tell."""
        return None

    def overflowed(self) -> int | None:
        """Messages into this port's client dropped because its reader fell
        behind, or None if the backend cannot tell."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.name!r} ({state})>"


class BaseInput(BasePort):
    """An input port: calls ``on_message(data, t_ns)`` for each valid message."""

    own_thread = False
    """True when ``on_message`` is called from a thread of the port's own
    that does nothing else, so the handler may do its work there (the
    engine then decides each note in that thread, sparing a thread hop)
    instead of only enqueueing."""

    def waiting(self) -> bool:
        """True if messages wait to be delivered (backends with their own
        buffer say so; the default cannot tell: False)."""
        return False

    def set_idle(self, fn: Callable[[], None] | None, every_s: float) -> bool:
        """Have ``fn()`` called from the input's own thread every ``every_s``
        while no message comes, at moments when none can arrive before it
        returns (``None``: stop).  False where the backend cannot (this
        default): the owner then finds its own moments."""
        return False

    def period_ns(self) -> int | None:
        """How late a message may be stamped after it reached the port (JACK:
        one cycle, as messages are stamped with the start of the cycle that
        brought them), or None where the backend cannot tell."""
        return None

    def set_stale(self, ns: int) -> bool:
        """Have the backend drop :func:`sheddable` messages (note-ons, junk)
        that waited longer than ``ns`` before their delivery, cheaply, before
        Python handles them (counted in :meth:`shed`).  False where it cannot
        (this default): the owner then drops them itself."""
        return False

    def shed(self) -> int | None:
        """Messages the backend dropped as stale (:meth:`set_stale`), or None."""
        return None

    def __init__(self, name: str, *, on_message: Callable[[Message, int], None] | None = None, **kwargs) -> None:
        self.on_message = on_message
        self.dropped = 0  # invalid messages the backend delivered
        self.handler_errors = 0
        super().__init__(name, **kwargs)

    def _deliver(self, data: Message, t_ns: int) -> None:
        """Called by the backend, on its thread, for each incoming message."""
        if not is_valid(data):
            self.dropped += 1
            return
        handler = self.on_message
        if handler is None or self.closed:
            return
        try:
            handler(data, t_ns)
        except Exception:  # the backend's thread must survive the owner's bug
            self.handler_errors += 1
            if self.handler_errors == 1:
                log.exception("the message handler of input %r failed "
                              "(further failures are counted in handler_errors, not logged)", self.name)

    def close(self) -> None:
        super().close()
        self.on_message = None


class BaseOutput(BasePort):
    """An output port that knows which notes it has left sounding."""

    def __init__(self, name: str, **kwargs) -> None:
        self._notes: dict[tuple[int, int], int] = {}  # (channel, pitch) -> note-ons not yet ended
        self._pedal: set[int] = set()  # channels whose sustain pedal is down
        self._channels: set[int] = set()  # channels this port has sent on
        super().__init__(name, **kwargs)

    def _send(self, data: Message) -> None:
        raise NotImplementedError

    def send(self, msg: object) -> None:
        """Send one message; raises ValueError if it is not a complete message,
        :class:`PortError` if the port is closed or the backend fails."""
        data = as_message(msg)
        if not is_valid(data):
            raise ValueError(f"not a complete MIDI message: {_show(data)}")
        with self._lock:
            if self.closed:
                raise PortError(f"MIDI output {self.name!r} is closed")
            self._send(data)
            self._track(data)

    def _track(self, data: Message) -> None:
        status = data[0]
        if status >= 0xF0:
            if status == 0xFF:  # System Reset
                self._notes.clear()
                self._pedal.clear()
            return
        kind, channel = status & 0xF0, status & 0x0F
        self._channels.add(channel)
        if kind == 0x90 and data[2]:
            key = (channel, data[1])
            self._notes[key] = self._notes.get(key, 0) + 1
        elif kind in (0x80, 0x90):  # note-off, or note-on with velocity 0
            key = (channel, data[1])
            left = self._notes.get(key, 0) - 1
            if left > 0:
                self._notes[key] = left
            else:
                self._notes.pop(key, None)
        elif kind == 0xB0:
            self._track_controller(channel, data[1], data[2])

    def _track_controller(self, channel: int, number: int, value: int) -> None:
        if number == SUSTAIN:
            if value >= 64:
                self._pedal.add(channel)
            else:
                self._pedal.discard(channel)
        elif number == RESET_CONTROLLERS:
            self._pedal.discard(channel)
        elif number in _ENDS_NOTES:
            for key in [k for k in self._notes if k[0] == channel]:
                del self._notes[key]

    def clean_on_connect(self) -> bool:
        """Have a connection made to this port before its first note-on
        receive sustain off, All Notes Off and All Sound Off on every channel
        first (the engine's clean start, for a synth connected after it was
        sent).  False where the backend cannot tell of connections (this default)."""
        return False

    def resent(self) -> int | None:
        """Note-offs the backend wrote again because the MIDI server may have
        lost them (JACK: after a skipped cycle or an xrun), or None if the
        backend has no such net."""
        return None

    def sounding(self) -> dict[tuple[int, int], int]:
        """{(channel, pitch): note-ons without their note-off}, channels 0-15."""
        with self._lock:
            return dict(self._notes)

    def _release_messages(self, sound_off: bool, reset: bool) -> list[Message]:
        msgs: list[Message] = []
        for (channel, pitch), count in sorted(self._notes.items()):
            msgs.extend([(0x80 | channel, pitch, 0)] * count)
        msgs.extend((0xB0 | channel, SUSTAIN, 0) for channel in sorted(self._pedal))
        for channel in sorted(self._channels):
            msgs.append((0xB0 | channel, ALL_NOTES_OFF, 0))
            if sound_off:
                msgs.append((0xB0 | channel, ALL_SOUND_OFF, 0))
            if reset:
                msgs.append((0xB0 | channel, RESET_CONTROLLERS, 0))
        return msgs

    def _release(self, sound_off: bool = False, reset: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            for data in self._release_messages(sound_off, reset):
                self._send(data)
                self._track(data)

    def panic(self) -> None:
        """Silence this port now: a note-off for every sounding note, sustain
        pedal up, then All Notes Off and All Sound Off on every channel used."""
        self._release(sound_off=True)

    def reset(self) -> None:
        """Release every note (as :meth:`close` does) and send Reset All
        Controllers on every channel used; the port stays open."""
        self._release(reset=True)

    def close(self) -> None:
        """Release every sounding note (note-offs, pedal up, All Notes Off on
        each channel used), then close.  A failing backend is logged: closing
        always completes."""
        with self._lock:
            if self.closed:
                return
            try:
                self._release()
            except PortError as exc:
                log.warning("could not release the notes of MIDI output %r: %s", self.name, exc)
            super().close()
