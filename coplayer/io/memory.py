"""In-memory ports, for tests and for the demo (no MIDI system needed).

A :class:`MemoryOutput` records every message it sends with its timestamp;
a :class:`MemoryInput` receives what a test injects, through the same
``_deliver`` path as a real backend's callback.  A :class:`MemoryHub` names
ports and can loop an output into an input, as a mis-wired DAW track would,
to exercise a feedback guard.  Delivery through a loop is synchronous: it
happens inside ``send``, before it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from coplayer.io.ports import BaseInput, BaseOutput, Message, PortError, as_message, not_found, now_ns

__all__ = ["MemoryHub", "MemoryInput", "MemoryOutput", "split_stream"]

_DATA_LENGTH = {0x80: 2, 0x90: 2, 0xA0: 2, 0xB0: 2, 0xC0: 1, 0xD0: 1, 0xE0: 2, 0xF1: 1, 0xF2: 2, 0xF3: 1}


class MemoryOutput(BaseOutput):
    """Records ``(t_ns, message)`` for every message sent, in ``messages``.

    Set ``fail = True`` to make every later send raise :class:`PortError`,
    as a port that vanished would.
    """

    def _open(self) -> None:
        self.messages: list[tuple[int, Message]] = []
        self.fail = False
        self._targets: list[MemoryInput] = []

    def _send(self, data: Message) -> None:
        if self.fail:
            raise PortError(f"memory output {self.name!r} is gone (failure injected)")
        t = now_ns()
        self.messages.append((t, data))
        for target in list(self._targets):
            if not target.closed:
                target._deliver(data, t)

    def sent(self) -> list[Message]:
        """The messages sent so far, without timestamps."""
        return [data for _, data in self.messages]


class MemoryInput(BaseInput):
    """An input fed by :meth:`inject` (or by a hub loop)."""

    def inject(self, msg: object, t: int | None = None) -> None:
        """Deliver one message as a backend would: invalid bytes are dropped,
        ``t`` (ns, default :func:`~coplayer.io.ports.now_ns`) is its timestamp."""
        if self.closed:
            raise PortError(f"memory input {self.name!r} is closed")
        self._deliver(as_message(msg), now_ns() if t is None else t)

    def inject_stream(self, data: Iterable[int], t: int | None = None) -> None:
        """Deliver a raw wire byte stream, split as a driver splits it
        (running status, real-time bytes inside messages, SysEx)."""
        for msg in split_stream(data):
            self.inject(msg, t)


def split_stream(data: Iterable[int]) -> list[Message]:
    """Split MIDI wire bytes into complete messages, like a MIDI driver.

    Running status applies to channel messages; real-time bytes (F8-FF) are
    messages of their own wherever they occur; stray data bytes, undefined
    statuses and unfinished messages are dropped.
    """
    out: list[Message] = []
    running = 0  # status for running status, 0 if none
    current: list[int] = []  # the message being assembled
    want = 0  # data bytes still expected (-1: inside SysEx)
    for byte in data:
        if not 0 <= byte <= 0xFF:
            continue
        if byte >= 0xF8:  # real-time: never interrupts anything
            if byte not in (0xF9, 0xFD):
                out.append((byte,))
            continue
        if byte == 0xF7:
            if want == -1:
                out.append((*current, 0xF7))
            current, want, running = [], 0, 0
        elif byte == 0xF0:
            current, want, running = [0xF0], -1, 0
        elif byte >= 0x80:
            status_length = _DATA_LENGTH.get(byte if byte >= 0xF0 else byte & 0xF0)
            running = byte if byte < 0xF0 else 0
            if byte == 0xF6:
                out.append((0xF6,))
            current, want = ([byte], status_length) if status_length else ([], 0)
        elif want == -1:
            current.append(byte)
        elif want == 0 and running:  # running status: a new message begins
            current, want = [running], _DATA_LENGTH[running & 0xF0]
        if want > 0 and byte < 0x80:
            current.append(byte)
            want -= 1
            if want == 0:
                out.append(tuple(current))
                current = []
    return out


class MemoryHub:
    """Named in-memory ports, and connections from outputs to inputs."""

    def __init__(self) -> None:
        self.inputs: dict[str, MemoryInput] = {}
        self.outputs: dict[str, MemoryOutput] = {}

    def open_input(self, name: str, on_message: Callable[[Message, int], None] | None = None) -> MemoryInput:
        self._check_free(self.inputs, name, "input")
        port = self.inputs[name] = MemoryInput(name, on_message=on_message)
        return port

    def open_output(self, name: str) -> MemoryOutput:
        self._check_free(self.outputs, name, "output")
        port = self.outputs[name] = MemoryOutput(name)
        return port

    @staticmethod
    def _check_free(ports: dict, name: str, kind: str) -> None:
        if name in ports and not ports[name].closed:
            raise PortError(f"memory {kind} {name!r} is already open")

    def input(self, name: str) -> MemoryInput:
        if name not in self.inputs:
            raise not_found("input", name, self.inputs)
        return self.inputs[name]

    def output(self, name: str) -> MemoryOutput:
        if name not in self.outputs:
            raise not_found("output", name, self.outputs)
        return self.outputs[name]

    def connect(self, output: MemoryOutput | str, input: MemoryInput | str) -> None:
        """Loop ``output`` into ``input``: each message sent arrives there."""
        out, inp = self._pair(output, input)
        if inp not in out._targets:
            out._targets.append(inp)

    def disconnect(self, output: MemoryOutput | str, input: MemoryInput | str) -> None:
        out, inp = self._pair(output, input)
        if inp in out._targets:
            out._targets.remove(inp)

    def _pair(self, output, input) -> tuple[MemoryOutput, MemoryInput]:
        out = self.output(output) if isinstance(output, str) else output
        inp = self.input(input) if isinstance(input, str) else input
        return out, inp

    def list_ports(self) -> dict[str, list[str]]:
        """Open ports by name, in the shape of the rtmidi backend's ``list_ports``."""
        return {
            "inputs": [n for n, p in self.inputs.items() if not p.closed],
            "outputs": [n for n, p in self.outputs.items() if not p.closed],
        }

    def close_all(self) -> None:
        for port in [*self.outputs.values(), *self.inputs.values()]:
            port.close()
