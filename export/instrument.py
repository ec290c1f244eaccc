"""Export a trained instrumentation model to a one-step ONNX graph and its model card.

    python -m export.instrument RUN_DIR --name instrument-lstm [--out coplayer/assets]

RUN_DIR is a training run (``checkpoint.pt``, ``train-args.json``,
``encoding.json``).  The export is written to a staging directory, checked
for parity against PyTorch on real test pieces (:mod:`export.parity`), and
only then moved to ``<out>/<name>.onnx`` and ``<out>/<name>.json``; on a
parity failure nothing in ``--out`` changes and the exit status is 1.

The graph is the model's ``step`` for one note, with its state as inputs
and outputs (names from :func:`coplayer.instrument.runner.node_names`).
Any model of :mod:`models.instrument` works if it has ``kind``,
``state_names``, ``initial_state(batch)`` (zeros) and
``step(pitch, feats, *state) -> (logits, *state)``; a state axis that grows
from note to note (a KV cache) becomes a dynamic axis of the graph.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime
import torch
from torch import nn
from torch.export import Dim

import coplayer
import models.instrument
from coplayer.data.notes import Score
from coplayer.data.splits import load_split
from coplayer.errors import CoplayerError, ModelError
from coplayer.instrument.runner import FEATS, PITCH, TASK, OnnxModel, node_names, spec_from_card
from export.lstm_graph import lstm_step_graph
from export.parity import ATOL, ParityReport, check_parity

OPSET = 18
DEFAULT_OUT = Path(coplayer.__file__).parent / "assets"
# The first onnxruntime release that reads a given ONNX IR version / opset.
ORT_FOR_IR = {9: "1.15", 10: "1.18"}
ORT_FOR_OPSET = {17: "1.12", 18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18"}


@dataclass
class Run:
    """A training run, loaded: the model in eval mode and what travels with it."""

    path: Path
    model: nn.Module
    encoding: dict
    train_args: dict
    epoch: int
    valid: dict


class StepGraph(nn.Module):
    """``model.step`` as a module: the function the ONNX graph computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pitch, feats, *state):
        return self.model.step(pitch, feats, *state)


def model_class(kind: str) -> type:
    """The class of :mod:`models.instrument` whose ``kind`` is ``kind``."""
    classes = {c.kind: c for c in vars(models.instrument).values()
               if isinstance(c, type) and issubclass(c, nn.Module) and "kind" in c.__dict__}
    if kind not in classes:
        known = ", ".join(sorted(classes))
        raise ModelError(f"checkpoint is a {kind!r} model; models.instrument has {known}")
    return classes[kind]


def read_json(path: Path) -> dict:
    """A JSON file of a run or an export; ModelError if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"run file {path} is unreadable: {exc}") from exc


def load_checkpoint(run_dir: Path) -> dict:
    """``run_dir/checkpoint.pt`` (tensors only, on the CPU); ModelError if it cannot be loaded."""
    try:
        return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"cannot load {run_dir / 'checkpoint.pt'}: {exc}") from exc


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    ckpt = load_checkpoint(path)
    model = model_class(ckpt["kind"])(**ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    if not getattr(model, "state_names", None):
        raise ModelError(f"{type(model).__name__} has no state_names: cannot name its ONNX state")
    return Run(path, model.eval(), read_json(path / "encoding.json"), read_json(path / "train-args.json"),
               int(ckpt["epoch"]), dict(ckpt.get("valid", {})))


# -- the graph --------------------------------------------------------------------


@torch.no_grad()
def example_inputs(model: nn.Module, n_features: int) -> tuple[tuple, tuple]:
    """Inputs to trace ``step`` with, and the initial state (checked to be zeros).

    The example state is the state after two notes, so an axis that grows
    with the notes (a KV cache) has a size other than 0 or 1 when traced.
    """
    initial = tuple(model.initial_state(1))
    if any(bool(s.any()) for s in initial):
        raise ModelError(f"{type(model).__name__}.initial_state is not all zeros; "
                         "the runtime resets the state to zeros")
    pitch, feats = torch.tensor([60]), torch.zeros(1, n_features)
    state = initial
    for _ in range(2):
        _, *state = model.step(pitch, feats, *state)
    return (pitch, feats, *state), initial


def dynamic_shapes(initial: tuple, traced: tuple) -> tuple | None:
    """Dynamic axes of the state: those whose size changes from note to note."""
    specs = tuple({axis: Dim.DYNAMIC for axis, (a, b) in enumerate(zip(s0.shape, s.shape)) if a != b}
                  for s0, s in zip(initial, traced))
    return ({}, {}, specs) if any(specs) else None


def export_graph(model: nn.Module, n_features: int, path: Path) -> list[dict]:
    """Write the one-step graph to ``path``; returns the card's state entries.

    An LSTM gets the lean graph of :mod:`export.lstm_graph` (a step costs
    about a third less); any other model goes through the dynamo exporter.
    """
    args, initial = example_inputs(model, n_features)
    inputs, outputs = node_names(model.state_names)
    if model.kind == "lstm":
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        onnx.save(lstm_step_graph(state, model.hparams, (inputs, outputs)), str(path))
    else:
        _dynamo_export(model, args, initial, inputs, outputs, path)
    return [{"name": n, "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}
            for n, s in zip(model.state_names, initial)]


def _dynamo_export(model: nn.Module, args: tuple, initial: tuple, inputs: list[str], outputs: list[str],
                   path: Path) -> None:
    with warnings.catch_warnings():
        # nn.LSTM re-assigns its flat weights while traced; harmless, and parity checks the result.
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        torch.onnx.export(StepGraph(model).eval(), args, str(path), input_names=inputs, output_names=outputs,
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=dynamic_shapes(initial, args[2:]))
    strip_debug_info(path)


def strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node metadata (stack traces, source paths, FX names).

    It is debugging aid only, and it holds file paths and line numbers, which
    would make the bytes (and the card's sha256) change with every edit of
    the source though the graph is the same.
    """
    proto = onnx.load(str(path))
    graph = proto.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info):
        item.ClearField("metadata_props")
    graph.ClearField("metadata_props")
    onnx.save(proto, str(path))


def graph_opset(proto: onnx.ModelProto) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def onnxruntime_min(path: Path) -> str:
    """The oldest onnxruntime that reads this graph (the installed one if unsure)."""
    proto = onnx.load(str(path), load_external_data=False)
    opset = graph_opset(proto)
    needs = [ORT_FOR_IR.get(proto.ir_version), ORT_FOR_OPSET.get(opset)]
    if None in needs:
        return onnxruntime.__version__.split("+")[0]
    return max(needs, key=lambda v: tuple(int(p) for p in v.split(".")))


# -- the card ---------------------------------------------------------------------


def make_card(run: Run, name: str, onnx_path: Path, state: list[dict], metrics: dict) -> dict:
    enc = run.encoding
    inputs, outputs = node_names([s["name"] for s in state])
    data = onnx_path.read_bytes()
    return {
        "name": name,
        "task": TASK,
        "kind": run.model.kind,
        "parts": list(enc["parts"]),
        "features": enc["features"],
        "feature_names": list(enc["feature_names"]),
        "n_features": len(enc["feature_names"]),
        "inputs": inputs,
        "outputs": outputs,
        "input_shapes": {PITCH: [1], FEATS: [1, len(enc["feature_names"])]},
        "state": state,
        "hparams": run.model.hparams,
        "training": {"run": run.path.name, "args": run.train_args, "data": enc.get("data", {}),
                     "epoch": run.epoch, "valid": run.valid},
        "metrics": metrics,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "opset": graph_opset(onnx.load(str(onnx_path), load_external_data=False)),
        "onnxruntime_min": onnxruntime_min(onnx_path),
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__},
    }


def write_card(path: Path, card: dict) -> None:
    path.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")


def previous_card(card_path: Path) -> dict:
    """The card an earlier export left at ``card_path`` ({} if none): its metrics are kept."""
    return read_json(card_path) if card_path.is_file() else {}


# -- the command ------------------------------------------------------------------


def export(run: Run, name: str, stage: Path, metrics: dict, pieces: list[Score], *, seed: int = 0,
           atol: float = ATOL) -> ParityReport:
    """Export ``run`` into ``stage`` as ``name``, check parity on ``pieces``, record it in the card."""
    spec_from_card({"name": name, **run.encoding})  # the run's featurizer is this coplayer's
    onnx_path, card_path = stage / f"{name}.onnx", stage / f"{name}.json"
    state = export_graph(run.model, len(run.encoding["feature_names"]), onnx_path)
    card = make_card(run, name, onnx_path, state, metrics)
    write_card(card_path, card)
    report = check_parity(run.model, OnnxModel(onnx_path), pieces, seed=seed, atol=atol)
    write_card(card_path, {**card, "parity": report.to_dict()})
    return report


def install(stage: Path, name: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    moved = []
    for suffix in (".onnx", ".json"):
        target = out / f"{name}{suffix}"
        shutil.move(str(stage / f"{name}{suffix}"), target)
        moved.append(target)
    return moved


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="training run directory (checkpoint.pt, encoding.json, ...)")
    p.add_argument("--name", required=True, help="model name, e.g. instrument-lstm")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write NAME.onnx and NAME.json")
    p.add_argument("--pieces", type=int, default=3, help="test pieces streamed in the parity check")
    p.add_argument("--seed", type=int, default=0, help="seed of the parity performances")
    p.add_argument("--atol", type=float, default=ATOL)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stage = Path(tempfile.mkdtemp(prefix=f"export-{args.name}-"))
    try:
        run = load_run(args.run_dir)
        old = previous_card(args.out / f"{args.name}.json")
        metrics = dict(old.get("metrics", {}))
        pieces = load_split("test")[:args.pieces]
        report = export(run, args.name, stage, metrics, pieces, seed=args.seed, atol=args.atol)
    except CoplayerError as exc:
        shutil.rmtree(stage)
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(report)
    if not report.ok:
        print(f"parity failed: {args.out} left unchanged; the failed export is in {stage}", file=sys.stderr)
        return 1
    new_sha = read_json(stage / f"{args.name}.json")["sha256"]
    paths = install(stage, args.name, args.out)
    stage.rmdir()
    print("wrote " + ", ".join(str(p) for p in paths))
    if metrics and old.get("sha256") != new_sha:
        print(f"kept the previous card's metrics ({', '.join(metrics)}), measured on another .onnx: "
              "re-run the evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
