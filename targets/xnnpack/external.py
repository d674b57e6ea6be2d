"""Program/data separation for XNNPACK ``.pte`` files: the weights in a ``<stage>.ptd`` beside it.

Why: at paper scale (the 1.8B DiT step) the program and its gigabytes of weights are shipped,
cached and updated apart; the app hands the runtime both files. (Measured with ExecuTorch 1.5.1:
an embedded 2.27 GB XNNPACK ``.pte`` also loads on the host, since XNNPACK's weights live in
named-data segments outside the flatbuffer; the ``.ptd`` is a layout choice, not a workaround.)
ExecuTorch 1.5 writes constants to a FlatTensor ``.ptd`` file when

- the delegated constants (what XNNPACK serializes through its named data store) carry
  ``node.meta["custom"]["delegate_constant_tag"]`` on their placeholders, and
- the constants left to the portable kernels are tagged through
  ``ExecutorchBackendConfig(external_constants=fn)``.

Both use one tag per stage, so each stage has exactly one ``.ptd`` (``Runtime.load_program``
takes a single ``data_path``). The runtime resolves weights by name (the SHA-256 of the bytes for
delegated ones), so a ``.ptd`` from another compile fails to load instead of running wrong numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .options import EXTERNAL_WEIGHTS_BOUND

log = logging.getLogger(__name__)


def _tensor_bytes(t) -> int:
    """Stored bytes of a tensor; a wrapper subclass (torchao int4) counts its inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() if hasattr(t, "element_size") else 0


def constant_bytes(ep) -> int:
    """Bytes of every parameter, buffer and lifted constant of an ExportedProgram (as exported)."""
    return sum(_tensor_bytes(t) for t in (*ep.state_dict.values(), *ep.constants.values()))


def use_external(policy: str, weight_bytes: int, bound: int = EXTERNAL_WEIGHTS_BOUND) -> bool:
    """``always`` / ``never``, or ``auto``: external when the weights exceed ``bound`` bytes."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy != "auto":
        raise ValueError(f"external_weights must be auto, always or never, got {policy!r}")
    return weight_bytes > bound


def unwrap_subclasses(ep):
    """``ep`` with tensor-subclass weights (torchao 8da4w) flattened into plain tensors.

    ``to_edge`` would unwrap them itself, into new placeholders that carry no tag (their data then
    stays in the ``.pte``); unwrapping first (an empty decomposition table changes no op) lets
    ``tag_constants`` see the int4 data and scales."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if any(is_traceable_wrapper_subclass(t) for t in (*ep.state_dict.values(), *ep.constants.values())):
        return ep.run_decompositions({})
    return ep


def tag_constants(ep, tag: str) -> int:
    """Mark every constant placeholder of ``ep`` for the ``tag`` data file; returns how many."""
    sig = ep.graph_signature
    names = {*sig.inputs_to_parameters, *sig.inputs_to_buffers, *sig.inputs_to_lifted_tensor_constants}
    n = 0
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
            n += 1
    return n


def backend_config(tag: str | None):
    """The ``to_executorch`` config: constants outside the delegate go to ``tag`` too (or stay)."""
    from executorch.exir import ExecutorchBackendConfig

    if tag is None:
        return ExecutorchBackendConfig()
    return ExecutorchBackendConfig(external_constants=lambda _node: tag)


def write_program(program, out_dir: Path, stage_name: str, tag: str | None) -> dict[str, Any]:
    """Write ``<stage>.pte`` (streamed, no contiguous copy) and its ``.ptd``; returns files + sizes."""
    out_dir = Path(out_dir)
    pte = f"{stage_name}.pte"
    with open(out_dir / pte, "wb") as fh:
        program.write_to_file(fh)
    data = dict(getattr(program, "_tensor_data", None) or {})
    if tag is None and data:
        raise RuntimeError(f"{stage_name}: ExecuTorch produced data files {sorted(data)} for an embedded "
                           "program; nothing should have been tagged external")
    ptd: list[str] = []
    if tag is not None:
        unexpected = sorted(set(data) - {tag})
        if unexpected or tag not in data:
            raise RuntimeError(f"{stage_name}: expected one data file {tag}.ptd, ExecuTorch produced "
                               f"{sorted(data) or 'none'}")
        program.write_tensor_data_to_file(str(out_dir))
        ptd = [f"{tag}.ptd"]
    sizes = {f: (out_dir / f).stat().st_size for f in [pte, *ptd]}
    if ptd and sizes[pte] > sizes[ptd[0]]:
        log.warning("%s: external weights requested but the .pte (%d B) is still larger than its .ptd (%d B): "
                    "some constants were created after tagging", stage_name, sizes[pte], sizes[ptd[0]])
    log.info("%s: wrote %s", stage_name, ", ".join(f"{f} ({b / 2**20:.1f} MiB)" for f, b in sizes.items()))
    return {"files": [pte, *ptd], "pte_bytes": sizes[pte], "ptd_bytes": sum(sizes[f] for f in ptd)}
