"""The typed configuration: frozen dataclasses, loaded from YAML and validated.

The schema is the dataclasses below.  Validation is one generic walker driven
by their type hints (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[X, ...]``, nested dataclasses) and by per-field metadata:

* ``range``: ``(low, high)`` inclusive; ``high`` may be None (no upper bound);
* ``choices``: the allowed strings;
* ``min_items``: the fewest entries a list may have;
* ``check``: a function returning an error text, or None when the value is fine.

Checks that involve several fields (unique part names, ``low <= high``, ...)
run afterwards on the built :class:`Config`.  Every problem is one
:class:`~coplayer.errors.ConfigError` naming the key path, the value found and
what is allowed, e.g. ``parts[2].channel: 17 is out of range 1..16``.

Nothing happens at import time: files are read only by :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from coplayer.errors import ConfigError

__all__ = [
    "Config",
    "Midi",
    "Part",
    "Tempo",
    "Latency",
    "Instrument",
    "Continuation",
    "Controls",
    "Osc",
    "Session",
    "load_config",
    "parse_config",
    "dump_config",
    "packaged_config",
    "value_range",
]

MODES = ("instrument", "respond", "both")
MAX_SEED = 2**32 - 1
# The longest ``coplayer continue --bars``.  The transformer hears its last 256
# events, about 16 bars of four parts, so past that it continues itself, not
# the input; 64 bars (over two minutes at 100 BPM) took 3.7 s for four parts
# on this shared machine (3 December 2026), and 10,000 bars ran past 120 s.
MAX_CONTINUE_BARS = 64


def _opt(default: Any, **metadata: Any) -> Any:
    """A field with a default and validation metadata."""
    return field(default=default, metadata=metadata)


def _section(cls: type) -> Any:
    return field(default_factory=cls)


_KEY_RE = re.compile(r"[A-Ga-g][#b]? (major|minor)", re.IGNORECASE)


def _check_key(value: str) -> str | None:
    if _KEY_RE.fullmatch(value.strip()):
        return None
    return "is not a key like 'C major', 'F# minor' or 'Bb major'"


def _check_allow(entries: tuple[str, ...]) -> str | None:
    from coplayer.io.osc import parse_allow

    try:
        parse_allow(entries)
    except ValueError as exc:
        return f"is not a list of addresses: {exc}"
    return None


# --- the schema ------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One output instrument: where its notes go and which pitches suit it."""

    name: str
    channel: int = _opt(1, range=(1, 16))
    program: int = _opt(0, range=(0, 127))
    port: str | None = None
    low: int = _opt(0, range=(0, 127))
    high: int = _opt(127, range=(0, 127))
    monophonic: bool = True


DEFAULT_PARTS = (
    Part("soprano", channel=1, program=40, low=60, high=81),  # violin
    Part("alto", channel=2, program=41, low=53, high=74),  # viola
    Part("tenor", channel=3, program=42, low=48, high=69),  # cello
    Part("bass", channel=4, program=43, low=36, high=64),  # contrabass
)


@dataclass(frozen=True)
class Midi:
    backend: str = _opt("auto", choices=("auto", "jack", "rtmidi", "memory"))
    api: str = _opt("auto", choices=("alsa", "jack", "coremidi", "winmm", "auto"))
    input: str | None = None
    virtual_input_name: str = "coplayer in"
    output_mode: str = _opt("ports", choices=("ports", "channels"))
    output_port: str = "coplayer out"
    client_name: str = "coplayer"
    forward_controllers: bool = True
    drum_channel: int | None = _opt(10, range=(1, 16))
    passthrough_other: bool = True
    feedback_guard: bool = True
    clean_start: bool = True


@dataclass(frozen=True)
class Tempo:
    bpm: float = _opt(100.0, range=(20, 300))
    source: str = _opt("internal", choices=("internal", "clock"))
    clock_smoothing: int = _opt(48, range=(1, 96))
    beats_per_bar: int = _opt(4, range=(1, 16))


@dataclass(frozen=True)
class Latency:
    budget_ms: float = _opt(3.0, range=(0.1, 100))
    stats_interval_s: float = _opt(1.0, range=(0.1, 60))
    keep_warm_ms: float = _opt(1.0, range=(0, 1000))
    keep_warm_for_s: float = _opt(60.0, range=(0.01, 86400))


@dataclass(frozen=True)
class Instrument:
    model: str = "instrument-lstm"
    fallback: str = _opt("zone", choices=("zone", "closest"))
    mono_penalty: float = _opt(0.0, range=(0, None))
    chord_penalty: float = _opt(0.0, range=(0, None))
    range_penalty: float = _opt(4.0, range=(0, None))
    threads: int = _opt(1, range=(1, 8))


@dataclass(frozen=True)
class Continuation:
    model: str = "continue-transformer"
    fallback: str = _opt("markov", choices=("markov", "none"))
    silence_beats: float = _opt(2.0, range=(0.25, 16))
    response_bars: int = _opt(2, range=(1, 16))
    response_parts: tuple[str, ...] = _opt(
        tuple(p.name for p in DEFAULT_PARTS), min_items=1
    )
    temperature: float = _opt(1.0, range=(0.05, 5))
    top_p: float = _opt(0.95, range=(0.05, 1))
    seed: int | None = _opt(None, range=(0, MAX_SEED))
    lookahead_ms: float = _opt(50.0, range=(0, 1000))
    key_lock: str | None = _opt(None, check=_check_key)
    key_strength: float = _opt(0.5, range=(0, 50))
    max_polyphony: int = _opt(4, range=(1, 16))
    density: float = _opt(1.0, range=(0.1, 4))
    motif_repetition: float = _opt(0.3, range=(0, 1))


@dataclass(frozen=True)
class Controls:
    """MIDI CC numbers that steer coplayer live; None disables a control."""

    trigger: int | None = _opt(20, range=(0, 127))
    temperature: int | None = _opt(21, range=(0, 127))
    mode: int | None = _opt(22, range=(0, 127))
    panic: int | None = _opt(23, range=(0, 127))
    response_length: int | None = _opt(24, range=(0, 127))
    key_strength: int | None = _opt(25, range=(0, 127))


@dataclass(frozen=True)
class Osc:
    enabled: bool = True
    host: str = "127.0.0.1"
    in_port: int = _opt(9000, range=(1, 65535))
    allow: tuple[str, ...] = _opt((), check=_check_allow)
    out_host: str = "127.0.0.1"
    out_port: int = _opt(9001, range=(1, 65535))


@dataclass(frozen=True)
class Session:
    record: bool = True
    directory: str = "sessions"
    journal_interval_s: float = _opt(0.5, range=(0.05, 1))
    max_mb: float = _opt(1000.0, range=(1, None))


@dataclass(frozen=True)
class Config:
    """The whole configuration.  ``source`` says where it was loaded from."""

    mode: str = _opt("both", choices=MODES)
    parts: tuple[Part, ...] = _opt(DEFAULT_PARTS, min_items=1)
    midi: Midi = _section(Midi)
    tempo: Tempo = _section(Tempo)
    continuation: Continuation = _section(Continuation)
    instrument: Instrument = _section(Instrument)
    controls: Controls = _section(Controls)
    latency: Latency = _section(Latency)
    osc: Osc = _section(Osc)
    session: Session = _section(Session)
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def part(self, name: str) -> Part:
        """The part called ``name``; KeyError lists the configured names."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no part named {name!r} (parts: {', '.join(self.part_names)})")


# --- messages --------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the user would recognise it from YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: Any, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unknown_key(key: Any, known: Iterable[str], path: str) -> ConfigError:
    known = list(known)
    where = f"in {path}" if path else "at top level"
    return ConfigError(
        f"unknown key {_show(key)} {where} (known: {', '.join(known)}){_suggest(key, known)}"
    )


# --- the generic walker ----------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _schema_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _build(cls: type, data: Any, path: str) -> Any:
    """Check ``data`` (a mapping from YAML) against dataclass ``cls`` and build it."""
    if data is None:  # a section whose keys are all commented out
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {_show(data)} is not a mapping of key: value pairs")
    fields = _schema_fields(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(key, fields, path)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert_field(data[name], _hints(cls)[name], f.metadata, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: missing required key {name!r}")
    return cls(**values)


def _convert_field(value: Any, tp: Any, meta: Mapping, path: str) -> Any:
    value = _convert(value, tp, path)
    if value is None:
        return None
    _check_meta(value, meta, path)  # on the value as written, so messages show it
    return float(value) if _base(tp) is float else value


def _base(tp: Any) -> Any:
    """``X`` for ``X | None``, else ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _convert(value: Any, tp: Any, path: str) -> Any:
    if value is None and _base(tp) is not tp:
        return None
    tp = _base(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {_show(value)} is not a list")
        item = typing.get_args(tp)[0]
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    return _convert_scalar(value, tp, path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (_is_number, "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _convert_scalar(value: Any, tp: type, path: str) -> Any:
    accepts, what = _SCALARS[tp]
    if not accepts(value):
        raise ConfigError(f"{path}: {_show(value)} is not {what}")
    if tp is str and not value.strip():
        raise ConfigError(f"{path}: an empty string is not allowed")
    return value


def _check_meta(value: Any, meta: Mapping, path: str) -> None:
    if "range" in meta:
        _check_range(value, *meta["range"], path)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"{path}: {_show(value)} is not one of {', '.join(choices)}{_suggest(value, choices)}"
        )
    least = meta.get("min_items")
    if least and len(value) < least:
        raise ConfigError(f"{path}: at least {least} entr{'y' if least == 1 else 'ies'} required")
    problem = meta["check"](value) if "check" in meta else None
    if problem:
        raise ConfigError(f"{path}: {_show(value)} {problem}")


def _check_range(value: float, low: float, high: float | None, path: str) -> None:
    if high is None:
        if not value >= low:  # written so that NaN fails too
            raise ConfigError(f"{path}: {_show(value)} is below the minimum {low}")
    elif not low <= value <= high:
        raise ConfigError(f"{path}: {_show(value)} is out of range {low}..{high}")


def value_range(key: str) -> tuple[float, float | None]:
    """The range the schema allows for ``key``, e.g. ``value_range("tempo.bpm")``
    -> ``(20, 300)``; KeyError if the key has none."""
    cls: Any = Config
    *sections, name = key.split(".")
    for section in sections:
        cls = _base(_hints(cls)[section])
    return _schema_fields(cls)[name].metadata["range"]


# --- checks across fields --------------------------------------------------


def _check_parts(cfg: Config) -> None:
    seen: dict[str, int] = {}
    for i, part in enumerate(cfg.parts):
        if part.name in seen:
            raise ConfigError(
                f"parts[{i}].name: {part.name!r} is already the name of parts[{seen[part.name]}]; "
                "part names must be unique"
            )
        seen[part.name] = i
        if part.low > part.high:
            raise ConfigError(f"parts[{i}]: low {part.low} is above high {part.high}")


def _check_response_parts(cfg: Config) -> None:
    names = cfg.part_names
    chosen = cfg.continuation.response_parts
    for i, name in enumerate(chosen):
        path = f"continuation.response_parts[{i}]"
        if name not in names:
            raise ConfigError(
                f"{path}: {name!r} is not a configured part (parts: {', '.join(names)})"
                f"{_suggest(name, names)}"
            )
        if name in chosen[:i]:
            raise ConfigError(f"{path}: {name!r} is listed twice")


def _check_controls(cfg: Config) -> None:
    users: dict[int, str] = {}
    for f in dataclasses.fields(Controls):
        cc = getattr(cfg.controls, f.name)
        if cc is None:
            continue
        if cc in users:
            raise ConfigError(
                f"controls.{f.name}: CC {cc} is already used by controls.{users[cc]}"
            )
        users[cc] = f.name


_CROSS_CHECKS = (_check_parts, _check_response_parts, _check_controls)


def _validate(data: Any) -> Config:
    cfg = _build(Config, data, "")
    for check in _CROSS_CHECKS:
        check(cfg)
    return cfg


# --- loading ---------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[dict]:
    seen = set()
    for key_node, _ in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key is not None and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice", key_node.start_mark
            )
        seen.add(key)
    data: dict = {}
    yield data  # two steps, like SafeLoader, so that anchors may refer back
    data.update(loader.construct_mapping(node))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate YAML ``text``; an empty text gives the defaults."""
    data = _parse_yaml(text, source)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{source}: {_show(data)} is not a configuration; expected sections like 'tempo:'"
        )
    try:
        cfg = _validate(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return dataclasses.replace(cfg, source=source)


def packaged_config() -> Traversable:
    """The documented default configuration shipped inside the package."""
    return importlib.resources.files("coplayer") / "config.yaml"


def _read(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def load_config(
    path: str | os.PathLike | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Load, validate and override the configuration.

    ``path`` None means ``./config.yaml`` when it exists, else the packaged
    default.  ``overrides`` are ``KEY=VALUE`` strings (``tempo.bpm=96``,
    ``parts[1].channel=5``); each VALUE is parsed as YAML and validated like
    a value from the file.
    """
    if path is None and Path("config.yaml").is_file():
        path = "config.yaml"
    if path is None:
        resource = packaged_config()
        cfg = parse_config(resource.read_text(encoding="utf-8"), str(resource))
    else:
        cfg = parse_config(_read(path), os.fspath(path))
    overrides = list(overrides)
    return _apply_overrides(cfg, overrides) if overrides else cfg


# --- overrides -------------------------------------------------------------

_SEGMENT_RE = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)")


def _parse_key(key: str, item: str) -> list[str | int]:
    steps: list[str | int] = []
    for segment in key.split("."):
        m = _SEGMENT_RE.fullmatch(segment.strip())
        if not m:
            raise ConfigError(
                f"--set {item}: {key!r} is not a key path like tempo.bpm or parts[1].channel"
            )
        steps.append(m.group(1))
        steps.extend(int(i) for i in re.findall(r"\d+", m.group(2)))
    return steps


def _step(node: Any, step: str | int, path: str) -> str:
    """Check that ``step`` exists in ``node``; return the path including it."""
    if isinstance(step, int):
        if not isinstance(node, list):
            raise ConfigError(f"{path or 'the top level'} is not a list")
        if step >= len(node):
            raise ConfigError(f"{path} has {len(node)} entries (indices 0..{len(node) - 1})")
        return f"{path}[{step}]"
    if not isinstance(node, dict):
        raise ConfigError(f"{path} is not a section with keys")
    if step not in node:
        raise _unknown_key(step, node, path)
    return _join(path, step)


def _set_path(tree: dict, steps: list[str | int], value: Any) -> None:
    node, path = tree, ""
    for step in steps[:-1]:
        path = _step(node, step, path)
        node = node[step]
    _step(node, steps[-1], path)
    node[steps[-1]] = value


def _apply_override(tree: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. tempo.bpm=96")
    steps = _parse_key(key.strip(), item)
    value = _parse_yaml(text, f"--set {item}")
    try:
        _set_path(tree, steps, value)
    except ConfigError as exc:
        raise ConfigError(f"--set {item}: {exc}") from None


def _apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    tree = _to_plain(cfg)
    for item in overrides:
        _apply_override(tree, item)
    try:
        new = _validate(tree)
    except ConfigError as exc:
        given = ", ".join(f"--set {o}" for o in overrides)
        raise ConfigError(f"{exc} (after {given})") from None
    return dataclasses.replace(new, source=cfg.source)


# --- dumping ---------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, in schema order."""
    if dataclasses.is_dataclass(value):
        return {name: _to_plain(getattr(value, name)) for name in _schema_fields(type(value))}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


def dump_config(cfg: Config) -> str:
    """The effective configuration as YAML that :func:`load_config` reads back."""
    body = yaml.safe_dump(
        _to_plain(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return f"# effective coplayer configuration (from {cfg.source})\n{body}"
