"""The marks that sort the tests into lanes (conftest.py): `make test-fast` leaves out
``jack``, ``torch``, ``subprocess`` and ``slow``, so a test that needs one must carry it.

Each test here collects real test modules in a nested pytest session, as
`make test-fast` does, and reads the marks the rules gave them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = "not jack and not subprocess and not torch and not slow"  # as in the Makefile


class _Marks:
    """A plugin that records each collected test's marks, by node id."""

    def __init__(self) -> None:
        self.by_test: dict[str, set[str]] = {}

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.by_test = {item.nodeid: {m.name for m in item.iter_markers()} for item in session.items}


def collect(*paths: str, markexpr: str | None = None) -> dict[str, set[str]]:
    marks = _Marks()
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", f"--rootdir={REPO}",
            *(["-m", markexpr] if markexpr else []), *(str(REPO / p) for p in paths)]
    assert pytest.main(args, plugins=[marks]) == 0
    return marks.by_test


@pytest.fixture(scope="module")
def marks() -> dict[str, set[str]]:
    """One nested collection for the tests below (each costs a second or two)."""
    return collect("tests/test_io_ports.py", "tests_e2e/test_e2e_jack.py", "tests/test_runner.py")


def test_a_test_taking_the_jack_server_and_every_end_to_end_test_is_jack(marks):
    assert "jack" in marks["tests/test_io_ports.py::test_a_jack_client_counts_the_cycles_jack_skipped_it"]
    e2e = [m for nodeid, m in marks.items() if nodeid.startswith("tests_e2e/")]
    assert e2e and all("jack" in m for m in e2e)
    assert "jack" not in marks["tests/test_io_ports.py::test_sounding_counts_repeated_note_ons_exactly"]


def test_a_test_taking_the_exported_model_is_torch_and_a_plain_one_is_not(marks):
    assert "torch" in marks["tests/test_runner.py::test_step_returns_probabilities_and_reset_restarts"]
    assert "torch" not in marks["tests/test_runner.py::test_softmax_and_log_softmax_agree"]
    assert "subprocess" in marks["tests/test_runner.py::test_runner_never_imports_torch"]


def test_the_fast_lane_does_not_import_a_module_that_imports_torch_at_the_top():
    """(pytest does not ask the hook about a file named on its command line: the
    hook is called here as pytest calls it on the files of a directory.)"""
    spec = importlib.util.spec_from_file_location("root_conftest", REPO / "conftest.py")
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)

    def ignored(name: str, markexpr: str) -> bool:
        return bool(rules.pytest_ignore_collect(REPO / "tests" / name, SimpleNamespace(getoption=lambda *_: markexpr)))

    assert ignored("test_transformer.py", FAST)
    assert not ignored("test_transformer.py", "not slow") and not ignored("test_transformer.py", "torch or jack")
    assert not ignored("test_io_clock.py", FAST)


@pytest.mark.torch
def test_every_test_of_a_module_that_imports_torch_at_the_top_is_torch():
    marks = collect("tests/test_transformer.py", markexpr="not slow")
    assert marks and all("torch" in m for m in marks.values())


def test_a_test_that_starts_python_without_the_subprocess_mark_fails():
    with pytest.raises(pytest.fail.Exception, match=r"mark it @pytest.mark.subprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_a_test_that_asks_for_torch_without_the_torch_mark_fails():
    with pytest.raises(pytest.fail.Exception, match=r"mark it @pytest.mark.torch"):
        pytest.importorskip("torch")
