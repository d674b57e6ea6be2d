"""`s2dit-deploy` command line: every subcommand has --help and --json.

With ``--json`` stdout carries exactly one strict JSON document (no NaN/Infinity) on success and
on every failure, so scripts can always parse it; the exit code says which kind of failure it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn

from .commands import COMMANDS
from .errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, S2DiTError, UsageError

log = logging.getLogger(__name__)

EXIT_CODES_EPILOG = """exit codes:
  0  success
  1  internal error (a bug; with --json: {"error": "internal", ...}, traceback on stderr)
  2  usage error: unknown flag, malformed or out-of-range value
  3  input error: bad config, checkpoint, bundle, plan or option, or an output not ours to overwrite
  4  fidelity below floor (validate)
  5  toolchain unavailable: the target's library or runtime is not installed
  6  compile check failed: an artifact failed its smoke run or does not match its plan
with --json, stdout is always one JSON document; errors look like
  {"error": KIND, "type": CLASS, "message": TEXT}; a PSNR of null means the outputs were identical."""

UserError = UsageError  # kept for callers of the old name


class JsonArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are JSON on stdout when the command line asked for --json."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            emit({"error": "usage", "type": "UsageError", "message": f"{self.prog}: {message}"})
            sys.exit(EXIT_USAGE)
        super().error(message)


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    parser = JsonArgumentParser(
        prog="s2dit-deploy",
        description="Compile, quantize, validate and benchmark S2DiT streaming text-to-video for phones.",
        epilog=EXIT_CODES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.json_errors = json_errors
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_subparser_class(json_errors))
    for command in COMMANDS:
        p = command.add_parser(sub)
        if not any("--json" in a.option_strings for a in p._actions):
            p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        p.set_defaults(_run=command.run)
    return parser


def _subparser_class(json_errors: bool) -> type:
    return type("SubParser", (JsonArgumentParser,), {"json_errors": json_errors})


def finite(obj: Any) -> Any:
    """A copy of ``obj`` where non-finite floats are None, so it dumps as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return finite(obj.item())  # numpy / torch scalars
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def emit(obj: Any) -> None:
    """Print ``obj`` as strict JSON on stdout."""
    print(json.dumps(finite(obj), indent=2, allow_nan=False, default=str))


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


def _error_record(exc: BaseException) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, S2DiTError):
        code, kind = exc.exit_code, exc.kind
    elif isinstance(exc, FileNotFoundError):  # a path the user named does not exist
        code, kind = EXIT_INPUT, "input"
    else:
        code, kind = EXIT_INTERNAL, "internal"
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    record = {"error": kind, "type": type(exc).__name__, "message": str(msg)}
    record.update(getattr(exc, "payload", None) or {})
    return code, record


def _shutdown_distributed() -> None:
    """End the process group a training command started under torchrun (nothing otherwise; torch
    is not imported for commands that never loaded it)."""
    if "torch.distributed" in sys.modules:
        from .reference_training.common import shutdown_distributed

        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    args = build_parser(json_errors=want_json).parse_args(argv)
    want_json = bool(getattr(args, "json", False))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, only rank 0 writes to stdout
    try:
        with stdout_to_stderr():
            result, text = args._run(args)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: every failure gets an exit code
        code, record = _error_record(exc)
        if code == EXIT_INTERNAL:
            traceback.print_exc(file=sys.stderr)
        payload = getattr(exc, "report", None)
        if rank != 0:
            print(f"error (rank {rank}): {record['message']}", file=sys.stderr)
        elif want_json:
            emit({**({"report": payload} if payload is not None else {}), **record})
        else:
            if getattr(exc, "text", None):
                print(exc.text)  # e.g. validate's table, still shown below a floor
            print(f"error: {record['message']}", file=sys.stderr)
        return code
    finally:
        _shutdown_distributed()
    if rank != 0:
        return EXIT_OK
    if want_json:
        emit(result)
    else:
        print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
