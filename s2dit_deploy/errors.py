"""The error classes every layer raises, each tied to one documented CLI exit code.

They live at the top of the package and import nothing, so model_zoo, quant, targets, validate
and bench can all raise them without importing each other. The CLI maps an exception to its
``exit_code``; anything not derived from ``S2DiTError`` is an internal error (exit 1).

Exit codes (docs/cli.md):

====  ==============================================================================
0     success
1     internal error: a bug or an unexpected failure (the JSON error says "internal")
2     usage error: a bad command line (unknown flag, malformed or out-of-range value)
3     input error: a config, checkpoint, bundle, manifest, plan or option is invalid,
      or the output path holds something that is not ours to overwrite
4     fidelity below floor: ``validate`` measured a stage under its PSNR floor
5     toolchain unavailable: the target's library or runtime is not installed here
6     compile check failed: an artifact failed its smoke run or does not match its plan
====  ==============================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_FIDELITY = 4
EXIT_UNAVAILABLE = 5
EXIT_COMPILE = 6


class S2DiTError(Exception):
    """Base of every error whose message is the whole story (no traceback needed)."""

    exit_code = EXIT_INTERNAL
    kind = "error"


class UsageError(S2DiTError, ValueError):
    """A command-line flag or value is malformed or out of range."""

    exit_code = EXIT_USAGE
    kind = "usage"


class InputError(S2DiTError, ValueError):
    """A config, checkpoint, bundle, manifest, plan or option the user gave is invalid."""

    exit_code = EXIT_INPUT
    kind = "input"


class OutputExistsError(InputError):
    """The output path holds files that are not ours to replace (pass --force to replace them)."""

    kind = "output_exists"


class FidelityFloorError(S2DiTError, AssertionError):
    """A compiled stage measured below its PSNR floor."""

    exit_code = EXIT_FIDELITY
    kind = "fidelity"


class ToolchainUnavailable(S2DiTError, RuntimeError):
    """A target's toolchain or runtime is not installed on this machine."""

    exit_code = EXIT_UNAVAILABLE
    kind = "unavailable"


class CompileCheckError(S2DiTError, RuntimeError):
    """A freshly compiled artifact failed its smoke run or does not carry the planned bits."""

    exit_code = EXIT_COMPILE
    kind = "compile_check"
