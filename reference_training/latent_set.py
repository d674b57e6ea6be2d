"""Training latents sampled from a trained model: the data of the search and pruning recipes.

No latent codec ships with the repository (only the bundled DiT, text encoder and decoder), and no
data may be downloaded, so the architecture recipes learn from the bundled model's own
distribution: clean latents x0 streamed with its 4-step sampler (caches and commit pass exactly as
deployed) from captions of the synthetic clip set, plus the text-encoder tokens of each caption.
Self-distillation (Eq. 10) and KD-guided pruning (Eq. 5-6) need nothing else: the teacher is a
model, and flow matching needs x0 samples of the distribution the teacher models.

A set is one safetensors file (``x0`` (N, 16, F, h, w), ``context`` (N, L, text_dim)) plus a
JSON record of its prompts, source and hash, written atomically; an existing set with the same
recipe is reused, so a resumed run never resamples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..model_zoo.checkpoint import atomic_folder, checkpoint_digest
from ..model_zoo.registry import load_stage, resolve
from ..model_zoo.sampler import FewStepSchedule
from .data import SyntheticVideoDataset, prompt_for
from .distill import self_forcing_rollout
from .models import token_ids

log = logging.getLogger(__name__)
FILE, META = "latents.safetensors", "latents.json"


@dataclass(frozen=True)
class LatentSetSpec:
    """What a set is sampled from; two specs that compare equal give the same tensors."""

    source: str  # model card or checkpoint folder
    count: int
    chunks: int = 2
    seed: int = 0  # prompt seed (captions) and noise seed
    steps: int = 4
    batch: int = 16


def captions(count: int, seed: int, height: int, width: int) -> list[str]:
    """Full captions of synthetic clips ``0..count-1`` of prompt seed ``seed`` (no rendering)."""
    ds = SyntheticVideoDataset(height, width, 1, seed=seed)
    return [prompt_for(ds.params(np.random.default_rng([seed, i]))) for i in range(count)]


@torch.no_grad()
def sample_latents(spec: LatentSetSpec, progress: bool = True) -> dict[str, torch.Tensor]:
    config, folder = resolve(spec.source)
    if folder is None:
        raise ValueError(f"{spec.source}: a latent set needs trained weights; this card has none bundled")
    te = load_stage(config, folder, "text_encoder").float()
    dit = load_stage(config, folder, "dit").float()
    prompts = captions(spec.count, spec.seed, config.height, config.width)
    schedule = FewStepSchedule(spec.steps)
    xs, ctxs = [], []
    for i in tqdm(range(0, spec.count, spec.batch), desc="latent set", disable=not progress):
        ctx = te(token_ids(prompts[i : i + spec.batch], config)).float()
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
        xs.append(self_forcing_rollout(dit, ctx, config.chunk_latent_shape, spec.chunks, schedule,
                                       config.stream, g, grad=False))
        ctxs.append(ctx)
    return {"x0": torch.cat(xs).contiguous(), "context": torch.cat(ctxs).contiguous(),
            "prompts": prompts, "config": config, "digest": checkpoint_digest(folder)}


def build_latent_set(folder: str | Path, spec: LatentSetSpec, progress: bool = True) -> Path:
    """Sample (or reuse) the set of ``spec`` in ``folder``; returns the folder."""
    folder = Path(folder)
    meta_path = folder / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == asdict(spec):
            log.info("reusing latent set %s (%s)", folder, meta["sha256"][:12])
            return folder
        raise FileExistsError(f"{folder} holds a latent set of another recipe ({meta.get('spec')}); "
                              "choose another folder")
    data = sample_latents(spec, progress)
    with atomic_folder(folder) as tmp:
        save_file({"x0": data["x0"], "context": data["context"]}, str(tmp / FILE))
        digest = hashlib.sha256((tmp / FILE).read_bytes()).hexdigest()
        meta = {"spec": asdict(spec), "prompts": data["prompts"], "sha256": digest,
                "source_digest": data["digest"], "model": data["config"].name,
                "resolution": [data["config"].height, data["config"].width],
                "x0_shape": list(data["x0"].shape), "bytes": (tmp / FILE).stat().st_size}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    log.info("latent set %s: %s clips, %.1f MB", folder, spec.count, meta["bytes"] / 1e6)
    return folder


def load_latent_set(folder: str | Path) -> dict[str, torch.Tensor]:
    """x0 and context of a set, after checking the file against its recorded hash."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {META}; build the set first")
    meta = json.loads(meta_path.read_text())
    path = folder / FILE
    if hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path} does not match the sha256 recorded in {META}; the set is damaged")
    return load_file(str(path))


def latent_batch(data: dict[str, torch.Tensor], step: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic (x0, context) batch of ``step``: a seeded permutation per epoch."""
    n = data["x0"].shape[0]
    epoch, pos = divmod(step * batch, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    idx = torch.cat([perm, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch + 1))])
    take = idx[pos : pos + batch]
    return data["x0"][take], data["context"][take]


HELDOUT_SEED_OFFSET = 1000  # held-out prompts and noise: another prompt seed than any training set


def ensure_sets(out: str | Path, source: str, latents: str | None, heldout: str | None, count: int,
                heldout_count: int, chunks: int, seed: int, progress: bool = True):
    """(train, held-out) sets of a recipe. A named folder that holds a set is used as it is (any
    source: recipes may share one); otherwise the set is sampled from ``source`` into it, or into
    ``<out>/latents`` and ``<out>/heldout`` when no folder is named."""
    out = Path(out)
    specs = {"latents": (latents or out / "latents", LatentSetSpec(source, count, chunks, seed)),
             "heldout": (heldout or out / "heldout", LatentSetSpec(source, heldout_count, chunks,
                                                                   seed + HELDOUT_SEED_OFFSET))}
    from .common import barrier, is_main_process

    folders = {}
    for name, (folder, spec) in specs.items():
        folder = Path(folder)
        if is_main_process() and not (folder / META).is_file():  # under torchrun rank 0 samples, the rest wait
            build_latent_set(folder, spec, progress)
        folders[name] = str(folder)
    barrier()
    return load_latent_set(folders["latents"]), load_latent_set(folders["heldout"]), folders


def noised_batch(cfg, data: dict[str, torch.Tensor], step: int, rank: int = 0, world: int = 1,
                 device: torch.device | None = None):
    """This rank's (x0, context, noise, t) of ``step``: per-chunk logit-normal t with clean past
    chunks, as pretraining. Everything is drawn for the global batch and sliced, so N processes
    see the numbers one process sees."""
    from .common import rank_slice, step_generator
    from .pretrain import chunk_timesteps

    x0, ctx = latent_batch(data, step, cfg.batch_size, cfg.seed)
    g = step_generator(cfg.seed, step, stream=3)
    noise = torch.randn(x0.shape, generator=g)
    t = chunk_timesteps(cfg, x0.shape[0], x0.shape[2] // cfg.chunk_frames, g)
    return tuple(rank_slice(v, rank, world).to(device or v.device) for v in (x0, ctx, noise, t))
