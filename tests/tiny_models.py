"""Tiny randomly initialised instrumentation models for tests (need torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coplayer.data.corpus import SATB
from coplayer.instrument.features import Featurizer, FeatureSpec

NO_TORCH = "exporting the test model needs torch (pip install 'coplayer[train]')"


def write_tiny_run(run_dir: Path, kind: str = "lstm", **hparams) -> Path:
    """A training run directory holding a small randomly initialised model."""
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    from export.instrument import model_class

    spec = FeatureSpec(n_parts=len(SATB))
    names = Featurizer(spec).feature_names()
    torch.manual_seed(0)
    model = model_class(kind)(len(names), len(SATB), **hparams)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hparams": model.hparams, "kind": model.kind,
                "epoch": 1, "valid": {"a": 0.25, "b": 0.25}}, run_dir / "checkpoint.pt")
    encoding = {"parts": list(SATB), "features": spec.to_dict(), "feature_names": names,
                "data": {"corpus": "test"}}
    (run_dir / "encoding.json").write_text(json.dumps(encoding))
    (run_dir / "train-args.json").write_text(json.dumps({"model": kind, **hparams}))
    return run_dir


TINY_LSTM = dict(hidden=16, layers=1, dropout=0.0)
