"""``chorus-node``: one console script, one sub-command per job.

Exit codes (documented in README): 0 ok, 1 unexpected internal error, 2 usage error, 3 input or
request refused (bad adapter, server said no), 4 node unreachable, 5 local I/O failure (disk full,
permission denied), 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import Callable, Sequence

from chorus_p2p import __version__
from chorus_p2p.cli import eval_cmds, node_cmds, offline, train_cmds
from chorus_p2p.cli.help import add_examples
from chorus_p2p.cli.quiet import quiet_third_party
from chorus_p2p.errors import ChorusError

EXIT_USAGE = 2
EXIT_IO = 5
EXIT_INTERRUPTED = 130

# Each module adds its sub-commands; a sub-command sets ``handler`` to a callable(args) -> int.
COMMAND_MODULES: list[Callable[[argparse._SubParsersAction], None]] = [
    node_cmds.register, offline.register, train_cmds.register, eval_cmds.register]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2, like our other errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chorus-node",
                     description="Serverless federated LoRA fine-tuning with exact aggregation.")
    parser.add_argument("--version", action="version", version=f"chorus-p2p {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug detail to stderr, and let transformers/PEFT warnings "
                             "and loading bars through")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for register in COMMAND_MODULES:
        register(commands)
    add_examples(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version: a code, like every other path
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_third_party(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except ChorusError as exc:
        print(f"chorus-node: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("chorus-node: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"chorus-node: error: {where}{reason}", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
