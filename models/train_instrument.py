"""Train an online instrumentation model on the Bach chorale train split.

    python -m models.train_instrument [--model lstm|transformer] [--epochs N] [--out DIR]

Each epoch first *rolls out* the current model over freshly augmented
performances of every training piece (transposition, tempo scaling, onset
jitter, random chord order, velocities), feeding back its own decisions with
a probability that grows over training (scheduled sampling, DAgger-style):
the model learns from the histories it will itself produce live.  It then
trains on those feature sequences with the true parts as targets.  Features
come from the runtime featurizer, so training and live play share one code.

The rollout (the featurizer, in Python, at every note) costs as much as the
training itself.  With ``--workers 1`` (the default) a second process rolls
out the next epoch while this one trains and validates, with the weights of
the epoch before (one epoch stale): an epoch takes about half the time on two
cores.  The result depends on the seed only, not on the timing; it differs
from ``--workers 0`` (all in one process), whose random draws come in
another order.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from coplayer.data.corpus import SATB
from coplayer.data.splits import load_manifest, load_split
from coplayer.instrument.features import Featurizer, FeatureSpec
from coplayer.instrument.protocols import Performance, perform
from models.instrument import InstrumentLSTM, InstrumentTransformer

ARCHS = {"lstm": InstrumentLSTM, "transformer": InstrumentTransformer}


@dataclass
class Sequence:
    pitch: np.ndarray  # [T] int64
    feats: np.ndarray  # [T, F] float32
    labels: np.ndarray  # [T] int64 (true parts; -1 unknown)
    preds: np.ndarray  # [T] int64 (the model's argmax)
    fed: np.ndarray  # [T] int64 (the parts fed back as history: own decision or truth)


def progress(label: str, done: int, total: int, extra: str = "") -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def augmented(scores, rng: np.random.Generator, p_exact: float = 0.35) -> list[Performance]:
    """One random performance of each score (the training augmentation)."""
    perfs = []
    for score in scores:
        low = min(n.pitch for n in score.notes)
        high = max(n.pitch for n in score.notes)
        shift = int(rng.integers(max(-5, 21 - low), min(6, 108 - high) + 1))
        scale = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
        if rng.random() < p_exact:
            perfs.append(perform(score, list(SATB), "a", transpose=shift, tempo_scale=scale))
        else:
            jitter = float(rng.uniform(0.002, 0.015))
            perfs.append(perform(score, list(SATB), "b", rng, transpose=shift,
                                 tempo_scale=scale, jitter=jitter))
    return perfs


def _next_on(fz: Featurizer, perf: Performance, ptr: int) -> int:
    """Advance past note-offs to the next note-on; returns its event index or -1."""
    events = perf.events
    while ptr < len(events) and not events[ptr].on:
        ev = events[ptr]
        fz.note_off(int(perf.pitches[ev.index]), ev.time)
        ptr += 1
    return ptr if ptr < len(events) else -1


@torch.no_grad()
def rollout(model, perfs: list[Performance], spec: FeatureSpec, q: float,
            rng: np.random.Generator, batch: int = 400) -> list[Sequence]:
    """Stream performances through the model; history = own decision w.p. q, else truth."""
    model.eval()
    out: list[Sequence] = []
    for start in range(0, len(perfs), batch):
        chunk = perfs[start:start + batch]
        out += _rollout_chunk(model, chunk, spec, q, rng)
    return out


def _rollout_chunk(model, chunk, spec, q, rng):
    fzs = [Featurizer(spec) for _ in chunk]
    ptrs = [_next_on(f, p, 0) for f, p in zip(fzs, chunk)]
    rec = [([], [], [], [], []) for _ in chunk]
    rows = list(range(len(chunk)))  # the piece of each batch row; finished pieces leave the batch
    state = tuple(model.initial_state(len(rows)))
    while True:
        keep = [r for r, b in enumerate(rows) if ptrs[b] >= 0]
        if not keep:
            break
        if len(keep) < len(rows):
            state = model.index_state(state, torch.tensor(keep))
            rows = [rows[r] for r in keep]
        pitch = np.zeros(len(rows), dtype=np.int64)
        feats = np.zeros((len(rows), fzs[0].size), dtype=np.float32)
        for r, b in enumerate(rows):
            ev = chunk[b].events[ptrs[b]]
            pitch[r] = chunk[b].pitches[ev.index]
            feats[r] = fzs[b].note_on(int(pitch[r]), int(chunk[b].velocities[ev.index]), ev.time)
        logits, *state = model.step(torch.from_numpy(pitch), torch.from_numpy(feats), *state)
        preds = logits.argmax(-1).numpy()
        for r, b in enumerate(rows):
            perf, ev = chunk[b], chunk[b].events[ptrs[b]]
            label = int(perf.labels[ev.index])
            fed = int(preds[r]) if (label < 0 or rng.random() < q) else label
            fzs[b].commit(fed)
            for lst, val in zip(rec[b], (pitch[r], feats[r].copy(), label, int(preds[r]), fed)):
                lst.append(val)
            ptrs[b] = _next_on(fzs[b], perf, ptrs[b] + 1)
    return [Sequence(np.array(p, dtype=np.int64), np.stack(f), *(np.array(x, dtype=np.int64) for x in rest))
            for p, f, *rest in rec]


def accuracy(seqs: list[Sequence]) -> float:
    hits = sum(int(((s.preds == s.labels) & (s.labels >= 0)).sum()) for s in seqs)
    total = sum(int((s.labels >= 0).sum()) for s in seqs)
    return hits / max(total, 1)


def batches(seqs: list[Sequence], size: int, rng: np.random.Generator):
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].labels))
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    rng.shuffle(groups)
    for group in groups:
        t = max(len(seqs[i].labels) for i in group)
        f = seqs[group[0]].feats.shape[1]
        pitch = np.zeros((len(group), t), dtype=np.int64)
        feats = np.zeros((len(group), t, f), dtype=np.float32)
        labels = np.full((len(group), t), -1, dtype=np.int64)
        for row, i in enumerate(group):
            n = len(seqs[i].labels)
            pitch[row, :n], feats[row, :n], labels[row, :n] = seqs[i].pitch, seqs[i].feats, seqs[i].labels
        yield torch.from_numpy(pitch), torch.from_numpy(feats), torch.from_numpy(labels)


def _rollout_worker(jobs, results, scores, kind: str, hparams: dict, spec: FeatureSpec, p_exact: float,
                    seed: int) -> None:
    """The rollout process: for each (weights, q) received, send back one epoch's sequences."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    model = ARCHS[kind](**hparams)
    while (job := jobs.get()) is not None:
        weights, q = job
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        seqs = rollout(model, augmented(scores, rng, p_exact), spec, q, rng)
        # Plain arrays: no class to resolve in the other process.
        results.put([(s.pitch, s.feats, s.labels, s.preds, s.fed) for s in seqs])


class Rollouts:
    """Each epoch's training sequences, rolled out in this process or, pipelined, in a worker.

    :meth:`get` returns an epoch's sequences; :meth:`trained` says that the
    model has trained on them.  With a worker, the rollout of epoch e+1
    (with the weights after epoch e-1) runs while epoch e trains.  Used as a
    context manager, it stops the worker on the way out.
    """

    def __init__(self, model, scores, spec: FeatureSpec, args, rng, q_of):
        self.model, self.scores, self.spec, self.args, self.rng, self.q_of = model, scores, spec, args, rng, q_of
        self.proc = None
        if args.workers:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that runs torch threads
            # Queues, not a pipe: their feeder threads never block a sender (a pipe deadlocks
            # when both ends send a message larger than its buffer at once).
            self.jobs, self.results = ctx.Queue(), ctx.Queue()
            self.proc = ctx.Process(target=_rollout_worker, daemon=True,
                                    args=(self.jobs, self.results, scores, model.kind, model.hparams, spec,
                                          args.p_exact, args.seed + 1))
            self.proc.start()
            for epoch in (0, 1):  # the first two epochs both roll out the initial weights
                self._send(epoch)

    def _send(self, epoch: int) -> None:
        if epoch < (self.args.stop_after or self.args.epochs):
            weights = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
            self.jobs.put((weights, self.q_of(epoch)))

    def get(self, epoch: int) -> list[Sequence]:
        if self.proc is None:
            return rollout(self.model, augmented(self.scores, self.rng, self.args.p_exact), self.spec,
                           self.q_of(epoch), self.rng)
        while True:
            try:
                return [Sequence(*arrays) for arrays in self.results.get(timeout=1.0)]
            except queue.Empty:
                if not self.proc.is_alive():
                    raise SystemExit(f"the rollout worker stopped (exit code {self.proc.exitcode})") from None

    def trained(self, epoch: int) -> None:
        if self.proc is not None:
            self._send(epoch + 2)

    def __enter__(self) -> "Rollouts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is None:
            return
        self.jobs.put(None)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def validate(model, scores, spec, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    result = {}
    for protocol in ("a", "b"):
        perfs = [perform(s, list(SATB), protocol, rng) for s in scores]
        result[protocol] = accuracy(rollout(model, perfs, spec, 1.0, rng))
    return result


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train_scores, valid_scores = load_split("train"), load_split("valid")
    spec = FeatureSpec(n_parts=len(SATB), resort_chords=args.resort, motion=args.motion,
                       exact_flag=args.exact_flag, pc_context=args.pc_context)
    n_features = Featurizer(spec).size
    sizes = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers)) if v is not None}
    if args.init:
        start = torch.load(args.init)
        model = ARCHS[start["kind"]](**start["hparams"])
        model.load_state_dict(start["state_dict"])
        if model.hparams["n_features"] != n_features:
            raise SystemExit(f"{args.init} was trained with {model.hparams['n_features']} features, "
                             f"these options give {n_features}")
    else:
        model = ARCHS[args.model](n_features, len(SATB), **sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_scores) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=args.pct_start)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    best, history, t0 = -1.0, [], time.monotonic()

    def q_of(epoch: int) -> float:  # the share of own decisions fed back in the rollout
        return min(1.0, args.q_start + (1.0 - args.q_start) * epoch / max(1, args.q_ramp * args.epochs))

    with Rollouts(model, train_scores, spec, args, rng, q_of) as rollouts:
        for epoch in range(args.stop_after or args.epochs):
            q, seqs = q_of(epoch), rollouts.get(epoch)
            model.train()
            total, count = 0.0, 0
            for step, (pitch, feats, labels) in enumerate(batches(seqs, args.batch, rng)):
                logits, _ = model(pitch, feats)
                loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                total, count = total + loss.item(), count + 1
                progress(f"epoch {epoch + 1}/{args.epochs}", step + 1, steps_per_epoch, f"loss {total / count:.4f}")
            rollouts.trained(epoch)  # the worker starts the epoch after next with these weights
            val = validate(model, valid_scores, spec, args.seed)
            score = (val["a"] + val["b"]) / 2
            row = dict(epoch=epoch + 1, q=round(q, 3), loss=total / count, train_rollout_acc=accuracy(seqs),
                       valid_a=val["a"], valid_b=val["b"], minutes=(time.monotonic() - t0) / 60)
            history.append(row)
            print(f"epoch {epoch + 1}: q={q:.2f} loss={row['loss']:.4f} rollout={row['train_rollout_acc']:.4f} "
                  f"valid a={val['a']:.4f} b={val['b']:.4f} ({row['minutes']:.1f} min)", flush=True)
            if score > best:
                best = score
                torch.save({"state_dict": model.state_dict(), "hparams": model.hparams, "kind": model.kind,
                            "epoch": epoch + 1, "valid": val}, out / "checkpoint.pt")
    manifest = load_manifest()
    (out / "train-args.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    (out / "encoding.json").write_text(json.dumps({
        "parts": list(SATB), "features": spec.to_dict(),
        "feature_names": Featurizer(spec).feature_names(),
        "data": {"corpus": manifest["corpus"], "split_seed": manifest["seed"],
                 "train_pieces": len(manifest["train"])},
    }, indent=1) + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    print(f"best valid mean accuracy {best:.4f}; wrote {out}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(ARCHS), default="lstm")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=None, help="model width (default: the model's own)")
    p.add_argument("--layers", type=int, default=None, help="model depth (default: the model's own)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--q-start", type=float, default=0.3, help="share of own decisions fed back at epoch 1")
    p.add_argument("--q-ramp", type=float, default=0.5, help="fraction of epochs to reach q=1")
    p.add_argument("--resort", action=argparse.BooleanOptionalAction, default=True,
                   help="re-sort each chord's voice belief by pitch (FeatureSpec.resort_chords)")
    p.add_argument("--motion", action=argparse.BooleanOptionalAction, default=True,
                   help="add each part's last melodic step (FeatureSpec.motion)")
    p.add_argument("--exact-flag", action=argparse.BooleanOptionalAction, default=True,
                   help="flag exactly simultaneous onsets (FeatureSpec.exact_flag)")
    p.add_argument("--pc-context", action=argparse.BooleanOptionalAction, default=False,
                   help="add the pitch classes of the last notes, relative to each note's (FeatureSpec.pc_context)")
    p.add_argument("--p-exact", type=float, default=0.35,
                   help="share of training performances with the score's exact timing and order (protocol a); "
                        "the rest are played as a person would (protocol b)")
    p.add_argument("--pct-start", type=float, default=0.1, help="share of steps warming the learning rate up")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N epochs of the --epochs schedule (a first stage before annealing)")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from a checkpoint.pt (fine-tuning, annealing)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--workers", type=int, choices=(0, 1), default=1,
                   help="1: a second process rolls out the next epoch while this one trains (two cores); "
                        "0: all in one process")
    p.add_argument("--out", default="runs/instrument-lstm")
    return p.parse_args(argv)


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
