"""The progress line of long commands (coplayer/progress.py): stderr, one line redrawn on a
terminal, a plain line now and then into a log."""

from __future__ import annotations

import io

from coplayer.progress import EVERY_S, Progress, clock_text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_time_left_scales_the_elapsed_time_by_the_weight_still_to_do():
    clock = Clock()
    progress = Progress(4, "pieces", total_weight=100, stream=io.StringIO(), clock=clock)
    clock.now = 30.0
    progress.advance(25)
    assert progress.line() == "1/4 pieces, 0:30 elapsed, about 1:30 left"
    clock.now = 3725.0
    progress.done, progress.weight_done = 4, 100
    assert progress.line("bach") == "4/4 pieces, 1:02:05 elapsed, done (bach)"
    assert clock_text(59.6) == "1:00"


def test_on_a_terminal_one_line_is_redrawn_and_ended_once():
    clock, stream = Clock(), Terminal()
    progress = Progress(3, "pieces", stream=stream, clock=clock)
    for _ in range(3):
        clock.now += 1.0
        progress.advance()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    *_, before, last = text[:-1].split("\r")
    assert last.rstrip() == "3/3 pieces, 0:03 elapsed, done" and len(last) == len(before)  # blanks the rest


def test_into_a_log_a_plain_line_now_and_then_and_at_the_end():
    clock, stream = Clock(), io.StringIO()
    progress = Progress(100, "pieces", stream=stream, clock=clock)
    for _ in range(100):
        clock.now += EVERY_S / 10  # ten units per line's interval
        progress.advance()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("1/100 pieces") and lines[-1].startswith("100/100 pieces")
    assert 10 <= len(lines) <= 12
