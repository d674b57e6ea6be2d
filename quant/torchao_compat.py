"""Import torchao without its native-library warnings when those libraries do not matter here.

``import torchao`` tries every bundled ``_C*.so`` and logs "Failed to load ..." (WARNING, on
stderr through logging's last-resort handler) for each one this machine cannot load. The CUDA-only
kernels (``_C_mxfp8``: MX fp8 training, ``_C_cutlass_90a``: Hopper GEMMs) fail on every CPU host,
and no path of ours (int8 / int4 / 8da4w fake quant, XNNPACK, QNN) uses them, so those records are
demoted to DEBUG here; any other load failure is passed through as torchao logged it. The filter is
attached only for the duration of the first import.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from types import ModuleType

log = logging.getLogger(__name__)

# native libraries no CPU path of ours loads (their failure never matters for int8/int4/8da4w)
UNUSED_NATIVE = re.compile(r"Failed to load .*[/\\]_C_(mxfp8|cutlass_\w+)[^/\\]*\.so\b")


class _DemoteUnused(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and UNUSED_NATIVE.search(record.getMessage()):
            log.debug("torchao (harmless here): %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def torchao_import_scope() -> Iterator[None]:
    """Scope within which a first ``import torchao`` (directly or via ExecuTorch) stays quiet."""
    if "torchao" in sys.modules:
        yield
        return
    logger, filt = logging.getLogger("torchao"), _DemoteUnused()
    logger.addFilter(filt)
    try:
        yield
    finally:
        logger.removeFilter(filt)


def import_torchao() -> ModuleType:
    """``torchao``, imported once with the unused-kernel warnings demoted to DEBUG."""
    with torchao_import_scope():
        import torchao

    return torchao
