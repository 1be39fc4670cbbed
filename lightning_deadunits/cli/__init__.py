"""The ``deadunits`` command: ``scan`` a checkpoint, ``diff`` two, ``dump show`` a spike dump, ``report`` on a run."""

import argparse
from collections.abc import Sequence

from . import diff, dump, report, scan

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``deadunits`` command; return its exit code (2 for unreadable input)."""
    parser = argparse.ArgumentParser(prog="deadunits", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (scan, diff, dump, report):
        command.register(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))
