"""Export parity: the PyTorch model and its ONNX step agree, note by note, on real music.

Both run side by side over performances of test pieces (protocol ``b``: a
person playing).  One featurizer serves both and takes the PyTorch model's
decision (the argmax of its logits) as history, so both see the same
inputs at every note.  The ONNX side runs through the runtime's
:class:`~coplayer.instrument.runner.OnnxModel`, i.e. the path live play uses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from coplayer.data.notes import Score
from coplayer.instrument.features import Featurizer, replay
from coplayer.instrument.protocols import Performance, perform
from coplayer.instrument.runner import OnnxModel

ATOL = 1e-4


@dataclass
class ParityReport:
    pieces: int = 0
    notes: int = 0
    max_abs_diff: float = 0.0
    argmax_mismatches: int = 0
    atol: float = ATOL
    protocol: str = "b"
    seed: int = 0

    @property
    def ok(self) -> bool:
        return self.notes > 0 and self.max_abs_diff <= self.atol and self.argmax_mismatches == 0

    def add(self, expected: np.ndarray, got: np.ndarray) -> None:
        self.notes += 1
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(expected - got).max()))
        self.argmax_mismatches += int(np.argmax(expected) != np.argmax(got))

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"parity {verdict}: {self.notes} notes of {self.pieces} pieces (protocol {self.protocol}), "
                f"max |logit diff| {self.max_abs_diff:.2e} (atol {self.atol:g}), "
                f"{self.argmax_mismatches} argmax mismatches")


def check_parity(model: torch.nn.Module, onnx: OnnxModel, scores: list[Score], *,
                 seed: int = 0, atol: float = ATOL) -> ParityReport:
    """Stream ``scores`` through ``model.step`` and ``onnx`` together; compare logits."""
    model.eval()
    report = ParityReport(atol=atol, seed=seed)
    rng = np.random.default_rng(seed)
    with _one_thread():
        for score in scores:
            _stream(model, onnx, perform(score, list(onnx.parts), report.protocol, rng), report)
            report.pieces += 1
    return report


@contextmanager
def _one_thread():
    """Torch on one thread: a single note is too small to share, and idle threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _stream(model: torch.nn.Module, onnx: OnnxModel, perf: Performance, report: ParityReport) -> None:
    onnx.reset()
    state = model.initial_state(1)

    def decide(index: int, feats: np.ndarray) -> int:
        nonlocal state
        pitch = int(perf.pitches[index])
        logits, *state = model.step(torch.tensor([pitch]), torch.from_numpy(feats)[None], *state)
        expected = logits[0].numpy()
        report.add(expected, onnx.logits(pitch, feats))
        return int(np.argmax(expected))

    for _ in replay(Featurizer(onnx.spec), perf.events, perf.pitches, perf.velocities, decide):
        pass
