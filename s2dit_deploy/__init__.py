"""s2dit-deploy: compile, quantize, validate and benchmark S2DiT for phones.

    import s2dit_deploy as sd
    sd.list_models()
    pipe = sd.load_pipeline("s2dit-small")
    video = pipe.generate("a red ball bouncing", num_chunks=4, steps=4, seed=0)
    bundle = sd.compile("s2dit-small", target="executorch-xnnpack", out_dir="build/xnnpack")
    report = sd.validate(bundle)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import bench, compile, list_models, load_model, load_pipeline, validate  # noqa: E402

__all__ = ["__version__", "bench", "compile", "list_models", "load_model", "load_pipeline", "validate"]
