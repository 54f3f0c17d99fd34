"""The build: fastmargin._C loads and reports how it was compiled, kernels/ is installed as
fastmargin.kernels, the version is one, and a missing CUDA part is explained."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch

import fastmargin
from fastmargin import backends

ROOT = Path(__file__).resolve().parents[1]

BUILD_INFO_TYPES = {
    "cuda": bool,
    "openmp": bool,
    "omp_max_threads": int,
    "compiler": str,
    "torch_version": str,
}


@pytest.fixture(scope="module")
def build_info():
    from fastmargin import _C

    return _C.build_info()


@pytest.fixture(scope="module")
def setup_py():
    # Imported under another name, so the `__main__` guard keeps setup() from running.
    spec = importlib.util.spec_from_file_location("fastmargin_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_info_has_documented_keys_and_types(build_info):
    for key, kind in BUILD_INFO_TYPES.items():
        value = build_info[key]
        assert isinstance(value, kind), f"build_info()[{key!r}] = {value!r}, not {kind.__name__}"
    cuda_version_kind = str if build_info["cuda"] else type(None)
    assert isinstance(build_info["cuda_version"], cuda_version_kind), build_info


def test_compiled_against_the_running_torch(build_info):
    # A local tag such as +cu130 is not part of the C++ version.
    assert build_info["torch_version"] == torch.__version__.split("+")[0]


def test_openmp_is_torchs_runtime(build_info):
    from fastmargin import _C

    assert build_info["openmp"], build_info
    # One OpenMP runtime: torch's thread setting reaches the extension.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.build_info()["omp_max_threads"] == 1
    finally:
        torch.set_num_threads(threads)


def test_kernels_installed_as_fastmargin_kernels():
    import fastmargin.kernels

    assert Path(fastmargin.kernels.__file__).parent.name == "kernels", fastmargin.kernels.__file__


def test_version_matches_installed_distribution():
    assert fastmargin.__version__ == importlib.metadata.version("fastmargin")


def test_cuda_backend_says_why_when_not_compiled(build_info):
    if build_info["cuda"]:
        pytest.skip("this build has the CUDA kernels compiled in")
    reason = backends.unavailable_reason("cuda")
    assert reason is not None and "built without CUDA" in reason, reason
    assert build_info["cuda_reason"] in reason, (build_info["cuda_reason"], reason)


CU = ["csrc/cuda/k.cu"]


# cuda_home "toolkit" and "bare" name two roots the test makes, with and without the headers.
@pytest.mark.parametrize(
    "env, cuda_sources, torch_cuda, cuda_home, compiled, reason_names",
    [
        ({"FASTMARGIN_SKIP_CUDA_BUILD": "1"}, CU, "13.0", "toolkit", False, "FASTMARGIN_SKIP_CUDA_BUILD"),
        ({}, CU, "13.0", None, False, "CUDA_HOME"),
        ({}, CU, "13.0", "bare", False, "no include/cuda_runtime_api.h"),
        ({}, CU, None, "toolkit", False, "CPU build"),
        ({}, [], "13.0", "toolkit", False, "no .cu sources"),
        ({"FASTMARGIN_SKIP_CUDA_BUILD": "0"}, CU, "13.0", "toolkit", True, "CUDA 13.0"),
    ],
)
def test_setup_cuda_decision(setup_py, tmp_path, env, cuda_sources, torch_cuda, cuda_home, compiled, reason_names):
    (tmp_path / "toolkit" / "include").mkdir(parents=True)
    (tmp_path / "toolkit" / "include" / "cuda_runtime_api.h").touch()
    (tmp_path / "bare").mkdir()
    if cuda_home is not None:
        cuda_home = str(tmp_path / cuda_home)
    decided, reason = setup_py.cuda_build_decision(env, cuda_sources, torch_cuda, cuda_home)
    assert decided is compiled, reason
    assert reason_names in reason, reason
