"""The soak benchmark (benchmarks/soak.py), shortened to 9 s, through a real JACK server."""

from __future__ import annotations

import pytest

from tests.conftest import jack_server  # noqa: F401  (the fixture)
from tests.test_soak import load_soak

pytestmark = [pytest.mark.usefixtures("jack_server"), pytest.mark.subprocess]  # coplayer and its peers run as processes


def test_a_short_soak_reports_every_figure_per_bucket_before_coplayer_exits():
    soak = load_soak()
    result = soak.soak(0.15, rate=40.0, seed=1, bucket_s=3.0, sample_s=0.5, warmup_s=3.0)
    assert result.exit_code == 0, result.output_tail
    assert [b["bucket"] for b in result.buckets] == [0, 1, 2]
    assert result.notes == sum(b["notes"] for b in result.buckets) > 30
    assert 20 < result.events / result.playing_s < 60
    assert all(b["e2e_p99_ms"] is not None and b["floor_p99_ms"] is not None for b in result.buckets[:2])
    assert result.buckets[0]["cpu_pct"] > 0 and result.buckets[0]["xruns"] is not None
    assert result.rss["warm_kb"] > 10_000 and result.thru_rss["end_kb"] > 10_000
    assert len(result.samples) >= 10
    assert result.answers == sum(b["answers"] for b in result.buckets)
    figures = result.figures()
    assert set(figures["targets"]) == {"rss_growth", "p99_last_vs_first", "no_stuck"}
    assert figures["stuck_total"] == sum(result.stuck.values())
    assert [line.split(":")[0] for line in result.exit_lines()] == ["decision latency per note", "answers"]
    lines = result.report()
    assert lines[-1].startswith("targets: RSS growth < 2 MB after warm-up:")
