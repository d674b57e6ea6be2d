"""Artifact bundles: a folder of compiled stages plus ``manifest.json``, written atomically.

The bundle is built in a hidden sibling folder (``.NAME.partial.*``, which records its owner so a
later compile can remove it once that process is gone) and swapped into place under a lock only
when every stage compiled, so a failed or concurrent compile never leaves a half-written bundle.

A bundle is untrusted input: ``load_bundle`` checks the manifest against a JSON Schema, confines
every listed path to the bundle folder (no absolute paths, no ``..``, no symlinks) and verifies the
SHA-256 of every file, including the extra files (``quant/`` reports) listed under ``files``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import jsonschema

from .errors import InputError, OutputExistsError
from .manifest_schema import MANIFEST_SCHEMA, RELPATH

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OWNER = ".owner.json"
FORMAT_VERSION = 2


class BundleError(InputError):
    """A bundle folder is missing, incomplete, malformed, or was modified after it was written."""


def sha256_path(path: Path) -> str:
    """Hash of a file, or of a folder (e.g. .mlpackage) as its sorted relative paths + contents."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _no_symlinks_below(path: Path, where: str) -> None:
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in (*dirnames, *filenames):
            if os.path.islink(os.path.join(dirpath, name)):
                rel = Path(dirpath, name).relative_to(path)
                raise BundleError(f"{where}: {path.name}/{rel.as_posix()} is a symlink; "
                                  "bundles may not contain links, recompile the bundle")


def resolve_inside(root: str | os.PathLike, rel: str, where: str = "bundle") -> Path:
    """``root / rel`` after checking ``rel`` is a normalized relative path that stays inside
    ``root`` without passing through (or being, or containing) a symlink.

    The one resolver every file a bundle names goes through; ``where`` names the manifest field."""
    root = Path(root)
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{where}: file entry {rel!r} must be a non-empty relative path")
    pure = PurePosixPath(rel)
    if (pure.is_absolute() or "\\" in rel or ":" in rel or ".." in pure.parts
            or posixpath.normpath(rel) != rel):
        raise BundleError(f"{where}: file entry {rel!r} must be a normalized relative path inside the "
                          "bundle (no leading '/', no '..', no '.'); the manifest was edited, recompile")
    real_root = root.resolve()
    cur = root
    for part in pure.parts:
        cur = cur / part
        if cur.is_symlink():
            raise BundleError(f"{where}: {rel!r} passes through the symlink {cur.relative_to(root).as_posix()!r}; "
                              "bundles may not contain links, recompile the bundle")
    target = (root / rel).resolve()
    if not target.is_relative_to(real_root):
        raise BundleError(f"{where}: {rel!r} resolves outside the bundle ({target})")
    if target.is_dir():
        _no_symlinks_below(target, where)
    return root / rel


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

    def path(self, bundle_dir: str | os.PathLike, index: int = 0) -> Path:
        """The checked path of one of this artifact's files (what targets' ``load`` should open)."""
        return resolve_inside(bundle_dir, self.files[index], f"artifacts.{self.stage}.files[{index}]")

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
    # every other file the bundle holds (quant/ reports, plots): relative path -> sha256
    files: dict[str, str] = field(default_factory=dict)

    def resolve(self, rel: str) -> Path:
        """A path inside the bundle, checked (see ``resolve_inside``)."""
        return resolve_inside(self.path, rel)

    def file(self, stage: str, index: int = 0) -> Path:
        return self.artifacts[stage].path(self.path, index)

    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "model": self.model,
            "info": self.info,
            "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()},
            "files": self.files,
        }


# ---------------------------------------------------------------- output path safety

def is_bundle_dir(path: Path) -> bool:
    """True when ``path`` holds a manifest.json of ours (any format version)."""
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("format_version"), int) and "artifacts" in data


def _protected(out: Path) -> str | None:
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor):
        return "the filesystem root"
    if out == cwd or cwd.is_relative_to(out):
        return "the current directory or one of its parents"
    if out == Path.home().resolve():
        return "your home directory"
    return None


def check_output_path(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """The resolved output path, or ``OutputExistsError`` when it holds something not ours.

    Called before any work: PATH may be missing, an empty folder, or an existing bundle; anything
    else (a file, a folder of user files) is replaced only with ``force``. The filesystem root, the
    home folder, the cwd and its parents are never replaced."""
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    out = out.parent.resolve() / out.name if out.name else out  # a link at PATH itself is not followed
    why = _protected(out) or _protected(out.resolve())
    if why:
        raise OutputExistsError(f"output path {out} is {why}; refusing to replace it even with --force: "
                                "choose a new folder, e.g. -o build/bundle")
    if out.is_file() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"output path {out} is an existing file, not a bundle; choose another "
                                    "path or pass --force to replace it")
    elif out.is_dir() and any(out.iterdir()) and not is_bundle_dir(out) and not force:
        raise OutputExistsError(f"output folder {out} holds files that are not a s2dit-deploy bundle; "
                                "choose another path or pass --force to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create the output {out}: {parent} is not a writable folder")
    return out


# ---------------------------------------------------------------- partial-folder ownership

def _proc_start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _owner_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "start_time": _proc_start_time(os.getpid()), "boot_id": _boot_id(),
            "uid": os.getuid()}


def _owner_is_dead(folder: Path) -> bool:
    """True only when the folder's recorded owner is ours and certainly no longer running."""
    try:
        rec = json.loads((folder / OWNER).read_text())
        pid, start = int(rec["pid"]), rec["start_time"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no (readable) owner: not ours to judge
    if rec.get("uid") != os.getuid() or folder.stat().st_uid != os.getuid():
        return False
    if rec.get("boot_id") and rec.get("boot_id") != _boot_id():
        return True  # written before the last reboot
    if start is None:  # no /proc where it was written: fall back to "is the pid alive"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return _proc_start_time(pid) != start  # gone, or the pid was reused by a newer process


def clean_stale(out: Path) -> list[Path]:
    """Remove ``.NAME.partial.*`` folders whose owner died, and leftover ``.NAME.old.*``."""
    removed = []
    for p in out.parent.glob(f".{out.name}.partial.*"):
        if p.is_dir() and not p.is_symlink() and _owner_is_dead(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in out.parent.glob(f".{out.name}.old.*"):  # only called under the swap lock
        if p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in removed:
        log.info("removed stale %s", p)
    return removed


@contextlib.contextmanager
def _swap_lock(out: Path) -> Iterator[None]:
    """Serialize swaps (and stale cleanup) next to ``out`` with an flock on its parent folder.

    Locking the folder itself leaves no lock file behind in the user's output folder."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _commit(bundle: Bundle, tmp: Path) -> None:
    """Hash every file of the finished partial folder and write its manifest."""
    (tmp / OWNER).unlink(missing_ok=True)
    _no_symlinks_below(tmp, "compile")
    owned: set[str] = set()
    for art in bundle.artifacts.values():
        missing = [f for f in art.files if not (tmp / f).exists()]
        if missing:
            raise BundleError(f"stage {art.stage} did not write {missing}")
        art.sha256 = {f: sha256_path(resolve_inside(tmp, f, f"artifacts.{art.stage}.files")) for f in art.files}
        owned.update(art.files)
    extra = {}
    for p in sorted(tmp.rglob("*")):
        rel = p.relative_to(tmp).as_posix()
        if p.is_file() and rel != MANIFEST and not any(rel == f or rel.startswith(f + "/") for f in owned):
            extra[rel] = sha256_path(p)
    bundle.files = extra
    (tmp / MANIFEST).write_text(json.dumps(bundle.manifest(), indent=2) + "\n")
    tmp.chmod(0o755)  # mkdtemp creates 0700; a bundle is meant to be copied and shared


@contextlib.contextmanager
def atomic_bundle(out_dir: str | os.PathLike, target: str, model: dict[str, Any],
                  force: bool = False) -> Iterator[Bundle]:
    """Yield a Bundle rooted in a partial folder; on success hash files, write the manifest, swap.

    ``out_dir`` is checked (``check_output_path``) before and again at the swap."""
    out = check_output_path(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _swap_lock(out):
        clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    (tmp / OWNER).write_text(json.dumps(_owner_record()))
    bundle = Bundle(tmp, target, model, {}, {"created_unix": int(time.time())})
    try:
        yield bundle
        _commit(bundle, tmp)
        with _swap_lock(out):
            check_output_path(out, force)  # something may have appeared there while we compiled
            if out.exists() or out.is_symlink():
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


# ---------------------------------------------------------------- loading

def _json_path(err: jsonschema.ValidationError) -> str:
    return err.json_path if hasattr(err, "json_path") else "$" + "".join(f"[{p!r}]" for p in err.absolute_path)


def _validate(data: Any, mf: Path) -> None:
    if not isinstance(data, dict):
        raise BundleError(f"{mf}: $ must be a JSON object, found {type(data).__name__}; recompile the bundle")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{mf} has format {version}, this version reads format {FORMAT_VERSION}: "
                          "recompile the bundle with `s2dit-deploy compile`")
    errors = sorted(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(data),
                    key=lambda e: (len(e.absolute_path), _json_path(e)))
    if errors:
        e = errors[0]
        msg = e.message
        if e.validator == "pattern" and e.schema.get("pattern") == RELPATH["pattern"]:
            msg = (f"file entry {e.instance!r} must be a normalized relative path inside the bundle "
                   "(no leading '/', no '..', no '.')")
        raise BundleError(f"{mf} is malformed at {_json_path(e)}: {msg}; recompile the bundle")


def _verify(path: Path, arts: dict[str, Artifact], files: dict[str, str]) -> None:
    listed: dict[str, tuple[str, str]] = {}
    for stage, art in arts.items():
        where = f"artifacts.{stage}"
        for f in art.files:
            if f not in art.sha256:
                raise BundleError(f"{path / MANIFEST}: {where}.sha256 has no hash for {f!r}; recompile the bundle")
            listed[f] = (art.sha256[f], f"{where}.files")
        for f in set(art.sha256) - set(art.files):
            raise BundleError(f"{path / MANIFEST}: {where}.sha256 lists {f!r}, which is not in {where}.files")
    for f, digest in files.items():
        if f in listed:
            raise BundleError(f"{path / MANIFEST}: files.{f} is also an artifact file; recompile the bundle")
        listed[f] = (digest, "files")
    for f, (digest, where) in listed.items():
        p = resolve_inside(path, f, where)
        if not p.exists():
            raise BundleError(f"{p} listed in the manifest is missing; recompile the bundle")
        if sha256_path(p) != digest:
            raise BundleError(f"{p} does not match its manifest hash; it was modified or truncated")
    # nothing unlisted: a file no hash covers could still be read by a runtime (e.g. external data)
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            raise BundleError(f"{p} is a symlink; bundles may not contain links, recompile the bundle")
        if p.is_file() and rel != MANIFEST and not any(rel == f or rel.startswith(f + "/") for f in listed):
            raise BundleError(f"{p} is not listed in {MANIFEST}; remove it or recompile the bundle")


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read a bundle's manifest, check its structure and paths and (by default) every file's hash."""
    path = Path(path)
    mf = path / MANIFEST
    if mf.is_symlink():
        raise BundleError(f"{mf} is a symlink; bundles may not contain links, recompile the bundle")
    if not mf.is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing (compile one with `s2dit-deploy compile`)")
    try:
        data = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mf} is corrupt: {exc}; recompile the bundle") from exc
    _validate(data, mf)
    arts = {k: Artifact.from_dict(v) for k, v in data["artifacts"].items()}
    for stage, art in arts.items():
        for i, f in enumerate(art.files):
            resolve_inside(path, f, f"artifacts.{stage}.files[{i}]")
    for f in data["files"]:
        resolve_inside(path, f, "files")
    if verify:
        _verify(path, arts, data["files"])
    return Bundle(path, data["target"], data["model"], arts, data.get("info", {}), dict(data["files"]))
