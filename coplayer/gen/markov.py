"""A variable-order Markov continuation (the Continuator, Pachet 2003): the baseline EventModel.

The model predicts each field of the next event from counts of what followed
the same context in the training pieces, backing off from long contexts to
short ones with interpolated Witten-Bell smoothing and ending in a uniform
distribution, so that every class keeps a non-zero probability (a fair NLL)::

    P_k(x) = (c_k(x) + b T_k P_{k-1}(x)) / (C_k + b T_k)

where ``c_k`` counts ``x`` after context level ``k``, ``C_k`` is their sum,
``T_k`` the number of distinct ``x`` seen there and ``b`` the escape weight.
A level never seen is skipped.

**Viewpoints.**  A context of order ``k`` is the last ``k`` events reduced to
(shift, part, melodic interval, duration), where the melodic interval is the
pitch minus the previous pitch of the same part (or, for a part's first note,
minus the previous event's pitch), so a phrase and its transposition share
their statistics.  Every field is also conditioned on the fields of the
current event already chosen (FIELDS order).  The levels, longest first:

======  =================================================================
field   levels (each below ``order`` k = K..1 adds the last k events)
======  =================================================================
shift   k + position of the last event; position; nothing
part    k + shift; shift + previous part; nothing
pitch   k + (shift, part, where the previous event's pitch stands relative
        to the part's last pitch) -> melodic interval; the same for k = 0;
        part -> melodic interval; part -> absolute pitch (counted over
        transpositions -5..+6, which gives each part its range)
dur     k + (shift, part, melodic interval); part + beat phase of the onset;
        part
vel     previous velocity + part; part; nothing
======  =================================================================

Every context also holds its **texture** (no event yet; the last 8 events
in one part, a melody; or in several parts), so that the melodies and the
chorales of the training data keep apart statistics.

**Two experts on pitch.**  Melodic intervals forget the key and the
register; so the pitch distribution is multiplied by the context's own
pitch-class histogram (recent events weigh more) raised to ``pc_cache``
(a cache model), and by the part's absolute pitch distribution raised to
``register``, then renormalised (a product of experts).

**Storage.**  Contexts are hashed to 40-bit keys: a context never seen
matches a stored one with probability about (stored contexts) / 2^40, some
1e-6.  The corpus counts are a frozen table (sorted keys, CSR rows) shipped
as ``coplayer/assets/continue-markov.npz`` (key gaps and counts in twelfths
as small integers, compressed) with the card ``continue-markov.json``
beside it; ``python -m coplayer.gen.markov`` refits them on the training
split (chorales and melodies, :func:`coplayer.gen.data.load_pieces`).
Contexts of order >= ``prune_order`` seen only once are dropped from the
shipped table (they mostly memorise one piece).

**Live learning.**  As the Continuator does, :meth:`MarkovModel.learn` adds
the counts of a phrase the player played, scaled by ``live_weight``, to a
second table consulted beside the corpus one; :meth:`MarkovModel.forget`
clears it.  With ``adapt=True`` every event fed is learned as well, after it
was predicted (online, causal): the NLL of such a model is that of a
Continuator that keeps listening.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np

from coplayer.errors import ModelError, one_line
from coplayer.gen.encoding import FIELDS, Encoding

log = logging.getLogger(__name__)

ASSET = "continue-markov"
FORMAT = "coplayer-continue-markov"
FORMAT_VERSION = 2
KEY_BITS = 40  # an absent context matches a stored one with probability ~ contexts / 2^40 (~1e-6)
TASK = "continue"

MASK = (1 << 64) - 1
_MULT = 0xBF58476D1CE4E5B9
_SEED = 0x9E3779B97F4A7C15
_SALT = 0x632BE59BD9B4E019  # mixed into every context: its texture (none yet / one part / several)
_TEXTURE_EVENTS = 8
_CLIP = 24  # melodic intervals in context viewpoints are clipped to +-2 octaves
_NONE = 2 * _CLIP + 1  # "no reference pitch" in an interval code
_F = {f: i for i, f in enumerate(FIELDS)}
TRANSPOSE = tuple(range(-5, 7))  # the absolute pitch level counts every transposition
MEMO_SIZE = 100_000  # distributions remembered per model (a few tens of MB at most)


def _mix(h: int, x: int) -> int:
    """One step of the 64-bit context hash (Python ints, non-negative)."""
    h = ((h ^ x) * _MULT) & MASK
    return h ^ (h >> 31)


def _key(h: int, field_index: int, level: int, ctx: int) -> int:
    """A context's key: the top KEY_BITS bits of its hash."""
    return _mix(_mix(h, field_index * 16 + level + 1), ctx + 1) >> (64 - KEY_BITS)


def _interval_code(pitch: int, ref: int) -> int:
    return _NONE if ref < 0 else max(-_CLIP, min(_CLIP, pitch - ref)) + _CLIP


@dataclass(frozen=True)
class MarkovSettings:
    """Hyper-parameters; saved in the model card."""

    order: int = 4  # longest context, in events
    # Witten-Bell escape weight b per field (FIELDS order); tuned on the valid split:
    # shift prefers trusting long contexts, durations and pitches backing off more.
    escape: tuple[float, ...] = (1.0, 3.0, 3.0, 5.0, 1.0)
    live_weight: float = 8.0  # weight of one learned event against one corpus event (best of 1..16)
    prune_order: int = 2  # contexts of this order or longer seen once are not shipped
    prune_count: float = 1.0
    # The register expert: pitch probabilities are also multiplied by
    # P(pitch | part) ** register (the part's range over the corpus), which keeps
    # each voice in its register when the intervals wander.  0 switches it off.
    register: float = 0.75  # best of 0..1.5 on the valid chorales (-0.03 bits/event)
    # The pitch-class cache: pitch probabilities are multiplied by
    # ((h[pc] + prior) / (sum h + 12 prior)) ** pc_cache, h the pitch classes of the
    # context with weights decaying by pc_decay per event (a product of experts
    # that keeps the key the context established).  0 switches it off.
    pc_cache: float = 0.75  # best of 0..1.5 on the valid chorales (-0.13 bits/event)
    pc_decay: float = 0.99
    pc_prior: float = 0.5
    # Every context also holds the texture of the last 8 events (one part or several),
    # so that melodies and chorales keep apart statistics.
    texture: bool = True


@dataclass
class _State:
    """The context: what the last events were.  Small and cheap to copy."""

    hashes: list[int]  # hashes[k]: the last k viewpoints (k = 0..order)
    last_pitch: list[int]  # per part, -1 = not yet
    prev_pitch: int = -1
    prev_part: int = -1
    prev_pos: int = -1
    prev_vel: int = -1
    count: int = 0
    pcs: np.ndarray = field(default_factory=lambda: np.zeros(12))  # decayed pitch-class counts
    recent_parts: tuple[int, ...] = ()
    texture: int = 0  # 0 no context, 1 the last events are all one part (a melody), 2 several parts


class CountTable:
    """Frozen counts: sorted 64-bit keys, each with a row of (class, count) pairs."""

    def __init__(self, keys: np.ndarray, ptr: np.ndarray, classes: np.ndarray, counts: np.ndarray):
        self.keys = np.asarray(keys, dtype=np.uint64)
        self.ptr = np.asarray(ptr, dtype=np.int64)
        self.classes = np.asarray(classes, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.float64)
        self.totals = np.add.reduceat(self.counts, self.ptr[:-1]) if len(self.keys) else np.zeros(0)
        self._index = dict(zip(self.keys.tolist(), range(len(self.keys))))  # fast lookups, ~80 B a key

    @classmethod
    def build(cls, rows: dict[int, dict[int, float]]) -> "CountTable":
        keys = np.array(sorted(rows), dtype=np.uint64)
        ptr = np.zeros(len(keys) + 1, dtype=np.int64)
        classes, counts = [], []
        for i, k in enumerate(keys.tolist()):
            row = rows[k]
            ptr[i + 1] = ptr[i] + len(row)
            for c in sorted(row):
                classes.append(c)
                counts.append(row[c])
        return cls(keys, ptr, np.array(classes, dtype=np.int64), np.array(counts, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: int) -> int:
        """Row index of ``key``, -1 when absent."""
        return self._index.get(key, -1)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        a, b = self.ptr[i], self.ptr[i + 1]
        return self.classes[a:b], self.counts[a:b], float(self.totals[i])


class MarkovModel:
    """The Continuator behind the :class:`~coplayer.gen.model.EventModel` protocol."""

    def __init__(self, encoding: Encoding, table: CountTable | None = None,
                 settings: MarkovSettings | None = None, *, name: str = "markov",
                 adapt: bool = False, card: dict | None = None):
        self.encoding = encoding
        self.settings = settings or MarkovSettings()
        self.table = table if table is not None else CountTable.build({})
        self.live: dict[int, dict[int, float]] = {}
        self.name = name
        self.adapt = adapt
        self.card = card or {}
        self._memo: dict[tuple, np.ndarray] = {}
        self._live_version = 0
        self._rows: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}  # corpus rows, normalised
        self._registers: dict[int, np.ndarray] = {}
        self._sizes = encoding.sizes
        self._uniform = {f: np.full(n, 1.0 / n) for f, n in self._sizes.items()}
        self._tpb = encoding.ticks_per_beat
        self._n_parts = len(encoding.parts)
        self._pc_of_pitch = np.arange(self._sizes["pitch"]) % 12
        self.reset()

    # -- the EventModel protocol ---------------------------------------------------

    def reset(self) -> None:
        """Forget the context (learned counts stay; :meth:`forget` clears them)."""
        self._st = _State(hashes=[_SEED], last_pitch=[-1] * self._n_parts)

    def feed(self, events: np.ndarray, pos: np.ndarray) -> None:
        events = np.asarray(events, dtype=np.int64).reshape(-1, len(FIELDS))
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        for ev, p in zip(events.tolist(), pos.tolist()):
            if self.adapt:
                self._count(ev, self.live, self.settings.live_weight)
                self._live_version += 1
            self._advance(ev, p)

    def field_logits(self, field: str, partial: dict[str, int]) -> np.ndarray:
        """Log-probabilities over the classes of ``field`` (read-only; they sum to 1 in probability)."""
        levels = self._levels(field, partial)
        find, live = self.table.find, self.live
        found = tuple((find(k), ref) for k, ref in levels)
        # learned counts change the distribution: remember it per version of them
        version = self._live_version if live and any(k in live for k, _ in levels) else -1
        memo = (field, found, version)
        hit = self._memo.get(memo)
        if hit is None:
            if len(self._memo) > MEMO_SIZE:
                self._memo.clear()
            hit = self._memo[memo] = np.log(self._probs(field, levels, found))
            hit.flags.writeable = False
        if field == "pitch" and self.settings.pc_cache > 0 and self._st.count:
            return self._pc_weighted(hit)
        return hit

    def _pc_weighted(self, logp: np.ndarray) -> np.ndarray:
        s, h = self.settings, self._st.pcs
        weight = s.pc_cache * np.log((h + s.pc_prior) / (h.sum() + 12 * s.pc_prior))
        x = logp + weight[self._pc_of_pitch]
        m = x.max()
        return x - (m + np.log(np.exp(x - m).sum()))

    def fork(self, *, learning: bool = True) -> "MarkovModel":
        """A copy with its own context and learned counts; the corpus counts are shared.

        ``learning=False``: a scratch copy (to generate an answer on) that
        does not adapt and reads this model's learned counts instead of
        copying them, so it costs the same however long the model listened;
        this model must not learn while the copy is in use.
        """
        twin = copy.copy(self)
        twin._st = copy.deepcopy(self._st)
        if learning:
            twin.live = copy.deepcopy(self.live)
            twin._memo = {}
        else:
            twin.adapt = False  # shares live counts and the memo keyed by their version
        return twin

    # -- live learning ------------------------------------------------------------

    def learn(self, events: np.ndarray, pos: np.ndarray, weight: float | None = None) -> None:
        """Add the counts of a phrase (as a piece of its own) to the learned table."""
        w = self.settings.live_weight if weight is None else float(weight)
        saved = self._st
        self.reset()
        events = np.asarray(events, dtype=np.int64).reshape(-1, len(FIELDS))
        for ev, p in zip(events.tolist(), np.asarray(pos, dtype=np.int64).reshape(-1).tolist()):
            self._count(ev, self.live, w)
            self._advance(ev, p)
        self._st = saved
        self._live_version += 1

    def forget(self) -> None:
        """Clear what :meth:`learn` (or ``adapt``) added."""
        self.live = {}
        self._live_version += 1

    # -- probabilities ------------------------------------------------------------

    def field_probs(self, field: str, partial: dict[str, int]) -> np.ndarray:
        """Probabilities over the classes of ``field``; every class gets some."""
        return np.exp(self.field_logits(field, partial))

    def _probs(self, field: str, levels: list[tuple[int, int | None]],
               found: tuple[tuple[int, int | None], ...]) -> np.ndarray:
        n = self._sizes[field]
        b = self.settings.escape[_F[field]]
        live_rows, rows = self.live, self._rows
        # Interpolated Witten-Bell unrolled: p = sum_k (prod_{j>k} mu_j) c_k / (C_k + b T_k)
        # + (prod_k mu_k) / n, with mu_k = b T_k / (C_k + b T_k); longest context first.
        carry = 1.0
        parts_c, parts_w = [], []
        clip = False  # classes may fall outside 0..n-1: relative pitches, or a key collision
        for (key, ref), (row, _) in zip(levels, found):
            live = live_rows.get(key) if live_rows else None
            if live is None:
                if row < 0:
                    continue
                cached = rows.get(row)
                if cached is None:
                    classes, counts, total = self.table.row(row)
                    denom = total + b * len(classes)
                    cached = rows[row] = (classes, counts / denom, b * len(classes) / denom)
                classes, weights, mu = cached
            else:
                classes, counts, total = self._merged(row, live)
                denom = total + b * len(classes)
                weights, mu = counts / denom, b * len(classes) / denom
            parts_c.append(classes if ref is None else classes + ref)
            parts_w.append(weights * carry if carry != 1.0 else weights)
            clip = clip or ref is not None
            carry *= mu
        if not parts_c:
            return self._uniform[field].copy()
        classes = np.concatenate(parts_c)
        weights = np.concatenate(parts_w)
        # A context absent from the table can match another field's stored
        # context (KEY_BITS): its classes are then not this field's.  Rare
        # (found by sampling 185 continuations per model), harmless when clipped.
        if clip or classes.max() >= n:
            keep = (classes >= 0) & (classes < n)
            classes, weights = classes[keep], weights[keep]
        p = np.bincount(classes, weights, minlength=n).astype(np.float64, copy=False)  # int when empty
        p += carry / n
        if field == "pitch" and self.settings.register > 0:
            p *= self._register(levels[-1][0]) ** self.settings.register
        return p / p.sum()

    def _register(self, key: int) -> np.ndarray:
        """P(pitch | part) (the last pitch level, smoothed) for the register expert."""
        reg = self._registers.get(key)
        if reg is None:
            row = self.table.find(key)
            n = self._sizes["pitch"]
            reg = np.full(n, 1.0 / n)
            if row >= 0:
                classes, counts, total = self.table.row(row)
                b = self.settings.escape[_F["pitch"]]
                reg = reg * (b * len(classes)) / (total + b * len(classes))
                reg[classes] += counts / (total + b * len(classes))
            reg = self._registers[key] = reg / reg.sum()
        return reg

    def _merged(self, row: int, live: dict[int, float] | None) -> tuple[np.ndarray, np.ndarray, float]:
        if live is None:
            return self.table.row(row)
        lc = np.fromiter(live.keys(), dtype=np.int64, count=len(live))
        lw = np.fromiter(live.values(), dtype=np.float64, count=len(live))
        if row < 0:
            return lc, lw, float(lw.sum())
        cc, cw, ct = self.table.row(row)
        classes, inverse = np.unique(np.concatenate([cc, lc]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([cw, lw]), minlength=len(classes))
        return classes, counts, ct + float(lw.sum())

    # -- contexts -----------------------------------------------------------------

    def _levels(self, field: str, partial: dict[str, int]) -> list[tuple[int, int | None]]:
        """(key, reference pitch or None) of each context level, longest first."""
        st, f = self._st, _F[field]
        salt = (st.texture * _SALT) & MASK if self.settings.texture else 0
        hashes = [h ^ salt for h in st.hashes] if salt else st.hashes
        seed = hashes[0]
        top = len(hashes) - 1
        levels: list[tuple[int, int | None]] = []
        if field == "shift":
            ctx = st.prev_pos + 1
            levels += [(_key(hashes[k], f, 0, ctx * 16 + k), None) for k in range(top, 0, -1)]
            levels += [(_key(seed, f, 1, ctx), None), (_key(seed, f, 2, 0), None)]
        elif field == "part":
            shift = partial["shift"]
            levels += [(_key(hashes[k], f, 0, shift * 16 + k), None) for k in range(top, 0, -1)]
            levels += [(_key(seed, f, 1, shift * 64 + st.prev_part + 1), None), (_key(seed, f, 2, 0), None)]
        elif field == "pitch":
            shift, part = partial["shift"], partial["part"]
            ref, kind, rel = self._reference(part)
            if ref >= 0:
                ctx = ((shift * 64 + part) * 64 + rel) * 4 + kind
                levels += [(_key(hashes[k], f, 0, ctx * 16 + k), ref) for k in range(top, 0, -1)]
                levels += [(_key(seed, f, 1, ctx), ref), (_key(seed, f, 2, part * 4 + kind), ref)]
            levels.append((_key(seed, f, 3, part), None))
        elif field == "dur":
            shift, part, pitch = partial["shift"], partial["part"], partial["pitch"]
            ref, kind, _ = self._reference(part)
            ctx = (shift * 64 + part) * 64 + _interval_code(pitch, ref)
            levels += [(_key(hashes[k], f, 0, ctx * 16 + k), None) for k in range(top, 0, -1)]
            phase = (st.prev_pos + shift) % self._tpb if st.prev_pos >= 0 else self._tpb
            levels += [(_key(seed, f, 1, part * 64 + phase), None), (_key(seed, f, 2, part), None)]
        elif field == "vel":
            part = partial["part"]
            levels += [(_key(seed, f, 0, (st.prev_vel + 1) * 64 + part), None),
                       (_key(seed, f, 1, part), None), (_key(seed, f, 2, 0), None)]
        else:
            raise ValueError(f"unknown field {field!r}; fields are {', '.join(FIELDS)}")
        return levels

    def _reference(self, part: int) -> tuple[int, int, int]:
        """(reference pitch or -1, kind: 1 same part / 2 previous event, the previous
        event's pitch relative to the part's last pitch as a code)."""
        st = self._st
        same = st.last_pitch[part]
        if same >= 0:
            return same, 1, _interval_code(st.prev_pitch, same)
        if st.prev_pitch >= 0:
            return st.prev_pitch, 2, _NONE
        return -1, 0, _NONE

    def _advance(self, ev: list[int], pos: int) -> None:
        shift, part, pitch, dur, vel = ev
        st = self._st
        ref, _, _ = self._reference(part)
        view = ((shift * 64 + part) * 64 + _interval_code(pitch, ref)) * 128 + dur
        order = self.settings.order
        old = st.hashes
        st.hashes = [_SEED] + [_mix(old[k], view) for k in range(min(len(old), order))]
        st.last_pitch[part] = pitch
        st.prev_pitch, st.prev_part, st.prev_pos, st.prev_vel = pitch, part, pos, vel
        st.count += 1
        st.recent_parts = (st.recent_parts + (part,))[-_TEXTURE_EVENTS:]
        st.texture = 1 if len(set(st.recent_parts)) == 1 else 2
        if self.settings.pc_cache > 0:
            st.pcs *= self.settings.pc_decay
            st.pcs[pitch % 12] += 1.0

    def _count(self, ev: list[int], rows: dict[int, dict[int, float]], weight: float,
               orders: dict[int, int] | None = None, transpose: bool = False) -> None:
        """Add one event's counts (before it joins the context)."""
        partial: dict[str, int] = {}
        for f, value in zip(FIELDS, ev):
            levels = self._levels(f, partial)
            for i, (key, ref) in enumerate(levels):
                if f == "pitch" and ref is None and transpose:
                    row = rows.setdefault(key, {})
                    w = weight / len(TRANSPOSE)
                    for t in TRANSPOSE:
                        if 0 <= value + t < 128:
                            row[value + t] = row.get(value + t, 0.0) + w
                    continue
                target = value if ref is None else value - ref
                row = rows.setdefault(key, {})
                row[target] = row.get(target, 0.0) + weight
                if orders is not None and f in ("shift", "part", "pitch", "dur"):
                    # history levels come first: level i has order top - i
                    top = len(self._st.hashes) - 1
                    if i < top:
                        orders[key] = max(orders.get(key, 0), top - i)
            partial[f] = value

    # -- fitting, saving, loading ------------------------------------------------------

    @classmethod
    def fit(cls, pieces: Iterable[tuple[np.ndarray, np.ndarray]], encoding: Encoding | None = None,
            settings: MarkovSettings | None = None, *, prune: bool = True, name: str = "markov") -> "MarkovModel":
        """Count every (events, pos) piece; prune singletons of long contexts if ``prune``."""
        model = cls(encoding or Encoding(), None, settings, name=name)
        rows: dict[int, dict[int, float]] = {}
        orders: dict[int, int] = {}
        for events, pos in pieces:
            model.reset()
            for ev, p in zip(np.asarray(events, dtype=np.int64).tolist(), np.asarray(pos).tolist()):
                model._count(ev, rows, 1.0, orders, transpose=True)
                model._advance(ev, p)
        if prune:
            s = model.settings
            rows = {k: r for k, r in rows.items()
                    if orders.get(k, 0) < s.prune_order or sum(r.values()) > s.prune_count}
        model.table = CountTable.build(rows)
        model._memo.clear()
        model._rows.clear()
        model._registers.clear()
        model.reset()
        return model

    def save(self, path: str | os.PathLike, card: dict | None = None) -> Path:
        """Write ``<path>.npz`` (the counts) and ``<path>.json`` (the card)."""
        path = Path(path).with_suffix("")
        npz = path.with_suffix(".npz")
        t = self.table
        # Sorted 40-bit keys as gaps, counts in twelfths (transpositions) as integers.
        gaps = np.diff(t.keys, prepend=np.uint64(0))
        twelfths = np.rint(t.counts * 12)
        if not np.allclose(twelfths, t.counts * 12, atol=1e-6):
            raise ValueError("counts must be multiples of 1/12 to be saved")
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, key_gaps=gaps.astype(_smallest(gaps.max(initial=0))),
                            lengths=np.diff(t.ptr).astype(_smallest(np.diff(t.ptr).max(initial=0))),
                            classes=t.classes.astype(np.int16),
                            twelfths=twelfths.astype(_smallest(twelfths.max(initial=0))))
        meta = {
            "name": path.name, "task": TASK, "kind": "markov", "format": FORMAT,
            "format_version": FORMAT_VERSION, "encoding": self.encoding.to_dict(),
            "settings": asdict(self.settings), "contexts": len(t), "entries": int(len(t.classes)),
            "sha256": hashlib.sha256(npz.read_bytes()).hexdigest(), **(card or {}),
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return npz

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, adapt: bool = False,
             name: str | None = None, **overrides) -> "MarkovModel":
        """The shipped counts (default) or ``path`` (.npz with its .json card beside it)."""
        npz = Path(path).with_suffix(".npz") if path is not None else asset_path()
        card_path = npz.with_suffix(".json")
        refit = "refit it with python -m coplayer.gen.markov"
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            with np.load(npz) as data:
                keys = np.cumsum(data["key_gaps"].astype(np.uint64))
                lengths = data["lengths"].astype(np.int64)
                classes, counts = data["classes"], data["twelfths"] / 12.0
        except FileNotFoundError as exc:
            raise ModelError(f"Markov model {npz} or its card {card_path.name} is missing; {refit}") from exc
        # A truncated or overwritten .npz is a broken zip archive (BadZipFile, or zlib's
        # error / EOFError inside a member); a card that is not JSON is a ValueError.
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise ModelError(f"Markov model {npz} is unreadable ({one_line(exc)}); {refit}") from exc
        if not isinstance(card, dict) or card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{card_path} is not a {FORMAT} v{FORMAT_VERSION} card; {refit}")
        try:
            stored = dict(card["settings"], escape=tuple(card["settings"]["escape"]))
            settings = replace(MarkovSettings(**stored), **overrides)
            encoding = Encoding.from_dict(card["encoding"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{card_path} has no valid settings and encoding ({one_line(exc)}); {refit}") from exc
        ptr = np.concatenate([[0], np.cumsum(lengths)])
        table = CountTable(keys, ptr, classes, counts)
        return cls(encoding, table, settings,
                   name=name or ("markov-live" if adapt else "markov"), adapt=adapt, card=card)


def _smallest(high) -> type:
    """The smallest unsigned integer type that holds ``high``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


def asset_path() -> Path:
    return Path(str(resources.files("coplayer").joinpath("assets", f"{ASSET}.npz")))


def piece_nll_bits(model, events: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Bits of each field of each event [N,5], predicted from the events before it.

    Works for any EventModel; the model is reset first (learned counts stay).
    """
    model.reset()
    events = np.asarray(events, dtype=np.int64)
    bits = np.zeros(events.shape, dtype=np.float64)
    for i, ev in enumerate(events.tolist()):
        partial: dict[str, int] = {}
        for j, (f, value) in enumerate(zip(FIELDS, ev)):
            logits = np.asarray(model.field_logits(f, partial), dtype=np.float64)
            m = logits.max()
            log_z = m + math.log(np.exp(logits - m).sum())
            bits[i, j] = (log_z - logits[value]) / math.log(2)
            partial[f] = value
        model.feed(events[i:i + 1], pos[i:i + 1])
    return bits


def main(argv: list[str] | None = None) -> None:
    """Refit the shipped model on the training split and report valid NLL."""
    import argparse

    from coplayer.gen.data import SOURCES, load_pieces

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--order", type=int, default=MarkovSettings.order)
    p.add_argument("--escape", type=float, nargs=len(FIELDS), default=MarkovSettings.escape,
                   metavar="B", help="Witten-Bell escape weight of each field: " + " ".join(FIELDS))
    p.add_argument("--out", default=str(asset_path().with_suffix("")))
    p.add_argument("--valid-limit", type=int, default=200, help="valid pieces per source for the report")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    enc = Encoding()
    sources = tuple(args.sources)
    t0 = time.perf_counter()
    train = load_pieces("train", enc, sources)
    settings = MarkovSettings(order=args.order, escape=tuple(args.escape))
    model = MarkovModel.fit(((p.events, p.pos) for p in train), enc, settings)
    fit_s = time.perf_counter() - t0
    valid = load_pieces("valid", enc, sources)
    report = {}
    for src in sources:
        chosen = [p for p in valid if p.source == src][: args.valid_limit]
        bits = sum((piece_nll_bits(model, p.events, p.pos).sum(0) for p in chosen), np.zeros(len(FIELDS)))
        n = sum(len(p) for p in chosen)
        report[src] = {"pieces": len(chosen), "events": n, "bits_per_event": round(float(bits.sum() / n), 4),
                       "bits_per_field": {f: round(float(b / n), 4) for f, b in zip(FIELDS, bits)}}
        log.info("valid %s: %.3f bits/event over %d events", src, bits.sum() / n, n)
    card = {"training": {"split": "train", "sources": list(sources), "pieces": len(train),
                         "events": int(sum(len(p) for p in train)), "seconds": round(fit_s, 1)},
            "valid_nll": report,
            "description": "Variable-order Markov continuation (Continuator-style), "
                           "interpolated Witten-Bell backoff; see coplayer/gen/markov.py"}
    npz = model.save(args.out, card)
    log.info("wrote %s (%d contexts, %.2f MB) in %.0f s", npz, len(model.table),
             npz.stat().st_size / 1e6, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
