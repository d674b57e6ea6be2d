"""Shared training plumbing: distributed setup, EMA, safetensors training checkpoints, step RNG.

Why these choices:
- Every random draw of step ``s`` comes from a generator seeded with (seed, s), and every rank
  draws the *global* batch's noise and slices its share, so 1 process and N processes see the
  same numbers and a resumed run continues bit-identically without saving RNG states.
- Training checkpoints are safetensors (modules and optimizer tensors) plus JSON (step, scalars,
  optimizer hyper-parameters): never pickle.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from s2dit_deploy.model_zoo.checkpoint import atomic_folder
from torch import nn

from .configs import RecipeConfigError

log = logging.getLogger(__name__)


# ---- distributed --------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun: gloo on CPU, nccl on GPU; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # rank 0 may sample a latent set while the others wait at a barrier: allow it time
        dist.init_process_group(backend, timeout=timedelta(hours=2))
        log.info("initialized %s process group: rank %d of %d", backend, dist.get_rank(), world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    if dist.is_initialized() and dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes files and output."""
    return not dist.is_initialized() or dist.get_rank() == 0


def check_batch_split(batch_size: int, world: int, recipe: str) -> None:
    """Every rank takes an equal slice of the global batch, so the DDP-averaged gradient is the
    global batch's gradient; a batch that does not split evenly is refused before any work."""
    if batch_size % world:
        raise RecipeConfigError(f"{recipe}.batch_size={batch_size} does not split evenly over WORLD_SIZE={world} "
                                "processes; choose a multiple of the process count")


class LossModule(nn.Module):
    """One module whose forward is a whole training loss, for DDP.

    Why not wrap the student alone: DDP averages the gradients of the module it wraps and hooks
    its ``forward``. The architecture recipes' losses train several modules at once (the student,
    its router logits, pruning masks, the KD aligners) and call ``S2DiT.features`` rather than
    ``forward``. With the loss as the forward of one module that holds them all, DDP syncs every
    trainable tensor in its one bucketed all-reduce, and nothing is synced by hand.
    """

    def __init__(self, loss, **parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self._loss = loss

    def forward(self, *args, **kwargs):
        return self._loss(*args, **kwargs)


def ddp_loss(loss, device: torch.device, **parts: nn.Module) -> nn.Module:
    """``loss`` as a module over ``parts``, under DDP when several processes run."""
    return wrap_ddp(LossModule(loss, **parts), device)


def mean_across_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.detach())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for (seed, step, stream): the only source of randomness in a training step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 16 + stream)


def rank_slice(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per]


# ---- EMA ------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's floating-point state, warmed up early in training."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict(self.shadow)


# ---- training checkpoints ---------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state_keys": {}}
    for idx, state in sd["state"].items():
        meta["state_keys"][str(idx)] = sorted(state)
        for key, value in state.items():
            tensors[f"{idx}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    return tensors, meta


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(folder: str | Path, modules: dict[str, nn.Module | dict], optimizers: dict[str, torch.optim.Optimizer],
                        scalars: dict) -> Path:
    """Write ``<name>.safetensors`` per module / EMA shadow / optimizer and ``state.json``, atomically."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        for name, m in modules.items():
            sd = m if isinstance(m, dict) else m.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        optim_meta = {}
        for name, opt in optimizers.items():
            tensors, optim_meta[name] = _optimizer_tensors(opt)
            save_file(tensors, str(tmp / f"optim_{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"scalars": scalars, "optimizers": optim_meta}, indent=1) + "\n")
    return folder


def load_training_state(folder: str | Path, modules: dict[str, nn.Module | dict], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Fill modules (or EMA shadow dicts, in place) and optimizers; return the saved scalars."""
    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    for name, m in modules.items():
        sd = load_file(str(folder / f"{name}.safetensors"))
        if isinstance(m, dict):
            for k, v in sd.items():
                m[k].copy_(v)
        else:
            m.load_state_dict(sd)
    for name, opt in optimizers.items():
        _load_optimizer(opt, load_file(str(folder / f"optim_{name}.safetensors")), meta["optimizers"][name])
    return meta["scalars"]


@contextmanager
def frozen(*modules: nn.Module):
    """Temporarily disable grads of modules (e.g. the teacher inside a student loss)."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, fl in zip(modules, flags):
            for p, f in zip(m.parameters(), fl):
                p.requires_grad_(f)


def lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup))


def append_jsonl(path: Path | None, record: dict) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
