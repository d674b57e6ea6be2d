"""Find the QNN host libraries and make ExecuTorch's QNN backend use them in this process.

Two sources, in order:

1. ``QNN_SDK_ROOT`` (non-empty): a Qualcomm AI Engine Direct SDK; its
   ``lib/x86_64-linux-clang/libQnnHtp.so`` and ``libQnnSystem.so`` are used as they are.
2. The ``onnxruntime-qnn`` wheel (``site-packages/onnxruntime_qnn/``, QNN 2.4x/2.5x). ExecuTorch
   1.5.1 was built against the QNN 2.37 headers, whose HTP device custom config layout differs, so a
   small interposer (``qnn_htp_compat.c``, built here with gcc on first use and cached under
   ``$XDG_CACHE_HOME/s2dit-deploy/qnn/<hash>/``) stands in for ``libQnnHtp.so`` and forwards to the
   real library.

How the libraries reach ExecuTorch: its QNN backend (both the ahead-of-time adaptor and the runtime
delegate) calls ``dlopen("libQnnHtp.so")`` / ``dlopen("libQnnSystem.so")`` by bare name. The dynamic
loader reads ``LD_LIBRARY_PATH`` only when a process starts, so setting it from Python does
nothing; but a bare-name ``dlopen`` first matches libraries already loaded by their SONAME. So
:func:`ensure_qnn` loads ``libQnnSystem.so`` and the (interposer) ``libQnnHtp.so`` by absolute
path, RTLD_LOCAL, before ExecuTorch asks for them. They must be loaded after torch and ExecuTorch
are imported (the wheel's bundled libc++ loaded first made a later ``import executorch.exir``
crash), which :func:`ensure_qnn` takes care of. For a separate process (a C++ runner),
:func:`runtime_env` gives the ``LD_LIBRARY_PATH`` / ``S2DIT_QNN_HTP_LIB`` to start it with.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from s2dit_deploy.targets.base import TargetUnavailable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qnn_htp_compat.c")
HOST_LIB_DIR = "lib/x86_64-linux-clang"
INSTALL_HINT = ("set QNN_SDK_ROOT to a Qualcomm AI Engine Direct (QNN) SDK, or "
                "`pip install onnxruntime-qnn` (ships the x86 QNN HTP libraries; "
                "`pip install 's2dit-deploy[qnn]'`)")


class QnnLibrariesMissing(TargetUnavailable):
    """No usable QNN host libraries (neither QNN_SDK_ROOT nor the onnxruntime-qnn wheel)."""


class InterposerBuildError(RuntimeError):
    """The QNN compatibility interposer could not be compiled."""


@dataclass(frozen=True)
class QnnLibs:
    source: str  # "QNN_SDK_ROOT" or "onnxruntime-qnn"
    lib_dir: Path  # folder of the real libQnnHtp.so / libQnnSystem.so
    version: str  # QNN version when known
    interposer: Path | None = None  # our libQnnHtp.so stand-in (wheel libraries only)

    @property
    def htp(self) -> Path:
        return self.lib_dir / "libQnnHtp.so"

    @property
    def system(self) -> Path:
        return self.lib_dir / "libQnnSystem.so"

    def to_dict(self) -> dict[str, str | None]:
        return {"source": self.source, "lib_dir": str(self.lib_dir), "qnn_version": self.version,
                "interposer": str(self.interposer) if self.interposer else None}


def _wheel_dir() -> Path | None:
    spec = importlib.util.find_spec("onnxruntime_qnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _wheel_qnn_version(folder: Path) -> str:
    info = folder / "build_and_package_info.py"
    m = re.search(r"qnn_version\s*=\s*['\"]([^'\"]+)", info.read_text()) if info.exists() else None
    return m.group(1) if m else "unknown"


def find_qnn_libraries(env: Mapping[str, str] | None = None) -> QnnLibs:
    """Where the real QNN host libraries are (without loading or building anything)."""
    env = os.environ if env is None else env
    root = env.get("QNN_SDK_ROOT", "")
    if root:
        lib_dir = Path(root) / HOST_LIB_DIR
        if not (lib_dir / "libQnnHtp.so").is_file():
            raise QnnLibrariesMissing(
                f"QNN_SDK_ROOT={root} has no {HOST_LIB_DIR}/libQnnHtp.so; point it at a QNN SDK "
                f"(the folder holding lib/ and include/) or unset it to use onnxruntime-qnn")
        return QnnLibs("QNN_SDK_ROOT", lib_dir, "sdk")
    folder = _wheel_dir()
    if folder is None or not (folder / "libQnnHtp.so").is_file():
        raise QnnLibrariesMissing(f"no QNN host libraries found: {INSTALL_HINT}")
    return QnnLibs("onnxruntime-qnn", folder, _wheel_qnn_version(folder))


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "s2dit-deploy" / "qnn"


def _flags(real_htp: Path) -> list[str]:
    return ["-shared", "-fPIC", "-O2", "-Wall", "-Wl,-soname,libQnnHtp.so",
            f'-DS2DIT_REAL_QNN_HTP="{real_htp}"']


def build_interposer(real_htp: Path, cache_dir: Path | None = None, cc: str | None = None,
                     source: Path = SOURCE) -> Path:
    """Compile the interposer (once per source/flags hash) and return its ``libQnnHtp.so``.

    Built into a temporary folder and renamed into ``<cache>/<hash>/`` so concurrent builds and
    interrupted builds never leave a half-written library behind.
    """
    cc = cc or os.environ.get("CC", "gcc")
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    src = Path(source).read_bytes()
    flags = _flags(Path(real_htp))
    digest = hashlib.sha256(src + "\0".join([cc, *flags]).encode()).hexdigest()[:16]
    final = cache_dir / digest
    lib = final / "libQnnHtp.so"
    if lib.is_file():
        return lib
    if shutil.which(cc) is None:
        raise InterposerBuildError(
            f"the QNN compatibility interposer needs a C compiler: {cc!r} was not found "
            f"(install gcc, set CC, or set QNN_SDK_ROOT to an SDK that matches ExecuTorch)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache_dir))
    try:
        (tmp / "qnn_htp_compat.c").write_bytes(src)
        cmd = [cc, *flags, "-o", str(tmp / "libQnnHtp.so"), str(tmp / "qnn_htp_compat.c"), "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InterposerBuildError(
                f"building the QNN compatibility interposer failed ({' '.join(cmd)}):\n"
                f"{proc.stderr.strip()[-2000:]}")
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; use its copy
            if not lib.is_file():
                raise
        log.info("built QNN compatibility interposer %s", lib)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


_LOADED: QnnLibs | None = None
_HANDLES: list[ctypes.CDLL] = []


def ensure_qnn(env: Mapping[str, str] | None = None) -> QnnLibs:
    """Make ExecuTorch's QNN backend find the QNN libraries in this process (idempotent)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    libs = find_qnn_libraries(env)
    if libs.source == "onnxruntime-qnn":
        libs = QnnLibs(libs.source, libs.lib_dir, libs.version, build_interposer(libs.htp))
        # An empty QNN_SDK_ROOT tells ExecuTorch the caller supplies the SDK (no download attempt).
        os.environ.setdefault("QNN_SDK_ROOT", "")
        os.environ.setdefault("S2DIT_QNN_HTP_LIB", str(libs.htp))
    # Import order matters: torch / ExecuTorch first, then the QNN libraries (see module doc).
    import executorch.exir
    import executorch.runtime  # noqa: F401

    mode = os.RTLD_NOW | os.RTLD_LOCAL
    try:
        _HANDLES.append(ctypes.CDLL(str(libs.system), mode=mode))
        _HANDLES.append(ctypes.CDLL(str(libs.interposer or libs.htp), mode=mode))
    except OSError as exc:
        raise QnnLibrariesMissing(f"cannot load the QNN libraries from {libs.lib_dir}: {exc}; "
                                  f"{INSTALL_HINT}") from exc
    log.info("QNN libraries: %s (%s, QNN %s)", libs.lib_dir, libs.source, libs.version)
    _LOADED = libs
    return libs


def interposer_handle() -> ctypes.CDLL | None:
    """The loaded interposer (for its counters), or None when an SDK is used directly."""
    return _HANDLES[1] if _LOADED is not None and _LOADED.interposer else None


def runtime_env(libs: QnnLibs) -> dict[str, str]:
    """Environment for a separate process (e.g. a C++ executor_runner) to run QNN .pte files."""
    dirs = [str(libs.interposer.parent)] if libs.interposer else []
    dirs.append(str(libs.lib_dir))
    old = os.environ.get("LD_LIBRARY_PATH")
    env = {"LD_LIBRARY_PATH": ":".join(dirs + ([old] if old else []))}
    if libs.interposer:
        env["S2DIT_QNN_HTP_LIB"] = str(libs.htp)
    return env


# Native QNN messages known to be harmless, with why; everything else QNN prints stays a real message.
HARMLESS_NATIVE: tuple[tuple[str, str], ...] = (
    (r"unexpected GraphHtpSettings option 66\b",
     "ExecuTorch's QNN backend (built on the QNN 2.37 headers) passes an HTP graph setting the newer "
     "host library does not know; QNN skips that setting and builds the graph, so the compile and "
     "its numbers are unaffected (tests/test_qnn_target.py checks them)"),
    (r"Qnn API version [\d.]+ is used\. The version is tested against [\d.]+",
     "the host library is newer than the QNN API ExecuTorch was tested with; the layouts that differ "
     "are adapted by the interposer (qnn_htp_compat.c) and the results are checked by the tests"),
)


def classify_native(lines: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Split native log lines into (real messages, known-harmless ones with their reason)."""
    real: list[str] = []
    harmless: list[dict[str, str]] = []
    for line in lines:
        for pattern, reason in HARMLESS_NATIVE:
            if re.search(pattern, line):
                harmless.append({"message": line.strip(), "reason": reason})
                break
        else:
            real.append(line)
    return real, harmless
