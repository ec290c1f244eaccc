"""The configuration: packaged default, every kind of error, overrides, dump."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from coplayer import cli
from coplayer.config import (
    Config,
    Part,
    Tempo,
    dump_config,
    load_config,
    packaged_config,
    parse_config,
    value_range,
)
from coplayer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.yaml")
    return str(info.value)


def schema_keys(value, prefix: str = "") -> set[str]:
    """Every key path of a plain (YAML) tree, list entries collapsed to []."""
    keys = set()
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else k
            keys |= {path} | schema_keys(v, path)
    elif isinstance(value, list):
        for v in value:
            keys |= schema_keys(v, prefix + "[]")
    return keys


# --- the packaged default --------------------------------------------------


def test_packaged_default_loads_and_equals_the_code_defaults():
    resource = packaged_config()
    cfg = parse_config(resource.read_text(encoding="utf-8"), str(resource))
    assert cfg == Config()
    assert cfg.part_names == ("soprano", "alto", "tenor", "bass")
    assert cfg.part("bass") == Part("bass", channel=4, program=43, low=36, high=64)


def test_packaged_default_spells_out_every_key():
    documented = yaml.safe_load(packaged_config().read_text(encoding="utf-8"))
    effective = yaml.safe_load(dump_config(Config()))
    assert schema_keys(documented) == schema_keys(effective)


def test_root_config_is_the_packaged_one():
    root = REPO / "config.yaml"
    assert root.read_bytes() == (REPO / "coplayer" / "config.yaml").read_bytes()


def test_no_path_uses_cwd_config_then_packaged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config().source == str(packaged_config())
    write(tmp_path, "tempo: {bpm: 72}\n")
    cfg = load_config()
    assert cfg.source == "config.yaml"
    assert cfg.tempo.bpm == 72.0


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "# nothing here\n"))
    assert cfg == Config()
    assert cfg.source == str(tmp_path / "config.yaml")


def test_empty_section_gives_its_defaults():
    assert parse_config("tempo:\nmidi:\n") == Config()


def test_part_lookup_names_the_known_parts():
    with pytest.raises(KeyError, match="soprano, alto, tenor, bass"):
        Config().part("violin")


# --- values that are accepted ----------------------------------------------


def test_values_are_typed_and_optional_fields_take_null():
    cfg = parse_config(
        "tempo: {bpm: 96}\n"
        "midi: {drum_channel: null, input: Launchkey Mini MK3}\n"
        "continuation: {seed: 7, key_lock: F# minor, response_parts: [soprano, bass]}\n"
    )
    assert cfg.tempo.bpm == 96.0 and isinstance(cfg.tempo.bpm, float)
    assert cfg.midi.drum_channel is None
    assert cfg.midi.input == "Launchkey Mini MK3"
    assert cfg.continuation.seed == 7
    assert cfg.continuation.response_parts == ("soprano", "bass")


def test_a_part_needs_only_a_name():
    cfg = parse_config(
        "parts: [{name: piano}]\ncontinuation: {response_parts: [piano]}\n"
    )
    assert cfg.parts == (Part("piano"),)


# --- every kind of error ---------------------------------------------------


def test_unknown_top_level_key_suggests_the_closest():
    msg = error_of("tempp: {bpm: 90}\n")
    assert msg.startswith("test.yaml: unknown key 'tempp' at top level (known: mode, parts, midi,")
    assert msg.endswith("did you mean 'tempo'?")


def test_unknown_nested_key_names_its_section():
    msg = error_of("tempo: {bmp: 90}\n")
    assert "unknown key 'bmp' in tempo (known: bpm, source, clock_smoothing, beats_per_bar)" in msg
    assert msg.endswith("did you mean 'bpm'?")


def test_unknown_key_inside_a_part():
    msg = error_of("parts: [{name: a, chanel: 2}]\ncontinuation: {response_parts: [a]}\n")
    assert "unknown key 'chanel' in parts[0]" in msg
    assert msg.endswith("did you mean 'channel'?")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tempo: {bpm: fast}", "tempo.bpm: 'fast' is not a number"),
        ("tempo: {beats_per_bar: '4'}", "tempo.beats_per_bar: '4' is not an integer"),
        ("tempo: {beats_per_bar: 3.5}", "tempo.beats_per_bar: 3.5 is not an integer"),
        ("tempo: {beats_per_bar: true}", "tempo.beats_per_bar: true is not an integer"),
        ("tempo: {bpm: true}", "tempo.bpm: true is not a number"),
        ("osc: {enabled: 1}", "osc.enabled: 1 is not true or false"),
        ("midi: {client_name: 5}", "midi.client_name: 5 is not a string"),
        ("midi: {client_name: ''}", "midi.client_name: an empty string is not allowed"),
        ("midi: [rtmidi]", "midi: a list is not a mapping of key: value pairs"),
        ("parts: {name: a}", "parts: a mapping is not a list"),
        ("tempo: {bpm: [1, 2]}", "tempo.bpm: a list is not a number"),
        ("tempo: {bpm: null}", "tempo.bpm: null is not a number"),
    ],
)
def test_wrong_type(text, expected):
    assert error_of(text + "\n") == f"test.yaml: {expected}"


def test_out_of_range_exact_message():
    text = dump_config(Config()).replace("channel: 3", "channel: 17")
    assert error_of(text) == "test.yaml: parts[2].channel: 17 is out of range 1..16"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tempo: {bpm: 301}", "tempo.bpm: 301 is out of range 20..300"),
        ("latency: {budget_ms: 0.05}", "latency.budget_ms: 0.05 is out of range 0.1..100"),
        ("instrument: {mono_penalty: -1}", "instrument.mono_penalty: -1 is below the minimum 0"),
        ("instrument: {range_penalty: .nan}", "instrument.range_penalty: nan is below the minimum 0"),
        ("controls: {panic: 128}", "controls.panic: 128 is out of range 0..127"),
        ("osc: {in_port: 0}", "osc.in_port: 0 is out of range 1..65535"),
    ],
)
def test_out_of_range(text, expected):
    assert error_of(text + "\n") == f"test.yaml: {expected}"


def test_bad_choice_lists_the_allowed_values():
    assert error_of("midi: {api: coreaudio}\n") == (
        "test.yaml: midi.api: 'coreaudio' is not one of alsa, jack, coremidi, winmm, auto; "
        "did you mean 'coremidi'?"
    )
    assert error_of("midi: {api: pulse}\n") == (
        "test.yaml: midi.api: 'pulse' is not one of alsa, jack, coremidi, winmm, auto"
    )
    assert error_of("mode: respnd\n").endswith(
        "mode: 'respnd' is not one of instrument, respond, both; did you mean 'respond'?"
    )


def test_osc_allow_takes_addresses_and_networks():
    cfg = parse_config("osc: {host: 0.0.0.0, allow: [192.168.1.20, 10.0.0.0/24, '::1']}\n")
    assert cfg.osc.allow == ("192.168.1.20", "10.0.0.0/24", "::1")
    assert error_of("osc: {allow: [192.168.1.300]}\n") == (
        "test.yaml: osc.allow: ('192.168.1.300',) is not a list of addresses: '192.168.1.300' is not an IP "
        "address or network like 192.168.1.20 or 192.168.1.0/24"
    )


def test_value_range_is_the_schemas():
    assert value_range("tempo.bpm") == (20, 300)
    assert value_range("continuation.temperature") == (0.05, 5)
    with pytest.raises(KeyError):
        value_range("osc.host")


def test_bad_key_lock():
    assert error_of("continuation: {key_lock: H major}\n") == (
        "test.yaml: continuation.key_lock: 'H major' is not a key like "
        "'C major', 'F# minor' or 'Bb major'"
    )


def test_missing_part_name():
    assert error_of("parts: [{channel: 1}]\n") == "test.yaml: parts[0]: missing required key 'name'"


def test_at_least_one_part():
    assert error_of("parts: []\n") == "test.yaml: parts: at least 1 entry required"


def test_duplicate_part_names():
    text = "parts: [{name: a}, {name: b}, {name: a}]\ncontinuation: {response_parts: [a]}\n"
    assert error_of(text) == (
        "test.yaml: parts[2].name: 'a' is already the name of parts[0]; part names must be unique"
    )


def test_low_above_high():
    text = "parts: [{name: a, low: 80, high: 70}]\ncontinuation: {response_parts: [a]}\n"
    assert error_of(text) == "test.yaml: parts[0]: low 80 is above high 70"


def test_response_parts_must_be_configured_parts():
    msg = error_of("continuation: {response_parts: [soprano, basso]}\n")
    assert msg == (
        "test.yaml: continuation.response_parts[1]: 'basso' is not a configured part "
        "(parts: soprano, alto, tenor, bass); did you mean 'bass'?"
    )
    assert "listed twice" in error_of("continuation: {response_parts: [bass, bass]}\n")


def test_two_controls_on_one_cc():
    assert error_of("controls: {panic: 21}\n") == (
        "test.yaml: controls.panic: CC 21 is already used by controls.temperature"
    )


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "mode: both\ntempo:\n  bpm: [100\nosc: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}, line ")
    assert "invalid YAML" in msg
    assert int(re.search(r"line (\d+)", msg).group(1)) in (3, 4)


def test_duplicate_yaml_key_names_the_line(tmp_path):
    path = write(tmp_path, "mode: both\ntempo: {bpm: 90}\ntempo: {bpm: 120}\n")
    with pytest.raises(ConfigError, match=r", line 3, column 1: invalid YAML: key 'tempo' appears twice"):
        load_config(path)


def test_top_level_must_be_a_mapping():
    assert error_of("- mode\n").startswith("test.yaml: a list is not a configuration")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file not found: {path}"


def test_errors_are_value_errors_too():
    with pytest.raises(ValueError):
        parse_config("tempo: {bpm: fast}\n")


# --- overrides -------------------------------------------------------------


def test_overrides_apply_to_file_values(tmp_path):
    path = write(tmp_path, "tempo: {bpm: 80}\n")
    cfg = load_config(
        path,
        overrides=[
            "tempo.bpm=96",
            "mode=respond",
            "parts[1].channel=5",
            "midi.input=Launchkey Mini MK3",
            "continuation.response_parts=[soprano, alto]",
            "continuation.seed=",
        ],
    )
    assert cfg.tempo.bpm == 96.0
    assert cfg.mode == "respond"
    assert cfg.part("alto").channel == 5
    assert cfg.midi.input == "Launchkey Mini MK3"
    assert cfg.continuation.response_parts == ("soprano", "alto")
    assert cfg.continuation.seed is None
    assert cfg.source == str(path)


def test_override_can_replace_a_whole_section(tmp_path):
    cfg = load_config(write(tmp_path, ""), overrides=["tempo={bpm: 60}"])
    assert cfg.tempo.bpm == 60.0 and cfg.tempo.beats_per_bar == 4


@pytest.mark.parametrize(
    "item, expected",
    [
        ("tempo.bmp=96", "--set tempo.bmp=96: unknown key 'bmp' in tempo (known: bpm,"),
        ("tempp.bpm=96", "--set tempp.bpm=96: unknown key 'tempp' at top level (known:"),
        ("parts[9].channel=5", "--set parts[9].channel=5: parts has 4 entries (indices 0..3)"),
        ("tempo[0]=5", "--set tempo[0]=5: tempo is not a list"),
        ("tempo.bpm.x=5", "--set tempo.bpm.x=5: tempo.bpm is not a section with keys"),
        ("parts..channel=5", "--set parts..channel=5: 'parts..channel' is not a key path"),
        ("tempo.bpm", "--set tempo.bpm: expected KEY=VALUE"),
        ("source=x", "--set source=x: unknown key 'source' at top level"),
    ],
)
def test_override_bad_path(tmp_path, item, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), overrides=[item])
    assert str(info.value).startswith(expected)


def test_override_suggests_the_key():
    with pytest.raises(ConfigError, match=r"did you mean 'bpm'\?$"):
        load_config(packaged_config(), overrides=["tempo.bmp=96"])


@pytest.mark.parametrize(
    "item, expected",
    [
        ("tempo.bpm=fast", "tempo.bpm: 'fast' is not a number (after --set tempo.bpm=fast)"),
        ("parts[2].channel=17", "parts[2].channel: 17 is out of range 1..16 (after --set parts[2].channel=17)"),
        ("mode=loud", "mode: 'loud' is not one of instrument, respond, both (after --set mode=loud)"),
        ("osc.enabled=maybe", "osc.enabled: 'maybe' is not true or false (after --set osc.enabled=maybe)"),
    ],
)
def test_override_bad_value(tmp_path, item, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), overrides=[item])
    assert str(info.value) == expected


def test_override_bad_yaml_value(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set tempo.bpm=\[1, line 1, column 3: invalid YAML"):
        load_config(write(tmp_path, ""), overrides=["tempo.bpm=[1"])


def test_override_cross_checks_run_after_all_overrides(tmp_path):
    path = write(tmp_path, "")
    renamed = ["parts[0].name=violin"]
    with pytest.raises(ConfigError, match=r"'soprano' is not a configured part"):
        load_config(path, overrides=renamed)
    cfg = load_config(path, overrides=renamed + ["continuation.response_parts[0]=violin"])
    assert cfg.continuation.response_parts[0] == "violin"


# --- dump ------------------------------------------------------------------


def test_dump_round_trips(tmp_path):
    cfg = load_config(
        packaged_config(),
        overrides=["tempo.bpm=72.5", "continuation.key_lock=Bb major", "midi.drum_channel=null"],
    )
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert dump_config(again).splitlines()[1:] == dump_config(cfg).splitlines()[1:]


def test_dump_of_defaults_is_plain_yaml():
    data = yaml.safe_load(dump_config(Config()))
    assert data["parts"][0] == {
        "name": "soprano", "channel": 1, "program": 40, "port": None,
        "low": 60, "high": 81, "monophonic": True,
    }
    assert "source" not in data


# --- the command line ------------------------------------------------------


def test_cli_prints_the_effective_configuration(capsys):
    assert cli.main(["config", "--print", "--set", "tempo.bpm=96"]) == 0
    out = capsys.readouterr().out
    assert parse_config(out) == dataclasses.replace(Config(), tempo=Tempo(bpm=96.0))


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    path = write(tmp_path, "parts: [{name: a, channel: 17}]\n", "bad.yaml")
    assert cli.main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"coplayer: error: {path}: parts[0].channel: 17 is out of range 1..16\n"


def test_cli_reports_a_missing_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    assert cli.main(["config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"coplayer: error: config file not found: {path}\n"


# --- the session folder ----------------------------------------------------------


@pytest.mark.parametrize("folder, expected", [
    ("/proc/nope", "session.directory: '/proc/nope' cannot be created in '/proc': "),
    ("FILE", "session.directory: 'FILE' is a file, not a folder"),
    ("FILE/sessions", "session.directory: 'FILE' is a file, not a folder"),
])
def test_cli_reports_a_session_folder_that_cannot_be_written_in_one_line(tmp_path, capsys, folder, expected):
    """Else `coplayer run` would play, then lose the recording at exit."""
    (tmp_path / "taken").write_text("a file")
    folder = folder.replace("FILE", str(tmp_path / "taken"))
    assert cli.main(["config", "--set", f"session.directory={folder}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("coplayer: error: " + expected.replace("FILE", str(tmp_path / "taken")))
    assert len(err.splitlines()) == 1


def test_cli_accepts_a_session_folder_it_can_create_without_creating_it(tmp_path, capsys):
    folder = tmp_path / "new" / "sessions"
    assert cli.main(["config", "--set", f"session.directory={folder}"]) == 0
    assert capsys.readouterr().out.startswith("configuration OK")
    assert not (tmp_path / "new").exists()


def test_cli_does_not_check_the_folder_when_nothing_is_recorded(capsys):
    assert cli.main(["config", "--set", "session.directory=/proc/nope", "--set", "session.record=false"]) == 0
    assert capsys.readouterr().out.startswith("configuration OK")
