"""The dependency-free PNG writer and the piano roll."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from coplayer.data.notes import Note, Score
from coplayer.errors import CoplayerError
from coplayer.plot import PALETTE, PNG_SIGNATURE, draw_text, encode_png, piano_roll, piano_roll_png

SATB = ["soprano", "alto", "tenor", "bass"]


def decode_png(data: bytes) -> np.ndarray:
    """Just enough of a PNG reader for what encode_png writes; checks every CRC."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert [t for t, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, 3)


def chorale_like() -> Score:
    notes = []
    for bar in range(4):
        for k, (part, base) in enumerate(zip(SATB, (72, 67, 60, 48))):
            for beat in range(4):
                notes.append(Note(base + (beat + bar) % 3, 80, 0.0, 0.0, bar * 4 + beat, 1.0, part))
    return Score(notes=notes, parts=list(SATB), time_signatures=[(0.0, 4, 4), (8.0, 3, 4)])


def test_encode_png_round_trips():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 13, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(img)), img)
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.uint8))


def test_piano_roll_png_is_valid_with_a_colour_per_part(tmp_path):
    path = tmp_path / "roll.png"
    width, height = piano_roll_png(chorale_like(), path, parts=SATB)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert struct.unpack(">II", data[16:24]) == (width, height)  # IHDR width, height
    img = decode_png(data)
    assert img.shape == (height, width, 3)
    colours = {tuple(int(c) for c in px) for px in img.reshape(-1, 3)}
    for colour in PALETTE[:4]:
        assert colour in colours
    assert len(colours) >= 8  # parts, onset marks, grid, text


def test_notes_land_where_they_belong():
    score = Score(notes=[Note(60, 80, 0, 0, 0.0, 2.0, "a"), Note(72, 80, 0, 0, 2.0, 2.0, "b")],
                  parts=["a", "b"])
    red, blue = (255, 0, 0), (0, 0, 255)
    img = piano_roll(score, colours={"a": red, "b": blue}, px_per_beat=10, px_per_pitch=4)
    ys_red, xs_red = np.nonzero(np.all(img == red, axis=2))
    ys_blue, xs_blue = np.nonzero(np.all(img == blue, axis=2))
    roll_red = ys_red > 30  # below the legend strip
    roll_blue = ys_blue > 30
    assert ys_blue[roll_blue].max() < ys_red[roll_red].min()  # higher pitch drawn higher
    assert xs_blue[roll_blue].min() > xs_red[roll_red].max()  # later note drawn to the right
    assert xs_red[roll_red].max() - xs_red[roll_red].min() + 2 == pytest.approx(20, abs=2)


def test_unassigned_notes_and_empty_scores_draw(tmp_path):
    score = Score(notes=[Note(60, 80, 0, 0, 0.0, 1.0, None)])
    piano_roll_png(score, tmp_path / "loose.png")
    piano_roll_png(Score(), tmp_path / "empty.png")
    assert decode_png((tmp_path / "empty.png").read_bytes()).shape[0] > 0


def test_long_scores_are_squeezed_to_max_width():
    notes = [Note(60 + i % 12, 80, 0, 0, float(i), 1.0, "x") for i in range(2000)]
    img = piano_roll(Score(notes=notes, parts=["x"]), max_width=1500)
    assert img.shape[1] <= 1500


def test_text_is_drawn_and_clipped():
    img = np.full((12, 20, 3), 255, dtype=np.uint8)
    draw_text(img, 15, 8, "Bass~", colour=(0, 0, 0))  # runs off the edge; unknown glyph
    assert (img == 0).any()


def test_unwritable_path_is_a_coplayer_error(tmp_path):
    with pytest.raises(CoplayerError, match="cannot write picture"):
        piano_roll_png(chorale_like(), tmp_path / "no" / "such" / "dir.png")
