"""``coplayer train``: run the PyTorch trainers of a source checkout.

Training code lives in ``models/`` beside the package, not inside it: the
runtime installs without torch.  This module finds that folder (an editable
install or a checkout) and hands the arguments to the trainer.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from coplayer.errors import MissingExtraError

TRAINERS = {"instrument": "models.train_instrument"}


def source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def run_training(task: str, argv: list[str]) -> int:
    root = source_root()
    if not (root / "models" / "__init__.py").exists():
        raise MissingExtraError(
            f"training needs a source checkout of coplayer (no models/ beside {root / 'coplayer'}); "
            "clone the repository and run `make train`"
        )
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("training needs torch: pip install -e '.[train]' (or make test)") from exc
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    argv = ["--help" if a == "--help-trainer" else a for a in argv]
    importlib.import_module(TRAINERS[task]).main(argv)
    return 0
