"""What a note costs when notes come with rests between them, against back to back.

    python benchmarks/step_gaps.py [--model NAME_OR_PATH] [--steps 400] [--gap-ms 6] [--json]

Live notes come tens of milliseconds apart, and on a machine that idles
between them each step finds colder caches than in a loop.  In one run this
times, with ``time.perf_counter_ns`` (the first tenth of each series not
counted):

- the ONNX step (``OnnxModel.logits``) back to back, with ``--gap-ms`` of
  sleep between steps, and with the same gap spent spinning, for the
  session coplayer opens and for two session options that change memory
  handling (no CPU memory arena, no memory pattern);
- the engine's handling of a note-on (``Engine._handle_here``, memory
  ports, default configuration, OSC on, keep-warm off) with a model whose
  step costs nothing, back to back and with the gap: the Python around the
  model, including the work after the send.

Prints figures only; needs the runtime only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort

from coplayer.bench import free_udp_port
from coplayer.config import load_config, packaged_config
from coplayer.engine.live import MemoryPorts, build_live
from coplayer.engine.stats import summary
from coplayer.instrument.features import Featurizer
from coplayer.instrument.runner import OnnxModel
from coplayer.io.ports import now_ns


def wait(gap_s: float, spin: bool) -> None:
    if spin:
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            pass
    elif gap_s:
        time.sleep(gap_s)


def timed(series_ns: list[int]) -> dict[str, float]:
    kept = series_ns[len(series_ns) // 10:]
    return summary(list(np.asarray(kept, dtype=np.float64) / 1e6))


def step_series(model: OnnxModel, steps: int, gap_s: float, spin: bool) -> dict[str, float]:
    feats = Featurizer(model.spec).note_on(60, 80, 0.0)
    out = []
    for i in range(steps):
        t0 = time.perf_counter_ns()
        model.logits(60 + i % 12, feats)
        out.append(time.perf_counter_ns() - t0)
        wait(gap_s, spin)
    model.reset()
    return timed(out)


def with_options(model: OnnxModel, **options) -> None:
    """Reopen ``model``'s session as coplayer does, with ``options`` changed."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    for key, value in options.items():
        setattr(opts, key, value)
    model._session = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])


def engine_series(steps: int, gap_s: float) -> dict[str, float]:
    """Note-ons through the engine with a model step that costs nothing."""
    cfg = load_config(str(packaged_config()), ["midi.backend=memory", "mode=instrument", "session.record=false",
                                               "latency.keep_warm_ms=0", f"osc.in_port={free_udp_port()}",
                                               f"osc.out_port={free_udp_port()}"])
    live = build_live(cfg, MemoryPorts())
    zero = np.zeros(len(live.engine.decider.model.parts), dtype=np.float32)
    live.engine.decider.model.scorer.model.logits = lambda pitch, feats: zero
    live.start()
    handle, rng, out = live.engine._handle_here, np.random.default_rng(0), []
    try:
        for _ in range(steps):
            pitch = int(rng.integers(40, 80))
            t0 = now_ns()
            handle((0x90, pitch, 90), t0)
            out.append(now_ns() - t0)
            wait(gap_s, False)
            handle((0x80, pitch, 0), now_ns())
            wait(gap_s, False)
    finally:
        live.stop()
    return timed(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="instrument-lstm", help="shipped model name or path to an .onnx file")
    p.add_argument("--steps", type=int, default=400, help="steps (notes) per series")
    p.add_argument("--gap-ms", type=float, default=6.0, help="rest between steps")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    gap = args.gap_ms / 1e3
    model = OnnxModel(args.model)
    rows = {}
    for label, options in (("default session", None), ("no memory arena", {"enable_cpu_mem_arena": False}),
                           ("no memory pattern", {"enable_mem_pattern": False})):
        if options is not None:
            with_options(model, **options)
        for what, g, spin in (("back to back", 0.0, False), ("sleep between", gap, False),
                              ("spin between", gap, True)):
            rows[f"onnx step, {label}, {what}"] = step_series(model, args.steps, g, spin)
    for what, g in (("back to back", 0.0), ("sleep between", gap)):
        rows[f"engine note-on, zero-cost model, {what}"] = engine_series(args.steps, g)
    if args.json:
        print(json.dumps({"model": model.name, "gap_ms": args.gap_ms, "ms": rows}))
        return 0
    print(f"model {model.name}, {args.steps} steps per series, gap {args.gap_ms:g} ms; ms per step")
    print(f"{'':<58}{'p50':>8}{'p99':>8}{'max':>8}")
    for label, s in rows.items():
        print(f"{label:<58}{s['p50']:>8.3f}{s['p99']:>8.3f}{s['max']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
