"""Export a trained continuation model to ONNX graphs with a KV cache, and its model card.

    python -m export.continuation RUN_DIR --name continue-transformer [--out coplayer/assets]

RUN_DIR is a ``models.train_continue`` run (``checkpoint.pt``,
``train-args.json``, ``encoding.json``, ``metrics.json``).  Written, in a
staging directory first (graph names from :mod:`coplayer.gen.runner`):

- ``<name>.onnx``: the decoder, ``decode(events [1,T,5], pos [1,T], cache)``
  -> last hidden state and the new events' keys/values; T is dynamic (1 = a
  step, up to the window = a chunk), the ring cache has a fixed size;
- ``<name>-prefill.onnx``: the same without a cache, for the first events;
- ``<name>-<field>.onnx``: one head per field (hidden + earlier fields -> logits);
- ``<name>.json``: the card (encoding, hparams, training, metrics, every
  graph with its sha256 and size, parity).

Parity against PyTorch runs on real test pieces through the runtime's
:class:`~coplayer.gen.runner.OnnxEventModel` (a prefill, then one event per
step past the window, every field's logits compared, atol 1e-4); only then
are the files moved to ``--out``.  On a failure ``--out`` is left unchanged
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch.export import Dim

import coplayer
from coplayer.errors import CoplayerError, ModelError
from coplayer.gen.data import EventPiece, load_pieces
from coplayer.gen.encoding import FIELDS, Encoding
from coplayer.gen.runner import (DECODER, NO_INTERVAL, PREFILL, TASK, OnnxEventModel, PitchContext, RingCache,
                                 decoder_names, graph_file, head_names, prefill_names)
from export.instrument import (OPSET, load_checkpoint, onnxruntime_min, previous_card, read_json, strip_debug_info,
                               write_card)
from export.parity import ATOL
from models.continuation import ContinuationTransformer, DecoderGraph, HeadGraph

DEFAULT_OUT = Path(coplayer.__file__).parent / "assets"


@dataclass
class Run:
    path: Path
    model: ContinuationTransformer
    encoding: dict
    train_args: dict
    epoch: int
    valid: dict
    test: dict


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != ContinuationTransformer.kind:
        raise ModelError(f"checkpoint is a {ckpt.get('kind')!r} model, not a continuation "
                         f"{ContinuationTransformer.kind!r}")
    model = ContinuationTransformer(**ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    return Run(path, model.eval(), read_json(path / "encoding.json"), read_json(path / "train-args.json"),
               int(ckpt["epoch"]), dict(ckpt.get("valid", {})), dict(ckpt.get("test", {})))


# -- the graphs ---------------------------------------------------------------------


def cache_spec(model: ContinuationTransformer) -> dict:
    h = model.hparams
    return {"layers": h["layers"], "heads": h["heads"], "head_dim": h["dim"] // h["heads"], "slots": h["window"] - 1}


@torch.no_grad()
def export_graphs(model: ContinuationTransformer, stage: Path, name: str) -> tuple[dict[str, Path], dict]:
    """Write the decoder and the five heads into ``stage``; returns their paths and the cache spec."""
    model.eval()
    sizes, spec = model.sizes, cache_spec(model)
    # Trace with a partly filled cache and T = 3, so no size is 0 or 1.
    ring = RingCache(spec["layers"], spec["heads"], spec["head_dim"], model.hparams["window"])
    events = torch.stack([torch.randint(0, n, (1, 3)) for n in sizes], dim=-1)
    pos = torch.randint(0, model.hparams["n_pos"], (1, 3))
    rel = torch.randint(0, NO_INTERVAL + 1, (1, 3, 2))
    graph = DecoderGraph(model).eval()
    for _ in range(2):
        inputs = {k: torch.from_numpy(v) for k, v in ring.inputs().items()}
        _, *new = graph(events, pos, rel, *inputs.values())
        ring.write([a.numpy() for a in new[:spec["layers"]]], [a.numpy() for a in new[spec["layers"]:]])
    args = (events, pos, rel, *(torch.from_numpy(v.copy()) for v in ring.inputs().values()))
    paths = {DECODER: stage / graph_file(name, DECODER), PREFILL: stage / graph_file(name, PREFILL)}
    inputs, outputs = decoder_names(spec["layers"])
    t = Dim("T", min=1, max=model.hparams["window"])
    _export(graph, args, paths[DECODER], inputs, outputs,
            ({1: t}, {1: t}, {1: t}, {}, tuple({} for _ in inputs[4:])))
    _export(DecoderGraph(model, cached=False), (events, pos, rel), paths[PREFILL], *prefill_names(spec["layers"]),
            ({1: t}, {1: t}, {1: t}))
    hidden = torch.randn(1, model.hparams["dim"])
    target = torch.tensor([[min(3, n - 1) for n in sizes]])
    for k, field_name in enumerate(FIELDS):
        paths[field_name] = stage / graph_file(name, field_name)
        args = (hidden, target[:, :k]) if k else (hidden,)
        if field_name == "pitch":
            args += (torch.tensor([62]),)
        _export(HeadGraph(model, k), args, paths[field_name], *head_names(k), None)
    return paths, spec


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic_shapes) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: T will not be used")  # events and pos share T
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=dynamic_shapes)
    strip_debug_info(path)


# -- parity ---------------------------------------------------------------------------


@dataclass
class ParityReport:
    pieces: int = 0
    events: int = 0
    prefill: int = 0
    max_abs_diff: float = 0.0
    max_abs_diff_by_field: dict = field(default_factory=lambda: {f: 0.0 for f in FIELDS})
    argmax_mismatches: int = 0
    atol: float = ATOL

    @property
    def ok(self) -> bool:
        return self.events > 0 and self.max_abs_diff <= self.atol and self.argmax_mismatches == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        per = ", ".join(f"{f} {d:.1e}" for f, d in self.max_abs_diff_by_field.items())
        return (f"parity {verdict}: {self.events} events of {self.pieces} test pieces (prefill {self.prefill} "
                f"events each, then one per step), max |logit diff| {self.max_abs_diff:.2e} ({per}; "
                f"atol {self.atol:g}), {self.argmax_mismatches} argmax mismatches")


def parity_pieces(pieces: list[EventPiece], n: int, window: int) -> list[EventPiece]:
    """``n`` real test pieces: the longest chorale (so the window slides), then one per melody corpus."""
    chosen = sorted((p for p in pieces if p.source == "bach"), key=len)[-1:]
    for source in dict.fromkeys(p.source for p in pieces if p.source != "bach"):
        chosen += [p for p in pieces if p.source == source][:1]
    rest = [p for p in pieces if p not in chosen]
    return (chosen + rest)[:max(n, 1)]


@torch.no_grad()
def check_parity(model: ContinuationTransformer, runner: OnnxEventModel, pieces: list[EventPiece], *,
                 prefill: int = 64, atol: float = ATOL) -> ParityReport:
    """Teacher-forced logits of every field at every event: PyTorch ``forward`` vs the ONNX runtime."""
    report = ParityReport(atol=atol, prefill=prefill)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for piece in pieces:
            bos_e, bos_p, bos_r = model.bos()
            rel, anchors = PitchContext(len(runner.encoding.parts)).features(piece.events)
            events = torch.cat([bos_e[0], torch.from_numpy(piece.events)])[None]
            pos = torch.cat([bos_p[0], torch.from_numpy(np.minimum(piece.pos, model.hparams["n_pos"] - 1))])[None]
            hidden = model(events, pos, torch.cat([bos_r[0], torch.from_numpy(rel)])[None])[0]
            # hidden [N+1, D]: position t scores event t (0-based, after BOS)
            runner.reset()
            m = min(prefill, len(piece) - 1)
            runner.feed(piece.events[:m], piece.pos[:m])
            for t in range(m, len(piece)):
                target = piece.events[t]
                partial = {}
                for k, name in enumerate(FIELDS):
                    expected = model.field_logits(k, hidden[t], torch.from_numpy(target),
                                                  torch.tensor(anchors[t])).numpy()
                    got = runner.field_logits(name, partial)
                    diff = float(np.abs(expected - got).max())
                    report.max_abs_diff = max(report.max_abs_diff, diff)
                    report.max_abs_diff_by_field[name] = max(report.max_abs_diff_by_field[name], diff)
                    report.argmax_mismatches += int(np.argmax(expected) != np.argmax(got))
                    partial[name] = int(target[k])
                runner.feed(target[None], piece.pos[t:t + 1])
                report.events += 1
            report.pieces += 1
    finally:
        torch.set_num_threads(threads)
    return report


# -- the card ----------------------------------------------------------------------------


def make_card(run: Run, name: str, paths: dict[str, Path], cache: dict, metrics: dict) -> dict:
    graphs = {}
    for role, path in paths.items():
        data = path.read_bytes()
        names = {DECODER: decoder_names, PREFILL: prefill_names}
        ins, outs = names[role](cache["layers"]) if role in names else head_names(FIELDS.index(role))
        graphs[role] = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
                        "inputs": ins, "outputs": outs}
    enc = {k: v for k, v in run.encoding.items() if k != "data"}
    return {
        "name": name,
        "task": TASK,
        "kind": run.model.kind,
        "encoding": enc,
        "window": run.model.hparams["window"],
        "graphs": graphs,
        "cache": cache,
        "hparams": run.model.hparams,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "training": {"run": run.path.name, "args": run.train_args, "data": run.encoding.get("data", {}),
                     "epoch": run.epoch, "valid": run.valid, "test": run.test},
        "metrics": metrics,
        "sha256": graphs[DECODER]["sha256"],
        "size_bytes": sum(g["size_bytes"] for g in graphs.values()),
        "opset": OPSET,
        "onnxruntime_min": onnxruntime_min(paths[DECODER]),
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__},
    }


def export(run: Run, name: str, stage: Path, metrics: dict, pieces: list[EventPiece], *,
           prefill: int = 64, atol: float = ATOL) -> ParityReport:
    """Export ``run`` into ``stage`` as ``name``, check parity on ``pieces``, record it in the card."""
    paths, cache = export_graphs(run.model, stage, name)
    card = make_card(run, name, paths, cache, metrics)
    card_path = stage / f"{name}.json"
    write_card(card_path, card)
    report = check_parity(run.model, OnnxEventModel(paths[DECODER]), pieces, prefill=prefill, atol=atol)
    write_card(card_path, {**card, "parity": report.to_dict()})
    return report


def install(stage: Path, name: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    card = json.loads((stage / f"{name}.json").read_text(encoding="utf-8"))
    moved = []
    for file_name in [g["file"] for g in card["graphs"].values()] + [f"{name}.json"]:
        shutil.move(str(stage / file_name), out / file_name)
        moved.append(out / file_name)
    return moved


def evaluate_run(run: Run) -> None:
    """Re-measure the run's valid and test NLL on the committed splits (they may have changed since training)."""
    from models.train_continue import evaluate

    encoding = Encoding.from_dict(run.encoding)
    run.valid = evaluate(run.model, load_pieces("valid", encoding), encoding)
    run.test = evaluate(run.model, load_pieces("test", encoding), encoding)


def run_metrics(run: Run) -> dict:
    """NLL figures of the run (bits per event and per field) for the card."""
    out = {}
    for split, report in (("valid", run.valid), ("test", run.test)):
        if report:
            out[f"{split}_nll_bits_per_event"] = report["bits_per_event"]
            out[f"{split}_nll_bits_per_field"] = report["bits_per_field"]
            out[f"{split}_nll_bits_per_event_by_source"] = {s: r["bits_per_event"]
                                                            for s, r in report.get("by_source", {}).items()}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="training run directory (checkpoint.pt, encoding.json, ...)")
    p.add_argument("--name", default="continue-transformer", help="model name")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the graphs and NAME.json")
    p.add_argument("--pieces", type=int, default=3, help="test pieces checked for parity")
    p.add_argument("--prefill", type=int, default=64, help="events fed at once before stepping")
    p.add_argument("--atol", type=float, default=ATOL)
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="re-measure valid/test NLL on the committed splits for the card (else: the run's figures)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stage = Path(tempfile.mkdtemp(prefix=f"export-{args.name}-"))
    try:
        run = load_run(args.run_dir)
        if args.evaluate:
            evaluate_run(run)
        old = previous_card(args.out / f"{args.name}.json")
        metrics = {**old.get("metrics", {}), **run_metrics(run)}
        window = run.model.hparams["window"]
        pieces = parity_pieces(load_pieces("test"), args.pieces, window)
        report = export(run, args.name, stage, metrics, pieces, prefill=args.prefill, atol=args.atol)
    except CoplayerError as exc:
        shutil.rmtree(stage)
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(report)
    if not report.ok:
        print(f"parity failed: {args.out} left unchanged; the failed export is in {stage}", file=sys.stderr)
        return 1
    paths = install(stage, args.name, args.out)
    stage.rmdir()
    sizes = ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in paths)
    print(f"wrote {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
