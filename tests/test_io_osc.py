"""OSC: the routing table, the UDP server and client, and real liblo peers.

The oscsend/oscdump tests need liblo-tools; they skip without it and fail
instead when CI is set.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import build_msg
from pythonosc.udp_client import SimpleUDPClient

from coplayer.io.osc import IN_SIGNATURES, OscControl, OscError, OscOut, OscServer


class Recorder:
    """Handlers for every documented address, recording their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.event = threading.Event()

    def handler(self, name: str):
        def fn(*args):
            self.calls.append((name, *args))
            self.event.set()
        return fn

    def handlers(self) -> dict:
        return {address: self.handler(address.split("/")[-1]) for address in IN_SIGNATURES}

    def wait(self, count: int, timeout: float = 3.0) -> list[tuple]:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count and time.monotonic() < deadline:
            self.event.wait(0.01)
            self.event.clear()
        return self.calls


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def control(rec):
    return OscControl(rec.handlers())


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not found: install liblo-tools"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: these tests must run, not skip)", pytrace=False)
        pytest.skip(reason)
    return path


def type_tags(dgram: bytes) -> str:
    return re.search(rb"\x00,(\w*)\x00", dgram).group(1).decode()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the routing table -----------------------------------------------------


def test_handlers_get_arguments_converted_to_the_documented_types(control, rec):
    assert control.dispatch("/coplayer/temperature", [1])  # an int where a float is expected
    assert control.dispatch("/coplayer/mode", ["respond"])
    assert control.dispatch("/coplayer/part/alto/mute", [1.0])  # Pd sends every number as a float
    assert control.dispatch("/coplayer/part/bass/solo", [True])
    assert control.dispatch("/coplayer/key", ["F# minor"])
    assert control.dispatch("/coplayer/panic")
    assert rec.calls == [
        ("temperature", 1.0), ("mode", "respond"), ("mute", "alto", 1), ("solo", "bass", 1),
        ("key", "F# minor"), ("panic",),
    ]
    assert isinstance(rec.calls[0][1], float) and isinstance(rec.calls[2][2], int)
    assert control.handled == 6 and not control.ignored


def test_a_button_fires_on_press_and_not_on_release(control, rec):
    assert control.dispatch("/coplayer/trigger", [1.0])
    assert not control.dispatch("/coplayer/trigger", [0.0])
    assert rec.calls == [("trigger",)]
    assert not control.ignored


@pytest.mark.parametrize("address, args, reason", [
    ("/coplayer/temperature", ["hot"], "bad arguments"),
    ("/coplayer/temperature", [], "bad arguments"),
    ("/coplayer/temperature", [0.5, 0.7], "bad arguments"),
    ("/coplayer/temperature", [float("nan")], "bad arguments"),
    ("/coplayer/part/alto/mute", [0.5], "bad arguments"),
    ("/coplayer/mode", [3], "bad arguments"),
    ("/coplayer/panic", ["now"], "bad arguments"),
    ("/coplayer/volume", [0.5], "unknown address"),
    ("/coplayer/part/alto", [1], "unknown address"),
    ("/coplayer/part/a/b/mute", [1], "unknown address"),
])
def test_wrong_messages_are_ignored_and_counted(control, rec, address, args, reason):
    assert control.dispatch(address, args) is False
    assert rec.calls == []
    assert control.ignored == {reason: 1}


def test_warnings_are_rate_limited_per_address_and_reason(control, caplog):
    caplog.set_level(logging.WARNING)
    for _ in range(50):
        control.dispatch("/coplayer/volume", [1])
        control.dispatch("/coplayer/tempo", ["fast"])
    control.dispatch("/coplayer/pan", [1])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    assert "unknown address" in warnings[0] and "'/coplayer/volume'" in warnings[0]
    assert "known: /coplayer/temperature" in warnings[0]
    assert "bad arguments" in warnings[1] and "expected 'f', got 'fast'" in warnings[1]
    assert control.ignored == {"unknown address": 51, "bad arguments": 50}


def test_handler_errors_are_logged_and_never_escape(caplog):
    def refuse(mode):
        raise ValueError(f"unknown mode {mode!r}")

    def buggy():
        return {}["missing"].x  # KeyError: counted as a handler error

    def crash(value):
        raise RuntimeError("bug")

    control = OscControl({"/coplayer/mode": refuse, "/coplayer/panic": buggy, "/coplayer/tempo": crash})
    assert not control.dispatch("/coplayer/mode", ["loud"])
    assert not control.dispatch("/coplayer/panic")
    assert not control.dispatch("/coplayer/tempo", [90])
    assert control.ignored == {"handler error": 2, "handler failure": 1}
    assert "unknown mode 'loud'" in caplog.text
    assert "RuntimeError: bug" in caplog.text and "Traceback" in caplog.text


def test_addresses_without_a_signature_get_their_arguments_as_sent(rec):
    control = OscControl({"/custom/thing": rec.handler("thing")})
    control.dispatch("/custom/thing", [1, "a", 2.5])
    assert rec.calls == [("thing", 1, "a", 2.5)]


# --- datagrams -------------------------------------------------------------


def test_feed_parses_messages_and_bundles(control, rec):
    assert control.feed(build_msg("/coplayer/tempo", [96.0]).dgram) == 1
    a = build_msg("/coplayer/top_p", [0.9]).dgram
    b = build_msg("/coplayer/record", []).dgram
    bundle = b"#bundle\x00" + (1).to_bytes(8, "big") + b"".join(len(m).to_bytes(4, "big") + m for m in (a, b))
    assert control.feed(bundle) == 2
    assert rec.calls == [("tempo", 96.0), ("top_p", pytest.approx(0.9)), ("record",)]


def test_malformed_datagrams_are_counted_never_raised_and_python_osc_stays_quiet(control, rec, caplog):
    caplog.set_level(logging.DEBUG)
    good = build_msg("/coplayer/temperature", [0.5]).dgram
    rng = random.Random(7)
    datagrams = [b"", b"hello", b"/coplayer/temperature", b"/\xff\xfe\x00,f\x00\x00\x00\x00\x00\x00",
                 b"#bundle\x00" + bytes(8) + (999).to_bytes(4, "big") + good,
                 b"/coplayer/temperature\x00\x00\x00,Q\x00\x00"]
    for _ in range(500):
        d = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        datagrams.append(bytes(d[: rng.randint(0, len(d))]))
        datagrams.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
    for d in datagrams:
        control.feed(d)  # must not raise
    assert control.ignored["malformed datagram"] >= 6
    assert {r.name for r in caplog.records} <= {"coplayer.io.osc"}
    lines = [r.getMessage().split(": ")[0:2] for r in caplog.records]
    assert len(lines) == len({tuple(x) for x in lines})  # once per reason and address


def test_a_flood_of_distinct_addresses_logs_a_bounded_number_of_lines(control, caplog):
    for i in range(1000):
        control.dispatch(f"/spam/{i}", [])
    assert control.ignored["unknown address"] == 1000
    assert len(caplog.records) <= 65
    assert "'*'" in caplog.records[-1].getMessage()


# --- the UDP server ----------------------------------------------------------


def test_server_feeds_datagrams_to_the_control_and_survives_garbage(control, rec):
    with OscServer(control, port=0) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00garbage", (host, port))
        client = SimpleUDPClient(host, port)
        client.send_message("/coplayer/temperature", 0.25)
        client.send_message("/coplayer/part/tenor/mute", 1)
        assert rec.wait(2) == [("temperature", 0.25), ("mute", "tenor", 1)]
        assert control.ignored["malformed datagram"] == 1
    server.stop()  # a second stop does nothing


def test_a_taken_port_is_an_error_the_user_can_act_on(control):
    with OscServer(control, port=0) as first:
        with pytest.raises(OscError, match=r"cannot listen for OSC on 127.0.0.1:\d+: .*osc.in_port"):
            OscServer(control, port=first.address[1]).start()


def test_listening_beyond_this_machine_without_an_allow_list_is_refused(control):
    with pytest.raises(OscError) as info:
        OscServer(control, host="0.0.0.0", port=0)
    message = str(info.value)
    assert "\n" not in message and "--set 'osc.allow=[" in message and "osc.host: 127.0.0.1" in message
    OscServer(control, host="localhost", port=0)  # this machine only: no list needed
    OscServer(control, host="0.0.0.0", port=0, allow=["192.168.1.0/24"])
    with pytest.raises(OscError, match="osc.allow: 'nine' is not an IP address"):
        OscServer(control, host="0.0.0.0", port=0, allow=["nine"])


def test_only_this_machine_and_the_allowed_senders_are_heard(control, caplog):
    server = OscServer(control, host="0.0.0.0", port=0, allow=["192.168.1.0/24", "10.0.0.7"])
    for sender in ("127.0.0.1", "127.0.1.1", "::1", "192.168.1.20", "10.0.0.7", "::ffff:10.0.0.7"):
        assert server.allows(sender), sender
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            for sender in ("10.0.0.8", "192.168.2.1", "2001:db8::1"):
                assert not server.allows(sender)
    assert server.refused == 150
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3 and "10.0.0.8" in refused[0] and "osc.allow" in refused[0]


def outside_address() -> str:
    """This machine's address on its network (not loopback), or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # a documentation address: nothing is sent
            address = s.getsockname()[0]
        except OSError:
            address = "0.0.0.0"
    if address.startswith(("0.", "127.")):
        pytest.skip("this machine has no network address other than loopback")
    return address


def send_from(address: str, port: int, dgram: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 0))
        s.sendto(dgram, (address, port))


def test_datagrams_from_a_sender_not_allowed_are_dropped(control, rec):
    outside = outside_address()
    other = "198.51.100.0/24" if not outside.startswith("198.51.100.") else "203.0.113.0/24"
    with OscServer(control, host="0.0.0.0", port=0, allow=[other]) as server:
        port = server.address[1]
        send_from(outside, port, build_msg("/coplayer/panic", []).dgram)
        SimpleUDPClient("127.0.0.1", port).send_message("/coplayer/temperature", 0.5)
        assert rec.wait(1) == [("temperature", 0.5)]
        deadline = time.monotonic() + 2
        while server.refused < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.refused == 1 and control.handled == 1
    with OscServer(control, host="0.0.0.0", port=0, allow=[outside]) as server:
        send_from(outside, server.address[1], build_msg("/coplayer/panic", []).dgram)
        assert rec.wait(2)[1:] == [("panic",)]
        assert server.refused == 0


def test_oscsend_reaches_the_server(control, rec):
    oscsend = need_tool("oscsend")
    with OscServer(control, port=0) as server:
        port = str(server.address[1])
        for args in (["/coplayer/temperature", "f", "0.7"], ["/coplayer/mode", "s", "both"],
                     ["/coplayer/part/soprano/solo", "i", "1"], ["/coplayer/panic"]):
            subprocess.run([oscsend, "127.0.0.1", port, *args], check=True, timeout=10)
        calls = rec.wait(4)
    assert calls == [("temperature", pytest.approx(0.7)), ("mode", "both"), ("solo", "soprano", 1), ("panic",)]


# --- sending -----------------------------------------------------------------


def test_osc_out_sends_the_documented_type_tags():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(2)
        with OscOut("127.0.0.1", sink.getsockname()[1]) as out:
            assert out.note("alto", 64, 0)
            assert out.state("mode", "respond")
            assert out.stats(0.12, 0.5, 1, 100, 2)
            assert out.ports(3, None, 0, 7, 2)
        received = [OscMessage(sink.recv(1024)) for _ in range(4)]
    assert [(m.address, type_tags(m.dgram), m.params) for m in received] == [
        ("/coplayer/note", "sii", ["alto", 64, 0]),
        ("/coplayer/state", "ss", ["mode", "respond"]),
        ("/coplayer/stats", "fffii", [pytest.approx(0.12), 0.5, 1.0, 100, 2]),
        ("/coplayer/ports", "iiiii", [3, -1, 0, 7, 2]),  # -1: the backend cannot tell
    ]


def test_osc_out_logs_send_errors_instead_of_raising(caplog):
    out = OscOut("255.255.255.255", 9)  # broadcast without SO_BROADCAST: the kernel refuses
    assert out.note("alto", 60, 100) is False
    assert out.note("alto", 60, 0) is False
    assert out.errors == 2
    assert caplog.text.count("send failed") == 1
    out.close()


def test_osc_out_refuses_a_host_that_does_not_resolve():
    with pytest.raises(OscError, match="check osc.out_host"):
        OscOut("no-such-host.invalid", 9001)


def test_oscdump_receives_what_osc_out_sends():
    oscdump = need_tool("oscdump")
    port = free_udp_port()
    dump = subprocess.Popen([oscdump, "-L", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.3)  # let oscdump bind
        with OscOut("127.0.0.1", port) as out:
            out.note("soprano", 72, 90)
        line = dump.stdout.readline()
    finally:
        dump.terminate()
        dump.wait(timeout=5)
    assert line.split()[1:] == ["/coplayer/note", "sii", '"soprano"', "72", "90"]  # after a time tag
