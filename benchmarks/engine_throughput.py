"""How many notes per second the live engine takes, without JACK: capacity, then paced rates.

    python benchmarks/engine_throughput.py [--seconds 3] [--rates 200 500 1000 2000] [--json]

The engine of ``coplayer run`` (the shipped instrumentation model, its
fallback, the responder, the OSC feed, the session recorder) on memory
ports, mode ``instrument``.  Notes come as in ``coplayer bench``'s rate
steps (each held for two gaps, pitches cycling), injected into the input
port from this thread, as a port's reader thread would:

- paced: each rate for ``--seconds``, each message at its time; per rate,
  the decision latency (arrival to the note-on's send, queue wait included)
  p50/p99/max and the notes the fallback routed because the model would have
  been late (the figure ``coplayer bench`` needs at zero);
- capacity (last): every message of ``--seconds`` at 2,000 notes/s injected
  at once; the time until the engine has handled them all gives the cost per
  message and the notes/s one engine thread sustains.

The JACK path adds its readers, its clients and the peer on the same two
cores: ``python benchmarks/e2e_latency.py`` measures that.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from coplayer.bench import free_udp_port, rate_steps
from coplayer.config import load_config
from coplayer.engine.live import build_live
from coplayer.engine.stats import summary
from coplayer.io.ports import now_ns


SETTLE_S = 1.0  # between sections: the OSC feed and the collector catch up


def _engine(record: bool):
    cfg = load_config(None, overrides=[
        "midi.backend=memory", "mode=instrument", f"session.record={str(record).lower()}",
        f"osc.in_port={free_udp_port()}", f"osc.out_port={free_udp_port()}"])
    return build_live(cfg).start()


def capacity(live, seconds: float) -> dict:
    engine = live.engine
    messages = [m for _, m in rate_steps(2000, seconds, random.Random(1))]
    t0 = time.perf_counter()
    for msg in messages:
        live.input.inject(msg)
    engine.flush(timeout=120)
    took = time.perf_counter() - t0
    return {"messages": len(messages), "us_per_message": 1e6 * took / len(messages),
            "notes_per_s": len(messages) / 2 / took}


def paced(live, rate: int, seconds: float) -> dict:
    engine = live.engine
    schedule = rate_steps(rate, seconds, random.Random(rate))
    before, misses = len(engine.latency.samples_ns), engine.decider.misses
    start = time.perf_counter()
    for at, msg in schedule:
        wait = start + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        live.input.inject(msg, now_ns())
    engine.flush(timeout=60)
    ms = [ns / 1e6 for ns in engine.latency.samples_ns[before:]]
    return {"rate": rate, "notes": len(ms), "fallback": engine.decider.misses - misses, "latency_ms": summary(ms)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="length of each section")
    p.add_argument("--rates", type=int, nargs="+", default=[200, 500, 1000, 2000], help="paced rates, notes/s")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    live = _engine(record=False)
    try:
        responder = live.engine.responder
        t0 = time.perf_counter()
        while responder is not None and responder.state == "starting" and time.perf_counter() - t0 < 30:
            time.sleep(0.05)  # its warm-up generates two answers: not while measuring
        live.engine.flush()  # the worker's own warm-up
        steps = []
        for rate in args.rates:
            steps.append(paced(live, rate, args.seconds))
            time.sleep(SETTLE_S)
        cap = capacity(live, args.seconds)  # last: its backlog (OSC, garbage) outlasts it
    finally:
        live.stop()
    result = {"capacity": cap, "paced": steps,
              "max_rate_without_fallback": max([s["rate"] for s in steps if s["fallback"] == 0], default=0)}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"capacity: {cap['messages']} messages at once: {cap['us_per_message']:.1f} us per message, "
          f"{cap['notes_per_s']:.0f} notes/s")
    print(f"{'notes/s':>8}{'notes':>7}{'fallback':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for s in steps:
        lat = s["latency_ms"]
        print(f"{s['rate']:>8}{s['notes']:>7}{s['fallback']:>10}{lat['p50']:>9.3f}{lat['p99']:>9.3f}{lat['max']:>9.3f}")
    print(f"highest paced rate with no fallback: {result['max_rate_without_fallback']} notes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
