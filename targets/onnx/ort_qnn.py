"""ONNX Runtime's QNN execution provider (the ``onnxruntime-qnn`` plugin EP) for one SoC.

The plugin is registered once per process with ``ort.register_execution_provider_library``; a
session adds the QNN device with HTP provider options and ``session.disable_cpu_ep_fallback=1`` so
a node QNN cannot take is an error, never a silent CPU fallback. ``soc_model`` / ``htp_arch`` make
the QNN context binary for that phone's NPU; on this x86 host the HTP library emulates it.

The HTP backend is named by absolute path (``backend_path``), never by the bare name
``libQnnHtp.so``: in a process where the ExecuTorch QNN target already loaded its compatibility
interposer under that name, a bare-name load would get the interposer, not the real library.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from s2dit_deploy.targets.base import TargetUnavailable

log = logging.getLogger(__name__)

EP_NAME = "QNNExecutionProvider"
# SoC -> (QNN soc_model id, HTP arch)
SOCS: dict[str, tuple[int, int]] = {"SM8550": (43, 73), "SM8650": (57, 75), "SM8750": (69, 79), "SM8850": (87, 81)}
_REGISTERED = False


def resolve_soc(soc: str) -> tuple[int, int]:
    key = str(soc).upper()
    if key not in SOCS:
        raise ValueError(f"unknown SoC {soc!r} for onnx-qnn; supported: {', '.join(SOCS)}")
    return SOCS[key]


def _wheel():
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        raise TargetUnavailable("onnx-qnn needs the QNN execution provider: `pip install onnxruntime-qnn` "
                                "(or `pip install 's2dit-deploy[onnx,qnn]'`)") from exc
    return onnxruntime_qnn


def _claim_htp_soname() -> None:
    """Load ExecuTorch's QNN libraries (our interposer) before ONNX Runtime loads the real HTP one.

    Both name the SONAME libQnnHtp.so: whichever loads first wins ExecuTorch's bare-name lookup.
    The interposer itself loads the real library by path, which is what ONNX Runtime then gets, so
    with this order ExecuTorch QNN and the ORT QNN EP work in one process.
    """
    try:
        from s2dit_deploy.targets.qnn.libs import ensure_qnn
    except ImportError:
        return
    try:
        ensure_qnn()
    except Exception as exc:  # ExecuTorch QNN unusable here: ORT does not need it
        log.debug("ExecuTorch QNN libraries not loaded first: %s", exc)


def register() -> None:
    """Register the QNN plugin EP with ONNX Runtime (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import onnxruntime as ort

    _claim_htp_soname()
    lib = _wheel().get_library_path()
    try:
        ort.register_execution_provider_library(EP_NAME, lib)
    except Exception as exc:
        if "already registered" not in str(exc).lower():
            raise TargetUnavailable(f"cannot register the QNN execution provider {lib}: {exc}") from exc
    _REGISTERED = True


def htp_backend_path() -> str:
    return str(Path(_wheel().get_library_path()).with_name("libQnnHtp.so"))


def provider_options(soc: str | None = None, profile_csv: Path | None = None,
                     extra: dict[str, str] | None = None) -> dict[str, str]:
    opts = {"backend_path": htp_backend_path(), "htp_performance_mode": "burst"}
    if soc:
        model, arch = resolve_soc(soc)
        opts.update({"soc_model": str(model), "htp_arch": str(arch)})
    if profile_csv is not None:
        opts.update({"profiling_level": "detailed", "profiling_file_path": str(profile_csv)})
    opts.update(extra or {})
    return opts


def session_options(soc: str | None = None, ep_context_file: Path | None = None,
                    profile_csv: Path | None = None, extra: dict[str, str] | None = None,
                    embed_context: bool = True):
    """SessionOptions with the QNN device added (HTP, no CPU fallback, optional EPContext dump).

    ``embed_context=False`` (EPContext ``embed_mode=0``) writes the context binary to
    ``<ctx stem>_qnn.bin`` beside the model instead of inside it: an embedded binary is a protobuf
    attribute and stops at 2 GiB."""
    import onnxruntime as ort

    register()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise TargetUnavailable("the QNN execution provider reports no device on this machine")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if ep_context_file is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(ep_context_file))
        # "1": one self-contained file; "0": the binary in a file the EPContext node names
        so.add_session_config_entry("ep.context_embed_mode", "1" if embed_context else "0")
    so.add_provider_for_devices(devices[:1], provider_options(soc, profile_csv, extra))
    return so


def session(model: Path, soc: str | None = None, **kwargs: Any):
    import onnxruntime as ort

    return ort.InferenceSession(str(model), session_options(soc, **kwargs))
