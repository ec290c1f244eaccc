"""The ``coplayer`` command: one entry point, one subcommand per job.

Each subcommand is a small ``_cmd_*`` function; heavy imports happen inside
it so that ``coplayer --help`` stays instant and the runtime never imports
torch.  A :class:`~coplayer.errors.CoplayerError` reaches the user as one
line and exit code 2; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Callable

from coplayer import __version__
from coplayer.errors import CoplayerError

log = logging.getLogger("coplayer")


def _load_config(args: argparse.Namespace):
    from coplayer.config import load_config

    return load_config(args.config, overrides=getattr(args, "set", None) or [])


# --- subcommands ---------------------------------------------------------


def _cmd_config(args: argparse.Namespace) -> int:
    from coplayer.config import dump_config

    cfg = _load_config(args)
    if args.print:
        sys.stdout.write(dump_config(cfg))
        return 0
    if cfg.session.record:  # the file is fine, but would the recording be lost?
        from coplayer.engine.session import folder_problem
        from coplayer.errors import ConfigError

        problem = folder_problem(cfg.session.directory)
        if problem:
            raise ConfigError(f"session.directory: {problem}")
    print(f"configuration OK: {cfg.source}")
    return 0


def _cmd_arrange(args: argparse.Namespace) -> int:
    from coplayer.instrument.arrange import arrange_file

    cfg = _load_config(args)
    result = arrange_file(args.input, args.output, cfg, model=args.model, plot=args.plot)
    print(f"{result.summary()}; wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _print_eval(args: argparse.Namespace, results: list, format_table: Callable[[list], str], title: str) -> None:
    """``--json``: a list of one row per result; else ``title`` and the table."""
    if args.json:
        import json

        print("[\n" + ",\n".join(json.dumps(r.to_row()) for r in results) + "\n]")
    else:
        print(f"{title}\n")
        print(format_table(results))


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.task == "continue":
        return _eval_continue(args)
    from coplayer.data.splits import load_split
    from coplayer.instrument.evaluate import default_models, evaluate_models, format_table

    cfg = _load_config(args)
    scores = load_split("test")[: args.limit]
    results = evaluate_models(args.models or default_models(), cfg, scores, seed=args.seed)
    if args.record:
        from coplayer.instrument.evaluate import record_metrics

        for path in record_metrics(results, seed=args.seed, cfg=cfg):
            print(f"recorded the test accuracies in {path}", file=sys.stderr)
    _print_eval(args, results, format_table,
                f"instrumentation accuracy on the test split ({len(scores)} pieces, seed {args.seed})")
    return 0


def _eval_continue(args: argparse.Namespace) -> int:
    from coplayer.gen.encoding import Encoding
    from coplayer.gen.evaluate import default_models, evaluate_models, format_table, test_pieces

    cfg = _load_config(args)
    pieces, notes = test_pieces(Encoding(), args.limit, args.sources)
    for note in notes:
        log.warning("%s", note)
    results = evaluate_models(args.models or default_models(), cfg, pieces, seed=args.seed,
                              progress=None if args.json else log.debug, samples=args.samples)
    _print_eval(args, results, format_table,
                f"continuation on the test split ({len(pieces)} pieces, {args.samples} continuations each, "
                f"seed {args.seed})")
    return 0


def _cmd_continue(args: argparse.Namespace) -> int:
    from coplayer.gen.continue_file import continue_file

    cfg = _load_config(args)
    result = continue_file(args.input, args.output, cfg, bars=args.bars, temperature=args.temperature,
                           seed=args.seed, parts=args.parts, model=args.model)
    print(f"{result.summary()}; wrote {args.output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from coplayer.demo import run_demo

    cfg = _load_config(args)
    result = run_demo(cfg, args.out, model=args.model, speed=args.speed)
    print("\n".join(result.report()))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from coplayer.engine.live import run

    cfg = _load_config(args)
    return run(cfg, input_file=args.input, quiet=args.quiet, api=args.api, duration=args.duration,
               model=args.model)


def _cmd_bench(args: argparse.Namespace) -> int:
    from coplayer.bench import main as bench

    return bench(notes=args.notes, as_json=args.json, png=args.png, backend=args.backend)


def _cmd_ports(args: argparse.Namespace) -> int:
    from coplayer.io import jack_backend
    from coplayer.io.real import choose, list_ports
    from coplayer.io.rtmidi_backend import compiled_apis, resolve_api

    midi = _load_config(args).midi
    print(f"MIDI APIs compiled in: {', '.join(compiled_apis()) or 'none'}; "
          f"coplayer's JACK client: {'built' if jack_backend.available() else 'not built'}")
    api = resolve_api(args.api or midi.api)
    backend = "rtmidi" if midi.backend == "memory" else choose(midi.backend, api)
    ports = list_ports(backend, api, client_name=midi.client_name)
    via = "coplayer's JACK client" if backend == "jack" else f"python-rtmidi, {api}"
    for key, what in (("inputs", "coplayer can listen to"), ("outputs", "coplayer can play to")):
        print(f"{key} ({what}, through {via}):")
        print("\n".join(f"  {name}" for name in ports[key]) or "  (none)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from coplayer.training import run_training

    return run_training(args.task, args.extra)


COMMANDS = {
    "config": ("validate the configuration; --print shows the effective one", _cmd_config),
    "arrange": ("instrument a MIDI file as if it were played live, one track per part", _cmd_arrange),
    "continue": ("a MIDI file followed by coplayer's continuation of it", _cmd_continue),
    "eval": ("measure a task on the test split (instrument: note-level accuracy; "
             "continue: NLL and musical measures)", _cmd_eval),
    "train": ("train a model from scratch (needs the train extra and a source checkout)", _cmd_train),
    "run": ("play along live: MIDI in, instrumentation and answers out, until Ctrl-C", _cmd_run),
    "demo": ("replay the bundled piece through the live engine; write session.mid and roll.png, "
             "print latency", _cmd_demo),
    "ports": ("list the MIDI input and output ports, and the MIDI APIs compiled in", _cmd_ports),
    "bench": ("end-to-end latency through real JACK ports beside the bare JACK loop floor, "
              "and the highest note rate with no loss", _cmd_bench),
}


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print", action="store_true", help="print the effective configuration as YAML")


def _add_arrange(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN.mid", help="the MIDI file to instrument (all tracks merged)")
    p.add_argument("-o", "--output", metavar="OUT.mid", required=True, help="where to write the arrangement")
    p.add_argument("--model", metavar="NAME",
                   help="zone, closest, a shipped model name or an .onnx path "
                        "(default: instrument.model, falling back to instrument.fallback)")
    p.add_argument("--plot", metavar="ROLL.png", help="also draw a piano roll coloured by part")


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _bars(text: str) -> int:
    """An argparse type: the length of a continuation, 1 to MAX_CONTINUE_BARS."""
    from coplayer.config import MAX_CONTINUE_BARS

    bars = _count(text)
    if bars > MAX_CONTINUE_BARS:
        raise argparse.ArgumentTypeError(f"at most {MAX_CONTINUE_BARS} bars, got {bars}; "
                                         "continue the output again for more")
    return bars


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["instrument", "continue"], help="what to evaluate")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="instrument: zone, closest, shipped model names or .onnx paths (default: zone, "
                        "closest and every shipped instrument model); continue: markov, markov-live, "
                        "shipped model names or .onnx paths (default: those two and every shipped one)")
    p.add_argument("--limit", type=_count, metavar="N",
                   help="only the first N test pieces (continue: of each corpus)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the live performances, protocol b; continue: of the continuations (default 0)")
    p.add_argument("--samples", type=_count, default=5, metavar="K",
                   help="continue: continuations sampled per test piece, each with its own seed (default 5)")
    p.add_argument("--sources", nargs="+", choices=["bach", "essenFolksong", "ryansMammoth"],
                   help="continue: test corpora (default: all; a melody corpus is parsed once, then cached)")
    p.add_argument("--json", action="store_true", help="print one JSON row per model and protocol")
    p.add_argument("--record", action="store_true",
                   help="write the test accuracies into the shipped models' cards (a regression floor)")


def _positive(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _add_continue(p: argparse.ArgumentParser) -> None:
    from coplayer.config import MAX_CONTINUE_BARS

    p.add_argument("input", metavar="IN.mid", help="the MIDI file to continue (kept unchanged in OUT)")
    p.add_argument("-o", "--output", metavar="OUT.mid", required=True, help="where to write IN + the continuation")
    p.add_argument("--bars", type=_bars, metavar="N", help=f"length of the continuation, 1 to {MAX_CONTINUE_BARS} "
                   "(default: continuation.response_bars)")
    p.add_argument("--temperature", type=_positive, metavar="T", help="default: continuation.temperature")
    p.add_argument("--seed", type=int, metavar="S", help="default: continuation.seed, else a random one (printed)")
    p.add_argument("--parts", nargs="+", metavar="PART", help="parts that may play (default: "
                   "continuation.response_parts)")
    p.add_argument("--model", metavar="NAME", help="markov, markov-live, a shipped model name or an .onnx path "
                   "(default: continuation.model, falling back to continuation.fallback)")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default="out/demo", help="where to write session.mid and roll.png")
    p.add_argument("--model", metavar="NAME", help="zone, closest, a shipped model name or an .onnx path")
    p.add_argument("--speed", type=_positive, default=1.0, metavar="X",
                   help="replay X times faster, timings scaled (default 1: real time, about 40 s)")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", metavar="FILE.mid", help="replay a MIDI file as if played live, then stop")
    p.add_argument("--quiet", action="store_true", help="no live view")
    p.add_argument("--api", choices=["alsa", "jack", "coremidi", "winmm", "auto"],
                   help="the MIDI system (default: midi.api of the configuration)")
    p.add_argument("--duration", type=_positive, metavar="S", help="stop after S seconds")
    p.add_argument("--model", metavar="NAME", help="zone, closest, a shipped model name or an .onnx path "
                   "(default: instrument.model, falling back to instrument.fallback)")


def _add_ports(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", choices=["alsa", "jack", "coremidi", "winmm", "auto"],
                   help="the MIDI system to ask (default: midi.api of the configuration)")


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--notes", type=int, default=2000, help="notes played at realistic densities (default 2000)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--png", metavar="PATH", help="write a histogram of both latency distributions")
    from coplayer.io.real import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="the ports of every process: coplayer's JACK client or python-rtmidi (default: auto)")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["instrument"], help="which model to train")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="options passed to the trainer (see: coplayer train instrument --help-trainer)")


ADDERS = {
    "config": _add_config,
    "arrange": _add_arrange,
    "continue": _add_continue,
    "eval": _add_eval,
    "train": _add_train,
    "run": _add_run,
    "demo": _add_demo,
    "ports": _add_ports,
    "bench": _add_bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coplayer",
        description="A real-time MIDI co-performer: live instrumentation and call and response.",
    )
    parser.add_argument("--version", action="version", version=f"coplayer {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: ./config.yaml if present, else the packaged default)",
    )
    common.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one configuration value, e.g. --set tempo.bpm=96 (repeatable)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, func) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=summary, description=summary)
        p.set_defaults(func=func)
        ADDERS.get(name, lambda _p: None)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CoplayerError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"coplayer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coplayer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `coplayer eval ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
