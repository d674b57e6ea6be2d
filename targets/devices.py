"""Phone profiles (``devices.json``) as frozen dataclasses: what the cost model knows of each device.

The figures are data with their sources, not code: peaks per precision for the NPU, GPU and CPU,
memory bandwidth and the known limits. Where a vendor publishes no peak (Qualcomm's HTP) the
profile carries a ``nominal`` figure that the calibration's efficiency factors correct.
``export`` also reads the compile target (and SoC) for a device from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from s2dit_deploy.errors import UsageError

PROFILES_FILE = Path(__file__).with_name("devices.json")
UNITS = ("npu", "gpu", "cpu")


@dataclass(frozen=True)
class Unit:
    """One compute unit: peak ops/s (1e12) per precision ("int8", "fp16", "fp32")."""

    name: str
    peak: tuple[tuple[str, float], ...]
    published: bool
    source: str

    def tops(self, precision: str) -> float:
        table = dict(self.peak)
        if precision in table:
            return table[precision]
        if precision == "int8" and "fp16" in table:  # no int8 path: int8 runs at the fp16 rate
            return table["fp16"]
        return table.get("fp16", min(table.values()))


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    soc: str
    family: str
    target: str
    soc_id: str | None
    bandwidth_gbs: float
    units: tuple[tuple[str, Unit], ...]
    limits: tuple[tuple[str, Any], ...] = field(default=())
    sources: tuple[str, ...] = field(default=())

    def unit(self, name: str) -> Unit:
        return dict(self.units)[name]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "soc": self.soc, "family": self.family, "target": self.target,
                "soc_id": self.soc_id, "bandwidth_gbs": self.bandwidth_gbs,
                "units": {n: {"name": u.name, "peak_tops": dict(u.peak), "published": u.published,
                              "source": u.source} for n, u in self.units},
                "limits": dict(self.limits), "sources": list(self.sources)}


def _unit(raw: dict[str, Any], where: str) -> Unit:
    peak = {k: v for k, v in (raw.get("peak") or {}).items() if v is not None}
    published = bool(peak)
    if not peak:
        peak = dict(raw.get("nominal") or {})
    if not peak or any(not isinstance(v, (int, float)) or v <= 0 for v in peak.values()):
        raise ValueError(f"{PROFILES_FILE.name}: {where} has no positive peak or nominal figure")
    return Unit(raw.get("name", ""), tuple(sorted(peak.items())), published, raw.get("source", ""))


@lru_cache(maxsize=1)
def load_profiles() -> dict[str, DeviceProfile]:
    data = json.loads(PROFILES_FILE.read_text())
    out = {}
    for did, raw in data["devices"].items():
        units = tuple((u, _unit(raw[u], f"{did}.{u}")) for u in UNITS if u in raw)
        bw = raw["memory"]["bandwidth_gbs"]
        if not isinstance(bw, (int, float)) or bw <= 0:
            raise ValueError(f"{PROFILES_FILE.name}: {did}.memory.bandwidth_gbs must be positive")
        out[did] = DeviceProfile(did, raw["name"], raw["soc"], raw["family"], raw["target"], raw.get("soc_id"),
                                 float(bw), units, tuple(sorted((raw.get("limits") or {}).items())),
                                 tuple(raw[u]["source"] for u in (*UNITS, "memory") if u in raw))
    return out


def get_device(device_id: str, flag: str = "--device") -> DeviceProfile:
    """The profile of ``device_id``; a UsageError listing the known devices otherwise."""
    profiles = load_profiles()
    key = str(device_id).strip().lower().replace("_", "-").replace(" ", "-")
    if key not in profiles:
        known = ", ".join(f"{p.id} ({p.name}, {p.soc})" for p in profiles.values())
        raise UsageError(f"{flag} {device_id!r} is not a known device; known devices: {known}")
    return profiles[key]


def list_devices() -> list[DeviceProfile]:
    return list(load_profiles().values())
