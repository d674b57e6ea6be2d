"""The Snapdragon SoCs the QNN targets build for, as plain data.

It lives in the shared core (no toolchain import) so that a bad ``--soc`` is caught before any model
is loaded, and so quant/ and every QNN target read one table instead of importing each other.
The ids are QNN's ``soc_model`` numbers (ExecuTorch's ``QcomChipset`` values); ``htp_arch`` is the
Hexagon tensor processor generation (v75 = ``HtpArch.V75``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Soc:
    """One SoC: its part number, QNN soc_model id, HTP architecture and marketing names."""

    name: str
    soc_model: int
    htp_arch: int
    marketing: str
    aliases: tuple[str, ...] = ()


SOCS: dict[str, Soc] = {s.name: s for s in (
    Soc("SM8550", 43, 73, "Snapdragon 8 Gen 2", ("8gen2",)),
    Soc("SM8650", 57, 75, "Snapdragon 8 Gen 3", ("8gen3",)),
    Soc("SM8750", 69, 79, "Snapdragon 8 Elite", ("8elite",)),
    Soc("SM8850", 87, 81, "Snapdragon 8 Elite Gen 5", ("8elitegen5",)),
)}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name)).lower().removeprefix("snapdragon")


_LOOKUP: dict[str, Soc] = {}
for _soc in SOCS.values():
    for _name in (_soc.name, _soc.marketing, *_soc.aliases):
        _LOOKUP[_key(_name)] = _soc


def resolve_soc(name: str, flag: str = "--soc") -> Soc:
    """'SM8750', 'sm8750' or 'Snapdragon 8 Elite' -> its :class:`Soc`; a UsageError otherwise."""
    soc = _LOOKUP.get(_key(name)) if isinstance(name, str) and name.strip() else None
    if soc is None:
        valid = ", ".join(f"{s.name} ({s.marketing})" for s in SOCS.values())
        raise UsageError(f"{flag} {name!r} is not a supported Snapdragon SoC; use one of: {valid}")
    return soc
