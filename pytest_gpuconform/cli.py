"""The ``gpuconform`` command: ``inventory`` (this node as JSON), ``merge`` (many JUnit
reports into one), ``report`` (one HTML page), ``verdict`` (each node's verdict, one line).

Exit codes: 0 success (``verdict``: no node failed), 1 (``verdict`` only) a node failed,
2 bad input or an output that cannot be written (a message names the path and the reason;
nothing is written then).
"""

from __future__ import annotations

import argparse
import json
import sys


def _inventory(args: argparse.Namespace) -> int:
    from .node.inventory import collect
    from .reporting.junit import write_atomically

    text = json.dumps(collect().as_json(), indent=2, sort_keys=False) + "\n"
    if args.output and args.output != "-":
        write_atomically(text, args.output)
    else:
        print(text, end="")
    return 0


def _verdict(args: argparse.Namespace) -> int:
    from .reporting import insights
    from .reporting.fleet import FAILED, Fleet
    from .reporting.suites import check_inputs

    check_inputs(args.files)
    fleet = Fleet.read(args.files)
    results = insights.node_verdicts(fleet)
    for result in results:
        if args.first_failure:
            node = result.node
            check = next((i for i, code in enumerate(node.outcomes) if code >= FAILED), None)
            if check is not None:
                print(f"{node.label}\t{fleet.checks[check].display}\t{fleet.reason(node, check)}")
        elif args.kind:
            print(f"{result.node.label}\t{result.verdict.kind}")
        else:
            print(f"{result.node.label}: {result.verdict.text()}")
    return 1 if any(result.verdict.kind == "failed" for result in results) else 0


BAD_INPUT = " Exit 2 on a missing, empty or corrupt input or an output that cannot be written; nothing is written then."


def _files_to_file(commands, name: str, summary: str, description: str, inputs: str, output: tuple[str, str]):
    """A subcommand that reads JUnit files and writes one file (``-o``)."""
    parser = commands.add_parser(name, help=summary, description=description + BAD_INPUT)
    parser.add_argument("files", nargs="+", metavar="FILE", help=inputs)
    parser.add_argument("-o", "--output", required=True, metavar=output[0], help=output[1])
    return parser


def _add_merge(commands) -> None:
    from .reporting import merge

    parser = _files_to_file(
        commands,
        "merge",
        "merge JUnit reports of many nodes / ranks into one (host in suite and classname)",
        "Merge per-node / per-rank JUnit XML files into one report in which the same test from "
        "several nodes stays distinguishable.",
        "JUnit XML files (pytest --junitxml)",
        ("OUT", "merged JUnit XML to write"),
    )
    parser.set_defaults(func=lambda args: merge.run(args.files, args.output))


def _add_report(commands) -> None:
    from .reporting import html

    parser = _files_to_file(
        commands,
        "report",
        "write one self-contained HTML page (verdict, failures by cause, outliers, distributions)",
        "Render JUnit XML files (per node, or merged) as one self-contained HTML page.",
        "JUnit XML files (raw or merged)",
        ("HTML", "page to write"),
    )
    parser.add_argument("--title", default="GPU conformance report", help="page title")
    parser.set_defaults(func=lambda args: html.run(args.files, args.output, args.title))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuconform",
        description="Tools of pytest-gpuconform. Run the suite itself with: pytest --gpuconform",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inv = commands.add_parser("inventory", help="print this node's inventory (versions, driver, GPUs) as JSON")
    inv.add_argument("-o", "--output", default="-", help="write the JSON to this file (default: stdout)")
    inv.set_defaults(func=_inventory)
    _add_merge(commands)
    _add_report(commands)
    verdict = commands.add_parser(
        "verdict",
        help="print each node's verdict in one line (exit 1 when a node failed)",
        description="Read JUnit files (per node, or merged) and print one line per node: its verdict and "
        "what was verified. With --first-failure, print the first failing check of each failed node "
        "instead (what the Slurm template puts in the drain reason).",
    )
    verdict.add_argument("files", nargs="+", metavar="FILE", help="JUnit XML files (raw or merged)")
    only = verdict.add_mutually_exclusive_group()
    only.add_argument(
        "--first-failure",
        action="store_true",
        help="print '<host> TAB <check> TAB <reason>' of each failed node (for scripts)",
    )
    only.add_argument(
        "--kind",
        action="store_true",
        help="print '<host> TAB <kind>' per node, kind one of passed, failed, cpu (passed as a CPU node), "
        "nothing (not verified: no check ran, or none on a GPU); for scripts that label nodes",
    )
    verdict.set_defaults(func=_verdict)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .reporting.junit import UnwritableOutput
    from .reporting.suites import BadReport

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (BadReport, UnwritableOutput) as exc:
        print(f"gpuconform {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, str):
        print(result)
        return 0
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
