"""Sensitivity analysis: quantize one layer at a time, measure the stage output against float.

For each quantizable layer of a stage (default ``dit_step``) the runner measures, on a few captured
calibration calls, the output error with (a) only the layer's input activations quantized and
(b) each measured weight scheme plus those activations. The error is kept as output noise power
(MSE), so contributions add up for the allocator; PSNR = 10 log10(peak^2 / MSE).

Schemes that are not measured are estimated from the measured one through the layer-local error
ratio sum_cj dW_cj^2 E[x_j^2] (weight error weighted by the calibrated per-feature input power):
noise(s) ~ noise_act + (noise(measured) - noise_act) * local(s) / local(measured). Each entry
records whether it was measured or estimated. Results are cached as JSON keyed by model hash,
calibration hash and settings, written after every layer, so an interrupted run resumes.
The cumulative curve quantizes layers in sensitivity order and measures the stage output (and
optionally the decoded first chunk) at a few points.

Error that compounds: a denoising call's velocity error dies with the chunk, but the commit pass
(t = 0) writes the KV / LCHA states every later chunk attends to. So each measurement also runs
the commit call(s) of the scored chunks (their velocity counts too, as in ``sd.validate``'s DiT
step PSNR) and records ``state_mse``: the mean, over cache entries,
of each entry's MSE relative to its own peak, expressed in velocity units (times peak^2) so the
allocator can add it to the velocity noise with a weight (``allocate.layer_costs``).

``-gptq`` schemes are measured, never estimated: their rounded weights come from GPTQ over the
stage's calibration calls (``gptq.py``), computed once per runner and kept in ``rounded``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import CalibrationSet, model_hash
from .fake_quant import WeightCache, quantizable_layers, quantized
from .gptq import CONFIG as GPTQ_CONFIG
from .gptq import gptq_round
from .plan import LayerQuant
from .schemes import fits, weight_scheme
from .size import STAGE_MODULES

log = logging.getLogger(__name__)


def _mse(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float((ref.double() - x.double()).pow(2).mean())


def psnr_from_mse(mse: float, peak: float) -> float:
    return math.inf if mse <= 0 else 10 * math.log10(peak * peak / mse)


def eval_calls(calib: CalibrationSet, n: int) -> list[int]:
    """``n`` denoising calls (t > 0) spread over timesteps, preferring later chunks (full caches)."""
    info = calib.call_info("dit_step")
    cand = [i for i, c in enumerate(info) if not c.get("commit")]
    cand.sort(key=lambda i: (-info[i]["chunk"], info[i]["prompt_index"], -info[i]["t"]))
    if not cand:
        raise ValueError("calibration set has no dit_step denoising calls")
    step = max(1, len([i for i in cand if info[i]["chunk"] == info[cand[0]]["chunk"]]) // max(n, 1))
    picked = cand[::step][:n]
    return sorted(picked)


def commit_calls(calib: CalibrationSet, scored: list[int]) -> list[int]:
    """The commit passes (t = 0) of the chunks the scored calls belong to: they write the caches."""
    info = calib.call_info("dit_step")
    chunks = {(info[i]["prompt_index"], info[i]["chunk"]) for i in scored}
    return [i for i, c in enumerate(info) if c.get("commit") and (c["prompt_index"], c["chunk"]) in chunks]


def local_error(layer: nn.Module, w_hat: torch.Tensor, mean_sq: list[float] | None) -> float:
    """sum_cj (W - W_hat)_cj^2 E[x_j^2]: the layer-output error power for a calibrated input."""
    d = (layer.weight.detach().float() - w_hat.float()).pow(2)
    if mean_sq is None or isinstance(layer, nn.Embedding):
        return float(d.sum())
    m = torch.tensor(mean_sq, dtype=torch.float32)
    d2 = d.reshape(d.shape[0], d.shape[1], -1).sum(-1)  # (out, in_per_group)
    groups = getattr(layer, "groups", 1)
    if groups > 1:
        out_per_group = d2.shape[0] // groups
        idx = (torch.arange(d2.shape[0])[:, None] // out_per_group) * d2.shape[1] + torch.arange(d2.shape[1])
        return float((d2 * m[idx]).sum())
    if m.numel() != d2.shape[1]:
        return float(d.sum() * m.mean())
    return float((d2 * m[None]).sum())


class SensitivityRunner:
    """Per-layer and cumulative sensitivity of one stage, cached on disk."""

    def __init__(self, pipe, calib: CalibrationSet, stage: str = "dit_step", act: str = "int8",
                 range_method: str = "mse", n_calls: int = 2, cache_path: str | os.PathLike | None = None):
        from s2dit_deploy.stages import build_stages

        self.pipe, self.calib, self.stage, self.act, self.range_method = pipe, calib, stage, act, range_method
        self.module = getattr(pipe, STAGE_MODULES[stage])
        self.stage_obj = build_stages(pipe, (stage,))[stage]
        self.call_ids = eval_calls(calib, n_calls) if stage == "dit_step" else list(range(n_calls))
        self.commit_ids = commit_calls(calib, self.call_ids) if stage == "dit_step" else []
        all_calls = calib.calls(stage)
        self.all_calls = all_calls
        # the velocity is scored on the denoising calls and the commit passes, as sd.validate scores it
        self.inputs = [all_calls[i] for i in self.call_ids + self.commit_ids]
        self.n_denoise = len(self.call_ids)
        self.out_name = self.stage_obj.output_names[0]
        self.state_names = self.stage_obj.output_names[1:]
        ref_outs = [self.stage_obj.run_float(x) for x in self.inputs]
        self.refs = [o[self.out_name] for o in ref_outs]
        self.peak = max(float(r.abs().max()) for r in self.refs)
        self.state_refs = [{k: o[k] for k in self.state_names} for o in ref_outs[self.n_denoise:]]
        self.state_peaks = {k: max(float(s[k].abs().max()) for s in self.state_refs) or 1.0
                            for k in self.state_names} if self.state_refs else {}
        self.layers = {n: m for n, m in quantizable_layers(self.module).items()}
        self.stats = calib.stats.get(stage, {})
        self.wcache = WeightCache()
        self.rounded: dict[str, dict[str, torch.Tensor]] = {}  # scheme -> layer -> GPTQ-rounded weight
        key = json.dumps({"model": model_hash(pipe), "calib": calib.hash, "stage": stage, "act": act,
                          "range": range_method, "calls": self.call_ids, "commits": self.commit_ids,
                          "state_metric": 2, "gptq": GPTQ_CONFIG}, sort_keys=True)
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.cache_path = Path(cache_path) if cache_path else None
        self.results: dict[str, dict[str, Any]] = {}
        if self.cache_path and self.cache_path.is_file():
            saved = json.loads(self.cache_path.read_text())
            if saved.get("key") == self.key:
                self.results = saved["layers"]
                log.info("resuming sensitivity from %s (%d layers done)", self.cache_path, len(self.results))
            else:
                log.warning("sensitivity cache %s is for another model/calibration; starting over", self.cache_path)

    def gptq(self, scheme: str, progress: bool = False) -> dict[str, torch.Tensor]:
        """GPTQ-rounded weights of every Linear layer under ``scheme``, Hessians from all calibration calls."""
        if scheme not in self.rounded:
            names = {n: scheme for n, m in self.layers.items() if fits(scheme, tuple(m.weight.shape), type(m).__name__)}
            runs = [lambda x=x: self.stage_obj.run_float(x) for x in self.all_calls]
            self.rounded[scheme] = gptq_round(self.layers, names, runs, progress=progress)
            for n, w in self.rounded[scheme].items():
                self.wcache.put(n, scheme, w)
        return self.rounded[scheme]

    def layer_quant(self, name: str, weight: str) -> LayerQuant:
        st = self.stats.get(name)
        layer = self.layers[name]
        act = "float" if isinstance(layer, nn.Embedding) else self.act
        rng = st.range(self.range_method) if (st is not None and act not in ("float", "int8-dyn")) else None
        return LayerQuant(weight, act, rng)

    def measure(self, assignment: dict[str, LayerQuant]) -> dict[str, float]:
        """Output MSE / PSNR of the stage on the eval calls with ``assignment`` fake-quantized."""
        with quantized(self.module, assignment, self.wcache):
            full = [self.stage_obj.run_float(x) for x in self.inputs]
        outs = [o[self.out_name] for o in full]
        states = [{k: o[k] for k in self.state_names} for o in full[self.n_denoise:]]
        mse = sum(_mse(r, o) for r, o in zip(self.refs, outs)) / len(outs)
        out = {"mse": mse, "psnr": round(psnr_from_mse(mse, self.peak), 3)}
        if states:
            nmse = [_mse(ref[k], got[k]) / self.state_peaks[k] ** 2
                    for ref, got in zip(self.state_refs, states) for k in self.state_names]
            out["state_mse"] = sum(nmse) / len(nmse) * self.peak ** 2
        return out

    def _save(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "peak": self.peak, "calls": self.call_ids, "layers": self.results}))
        tmp.replace(self.cache_path)

    def per_layer(self, measured: tuple[str, ...] = ("int4-pc",), estimated: tuple[str, ...] = (),
                  layers: list[str] | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
        """Measure every layer (resumable); fill estimates for ``estimated`` schemes."""
        names = layers or list(self.layers)
        for s in measured:
            if weight_scheme(s).rounding == "gptq":
                self.gptq(s, progress)
        for name in tqdm(names, desc=f"sensitivity {self.stage}", unit="layer", disable=not progress):
            entry = self.results.setdefault(name, {})
            layer = self.layers[name]
            usable = [s for s in measured if fits(s, tuple(layer.weight.shape), type(layer).__name__)]
            todo = [s for s in ("act_only", *usable) if s not in entry or entry[s].get("estimated")]
            for s in todo:
                w = "fp16" if s == "act_only" else s
                entry[s] = self.measure({name: self.layer_quant(name, w)})
            self._fill_estimates(name, measured, estimated)
            if todo:
                self._save()
        self._save()
        return {n: self.results[n] for n in names}

    def _fill_estimates(self, name: str, measured, estimated) -> None:
        entry, layer = self.results[name], self.layers[name]
        bases = [s for s in measured if weight_scheme(s).rounding == "nearest" and s in entry]
        if not bases:
            return
        base = bases[0]  # estimates scale a round-to-nearest measurement by the local error ratio
        st = self.stats.get(name)
        ms = st.mean_sq if st is not None else None
        e_base = local_error(layer, self.wcache.get(name, layer, base), ms)
        entry.setdefault("local", {})[base] = e_base
        n_act, n_base = entry["act_only"]["mse"], entry[base]["mse"]
        s_act, s_base = entry["act_only"].get("state_mse"), entry[base].get("state_mse")
        for s in estimated:
            if s in entry and (not entry[s].get("estimated") or s in entry.get("local", {})):
                continue  # measured, or already estimated against the same measured point
            if weight_scheme(s).rounding == "gptq":
                continue  # GPTQ's gain is not a weight-error ratio: measured only
            if s != "fp16" and not fits(s, tuple(layer.weight.shape)):
                continue  # e.g. int4-b32 on a layer whose input size is not a multiple of 32
            e_s = local_error(layer, self.wcache.get(name, layer, s), ms) if s != "fp16" else 0.0
            entry["local"][s] = e_s
            ratio = e_s / e_base if e_base > 0 else 0.0
            mse = n_act + max(n_base - n_act, 0.0) * ratio
            entry[s] = {"mse": mse, "psnr": round(psnr_from_mse(mse, self.peak), 3), "estimated": True}
            if s_act is not None and s_base is not None:
                entry[s]["state_mse"] = s_act + max(s_base - s_act, 0.0) * ratio

    def cumulative(self, order: list[str], scheme: str, points: int = 6,
                   decoded: bool = False, progress: bool = True) -> list[dict[str, Any]]:
        """Quantize the first k layers of ``order`` (least sensitive first) to ``scheme``; measure."""
        ks = sorted({round(i * len(order) / (points - 1)) for i in range(points)}) if points > 1 else [len(order)]
        curve = []
        for k in tqdm(ks, desc="cumulative curve", unit="point", disable=not progress):
            assign = {n: self.layer_quant(n, scheme) for n in order[:k]}
            row = {"layers": k, "scheme": scheme, **self.measure(assign)}
            if decoded:
                row["decoded_psnr"] = round(self.decoded_psnr(assign), 3)
            curve.append(row)
        return curve

    def decoded_psnr(self, assignment: dict[str, LayerQuant]) -> float:
        """PSNR of the first decoded chunk of the first calibration trajectory vs float."""
        from s2dit_deploy.metrics import psnr

        meta = self.calib.meta
        prompt, seed = meta["prompts"][0], meta["seeds"][0]
        if not hasattr(self, "_ref_video"):
            self._ref_video = self.pipe.generate(prompt, num_chunks=1, steps=meta["steps"], seed=seed)
        with quantized(self.module, assignment, self.wcache):
            got = self.pipe.generate(prompt, num_chunks=1, steps=meta["steps"], seed=seed)
        return psnr(self._ref_video.astype("float32"), got.astype("float32"))


def sensitivity_order(results: dict[str, dict[str, Any]], scheme: str) -> list[str]:
    """Layers from least to most sensitive under ``scheme`` (weight + activation noise)."""
    return sorted(results, key=lambda n: results[n][scheme]["mse"])
