"""``coplayer demo``: the main job on an embedded input, no keyboard needed.

Replays the bundled piece (a Bach chorale from the held-out test split,
played on one keyboard) through the online instrumenter, note by note in
time order, exactly as ``coplayer arrange`` does; writes ``session.mid``
(the input and one named track per part) and ``roll.png``, and prints the
per-note decision latency.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

from coplayer.data.midi import read_midi, write_midi
from coplayer.engine.stats import LatencyStats, Timed
from coplayer.instrument.arrange import arrange, choose_instrumenter
from coplayer.plot import piano_roll_png

DEMO_PIECE = "demo-chorale.mid"


def demo_piece() -> Path:
    return Path(str(resources.files("coplayer.assets").joinpath(DEMO_PIECE)))


def run_demo(cfg, out_dir: str | Path, model: str | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    score = read_midi(demo_piece())
    instrumenter, name = choose_instrumenter(cfg, model)
    stats = LatencyStats(budget_ms=cfg.latency.budget_ms)
    arranged = arrange(score, Timed(instrumenter, "note_on", stats))
    parts = list(cfg.part_names)
    session = arranged.with_notes(
        [replace(n, part=None) for n in score.notes] + arranged.notes, parts=parts
    )
    write_midi(
        session,
        out / "session.mid",
        programs={p.name: p.program for p in cfg.parts},
        channels={p.name: p.channel - 1 for p in cfg.parts},
        tracks=parts,
    )
    piano_roll_png(arranged, out / "roll.png", parts=parts)
    counts = {p: sum(n.part == p for n in arranged.notes) for p in parts}
    return {"model": name, "notes": len(arranged.notes), "parts": counts,
            "latency": stats, "out": out}
