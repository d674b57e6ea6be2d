"""s2dit-deploy: compile, quantize, validate and benchmark S2DiT for phones.

    import s2dit_deploy as sd
    sd.list_models()
    pipe = sd.load_pipeline("s2dit-small")
    video = pipe.generate("a red ball bouncing", num_chunks=4, steps=4, seed=0)
    bundle = sd.compile("s2dit-small", target="executorch-xnnpack", out_dir="build/xnnpack")
    report = sd.validate(bundle)
    result = sd.calibrate("s2dit-small", target="coreml")  # w4a8-mixed QuantPlan

The API is resolved on first use (module ``__getattr__``), so ``import s2dit_deploy`` and
``s2dit-deploy --help`` stay instant: torch and the toolchains load only when a function needs them.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "bench", "calibrate", "compile", "init_checkpoint", "list_models", "load_model",
           "load_pipeline", "validate"]
_API = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from .api import (  # noqa: F401
        bench, calibrate, compile, init_checkpoint, list_models, load_model, load_pipeline, validate)


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 's2dit_deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)


class _CallableModule(types.ModuleType):
    """The ``s2dit_deploy.bench`` subpackage, callable as the ``sd.bench`` API function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import bench

        return bench(*args, **kwargs)


class _Package(types.ModuleType):
    """Importing ``s2dit_deploy.bench.<x>`` makes the import system set the package attribute ``bench``
    to that subpackage, which would shadow the ``sd.bench`` function; the subpackage is made callable
    as the function instead, so ``sd.bench(...)`` keeps working and ``s2dit_deploy.bench.harness``
    still names the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "bench" and isinstance(value, types.ModuleType) and not isinstance(value, _CallableModule):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
