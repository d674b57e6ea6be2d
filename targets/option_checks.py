"""Value checks that several targets' option dataclasses share (light: no toolchain import).

Called from ``__post_init__``, so the checks hold for options built in Python as well as for
those parsed from ``--option KEY=VALUE``; ``targets.base.parse_options`` turns the ValueError
into an error naming the target.
"""

from __future__ import annotations

from typing import Any

from s2dit_deploy.socs import resolve_soc


def require_at_least(opts: Any, name: str, low: int) -> None:
    """``opts.<name> >= low``, else a ValueError naming the option."""
    value = getattr(opts, name)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def canonical_soc(opts: Any) -> None:
    """Replace ``opts.soc`` (any accepted spelling) by its canonical SoC id, or raise naming it."""
    object.__setattr__(opts, "soc", resolve_soc(opts.soc, flag="option soc").name)
