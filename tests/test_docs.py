"""The README and docs/ agree with the code: the figures quoted for the
shipped models are their model cards', the latency budget is described as
computed, and every relative link leads to a file (and heading) that exists.

When a retrained model's card changes, these fail until the README and
docs/results.md quote the new figures."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

from coplayer.engine.engine import _StepTimes

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "coplayer" / "assets"
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def card(name: str) -> dict:
    return json.loads((ASSETS / f"{name}.json").read_text())


def row(page: Path, first_cell: str) -> list[str]:
    """The cells of the one table row of ``page`` whose first cell starts
    with ``first_cell``, without bold markers."""
    rows = [line for line in page.read_text().splitlines()
            if line.startswith("|") and line.strip("| ").replace("*", "").startswith(first_cell)]
    assert len(rows) == 1, f"{page.name}: expected one table row starting {first_cell!r}, found {len(rows)}"
    return [cell.strip().replace("*", "") for cell in rows[0].strip().strip("|").split("|")]


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB"


@pytest.mark.parametrize("page", [README, RESULTS], ids=lambda p: p.name)
def test_instrument_lstm_accuracies_are_the_cards(page):
    test = card("instrument-lstm")["metrics"]["test"]
    cells = row(page, "instrument-lstm")
    assert cells[1:3] == [percent(test["accuracy_a"]), percent(test["accuracy_b"])]
    assert f"{test['notes']:,} notes" in page.read_text()


def test_instrument_lstm_size_is_the_cards():
    lstm = card("instrument-lstm")
    text = README.read_text()
    h = lstm["hparams"]
    assert f"{h['layers']}x{h['hidden']} LSTM, {megabytes(lstm['size_bytes'])}" in text


@pytest.mark.parametrize("page", [README, RESULTS], ids=lambda p: p.name)
def test_continue_transformer_chorale_nll_is_the_cards(page):
    nll = card("continue-transformer")["metrics"]["test_nll_bits_per_event_by_source"]["bach"]
    cells = row(page, "NLL, bits per event")
    assert cells[3] == f"{nll:.3f}"  # chorales: markov, markov-live, transformer


def test_continue_transformer_size_is_the_cards():
    tf = card("continue-transformer")
    text = README.read_text()
    assert f"{tf['hparams']['layers']}-layer causal transformer" in text
    assert f"{tf['parameters'] / 1e6:.2f} M parameters" in text
    assert megabytes(tf["size_bytes"]) in text


def test_the_budget_is_described_as_computed():
    described = re.search(r"the\s+(\d+)th\s+percentile\s+of\s+its\s+last\s+(\d+)\s+steps", README.read_text())
    assert described, "README: the latency budget's estimate is not described"
    pct, window = int(described[1]), int(described[2])
    assert inspect.signature(_StepTimes).parameters["size"].default == window
    steps = _StepTimes()
    times = list(range(1, window + 1))
    for t in times + times:  # the estimate is refreshed every few steps: each window holds every time once
        steps.add(t, at_ns=0)
    assert steps.estimate_ns == np.percentile(times, pct, method="lower")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def _links(page: Path) -> list[str]:
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text())
            if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_to_existing_files_and_headings(page):
    links = _links(page)
    if page == README:
        assert any(link.startswith("docs/") for link in links), "README links nowhere into docs/"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_file(), f"{page.name}: {link} -> {target} does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: {link}: no heading #{anchor} in {target.name}"
