"""Without a CUDA device the Triton kernels run under Triton's interpreter, on CPU tensors
(DESIGN §6). triton.jit reads TRITON_INTERPRET when fastmargin.kernels is imported, so it
is set here, before any test module imports fastmargin.

Per-backend cost marks. The backend suite (tests/test_backends.py) runs each case on every
usable backend (helpers.backend_params); a backend that runs under Triton's interpreter is
marked `interpreted`. A test marked `thin(keep=...)` runs on such a backend only the cases
for which keep(**params) is true by default; the others are marked slow (pytest -m slow,
or "slow or not slow", runs the full product there). Compiled backends run every case."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreted: a case on a backend that runs under Triton's interpreter")
    config.addinivalue_line("markers", "thin(keep): on an interpreted backend only the cases keep(**params) "
                                       "accepts run by default, the rest are slow (tests/conftest.py)")


@pytest.hookimpl(tryfirst=True)  # before the -m selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        thin = item.get_closest_marker("thin")
        if thin is None or item.get_closest_marker("interpreted") is None:
            continue
        params = getattr(item, "callspec", None)
        if not thin.kwargs["keep"](**(params.params if params else {})):
            item.add_marker(pytest.mark.slow)
