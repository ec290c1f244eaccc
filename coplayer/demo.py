"""``coplayer demo``: the live engine on a bundled piece, no keyboard needed.

The bundled piece is replayed as if played live: a feeder thread delivers
its messages at their real times (divided by ``--speed``) into an input
port's callback path, and the same :class:`~coplayer.engine.engine.Engine`
as ``coplayer run`` instruments every note within the latency budget and,
where call and response is available, answers at phrase ends.  The parts
play to virtual MIDI ports where the platform has them (a DAW can listen),
else to in-memory ports (one line says why).  The clock runs ``speed``
times faster too, so phrase ends and answers keep their place in the bar.

Writes ``DIR/session.mid`` (the input and one named track per part) and
``DIR/roll.png`` (the parts' piano roll, coloured by part) and reports the
decision latency.  Needs the runtime dependencies only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from coplayer.data.midi import read_midi
from coplayer.engine.live import Feeder, Live, MemoryPorts, RealPorts, build_live, file_messages, wait_for_end
from coplayer.engine.session import prepare_folder
from coplayer.engine.view import responses_text, summary_line
from coplayer.errors import ConfigError
from coplayer.io.clock import InternalClock
from coplayer.io.ports import PortError
from coplayer.plot import piano_roll_png

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config

log = logging.getLogger(__name__)

DEMO_PIECES = ("demo-solo.mid", "demo-chorale.mid")  # the first one shipped is played
MAX_CLOCK_BPM = 1000


def demo_piece() -> Path:
    assets = resources.files("coplayer.assets")
    for name in DEMO_PIECES:
        if assets.joinpath(name).is_file():
            return Path(str(assets.joinpath(name)))
    raise FileNotFoundError(f"no demo piece in coplayer/assets (expected one of {', '.join(DEMO_PIECES)})")


@dataclass
class DemoResult:
    model: str
    piece: str
    backend: str
    stats: dict
    session: Path
    roll: Path

    def report(self) -> list[str]:
        s = self.stats
        counts = ", ".join(f"{p} {n}" for p, n in s["parts"].items())
        lines = [f"instrumented {s['count']} notes of {self.piece} with {self.model} ({self.backend}): {counts}"]
        if s["responses"]:
            lines.append(f"answers: {responses_text(s['responses'])}")
        lines.append(f"wrote {self.session} and {self.roll}")
        lines.append(f"decision latency per note: {summary_line(s)}")
        return lines


def _demo_config(cfg: "Config", bpm: float) -> "Config":
    """The piece's tempo, the internal clock, no OSC (no UDP port is taken)."""
    tempo = dataclasses.replace(cfg.tempo, bpm=min(300.0, max(20.0, bpm)), source="internal")
    return dataclasses.replace(cfg, tempo=tempo, osc=dataclasses.replace(cfg.osc, enabled=False))


def _build(cfg: "Config", clock: InternalClock, model: str | None, virtual: bool) -> tuple[Live, str]:
    """The engine on virtual ports where they exist, else on memory ports."""
    if virtual and cfg.midi.backend != "memory":
        try:
            live = build_live(cfg, RealPorts(cfg.midi.backend, cfg.midi.api, cfg.midi.client_name),
                              input_maker=MemoryPorts(), clock=clock, model=model)
            return live, "virtual MIDI ports"
        except (PortError, ImportError) as exc:
            log.warning("demo: no virtual MIDI ports (%s); playing into memory ports", exc)
    return build_live(cfg, MemoryPorts(), clock=clock, model=model), "memory ports"


def run_demo(cfg: "Config", out_dir: str | Path, model: str | None = None, *, speed: float = 1.0,
             virtual: bool = True) -> DemoResult:
    """Replay the demo piece through the engine; write session.mid and roll.png."""
    piece = demo_piece()
    bpm = read_midi(piece).tempo.bpm_at(0)
    if bpm * speed > MAX_CLOCK_BPM:
        raise ConfigError(f"--speed {speed:g}: the demo would run at {bpm * speed:.0f} BPM; "
                          f"at most {MAX_CLOCK_BPM // bpm:.0f} for this piece")
    out = prepare_folder(out_dir, "--out")  # before playing: one line if the files could not be written
    live, backend = _build(_demo_config(cfg, bpm), InternalClock(bpm * speed), model, virtual)
    feeder = Feeder(file_messages(piece), live.input._deliver, speed)
    try:
        live.start()
        feeder.start()
        wait_for_end(live, threading.Event(), feeder, None)
    finally:
        feeder.stop()
        live.stop()
    return _write(live, out, bpm, piece.name, backend)


def _write(live: Live, out: Path, bpm: float, piece: str, backend: str) -> DemoResult:
    engine = live.engine
    parts = list(engine.cfg.part_names)
    session = engine.write_session(out / "session.mid", bpm=bpm)
    score = engine.recorder.score(parts, bpm)
    roll = out / "roll.png"
    piano_roll_png(score.with_notes([n for n in score.notes if n.part is not None]), roll, parts=parts)
    return DemoResult(live.model, piece, backend, engine.stats(), session, roll)
