"""Lazy loading: stages are built on the meta device and take the checkpoint's own tensors (mapped
from the safetensors file, in its dtype); buffers outside the state dict are recomputed; the
stage contract stays fp32 for fp16 / bf16 weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from s2dit_deploy.metrics import psnr
from s2dit_deploy.model_zoo.checkpoint import CheckpointError
from s2dit_deploy.model_zoo.init_weights import init_checkpoint
from s2dit_deploy.model_zoo.pipeline import load_pipeline
from s2dit_deploy.model_zoo.registry import _fill_meta_buffers, build_stage, get_card, load_dtypes, load_stage, resolve
from s2dit_deploy.stages import build_stages

TINY = get_card("s2dit-tiny").config
STAGES = ("text_encoder", "dit", "decoder")


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lazy") / "tiny16"
    init_checkpoint(TINY, folder, seed=5, dtype="fp16")
    return folder


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == real:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _inside(t: torch.Tensor, ranges) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in ranges)


def _old_way(config, folder: Path, stage: str) -> nn.Module:
    """The loader before lazy loading: a real (seeded) build, every tensor cast to fp32 and copied in."""
    torch.manual_seed(0)
    module = build_stage(config, stage)
    module.load_state_dict({k: v.float() for k, v in load_file(str(folder / f"{stage}.safetensors")).items()})
    return module.eval()


def _random_inputs(stage, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    named = {}
    for spec, ex in zip(stage.inputs, stage.example_inputs):
        if spec.name == "input_ids":
            named[spec.name] = torch.randint(0, 49407, ex.shape, generator=g, dtype=ex.dtype)
        elif spec.name in ("t", "cache.window_valid"):
            named[spec.name] = torch.ones_like(ex) * (0.7 if spec.name == "t" else 1.0)
        else:
            named[spec.name] = torch.randn(ex.shape, generator=g)
    return named


def test_bundled_small_is_bit_identical_to_the_old_load():
    """s2dit-small ships fp16 files and has always run in fp32 (its card's bundled_dtype): the lazy
    load gives the same tensors, buffers and stage outputs, bit for bit."""
    config, folder = resolve("s2dit-small")
    pipe = load_pipeline("s2dit-small")
    old = {s: _old_way(config, folder, s) for s in STAGES}
    for stage in STAGES:
        new = getattr(pipe, stage)
        assert list(new.state_dict()) == list(old[stage].state_dict())
        for (k, a), b in zip(old[stage].state_dict().items(), new.state_dict().values()):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), k
        bufs_old, bufs_new = dict(old[stage].named_buffers()), dict(new.named_buffers())
        assert bufs_old.keys() == bufs_new.keys() and all(torch.equal(bufs_old[k], bufs_new[k]) for k in bufs_old)
    from s2dit_deploy.model_zoo.pipeline import Pipeline

    ref = build_stages(Pipeline(config, old["text_encoder"], old["dit"], old["decoder"]))
    mine = build_stages(pipe)
    for name, stage in mine.items():
        inputs = _random_inputs(stage)
        a, b = ref[name].run_float(inputs), stage.run_float(inputs)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_stored_dtype_is_kept_and_file_backed(tiny16):
    """No copy: every parameter of an fp16 checkpoint is fp16 and lies in the file's mapping."""
    assert load_dtypes(TINY, tiny16) == {s: torch.float16 for s in ("dit", "text_encoder", "decoder")}
    for stage in STAGES:
        module = load_stage(TINY, tiny16, stage)
        ranges = _mapped_ranges(tiny16 / f"{stage}.safetensors")
        assert ranges, f"{stage}: the weights file is not mapped"
        for k, p in module.named_parameters():
            assert p.dtype == torch.float16 and not p.is_meta and _inside(p, ranges), k
        assert not any(b.is_meta for b in module.buffers())
        torch.manual_seed(0)
        real = build_stage(TINY, stage)  # non-persistent buffers recomputed as the constructor does
        assert {k: v for k, v in real.named_buffers()}.keys() == {k for k, _ in module.named_buffers()}
        for k, v in real.named_buffers():
            assert torch.equal(v, dict(module.named_buffers())[k]), k


def test_mapped_weights_are_private_copy_on_write(tiny16):
    """Training updates a loaded stage in place: the pages are copied, the file never changes."""
    before = (tiny16 / "decoder.safetensors").read_bytes()
    module = load_stage(TINY, tiny16, "decoder")
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1)
    assert (tiny16 / "decoder.safetensors").read_bytes() == before
    stored = load_file(str(tiny16 / "decoder.safetensors"))
    assert all(torch.equal(p, stored[k] + 1) for k, p in module.named_parameters())


def test_a_cast_load_copies_without_mapping(tiny16):
    module = load_stage(TINY, tiny16, "dit", dtype=torch.float32)
    ranges = _mapped_ranges(tiny16 / "dit.safetensors")
    stored = load_file(str(tiny16 / "dit.safetensors"))
    for k, p in module.named_parameters():
        assert p.dtype == torch.float32 and not _inside(p, ranges) and torch.equal(p, stored[k].float()), k


def test_fp16_stages_keep_the_fp32_contract(tiny16):
    """build_stages on an fp16 pipeline: same fp32 contract as fp32 weights, fp32 outputs, and the
    fp16 float run within a sane PSNR of the fp32 one (same weights, upcast)."""
    s16 = build_stages(load_pipeline("s2dit-tiny", tiny16))
    s32 = build_stages(load_pipeline("s2dit-tiny", tiny16, dtype=torch.float32))
    assert set(s16) == {"text_encoder", "dit_step", "decoder"}
    for name, stage in s16.items():
        assert stage.contract() == s32[name].contract(), name
        assert all(spec.dtype in ("float32", "int32") for spec in (*stage.inputs, *stage.outputs)), name
        inputs = _random_inputs(stage, seed=1)
        a, b = stage.run_float(inputs), s32[name].run_float(inputs)
        for k in a:
            assert a[k].dtype == torch.float32 and torch.isfinite(a[k]).all(), (name, k)
            if float(b[k].abs().max()) > 0:
                assert psnr(b[k].numpy(), a[k].numpy()) > 45, (name, k)  # ~72-86 dB measured


def test_an_fp32_value_beyond_fp16_is_rejected_when_loaded_as_fp16(tmp_path):
    folder = tmp_path / "ck"
    init_checkpoint(TINY, folder, seed=0, dtype="fp32")
    state = load_file(str(folder / "decoder.safetensors"))
    key = next(k for k, v in state.items() if v.numel() > 1)
    state[key].view(-1)[0] = 1e6  # finite in fp32, inf in fp16
    save_file(state, str(folder / "decoder.safetensors"))
    assert load_stage(TINY, folder, "decoder").get_parameter(key).dtype == torch.float32  # as stored: fine
    with pytest.raises(CheckpointError, match=f"NaN/inf values in '{key}' \\(as torch.float16\\)"):
        load_stage(TINY, folder, "decoder", dtype=torch.float16)


def test_a_meta_buffer_without_a_rule_is_an_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    with torch.device("meta"):
        odd = Odd()
    odd.load_state_dict({"w": torch.ones(2)}, assign=True)
    with pytest.raises(RuntimeError, match="table of Odd .*NON_PERSISTENT_BUFFERS"):
        _fill_meta_buffers(odd, "odd")


def test_seeded_stages_are_unchanged():
    """No weights: the fixed-seed fp32 init of a real build, as before."""
    module = load_stage(TINY, None, "dit", seed=3)
    torch.manual_seed(3)
    real = build_stage(TINY, "dit")
    assert all(torch.equal(a, b) and a.dtype == torch.float32
               for a, b in zip(module.state_dict().values(), real.state_dict().values()))
