"""The public functions behind ``import s2dit_deploy as sd``."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .model_zoo import registry, stats
from .model_zoo.pipeline import Pipeline
from .model_zoo.pipeline import load_pipeline as _load_pipeline


def model_summary(name: str, with_flops: bool = False) -> dict[str, Any]:
    """A model card as data: sizes, resolution, streaming geometry and (optionally) FLOPs."""
    card = registry.get_card(name)
    cfg = card.config
    params = stats.stage_params(cfg)
    info: dict[str, Any] = {
        "name": cfg.name,
        "description": card.description,
        "intended_use": card.intended_use,
        "layout": cfg.dit.layout,
        "params": {**params, "total": sum(params.values())},
        "resolution": f"{cfg.height}x{cfg.width}",  # HxW, as --resolution takes it
        "height": cfg.height,
        "width": cfg.width,
        # the resolution to deploy at (pass it to `compile --resolution`); "resolution" is the checkpoint's
        "deploy_resolution": "{}x{}".format(*card.deploy_resolution),
        "chunk_latent_shape": list(cfg.chunk_latent_shape),
        "chunk_frames": cfg.stream.chunk_frames * 4,
        "cache_window_chunks": cfg.stream.window_chunks,
        "tokens_per_chunk_step": stats.tokens_per_chunk(cfg),
        "steps": cfg.steps,
        "weights": str(card.bundled_weights) if card.bundled_weights else "untrained (seeded init)",
    }
    if with_flops:
        info["dit_step_flops"] = stats.dit_step_flops(cfg)
        info["dit_step_flops_full_attention"] = stats.dit_step_flops(stats.with_full_attention(cfg))
    return info


def list_models(with_flops: bool = False) -> list[dict[str, Any]]:
    """Every registered model with its parameter counts (and FLOPs per chunk step if asked)."""
    return [model_summary(card.name, with_flops) for card in registry.list_cards()]


def load_model(name: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The float S2DiT of a registered model, or of a checkpoint folder."""
    return registry.load_model(name, checkpoint)


def compile(name: str, target: str = "coreml", quant: Any = None, out_dir: str | os.PathLike | None = None,
            **kwargs: Any):
    """Compile every stage of ``name`` for ``target`` into an atomic bundle folder."""
    from .compiler import compile_model

    return compile_model(name, target=target, quant=quant, out_dir=out_dir, **kwargs)


def validate(bundle: Any, **kwargs: Any) -> dict[str, Any]:
    """Fidelity of each stage of a bundle (and of the decoded stream) against the float model."""
    from .fidelity import validate as _validate

    return _validate(bundle, **kwargs)


def bench(bundle: Any, repeats: int = 20, warmup: int = 3, device: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Host timings (median, spread) and per-operator profiles of every stage of a bundle; with
    ``device``, the cost model's Table A3 estimate for that phone instead (``bundle`` may then also
    be a model name or checkpoint folder; kwargs: precision, checkpoint, steps)."""
    if device is not None:
        from .bench.device_report import estimate

        return estimate(bundle, device, **kwargs)
    from .bench.harness import bench_bundle

    return bench_bundle(bundle, repeats=repeats, warmup=warmup, **kwargs)


def load_pipeline(name: str, checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> Pipeline:
    """Text encoder + S2DiT + decoder + streaming sampler, ready to ``generate``."""
    return _load_pipeline(name, checkpoint, **kwargs)


def _checkpoint_output(out_dir: str | os.PathLike, force: bool):
    """The resolved folder ``init`` may write: missing, empty, or a checkpoint folder (nothing but
    checkpoint files: it is replaced whole); anything else only with ``force`` (exit 3)."""
    from .bundle import check_output_path
    from .errors import OutputExistsError
    from .model_zoo.checkpoint import is_checkpoint_dir

    path = check_output_path(out_dir, force=True)  # protected paths (/, home, cwd) are refused even so
    if force:
        return path
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputExistsError(f"--out {path} is an existing file, not a checkpoint folder; choose another "
                                "path or pass --force to replace it")
    if path.is_dir() and any(path.iterdir()) and not is_checkpoint_dir(path):
        raise OutputExistsError(f"--out {path} holds files that are not a s2dit-deploy checkpoint; choose "
                                "another folder or pass --force to replace it")
    return path


def init_checkpoint(name: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str = "fp16",
                    force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write a seeded checkpoint folder for a registered model (``s2dit-deploy init``).

    Returns {model, path, dtype, seed, files: [{name, bytes, sha256}], params, seconds}."""
    import time

    from .model_zoo.init_weights import DTYPES
    from .model_zoo.init_weights import init_checkpoint as _init

    card = registry.get_card(name)
    if dtype not in DTYPES:
        from .errors import UsageError

        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = _checkpoint_output(out_dir, force)
    t0 = time.perf_counter()
    result = _init(card.config, out, seed=seed, dtype=dtype, progress=progress)
    return {"model": card.name, "path": str(out), "dtype": dtype, "seed": seed, "files": result["files"],
            "params": result["params"], "seconds": round(time.perf_counter() - t0, 3)}


def calibrate(model: str = "s2dit-small", checkpoint: str | os.PathLike | None = None, target: str = "coreml",
              preset: str = "w4a8-mixed", **kwargs: Any) -> dict[str, Any]:
    """Calibrate 4/8-bit quantization against the float model and write a QuantPlan.

    ``w4a8-mixed`` measures per-layer sensitivity (round-to-nearest and GPTQ), allocates schemes
    under the ``w4a8-uniform`` size and keeps the allocation whose decoded stream is best; results
    are cached per model hash, target and resolution and reused by ``compile(quant="w4a8-mixed")``.
    kwargs: work, out, evaluate, threads, height, width, progress and the ``CalibrationSettings``
    fields (prompts, chunks, steps, calls, range_method, measure, estimate, budget_mb, avg_bits)."""
    from .quant.workflow import calibrate as _calibrate

    return _calibrate(model, checkpoint, target, preset, **kwargs)
