"""Input overload: a flood of junk into coplayer's input through JACK while real notes play.

    python benchmarks/flood.py [--rate 20000] [--seconds 8] [--notes-per-s 10] [--json]

Needs a running JACK server, e.g. ``jackd --no-realtime -d dummy -r 48000 -p 64``.
Starts ``coplayer run`` as a separate process (as ``coplayer bench`` does) and,
from a JACK client of its own, sends ``--rate`` messages per second of junk
for ``--seconds``: SysEx of 10-200 bytes, random bytes that are no MIDI
message, and note-ons with their note-offs (every junk note-on gets its
note-off, a few ms to 0.2 s later).  Meanwhile, from one second before to one
second after the flood, a steady stream of real notes plays, told apart by
their velocity (127; the junk never uses it).  Everything coplayer plays is
read back on one input.

Printed: coplayer's own decision latency (arrival stamp to send) of what it
played, p50/p99/max, per its OSC feed; the end-to-end latency of the real
notes (sent to heard) and how many of them were played; the messages
coplayer dropped as too late and those its input ring could not hold; the
notes still sounding at the listener after every note-off was sent and the
stragglers arrived (before coplayer exits, whose All Notes Off would hide
them).  A late note is worse than a dropped one: coplayer drops a note-on
that waited longer than ``latency.budget_ms`` plus one JACK period.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from coplayer.bench import MERGED, CoplayerProcess, Peer, StatsListener, is_on, jack_connect, sounding_after, wait_ports
from coplayer.engine.stats import summary
from coplayer.io.ports import now_ns

REAL_VELOCITY = 127
REAL_CHANNEL = 0
LEAD_S = 1.0  # real notes alone before and after the flood
PITCHES = 48  # real notes cycle through this many pitches ...
MATCH_S = 1.0  # ... and arrive within this long, or count as not played


def junk(rng: random.Random) -> bytes:
    """One message of junk: SysEx, random bytes, or a junk note-on (velocity 1-100, channels 2-9)."""
    kind = rng.random()
    if kind < 0.3:
        return bytes([0xF0, *(rng.randrange(128) for _ in range(rng.randrange(10, 200))), 0xF7])
    if kind < 0.6:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        # no channel message here: every junk note-on must get its note-off, and
        # a random controller could steer coplayer (mode, panic)
        return data if not 0x80 <= data[0] <= 0xEF else bytes([rng.randrange(128), *data[1:]])
    return bytes([0x90 | rng.randrange(1, 9), rng.randrange(128), rng.randrange(1, 101)])


def flood(rate: float, seconds: float, notes_per_s: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pool = [junk(rng) for _ in range(4096)]  # made beforehand: the sender must keep up
    cp = CoplayerProcess(settings={"latency.stats_interval_s": 0.2})
    stats = StatsListener(cp.osc_out)
    peer = player = None
    try:
        cp.start()
        peer = Peer(backend="jack")
        peer.attach(cp, merge=True)
        # The real notes leave by a client of their own, so that they do not
        # queue behind the junk in the flood's own output.
        from coplayer.io.real import open_output

        player = open_output(f"{peer.name} real", virtual=True, backend="jack", api="jack",
                             client_name=f"{peer.name}real")
        jack_connect(wait_ports([f"{peer.name} real"])[f"{peer.name} real"], cp.ports["in"])
        time.sleep(0.3)
        before = stats.fresh_stats()
        send = peer.out._send  # junk on purpose: send() refuses bytes that are no MIDI message
        real, offs = [], []  # (t_ns sent, pitch); (when, note-off) still to send
        junk_sent = 0
        total = seconds + 2 * LEAD_S
        start = time.perf_counter()
        next_real = 0.0
        while True:
            now = time.perf_counter() - start
            if now >= total and not offs:
                break
            if now >= next_real and now < total:
                pitch = 36 + len(real) % PITCHES
                real.append((now_ns(), pitch))
                player.send((0x90 | REAL_CHANNEL, pitch, REAL_VELOCITY))
                offs.append((now + 0.6 / notes_per_s, (player.send, (0x80 | REAL_CHANNEL, pitch, 0))))
                next_real += 1.0 / notes_per_s
            if LEAD_S <= now < LEAD_S + seconds:
                due = int((now - LEAD_S) * rate) - junk_sent
                for k in range(due):
                    msg = pool[(junk_sent + k) % len(pool)]
                    send(msg)
                    if msg[0] & 0xF0 == 0x90:
                        offs.append((now + rng.uniform(0.005, 0.2), (send, bytes([msg[0] & 0x0F | 0x80, msg[1], 0]))))
                junk_sent += max(0, due)
            if offs:
                offs.sort(key=lambda e: e[0])
                while offs and offs[0][0] <= now:
                    _, (by, msg) = offs.pop(0)
                    by(msg)
            time.sleep(0.0005)
        peer.wait_quiet(quiet_s=1.0, timeout_s=30.0)
        after = stats.fresh_stats()
        heard = peer.events((MERGED,))
        sounding = sum(sounding_after(heard).values())
        e2e = _match(real, [(t, m[1]) for _, m, t in heard if is_on(m) and m[2] == REAL_VELOCITY])
        return {
            "junk_per_s": rate, "seconds": seconds, "junk_sent": junk_sent,
            "real_sent": len(real), "real_played": len(e2e),
            "real_e2e": summary(e2e),
            "decision": None if after is None else {"p50_ms": after[0], "p99_ms": after[1], "max_ms": after[2],
                                                    "count": after[3] - (before[3] if before else 0)},
            "dropped_late": stats.dropped_late(), "ring_overflow": stats.ports[2] if stats.ports else None,
            "stuck": sounding, "resent": stats.resent(), "xruns": stats.ports[0] if stats.ports else None,
        }
    finally:
        if player is not None:
            player.close()
        if peer is not None:
            peer.close()
        cp.stop()
        stats.close()


def _match(sent: list[tuple[int, int]], heard: list[tuple[int, int]]) -> list[float]:
    """ms from each real note-on sent to its arrival: the next arrival of its
    pitch within MATCH_S (a note dropped must not take a later one's)."""
    out, queue = [], {}
    for t, pitch in sorted(heard):
        queue.setdefault(pitch, []).append(t)
    for t, pitch in sent:
        later = [x for x in queue.get(pitch, []) if t <= x < t + MATCH_S * 1e9]
        if later:
            out.append((later[0] - t) / 1e6)
            queue[pitch].remove(later[0])
    return out


def report(r: dict) -> list[str]:
    d, e = r["decision"], r["real_e2e"]
    lines = [f"junk: {r['junk_sent']} messages in {r['seconds']:g} s ({r['junk_per_s']:g}/s: SysEx, random bytes, "
             "note-ons with their note-offs)"]
    if d:
        lines.append(f"coplayer's decision time of what it played (its OSC feed, last 4096 notes): "
                     f"p50 {d['p50_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms, max {d['max_ms']:.3f} ms")
    lines += [
        f"real notes: {r['real_played']} of {r['real_sent']} played; sent to heard p50 {e['p50']:.3f} ms, "
        f"p99 {e['p99']:.3f} ms, max {e['max']:.3f} ms",
        f"dropped as too late: {r['dropped_late']}; lost because the input ring was full: {r['ring_overflow']}",
        f"notes left sounding after every note-off: {r['stuck']}; note-offs written again after xruns: "
        f"{r['resent']}; JACK xruns: {r['xruns']}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=20000, help="junk messages per second (default 20000)")
    p.add_argument("--seconds", type=float, default=8.0, help="how long the flood lasts (default 8)")
    p.add_argument("--notes-per-s", type=float, default=10.0, help="real notes per second (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    result = flood(args.rate, args.seconds, args.notes_per_s, args.seed)
    print(json.dumps(result) if args.json else "\n".join(report(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
