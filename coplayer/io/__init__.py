"""MIDI ports, OSC and tempo: how notes and controls enter and leave coplayer.

Nothing here knows about models or music: ports move bytes and keep note
hygiene, OSC maps addresses to the owner's functions, clocks tell time.

* :mod:`coplayer.io.ports` — the port interface (``BaseInput``/``BaseOutput``),
  ``PortError``, ``now_ns`` (the one clock of every timestamp);
* :mod:`coplayer.io.memory` — in-memory ports for tests and the demo;
* :mod:`coplayer.io.rtmidi_backend` — real ports (imports python-rtmidi);
* :mod:`coplayer.io.osc` — OSC routing table, UDP server and client;
* :mod:`coplayer.io.clock` — internal tempo and MIDI clock following.

Importing this package imports neither rtmidi nor python-osc.
"""

from coplayer.io.ports import BaseInput, BaseOutput, Message, PortError, PortNotFoundError, now_ns

__all__ = ["BaseInput", "BaseOutput", "Message", "PortError", "PortNotFoundError", "now_ns"]
