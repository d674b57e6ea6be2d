"""Weight size of every quantization preset of a model, per target (``python -m s2dit_deploy.quant.preset_sizes``).

Separate from ``size`` (pure accounting) because it needs the presets: ``plan`` already imports
``size``, so keeping this here keeps quant/'s import graph acyclic.
"""

from __future__ import annotations

from s2dit_deploy.model_zoo.registry import get_card

from .plan import FIXED_PRESETS, preset_plan
from .size import config_layout, plan_size


def preset_sizes(model: str, targets: tuple[str, ...] = ("coreml", "executorch-xnnpack")) -> list[dict]:
    """Size and average weight bits of every preset on each target, from a meta-device layout (no
    weights are loaded, so it works for s2dit-mobile; activation ranges do not change sizes)."""
    layouts = config_layout(get_card(model).config)
    unit = {s: {n: (-1.0, 1.0) for n in lay.layers} for s, lay in layouts.items()}
    rows = []
    for target in targets:
        for preset in FIXED_PRESETS:  # w4a8-mixed is allocated at the w4a8-uniform size
            sz = plan_size(preset_plan(preset, layouts, model, target, unit), layouts)
            rows.append({"model": model, "target": target, "preset": preset, "gb": sz["gb"],
                         "avg_weight_bits": sz["avg_weight_bits"],
                         "dit_gb": round(sz["stages"]["dit_step"]["bytes"] / 1e9, 4)})
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(description="weight size of every quantization preset of a model, per target")
    p.add_argument("--model", default="s2dit-mobile")
    p.add_argument("--targets", nargs="+", default=["coreml", "executorch-xnnpack"])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    rows = preset_sizes(a.model, tuple(a.targets))
    if a.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    for r in rows:
        sys.stdout.write(f"{r['target']:<20} {r['preset']:<13} {r['gb']:.3f} GB  {r['avg_weight_bits']:.2f} avg weight "
                         f"bits  (DiT {r['dit_gb']:.3f} GB)\n")


if __name__ == "__main__":
    main()
