"""Stage -> Core AI ``.aimodel``: ANE rewrite, ``torch.export``, coreai-torch, metadata.

The program's dtype *is* its compute precision: coreai-torch lowers an fp16 graph to fp16 ops
(norms widen to fp32 inside, as on the device) and an fp32 graph to fp32 ops; Linux has no
specialization options, so an fp16 program is also how the Linux runtime is made to compute in
the Neural Engine's precision. The module is cast, never the user's float model.

Caches are explicit inputs/outputs, as for Core ML (``targets/coreml/convert.py``): the host rolls
the cache window and commits a chunk's entries only after the t = 0 pass, so a state
(``state_names=``, a mutated buffer) would need a conditional write (no control flow on the Neural
Engine) or a second entry point sharing the weights, and the roll would copy the whole window
inside the graph. Explicit I/O keeps one straight-line graph that every executor here can check.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from s2dit_deploy.rewrites import DeviceStage, identity_stage, rewrite_stage
from s2dit_deploy.stages import Stage
from s2dit_deploy.targets.decompositions import VARIANCE

from .options import CoreAIOptions

log = logging.getLogger(__name__)

FORMAT_VERSION = "s2dit-coreai/1"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class CoreAIConversionError(RuntimeError):
    """coreai-torch could not lower a stage; the message names the stage and the ops."""


def device_stage(stage: Stage, opts: CoreAIOptions) -> DeviceStage:
    """The ANE form of the stage, or the stock one (the decoder only with ``rewrite_decoder``)."""
    wanted = opts.rewrite and (stage.name != "decoder" or opts.rewrite_decoder)
    return rewrite_stage(stage, opts.ane()) if wanted else identity_stage(stage)


def program_module(part: DeviceStage, precision: str, private: bool = False
                   ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The module and example inputs in the program's dtype; a copy whenever a cast is needed (or
    ``private``: compression edits weights), so the float model, which may share weights with
    ``part``, is never changed."""
    dtype = DTYPES[precision]
    mod = part.module.eval()
    has_other = any(p.is_floating_point() and p.dtype != dtype
                    for p in (*mod.parameters(), *mod.buffers()))
    if has_other or private:
        mod = copy.deepcopy(mod).to(dtype)
    examples = tuple(x.to(dtype) if x.is_floating_point() else x for x in part.example_inputs)
    return OutputsAs(mod, dtype).eval(), examples


class OutputsAs(torch.nn.Module):
    """Float outputs in the program's dtype: the stage wrappers return fp32 for the host, but an fp16
    program keeps fp16 I/O end to end (no boundary casts on the Neural Engine), as Core ML's io_dtype."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args):
        outs = self.module(*args)
        return tuple(o.to(self.dtype) if o.is_floating_point() else o for o in outs)


def export(part: DeviceStage, precision: str, plan: Any = None, stage_name: str = ""
           ) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The decomposed ExportedProgram of one part (compressed by coreai-opt when ``plan``) and the
    quant summary ({} when float)."""
    import coreai_torch

    mod, examples = program_module(part, precision, private=plan is not None)
    summary: dict[str, Any] = {}
    if plan is not None:
        from .compress import compress

        mod, summary = compress(mod, examples, plan, stage_name)
    with torch.no_grad():
        ep = torch.export.export(mod, examples, strict=False)
    return ep.run_decompositions({**coreai_torch.get_decomp_table(), **VARIANCE}), summary


_OPS = re.compile(r"(?:aten|prims)\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?")


def _where_used(ep: torch.export.ExportedProgram, ops: list[str]) -> dict[str, list[str]]:
    """op -> the module paths whose nodes call it (first three), to point at the layer."""
    out: dict[str, list[str]] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target) in ops:
            stack = node.meta.get("nn_module_stack") or {}
            path = (list(stack.values())[-1][0] if stack else "") or "<stage module>"
            paths = out.setdefault(str(node.target), [])
            if path not in paths and len(paths) < 3:
                paths.append(path)
    return out


@contextlib.contextmanager
def _lowering_errors(stage_name: str, ep: torch.export.ExportedProgram):
    """coreai-torch's ValueError for an op it cannot lower -> CoreAIConversionError with the stage,
    the op names and where they are used (never a silent fallback: there is none to fall back to)."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc)
        if "unsupported" not in msg and "unable to handle" not in msg and "non-decomposed" not in msg:
            raise
        found = sorted(set(_OPS.findall(msg)))
        m = re.search(r"target: (\S+), namespace: (\S+)", msg)
        if m:
            found.append(f"{m.group(2)}.{m.group(1)}")
        where = _where_used(ep, found)
        detail = "; ".join(f"{op} in {', '.join(where.get(op, ['?']))}" for op in found) or msg
        raise CoreAIConversionError(
            f"coreai-torch cannot lower stage {stage_name!r}: {detail}. Add a decomposition in "
            f"targets/decompositions.py or a converter lowering (register_torch_lowering)") from exc


def convert(part: DeviceStage, opts: CoreAIOptions, stage_name: str, plan: Any = None):
    """(AIProgram (not saved), quant summary) of one device part; I/O named by the part's device names."""
    import coreai_torch

    t0 = time.time()
    ep, summary = export(part, opts.precision, plan, stage_name)
    log.info("%s: torch.export %.1f s", part.name, time.time() - t0)
    conv = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    t1 = time.time()
    with _lowering_errors(stage_name, ep):
        conv.add_exported_program(ep, input_names=[m.device_name for m in part.inputs],
                                  output_names=[m.device_name for m in part.outputs])
        prog = conv.to_coreai()
    log.info("%s: coreai-torch %.1f s", part.name, time.time() - t1)
    return prog, summary


def asset_metadata(stage: Stage, dstage: DeviceStage, opts: CoreAIOptions, extra: dict[str, Any]):
    """Core AI asset metadata: the host contract and device maps travel inside the .aimodel too."""
    from coreai.runtime import AIModelAssetMetadata

    from s2dit_deploy.rewrites.device_io import maps_to_json

    md = AIModelAssetMetadata()
    md.model_description = f"s2dit {stage.name} ({dstage.layout}, {opts.precision})"
    custom = {"s2dit.version": FORMAT_VERSION, "s2dit.stage": stage.name, "s2dit.layout": dstage.layout,
              "s2dit.contract": stage.contract(),
              "s2dit.device_io": {"inputs": maps_to_json(dstage.inputs), "outputs": maps_to_json(dstage.outputs)},
              "s2dit.options": {k: getattr(opts, k) for k in opts.__dataclass_fields__}, **extra}
    for k, v in custom.items():  # JSON strings, as Core ML's user_defined_metadata (the asset takes no null)
        md.set_custom(k, v if isinstance(v, str) else json.dumps(v))
    return md


def save(prog, path: Path, metadata) -> None:
    """``prog`` as ``path`` (.aimodel folder); the caller writes inside the bundle's partial folder."""
    from coreai.authoring.asset import OSVersion

    prog.save_asset(Path(path), metadata=metadata, minimum_os=OSVersion.v27)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
