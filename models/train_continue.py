"""Train the continuation transformer on chorales and melodies.

    python -m models.train_continue [--epochs N] [--out runs/continue-transformer]

Pieces come from :mod:`coplayer.gen.data` (the committed splits): each epoch
transposes every training piece by a random -5..+6 semitones, shifts the
velocity level of half of them, packs them (each behind a BOS event) into
rows of ``--seq`` events and trains with teacher forcing; an event attends
only to its own piece and to the ``window - 1`` events before it, as in
streaming.  After every epoch the valid NLL is printed in bits per event
(and per field); the run directory gets ``checkpoint.pt`` (the best epoch
by valid NLL), ``train-args.json``, ``encoding.json`` and ``metrics.json``
(valid and test NLL of that checkpoint).  Training stops at ``--max-minutes``
(the learning rate anneals by then), so a slower machine still finishes in time.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coplayer.gen.data import POS_CLASSES, SOURCES, EventPiece, load_pieces
from coplayer.gen.encoding import FIELDS, Encoding
from coplayer.gen.runner import NO_INTERVAL, PitchContext
from models.continuation import ContinuationTransformer
from models.train_instrument import progress

LN2 = math.log(2)


@dataclass
class Seq:
    """One piece as model inputs: its events, positions, relative-pitch inputs and anchors."""

    events: np.ndarray  # [N,5]
    pos: np.ndarray  # [N]
    rel: np.ndarray  # [N,2]
    anchor: np.ndarray  # [N]: the anchor pitch each event was scored against (-1: none)
    source: str

    def __len__(self) -> int:
        return len(self.events)


def to_seq(piece: EventPiece, encoding: Encoding) -> Seq:
    rel, anchor = PitchContext(len(encoding.parts)).features(piece.events)
    return Seq(piece.events, piece.pos, rel, anchor, piece.source)


@dataclass
class Rows:
    """Packed training/eval rows: inputs, next-event targets (and anchors), target weights, piece ids."""

    events: np.ndarray  # [R,L,5]
    pos: np.ndarray  # [R,L]
    rel: np.ndarray  # [R,L,2]
    targets: np.ndarray  # [R,L,5]
    anchor: np.ndarray  # [R,L] the target's anchor pitch
    weight: np.ndarray  # [R,L] float32: 1 where the target is the next event of the same piece
    segments: np.ndarray  # [R,L]
    source: np.ndarray  # [R,L] index into SOURCES of the target's piece (-1 padding)


def bos_event(encoding: Encoding) -> np.ndarray:
    event = np.zeros(len(FIELDS), dtype=np.int64)
    event[0] = encoding.sizes["shift"]
    return event


def augment(seq: Seq, rng: np.random.Generator, encoding: Encoding,
            transpose: tuple[int, int] = (-5, 6), p_velocity: float = 0.5) -> Seq:
    """A random transposition (kept within MIDI 21..108) and, sometimes, another velocity level."""
    events, anchor = seq.events.copy(), seq.anchor.copy()
    low, high = int(events[:, 2].min()), int(events[:, 2].max())
    lo, hi = max(transpose[0], 21 - low), min(transpose[1], 108 - high)
    if lo <= hi:
        shift = int(rng.integers(lo, hi + 1))
        events[:, 2] += shift
        anchor[anchor >= 0] += shift
    if rng.random() < p_velocity:
        events[:, 4] = np.clip(events[:, 4] + int(rng.choice([-3, -2, -1, 1, 2])), 0, encoding.vel_buckets - 1)
    return Seq(events, seq.pos, seq.rel, anchor, seq.source)


def pack(seqs: list[Seq], length: int, encoding: Encoding, offset: int = 0, split_pieces: bool = True) -> Rows:
    """Pieces (each behind a BOS) packed into rows of ``length`` events.

    With ``split_pieces`` the pieces form one stream cut every ``length``
    events (starting ``offset`` events in); otherwise a piece starts a new
    row whenever it does not fit in the current one (evaluation: context is
    never lost, except for pieces longer than a row).
    """
    bos = bos_event(encoding)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("events", "pos", "rel", "anchor", "seg", "src")}
    for i, seq in enumerate(seqs):
        n = len(seq) + 1
        chunks["events"] += [bos[None], seq.events]
        chunks["pos"] += [np.zeros(1, dtype=np.int64), seq.pos]
        chunks["rel"] += [np.full((1, 2), NO_INTERVAL, dtype=np.int64), seq.rel]
        chunks["anchor"] += [np.full(1, -1, dtype=np.int64), seq.anchor]
        chunks["seg"].append(np.full(n, i, dtype=np.int64))
        chunks["src"].append(np.full(n, SOURCES.index(seq.source), dtype=np.int64))
    lengths = [len(s) for s in chunks["seg"]]
    stream = {k: np.concatenate(v) for k, v in chunks.items()}
    total = len(stream["seg"])
    if split_pieces:
        starts = list(range(offset % length, total - 1, length))
        return _rows_between(stream, starts, [min(s + length, total) for s in starts], length)
    starts, end, row_start = [], 0, 0
    for n in lengths:  # greedy: a piece that does not fit opens a new row
        if end + n - row_start > length and end > row_start:
            starts.append(row_start)
            row_start = end
        end += n
        while end - row_start > length:
            starts.append(row_start)
            row_start += length
    starts.append(row_start)
    return _rows_between(stream, starts, starts[1:] + [total], length)


def _rows_between(stream: dict[str, np.ndarray], starts: list[int], ends: list[int], length: int) -> Rows:
    n, width = len(starts), len(FIELDS)
    out = Rows(np.zeros((n, length, width), np.int64), np.zeros((n, length), np.int64),
               np.full((n, length, 2), NO_INTERVAL, np.int64), np.zeros((n, length, width), np.int64),
               np.full((n, length), -1, np.int64), np.zeros((n, length), np.float32),
               np.full((n, length), -1, np.int64), np.full((n, length), -1, np.int64))
    events, seg, src = stream["events"], stream["seg"], stream["src"]
    for r, (a, b) in enumerate(zip(starts, ends)):
        m = b - a
        out.events[r, :m], out.pos[r, :m], out.rel[r, :m] = events[a:b], stream["pos"][a:b], stream["rel"][a:b]
        out.segments[r, :m] = seg[a:b]
        # The target of the last input of a row is the first event of the next (if same piece).
        nxt = min(b + 1, len(seg))
        k = nxt - a - 1
        same = seg[a + 1:nxt] == seg[a:a + k]
        out.targets[r, :k] = np.where(same[:, None], events[a + 1:nxt], 0)  # a BOS is never a target
        out.anchor[r, :k] = np.where(same, stream["anchor"][a + 1:nxt], -1)
        out.weight[r, :k] = same
        out.source[r, :k] = np.where(same, src[a + 1:nxt], -1)
    out.segments[out.segments < 0] = -1 - np.arange(length)[None].repeat(n, 0)[out.segments < 0]
    return out


def batches(rows: Rows, size: int, rng: np.random.Generator | None):
    order = rng.permutation(len(rows.pos)) if rng is not None else np.arange(len(rows.pos))
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        yield tuple(torch.from_numpy(np.ascontiguousarray(a[idx])) for a in
                    (rows.events, rows.pos, rows.rel, rows.targets, rows.anchor, rows.weight, rows.segments,
                     rows.source))


@torch.no_grad()
def evaluate(model: ContinuationTransformer, pieces: list[EventPiece], encoding: Encoding,
             row_length: int = 1024, batch: int = 4) -> dict:
    """NLL of ``pieces`` in bits per event (total and per field), overall and per source."""
    model.eval()
    rows = pack([to_seq(p, encoding) for p in pieces], row_length, encoding, split_pieces=False)
    nats = np.zeros((len(SOURCES), len(FIELDS)))
    counts = np.zeros(len(SOURCES))
    for events, pos, rel, targets, anchor, weight, segments, source in batches(rows, batch, None):
        hidden = model(events, pos, rel, segments)
        for s in range(len(SOURCES)):
            w = (source == s).float()
            if w.sum() > 0:
                nats[s] += model.losses(hidden, targets, w, anchor).numpy()
                counts[s] += float(w.sum())
    return nll_report(nats, counts)


def nll_report(nats: np.ndarray, counts: np.ndarray) -> dict:
    def one(n: np.ndarray, c: float) -> dict:
        bits = n / max(c, 1) / LN2
        return {"bits_per_event": float(bits.sum()), "bits_per_field": dict(zip(FIELDS, map(float, bits))),
                "events": int(c)}
    report = one(nats.sum(0), counts.sum())
    report["by_source"] = {src: one(nats[i], counts[i]) for i, src in enumerate(SOURCES) if counts[i]}
    return report


def lr_at(step: int, total: int, base: float, warmup: int, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% over the steps or the time budget, whichever ends first."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = max((step - warmup) / max(1, total - warmup), elapsed)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def fmt(report: dict) -> str:
    per = " ".join(f"{f} {b:.3f}" for f, b in report["bits_per_field"].items())
    srcs = " ".join(f"{s} {r['bits_per_event']:.3f}" for s, r in report["by_source"].items())
    return f"{report['bits_per_event']:.3f} bits/event ({per}; {srcs})"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-minutes", type=float, default=50.0,
                   help="time budget of the training loop: the learning rate anneals by then and training stops")
    p.add_argument("--out", type=Path, default=Path("runs/continue-transformer"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--window", type=int, default=256, help="events each event attends to (itself included)")
    p.add_argument("--seq", type=int, default=512, help="events per training row")
    p.add_argument("--batch", type=int, default=8, help="rows per batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--bach-repeats", type=int, default=2, help="copies of each chorale per epoch")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--limit", type=int, default=0, help="at most this many pieces per split (smoke tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast for training steps (evaluation is float32)")
    return p.parse_args(argv)


def load_data(args, encoding: Encoding) -> dict[str, list[EventPiece]]:
    data = {}
    for split in ("train", "valid", "test"):
        pieces = load_pieces(split, encoding, tuple(args.sources))
        if args.limit:
            rng = np.random.default_rng(args.seed)
            pieces = [pieces[i] for i in sorted(rng.permutation(len(pieces))[:args.limit])]
        data[split] = pieces
    return data


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    encoding = Encoding()
    data = load_data(args, encoding)
    sizes = [encoding.sizes[f] for f in FIELDS]
    model = ContinuationTransformer(sizes, n_pos=POS_CLASSES, dim=args.dim, layers=args.layers, heads=args.heads,
                                    window=args.window, mlp_ratio=args.mlp_ratio, dropout=args.dropout)
    counts = {s: {src: sum(len(p) for p in ps if p.source == src) for src in SOURCES} for s, ps in data.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters; events per split and source: {counts}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train-args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()}, indent=1) + "\n")
    enc = {**encoding.to_dict(), "pos_classes": POS_CLASSES, "bos_shift": model.bos_shift,
           "data": {"sources": list(args.sources), "pieces": {s: len(p) for s, p in data.items()},
                    "events": counts}}
    (args.out / "encoding.json").write_text(json.dumps(enc, indent=1) + "\n")

    train = [to_seq(p, encoding) for p in data["train"]]
    train += [s for s in train if s.source == "bach"] * (args.bach_repeats - 1)
    rows_per_epoch = math.ceil((sum(len(p) + 1 for p in train)) / args.seq)
    steps_per_epoch = math.ceil(rows_per_epoch / args.batch)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    best, best_state, history, step, t0 = math.inf, None, [], 0, time.monotonic()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        pieces = [augment(train[i], rng, encoding) for i in order]
        rows = pack(pieces, args.seq, encoding, offset=int(rng.integers(args.seq)))
        seen, loss_sum, n_batches = 0.0, 0.0, math.ceil(len(rows.pos) / args.batch)
        for b, (events, pos, rel, targets, anchor, weight, segments, _) in enumerate(batches(rows, args.batch, rng)):
            elapsed = (time.monotonic() - t0) / (60 * args.max_minutes)
            if elapsed >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, args.warmup, elapsed)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                hidden = model(events, pos, rel, segments)
                nats = model.losses(hidden, targets, weight, anchor)
            n = float(weight.sum())
            loss = nats.sum() / max(n, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += n
            loss_sum += float(nats.detach().sum())
            progress(f"epoch {epoch}/{args.epochs}", b + 1, n_batches,
                     f"train {loss_sum / max(seen, 1) / LN2:.3f} bits/event, {time.monotonic() - t0:.0f}s")
        valid = evaluate(model, data["valid"], encoding)
        history.append({"epoch": epoch, "train_bits_per_event": loss_sum / max(seen, 1) / LN2, "valid": valid,
                        "seconds": time.monotonic() - t0})
        print(f"epoch {epoch}: valid {fmt(valid)}  [{time.monotonic() - t0:.0f}s]", flush=True)
        if valid["bits_per_event"] < best:
            best = valid["bits_per_event"]
            best_state = {"epoch": epoch, "valid": valid,
                          "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
        save(args.out, model, best_state, history)
        if time.monotonic() - t0 >= 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes:g} minutes reached after epoch {epoch}")
            break
    model.load_state_dict(best_state["state_dict"])
    test = evaluate(model, data["test"], encoding)
    print(f"test (epoch {best_state['epoch']}): {fmt(test)}")
    metrics = {"epoch": best_state["epoch"], "valid": best_state["valid"], "test": test,
               "train_seconds": time.monotonic() - t0, "parameters": n_params, "history": history}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    save(args.out, model, best_state, history, test)
    return 0


def save(out: Path, model: ContinuationTransformer, best: dict, history: list, test: dict | None = None) -> None:
    ckpt = {"kind": model.kind, "hparams": model.hparams, "state_dict": best["state_dict"], "epoch": best["epoch"],
            "valid": best["valid"], "test": test or {}, "history": history}
    tmp = out / "checkpoint.pt.tmp"
    torch.save(ckpt, tmp)
    tmp.replace(out / "checkpoint.pt")


if __name__ == "__main__":
    raise SystemExit(main())
