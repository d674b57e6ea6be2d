"""`s2dit-deploy` command line: every subcommand has --help and --json."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator

from .commands import COMMANDS


class UserError(Exception):
    """An error whose message is the whole story (no traceback needed)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2dit-deploy",
        description="Compile, quantize, validate and benchmark S2DiT streaming text-to-video for phones.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = command.add_parser(sub)
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        p.set_defaults(_run=command.run)
    return parser


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """While a command runs, send whatever writes to stdout (libraries' prints, native QNN / XNNPACK
    logs on file descriptor 1) to stderr, so that stdout carries only the command's result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        try:
            import ctypes

            ctypes.CDLL(None).fflush(None)  # native buffers still holding output for fd 1
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        with stdout_to_stderr():
            result, text = args._run(args)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError, AssertionError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if args.json:
            print(json.dumps({"error": type(exc).__name__, "message": str(msg)}))
        else:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
