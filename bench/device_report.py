"""The Table A3 estimate users read: per stage ms, calls per chunk, ms per chunk, FPS, band, bound.

It prices a bundle (op lists read from its artifacts) or a model / checkpoint (the traced float
graph at a precision) on one device profile. Every figure is labelled an estimate of cost model
v1 with what it was calibrated on; the band comes from the family's leave-one-model-out errors.
Both commit modes are reported: ``clean`` (a 5th DiT call per chunk on the clean chunk, what the
pipeline runs by default) and ``last-step`` (Table A3's 4 calls).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from s2dit_deploy.model_zoo.pipeline import COMMIT_MODES, dit_calls_per_chunk
from s2dit_deploy.stages import STAGE_NAMES
from s2dit_deploy.targets.devices import DeviceProfile, get_device

from .calibration import calibration_label
from .cost_model import MODEL_VERSION, estimate_ops, family_params

log = logging.getLogger(__name__)

def _band(ms: float, info: dict[str, Any]) -> list[float] | None:
    q = info.get("leave_one_model_out_signed")
    if not q:
        return None
    return [ms / (1 + q["p90"]), ms / (1 + q["p10"])]  # published = predicted / (1 + error)


def _unit_label(off_share: float, main: str, ops) -> str:
    if main != "npu" or off_share < 0.005:
        return main
    if off_share > 0.995:  # e.g. an XNNPACK bundle: the whole stage on the CPU
        units = {o.unit for o in ops} - {"npu"}
        return "/".join(sorted(units))
    return f"npu ({off_share:.0%} of time off it)"


def _known_precision(quant: str | None) -> str:
    """A bundle's quant as a precision the cost model knows; a custom plan's name falls back to fp16
    activations (its weights' bits are read from the artifact all the same)."""
    from s2dit_deploy.quant.plan import PRESETS

    from .cost_model import PLAIN

    if quant in PLAIN or quant in PRESETS:
        return quant
    if quant:
        log.warning("bundle quant %r is not a preset: estimating with fp16 activations (weight bits from the artifact)",
                    quant)
    return "fp16"


def _sources(source: str | os.PathLike, checkpoint: str | None, precision: str | None):
    """(config, {stage: (ops, origin)}, precision, bundle target or None)."""
    from s2dit_deploy.bundle import is_bundle_dir, load_bundle

    path = Path(str(source))
    if path.is_dir() and is_bundle_dir(path):
        from s2dit_deploy.model_zoo.config import ModelConfig

        from .artifact_ops import bundle_stage_ops

        bundle = load_bundle(path)
        config = ModelConfig.from_dict(bundle.model["config"])
        ops = {s: bundle_stage_ops(bundle, s) for s in STAGE_NAMES if s in bundle.artifacts}
        return config, ops, precision or _known_precision(bundle.info.get("quant")), bundle.target
    from s2dit_deploy.model_zoo.registry import resolve

    from .stage_ops import stage_ops

    config, _ = resolve(str(source), checkpoint)
    ops = {s: (stage_ops(config, s), "traced float graph (meta device)") for s in STAGE_NAMES}
    return config, ops, precision or "fp16", None


def estimate(source: str | os.PathLike, device: str | DeviceProfile, precision: str | None = None,
             checkpoint: str | None = None, steps: int | None = None, decoder_unit: str | None = None,
             fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Table A3 estimate of a bundle or a model on ``device`` (see module docstring)."""
    dev = device if isinstance(device, DeviceProfile) else get_device(device)
    config, ops, precision, bundle_target = _sources(source, checkpoint, precision)
    params, info = family_params(dev.family, fit)
    # the seed deploys the decoder on the iPhone GPU (supplement D.2); HTP takes it on Snapdragon
    decoder_unit = decoder_unit or ("gpu" if dev.family == "apple-ane" else "npu")
    steps = steps or config.steps
    stages: dict[str, Any] = {}
    for name, (op_list, origin) in ops.items():
        if name == "decoder" and bundle_target is None:
            op_list = [o.with_unit(decoder_unit) for o in op_list]
        est = estimate_ops(op_list, dev, precision, name, params)
        d = est.as_dict()
        d.update({"origin": origin, "ops": len(op_list), "band_ms": _band(d["ms"], info),
                  "unit": _unit_label(est.off_npu_share, decoder_unit if name == "decoder" and bundle_target is None
                                      else "npu", op_list),
                  "gflops": sum(o.flops for o in op_list) / 1e9})
        stages[name] = d
    frames = config.stream.chunk_frames * 4
    modes = {}
    for mode in COMMIT_MODES:
        calls = {"text_encoder": 0, "dit_step": dit_calls_per_chunk(steps, mode), "decoder": 1}
        ms = sum(stages[s]["ms"] * calls[s] for s in stages)
        modes[mode] = {"dit_calls_per_chunk": calls["dit_step"], "ms_per_chunk": ms,
                       "ms_per_chunk_with_text": ms + stages.get("text_encoder", {}).get("ms", 0.0),
                       "fps": frames / (ms / 1e3) if ms else None}
    return {"label": calibration_label(dev.family, info), "cost_model": MODEL_VERSION,
            "device": dev.as_dict(), "model": config.name, "precision": precision,
            "resolution": f"{config.height}x{config.width}", "frames_per_chunk": frames, "steps": steps,
            "bundle_target": bundle_target, "calibration": info, "stages": stages, "commit_modes": modes}


def to_markdown(rep: dict[str, Any]) -> str:
    d, lab = rep["device"], rep["label"]
    lines = [f"# {rep['model']} on {d['name']} ({d['soc']}): Table A3 layout", "",
             f"**{lab}** — not measured. Precision {rep['precision']}, {rep['resolution']} (HxW), "
             f"{rep['frames_per_chunk']} frames per chunk, {rep['steps']} denoising steps.", "",
             "| stage | unit | ms / call | band (ms) | calls / chunk | ms / chunk | bound | GFLOPs | ops from |",
             "|---|---|---|---|---|---|---|---|---|"]
    clean = rep["commit_modes"]["clean"]
    calls = {"text_encoder": 1, "dit_step": clean["dit_calls_per_chunk"], "decoder": 1}
    for s, e in rep["stages"].items():
        band = "–" if not e["band_ms"] else f"{e['band_ms'][0]:.1f}–{e['band_ms'][1]:.1f}"
        per_chunk = e["ms"] * calls[s]
        lines.append(f"| {s} | {e['unit']} | {e['ms']:.1f} | {band} | {calls[s]} | {per_chunk:.1f} | "
                     f"{e['bound']} | {e['gflops']:.1f} | {e['origin']} |")
    off = {s: e["off_npu_share"] for s, e in rep["stages"].items() if e["off_npu_share"] > 0.005}
    if off:
        lines += ["", "GPU / CPU time rests on unfitted efficiencies (no calibration row runs there; "
                      "`cost_model.UNFITTED_UNIT_EFF`): " + ", ".join(f"{s} {v:.0%} of its time" for s, v in off.items())
                  + "."]
    lines += ["", "| commit mode | DiT calls / chunk | ms / chunk (+ text once) | FPS |", "|---|---|---|---|"]
    for m, v in rep["commit_modes"].items():
        fps = "–" if v["fps"] is None else f"{v['fps']:.1f}"
        lines.append(f"| {m} | {v['dit_calls_per_chunk']} | {v['ms_per_chunk']:.0f} "
                     f"({v['ms_per_chunk_with_text']:.0f}) | {fps} |")
    cf = rep.get("commit_fidelity")
    if cf:
        lines += ["", f"Commit fidelity (float {cf['model']}, {len(cf['prompts'])} prompts x {cf['chunks']} chunks, "
                      "measured on this host): last-step vs clean decoded-stream PSNR "
                      f"{cf['psnr_db']:.2f} dB (per chunk from chunk 1: "
                      + ", ".join(f"{v:.1f}" for v in cf["psnr_db_per_chunk"].values()) + " dB); boundary jump "
                      f"clean {cf['boundary_jump']['clean']:.3f}, last-step {cf['boundary_jump']['last-step']:.3f} "
                      "(1.0 = a chunk boundary looks like any other frame step)."]
    for s, e in rep["stages"].items():
        lines += ["", f"## {s}: top ops", "", "| op | kind | unit | group | ms | bound | GFLOPs | MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for o in e["top_ops"]:
            lines.append(f"| {o['op']} | {o['kind']} | {o['unit']} | {o['group']} | {o['ms']:.2f} | {o['bound']} | "
                         f"{o['gflops']:.2f} | {o['mbytes']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rep: dict[str, Any], path: Path) -> Path:
    """PNG: ms per chunk per stage (both commit modes) and the DiT step per block group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (mode, v) in enumerate(rep["commit_modes"].items()):
        left = 0.0
        for s, e in rep["stages"].items():
            calls = 1 if s != "dit_step" else v["dit_calls_per_chunk"]
            w = e["ms"] * calls
            a1.barh(i, w, left=left, label=s if i == 0 else None)
            left += w
    a1.set_yticks(range(len(rep["commit_modes"])), [f"commit {m}" for m in rep["commit_modes"]])
    a1.set_xlabel("ms per chunk (estimate)")
    a1.legend(loc="lower right", fontsize=8)
    groups = rep["stages"].get("dit_step", {}).get("groups", [])[:14]
    a2.barh([g["group"] for g in groups][::-1], [g["ms"] for g in groups][::-1], color="tab:orange")
    a2.set_xlabel("ms per DiT step (estimate)")
    a2.set_title("dit_step by block group", fontsize=9)
    fig.suptitle(f"{rep['model']} on {rep['device']['name']}: {rep['label']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(rep: dict[str, Any], out_dir: str | os.PathLike, stem: str = "device_estimate") -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(rep, indent=1, allow_nan=False) + "\n"), (".md", to_markdown(rep))):
        p = out / f"{stem}{suffix}"
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)
        paths.append(p)
    paths.append(plot(rep, out / f"{stem}.png"))
    return paths
