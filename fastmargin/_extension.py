"""The compiled extension fastmargin._C: whether it loaded, how it was built, and why not.

A missing or broken extension is not an error at import: fastmargin degrades to the
reference and `python -m fastmargin` shows the reason.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from . import _C
    except ImportError as error:
        return None, (
            f"the compiled extension fastmargin._C did not load ({error}); "
            "reinstall with `pip install --no-build-isolation -e .` to build it"
        )
    return _C, None


def module() -> ModuleType | None:
    return _load()[0]


def build_info() -> dict:
    """What fastmargin._C reports of its build, or {'error': why it is missing}."""
    ext, reason = _load()
    return dict(ext.build_info()) if ext is not None else {"error": reason}


def unavailable_reason(part: str) -> str | None:
    """None if the extension has `part` ('cpu' or 'cuda') compiled in, else why not."""
    ext, reason = _load()
    if ext is None:
        return reason
    info = ext.build_info()
    if part == "cuda" and not info["cuda"]:
        return (
            f"fastmargin._C was built without CUDA ({info['cuda_reason']}); the CUDA kernels need "
            "nvcc (CUDA_HOME at the toolkit) and a CUDA build of torch at install time"
        )
    return None
