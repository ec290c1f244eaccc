"""Latency of online instrumentation per note: the ONNX step alone and the whole decision.

    python benchmarks/instrument_step.py [--model NAME_OR_PATH] [--notes 20000] [--threads 1] [--json]

Streams performances of the test split (protocol ``b``, a person playing;
pieces repeat with fresh randomness until ``--notes`` notes) through an
:class:`~coplayer.instrument.instrumenter.Instrumenter` over an
:class:`~coplayer.instrument.runner.OnnxScorer`, with the default
configuration's parts and penalties.  In one run it times, per note, with
``time.perf_counter_ns``:

- step: the ONNX step (inputs copied in, ``session.run``, state kept);
- decision: ``Instrumenter.note_on``: features, step, log-softmax, constraints, commit.

The first ``--warmup`` notes are played but not timed.  Needs the runtime only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterator

import numpy as np

from coplayer.config import Config
from coplayer.data.splits import load_split
from coplayer.engine.stats import summary
from coplayer.errors import CoplayerError
from coplayer.instrument.features import Featurizer
from coplayer.instrument.instrumenter import Instrumenter, Penalties, PartRule
from coplayer.instrument.protocols import Performance, perform
from coplayer.instrument.runner import OnnxModel, OnnxScorer, check_parts, log_softmax


class TimedScorer(OnnxScorer):
    """An OnnxScorer that records how long each ONNX step takes."""

    def __init__(self, model: OnnxModel):
        super().__init__(model)
        self.step_ns: list[int] = []

    def log_probs(self, pitch: int, feats: np.ndarray, featurizer: Featurizer) -> np.ndarray:
        t0 = time.perf_counter_ns()
        logits = self.model.logits(pitch, feats)
        self.step_ns.append(time.perf_counter_ns() - t0)
        return log_softmax(logits)


def performances(parts: list[str], notes: int, seed: int) -> Iterator[Performance]:
    """Test-split performances (protocol b) until at least ``notes`` notes."""
    scores = load_split("test")
    rng = np.random.default_rng(seed)
    total = 0
    while total < notes:
        for score in scores:
            perf = perform(score, parts, "b", rng)
            yield perf
            total += len(perf.pitches)
            if total >= notes:
                return


def instrumenter(scorer: OnnxScorer, cfg: Config) -> Instrumenter:
    check_parts(scorer.parts, cfg.part_names, model=scorer.model.name, source="the default configuration")
    rules = [PartRule(p.name, p.low, p.high, p.monophonic) for p in cfg.parts]
    penalties = Penalties(mono=cfg.instrument.mono_penalty, range=cfg.instrument.range_penalty)
    return Instrumenter(scorer, rules, penalties)


def play(inst: Instrumenter, perf: Performance, decision_ns: list[int]) -> None:
    """One performance through the instrumenter, timing each note-on."""
    inst.reset()
    for ev in perf.events:
        pitch = int(perf.pitches[ev.index])
        if not ev.on:
            inst.note_off(pitch, ev.time)
            continue
        velocity = int(perf.velocities[ev.index])
        t0 = time.perf_counter_ns()
        inst.note_on(pitch, velocity, ev.time)
        decision_ns.append(time.perf_counter_ns() - t0)


def summary_ns(ns: list[int]) -> dict[str, float]:
    """p50/p99/max in milliseconds of durations in nanoseconds."""
    return summary(list(np.asarray(ns, dtype=np.float64) / 1e6))


def benchmark(model: OnnxModel, notes: int, warmup: int, seed: int) -> dict:
    scorer = TimedScorer(model)
    inst = instrumenter(scorer, Config())
    decision_ns: list[int] = []
    for perf in performances(list(model.parts), notes + warmup, seed):
        play(inst, perf, decision_ns)
    return {
        "model": model.name, "path": str(model.path), "notes": len(decision_ns) - warmup, "warmup": warmup,
        "step_ms": summary_ns(scorer.step_ns[warmup:]), "decision_ms": summary_ns(decision_ns[warmup:]),
    }


def report(result: dict, threads: int) -> str:
    lines = [f"model {result['model']} ({result['path']}), {threads} thread(s): {result['notes']} notes "
             f"of test-split performances (protocol b), first {result['warmup']} not timed",
             f"{'ms per note':<16}{'p50':>9}{'p99':>9}{'max':>9}"]
    for label, key in (("onnx step", "step_ms"), ("whole decision", "decision_ms")):
        s = result[key]
        lines.append(f"{label:<16}{s['p50']:>9.4f}{s['p99']:>9.4f}{s['max']:>9.4f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="instrument-lstm", help="shipped model name or path to an .onnx file")
    p.add_argument("--notes", type=int, default=20_000, help="notes timed (at least)")
    p.add_argument("--warmup", type=int, default=200, help="notes played first, not timed")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = OnnxModel(args.model, threads=args.threads)
        result = benchmark(model, args.notes, args.warmup, args.seed)
    except CoplayerError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    result["threads"] = args.threads
    print(json.dumps(result, indent=1) if args.json else report(result, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
