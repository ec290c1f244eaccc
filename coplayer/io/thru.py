"""The bare loop: a MIDI pass-through client with coplayer's port layer and nothing else.

``python -m coplayer.io.thru NAME [--backend auto|jack|rtmidi] [--api jack]``
opens a virtual input "NAME in" and a virtual output "NAME out" (with the
backend coplayer would use, see :mod:`coplayer.io.real`) and sends every
message it receives straight on, from the input's reader thread, until
SIGTERM or Ctrl-C.  ``coplayer bench`` runs it as a separate process beside coplayer,
over the same kind of ports, so the two latency distributions differ only
by what coplayer does between its ports (see :mod:`coplayer.bench`).
"""

from __future__ import annotations

import argparse
import signal
import threading

from coplayer.io.ports import Message

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from coplayer.io.real import BACKENDS, open_input, open_output

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help='client name; the ports are "NAME in" and "NAME out"')
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="port backend (default: auto)")
    p.add_argument("--api", default="jack", help="MIDI API (default: jack)")
    args = p.parse_args(argv)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    ports = dict(virtual=True, backend=args.backend, api=args.api, client_name=args.name)
    out = open_output(f"{args.name} out", **ports)
    send = out.send

    def forward(msg: Message, _t_ns: int) -> None:
        send(msg)

    inp = open_input(f"{args.name} in", on_message=forward, **ports)
    try:
        while not done.wait(0.5):
            pass
    finally:
        inp.close()
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
