"""OSC in and out (python-osc), with the routing table apart from the transport.

:class:`OscControl` maps addresses to plain functions given by its owner and
checks arguments against the documented signatures; :class:`OscServer` only
feeds it UDP datagrams, from one thread; :class:`OscOut` sends.  Nothing
here raises on bad input: malformed datagrams, unknown addresses, wrong
arguments and handler errors are counted in ``OscControl.ignored`` and
logged at most once per address and reason every ``log_interval_s``.

Address space (types: f float, i int, s string; ``<name>`` is a part name):

====================================  ======  =====================================
in (coplayer listens)                 args    meaning
====================================  ======  =====================================
/coplayer/temperature                 f       sampling temperature of the answer
/coplayer/top_p                       f       nucleus share of the answer, 0-1
/coplayer/mode                        s       instrument, respond or both
/coplayer/tempo                       f       internal tempo, BPM
/coplayer/panic                               silence every note now
/coplayer/part/<name>/mute            i       1 mutes the part, 0 unmutes
/coplayer/part/<name>/solo            i       1 solos the part, 0 ends the solo
/coplayer/key                         s       key lock, "C major", "auto" or "off"
/coplayer/key_strength                f       nats an out-of-key note loses, 0-50
/coplayer/trigger                             answer now, without waiting
/coplayer/record                              write a snapshot of the session now (one
                                              every 5 s at most; the state "record"
                                              says the file, or why none was written)
====================================  ======  =====================================

====================================  ======  =====================================
out (coplayer sends)                  args    meaning
====================================  ======  =====================================
/coplayer/note                        s i i   part, pitch, velocity (0 = note-off)
/coplayer/state                       s s     key, value of a changed setting
/coplayer/stats                       fffii   p50 ms, p99 ms, max ms, count, misses
/coplayer/ports                       iiiii   the MIDI input's xruns, cycles the server
                                              skipped it, messages it dropped, the
                                              note-offs the outputs sent again after
                                              an xrun, the note-ons dropped because
                                              they waited past the budget (since
                                              start; -1: the backend cannot tell)
====================================  ======  =====================================

Who may control: this machine always; other machines only when listed in
``allow`` (addresses or networks), and :class:`OscServer` refuses to listen
beyond this machine without that list.  Datagrams from anyone else are
dropped and counted, each sender logged once.

Lenient where controllers differ: an ``f`` takes an int, an ``i`` takes a
float with a whole value or a boolean (Pd sends every number as a float);
an address without arguments also takes one number and ignores it when it
is 0, so a button that sends 1 on press and 0 on release fires once.
Bundle time tags are not waited for: every message is handled on arrival.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pythonosc import osc_packet
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_server import BlockingOSCUDPServer

from coplayer.errors import CoplayerError
from coplayer.logs import RateLimitedLog

__all__ = ["IN_SIGNATURES", "OscControl", "OscError", "OscOut", "OscServer", "parse_allow"]

log = logging.getLogger(__name__)

IN_SIGNATURES: dict[str, str] = {
    "/coplayer/temperature": "f",
    "/coplayer/top_p": "f",
    "/coplayer/mode": "s",
    "/coplayer/tempo": "f",
    "/coplayer/panic": "",
    "/coplayer/part/<name>/mute": "i",
    "/coplayer/part/<name>/solo": "i",
    "/coplayer/key": "s",
    "/coplayer/key_strength": "f",
    "/coplayer/trigger": "",
    "/coplayer/record": "",
}
"""The documented input addresses and their argument types."""

class OscError(CoplayerError, OSError):
    """OSC cannot start: the address is taken, or a host does not resolve."""


def _template(address: str) -> re.Pattern:
    """``/coplayer/part/<name>/mute`` -> a regex capturing each ``<...>``."""
    parts = re.split(r"<(\w+)>", address)
    body = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(body + r"\Z")


def _coerce(signature: str, args: Sequence[Any]) -> list[Any] | None:
    """The arguments converted to ``signature``, or None if they do not fit.
    An empty signature returns [] to fire, None for a release (one 0)."""
    if signature == "":
        if not args:
            return []
        if len(args) == 1 and isinstance(args[0], (int, float)):
            return [] if args[0] else None
        raise TypeError(f"expected no arguments, got {_types(args)}")
    if len(args) != len(signature):
        raise TypeError(f"expected {len(signature)} argument(s) '{signature}', got {_types(args)}")
    return [_coerce_one(kind, value) for kind, value in zip(signature, args)]


def _coerce_one(kind: str, value: Any) -> Any:
    if kind == "s" and isinstance(value, str):
        return value
    if kind == "f" and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if kind == "i" and isinstance(value, (int, float)) and math.isfinite(value) and value == int(value):
        return int(value)
    raise TypeError(f"expected '{kind}', got {value!r}")


def _types(args: Sequence[Any]) -> str:
    return ", ".join(type(a).__name__ for a in args) or "none"


_MAX_REFUSED_LOGGED = 64  # distinct refused senders named in the log; all are counted
_TYPETAGS = frozenset("ihfdsbrmtTFN[]")  # the type tags python-osc parses


def _well_formed(dgram: bytes, depth: int = 0) -> bool:
    """A cheap shape check before python-osc parses, which would otherwise
    log to the root logger for every bad bundle element or type tag."""
    if dgram.startswith(b"#bundle\x00"):
        i = 16
        while i < len(dgram):
            size = int.from_bytes(dgram[i:i + 4], "big")
            i += 4
            if depth >= 4 or size <= 0 or i + size > len(dgram) or not _well_formed(dgram[i:i + size], depth + 1):
                return False
            i += size
        return len(dgram) >= 16
    end = dgram.find(b"\x00")
    if not dgram.startswith(b"/") or end < 0:
        return False
    start = (end // 4 + 1) * 4
    if start >= len(dgram):
        return True  # no type tag string: a message without arguments
    tag_end = dgram.find(b"\x00", start)
    tags = dgram[start:tag_end if tag_end >= 0 else len(dgram)]
    return tags[:1] == b"," and all(chr(c) in _TYPETAGS for c in tags[1:])


class OscControl:
    """Routes OSC messages to the owner's handler functions.

    ``handlers`` maps an address to a function; an address may contain
    ``<name>`` segments, whose values are passed first, e.g.
    ``{"/coplayer/part/<name>/mute": lambda name, on: ...}``.  Arguments of an
    address in ``signatures`` are checked and converted before the call;
    other addresses get them as sent.
    """

    def __init__(self, handlers: Mapping[str, Callable[..., object]],
                 signatures: Mapping[str, str] = IN_SIGNATURES, log_interval_s: float = 10.0) -> None:
        self._exact: dict[str, tuple[Callable, str | None]] = {}
        self._templates: list[tuple[re.Pattern, Callable, str | None]] = []
        self._names = list(handlers)
        for address, fn in handlers.items():
            signature = signatures.get(address)
            if "<" in address:
                self._templates.append((_template(address), fn, signature))
            else:
                self._exact[address] = (fn, signature)
        self.ignored: Counter = Counter()  # reason -> messages ignored
        self.handled = 0
        self._log = RateLimitedLog(log, log_interval_s)

    def _ignore(self, reason: str, address: str, detail: str, exc_info: bool = False) -> None:
        self.ignored[reason] += 1
        key = self._log.key((reason, address))
        shown = "*" if key == "*" else address[:80]  # "*": one of many addresses, reported together
        self._log.warning(key, "OSC %s, ignored: %r: %s", reason, shown, detail, exc_info=exc_info)

    def _route(self, address: str) -> tuple[Callable, str | None, list[str]] | None:
        if address in self._exact:
            fn, signature = self._exact[address]
            return fn, signature, []
        for pattern, fn, signature in self._templates:
            m = pattern.match(address)
            if m:
                return fn, signature, list(m.groups())
        return None

    def dispatch(self, address: str, args: Sequence[Any] = ()) -> bool:
        """Call the handler of ``address``; True if it ran without error."""
        route = self._route(address)
        if route is None:
            self._ignore("unknown address", address, f"known: {', '.join(self.addresses())}")
            return False
        fn, signature, captured = route
        try:
            values = list(args) if signature is None else _coerce(signature, args)
        except TypeError as exc:
            self._ignore("bad arguments", address, str(exc))
            return False
        if values is None:  # a button's release
            return False
        try:
            fn(*captured, *values)
        except (TypeError, ValueError, KeyError) as exc:  # e.g. a mode name the owner refuses
            self._ignore("handler error", address, f"{type(exc).__name__}: {exc}")
            return False
        except Exception as exc:  # a bug in the owner: keep the traceback, keep serving
            self._ignore("handler failure", address, f"{type(exc).__name__}: {exc}", exc_info=True)
            return False
        self.handled += 1
        return True

    def feed(self, dgram: bytes) -> int:
        """Parse one UDP datagram (a message or a bundle) and dispatch each
        message in it; returns how many handlers ran."""
        try:
            if not _well_formed(dgram):
                raise ValueError("not an OSC message or bundle")
            messages = [(m.message.address, m.message.params) for m in osc_packet.OscPacket(dgram).messages]
        except Exception as exc:  # untrusted bytes into a third-party parser: never let it escape
            self._ignore("malformed datagram", "-", f"{len(dgram)} bytes, {type(exc).__name__}: {exc}")
            return 0
        return sum(self.dispatch(address, args) for address, args in messages)

    def addresses(self) -> list[str]:
        """The addresses handled, as given (templates with their ``<name>``)."""
        return list(self._names)

    # python-osc's servers call their dispatcher through this one method.
    def call_handlers_for_packet(self, data: bytes, client_address: tuple) -> list:
        self.feed(data)
        return []


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(entries: Sequence[str]) -> list[Network]:
    """``["192.168.1.20", "10.0.0.0/24", ...]`` as networks (an address is a network of one);
    ValueError names the entry that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network like 192.168.1.20 "
                             "or 192.168.1.0/24") from None
    return networks


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d is a.b.c.d
    return mapped or address


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) means this machine only."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = [_ip(info[4][0]) for info in infos]
    return bool(addresses) and all(a is not None and a.is_loopback for a in addresses)


class _Server(BlockingOSCUDPServer):
    owner: "OscServer"

    def verify_request(self, request, client_address) -> bool:
        # Malformed datagrams from allowed senders go on to be counted and logged.
        return self.owner.allows(client_address[0])

    def handle_error(self, request, client_address) -> None:
        log.exception("OSC datagram from %s could not be handled", client_address)


class OscServer:
    """Listens for OSC on UDP (``host``, ``port``; port 0 picks a free one)
    and feeds every datagram to ``control`` from one background thread.

    Only this machine (loopback) and the senders in ``allow`` (addresses or
    networks) are heard; other datagrams are dropped and counted in
    ``refused``, each sender logged once.  A ``host`` that other machines
    can reach needs ``allow``: without it, anyone on the network could mute,
    panic or record, so the server refuses to be built (:class:`OscError`).
    """

    def __init__(self, control: OscControl, host: str = "127.0.0.1", port: int = 9000,
                 allow: Sequence[str] = ()) -> None:
        self.control = control
        self.host, self.port = host, port
        try:
            self.allow = parse_allow(allow)
        except ValueError as exc:
            raise OscError(f"osc.allow: {exc}") from None
        if not self.allow and not _is_loopback(host):
            raise OscError(
                f"OSC would listen on {host}, open to every machine on the network: name those that may "
                "control coplayer in osc.allow (e.g. --set 'osc.allow=[192.168.1.20, 10.0.0.0/24]'), "
                "or listen on this machine only (osc.host: 127.0.0.1)")
        self.refused = 0
        self._refused_from: set[str] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def allows(self, sender: str) -> bool:
        """Whether a datagram from ``sender`` (an IP address) is heard; counts and logs the others."""
        address = _ip(sender)
        if address is not None and (address.is_loopback or any(address in net for net in self.allow)):
            return True
        self.refused += 1
        if sender not in self._refused_from and len(self._refused_from) < _MAX_REFUSED_LOGGED:
            self._refused_from.add(sender)
            log.warning("OSC from %s refused: not in osc.allow (further datagrams from it are dropped "
                        "without a message)", sender)
        return False

    def start(self) -> OscServer:
        try:
            self._server = _Server((self.host, self.port), self.control)
        except OSError as exc:
            raise OscError(
                f"cannot listen for OSC on {self.host}:{self.port}: {exc.strerror or exc}; "
                "choose a free port (osc.in_port) or stop the program using it"
            ) from None
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="coplayer-osc", daemon=True
        )
        self._thread.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(timeout=2)

    def __enter__(self) -> OscServer:
        return self if self._server else self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class OscOut:
    """Sends OSC to ``host:port`` over UDP without blocking; a failed send is
    logged (rate-limited) and reported by returning False, never raised."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9001, log_interval_s: float = 10.0) -> None:
        try:
            family, _, _, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except (socket.gaierror, UnicodeError) as exc:
            raise OscError(f"cannot send OSC to {host}:{port}: {exc}; check osc.out_host") from None
        self.target = target
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._log = RateLimitedLog(log, log_interval_s)
        self.errors = 0

    def send(self, address: str, *args: Any) -> bool:
        """Send one message; ``int`` goes as i, ``float`` as f, ``str`` as s."""
        builder = OscMessageBuilder(address)
        for value in args:
            builder.add_arg(value)
        try:
            self._sock.sendto(builder.build().dgram, self.target)
        except OSError as exc:
            self.errors += 1
            self._log.warning(address, "OSC send failed: %r: %s", address[:80], exc)
            return False
        return True

    def note(self, part: str, pitch: int, velocity: int) -> bool:
        return self.send("/coplayer/note", str(part), int(pitch), int(velocity))

    def state(self, key: str, value: object) -> bool:
        return self.send("/coplayer/state", str(key), str(value))

    def stats(self, p50_ms: float, p99_ms: float, max_ms: float, count: int, misses: int) -> bool:
        return self.send("/coplayer/stats", float(p50_ms), float(p99_ms), float(max_ms), int(count), int(misses))

    def ports(self, xruns: int | None, skipped: int | None, dropped: int | None, resent: int | None,
              late: int | None) -> bool:
        return self.send("/coplayer/ports",
                         *(-1 if n is None else int(n) for n in (xruns, skipped, dropped, resent, late)))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> OscOut:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
