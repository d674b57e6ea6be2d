"""What turns a compiled bundle into something an app can use without reading this project.

``write_app_assets`` adds, beside the artifacts of a complete (three-stage) bundle:

- ``host/tokenizer.json`` (``tokenizer_asset``), checked against the project's ids;
- ``host/tables/*.bin`` (``tables``): timestep rows in device form and the RoPE columns;
- ``host/host_loop.json`` (``host_loop``, schema ``host_loop.schema.json``);
- ``host/portable_rng.py`` and ``host/reference_host.py``: the standalone host;
- ``INTEGRATION.md`` (``integration``).

Every file lands in the partial bundle folder, so ``bundle._commit`` hashes it into the manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..bundle import Artifact
from ..model_zoo import portable_rng
from ..model_zoo.config import ModelConfig
from .host_loop import HOST_LOOP_FILE, build_host_loop, device_maps, schedule_spec, validate_host_loop
from .integration import integration_markdown
from .tables import rope_tables, t_table, timestep_rows, write_table
from .tokenizer_asset import write_tokenizer

REFERENCE_HOST = Path(__file__).with_name("reference_host.py")


def io_counts(artifact: Artifact, spec_stage: dict[str, Any]) -> dict[str, int]:
    """Device I/O of a stage, and the tensors an app converts per call before / after the spec.

    Before: every tensor whose device form differs from the contract's (what ``CoreMLRunner``
    converts each call). After: inputs that are neither carried state (kept in device form) nor
    table rows (stored in device form) and still need a transpose or a scale; a pure reshape is
    free (same memory order)."""
    ins, outs, _ = device_maps(artifact)
    moved = lambda m: m.perm is not None or m.scale != 1.0  # noqa: E731
    differs = lambda m: moved(m) or m.onehot is not None or m.sinusoidal is not None or m.host_shape != m.device_shape  # noqa: E731
    src = {i["name"]: i["source"]["from"] for i in spec_stage["inputs"]}
    after = sum(moved(m) for m in ins if src[m.name] not in ("state", "table"))
    after += sum(moved(m) for m in outs if not (m.name.startswith("entry.") or m.name.startswith("cache_out.")))
    return {"device_inputs": len(ins), "device_outputs": len(outs),
            "converted_per_call_before": sum(differs(m) for m in [*ins, *outs]), "converted_per_call_after": after}


def write_app_assets(root: Path, config: ModelConfig, target: str, artifacts: dict[str, Artifact],
                     soc: str | None = None) -> dict[str, Any]:
    """Write the host assets into bundle folder ``root``; the summary recorded in ``info``."""
    root = Path(root)
    length = config.text_encoder.max_position_embeddings
    tokenizer = {"file": "host/tokenizer.json", **write_tokenizer(root / "host" / "tokenizer.json", length)}
    values, rows, commit = timestep_rows()
    ins, _, _ = device_maps(artifacts["dit_step"])
    t_rows, missing = t_table(next(m for m in ins if m.name == "t"), values)
    tables = {"t.dit_step": write_table(root, "t.dit_step", t_rows)}
    for name, arr in rope_tables(config).items():
        tables[name] = write_table(root, name, arr)
    schedule = schedule_spec(config, values, rows, commit, missing)
    spec = build_host_loop(config, target, artifacts, tables, schedule, tokenizer)
    validate_host_loop(json.loads(json.dumps(spec)), "the generated host_loop.json")
    (root / HOST_LOOP_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    shutil.copyfile(REFERENCE_HOST, root / "host" / "reference_host.py")
    shutil.copyfile(portable_rng.__file__, root / "host" / "portable_rng.py")
    (root / "INTEGRATION.md").write_text(integration_markdown(spec, soc))
    host_bytes = sum(p.stat().st_size for p in (root / "host").rglob("*") if p.is_file())
    return {"host_loop": HOST_LOOP_FILE, "version": spec["version"], "integration": "INTEGRATION.md",
            "tables_bytes": sum(t["bytes"] for t in tables.values()), "host_bytes": host_bytes,
            "io": {name: io_counts(artifacts[name], spec["stages"][name]) for name in spec["stages"]},
            "steps_supported": sorted(int(k) for k in schedule["rows"])}
