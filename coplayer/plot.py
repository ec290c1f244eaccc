"""Piano-roll pictures as PNG files, with numpy and the standard library only.

:func:`piano_roll_png` draws a :class:`~coplayer.data.notes.Score`: time in
beats on x (light lines per beat, darker per bar), pitch on y (black-key
rows shaded, octave lines labelled C2, C3, ...), one colour per part, and a
legend strip on top naming the parts in a built-in 5x7 bitmap font.
:func:`encode_png` is the whole PNG encoder (8-bit RGB, zlib, CRC), so no
plotting library is needed at run time.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from typing import Sequence

import numpy as np

from coplayer.data.notes import Score
from coplayer.errors import CoplayerError

RGB = tuple[int, int, int]

# Tableau 10: distinct for the usual colour-vision deficiencies.
PALETTE: tuple[RGB, ...] = (
    (0xE1, 0x57, 0x59), (0xF2, 0x8E, 0x2B), (0x59, 0xA1, 0x4F), (0x4E, 0x79, 0xA7),
    (0xB0, 0x7A, 0xA1), (0x76, 0xB7, 0xB2), (0xED, 0xC9, 0x48), (0xFF, 0x9D, 0xA7),
    (0x9C, 0x75, 0x5F), (0x4B, 0x4B, 0x4B),
)
NO_PART: RGB = (0xBA, 0xB0, 0xAC)  # notes without a part
WHITE, BLACK_KEY_ROW, BEAT, BAR, OCTAVE, TEXT = 255, 244, 228, 170, 205, 40

MIN_GRID_PX = 4  # fewer pixels between grid lines: no grid
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PlotError(CoplayerError, OSError):
    """A picture cannot be written."""


# -- PNG ------------------------------------------------------------------------


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes (8-bit truecolour, no filter)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"expected a non-empty (H, W, 3) image, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # filter byte 0 (None) per row
    raw[:, 1:] = rgb.reshape(h, 3 * w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    try:
        with open(path, "wb") as f:
            f.write(encode_png(rgb))
    except OSError as exc:
        raise PlotError(f"cannot write picture {os.fspath(path)!r}: {exc.strerror or exc}") from exc


# -- text: a 5x7 bitmap font ------------------------------------------------------

# Five columns per glyph, as hex bytes; bit 0 is the top row, bit 6 the bottom.
_FONT = {
    " ": "0000000000", "!": "00005F0000", "#": "147F147F14", "%": "2313086462",
    "&": "3649552250", "'": "0005030000", "(": "001C224100", ")": "0041221C00",
    "+": "08083E0808", ",": "0050300000", "-": "0808080808", ".": "0060600000",
    "/": "2010080402", ":": "0036360000", "=": "1414141414", "?": "0201510906",
    "_": "4040404040",
    "0": "3E5149453E", "1": "00427F4000", "2": "4261514946", "3": "2141454B31",
    "4": "1814127F10", "5": "2745454539", "6": "3C4A494930", "7": "0171090503",
    "8": "3649494936", "9": "064949291E",
    "A": "7E1111117E", "B": "7F49494936", "C": "3E41414122", "D": "7F4141221C",
    "E": "7F49494941", "F": "7F09090901", "G": "3E4149497A", "H": "7F0808087F",
    "I": "00417F4100", "J": "2040413F01", "K": "7F08142241", "L": "7F40404040",
    "M": "7F020C027F", "N": "7F0408107F", "O": "3E4141413E", "P": "7F09090906",
    "Q": "3E4151215E", "R": "7F09192946", "S": "4649494931", "T": "01017F0101",
    "U": "3F4040403F", "V": "1F2040201F", "W": "3F4038403F", "X": "6314081463",
    "Y": "0708700807", "Z": "6151494543",
    "a": "2054545478", "b": "7F48444438", "c": "3844444420", "d": "384444487F",
    "e": "3854545418", "f": "087E090102", "g": "0C5252523E", "h": "7F08040478",
    "i": "00447D4000", "j": "2040443D00", "k": "7F10284400", "l": "00417F4000",
    "m": "7C04180478", "n": "7C08040478", "o": "3844444438", "p": "7C14141408",
    "q": "081414187C", "r": "7C08040408", "s": "4854545420", "t": "043F444020",
    "u": "3C4040207C", "v": "1C2040201C", "w": "3C4030403C", "x": "4428102844",
    "y": "0C5050503C", "z": "4464544C44",
}
GLYPH_W, GLYPH_H = 5, 7


def _glyph(ch: str) -> np.ndarray:
    """A (7, 5) boolean mask of one character ('?' for unknown ones)."""
    code = _FONT.get(ch, _FONT["?"])
    cols = [int(code[i:i + 2], 16) for i in range(0, 10, 2)]
    return np.array([[(c >> row) & 1 for c in cols] for row in range(GLYPH_H)], dtype=bool)


def text_width(text: str, scale: int = 1) -> int:
    return max(0, len(text) * (GLYPH_W + 1) - 1) * scale


def draw_text(img: np.ndarray, x: int, y: int, text: str, colour: RGB | int = TEXT,
              scale: int = 1) -> None:
    """Draw ``text`` with its top-left corner at (x, y); clipped to the image."""
    h, w, _ = img.shape
    for i, ch in enumerate(text):
        mask = np.kron(_glyph(ch), np.ones((scale, scale), dtype=bool))
        x0 = x + i * (GLYPH_W + 1) * scale
        ys, xs = np.nonzero(mask)
        ys, xs = ys + y, xs + x0
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        img[ys[keep], xs[keep]] = colour


# -- the piano roll ------------------------------------------------------------------


def _pitch_name(pitch: int) -> str:
    return f"C{pitch // 12 - 1}"


def _bar_lines(score: Score, end: float) -> list[float]:
    """Beats (quarter notes) where bars start, from the time signatures."""
    bars: list[float] = []
    sigs = sorted(score.time_signatures) or [(0.0, 4, 4)]
    for i, (start, num, den) in enumerate(sigs):
        stop = sigs[i + 1][0] if i + 1 < len(sigs) else end
        length = num * 4.0 / den
        if length <= 0:
            continue
        beat = start
        while beat < stop - 1e-9:
            bars.append(beat)
            beat += length
    return bars


def piano_roll(score: Score, parts: Sequence[str] | None = None,
               colours: dict[str, RGB] | Sequence[RGB] | None = None, *,
               px_per_beat: float = 16.0, px_per_pitch: int = 5, max_width: int = 4000) -> np.ndarray:
    """The piano roll of ``score`` as an (H, W, 3) uint8 image."""
    parts = list(parts if parts is not None else score.parts)
    parts += sorted({n.part for n in score.notes if n.part is not None} - set(parts))
    colour = _colour_map(parts, colours)
    pitches = [n.pitch for n in score.notes] or [60]
    low, high = max(0, min(pitches) - 2), min(127, max(pitches) + 2)
    end = max(score.end_beats, 1.0)
    px_per_beat = max(0.01, min(px_per_beat, (max_width - 40) / end))

    left, pad, legend_scale = 24, 6, 2
    legend_h = GLYPH_H * legend_scale + 2 * pad
    roll_w = int(math.ceil(end * px_per_beat)) + 1
    roll_h = (high - low + 1) * px_per_pitch
    unassigned = any(n.part is None for n in score.notes)
    legend_w = _legend_width(parts, legend_scale, unassigned)
    width = max(left + roll_w, left + legend_w) + pad
    img = np.full((legend_h + roll_h + pad, width, 3), WHITE, dtype=np.uint8)
    top = legend_h

    def row_y(pitch: int) -> int:  # top pixel row of a pitch
        return top + (high - pitch) * px_per_pitch

    roll = img[top:top + roll_h, left:left + roll_w]
    for p in range(low, high + 1):
        if p % 12 in (1, 3, 6, 8, 10):
            y = row_y(p) - top
            roll[y:y + px_per_pitch] = BLACK_KEY_ROW
    if px_per_beat >= MIN_GRID_PX:  # grid lines closer than that would paint the roll grey
        for beat in range(int(math.floor(end)) + 1):
            roll[:, int(round(beat * px_per_beat))] = BEAT
    for p in range(low, high + 1):
        if p % 12 == 0:
            y = row_y(p) - top + px_per_pitch - 1  # the line under each C
            roll[y] = OCTAVE
            draw_text(img, 2, row_y(p) + px_per_pitch // 2 - GLYPH_H // 2, _pitch_name(p))
    bars = _bar_lines(score, end)
    if len(bars) * MIN_GRID_PX <= roll_w:
        for bar in bars:
            roll[:, min(roll_w - 1, int(round(bar * px_per_beat)))] = BAR

    for note in sorted(score.notes, key=lambda n: n.onset_beats):
        c = np.array(colour.get(note.part, NO_PART), dtype=np.int32)
        x0 = left + int(round(note.onset_beats * px_per_beat))
        x1 = max(x0 + 1, left + int(round(note.end_beats * px_per_beat)))
        y0 = row_y(note.pitch)
        img[y0:y0 + px_per_pitch, x0:x1] = c
        img[y0:y0 + px_per_pitch, x0] = (c * 0.6).astype(np.uint8)  # marks the onset

    _legend(img, parts, colour, left, pad, legend_scale, unassigned)
    return img


def _colour_map(parts: list[str], colours: dict[str, RGB] | Sequence[RGB] | None) -> dict[str, RGB]:
    if isinstance(colours, dict):
        given = dict(colours)
    else:
        given = dict(zip(parts, colours or ()))
    return {p: tuple(given.get(p, PALETTE[i % len(PALETTE)])) for i, p in enumerate(parts)}


def _legend_entries(parts: list[str], colour: dict[str, RGB], unassigned: bool) -> list[tuple[str, RGB]]:
    return [(p, colour[p]) for p in parts] + ([("no part", NO_PART)] if unassigned else [])


def _legend_width(parts: list[str], scale: int, unassigned: bool) -> int:
    size = GLYPH_H * scale
    names = parts + (["no part"] if unassigned else [])
    return sum(size + 4 + text_width(n, scale) + 3 * size for n in names)


def _legend(img: np.ndarray, parts: list[str], colour: dict[str, RGB], x: int, pad: int,
            scale: int, unassigned: bool) -> None:
    size = GLYPH_H * scale
    for name, c in _legend_entries(parts, colour, unassigned):
        img[pad:pad + size, x:x + size] = c
        x += size + 4
        draw_text(img, x, pad, name, scale=scale)
        x += text_width(name, scale) + 3 * size


def piano_roll_png(score: Score, path: str | os.PathLike, parts: Sequence[str] | None = None,
                   colours: dict[str, RGB] | Sequence[RGB] | None = None, **options) -> tuple[int, int]:
    """Draw the piano roll of ``score`` to the PNG file ``path``; returns (width, height).

    ``parts`` orders the legend (default ``score.parts``); ``colours`` maps
    part names to RGB tuples or lists them in part order (default: Tableau
    10).  ``options`` go to :func:`piano_roll` (px_per_beat, px_per_pitch,
    max_width).
    """
    img = piano_roll(score, parts, colours, **options)
    write_png(path, img)
    return img.shape[1], img.shape[0]
