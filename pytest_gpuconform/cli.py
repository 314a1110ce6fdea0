"""The ``gpuconform`` command: ``inventory`` (this node as JSON), ``merge`` (many JUnit
reports into one), ``report`` (one HTML page).

Exit codes: 0 success, 2 bad input (a usage error or an unreadable file).
"""

from __future__ import annotations

import argparse
import json
import sys


def _inventory(args: argparse.Namespace) -> int:
    from .node.inventory import collect

    data = collect().as_json()
    text = json.dumps(data, indent=2, sort_keys=False)
    if args.output and args.output != "-":
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuconform",
        description="Tools of pytest-gpuconform. Run the suite itself with: pytest --gpuconform",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inv = commands.add_parser("inventory", help="print this node's inventory (versions, driver, GPUs) as JSON")
    inv.add_argument("-o", "--output", default="-", help="write the JSON to this file (default: stdout)")
    inv.set_defaults(func=_inventory)
    from .reporting import html, merge

    merge.add_command(commands)
    html.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
