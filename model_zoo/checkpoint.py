"""Checkpoint folders: ``config.json`` + one safetensors file per stage, validated on load.

Never pickle: weights are read with safetensors only. Every failure names the file and says
what to do; nothing is half-loaded. Saving writes a temporary sibling folder and renames it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from .config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STAGE_FILES = {"dit": "dit.safetensors", "text_encoder": "text_encoder.safetensors", "decoder": "decoder.safetensors"}


class CheckpointError(InputError):
    """A checkpoint folder is missing, corrupt, or does not match its config (CLI exit 3)."""


_DIGEST_BLOCK = 1 << 20


def checkpoint_digest(folder: str | os.PathLike) -> str:
    """sha256 over config.json and each stage safetensors file present (name + bytes, sorted).

    This is the identity a bundle records instead of an absolute path: it names the exact weights
    without leaking where they lived, and survives the folder being moved or renamed.
    """
    folder = Path(folder)
    names = sorted(n for n in (CONFIG_FILE, *STAGE_FILES.values()) if (folder / n).is_file())
    if CONFIG_FILE not in names:
        raise CheckpointError(f"{folder / CONFIG_FILE} is missing: cannot fingerprint a checkpoint without it")
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(_DIGEST_BLOCK), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _aside(folder: Path) -> Path:
    """Where a save parks the previous version of ``folder`` while the new one is renamed in."""
    return folder.parent / f".{folder.name}.old"


def recover_folder(folder: str | os.PathLike) -> Path:
    """Undo a save that died between its two renames: put the moved-aside copy back.

    A save moves the old folder to ``.NAME.old``, renames the new one in, then deletes the old. If
    the process died after the first rename, ``folder`` is missing and ``.NAME.old`` is complete.
    """
    folder = Path(folder)
    aside = _aside(folder)
    if aside.is_dir() and not folder.exists():
        log.warning("%s: an interrupted save left the previous version at %s; restoring it", folder, aside)
        try:
            os.replace(aside, folder)
        except OSError as exc:
            raise CheckpointError(f"{folder} is missing after an interrupted save; its previous version is at "
                                  f"{aside}: rename it back to {folder.name} ({exc})") from exc
    return folder


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """Parse and validate config.json before anything is built (every field is type- and range-checked)."""
    folder = recover_folder(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint folder needs {CONFIG_FILE} next to its weights")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid model config: not JSON ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc})") from exc
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{path} is not a valid model config: {exc}") from exc


_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_INT_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
               "BOOL": torch.bool}


def check_headers(folder: str | os.PathLike, stage: str, expected: dict[str, torch.Tensor]) -> Path:
    """Compare names, shapes and dtypes in the safetensors header with ``expected`` (no tensor is read).

    ``expected`` may come from a module built on the meta device, so a config whose implied shapes
    disagree with the weights fails before any memory is allocated.
    """
    path = recover_folder(folder) / STAGE_FILES[stage]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; expected files: {', '.join(STAGE_FILES.values())}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            headers = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-export or re-download it") from exc
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected))
    wrong = [f"{k}: file {headers[k][0]} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in headers and headers[k][0] != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {wrong[:3]})")
        raise CheckpointError(
            f"{path} does not match its config.json: " + "; ".join(parts)
            + ". The weights belong to a different model size or layout."
        )
    for k, v in expected.items():
        dtype = headers[k][1]
        if v.is_floating_point():
            if dtype not in _FLOAT_DTYPES:
                kind = "integer/bool" if dtype in _INT_DTYPES else "unsupported"
                raise CheckpointError(
                    f"{path}: tensor {k!r} is stored as {dtype} ({kind}), but it is a floating-point parameter; "
                    f"supported dtypes are {', '.join(_FLOAT_DTYPES)}. Re-export the weights as float."
                )
        elif _INT_DTYPES.get(dtype) != v.dtype:
            raise CheckpointError(f"{path}: tensor {k!r} is stored as {dtype}, expected {v.dtype}; re-export it")
    return path


_FINITE_BLOCK = 1 << 20  # elements checked at a time: small temporaries, none kept by the allocator


def all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` in blocks, so checking a 50 MB tensor allocates ~1 MB at a time."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(block).all()) for block in flat.split(_FINITE_BLOCK))


def stored_dtype(path: Path, expected: dict[str, torch.Tensor]) -> torch.dtype:
    """The float dtype a stage loads in when the caller does not ask for one: the one the
    checkpoint stores (the most common by elements when mixed), with F64 read as fp32."""
    counts: dict[torch.dtype, int] = {}
    with safe_open(str(path), framework="pt") as fh:
        for k in fh.keys():
            if k in expected and expected[k].is_floating_point():
                sl = fh.get_slice(k)
                dtype = _FLOAT_DTYPES.get(sl.get_dtype(), torch.float32)
                dtype = torch.float32 if dtype == torch.float64 else dtype
                counts[dtype] = counts.get(dtype, 0) + int(torch.Size(sl.get_shape()).numel())
    return max(counts, key=counts.get) if counts else torch.float32


def load_state(folder: str | os.PathLike, stage: str, module: nn.Module, dtype: torch.dtype | None = None
               ) -> torch.dtype:
    """Fill ``module`` (typically built on the meta device) from ``folder/<stage>.safetensors``.

    Names, shapes and dtypes are checked against the header first. Tensors come from
    ``safe_open``, which maps the file (safetensors >= 0.4 hands back file-backed tensors, no
    copy), and are assigned into the module (``load_state_dict(assign=True)``): a stored dtype
    equal to the load dtype stays the one mapped copy; other dtypes are cast tensor by tensor.
    ``dtype`` None loads in the stored dtype (``stored_dtype``). Values are checked for NaN/inf
    tensor by tensor after the cast (f64 beyond the fp32 range would load as inf and render a
    black video). Returns the dtype the floating tensors now have. The mapping is private
    (in-place updates copy the page, the file never changes); the file must not be rewritten in
    place while the module lives (every writer here replaces the folder atomically instead).
    """
    expected = module.state_dict()
    path = check_headers(folder, stage, expected)
    dtype = dtype or stored_dtype(path, expected)
    state: dict[str, torch.Tensor] = {}
    try:
        base, entries = _read_header(path)
        with safe_open(str(path), framework="pt") as mapped, open(path, "rb") as raw:
            for k in mapped.keys():
                want = dtype if expected[k].is_floating_point() else expected[k].dtype
                stored = {**_FLOAT_DTYPES, **_INT_DTYPES}[entries[k]["dtype"]]
                if stored == want:
                    value = mapped.get_tensor(k)  # file-backed: the one copy
                else:  # read and cast this tensor only, so the mapped pages never sit beside the cast copy
                    start, end = entries[k]["data_offsets"]
                    raw.seek(base + start)
                    data = bytearray(raw.read(end - start))
                    value = torch.frombuffer(data, dtype=stored).reshape(entries[k]["shape"]).to(want)
                    del data
                if value.is_floating_point() and not all_finite(value):
                    raise CheckpointError(
                        f"{path} holds NaN/inf values in {k!r} (as {want}); the checkpoint is "
                        "corrupt or its values overflow the model dtype"
                    )
                state[k] = value
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-export or re-download it") from exc
    module.load_state_dict(state, assign=True)
    return dtype


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header entries) of a safetensors file (already validated by safe_open)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden sibling temp folder; on success it replaces ``folder``, on failure it vanishes.

    The old folder is moved aside (``.NAME.old``) before the new one is renamed in and deleted only
    after, so a crash at any point leaves a complete copy (``recover_folder`` puts it back).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    aside = _aside(folder)
    if aside.exists():  # a previous save finished its renames but died before cleaning up
        shutil.rmtree(aside)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial.", dir=folder.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700; checkpoints are meant to be shared
        if folder.exists():
            os.replace(folder, aside)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_folder(folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def config_text(config: ModelConfig) -> str:
    """config.json as every checkpoint writer writes it."""
    return json.dumps(config.to_dict(), indent=2) + "\n"


def save_checkpoint(folder: str | os.PathLike, config: ModelConfig, modules: dict[str, nn.Module],
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json and one safetensors file per stage atomically (temp folder + rename)."""
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(config_text(config))
        for stage, module in modules.items():
            state = {
                k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                for k, v in module.state_dict().items()
            }
            save_file(state, str(tmp / STAGE_FILES[stage]), metadata={"stage": stage, "model": config.name})
    log.info("saved checkpoint %s", folder)
    return Path(folder)


def is_checkpoint_dir(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a valid config.json and nothing but checkpoint files, so that
    replacing it whole loses no file of the user's."""
    folder = Path(folder)
    allowed = {CONFIG_FILE, "MODEL_CARD.md", *STAGE_FILES.values()}
    try:
        names = {p.name for p in folder.iterdir()}
        read_config(folder)
    except (OSError, CheckpointError):
        return False
    return names <= allowed


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
              torch.int64: "I64", torch.bool: "BOOL"}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_DIGEST_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_safetensors(path: str | os.PathLike, header: list[tuple[str, tuple, torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
                      ) -> tuple[int, str]:
    """Stream tensors into a safetensors file whose header is known up front; (bytes, sha256).

    ``save_file`` needs every tensor in memory at once; this writes the header (8-byte length,
    JSON padded to 8 bytes, as safetensors does) and then each tensor's bytes as it arrives, so a
    1.8B-parameter stage is written with one tensor in memory. Tensors must come in ``header``
    order with the declared shape and dtype; alignment holds because entries are sorted by
    element size, largest first (as safetensors sorts them)."""
    order = sorted(range(len(header)), key=lambda i: -header[i][2].itemsize)
    if order != sorted(order):
        raise ValueError("header entries must be sorted by element size, largest first")
    entries: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape, dtype in header:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        entries[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in (len(text).to_bytes(8, "little"), text):
            fh.write(chunk)
            digest.update(chunk)
        seen = 0
        for (name, shape, dtype), (got, tensor) in zip(header, tensors, strict=True):
            if got != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{path}: tensor {got!r} {tuple(tensor.shape)} {tensor.dtype} arrived where "
                                 f"the header declares {name!r} {tuple(shape)} {dtype}")
            raw = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            fh.write(raw)
            digest.update(raw)
            seen += len(raw)
        if seen != offset:
            raise ValueError(f"{path}: wrote {seen} data bytes, the header declares {offset}")
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(text) + offset, digest.hexdigest()
