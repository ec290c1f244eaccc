"""The runtime of an exported instrumentation model: one ONNX step per note.

An exported model is two files side by side: ``<name>.onnx``, the graph of
one step (one note in, logits over the parts out, plus the model's state),
and ``<name>.json``, its model card (``python -m export.instrument`` writes
both).  :class:`OnnxModel` checks that the two belong together and to this
coplayer before it runs anything, and refuses with a one-line
:class:`~coplayer.errors.ModelError` otherwise.

The step graph's interface, for any state (LSTM h/c, a transformer's KV
cache)::

    inputs:  pitch [1] int64, feats [1, F] float32, <s> for each state s
    outputs: logits [1, K] float32, <s>_out for each state s

:func:`node_names` spells these names; export and runtime both use it.
This module needs numpy and onnxruntime only, never torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from coplayer.errors import ModelError, one_line
from coplayer.instrument.features import FEATURIZER_VERSION, Featurizer, FeatureSpec

PITCH, FEATS, LOGITS = "pitch", "feats", "logits"
TASK = "instrument"
CARD_KEYS = ("name", "task", "kind", "parts", "features", "feature_names", "inputs", "outputs",
             "state", "sha256", "onnxruntime_min")
# onnxruntime raises these (they derive from Exception only) on a bad graph.
_ORT_ERRORS = tuple(getattr(_ort_state, n) for n in (
    "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile",
    "NotImplemented", "RuntimeException"))


def node_names(state_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The step graph's input and output names, in order (the one place they are spelled)."""
    return [PITCH, FEATS, *state_names], [LOGITS, *(f"{s}_out" for s in state_names)]


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def log_softmax(logits: np.ndarray | Sequence[float]) -> list[float]:
    """In plain Python on a few logits: the decision runs it before every
    note can leave, and numpy's per-call cost would be most of its time."""
    x = logits.tolist() if isinstance(logits, np.ndarray) else [float(v) for v in logits]
    top = max(x)
    x = [v - top for v in x]
    total = 0.0
    for v in x:
        total += math.exp(v)
    lse = math.log(total)
    return [v - lse for v in x]


# -- finding and checking a model ----------------------------------------------


def shipped_models() -> list[str]:
    """Names of the models shipped in ``coplayer/assets`` (an .onnx with its .json card beside it)."""
    assets = resources.files("coplayer").joinpath("assets")
    if not assets.is_dir():
        return []
    return sorted(p.name[:-5] for p in assets.iterdir()
                  if p.name.endswith(".onnx") and assets.joinpath(p.name[:-5] + ".json").is_file())


def resolve_model(path_or_name: str | os.PathLike) -> Path:
    """A shipped model's name ('instrument-lstm') or a path to an .onnx file."""
    text = os.fspath(path_or_name)
    if isinstance(path_or_name, os.PathLike) or text.endswith(".onnx") or "/" in text or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return path
    asset = resources.files("coplayer").joinpath("assets", f"{text}.onnx")
    if not asset.is_file():
        shipped = ", ".join(shipped_models()) or "none"
        raise ModelError(f"no shipped model named {text!r} (shipped: {shipped}); "
                         "give a path to an .onnx file instead")
    return Path(str(asset))


def read_card(model_path: Path, task: str = TASK, keys: Sequence[str] = CARD_KEYS,
              exporter: str = "export.instrument") -> dict:
    """The model card beside ``model_path`` (same name, .json), checked to be a ``task`` model with ``keys``."""
    path = model_path.with_suffix(".json")
    if not path.is_file():
        raise ModelError(f"model {model_path} has no model card {path.name} beside it; "
                         f"export writes both: python -m {exporter} RUN_DIR")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {path} is unreadable: {exc}") from exc
    missing = [k for k in keys if k not in card] if isinstance(card, dict) else list(keys)
    if missing:
        raise ModelError(f"model card {path} lacks {', '.join(missing)}; re-export the model")
    if card["task"] != task:
        article = "an" if task[:1] in "aeiou" else "a"
        raise ModelError(f"model {card['name']} is a {card['task']!r} model, not {article} {task!r} model")
    return card


@contextmanager
def card_entries(model_path: Path) -> Iterator[None]:
    """Inside it, an entry of the card beside ``model_path`` that is missing or of
    the wrong type (a KeyError, TypeError, ...) becomes one ModelError naming the card."""
    try:
        yield
    except ModelError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ModelError(f"model card {model_path.with_suffix('.json')} is malformed ({one_line(exc)}); "
                         "re-export the model") from exc


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sha(model_path: Path, card: dict, expected: str | None = None) -> None:
    """``model_path`` hashes to ``expected`` (default: the card's ``sha256``)."""
    found, expected = file_sha256(model_path), expected or card["sha256"]
    if found != expected:
        raise ModelError(f"{model_path} does not match its model card (sha256 {found[:12]}..., card says "
                         f"{expected[:12]}...): the file was changed or the card belongs to "
                         "another export; re-export the model")


def spec_from_card(card: dict) -> FeatureSpec:
    """The card's feature spec, checked to reproduce the card's feature names."""
    name = card.get("name", "the model")
    if not isinstance(card["features"], dict):  # a damaged card (card_entries names it), not a featurizer
        raise TypeError(f"its features are {card['features']!r}, not a mapping")
    try:
        spec = FeatureSpec(**card["features"])
    except TypeError as exc:
        raise ModelError(f"model {name}: its card's feature spec {card['features']} is not one this "
                         f"coplayer knows ({exc}); the model was trained with another featurizer") from exc
    if spec.version != FEATURIZER_VERSION:
        raise ModelError(f"model {name} was trained with featurizer version {spec.version}, this coplayer "
                         f"computes version {FEATURIZER_VERSION}; retrain or use a matching coplayer")
    if spec.n_parts != len(card["parts"]):
        raise ModelError(f"model {name}: its card has {len(card['parts'])} parts but features for "
                         f"{spec.n_parts}; re-export the model")
    _check_feature_names(name, Featurizer(spec).feature_names(), list(card["feature_names"]))
    return spec


def _check_feature_names(model: str, ours: list[str], theirs: list[str]) -> None:
    if ours == theirs:
        return
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    mine = ours[i] if i < len(ours) else "(end)"
    card = theirs[i] if i < len(theirs) else "(end)"
    raise ModelError(f"model {model} was trained with another featurizer: its card lists {len(theirs)} "
                     f"features, this coplayer computes {len(ours)} (feature #{i}: card {card!r}, "
                     f"here {mine!r}); retrain or re-export the model with this coplayer")


def check_parts(card_parts: Sequence[str], config_part_names: Sequence[str], *,
                model: str = "the model", source: str = "config.yaml") -> None:
    """Refuse a configured part list that differs from the parts the model plays."""
    ours, theirs = list(config_part_names), list(card_parts)
    if ours == theirs:
        return
    hint = ("the same parts in another order" if sorted(ours) == sorted(theirs)
            else "other parts")
    raise ModelError(f"model {model} plays parts {', '.join(theirs)}; {source} has "
                     f"{', '.join(ours) or 'none'} ({hint}): list exactly the model's parts, in its order, "
                     "or choose another instrument.model")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def open_session(path: Path, card: dict, threads: int = 1, *, flush_denormals: bool = False,
                 arena: bool = True) -> ort.InferenceSession:
    """A CPU session: ``threads`` intra-op threads, one inter-op, sequential.

    ``flush_denormals`` treats denormal floats as zero: a softmax over masked
    or far-away keys produces them, and they make it up to 10x slower.
    ``arena=False`` allocates each run's tensors from the system rather than
    from onnxruntime's memory arena, which grows to the largest shape seen and
    keeps it: for inputs of many lengths (a continuation model fed 1 to 256
    events at a time) the arena held 12 MB more, in jumps as new lengths came
    (measured: no slower).
    """
    need, have = card["onnxruntime_min"], ort.__version__
    if _version(have) < _version(need):
        raise ModelError(f"model {card['name']} needs onnxruntime >= {need}, this is {have}: "
                         "pip install -U onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: warnings would print at every load
    if flush_denormals:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.enable_cpu_mem_arena = arena
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as exc:
        raise ModelError(f"model {path} is not a valid ONNX graph: {str(exc).splitlines()[0]}") from exc


def check_graph(session: ort.InferenceSession, card: dict) -> None:
    """The graph's node names (and fixed sizes) are the ones the card announces."""
    inputs, outputs = node_names([s["name"] for s in card["state"]])
    found_in = [i.name for i in session.get_inputs()]
    found_out = [o.name for o in session.get_outputs()]
    if (found_in, found_out) != (inputs, outputs) or (card["inputs"], card["outputs"]) != (inputs, outputs):
        raise ModelError(f"model {card['name']}: graph has inputs {found_in} and outputs {found_out}, "
                         f"expected {inputs} and {outputs} (card: {card['inputs']}, {card['outputs']}); "
                         "re-export the model")
    sizes = {FEATS: len(card["feature_names"]), LOGITS: len(card["parts"])}
    for node in (*session.get_inputs(), *session.get_outputs()):
        last = node.shape[-1] if node.shape else None
        if node.name in sizes and isinstance(last, int) and last != sizes[node.name]:
            raise ModelError(f"model {card['name']}: graph {node.name} has shape {node.shape}, "
                             f"the card implies last size {sizes[node.name]}; re-export the model")


# -- running it ---------------------------------------------------------------------


class OnnxModel:
    """An exported instrumentation model, checked against its card, one note per step."""

    def __init__(self, path_or_name: str | os.PathLike, *, threads: int = 1):
        self.path = resolve_model(path_or_name)
        self.card = read_card(self.path)
        with card_entries(self.path):
            self.name = self.card["name"]
            check_sha(self.path, self.card)
            self.spec = spec_from_card(self.card)
            self.parts = tuple(self.card["parts"])
            self._session = open_session(self.path, self.card, threads)
            check_graph(self._session, self.card)
            self._states = [(s["name"], tuple(s["shape"]), np.dtype(s.get("dtype", "float32")))
                            for s in self.card["state"]]
            _, self._outputs = node_names([name for name, _, _ in self._states])
            # Pre-allocated inputs, rewritten in place at every step.
            self._pitch = np.zeros(1, dtype=np.int64)
            self._feats = np.zeros((1, len(self.card["feature_names"])), dtype=np.float32)
        self._feed: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the notes seen so far (the state goes back to zeros)."""
        self._feed = {PITCH: self._pitch, FEATS: self._feats}
        for name, shape, dtype in self._states:
            self._feed[name] = np.zeros(shape, dtype=dtype)

    def logits(self, pitch: int, feats: Sequence[float]) -> np.ndarray:
        """One note: the logits over ``parts`` (float32 [K]); advances the state.
        ``feats``: the feature vector, an array or a list (Featurizer.values)."""
        self._pitch[0] = pitch
        self._feats[0] = feats
        logits, *state = self._session.run(self._outputs, self._feed)
        for (name, _, _), value in zip(self._states, state):
            self._feed[name] = value
        return logits[0]

    def step(self, pitch: int, feats: np.ndarray) -> np.ndarray:
        """One note: probabilities over ``parts`` (float64 [K]); advances the state."""
        return softmax(self.logits(pitch, feats))

    def peek(self, pitch: int, feats: Sequence[float]) -> np.ndarray:
        """The logits of :meth:`logits` without advancing the state."""
        self._pitch[0] = pitch
        self._feats[0] = feats
        return self._session.run(self._outputs, self._feed)[0][0]


class OnnxScorer:
    """An :class:`OnnxModel` as the :class:`~coplayer.instrument.instrumenter.Scorer` of an Instrumenter."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.parts = model.parts
        self.spec = model.spec

    def reset(self) -> None:
        self.model.reset()

    def log_probs(self, pitch: int, feats: Sequence[float], featurizer: Featurizer) -> list[float]:
        return log_softmax(self.model.logits(pitch, feats))

    def warm(self, pitch: int, feats: Sequence[float]) -> None:
        """A step whose result and state are thrown away (see Instrumenter.warm)."""
        self.model.peek(pitch, feats)
