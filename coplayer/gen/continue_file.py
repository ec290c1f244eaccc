"""``coplayer continue``: a MIDI file followed by coplayer's answer to it.

The output holds the input unchanged (every note, in its track, on its
channel; the tempo map and time signatures) followed by a continuation of
``bars`` bars that starts on the first barline after the input's last onset,
in the input's meter and tempo.

The model needs each note's part.  When the input's tracks are named like
the model's parts they are used as written; a single-track melody (one note
per onset) becomes the model's top part (``soprano``); anything else is
instrumented first, as ``coplayer arrange`` would (the configured
instrumentation model, falling back like it).  Notes on the drum channel
are kept in the output but never heard by the model.

Models (``--model``): ``markov`` (the corpus counts), ``markov-live`` (the
Continuator: the counts plus what it learns from the input), a shipped
continuation model name, or an ``.onnx`` path.  By default the configured
``continuation.model``; when it cannot load, the configured fallback
(``markov``: the Continuator, ``markov-live``) with a one-line warning.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from coplayer.config import MAX_CONTINUE_BARS
from coplayer.data.midi import check_not_input, read_midi, write_midi
from coplayer.data.notes import Note, Score
from coplayer.errors import ConfigError, MidiFileError, ModelError
from coplayer.gen.encoding import Encoding
from coplayer.gen.markov import MarkovModel
from coplayer.gen.sampler import Controls, Key, Response, Sampler

if TYPE_CHECKING:  # pragma: no cover
    from coplayer.config import Config
    from coplayer.gen.model import EventModel

log = logging.getLogger(__name__)

MARKOV_NAMES = ("markov", "markov-live")
MAX_CONTEXT = 512  # events of the input the model hears (its most recent ones)


# -- models -----------------------------------------------------------------------


def load_event_model(name: str) -> "EventModel":
    """``markov``, ``markov-live``, a shipped continuation model's name or an .onnx path."""
    if name in MARKOV_NAMES or name == "continue-markov":
        return MarkovModel.load(adapt=name == "markov-live")
    if name.endswith(".npz"):
        return MarkovModel.load(name)
    try:
        from coplayer.gen.runner import OnnxEventModel
    except ImportError as exc:  # pragma: no cover - a partial install
        raise ModelError(f"cannot run continuation model {name!r}: {exc}") from exc
    return OnnxEventModel(name)


def choose_event_model(cfg: "Config", model: str | None = None) -> tuple["EventModel", str]:
    """``model`` (no fallback), else the configured model, falling back with a warning."""
    if model is not None:
        return load_event_model(model), model
    name = cfg.continuation.model
    try:
        return load_event_model(name), name
    except ModelError as exc:
        fallback = cfg.continuation.fallback
        if fallback == "none":
            raise ModelError(f"{exc} (continuation.fallback is none: no answer)") from exc
        try:
            fallback_model = load_event_model("markov-live")
        except ModelError as second:  # one line for both: the caller says what follows
            raise ModelError(f"{exc}; its fallback cannot load either: {second}") from second
        log.warning("%s; answering with the fallback markov-live (the Continuator)", exc)
        return fallback_model, "markov-live"


def respond(sampler: Sampler, events: np.ndarray, pos: np.ndarray, bars: int, **kwargs) -> Response:
    """``sampler.generate``; a live-learning Markov model first learns the call.

    The Continuator learns the player's phrase, never its own answer: while
    the answer is generated, the model does not adapt.
    """
    model = sampler.model
    if isinstance(model, MarkovModel) and model.adapt:
        model.forget()
        model.learn(events, pos)
        model.adapt = False
        try:
            return sampler.generate(events, pos, bars, **kwargs)
        finally:
            model.adapt = True
    return sampler.generate(events, pos, bars, **kwargs)


# -- the input's parts and meter ------------------------------------------------------


@dataclass
class Heard:
    """The input as the model hears it: notes with the model's parts, and where each part plays."""

    notes: list[Note]
    how: str
    tracks: dict[str, tuple[str, int]]  # model part -> (input track, channel) it continues in


def context_notes(score: Score, encoding: Encoding, cfg: "Config") -> Heard:
    """The input's notes with the model's part names, and how they got them."""
    drum = cfg.midi.drum_channel
    notes = [n for n in score.notes if drum is None or n.channel != drum - 1]
    if not notes:
        raise MidiFileError("the input has no notes to continue (drum-channel notes are not heard)")
    parts = {n.part for n in notes}
    if parts <= set(encoding.parts):
        first = {}
        for n in notes:
            first.setdefault(n.part, (n.part, n.channel))
        return Heard(notes, "parts as written", first)
    onsets = Counter(round(n.onset_beats * encoding.ticks_per_beat) for n in notes)
    if len(parts) == 1 and max(onsets.values()) == 1:
        top = encoding.parts[0]
        return Heard([replace(n, part=top) for n in notes], f"melody played by {top}",
                     {top: (notes[0].part, notes[0].channel)})
    from coplayer.instrument.arrange import arrange, choose_instrumenter

    instrumenter, name = choose_instrumenter(cfg)
    unknown = [p for p in instrumenter.parts if p not in encoding.parts]
    if unknown:
        raise ModelError(f"the input is instrumented for the configured parts {list(instrumenter.parts)}, "
                         f"but the continuation model plays {list(encoding.parts)}; configure those parts")
    arranged = arrange(score.with_notes(notes), instrumenter)
    return Heard(arranged.notes, f"instrumented with {name}", {})


def meter_at(score: Score, beat: float) -> tuple[int, int, float]:
    """(numerator, denominator, beat of the time signature's first barline) at ``beat``."""
    current = (0.0, 4, 4)
    for ts in score.time_signatures:
        if ts[0] <= beat + 1e-9:
            current = ts
    return current[1], current[2], current[0]


# -- the command ------------------------------------------------------------------


@dataclass
class Continuation:
    """What ``coplayer continue`` did."""

    score: Score
    added: list[Note]
    model: str
    start_beat: float
    bars: int
    seed: int
    key: Key | None
    parts_from: str
    seconds: float
    per_part: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        counts = ", ".join(f"{p} {n}" for p, n in self.per_part.items()) or "no notes"
        key = f", key {self.key}" if self.key else ""
        return (f"continued with {self.model} ({self.parts_from}): {len(self.added)} notes in {self.bars} bars "
                f"from beat {self.start_beat:g} ({counts}; seed {self.seed}{key}; {self.seconds * 1000:.0f} ms)")


def continue_score(score: Score, cfg: "Config", *, bars: int | None = None, temperature: float | None = None,
                   seed: int | None = None, parts: Sequence[str] | None = None,
                   model: str | None = None) -> Continuation:
    """``score`` followed by a continuation (the input's notes are not modified)."""
    if not score.notes:
        raise MidiFileError("the input has no notes to continue")
    bars = bars or cfg.continuation.response_bars
    if not 1 <= bars <= MAX_CONTINUE_BARS:
        raise ConfigError(f"--bars {bars}: a continuation is 1 to {MAX_CONTINUE_BARS} bars long; "
                          "continue the output again for more")
    event_model, name = choose_event_model(cfg, model)
    enc = event_model.encoding
    heard = context_notes(score, enc, cfg)
    notes = heard.notes
    if parts:
        unknown = [p for p in parts if p not in enc.parts]
        if unknown:
            raise ConfigError(f"--parts: {', '.join(unknown)} not among the model's parts "
                              f"({', '.join(enc.parts)})")
    if seed is None:
        seed = cfg.continuation.seed
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**32))
    controls = Controls.from_config(cfg, temperature=temperature, seed=seed,
                                    parts=tuple(parts) if parts else None)
    if controls.parts is not None and not set(controls.parts) & set(enc.parts):
        controls.set(parts=None)
    last = max(n.onset_beats for n in notes)
    num, den, anchor = meter_at(score, last)
    events, pos, bar_ticks = encode_context(notes, enc, num, den, anchor)
    events, pos = events[-MAX_CONTEXT:], pos[-MAX_CONTEXT:]
    bpm = score.tempo.bpm_at(last)
    response = respond(Sampler(event_model, controls), events, pos, bars, start="bar", bar_ticks=bar_ticks, bpm=bpm)
    tpb = enc.ticks_per_beat
    start_beat = (round(last * tpb) + response.start) / tpb
    added = place(response.notes, start_beat, heard, cfg)
    new_tracks = [p for p in enc.parts if p not in score.parts and any(n.part == p for n in added)]
    out = score.with_notes(list(score.notes) + added, parts=list(score.parts) + new_tracks)
    out.fill_seconds()
    counts = Counter(n.part for n in response.notes)
    return Continuation(out, added, name, start_beat, bars, seed, response.key, heard.how, response.seconds,
                        {p: counts[p] for p in enc.parts if counts[p]})


def encode_context(notes: list[Note], enc: Encoding, num: int, den: int,
                   anchor: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(events, pos, ticks per bar) of notes, bars counted from ``anchor`` in meter num/den."""
    from coplayer.gen.data import bar_ticks as ticks_in_bar, encode_arrays

    bar_beats = num * 4 / den
    index = {p: i for i, p in enumerate(enc.parts)}
    events, pos = encode_arrays(
        np.array([n.onset_beats for n in notes]), np.array([n.duration_beats for n in notes]),
        np.array([n.pitch for n in notes]), np.array([index[n.part] for n in notes]),
        np.array([n.velocity for n in notes]), enc, (num, den), (-anchor) % bar_beats)
    return events, pos, ticks_in_bar((num, den), enc)


def place(response: list[Note], start_beat: float, heard: Heard, cfg: "Config") -> list[Note]:
    """Response notes at their place in the output: beats, tracks and channels.

    A part the input already plays continues in that track on its channel
    (a melody's, for the top part); other parts get a track of their name on
    the part's configured channel.
    """
    channels = {p.name: p.channel - 1 for p in cfg.parts}
    placed = []
    for n in response:
        track, channel = heard.tracks.get(n.part, (n.part, channels.get(n.part, 0)))
        placed.append(replace(n, onset_beats=start_beat + n.onset_beats, part=track, channel=channel))
    return placed


def continue_file(src: str | os.PathLike, dst: str | os.PathLike, cfg: "Config", **options) -> Continuation:
    """Read ``src``, continue it (see :func:`continue_score`), write ``dst``."""
    check_not_input(src, dst)
    score = read_midi(src)
    t0 = time.perf_counter()
    result = continue_score(score, cfg, **options)
    new_tracks = [p for p in result.score.parts if p not in score.parts]
    programs = {p.name: p.program for p in cfg.parts if p.name in new_tracks}
    write_midi(result.score, dst, programs=programs)
    log.debug("continue took %.0f ms", (time.perf_counter() - t0) * 1000)
    return result
