"""Artifact bundles: a folder of compiled stages plus ``manifest.json``, written atomically.

The bundle is built in a hidden sibling folder and renamed into place only when every stage
compiled, so a failed compile never leaves a half-written bundle behind. Loading verifies every
file's SHA-256 against the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class BundleError(RuntimeError):
    """A bundle folder is missing, incomplete, or was modified after it was written."""


def sha256_path(path: Path) -> str:
    """Hash of a file, or of a folder (e.g. .mlpackage) as its sorted relative paths + contents."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class Artifact:
    """One compiled stage: its files (relative to the bundle), I/O contract and quantization."""

    stage: str
    target: str
    files: list[str]
    contract: dict[str, Any]
    quant: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "target": self.target, "files": self.files, "sha256": self.sha256,
            "contract": self.contract, "quant": self.quant, "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Artifact":
        return cls(d["stage"], d["target"], list(d["files"]), d["contract"], d.get("quant", {}),
                   d.get("metadata", {}), d.get("sha256", {}))


@dataclass
class Bundle:
    path: Path
    target: str
    model: dict[str, Any]
    artifacts: dict[str, Artifact]
    info: dict[str, Any] = field(default_factory=dict)

    def file(self, stage: str, index: int = 0) -> Path:
        return self.path / self.artifacts[stage].files[index]

    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "model": self.model,
            "info": self.info,
            "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()},
        }


@contextlib.contextmanager
def atomic_bundle(out_dir: str | os.PathLike, target: str, model: dict[str, Any]) -> Iterator[Bundle]:
    """Yield a Bundle rooted in a temp folder; on success hash files, write the manifest, rename."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    bundle = Bundle(tmp, target, model, {}, {"created_unix": int(time.time())})
    try:
        yield bundle
        for art in bundle.artifacts.values():
            missing = [f for f in art.files if not (tmp / f).exists()]
            if missing:
                raise BundleError(f"stage {art.stage} did not write {missing}")
            art.sha256 = {f: sha256_path(tmp / f) for f in art.files}
        (tmp / MANIFEST).write_text(json.dumps(bundle.manifest(), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp creates 0700; a bundle is meant to be copied and shared
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "b")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        bundle.path = out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) check every file's hash."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing (compile one with `s2dit-deploy compile`)")
    try:
        data = json.loads(mf.read_text())
        arts = {k: Artifact.from_dict(v) for k, v in data["artifacts"].items()}
    except (json.JSONDecodeError, KeyError) as exc:
        raise BundleError(f"{mf} is corrupt: {exc}") from exc
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{mf} has format {data.get('format_version')}, this version reads {FORMAT_VERSION}")
    if verify:
        for art in arts.values():
            for f, digest in art.sha256.items():
                p = path / f
                if not p.exists():
                    raise BundleError(f"{p} listed in the manifest is missing; recompile the bundle")
                if sha256_path(p) != digest:
                    raise BundleError(f"{p} does not match its manifest hash; it was modified or truncated")
    return Bundle(path, data["target"], data["model"], arts, data.get("info", {}))
