"""The test lanes: every test carries the marks that say what it needs.

``make test`` runs everything (CI does, through .ci/run); ``make test-fast``
leaves out the marks below.  The marks are registered in pyproject.toml and
put on by rules here, so a test added later is marked without anyone
remembering:

``jack``
    needs a JACK server: takes the ``jack_server`` fixture (tests/conftest.py)
    or lives in tests_e2e/.
``torch``
    needs torch (the ``train`` extra): its module imports torch at the top,
    or it takes a fixture that exports a model with torch (``exported``);
    else the mark is written on the test, and a test that asks for torch
    (``pytest.importorskip("torch")``) without it fails and says so.
``subprocess``
    starts Python or coplayer as a child process (seconds of start-up each).
    No rule can see that before the test runs, so the mark is written on the
    test; a test that starts one without it fails and says which mark to add.
``slow``
    a plain test that takes seconds on its own (measured with --durations),
    written on the test.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

JACK_FIXTURES = {"jack_server"}
TORCH_FIXTURES = {"exported"}  # tests/conftest.py and tests/test_gen_model.py: a tiny model exported with torch
E2E_DIR = Path(__file__).resolve().parent / "tests_e2e"


def needs(item: pytest.Item) -> set[str]:
    """The marks the rules give ``item``."""
    fixtures = set(getattr(item, "fixturenames", ()))
    marks = set()
    if fixtures & JACK_FIXTURES or E2E_DIR in Path(item.path).resolve().parents:
        marks.add("jack")
    module = getattr(item, "module", None)
    if fixtures & TORCH_FIXTURES or isinstance(getattr(module, "torch", None), types.ModuleType):
        marks.add("torch")
    return marks


LANE_MARKS = ("jack", "torch", "subprocess", "slow")
TORCH_AT_TOP = re.compile(r"^(import torch\b|from torch\b|torch = pytest\.importorskip\(\"torch\")", re.M)


def always_deselected(config: pytest.Config, mark: str) -> bool:
    """Whether ``-m`` leaves out every test with ``mark``, whatever its other lane marks."""
    expr = config.getoption("markexpr", "")
    if not expr:
        return False
    try:
        from _pytest.mark.expression import Expression  # pytest's own parser of -m
    except ImportError:  # pragma: no cover - a pytest that moved it: collect, then deselect
        return False
    compiled = Expression.compile(expr)
    others = [m for m in LANE_MARKS if m != mark]
    return not any(compiled.evaluate(lambda name, extra=extra: name == mark or name in extra)
                   for n in range(len(others) + 1) for extra in itertools.combinations(others, n))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A module that imports torch at the top holds only ``torch`` tests: when
    they are all left out, it is not imported (torch takes ~4 s of CPU to import)."""
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_") \
            and always_deselected(config, "torch") and TORCH_AT_TOP.search(collection_path.read_text()):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in sorted(needs(item) - {m.name for m in item.iter_markers()}):
            item.add_marker(name)


def _starts_python(args) -> bool:
    argv = args.split() if isinstance(args, (str, bytes)) else list(args)
    if not argv:
        return False
    program = os.fsdecode(argv[0])
    name = os.path.basename(program)
    return program == sys.executable or name.startswith("python") or name == "coplayer"


def _undeclared(request: pytest.FixtureRequest, mark: str, what: str) -> None:
    pytest.fail(f"{request.node.nodeid} {what}: mark it @pytest.mark.{mark} "
                "(make test-fast leaves those out)", pytrace=False)


@pytest.fixture(autouse=True)
def _needs_are_declared(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Fail a test that starts Python or coplayer without the ``subprocess`` mark,
    or asks for torch (``pytest.importorskip("torch")``) without the ``torch`` mark."""
    if not request.node.get_closest_marker("subprocess"):
        start = subprocess.Popen.__init__

        def checked_start(self, args, *rest, **kwargs):
            if _starts_python(args):
                _undeclared(request, "subprocess", f"starts {args if isinstance(args, str) else args[0]}")
            start(self, args, *rest, **kwargs)

        monkeypatch.setattr(subprocess.Popen, "__init__", checked_start)
    if not request.node.get_closest_marker("torch"):
        importorskip = pytest.importorskip

        def checked_importorskip(modname, *rest, **kwargs):
            if modname.split(".")[0] == "torch":
                _undeclared(request, "torch", "needs torch")
            return importorskip(modname, *rest, **kwargs)

        monkeypatch.setattr(pytest, "importorskip", checked_importorskip)
