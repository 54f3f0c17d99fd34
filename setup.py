"""Builds fastmargin._C (DESIGN §4): the CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are both here. It compiles against the torch already
installed, so install without build isolation:

    pip install torch==2.14.1 && pip install --no-build-isolation -e ".[test]"

FASTMARGIN_SKIP_CUDA_BUILD=1 builds the CPU part only; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "8.0;9.0", A100 and H100).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from glob import glob
from pathlib import Path

import torch
from setuptools import Extension, find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def cuda_build_decision(
    env: Mapping[str, str],
    cuda_sources: Sequence[str],
    torch_cuda: str | None,
    cuda_home: str | None,
) -> tuple[bool, str]:
    """Whether to compile csrc/cuda, and the reason the build prints."""
    if env.get("FASTMARGIN_SKIP_CUDA_BUILD") == "1":
        return False, "FASTMARGIN_SKIP_CUDA_BUILD=1"
    if not cuda_sources:
        return False, "csrc/cuda holds no .cu sources"
    if torch_cuda is None:
        return False, "torch is a CPU build (torch.version.cuda is None)"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    # torch guesses CUDA_HOME as the parent of the nvcc on PATH, which for a wrapper
    # script (/usr/local/bin/nvcc) is not the toolkit; the binding file needs its headers.
    if not Path(cuda_home, "include", "cuda_runtime_api.h").is_file():
        return False, f"CUDA_HOME={cuda_home} has no include/cuda_runtime_api.h; set CUDA_HOME to the toolkit"
    return True, f"CUDA {torch_cuda}, toolkit at {cuda_home}"


def nvidia_include_dirs(torch_cuda: str) -> list[str]:
    """nvidia/cu<major>/include of the pip CUDA wheels: torch's CUDA headers include
    cusparse.h, which a bare toolkit may lack and those wheels bring."""
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec is not None else []
    major = torch_cuda.split(".")[0]
    return [str(d) for d in (Path(r, f"cu{major}", "include") for r in roots) if d.is_dir()]


def extension() -> Extension:
    # Relative to ROOT, as setuptools wants sources; pip builds with ROOT as the cwd.
    cpp_sources = ["csrc/fastmargin.cpp", *sorted(glob("csrc/cpu/*.cpp", root_dir=ROOT))]
    cuda_sources = sorted(glob("csrc/cuda/*.cu", root_dir=ROOT))
    with_cuda, reason = cuda_build_decision(os.environ, cuda_sources, torch.version.cuda, CUDA_HOME)
    print(f"fastmargin: CUDA kernels {'compiled' if with_cuda else 'not compiled'}: {reason}")

    include_dirs = [str(ROOT / "csrc")]
    cxx_flags = ["-O3", "-fopenmp"]
    if not with_cuda:
        # build_info() reports the reason, so a missing 'cuda' backend says why.
        return CppExtension(
            "fastmargin._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=[("FASTMARGIN_NO_CUDA_REASON", json.dumps(reason))],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    # Without a list cpp_extension asks the (possibly absent) GPU which arch to build.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    return CUDAExtension(
        "fastmargin._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs + nvidia_include_dirs(torch.version.cuda),
        define_macros=[("FASTMARGIN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )


# setuptools runs this file as __main__; tests import it for cuda_build_decision.
if __name__ == "__main__":
    setup(
        packages=[*find_packages(include=["fastmargin", "fastmargin.*"]), "fastmargin.kernels"],
        package_dir={"fastmargin.kernels": "kernels"},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
    )
