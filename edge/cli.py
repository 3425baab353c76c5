"""The `lineinspect` command.

Each package contributes its sub-commands through a module with a
``register(subparsers)`` function listed in :data:`COMMAND_MODULES`; a
sub-command stores its handler as ``func`` (``args -> exit code``). Heavy
imports (torch, onnxruntime, pymodbus...) belong inside the handlers, so
``lineinspect --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edge import __version__

COMMAND_MODULES = (
    "edge.config_cli",  # config check | schema
    "edge.capture.cli",  # synth, capture
    "edge.app_cli",  # run, demo, doctor
    "models.cli",  # teach, eval, model keygen|sign|verify|info
    "plc.cli",  # plc-sim
    "cloud_sync.cli",  # agent, fleet
    "edge.web.cli",  # panel user management
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lineinspect",
        description="LineInspect: edge industrial inspection appliance.",
    )
    parser.add_argument("--version", action="version", version=f"lineinspect {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
