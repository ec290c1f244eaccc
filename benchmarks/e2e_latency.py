"""End-to-end latency through real JACK ports, beside the bare JACK loop floor.

    python benchmarks/e2e_latency.py [--notes 2000] [--json] [--png out/e2e_latency.png] [--backend jack|rtmidi]

The same as ``coplayer bench`` (see :mod:`coplayer.bench`): needs a running
JACK server, e.g. ``jackd --no-realtime -d dummy -r 48000 -p 64``.
"""

from __future__ import annotations

import argparse

from coplayer.bench import main as bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--notes", type=int, default=2000, help="notes played at realistic densities")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--png", metavar="PATH", help="write a histogram of both latency distributions")
    p.add_argument("--backend", choices=["auto", "jack", "rtmidi"], default="auto",
                   help="the ports of every process: coplayer's JACK client or python-rtmidi (default: auto)")
    args = p.parse_args(argv)
    return bench(notes=args.notes, as_json=args.json, png=args.png, backend=args.backend)


if __name__ == "__main__":
    raise SystemExit(main())
