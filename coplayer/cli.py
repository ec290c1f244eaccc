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


COMMANDS = {
    "config": ("validate the configuration; --print shows the effective one", _cmd_config),
}


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print", action="store_true", help="print the effective configuration as YAML")


ADDERS = {
    "config": _add_config,
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
