"""JACK MIDI ports through coplayer's own client: one JACK client per name, many ports.

:class:`JackInput` and :class:`JackOutput` override only ``_open``,
``_send`` and ``_close`` of :mod:`coplayer.io.ports`, like the rtmidi
backend, but all ports opened with one ``client_name`` in a process share
one JACK client (``_jackmidi.c``, loaded with ctypes):

* an output's ``send`` puts the message in the port's ring buffer and
  returns; JACK's process callback writes it in the next cycle.  Nothing is
  dropped: a full ring (16,000 messages waiting) makes ``send`` wait for
  room, then fail with :class:`PortError` if JACK takes nothing for a second;
* inputs let MIDI clock and SysEx through (only Active Sensing is
  filtered, as in the rtmidi backend);
* every input of a client is read by one thread, which sleeps until JACK's
  callback posts that messages came (no polling, and no Python in JACK's
  real-time thread); ``t_ns`` is the start of the JACK cycle that brought
  the message, on the :func:`~coplayer.io.ports.now_ns` clock;
* closing an output waits until JACK has taken its last messages (its
  note-offs) before the port goes;
* MIDI in JACK's graph is lost when the client reading it misses the cycle
  it was written in (an xrun): after one, each output writes its recent
  note-offs again, except for keys struck since (``resent`` counts them), so
  a note-off lost in JACK does not leave a note stuck at the synth.

python-rtmidi's JACK API makes one JACK client per port; with coplayer's
dozen ports that loaded the graph enough to raise the latency jitter and
the xruns of the bench (see ``coplayer bench``).

The library is built by ``pip install`` where a C compiler exists
(``setup.py``); :func:`available` says whether it is here.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coplayer.io.ports import (BaseInput, BaseOutput, Message, OpenPorts, PortError, find_port, now_ns,
                               raise_priority)

__all__ = ["JackInput", "JackOutput", "available", "close_all", "list_ports"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 4096  # bytes; as _jackmidi.c
ACTIVE_SENSING = 0xFE  # filtered, as the rtmidi inputs do: it only says a cable is plugged in
SEND_TIMEOUT_S = 1.0  # a full ring waits this long for JACK before send fails
DRAIN_TIMEOUT_S = 0.5  # closing an output waits this long for JACK to take its messages
# SCHED_FIFO priority of the reader, where allowed: above the engine's worker
# (10), which it feeds, and far below JACK's (70+).  A reader at normal
# priority woke late often enough on a busy 2-core machine that the answer
# missed the next JACK cycle: a period (1.33 ms at 64 frames) of jitter.
READER_RT_PRIORITY = 12
WAIT_S = 0.25  # the reader wakes this often to notice a close
IDLE_FRESH_S = 0.00025  # an idle tick is taken only this soon after its cycle began (see JackInput.set_idle)

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_clients: dict[str, "_Client"] = {}
_clients_lock = threading.Lock()
_open = OpenPorts()
close_all = _open.close_all


def _load() -> ctypes.CDLL:
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    if _lib_error is not None:
        raise PortError(_lib_error)
    here = Path(__file__).parent
    found = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in here.glob(f"_jackmidi{suffix}")]
    if not found:
        _lib_error = ("coplayer's JACK client is not built (it needs a C compiler at install time: "
                      "`pip install -e .` again); python-rtmidi's JACK ports still work")
        raise PortError(_lib_error)
    lib = ctypes.CDLL(str(found[0]))
    c, i, i64, p = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p
    sig = {
        "cp_open": (c, [p, p, i]),
        "cp_client_name": (p, [c]),
        "cp_add_port": (i, [c, p, i, p, i]),
        "cp_port_name": (p, [c, i]),
        "cp_send": (i, [c, i, p, i]),
        "cp_pending": (i, [c, i]),
        "cp_is_shutdown": (i, [c]),
        "cp_remove_port": (None, [c, i]),
        "cp_wait": (i, [c, ctypes.c_double]),
        "cp_set_idle": (None, [c, ctypes.c_double, ctypes.c_double]),
        "cp_waiting": (i, [c]),
        "cp_wake": (None, [c]),
        "cp_read": (i, [c, p, i, ctypes.POINTER(i), ctypes.POINTER(i64)]),
        "cp_connect": (i, [c, p, p]),
        "cp_list_ports": (i, [c, i, p, i]),
        "cp_close": (None, [c]),
        "cp_now_ns": (i64, []),
        "cp_xruns": (ctypes.c_uint64, [c]),
        "cp_lost_in": (ctypes.c_uint64, [c]),
        "cp_late_out": (ctypes.c_uint64, [c]),
        "cp_skipped": (i64, [c]),
        "cp_resent": (ctypes.c_uint64, [c, i]),
        "cp_set_stale": (None, [c, ctypes.c_double]),
        "cp_set_clean_on_connect": (i, [c, i, i]),
        "cp_shed": (ctypes.c_uint64, [c]),
        "cp_period_ns": (i64, [c]),
        "cp_net_create": (c, []),
        "cp_net_destroy": (None, [c]),
        "cp_net_written": (None, [c, p, i, ctypes.c_uint32]),
        "cp_net_due": (i, [c, ctypes.c_uint32, ctypes.c_uint32, p, i]),
    }
    for name, (res, args) in sig.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            _lib_error = (f"coplayer's JACK client ({found[0].name}) is older than this coplayer (it lacks "
                          f"{name}): `pip install -e .` again; python-rtmidi's JACK ports still work")
            raise PortError(_lib_error) from None
        fn.restype, fn.argtypes = res, args
    _lib = lib
    return lib


def available() -> bool:
    """True if coplayer's JACK client library is built (a server may still be absent)."""
    try:
        _load()
    except (PortError, OSError):
        return False
    return True


def _clock_offset(lib: ctypes.CDLL) -> int:
    """now_ns() minus the library's CLOCK_MONOTONIC (0 on Linux, where they are one clock)."""
    best = None
    for _ in range(5):
        a = now_ns()
        b = lib.cp_now_ns()
        c = now_ns()
        if best is None or c - a < best[0]:
            best = (c - a, (a + c) // 2 - b)
    return best[1]


class _Client:
    """One JACK client: its ports, and the thread that reads all its inputs."""

    def __init__(self, name: str) -> None:
        self.lib = lib = _load()
        err = ctypes.create_string_buffer(256)
        handle = lib.cp_open(name.encode(), err, len(err))
        if not handle:
            raise PortError(f"cannot open the JACK client {name!r}: {err.value.decode()}; start a JACK "
                            "server, e.g. `jackd -d alsa` or `jackd --no-realtime -d dummy`")
        self.handle = handle
        self.name = lib.cp_client_name(handle).decode()
        self.key = name
        self.offset = _clock_offset(lib)
        self.inputs: dict[int, JackInput] = {}
        self.on_idle: Callable[[], None] | None = None  # JackInput.set_idle
        self.idle_owner: JackInput | None = None
        self.ports = 0
        self.lock = threading.Lock()
        self._stop = False
        self._reader = threading.Thread(target=self._read, name=f"coplayer-jack-in {self.name}", daemon=True)
        self._reader.start()

    def add(self, name: str, is_input: bool) -> tuple[int, str]:
        err = ctypes.create_string_buffer(256)
        with self.lock:
            index = self.lib.cp_add_port(self.handle, name.encode(), int(is_input), err, len(err))
            if index < 0:
                raise PortError(err.value.decode())
            self.ports += 1
        return index, self.lib.cp_port_name(self.handle, index).decode()

    def remove(self, index: int) -> None:
        with self.lock:
            self.inputs.pop(index, None)
            self.lib.cp_remove_port(self.handle, index)
            self.ports -= 1
            last = self.ports == 0
        if last:
            _release_if_unused(self)

    def xruns(self) -> int:
        """Xruns JACK reported since the client opened (any client late in a
        cycle; MIDI on its way through the graph may be lost in one)."""
        return int(self.lib.cp_xruns(self.handle)) if self.handle is not None else 0

    def skipped(self) -> int | None:
        """Cycles of JACK's frame time this client's callback did not see: it,
        or a client before it in the graph, was late and JACK went on without
        it (MIDI sent to it then is lost unread).  A stall of the server itself
        barely shows.  None if this JACK cannot tell."""
        if self.handle is None:
            return 0
        n = int(self.lib.cp_skipped(self.handle))
        return n if n >= 0 else None

    def overflowed(self) -> int:
        """Input messages this client dropped because its reader fell behind."""
        return int(self.lib.cp_lost_in(self.handle)) if self.handle is not None else 0

    def close(self) -> None:
        self._stop = True
        self.lib.cp_wake(self.handle)
        if self._reader is not threading.current_thread():
            self._reader.join()
        lost = self.overflowed()
        if lost:
            log.warning("%d MIDI message(s) into JACK client %s were dropped: its reader fell behind", lost, self.name)
        xruns, skipped = self.xruns(), self.skipped()
        if xruns or skipped:
            log.debug("JACK reported %d xrun(s) while client %s ran and skipped %s of its cycles (MIDI in the "
                      "graph may be lost in one)", xruns, self.name, "an unknown number" if skipped is None else skipped)
        late = int(self.lib.cp_late_out(self.handle))
        if late:  # delayed, not lost: the rest went out in the next cycle
            log.debug("%d time(s) client %s's output filled JACK's MIDI buffer in one cycle; the rest waited "
                      "for the next", late, self.name)
        self.lib.cp_close(self.handle)
        self.handle = None

    def connect(self, source: str, destination: str) -> None:
        rc = self.lib.cp_connect(self.handle, source.encode(), destination.encode())
        if rc not in (0, 17):  # 17: EEXIST, already connected
            raise PortError(f"JACK cannot connect {source!r} to {destination!r} (error {rc})")

    def list_ports(self, outputs: bool) -> list[str]:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.lib.cp_list_ports(self.handle, int(outputs), buf, size)
            if n >= 0:
                return [s for s in buf.value.decode(errors="replace").split("\n") if s]
            size *= 4

    def shutdown(self) -> bool:
        return self.handle is not None and bool(self.lib.cp_is_shutdown(self.handle))

    def _read(self) -> None:
        raise_priority(READER_RT_PRIORITY, "the JACK input reader")
        lib, handle = self.lib, self.handle
        buf = ctypes.create_string_buffer(MAX_MESSAGE)
        port, t = ctypes.c_int(), ctypes.c_int64()
        pport, pt = ctypes.byref(port), ctypes.byref(t)
        offset, inputs = self.offset, self.inputs
        while not self._stop:
            state = lib.cp_wait(handle, WAIT_S)
            if state < 0:
                # Said once, by the ports' owner, who learns it from lost(): `coplayer run`
                # stops with one line; a second one here made two for one fault.
                log.debug("the JACK server shut down: the JACK ports of client %s are gone", self.name)
                return
            if state == 2:
                self._idle()
                continue
            while not self._stop:
                n = lib.cp_read(handle, buf, MAX_MESSAGE, pport, pt)
                if n <= 0:
                    break
                owner = inputs.get(port.value)
                data = tuple(buf[:n])  # not buf.raw: that copies all MAX_MESSAGE bytes
                if owner is not None and data != (ACTIVE_SENSING,):
                    owner._deliver(data, t.value + offset)


    def set_idle(self, owner: JackInput, fn: Callable[[], None] | None, every_s: float) -> None:
        self.on_idle, self.idle_owner = fn, owner if fn is not None else None
        self.lib.cp_set_idle(self.handle, every_s if fn is not None else 0.0, IDLE_FRESH_S)

    def _idle(self) -> None:
        fn = self.on_idle
        if fn is None:
            return
        try:
            fn()
        except Exception:  # the reader must survive its owner's bug
            log.exception("the idle handler of JACK client %s failed; it is dropped", self.name)
            self.on_idle = None


def _release_if_unused(client: _Client) -> None:
    """Close a client that holds no port any more."""
    with _clients_lock:
        if client.ports == 0 and _clients.get(client.key) is client:
            del _clients[client.key]
            client.close()


def _client(client_name: str) -> _Client:
    with _clients_lock:
        client = _clients.get(client_name)
        if client is None or client.shutdown():
            client = _clients[client_name] = _Client(client_name)
        return client


def list_ports(client_name: str = "coplayer") -> dict[str, list[str]]:
    """{"inputs": ports coplayer can listen to, "outputs": ports it can play to}."""
    client = _client(client_name)
    own = {f"{client.name}:"}
    try:
        found = {"inputs": client.list_ports(outputs=True), "outputs": client.list_ports(outputs=False)}
    finally:
        _release_if_unused(client)
    return {k: [p for p in v if not any(p.startswith(o) for o in own)] for k, v in found.items()}


class _JackPort:
    """What inputs and outputs share: the client, the port, the connection."""

    _client_obj: _Client | None = None
    _index = -1

    def lost(self) -> str | None:
        client = self._client_obj
        return "the JACK server shut down" if client is not None and client.shutdown() else None

    def xruns(self) -> int | None:
        client = self._client_obj
        return client.xruns() if client is not None else None

    def skipped_cycles(self) -> int | None:
        client = self._client_obj
        return client.skipped() if client is not None else None

    def overflowed(self) -> int | None:
        client = self._client_obj
        return client.overflowed() if client is not None else None

    def _open_jack(self, kind: str, virtual: bool, client_name: str, own_name: str | None) -> None:
        client = _client(client_name)
        is_input = kind == "input"
        self.virtual = virtual
        self.api = "jack"
        target = None
        if not virtual:
            # an existing port: we listen to one that sends, or play to one that receives
            names = client.list_ports(outputs=is_input)
            target = names[find_port(names, self.name, kind)]
            self.name = target
        base = self.name if virtual else (own_name or kind)
        name, k = base, 1
        while True:
            try:
                index, full = client.add(name, is_input)
                break
            except PortError:
                k += 1
                if virtual or k > 32:
                    _release_if_unused(client)
                    raise PortError(f"cannot open JACK MIDI {kind} {self.name!r}: "
                                    f"the client {client.name!r} already has a port {name!r}") from None
                name = f"{base} {k}"
        self._client_obj, self._index, self.port_name = client, index, full
        if target is not None:
            try:
                client.connect(target, full) if is_input else client.connect(full, target)
            except PortError:
                client.remove(index)
                self._client_obj = None
                raise
        _open.add(self)

    def _close_jack(self) -> None:
        client, self._client_obj = self._client_obj, None
        _open.discard(self)
        if client is not None:
            client.remove(self._index)


class JackInput(_JackPort, BaseInput):
    """A JACK MIDI input.  ``name``: the existing port to listen to (full
    "client:port" name, its port name, or a unique part of it), or with
    ``virtual=True`` the name of the port to create."""

    own_thread = True  # the client's reader thread (JACK's own real-time thread runs no Python)

    def __init__(self, name: str, *, virtual: bool = False, api: str = "jack",
                 client_name: str = "coplayer", port_name: str | None = None, on_message=None) -> None:
        super().__init__(name, on_message=on_message, virtual=virtual, client_name=client_name,
                         port_name=port_name)

    def _open(self, virtual: bool, client_name: str, port_name: str | None) -> None:
        self._open_jack("input", virtual, client_name, port_name)
        self._client_obj.inputs[self._index] = self

    def waiting(self) -> bool:
        """Messages of any input of this client wait for the reader."""
        client = self._client_obj
        return client is not None and client.lib.cp_waiting(client.handle) > 0

    def period_ns(self) -> int | None:
        """JACK's cycle: every message is stamped with the start of the cycle
        that brought it, up to one cycle after it came."""
        client = self._client_obj
        n = int(client.lib.cp_period_ns(client.handle)) if client is not None else 0
        return n or None

    def set_stale(self, ns: int) -> bool:
        """The reader drops note-ons and junk that waited longer than ``ns``
        in C, before any Python runs for them (for every input of the client)."""
        client = self._client_obj
        if client is None or self.closed:
            return False
        client.lib.cp_set_stale(client.handle, ns / 1e9)
        return True

    def shed(self) -> int | None:
        client = self._client_obj
        return int(client.lib.cp_shed(client.handle)) if client is not None else None

    def set_idle(self, fn: Callable[[], None] | None, every_s: float) -> bool:
        """JACK's process callback posts the reader after ``every_s`` with no
        input on any port of the client (then every ``every_s``), at a
        cycle's start; the reader calls ``fn`` only if it wakes within
        IDLE_FRESH_S of it, so ``fn`` runs when no message can come before
        the next cycle.  One handler per client: the last set wins."""
        client = self._client_obj
        if client is None or self.closed:
            return False
        client.set_idle(self, fn, every_s)
        return True

    def _close(self) -> None:
        client = self._client_obj
        if client is not None and client.idle_owner is self:
            client.set_idle(self, None, 0.0)
        self._close_jack()


class JackOutput(_JackPort, BaseOutput):
    """A JACK MIDI output.  ``name``: the existing port to play to, or with
    ``virtual=True`` the name of the port to create."""

    _resent = 0  # the count at close

    def __init__(self, name: str, *, virtual: bool = False, api: str = "jack",
                 client_name: str = "coplayer", port_name: str | None = None) -> None:
        super().__init__(name, virtual=virtual, client_name=client_name, port_name=port_name)

    def _open(self, virtual: bool, client_name: str, port_name: str | None) -> None:
        self._open_jack("output", virtual, client_name, port_name)

    def clean_on_connect(self) -> bool:
        """A connection made to this output before coplayer's first note-on
        (on any of its outputs) hears the clean start first (a patchbay or
        session manager that connects a moment after the port appears); later
        ones do not, so a synth shared with another output is not silenced mid-set."""
        client = self._client_obj
        return client is not None and bool(client.lib.cp_set_clean_on_connect(client.handle, self._index, 1))

    def resent(self) -> int | None:
        """Note-offs (and sustain-offs) this output wrote again after JACK
        skipped a cycle or reported an xrun (see ``_jackmidi.c``: the stuck-note
        safety net)."""
        client = self._client_obj
        return int(client.lib.cp_resent(client.handle, self._index)) if client is not None else self._resent

    def _send(self, data: Message) -> None:
        client = self._client_obj
        raw = bytes(data)
        give_up = None
        while True:
            rc = client.lib.cp_send(client.handle, self._index, raw, len(raw))
            if rc == 0:
                return
            if rc != -1 or client.shutdown():
                raise PortError(f"cannot send to JACK MIDI output {self.name!r}: "
                                + ("the JACK server shut down" if client.shutdown() else f"error {rc}"))
            now = time.monotonic()
            give_up = give_up or now + SEND_TIMEOUT_S
            if now > give_up:
                raise PortError(f"JACK takes no messages from output {self.name!r}: its queue is full")
            time.sleep(0.0005)

    def _close(self) -> None:
        client = self._client_obj
        if client is not None and not client.shutdown():
            # the last messages (the note-offs close just sent) leave before the port goes
            end = time.monotonic() + DRAIN_TIMEOUT_S
            while client.lib.cp_pending(client.handle, self._index) > 0 and time.monotonic() < end:
                time.sleep(0.0005)
        if client is not None:
            self._resent = int(client.lib.cp_resent(client.handle, self._index))
        self._close_jack()
