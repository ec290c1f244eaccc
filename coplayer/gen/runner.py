"""The runtime of an exported continuation model: an :class:`~coplayer.gen.model.EventModel` on onnxruntime.

An exported continuation model is a model card and the graphs it lists, side
by side (``python -m export.continuation`` writes them all)::

    <name>.onnx          the decoder: T new events + KV cache -> last hidden state + their keys/values
    <name>-prefill.onnx  the same for the first events of a context (no cache yet)
    <name>-<field>.onnx  one head per field: hidden [+ the fields chosen before it] -> logits
    <name>.json          the card: encoding, graphs with their sha256, cache shape, metrics

The decoder's interface (T = 1 is a step, T up to ``window`` a chunk of a long feed), L layers::

    inputs:  events [1,T,5] int64, pos [1,T] int64, rel [1,T,2] int64 (PitchContext), age [R] float32,
             k_cache_0..L-1 [H,Dh,R], v_cache_0..L-1 [H,R,Dh] float32
    outputs: hidden [1,D] float32, k_new_0..L-1 [H,Dh,T], v_new_0..L-1 [H,T,Dh]

The prefill graph takes only ``events``, ``pos`` and ``rel`` (T up to ``window``) and
has the same outputs: it skips the attention to an empty cache, which is
most of what a cold start would waste.

and head k's: ``hidden`` [1,D] (+ ``fields`` [1,k] int64 for k > 0, + ``anchor`` [1] int64
for the pitch head: the chosen part's anchor pitch, -1 if none) -> ``logits`` [1,C].
The cache is a ring of R = ``window - 1`` slots per layer (:class:`RingCache`)
that the graph only reads; the runtime writes the new keys/values into it in
place, so a step never copies the cache, and a context of any length costs
the same per note: the oldest events slide out, the past is never re-run.

A context starts with a BOS event (shift class ``sizes['shift']``), fed
on the first :meth:`OnnxEventModel.feed` after a reset.  This module needs
numpy and onnxruntime only, never torch.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from coplayer.errors import ModelError
from coplayer.gen.encoding import ENCODING_VERSION, FIELDS, Encoding
from coplayer.instrument.runner import card_entries, check_sha, open_session, read_card, resolve_model

TASK = "continue"
CARD_KEYS = ("name", "task", "kind", "encoding", "graphs", "cache", "window", "sha256", "onnxruntime_min")
EVENTS, POS, REL, AGE, HIDDEN, FIELDS_IN, ANCHOR, LOGITS = (
    "events", "pos", "rel", "age", "hidden", "fields", "anchor", "logits")
DECODER, PREFILL = "decoder", "prefill"


def decoder_names(layers: int) -> tuple[list[str], list[str]]:
    """The decoder graph's input and output names, in order (the one place they are spelled)."""
    layer = range(layers)
    return ([EVENTS, POS, REL, AGE, *(f"k_cache_{i}" for i in layer), *(f"v_cache_{i}" for i in layer)],
            [HIDDEN, *(f"k_new_{i}" for i in layer), *(f"v_new_{i}" for i in layer)])


def prefill_names(layers: int) -> tuple[list[str], list[str]]:
    """The prefill graph's input and output names: the decoder's without the cache."""
    _, outputs = decoder_names(layers)
    return [EVENTS, POS, REL], outputs


def head_names(k: int) -> tuple[list[str], list[str]]:
    """Head k's input and output names: the hidden state, the k fields chosen before it, the anchor (pitch)."""
    inputs = [HIDDEN, FIELDS_IN] if k else [HIDDEN]
    return (inputs + [ANCHOR] if FIELDS[k] == "pitch" else inputs), [LOGITS]


def graph_file(name: str, role: str) -> str:
    """File name of one graph of model ``name``: the decoder is ``<name>.onnx``."""
    return f"{name}.onnx" if role == DECODER else f"{name}-{role}.onnx"


def encoding_from_card(card: dict) -> Encoding:
    name = card["name"]
    enc = card["encoding"]
    if not isinstance(enc, dict) or enc.get("version") != ENCODING_VERSION:
        found = enc.get("version") if isinstance(enc, dict) else enc
        raise ModelError(f"model {name} uses event encoding version {found}, this coplayer reads version "
                         f"{ENCODING_VERSION}; retrain or use a matching coplayer")
    encoding = Encoding.from_dict(enc)
    if list(enc.get("fields", FIELDS)) != list(FIELDS) or dict(enc.get("sizes", encoding.sizes)) != encoding.sizes:
        raise ModelError(f"model {name}: its encoding has fields {enc.get('fields')} of sizes {enc.get('sizes')}, "
                         f"this coplayer decodes {list(FIELDS)} of sizes {encoding.sizes}; re-export the model")
    return encoding


MAX_INTERVAL = 24  # semitones of the relative-pitch classes; the class 2*MAX_INTERVAL+1 = none
NO_INTERVAL = 2 * MAX_INTERVAL + 1
INTERVAL_CLASSES = NO_INTERVAL + 1


class PitchContext:
    """What the model knows about pitch relations: each part's last pitch and the last event's.

    For every event it gives the model's relative-pitch inputs (:meth:`features`):
    the interval from the event's *anchor* (the last pitch of its part, or of
    the last event if the part has not played yet) and the interval from the
    last event, each clipped to +-``MAX_INTERVAL`` (``NO_INTERVAL`` if there
    is none); and the pitch head scores the next pitch relative to the anchor
    of the part chosen for it (:meth:`anchor`).  Training and the runtime use
    this one class, so both compute the same inputs.
    """

    def __init__(self, n_parts: int):
        self.last = [-1] * n_parts
        self.prev = -1

    def anchor(self, part: int) -> int:
        """The pitch a note of ``part`` is heard against (-1: none yet)."""
        last = self.last[part]
        return last if last >= 0 else self.prev

    def features(self, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Advance over events [N,5]: their relative-pitch inputs [N,2] and their anchors [N]."""
        rel = np.empty((len(events), 2), dtype=np.int64)
        anchors = np.empty(len(events), dtype=np.int64)
        for i, (part, pitch) in enumerate(np.asarray(events)[:, 1:3].tolist()):
            anchor = self.anchor(part)
            anchors[i] = anchor
            rel[i, 0] = _interval(pitch, anchor)
            rel[i, 1] = _interval(pitch, self.prev)
            self.last[part] = pitch
            self.prev = pitch
        return rel, anchors

    def copy(self) -> "PitchContext":
        other = PitchContext(len(self.last))
        other.last, other.prev = list(self.last), self.prev
        return other


def _interval(pitch: int, anchor: int) -> int:
    if anchor < 0:
        return NO_INTERVAL
    return min(MAX_INTERVAL, max(-MAX_INTERVAL, pitch - anchor)) + MAX_INTERVAL


class RingCache:
    """The decoder's KV cache: per layer a ring of ``window - 1`` slots, written in place.

    Keys are stored transposed ([H,Dh,R]), values as [H,R,Dh]; ``age``
    [R] counts the events between each slot's event and the last one fed (0 =
    the last, ``window`` = empty or out of the window).
    """

    def __init__(self, layers: int, heads: int, head_dim: int, window: int):
        self.window, self.slots = window, window - 1
        self.k = [np.zeros((heads, head_dim, self.slots), dtype=np.float32) for _ in range(layers)]
        self.v = [np.zeros((heads, self.slots, head_dim), dtype=np.float32) for _ in range(layers)]
        self.age = np.full(self.slots, float(window), dtype=np.float32)
        self.next = 0  # the slot the next event goes to
        self.events = 0  # events written since the cache was empty

    def inputs(self) -> dict[str, np.ndarray]:
        names, _ = decoder_names(len(self.k))
        return dict(zip(names[3:], [self.age, *self.k, *self.v]))

    def write(self, k_new: list[np.ndarray], v_new: list[np.ndarray]) -> None:
        """Append the keys [H,Dh,T] and values [H,T,Dh] of T new events (the oldest slide out)."""
        t = k_new[0].shape[-1]
        n = min(t, self.slots)
        slots = (self.next + np.arange(n)) % self.slots
        for ring, new in zip(self.k, k_new):
            ring[..., slots] = new[..., t - n:]
        for ring, new in zip(self.v, v_new):
            ring[:, slots, :] = new[:, t - n:, :]
        self.events += t
        self.age += t
        self.age[slots] = np.arange(n - 1, -1, -1, dtype=np.float32)
        np.minimum(self.age, self.window, out=self.age)
        self.next = (self.next + n) % self.slots

    def copy(self) -> "RingCache":
        other = copy.copy(self)
        other.k, other.v, other.age = [a.copy() for a in self.k], [a.copy() for a in self.v], self.age.copy()
        return other


class OnnxEventModel:
    """An exported continuation model, checked against its card, as an ``EventModel``."""

    def __init__(self, path_or_name: str | os.PathLike, *, threads: int = 1):
        self._threads = threads
        self.path = resolve_model(path_or_name)
        self.card = read_card(self.path, task=TASK, keys=CARD_KEYS, exporter="export.continuation")
        with card_entries(self.path):
            self._load()
        self._bos = np.zeros((1, len(FIELDS)), dtype=np.int64)
        self._bos[0, 0] = self.bos_shift
        self._fields = [np.zeros((1, max(k, 1)), dtype=np.int64) for k in range(len(FIELDS))]
        self._anchor = np.zeros(1, dtype=np.int64)
        self._pitch_field = FIELDS.index("pitch")
        self.reset()

    def _load(self) -> None:
        """The card's encoding, cache and graphs, each checked."""
        self.name = self.card["name"]
        self.encoding = encoding_from_card(self.card)
        enc = self.card["encoding"]
        self.window = int(self.card["window"])
        self.pos_classes = int(enc.get("pos_classes", self.encoding.ticks_per_bar))
        self.bos_shift = int(enc.get("bos_shift", self.encoding.sizes["shift"]))
        self._sizes = np.array([self.encoding.sizes[f] for f in FIELDS], dtype=np.int64)
        graphs = self.card["graphs"]
        if not isinstance(graphs, dict) or set(graphs) != {DECODER, PREFILL, *FIELDS}:
            raise ModelError(f"model {self.name}: its card lists graphs {sorted(graphs)}, expected "
                             f"{DECODER}, {PREFILL} and one head per field ({', '.join(FIELDS)}); "
                             "re-export the model")
        if graphs[DECODER].get("sha256") != self.card["sha256"] or graphs[DECODER].get("file") != self.path.name:
            raise ModelError(f"model {self.name}: its card's decoder is {graphs[DECODER].get('file')}, not "
                             f"{self.path.name}; re-export the model")
        check_sha(self.path, self.card)
        cache = self.card["cache"]
        try:
            self._cache_shape = (int(cache["layers"]), int(cache["heads"]), int(cache["head_dim"]))
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"model {self.name}: its card's cache {cache} lacks layers, heads or head_dim; "
                             "re-export the model") from None
        self._decoder = self._open(DECODER, self.path, *decoder_names(self._cache_shape[0]))
        self._prefill = self._open(PREFILL, self._graph_path(PREFILL), *prefill_names(self._cache_shape[0]))
        self._heads = [self._open(field, self._graph_path(field), *head_names(k), classes=int(self._sizes[k]))
                       for k, field in enumerate(FIELDS)]

    def _graph_path(self, role: str) -> Path:
        """A graph the card lists beside the decoder, checked against its sha256."""
        graph = self.card["graphs"][role]
        path = self.path.with_name(str(graph.get("file")))
        if not path.is_file():
            raise ModelError(f"model {self.name}: {role} graph {path.name} (listed in its card) is missing "
                             f"beside {self.path.name}; copy all the files the card lists")
        check_sha(path, self.card, graph.get("sha256", ""))
        return path

    def _open(self, role: str, path, inputs: list[str], outputs: list[str], classes: int | None = None):
        session = open_session(path, self.card, self._threads, flush_denormals=True, arena=False)
        found_in = [i.name for i in session.get_inputs()]
        found_out = [o.name for o in session.get_outputs()]
        if (found_in, found_out) != (inputs, outputs):
            raise ModelError(f"model {self.name}: graph {path.name} ({role}) has inputs {found_in} and outputs "
                             f"{found_out}, expected {inputs} and {outputs}; re-export the model")
        last = session.get_outputs()[0].shape[-1]
        if classes is not None and isinstance(last, int) and last != classes:
            raise ModelError(f"model {self.name}: head {role} scores {last} classes, the encoding has "
                             f"{classes}; re-export the model")
        return session

    # -- EventModel ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget all context (the next feed starts with BOS)."""
        self._cache = RingCache(*self._cache_shape, self.window)
        self._pitches = PitchContext(len(self.encoding.parts))
        self._hidden: np.ndarray | None = None
        self._started = False
        self.n_fed = 0

    def feed(self, events: np.ndarray, pos: np.ndarray) -> None:
        """Append known events [N,5] (+ positions in bar [N]) to the context, ``window`` events per run."""
        events = np.asarray(events, dtype=np.int64).reshape(-1, len(FIELDS))
        pos = np.minimum(np.asarray(pos, dtype=np.int64).reshape(-1), self.pos_classes - 1)
        if len(pos) != len(events):
            raise ValueError(f"feed: {len(events)} events but {len(pos)} positions")
        if len(events) and (events.min() < 0 or (events >= self._sizes).any() or pos.min() < 0):
            bad = np.argwhere((events < 0) | (events >= self._sizes))
            what = (f"field {FIELDS[bad[0][1]]} = {events[tuple(bad[0])]} (classes 0..{self._sizes[bad[0][1]] - 1})"
                    if len(bad) else f"pos = {pos.min()}")
            raise ValueError(f"feed: event {bad[0][0] if len(bad) else int(np.argmin(pos))} has {what}")
        rel, _ = self._pitches.features(events)
        if not self._started:
            events = np.concatenate([self._bos, events])
            pos = np.concatenate([np.zeros(1, dtype=np.int64), pos])
            rel = np.concatenate([np.full((1, 2), NO_INTERVAL, dtype=np.int64), rel])
            self._started = True
        for start in range(0, len(events), self.window):
            end = start + self.window
            self._run(events[start:end], pos[start:end], rel[start:end])
        self.n_fed += len(events)

    def _run(self, events: np.ndarray, pos: np.ndarray, rel: np.ndarray) -> None:
        feed = {EVENTS: events[None], POS: pos[None], REL: rel[None]}
        if self._cache.events:
            hidden, *new = self._decoder.run(None, {**feed, **self._cache.inputs()})
        else:  # the first events: nothing to attend to in the cache
            hidden, *new = self._prefill.run(None, feed)
        layers = self._cache_shape[0]
        self._cache.write(new[:layers], new[layers:])
        self._hidden = hidden

    def field_logits(self, field: str, partial: dict[str, int]) -> np.ndarray:
        """Float64 logits over the classes of ``field`` for the next event, given ``partial``."""
        if self._hidden is None:
            self.feed(np.zeros((0, len(FIELDS)), dtype=np.int64), np.zeros(0, dtype=np.int64))
        try:
            k = FIELDS.index(field)
        except ValueError:
            raise ValueError(f"unknown field {field!r}: fields are {', '.join(FIELDS)}") from None
        feed = {HIDDEN: self._hidden}
        if k:
            buf = self._fields[k]
            try:
                for j in range(k):
                    buf[0, j] = partial[FIELDS[j]]
            except KeyError:
                raise ValueError(f"field_logits({field!r}) needs the fields chosen before it "
                                 f"({', '.join(FIELDS[:k])}); got {sorted(partial)}") from None
            if (buf[0] < 0).any() or (buf[0] >= self._sizes[:k]).any():
                raise ValueError(f"field_logits({field!r}): partial {partial} is out of range "
                                 f"(classes {dict(zip(FIELDS[:k], self._sizes[:k].tolist()))})")
            feed[FIELDS_IN] = buf
            if k == self._pitch_field:
                self._anchor[0] = self._pitches.anchor(int(buf[0, 1]))
                feed[ANCHOR] = self._anchor
        return self._heads[k].run(None, feed)[0][0].astype(np.float64)

    def fork(self) -> "OnnxEventModel":
        """A copy of the context (the cache is copied, the sessions are shared)."""
        other = copy.copy(self)
        other._cache = self._cache.copy()
        other._pitches = self._pitches.copy()
        other._anchor = self._anchor.copy()
        other._fields = [f.copy() for f in self._fields]
        return other
