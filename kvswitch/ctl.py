"""kvswitchctl: operator and developer commands.

Operator commands live here. Commands that need the test kit (``sandbox``, ``clean-runs``) come
from the ``kvswitch-testbed`` distribution through the ``kvswitchctl.commands`` entry-point group,
so the product never imports the test kit and works without it installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable
from typing import Any

COMMANDS_GROUP = "kvswitchctl.commands"
# A registrar adds its sub-command and sets ``func`` (args -> exit code) as the parser default.
Registrar = Callable[[Any], None]


def _registrars() -> list[Registrar]:
    return [ep.load() for ep in importlib.metadata.entry_points(group=COMMANDS_GROUP)]


def build_parser(registrars: list[Registrar] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvswitchctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrars() if registrars is None else registrars:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
