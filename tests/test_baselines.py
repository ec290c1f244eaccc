"""Baseline scorers: zones, closest pitch, the shipped zone asset, the factory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from coplayer.config import Part, load_config
from coplayer.data.notes import Note, Score
from coplayer.errors import CoplayerError, ModelError
from coplayer.instrument.baselines import (
    ClosestPitchScorer,
    ZoneScorer,
    make_instrumenter,
    make_scorer,
    zone_asset_path,
)
from coplayer.instrument.features import Featurizer
from coplayer.instrument.instrumenter import Instrumenter

SATB = ("soprano", "alto", "tenor", "bass")
LSTM_ASSET = Path(__file__).resolve().parents[1] / "coplayer" / "assets" / "instrument-lstm.onnx"


def history(scorer, pitches: dict[str, int]) -> Featurizer:
    """A featurizer whose parts last played ``pitches`` (part name -> pitch)."""
    f = Featurizer(scorer.spec)
    for t, (part, pitch) in enumerate(pitches.items()):
        f.note_on(pitch, 80, float(t))
        f.commit(scorer.parts.index(part))
    return f


def best(scorer, pitch: int, featurizer: Featurizer | None = None) -> str:
    featurizer = featurizer or Featurizer(scorer.spec)
    return scorer.parts[int(np.argmax(scorer.log_probs(pitch, None, featurizer)))]


@pytest.fixture(scope="module")
def zone() -> ZoneScorer:
    return ZoneScorer.load()


# -- zones -----------------------------------------------------------------


def test_shipped_zone_covers_satb(zone):
    assert zone.parts == SATB
    assert zone.spec.n_parts == 4
    assert list(zone.mean) == sorted(zone.mean, reverse=True)  # soprano highest
    assert zone.counts.sum() > 60_000  # the whole train split


@pytest.mark.parametrize("pitch, part", [(79, "soprano"), (72, "soprano"), (65, "alto"),
                                         (57, "tenor"), (50, "bass"), (38, "bass")])
def test_zone_picks_the_likely_range(zone, pitch, part):
    assert best(zone, pitch) == part


def test_zone_is_ordered_and_defined_everywhere(zone):
    choice = [int(np.argmax(zone.log_probs(p))) for p in range(128)]
    # Higher pitches never go to a lower part: zones are contiguous bands.
    assert choice == sorted(choice, reverse=True)
    assert choice[0] == 3 and choice[127] == 0
    for p in (0, 60, 127):
        lp = zone.log_probs(p)
        assert np.all(np.isfinite(lp))
        assert np.exp(lp).sum() == pytest.approx(1.0)


def test_zone_ignores_history(zone):
    f = history(zone, {"bass": 70, "tenor": 71})
    assert np.array_equal(zone.log_probs(70, None, f), zone.log_probs(70))


def _score(rows) -> Score:
    notes = [Note(p, 80, 0.0, 1.0, float(i), 1.0, part) for i, (p, part) in enumerate(rows)]
    return Score(notes=notes, parts=["high", "low"])


def test_fit_counts_and_round_trip(tmp_path):
    score = _score([(70, "high")] * 3 + [(72, "high")] + [(50, "low"), (52, "low"), (54, "low")])
    zone = ZoneScorer.fit([score], source="unit")
    assert zone.parts == ("high", "low")
    assert zone.counts[0, 70] == 3 and zone.counts[1, 52] == 1
    assert zone.mean == pytest.approx([70.5, 52.0])
    assert best(zone, 75) == "high" and best(zone, 45) == "low"
    path = tmp_path / "zone.json"
    zone.save(path)
    again = ZoneScorer.load(path)
    assert again.parts == zone.parts and again.source == "unit"
    assert np.array_equal(again.table, zone.table)


def test_fit_refuses_a_part_without_notes():
    with pytest.raises(ValueError, match="low"):
        ZoneScorer.fit([_score([(70, "high")])], parts=["high", "low"])


def test_bad_zone_file_is_a_model_error(tmp_path):
    path = tmp_path / "zone.json"
    path.write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(ModelError, match="refit"):
        ZoneScorer.load(path)
    with pytest.raises(ModelError, match="cannot read"):
        ZoneScorer.load(tmp_path / "missing.json")


def test_shipped_zone_matches_a_fresh_fit(zone):
    pytest.importorskip("music21", reason="refitting needs the Bach chorale corpus (music21, train extra)")
    from coplayer.data.splits import load_split

    fresh = ZoneScorer.fit(load_split("train"))
    assert fresh.parts == zone.parts
    assert np.array_equal(fresh.counts, zone.counts), "refit: python -m coplayer.instrument.baselines"


def test_zones_from_ranges():
    parts = [Part("flute", low=72, high=96), Part("cello", low=36, high=60)]
    zone = ZoneScorer.from_ranges(parts)
    assert zone.parts == ("flute", "cello")
    assert best(zone, 90) == "flute" and best(zone, 40) == "cello"


# -- closest pitch -----------------------------------------------------------


def test_closest_picks_the_nearest_part(zone):
    closest = ClosestPitchScorer(zone)
    f = history(closest, {"soprano": 72, "alto": 67, "tenor": 60, "bass": 48})
    assert best(closest, 61, f) == "tenor"
    assert best(closest, 66, f) == "alto"
    # The nearest last note wins whatever the zones say.
    f = history(closest, {"soprano": 76, "alto": 70, "tenor": 64, "bass": 53})
    assert best(closest, 55, f) == "bass"
    lp = closest.log_probs(55, None, f)
    assert np.exp(lp).sum() == pytest.approx(1.0)


def test_closest_without_history_uses_the_zone_means(zone):
    closest = ClosestPitchScorer(zone)
    assert best(closest, 71) == "soprano"
    assert best(closest, 51) == "bass"
    # Once a part has played, its last pitch replaces its anchor.
    f = history(closest, {"soprano": 50})
    assert best(closest, 50, f) == "soprano"  # distance 0 beats every anchor


def test_closest_ties_are_broken_by_the_zones(zone):
    closest = ClosestPitchScorer(zone)
    f = history(closest, {"soprano": 73, "alto": 69, "tenor": 40, "bass": 30})
    # 71 is 2 semitones from both soprano and alto; the zones prefer the soprano.
    assert zone.log_probs(71)[0] > zone.log_probs(71)[1]
    assert best(closest, 71, f) == "soprano"
    f = history(closest, {"soprano": 66, "alto": 62, "tenor": 40, "bass": 30})
    assert zone.log_probs(64)[1] > zone.log_probs(64)[0]
    assert best(closest, 64, f) == "alto"


# -- factory -----------------------------------------------------------------


def test_make_scorer_baselines_follow_the_config():
    cfg = load_config()
    for name, kind in (("zone", ZoneScorer), ("closest", ClosestPitchScorer)):
        scorer = make_scorer(name, cfg)
        assert isinstance(scorer, kind)
        assert scorer.parts == cfg.part_names
        Instrumenter(scorer)  # satisfies the Scorer protocol


def test_make_scorer_reorders_or_replaces_zones():
    cfg = load_config()
    reordered = dataclasses.replace(cfg, parts=tuple(reversed(cfg.parts)))
    zone = make_scorer("zone", reordered)
    assert zone.parts == tuple(reversed(SATB))
    assert best(zone, 79) == "soprano"
    other = dataclasses.replace(cfg, parts=(Part("lead", low=60, high=90), Part("pad", low=30, high=60)))
    zone = make_scorer("zone", other)
    assert zone.parts == ("lead", "pad") and best(zone, 80) == "lead"


def test_unknown_model_is_a_model_error():
    with pytest.raises(ModelError, match="no-such-model"):
        make_scorer("no-such-model", load_config())
    with pytest.raises(CoplayerError):
        make_scorer("/nowhere/model.onnx", load_config())


def test_make_instrumenter_takes_penalties_and_ranges_from_config():
    cfg = load_config(overrides=["instrument.mono_penalty=1.5", "instrument.range_penalty=3"])
    inst = make_instrumenter(make_scorer("zone", cfg), cfg)
    assert inst.penalties.mono == 1.5 and inst.penalties.range == 3.0
    assert [(r.name, r.low, r.high) for r in inst.rules] == [(p.name, p.low, p.high) for p in cfg.parts]


@pytest.mark.skipif(not LSTM_ASSET.exists(), reason="the shipped model coplayer/assets/instrument-lstm.onnx "
                    "is not exported yet (python -m export.instrument)")
def test_make_scorer_loads_the_shipped_model():
    cfg = load_config()
    scorer = make_scorer("instrument-lstm", cfg)
    assert scorer.parts == cfg.part_names
    inst = make_instrumenter(scorer, cfg)
    assert inst.note_on(60, 80, 0.0).name in cfg.part_names


def test_zone_asset_is_package_data():
    assert zone_asset_path().name == "zone-baseline.json" and zone_asset_path().is_file()
