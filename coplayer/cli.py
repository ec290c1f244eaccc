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
    else:
        print(f"configuration OK: {cfg.source}")
    return 0


def _cmd_arrange(args: argparse.Namespace) -> int:
    from coplayer.instrument.arrange import arrange_file

    cfg = _load_config(args)
    result = arrange_file(args.input, args.output, cfg, model=args.model, plot=args.plot)
    print(f"{result.summary()}; wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from coplayer.data.splits import load_split
    from coplayer.instrument.evaluate import default_models, evaluate_models, format_table

    cfg = _load_config(args)
    scores = load_split("test")[: args.limit]
    results = evaluate_models(args.models or default_models(), cfg, scores, seed=args.seed)
    if args.json:
        print("[\n" + ",\n".join(json.dumps(r.to_row()) for r in results) + "\n]")
    else:
        print(f"instrumentation accuracy on the test split ({len(scores)} pieces, seed {args.seed})\n")
        print(format_table(results))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from coplayer.demo import run_demo

    cfg = _load_config(args)
    result = run_demo(cfg, args.out, model=args.model)
    counts = ", ".join(f"{p} {n}" for p, n in result["parts"].items())
    print(f"instrumented {result['notes']} notes of the demo piece with {result['model']}: {counts}")
    print(f"wrote {result['out'] / 'session.mid'} and {result['out'] / 'roll.png'}")
    print(f"decision latency per note: {result['latency'].line()}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from coplayer.training import run_training

    return run_training(args.task, args.extra)


COMMANDS = {
    "config": ("validate the configuration; --print shows the effective one", _cmd_config),
    "arrange": ("instrument a MIDI file as if it were played live, one track per part", _cmd_arrange),
    "eval": ("measure a task on the test split (instrument: note-level accuracy)", _cmd_eval),
    "train": ("train a model from scratch (needs the train extra and a source checkout)", _cmd_train),
    "demo": ("instrument the bundled piece; write session.mid and roll.png, print latency", _cmd_demo),
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


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["instrument"], help="what to evaluate")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="zone, closest, shipped model names or .onnx paths "
                        "(default: zone, closest and every shipped instrument model)")
    p.add_argument("--limit", type=_count, metavar="N", help="only the first N test pieces")
    p.add_argument("--seed", type=int, default=0, help="seed of the live performances, protocol b (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON row per model and protocol")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default="out/demo", help="where to write session.mid and roll.png")
    p.add_argument("--model", metavar="NAME", help="zone, closest, a shipped model name or an .onnx path")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["instrument"], help="which model to train")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="options passed to the trainer (see: coplayer train instrument --help-trainer)")


ADDERS = {
    "config": _add_config,
    "arrange": _add_arrange,
    "eval": _add_eval,
    "train": _add_train,
    "demo": _add_demo,
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
