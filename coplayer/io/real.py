"""Real MIDI ports: which backend opens them.

``backend`` (``midi.backend`` in config.yaml):

* ``jack`` — coplayer's own JACK client (:mod:`coplayer.io.jack_backend`):
  one JACK client for all ports of a process, no polling;
* ``rtmidi`` — python-rtmidi with ``api`` (ALSA, JACK, CoreMIDI, WinMM);
* ``auto`` — ``jack`` when ``api`` resolves to JACK and coplayer's JACK
  client is built, else ``rtmidi``.

Every port is a :class:`~coplayer.io.ports.BaseInput` or
:class:`~coplayer.io.ports.BaseOutput`, whichever backend opened it.
"""

from __future__ import annotations

from coplayer.io.ports import BaseInput, BaseOutput, PortError

__all__ = ["BACKENDS", "choose", "list_ports", "open_input", "open_output"]

BACKENDS = ("auto", "jack", "rtmidi")


def choose(backend: str = "auto", api: str = "auto") -> str:
    """The backend that opens ports for ``backend`` and ``api``: "jack" or "rtmidi"."""
    if backend not in BACKENDS:
        raise PortError(f"unknown MIDI backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        from coplayer.io import jack_backend
        from coplayer.io.rtmidi_backend import resolve_api

        jack = api == "jack" or (api == "auto" and resolve_api(api) == "jack")
        return "jack" if jack and jack_backend.available() else "rtmidi"
    if backend == "jack" and api not in ("auto", "jack"):
        raise PortError(f"midi.backend jack opens JACK ports only, not {api}: use backend rtmidi or auto")
    return backend


def open_input(name: str, *, virtual: bool = False, backend: str = "auto", api: str = "auto",
               client_name: str = "coplayer", on_message=None) -> BaseInput:
    if choose(backend, api) == "jack":
        from coplayer.io.jack_backend import JackInput

        return JackInput(name, virtual=virtual, client_name=client_name, on_message=on_message)
    from coplayer.io.rtmidi_backend import RtMidiInput

    return RtMidiInput(name, virtual=virtual, api=api, client_name=client_name, on_message=on_message)


def open_output(name: str, *, virtual: bool = False, backend: str = "auto", api: str = "auto",
                client_name: str = "coplayer") -> BaseOutput:
    if choose(backend, api) == "jack":
        from coplayer.io.jack_backend import JackOutput

        return JackOutput(name, virtual=virtual, client_name=client_name)
    from coplayer.io.rtmidi_backend import RtMidiOutput

    return RtMidiOutput(name, virtual=virtual, api=api, client_name=client_name)


def list_ports(backend: str = "auto", api: str = "auto", client_name: str = "coplayer") -> dict[str, list[str]]:
    """{"inputs": ports coplayer can listen to, "outputs": ports it can play to}."""
    if choose(backend, api) == "jack":
        from coplayer.io import jack_backend

        return jack_backend.list_ports(client_name)
    from coplayer.io import rtmidi_backend

    return rtmidi_backend.list_ports(rtmidi_backend.resolve_api(api), client_name)
