"""ONNX external data: a model's weights in one ``<model>.onnx.data`` file beside the ``.onnx``.

Why: an ONNX model is one protobuf, and protobuf stops at 2 GiB; the paper-scale DiT step is
several times that. ONNX Runtime opens a model by path and resolves each external tensor's
``location`` relative to the model's folder, so the pair must travel together (the bundle lists
and hashes both).

``externalize`` rewrites a saved model so that every tensor of at least ``SIZE_THRESHOLD`` bytes
lives in one data file. It streams: tensors that an exporter already wrote outside (the
TorchScript exporter writes one file per tensor above 2 GiB, onnx-ir one ``.data`` file) are
copied file to file and never all held in memory, so no protobuf over 2 GiB is ever built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

# tensors below this stay inside the protobuf (shape constants, scalars), as onnx.save_model does
SIZE_THRESHOLD = 1024
ALIGN = 64  # offsets aligned so a runtime can mmap each tensor
PROTOBUF_LIMIT = 2**31


class ExternalDataError(RuntimeError):
    """A model's external data is missing, or would not fit the chosen layout."""


def data_name(model_name: str) -> str:
    """The data file's name for a model file name (what onnx-ir and torch.onnx also use)."""
    return f"{model_name}.data"


def _tensors(graph, top: bool = True) -> Iterator[tuple[Any, bool]]:
    """(TensorProto, is a top-level initializer) for every tensor of a graph, subgraphs included."""
    from onnx import AttributeProto

    for t in graph.initializer:
        yield t, top
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t, False
            elif attr.type == AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield t, False
            elif attr.type == AttributeProto.GRAPH:
                yield from _tensors(attr.g, False)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g, False)


def _point_to(tensor, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def uses_external_data(model) -> list[str]:
    """Locations of external data a loaded (``load_external_data=False``) model refers to."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as _uses

    return sorted({ExternalDataInfo(t).location for t, _ in _tensors(model.graph) if _uses(t)})


def _copy_range(src: Path, offset: int, length: int | None, dst) -> int:
    with open(src, "rb") as fh:
        fh.seek(offset)
        left = length if length is not None else os.path.getsize(src) - offset
        n = 0
        while left > 0:
            block = fh.read(min(left, 1 << 24))
            if not block:
                raise ExternalDataError(f"{src} ends {left} bytes early (offset {offset}, length {length})")
            dst.write(block)
            left -= len(block)
            n += len(block)
    return n


def _as_raw(tensor) -> bool:
    """Move a tensor's typed fields (``int32_data`` etc., e.g. the QDQ tools' int8 weights) into
    ``raw_data`` when they are large enough to matter; True when it then has ``raw_data``."""
    if tensor.HasField("raw_data"):
        return True
    if tensor.ByteSize() < SIZE_THRESHOLD:
        return False
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    return tensor.HasField("raw_data")


def externalize(src: Path, dst: Path, threshold: int = SIZE_THRESHOLD) -> dict[str, Any]:
    """Save the model at ``src`` as ``dst`` + ``<dst>.data`` (one file, aligned offsets).

    ``src`` may already use external data (any layout, relative to its folder) or none; ``dst``
    may equal ``src``. Files ``src`` referred to are removed when they are not ``dst``'s data.
    Returns ``{"data_file", "data_bytes", "tensors"}``."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data as _uses

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    name = data_name(dst.name)
    tmp = dst.with_name(f".{name}.partial")
    old: set[Path] = set()
    count = 0
    with open(tmp, "wb") as out:
        for t, initializer in _tensors(model.graph):
            if _uses(t):
                info = ExternalDataInfo(t)
                path = src.parent / info.location
                if not path.is_file():
                    raise ExternalDataError(f"{src.name}: tensor {t.name!r} refers to {info.location}, "
                                            f"which is not in {src.parent}")
                old.add(path)
                length = int(info.length) if info.length else None
                pad = (-out.tell()) % ALIGN
                out.write(b"\0" * pad)
                offset = out.tell()
                n = _copy_range(path, int(info.offset or 0), length, out)
            elif initializer and _as_raw(t) and len(t.raw_data) >= threshold:
                pad = (-out.tell()) % ALIGN
                out.write(b"\0" * pad)
                offset = out.tell()
                out.write(t.raw_data)
                n = len(t.raw_data)
                t.ClearField("raw_data")
            else:
                continue  # small, or typed (float_data etc.) fields: stays in the protobuf
            _point_to(t, name, offset, n)
            count += 1
    data_bytes = tmp.stat().st_size
    onnx.save_model(model, str(dst))
    for p in old:
        if p.resolve() != (dst.parent / name).resolve():
            p.unlink(missing_ok=True)
    os.replace(tmp, dst.parent / name)
    if src.resolve() != dst.resolve():
        src.unlink(missing_ok=True)
    log.info("%s: %d tensors (%.1f MiB) in %s", dst.name, count, data_bytes / 2**20, name)
    return {"data_file": name, "data_bytes": data_bytes, "tensors": count}



def check_model_files(artifact, bundle_dir: Path) -> None:
    """Before ORT opens an artifact's models: every external data file and EPContext binary they
    name is listed in the artifact (so the bundle hashed it) and present, else a ``BundleError``
    naming the file (ORT's own message for a missing one names neither the file nor the fix)."""
    import onnx

    from s2dit_deploy.bundle import BundleError

    for i, rel in enumerate(artifact.files):
        if not rel.endswith(".onnx"):
            continue
        path = artifact.path(bundle_dir, i)
        if not path.is_file():
            raise BundleError(f"{path} is missing: artifact {artifact.stage} lists it; recompile the bundle")
        refs = [(loc, "its weights") for loc in uses_external_data(onnx.load(str(path), load_external_data=False))]
        refs += [(loc, "its QNN context binary") for loc in context_binaries(path)]
        for loc, what in refs:
            ref = (Path(rel).parent / loc).as_posix()
            if ref not in artifact.files:
                raise BundleError(f"{path.name} reads {what} from {loc!r}, which artifact {artifact.stage} "
                                  "does not list (no hash covers it); recompile the bundle")
            if not (Path(bundle_dir) / ref).is_file():
                raise BundleError(f"{Path(bundle_dir) / ref} is missing: {path.name} keeps {what} there; "
                                  "copy the whole bundle folder or recompile it")


def context_binaries(model_path: Path) -> list[str]:
    """Files the EPContext nodes of a model name (``embed_mode=0``), relative to its folder."""
    import onnx

    found: list[str] = []
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type != "EPContext":
            continue
        attrs = {a.name: a for a in node.attribute}
        if "embed_mode" in attrs and attrs["embed_mode"].i == 0 and "ep_cache_context" in attrs:
            name = attrs["ep_cache_context"].s.decode()
            if name not in found:
                found.append(name)
    return found
