"""The one target protocol, its option parser, and the registry that finds targets.

Every target derives from :class:`BaseTarget`: it compiles a ``Stage`` into files inside a bundle
folder and returns an ``Artifact``, and opens an artifact for execution on this machine as a
:class:`Runner`. What is optional (profiling, ETRecords, timing ``execute`` alone) is *declared*
in ``capabilities``, never probed with ``hasattr``. Each target's options are a frozen dataclass
in a light ``targets/<name>/options.py`` module, so ``describe_options`` and option checks need no
toolchain; targets themselves are imported lazily so a missing toolchain only matters when used.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from s2dit_deploy.errors import InputError, ToolchainUnavailable, UsageError

if TYPE_CHECKING:  # keep this module light: no torch, no toolchain
    import numpy as np

    from s2dit_deploy.bundle import Artifact
    from s2dit_deploy.stages import Stage

# name -> (module, pip extra that provides its toolchain)
TARGETS: dict[str, tuple[str, str]] = {
    "coreml": ("s2dit_deploy.targets.coreml.target", "coreml"),
    "executorch-xnnpack": ("s2dit_deploy.targets.xnnpack.target", "executorch"),
    "executorch-qnn": ("s2dit_deploy.targets.qnn.target", "executorch,qnn"),
    "onnx": ("s2dit_deploy.targets.onnx.target", "onnx"),
    "onnx-qnn": ("s2dit_deploy.targets.onnx.qnn_target", "onnx,qnn"),
    "coreai": ("s2dit_deploy.targets.coreai.target", "coreai"),
}
# name -> (light options module, options class): importable without any toolchain
OPTIONS: dict[str, tuple[str, str]] = {
    "coreml": ("s2dit_deploy.targets.coreml.options", "CoreMLOptions"),
    "executorch-xnnpack": ("s2dit_deploy.targets.xnnpack.options", "XnnpackOptions"),
    "executorch-qnn": ("s2dit_deploy.targets.qnn.options", "QnnOptions"),
    "onnx": ("s2dit_deploy.targets.onnx.options", "OnnxOptions"),
    "onnx-qnn": ("s2dit_deploy.targets.onnx.options", "OnnxQnnOptions"),
    "coreai": ("s2dit_deploy.targets.coreai.options", "CoreAIOptions"),
}
# entries the compiler hands to prepare/compile beside the user's options (not user options)
CONTEXT_KEYS = ("pipeline", "calibration")
# declared optional capabilities (BaseTarget.capabilities / Runner.capabilities)
CAPABILITIES = frozenset({"profile", "etrecord", "timed_execute", "quant_presets"})


class TargetUnavailable(ToolchainUnavailable):
    """The target exists but its toolchain (or a runtime for this machine) is not installed."""


class TargetOptionError(InputError):
    """An option key a target does not take, or a bad value for one (the message names both)."""


def field_doc(f: dataclasses.Field) -> str:
    return str(f.metadata.get("doc", ""))


def _choices(f: dataclasses.Field) -> tuple | None:
    ch = f.metadata.get("choices")
    return tuple(ch) if ch is not None else None


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    return getattr(tp, "__name__", str(tp))


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_value(target: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """``value`` (a CLI string or a typed value) as the field's type, or a TargetOptionError."""
    where = f"option {f.name!r} of target {target!r}"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")) and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TargetOptionError(f"{where} must be a boolean (true/false, 1/0, yes/no), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TargetOptionError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise TargetOptionError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise TargetOptionError(f"{where} must be a number, got {value!r}") from None
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        sub = args[0] if args else str
        sub_field = dataclasses.field()
        sub_field.name = f.name
        return tuple(_parse_value(target, sub_field, sub, x) for x in items if str(x).strip())
    if tp is str:
        if isinstance(value, enum.Enum):
            value = value.value
        if not isinstance(value, str):
            raise TargetOptionError(f"{where} must be a string, got {value!r}")
        return value
    return value


def parse_options(cls: type, mapping: Mapping[str, Any] | Any | None, target: str) -> Any:
    """A mapping of strings or typed values -> a frozen ``cls`` instance, every value checked.

    Unknown keys are an error naming the key, the target and the valid keys (``precison=fp32``
    must not be silently ignored); an instance of ``cls`` passes through; entries in
    ``CONTEXT_KEYS`` (``pipeline``, ``calibration``) are the compiler's, not options, and skipped.
    """
    if isinstance(mapping, cls):
        return mapping
    if mapping is not None and not isinstance(mapping, Mapping):
        raise TargetOptionError(f"options of target {target!r} must be a mapping of option=value, "
                                f"got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    given = {k: v for k, v in dict(mapping or {}).items() if k not in CONTEXT_KEYS}
    unknown = sorted(k for k, v in given.items() if k not in fields and v is not None)
    if unknown:
        raise TargetOptionError(
            f"target {target!r} does not take option(s) {', '.join(map(repr, unknown))}; its options are "
            f"{', '.join(fields)} (see `s2dit-deploy compile --target {target} --help-options`)")
    kw: dict[str, Any] = {}
    for key, value in given.items():
        f = fields[key]
        if value is None:
            continue  # "not given": the default
        parsed = _parse_value(target, f, hints[key], value)
        choices = _choices(f)
        if choices is not None and parsed is not None and parsed not in choices:
            hint = f.metadata.get("hint")
            raise TargetOptionError(f"option {key!r} of target {target!r} must be one of "
                                    f"{', '.join(map(str, choices))}, got {value!r}" + (f"; {hint}" if hint else ""))
        kw[key] = parsed
    try:
        return cls(**kw)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise TargetOptionError(f"target {target!r}: {exc}") from exc


def options_to_dict(opts: Any) -> dict[str, Any]:
    """A parsed options instance as a plain mapping (shallow: values are already typed)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def options_class(target_name: str) -> type:
    if target_name not in OPTIONS:
        raise UsageError(f"unknown target {target_name!r}; targets: {', '.join(TARGETS)}")
    module, cls = OPTIONS[target_name]
    return getattr(importlib.import_module(module), cls)


def describe_options(target_name: str) -> list[dict[str, Any]]:
    """Every option of a target: name, type, default, doc and choices (no toolchain imported)."""
    cls = options_class(target_name)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                    "doc": field_doc(f), "choices": list(_choices(f)) if _choices(f) else None})
    return out


def quant_presets(target_name: str) -> tuple[str, ...]:
    """``--quant`` names a target resolves itself (QNN PT2E presets); empty for most targets."""
    return tuple(getattr(options_class(target_name), "QUANT_PRESETS", ()))


@dataclasses.dataclass(frozen=True)
class QuantPreset:
    """A target-native quantization preset chosen with ``--quant`` (e.g. QNN's ``8a8w``).

    The compiler hands it to the target in place of a QuantPlan; ``name`` is what the bundle records.
    """

    name: str


class Runner:
    """Runs one artifact on this machine: named numpy in, named numpy out.

    Optional powers are declared in ``capabilities``: ``timed_execute`` (``ordered`` +
    ``execute``: time the runtime alone), ``profile`` (``profile(inputs, runs, etrecord,
    keep_dir) -> dict``).
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()
    label: ClassVar[str | None] = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def ordered(self, inputs: dict[str, Any]) -> list[Any]:
        raise NotImplementedError(f"{type(self).__name__} does not declare 'timed_execute'")

    def execute(self, tensors: list[Any]) -> list[Any]:
        raise NotImplementedError(f"{type(self).__name__} does not declare 'timed_execute'")

    def profile(self, inputs: dict[str, Any], runs: int = 3, etrecord: Path | None = None,
                keep_dir: Path | None = None) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not declare 'profile'")


class BaseTarget:
    """The protocol every target implements; optional parts are listed in ``capabilities``.

    ``compile`` and ``prepare`` take ``options`` as a mapping (strings from the CLI or typed
    values), possibly carrying the compiler's ``pipeline`` / ``calibration`` context entries;
    ``parse_options`` turns the option part into the target's frozen ``options_cls``.
    """

    name: ClassVar[str] = ""
    options_cls: ClassVar[type] = object
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def parse_options(self, mapping: Mapping[str, Any] | Any | None) -> Any:
        return parse_options(self.options_cls, mapping, self.name)

    def prepare(self, pipe: Any, plan: Any, stages: dict[str, Stage], options: Mapping[str, Any]) -> dict[str, Any]:
        """Check options before any work; may add context (e.g. recorded calibration inputs)."""
        self.parse_options(options)
        return dict(options)

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: Mapping[str, Any]) -> Artifact:
        raise NotImplementedError

    def float_stage(self, stage: Stage) -> Stage:
        """The stage as this target converts it: an fp32 copy when the weights are stored in
        fp16/bf16 (exporters need one dtype; they store their own precision anyway). Core ML
        overrides it and promotes chunk by chunk instead."""
        import torch

        from s2dit_deploy.model_zoo.compute_dtype import has_compute_hooks, promoted, weights_dtype

        if weights_dtype(stage.module) == torch.float32 and not has_compute_hooks(stage.module):
            return stage
        return dataclasses.replace(stage, module=promoted(stage.module))

    def shard_source(self, stage: Stage) -> tuple[Stage, dict[str, Any]]:
        """The stage shards are cut from (after this target's own module rewrites, so each shard is
        already in the form the target lowers) and a JSON-able host input transform for
        ``host_transform`` (``{}``: none). Default: the stage itself."""
        return stage, {}

    def host_transform(self, spec: Mapping[str, Any], named: dict[str, Any]) -> dict[str, Any]:
        """Apply ``shard_source``'s host transform to named contract inputs (default: none)."""
        return named

    def shard_count(self, stage: Stage, plan: Any, options: Mapping[str, Any]) -> int:
        """How many chained programs the compiler should cut ``stage`` into (``targets/sharding.py``).

        1 (the default) compiles the stage whole; targets whose programs have a size limit (QNN
        contexts) override it, from a ``shards`` option or a size bound."""
        return 1

    def load(self, artifact: Artifact, bundle_dir: Path, *, profile: bool = False) -> Runner:
        raise NotImplementedError

    def etrecord(self, artifact: Artifact, bundle_dir: Path) -> Path | None:
        """The artifact's ETRecord (declared capability ``etrecord``); None otherwise."""
        return None

    # what this target's runner computes in on this machine, per artifact precision (``numerics``)
    NUMERICS: ClassVar[dict[str, str]] = {}

    def numerics(self, artifact: Artifact) -> str:
        """The arithmetic a figure scored on this machine was computed in, e.g. "fp16 (Core AI runtime,
        fp16 program)": ``validate`` prints it beside each stage, since a host fp32 run overstates the
        fidelity of a device that computes in fp16."""
        from s2dit_deploy.targets.floors import quant_name

        meta = artifact.metadata or {}
        precision = str(meta.get("compute_precision") or meta.get("precision")
                        or (artifact.quant or {}).get("precision") or "fp32")
        quant = quant_name(artifact)
        where = self.NUMERICS.get(precision) or meta.get("runtime") or self.name
        return f"{precision}{' + ' + quant if quant else ''} ({where})"

    def default_floors(self, artifact: Artifact) -> dict[str, float]:
        """PSNR floors (dB) ``validate`` applies without ``--floor``: output name or "*", and "stream"."""
        from s2dit_deploy.targets.floors import default_floors

        return default_floors(self.name, artifact)

    def check_plan(self, artifact: Artifact, bundle_dir: Path, plan: Any) -> list[str]:
        """Mismatches between the plan's per-layer bits and what the artifact records it built."""
        from s2dit_deploy.targets.floors import check_plan_records

        return check_plan_records(artifact, plan)


def get_target(name: str) -> BaseTarget:
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    module, extra = TARGETS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("s2dit_deploy"):
            raise TargetUnavailable(f"target {name!r} is not implemented in this version") from exc
        raise TargetUnavailable(
            f"target {name!r} needs {exc.name!r}: pip install 's2dit-deploy[{extra}]'"
        ) from exc
    return mod.TARGET
