"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.tiny_models import NO_TORCH, TINY_LSTM, write_tiny_run

# --- JACK server (tests that need real MIDI ports) ---------------------------
#
# Tests that need real ports take the ``jack_server`` fixture.  It uses a JACK
# server that already runs, else starts ``jackd`` with the dummy driver for
# the session and stops it (by its PID) at the end.  Where none can run the
# tests skip and say why; with the environment variable CI set they fail
# instead, so that CI cannot pass by silently skipping them.
#
# The server is asked for real-time scheduling first: without it, on a busy
# 2-core machine, the dozen JACK clients of one end-to-end test (coplayer's
# ports and the test's) wake too late and JACK reports xruns.  Where the
# user may not use real-time scheduling, jackd says so and runs without it;
# if it does not start at all, ``--no-realtime`` is tried.

DUMMY = ["-d", "dummy", "-r", "48000", "-p", "64"]
JACKD_COMMANDS = (["jackd", "-R", "-P", "70", *DUMMY], ["jackd", "--no-realtime", *DUMMY])


def jack_unavailable(reason: str) -> None:
    """Skip, or fail on CI, because a capability is missing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: these tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


def _jack_running() -> bool:
    check = subprocess.run(["jack_wait", "-c"], capture_output=True, text=True, timeout=10)
    return check.stdout.strip() == "running"


@pytest.fixture(scope="session")
def jack_server(tmp_path_factory):
    """A running JACK server (dummy driver, 48 kHz, 64 frames per period)."""
    try:
        import rtmidi
    except ImportError:
        jack_unavailable("python-rtmidi is not installed")
    if rtmidi.API_UNIX_JACK not in rtmidi.get_compiled_api():
        jack_unavailable("python-rtmidi was built without the JACK API")
    if shutil.which("jack_wait") and _jack_running():
        yield None
        return
    if not (shutil.which("jackd") and shutil.which("jack_wait")):
        jack_unavailable("no JACK server: install jackd2 (jackd and jack_wait not found)")
    log_dir = tmp_path_factory.mktemp("jack")
    failures = []
    for i, command in enumerate(JACKD_COMMANDS):
        proc, why = _start_jackd(command, log_dir / f"jackd-{i}.log")
        if why is None:
            break
        failures.append(f"`{' '.join(command)}` did not start ({why})")
    else:
        jack_unavailable("no JACK server: " + "; ".join(failures))
    time.sleep(0.2)  # let the dummy driver settle before the first client
    yield proc
    _stop(proc)


def _start_jackd(command: list[str], log_path: Path) -> tuple[subprocess.Popen | None, str | None]:
    """Start ``command``; (the process or None if another server won the race, None) or (None, why not)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started = subprocess.run(["jack_wait", "-w", "-t", "10"], capture_output=True, timeout=20).returncode == 0
    if proc.poll() is not None:  # exited: another session's server won the race, or jackd failed
        proc = None
    if not started:
        _stop(proc)
        return None, " / ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
    return proc, None


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# --- a tiny instrumentation model, exported once per session -----------------
#
# Exporting runs the real exporter and its parity check (needs torch, the
# ``train`` extra); several test modules share the one export.

@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """A tiny random LSTM exported (and parity-checked on one piece): the .onnx path."""
    pytest.importorskip("torch", reason=NO_TORCH)
    from coplayer.data.splits import load_split
    from export.instrument import export, load_run

    root = tmp_path_factory.mktemp("exported")
    run = load_run(write_tiny_run(root / "run", **TINY_LSTM))
    report = export(run, "tiny", root, {}, load_split("test")[:1])
    assert report.ok, report
    return root / "tiny.onnx"


