"""How soon the responder's answer is ready after the player's phrase ends, through the live path.

    python benchmarks/respond_latency.py [--model continue-transformer|markov-live|markov|PATH]
                                         [--context 256] [--trials 20] [--bars 2] [--json]

A :class:`~coplayer.engine.responder.Responder` with the default configuration
(four parts, ``--bars`` bars, motif repetition on) hears ``--context`` events
of test chorales as played notes, then ``--trials`` phrases of about 16 notes
(the chorales going on), each followed by the configured silence.  Its model
is fed as the notes become final, as in ``coplayer run``, so a phrase end
only costs the answer.  Per phrase end: **first note** (ms until the first
note of the answer is sampled) and **answer** (ms until the whole answer is
ready and scheduled), p50 and max, and how many answers were pushed.

The clock runs at 600 BPM so that the run takes seconds; the generation
times do not depend on the tempo.
"""

from __future__ import annotations

import argparse
import json
import time

from coplayer.config import Config
from coplayer.engine.responder import Responder
from coplayer.gen.continue_file import load_event_model
from coplayer.gen.data import load_pieces
from coplayer.io.clock import InternalClock
from coplayer.io.ports import now_ns

BPM = 600.0


def chorale_notes(n: int, encoding):
    """``n`` + a margin of notes of test chorales, back to back, with parts and beats."""
    notes, offset = [], 0.0
    for piece in load_pieces("test", encoding, sources=("bach",)):
        part = encoding.decode(piece.events)
        for note in part:
            note.onset_beats += offset
        notes += part
        offset = notes[-1].end_beats + 1.0
        if len(notes) >= n:
            break
    return notes


def run(model_name: str, context: int, trials: int, bars: int, phrase: int = 16) -> dict:
    from dataclasses import replace

    cfg = Config()
    cfg = replace(cfg, continuation=replace(cfg.continuation, response_bars=bars))
    model = load_event_model(model_name)
    clock = InternalClock(BPM)
    sent = []
    r = Responder(cfg, clock, lambda part, msg, t: sent.append(msg), model=model)
    notes = chorale_notes(context + trials * phrase, model.encoding)
    silence = cfg.continuation.silence_beats
    r.start()
    try:
        while r.state == "starting":  # the warm-up
            time.sleep(0.01)
        base = None
        chunks = [notes[:context]] + [notes[context + i * phrase: context + (i + 1) * phrase] for i in range(trials)]
        for k, chunk in enumerate(chunks):
            # the chunk's last onset lands silence + 0.1 beats ago: its phrase end is due at once
            wanted = clock.beat_at(now_ns()) - silence - 0.1 - chunk[-1].onset_beats
            base = wanted if base is None else max(base, wanted)
            wait = (base + chunk[-1].onset_beats + silence + 0.1 - clock.beat_at(now_ns())) * 60 / BPM
            if wait > 0:
                time.sleep(wait)
            done = r.stats["generated"] + r.stats["failed"] + r.stats["dropped"]
            for n in chunk:  # note-ons and note-offs in time order
                on = clock.time_of_beat(base + n.onset_beats)
                r.note_on(n.pitch, n.velocity, n.part, on)
            for n in chunk:
                r.note_off(n.pitch, clock.time_of_beat(base + n.end_beats))
            if k == 0:
                continue
            deadline = time.monotonic() + 5
            while r.stats["generated"] + r.stats["failed"] + r.stats["dropped"] == done:
                if time.monotonic() > deadline:
                    raise RuntimeError("no answer within 5 s")
                time.sleep(0.002)
            r.cancel()
        stats = r.stats
    finally:
        r.stop()
    return {"model": stats["model"], "context_events": context, "trials": trials, "bars": bars,
            "first_note_ms_p50": stats["first_note_ms_p50"], "first_note_ms_max": stats["first_note_ms_max"],
            "answer_ms_p50": stats["gen_ms_p50"], "answer_ms_max": stats["gen_ms_max"],
            "pushed": stats["pushed"], "failed": stats["failed"], "generated": stats["generated"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="continue-transformer", help="continuation model: name, markov(-live) or path")
    p.add_argument("--context", type=int, default=256, help="events heard before the first timed phrase")
    p.add_argument("--trials", type=int, default=20, help="phrase ends timed")
    p.add_argument("--bars", type=int, default=2, help="bars per answer")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.model, args.context, args.trials, args.bars)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['model']}: context {result['context_events']} events, {result['trials']} phrase ends, "
          f"{result['bars']}-bar answers")
    print(f"first note ready: p50 {result['first_note_ms_p50']:.1f} ms, max {result['first_note_ms_max']:.1f} ms")
    print(f"whole answer ready: p50 {result['answer_ms_p50']:.1f} ms, max {result['answer_ms_max']:.1f} ms; "
          f"{result['pushed']} pushed, {result['failed']} failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
