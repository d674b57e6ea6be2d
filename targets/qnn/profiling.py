"""QNN profiling events of a ``.pte`` run under HTP emulation, read from ExecuTorch's ETDump.

A stage compiled with ``profile=True`` (QNN detailed profiling) and loaded with ``profile=True``
logs QNN's per-op events into the ETDump. On this x86 host they come from the HTP *emulator*:
they are emulator counters (per-op "(cycles)" events when QNN reports them, graph-level execute
cycles, VTCM / power-up times), useful to compare variants with each other, never phone latency.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LABEL = "QNN HTP emulator on x86 (emulator cycles/counters, never phone time)"


def read_events(program: Any, work_dir: Path) -> list[dict[str, Any]]:
    """Write the program's ETDump and return its delegate (QNN) events with raw values."""
    from executorch.devtools import Inspector

    work_dir.mkdir(parents=True, exist_ok=True)
    etdump, debug = work_dir / "qnn.etdp", work_dir / "qnn.debug.bin"
    program.write_etdump_result_to_file(str(etdump), str(debug))
    inspector = Inspector(etdump_path=str(etdump))
    events: list[dict[str, Any]] = []
    for block in inspector.event_blocks:
        for ev in block.events:
            if not ev.is_delegated_op and not (ev.delegate_backend_name or "").lower().startswith("qnn"):
                continue
            raw = [float(v) for v in (ev.perf_data.raw if ev.perf_data is not None else [])]
            # QNN names carry their unit ("(cycles)", "(us)", "(count)"); values are as Inspector
            # reports them (its default time scaling applied to the raw numbers).
            events.append({"name": ev.name, "values": raw, "source": LABEL})
    log.info("read %d QNN profiling events from %s", len(events), etdump)
    return events


def summarize_events(events: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    """QNN events as a bench profile: one row per event name, values per run in QNN's own unit."""
    rows: dict[str, dict[str, Any]] = {}
    for ev in events:
        row = rows.setdefault(ev["name"], {"op": ev["name"], "backend": "QnnBackend", "delegate": True,
                                           "values": []})
        row["values"].extend(ev["values"])
    ops = []
    for row in rows.values():
        vals = row.pop("values")
        row["calls_per_run"] = round(len(vals) / max(runs, 1), 2)
        row["value_per_run"] = round(sum(vals) / max(runs, 1), 4)
        ops.append(row)
    ops.sort(key=lambda r: -r["value_per_run"])
    return {"runs": runs, "ops": ops, "events": len(events), "unit": LABEL}
