"""Real MIDI ports through python-rtmidi (ALSA, JACK, CoreMIDI, Windows MM).

A thin backend: :class:`RtMidiInput` and :class:`RtMidiOutput` override only
``_open``, ``_send`` and ``_close`` of :mod:`coplayer.io.ports`.

* A port is a named existing port (an exact name, or a part of one that
  matches a single port, case-insensitive) or, with ``virtual=True``, a new
  virtual port other programs connect to.  Windows MM has no virtual ports:
  the error names loopMIDI.
* Inputs let MIDI clock and SysEx through (only Active Sensing is filtered).
  The thread that receives (rtmidi's callback, or on JACK a reader thread
  polling rtmidi's queue, see :class:`RtMidiInput`) only timestamps and
  hands the message on.
* An open port is held by this module until it is closed, so an input can
  never be garbage collected while in use (and go silent), and every port
  still open at interpreter exit is closed, releasing its notes.
* Sends are paced: rtmidi's JACK output drops messages silently when more
  than ~1000 are sent back to back (measured: 357 of 3,000 arrived), so a
  burst waits a few milliseconds every :data:`BURST` messages instead of
  losing note-offs.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import rtmidi

from coplayer.io.ports import BaseInput, BaseOutput, Message, NoVirtualPorts, OpenPorts, PortError, find_port, now_ns

__all__ = ["APIS", "RtMidiInput", "RtMidiOutput", "compiled_apis", "list_ports", "resolve_api"]

APIS = {
    "alsa": rtmidi.API_LINUX_ALSA,
    "jack": rtmidi.API_UNIX_JACK,
    "coremidi": rtmidi.API_MACOSX_CORE,
    "winmm": rtmidi.API_WINDOWS_MM,
}
_NAMES = {v: k for k, v in APIS.items()}

BURST = 128  # messages sent back to back before a pause
BURST_PAUSE_S = 0.005  # longer than a JACK period at the usual sizes (<= 256 frames)
JACK_POLL_S = 0.0002  # an input's reader thread sleeps this long when rtmidi's queue is empty
QUEUE_SIZE = 8192  # messages rtmidi's input queue holds for the reader
CLOSE_LINGER_S = 0.05  # between the last send and closing (see RtMidiOutput._close)

LOOPMIDI_HINT = (
    "virtual MIDI ports do not exist on Windows (WinMM): install a loopback driver such as "
    "loopMIDI (https://www.tobias-erichsen.de/software/loopmidi.html), create a port there "
    "and give its name instead"
)

_open = OpenPorts()
close_all = _open.close_all


def compiled_apis() -> list[str]:
    """Names of the MIDI APIs compiled into this python-rtmidi."""
    return [_NAMES[a] for a in rtmidi.get_compiled_api() if a in _NAMES]


def resolve_api(name: str = "auto") -> str:
    """``name``, or for ``auto`` the usual API of this computer: CoreMIDI on
    macOS, Windows MM on Windows, ALSA on Linux when ``/dev/snd/seq`` exists,
    else JACK."""
    compiled = compiled_apis()
    if name == "auto":
        if sys.platform == "darwin":
            name = "coremidi"
        elif sys.platform == "win32":
            name = "winmm"
        elif "alsa" in compiled and (os.path.exists("/dev/snd/seq") or "jack" not in compiled):
            name = "alsa"
        else:
            name = "jack" if "jack" in compiled else (compiled[0] if compiled else "alsa")
    if name not in APIS:
        raise PortError(f"unknown MIDI API {name!r}; expected one of: {', '.join([*APIS, 'auto'])}")
    if name not in compiled:
        raise PortError(
            f"the {name} MIDI API is not compiled into python-rtmidi here "
            f"(compiled: {', '.join(compiled) or 'none'})"
        )
    return name


def _explain(api: str, exc: Exception) -> PortError:
    """A backend failure to open as an error the user can act on."""
    if api == "alsa" and not os.path.exists("/dev/snd/seq"):
        return PortError(
            "ALSA sequencer unavailable: no /dev/snd/seq; "
            "try --api jack (midi.api: jack) with a JACK server running"
        )
    if api == "jack":
        return PortError(
            f"cannot reach a JACK server ({exc}); start one, e.g. "
            "`jackd -d alsa` or `jackd --no-realtime -d dummy`"
        )
    return PortError(f"cannot open the {api} MIDI API: {exc}")


def _client(cls, api: str, client_name: str, **kwargs):
    if api == "alsa" and sys.platform.startswith("linux") and not os.path.exists("/dev/snd/seq"):
        raise _explain(api, FileNotFoundError("/dev/snd/seq"))  # before libasound prints its own
    try:
        return cls(APIS[api], client_name, **kwargs)
    except rtmidi.RtMidiError as exc:
        raise _explain(api, exc) from None


def list_ports(api: str = "auto", client_name: str = "coplayer") -> dict[str, list[str]]:
    """{"inputs": ports coplayer can listen to, "outputs": ports it can play to}."""
    api = resolve_api(api)
    found = {}
    for key, cls in (("inputs", rtmidi.MidiIn), ("outputs", rtmidi.MidiOut)):
        client = _client(cls, api, client_name)
        try:
            found[key] = client.get_ports()
        finally:
            client.delete()
    return found


class _RtMidiPort:
    """What inputs and outputs share: client creation, port choice, closing."""

    _rt = None

    def _open_rt(self, cls, kind: str, virtual: bool, api: str, client_name: str, own_name: str | None):
        self.api = resolve_api(api)
        self.virtual = virtual
        extra = {"queue_size_limit": QUEUE_SIZE} if cls is rtmidi.MidiIn else {}
        rt = _client(cls, self.api, client_name, **extra)
        try:
            if virtual:
                if self.api == "winmm":
                    raise NoVirtualPorts(f"cannot open virtual {kind} {self.name!r}: {LOOPMIDI_HINT}")
                rt.open_virtual_port(self.name)
            else:
                names = rt.get_ports()
                index = find_port(names, self.name, kind)
                self.name = names[index]
                rt.open_port(index, own_name or kind)
        except rtmidi.RtMidiError as exc:
            rt.delete()
            raise PortError(f"cannot open MIDI {kind} {self.name!r} ({self.api}): {exc}") from None
        except BaseException:
            rt.delete()
            raise
        self._rt = rt
        _open.add(self)
        return rt

    def _close_rt(self) -> None:
        rt, self._rt = self._rt, None
        _open.discard(self)
        if rt is not None:
            rt.close_port()
            rt.delete()  # a virtual port only disappears with its client


class RtMidiInput(_RtMidiPort, BaseInput):
    """An rtmidi input.  ``name``: the existing port to listen to, or with
    ``virtual=True`` the name of the virtual port to create.

    ``poll_interval_s`` None: rtmidi's callback thread delivers each message.
    A number: a reader thread drains rtmidi's queue, sleeping that long when
    it is empty.  The default polls every 0.2 ms on JACK, where rtmidi's
    callback runs in JACK's real-time thread: waiting there for Python's GIL
    makes the whole JACK graph miss its deadline and lose messages (measured:
    300 of 2,000 lost in a burst under load, none when polling).  Elsewhere
    the default is the callback.
    """

    def __init__(self, name: str, *, virtual: bool = False, api: str = "auto",
                 client_name: str = "coplayer", port_name: str | None = None, on_message=None,
                 poll_interval_s: float | None | str = "auto") -> None:
        super().__init__(name, on_message=on_message, virtual=virtual, api=api,
                         client_name=client_name, port_name=port_name, poll_interval_s=poll_interval_s)

    def _open(self, virtual: bool, api: str, client_name: str, port_name: str | None,
              poll_interval_s: float | None | str) -> None:
        rt = self._open_rt(rtmidi.MidiIn, "input", virtual, api, client_name, port_name)
        rt.ignore_types(sysex=False, timing=False, active_sense=True)
        if poll_interval_s == "auto":
            poll_interval_s = JACK_POLL_S if self.api == "jack" else None
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._reader = None
        if poll_interval_s is None:
            rt.set_callback(self._callback)
        else:
            self._reader = threading.Thread(target=self._read, name=f"coplayer-midi-in {self.name}", daemon=True)
            self._reader.start()

    def _callback(self, event: tuple[list[int], float], _data=None) -> None:
        # rtmidi's thread: timestamp, hand on, nothing else.
        self._deliver(tuple(event[0]), now_ns())

    def _read(self) -> None:
        get, deliver, stop, pause = self._rt.get_message, self._deliver, self._stop, self.poll_interval_s
        while not stop.is_set():
            event = get()
            if event is None:
                time.sleep(pause)
            else:
                deliver(tuple(event[0]), now_ns())

    def _close(self) -> None:
        if self._reader is not None:
            self._stop.set()
            self._reader.join()  # never delete the client under a running reader
        elif self._rt is not None:
            self._rt.cancel_callback()  # breaks the port -> client -> callback cycle
        self._close_rt()


class RtMidiOutput(_RtMidiPort, BaseOutput):
    """An rtmidi output.  ``name``: the existing port to play to, or with
    ``virtual=True`` the name of the virtual port to create."""

    def __init__(self, name: str, *, virtual: bool = False, api: str = "auto",
                 client_name: str = "coplayer", port_name: str | None = None) -> None:
        super().__init__(name, virtual=virtual, api=api, client_name=client_name, port_name=port_name)

    def _open(self, virtual: bool, api: str, client_name: str, port_name: str | None) -> None:
        self._open_rt(rtmidi.MidiOut, "output", virtual, api, client_name, port_name)
        self._burst_start = self._last_send = 0.0
        self._burst_count = 0

    def _send(self, data: Message) -> None:
        self._pace()
        try:
            self._rt.send_message(data)
        except rtmidi.RtMidiError as exc:
            raise PortError(f"cannot send to MIDI output {self.name!r}: {exc}") from None
        self._last_send = time.perf_counter()

    def _pace(self) -> None:
        now = time.perf_counter()
        if now - self._burst_start > BURST_PAUSE_S:
            self._burst_start, self._burst_count = now, 0
        self._burst_count += 1
        if self._burst_count > BURST:
            time.sleep(max(0.0, self._burst_start + BURST_PAUSE_S - now))
            self._burst_start, self._burst_count = time.perf_counter(), 1

    def _close(self) -> None:
        # RtMidi's JACK output corrupts the messages of the last period when
        # its port is unregistered right after them (measured: every message
        # arrives as a copy of the first), so the final note-offs get time to
        # leave first.
        time.sleep(max(0.0, self._last_send + CLOSE_LINGER_S - time.perf_counter()))
        self._close_rt()
