"""How fast the continuation model answers, on one CPU thread through onnxruntime.

    python benchmarks/continue_speed.py [--model continue-transformer] [--notes 2000] [--json]

Two figures, as the live engine meets them:

- **generation**: notes generated per second, each note sampling all five
  fields (plain temperature sampling, one head run per field) and feeding
  the note back (one decoder step with the KV cache); after a 256-event
  context, and past the window so the cache slides.  p50/p99 per note.
- **first note**: time from the trigger to the first note of a response
  being ready, with a ``--context``-event context: ``cold`` = the whole
  context prefilled at the trigger, then the first note sampled; ``warm`` =
  the context was fed while the player played (as the engine does), so the
  trigger only samples the first note.  p50/p99 over ``--trials``.

The context is real music: test chorales of the committed split, back to back.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from coplayer.gen.encoding import FIELDS
from coplayer.gen.runner import OnnxEventModel


def context_events(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` events of test chorales, back to back."""
    from coplayer.gen.data import load_pieces

    events, pos = [], []
    for piece in load_pieces("test", sources=("bach",)):
        events.append(piece.events)
        pos.append(piece.pos)
        if sum(len(e) for e in events) >= n:
            break
    return np.concatenate(events)[:n], np.concatenate(pos)[:n]


def sample_note(model, rng: np.random.Generator, temperature: float) -> dict[str, int]:
    """All five fields of the next note, each by plain temperature sampling (Gumbel-max)."""
    partial: dict[str, int] = {}
    for name in FIELDS:
        logits = model.field_logits(name, partial) / temperature
        partial[name] = int(np.argmax(logits + rng.gumbel(size=logits.shape)))
    return partial


def generate(model, n: int, start_pos: int, rng: np.random.Generator, temperature: float,
             bar_ticks: int = 48) -> np.ndarray:
    """Generate ``n`` notes, feeding each back; returns the seconds each note took."""
    times = np.empty(n)
    pos = start_pos
    event = np.zeros((1, len(FIELDS)), dtype=np.int64)
    for i in range(n):
        t0 = time.perf_counter()
        note = sample_note(model, rng, temperature)
        event[0] = [note[f] for f in FIELDS]
        pos = (pos + note["shift"]) % bar_ticks
        model.feed(event, np.array([pos]))
        times[i] = time.perf_counter() - t0
    return times


def stats(seconds: np.ndarray) -> dict:
    ms = seconds * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(len(ms))}


def run(model_name: str, notes: int, context: int, trials: int, temperature: float, seed: int) -> dict:
    model = OnnxEventModel(model_name, threads=1)
    rng = np.random.default_rng(seed)
    events, pos = context_events(context)
    # Warm-up: sessions allocate on their first runs.
    model.reset()
    model.feed(events, pos)
    generate(model, 20, int(pos[-1]), rng, temperature)

    model.reset()
    model.feed(events, pos)
    t0 = time.perf_counter()
    per_note = generate(model, notes, int(pos[-1]), rng, temperature)
    total = time.perf_counter() - t0

    cold, warm = np.empty(trials), np.empty(trials)
    for i in range(trials):
        model.reset()
        t0 = time.perf_counter()
        model.feed(events, pos)  # the trigger: prefill the whole context
        sample_note(model, rng, temperature)
        cold[i] = time.perf_counter() - t0
    for i in range(trials):
        model.reset()
        model.feed(events[:-1], pos[:-1])
        t0 = time.perf_counter()
        model.feed(events[-1:], pos[-1:])  # the player's last note, then the trigger
        sample_note(model, rng, temperature)
        warm[i] = time.perf_counter() - t0
    return {
        "model": model.name,
        "threads": 1,
        "window": model.window,
        "context_events": int(len(events)),
        "generation": {"notes": notes, "notes_per_s": notes / total, "per_note": stats(per_note),
                       "temperature": temperature},
        "first_note_cold": stats(cold),
        "first_note_warm": stats(warm),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="continue-transformer", help="shipped name or path to the decoder .onnx")
    p.add_argument("--notes", type=int, default=2000, help="notes generated for the throughput figure")
    p.add_argument("--context", type=int, default=256, help="events of context before the trigger")
    p.add_argument("--trials", type=int, default=100, help="triggers timed for the first-note figure")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    result = run(args.model, args.notes, args.context, args.trials, args.temperature, args.seed)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    g = result["generation"]
    print(f"{result['model']}: one thread, window {result['window']}, context {result['context_events']} events")
    print(f"generation: {g['notes_per_s']:.0f} notes/s over {g['notes']} notes "
          f"(per note p50 {g['per_note']['p50_ms']:.3f} ms, p99 {g['per_note']['p99_ms']:.3f} ms)")
    for kind, what in (("cold", "prefill + first note"), ("warm", "last note + first note")):
        s = result[f"first_note_{kind}"]
        print(f"first note, {kind} ({what}): p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
